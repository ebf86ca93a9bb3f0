//! [`GuestAgent`] for the `service` test guest: its agent's line protocol
//! ([`crate::service_guest::ServiceAgent`]) behind the orchestrator's trait.

use std::time::Duration;

use crate::agent::{
    AgentConnector, AgentEndpoint, AgentError, GuestAgent, Interrupter, WorkloadImage,
};
use crate::service_guest::{ServiceAgent, ServiceGuestError};

/// Connects to `service` guests' agents.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServiceConnector;

impl AgentConnector for ServiceConnector {
    fn connect(&self, ep: &AgentEndpoint) -> Result<Box<dyn GuestAgent>, AgentError> {
        let mut a = ServiceAgent::connect(&ep.uds, ep.port, ep.timeout).map_err(map)?;
        a.status().map_err(map)?;
        Ok(Box::new(ServiceGuestAgent(a)))
    }
}

/// One connection to a `service` guest's agent.
#[derive(Debug)]
pub struct ServiceGuestAgent(pub ServiceAgent);

fn map(e: ServiceGuestError) -> AgentError {
    match e {
        ServiceGuestError::Refused(m) => AgentError::Refused(m),
        ServiceGuestError::Timeout(m) => AgentError::Timeout(format!("no answer within {m:?}")),
        e => {
            // The whole chain: "cannot connect ...: <the OS error>".
            let mut text = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                text.push_str(&format!(": {c}"));
                src = c.source();
            }
            AgentError::Connection(text)
        }
    }
}

impl GuestAgent for ServiceGuestAgent {
    fn interrupter(&self) -> Option<Interrupter> {
        let stream = self.0.stream_handle().ok()?;
        Some(Box::new(move || {
            if let Err(e) = stream.shutdown(std::net::Shutdown::Both) {
                tracing::debug!("shutting the agent connection down: {e}");
            }
        }))
    }
    fn exec(&mut self, argv: &[String], timeout: Duration) -> Result<i32, AgentError> {
        self.0.exec(argv, timeout).map_err(map)
    }
    fn freeze(&mut self) -> Result<(), AgentError> {
        self.0.freeze().map_err(map)
    }
    fn checkpoint(&mut self) -> Result<WorkloadImage, AgentError> {
        self.0
            .checkpoint()
            .map(|bytes| WorkloadImage { bytes })
            .map_err(map)
    }
    fn restore(&mut self, image: &WorkloadImage) -> Result<(), AgentError> {
        self.0.restore(&image.bytes).map(|_| ()).map_err(map)
    }
    fn release(&mut self) -> Result<(), AgentError> {
        self.0.release().map_err(map)
    }
    fn rollback(&mut self) -> Result<(), AgentError> {
        self.0.rollback().map_err(map)
    }
    fn status(&mut self) -> Result<String, AgentError> {
        self.0.status().map(|s| format!("{s:?}")).map_err(map)
    }
}
