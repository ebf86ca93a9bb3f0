//! [`GuestAgent`] for Linux guests running microvmm's `guest-agent`: reached through the VM's
//! vsock host socket (`vsock-uds`), the workload checkpointed with CRIU into an image the host
//! holds ([`CheckpointImage`]) and restored from it in the backup.
//!
//! `freeze` does nothing: `criu dump` freezes the process tree itself (behind the agent's guard
//! rule, so no TCP segment is lost), and the dump is the checkpoint step. After the dump the
//! guest's page cache is written out (`sync`): a workload's files on a volume that moves by the
//! merge (not in the image) reach the disk only then.

use std::time::Duration;

use guest_agent::host::{AgentClient, CheckpointImage, HostError};
use guest_agent::protocol::CheckpointOpts;
use guest_agent::transport::Endpoint;

use crate::agent::{
    AgentConnector, AgentEndpoint, AgentError, GuestAgent, Interrupter, WorkloadImage,
};

/// Connects to `guest-agent`s over the VM's vsock host socket.
#[derive(Debug, Clone, Default)]
pub struct CriuConnector {
    /// Checkpoint options (pre-dump rounds; a page server is not used: the image is held by
    /// the host).
    pub checkpoint: CheckpointOpts,
}

impl AgentConnector for CriuConnector {
    fn connect(&self, ep: &AgentEndpoint) -> Result<Box<dyn GuestAgent>, AgentError> {
        let endpoint = Endpoint::VsockUds {
            path: ep.uds.clone(),
            port: ep.port,
        };
        let mut c = AgentClient::connect(&endpoint, ep.timeout).map_err(map)?;
        c.set_read_timeout(Some(ep.timeout)).map_err(map)?;
        c.ping().map_err(map)?;
        Ok(Box::new(CriuAgent {
            client: c,
            checkpoint: CheckpointOpts {
                page_server: None,
                ..self.checkpoint.clone()
            },
            timeout: ep.timeout,
        }))
    }
}

/// One connection to a Linux guest's agent.
#[derive(Debug)]
pub struct CriuAgent {
    client: AgentClient,
    checkpoint: CheckpointOpts,
    timeout: Duration,
}

fn map(e: HostError) -> AgentError {
    match e {
        HostError::Agent { kind, message } => AgentError::Refused(format!("{kind:?}: {message}")),
        e => {
            let text = guest_agent::agent::error_chain(&e);
            if text.contains("timed out") || text.contains("WouldBlock") {
                AgentError::Timeout(text)
            } else {
                AgentError::Connection(text)
            }
        }
    }
}

impl CriuAgent {
    /// Runs `f` with no read limit beyond `limit` (a dump or restore can take seconds).
    fn with_timeout<T>(
        &mut self,
        limit: Duration,
        f: impl FnOnce(&mut AgentClient) -> Result<T, HostError>,
    ) -> Result<T, AgentError> {
        self.client.set_read_timeout(Some(limit)).map_err(map)?;
        let r = f(&mut self.client).map_err(map);
        let reset = self
            .client
            .set_read_timeout(Some(self.timeout))
            .map_err(map);
        let v = r?;
        reset?;
        Ok(v)
    }
}

/// Longest wait for the guest's `sync` after a checkpoint.
const SYNC_LIMIT: Duration = Duration::from_secs(60);

/// Longest wait for the old VM's agent to release the moved workload (after the commit).
const RELEASE_LIMIT: Duration = Duration::from_secs(30);

/// Longest wait for a CRIU dump or restore.
const CRIU_LIMIT: Duration = Duration::from_secs(120);

impl GuestAgent for CriuAgent {
    fn interrupter(&self) -> Option<Interrupter> {
        // A Mutex makes the handle shareable (`Connection` is only `Send`).
        let conn = std::sync::Mutex::new(self.client.interrupter().ok()?);
        Some(Box::new(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = conn.shutdown() {
                tracing::debug!("shutting the agent connection down: {e}");
            }
        }))
    }
    fn exec(&mut self, argv: &[String], timeout: Duration) -> Result<i32, AgentError> {
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        // The agent kills the command at `timeout`; the host waits a little longer for that.
        let out = self.with_timeout(timeout + Duration::from_secs(10), |c| {
            c.exec(&args, Some(timeout))
        })?;
        if out.timed_out {
            return Err(AgentError::Timeout(format!(
                "{argv:?} ran past {timeout:?}"
            )));
        }
        Ok(out.code.unwrap_or(-1))
    }
    fn freeze(&mut self) -> Result<(), AgentError> {
        Ok(())
    }
    fn checkpoint(&mut self) -> Result<WorkloadImage, AgentError> {
        let opts = self.checkpoint.clone();
        let img = self.with_timeout(CRIU_LIMIT, |c| c.checkpoint_image(&opts))?;
        // The workload is gone from this VM; what it wrote goes to the disk for the last
        // catch-up. A failure here fails the checkpoint (the handoff rolls back).
        let code = self.exec(&["sync".to_string()], SYNC_LIMIT)?;
        if code != 0 {
            return Err(AgentError::Refused(format!(
                "sync after the checkpoint exited {code}"
            )));
        }
        Ok(WorkloadImage {
            bytes: img.encode(),
        })
    }
    fn restore(&mut self, image: &WorkloadImage) -> Result<(), AgentError> {
        let img = CheckpointImage::decode(&image.bytes).map_err(map)?;
        self.with_timeout(CRIU_LIMIT, |c| c.restore_image(&img))
            .map(|_| ())
    }
    fn release(&mut self) -> Result<(), AgentError> {
        // The agent removes the service address and its guard rules (`ip`, `iptables`): seconds
        // in a slow guest, more than the connection's short default.
        self.with_timeout(RELEASE_LIMIT, AgentClient::release)
    }
    fn rollback(&mut self) -> Result<(), AgentError> {
        self.with_timeout(CRIU_LIMIT, AgentClient::rollback)
            .map(|_| ())
    }
    fn discard(&mut self) -> Result<(), AgentError> {
        // Killing a JVM's tree and waiting for it takes seconds in a slow guest.
        self.with_timeout(CRIU_LIMIT, AgentClient::discard)
    }
    fn status(&mut self) -> Result<String, AgentError> {
        let (pid, tree) = self.client.status().map_err(map)?;
        Ok(format!("pid {pid:?}, {} tasks", tree.len()))
    }
}
