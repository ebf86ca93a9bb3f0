//! How the orchestrator drives the guests: one small trait ([`GuestAgent`]) per connection
//! to a guest's agent, made by an [`AgentConnector`]. The orchestrator knows nothing else about
//! what runs in the guests; [`crate::service_agent`] implements it for the `service` test guest.

use std::path::PathBuf;
use std::time::Duration;

/// Which VM an agent connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The VM serving now.
    Active,
    /// The clone being upgraded.
    Backup,
}

/// Where a guest agent listens: the VM's vsock host socket and the guest port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEndpoint {
    /// The VM.
    pub role: Role,
    /// The vsock device's host-side Unix socket.
    pub uds: PathBuf,
    /// The agent's guest port.
    pub port: u32,
    /// Longest wait for one answer.
    pub timeout: Duration,
}

/// Errors of a guest agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent did not answer in time.
    #[error("guest agent timed out: {0}")]
    Timeout(String),
    /// The agent refused the request or the operation failed in the guest.
    #[error("guest agent refused: {0}")]
    Refused(String),
    /// The connection failed.
    #[error("guest agent connection failed: {0}")]
    Connection(String),
}

/// A checkpointed workload, opaque to the orchestrator (the agent's own format).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadImage {
    /// The image bytes.
    pub bytes: Vec<u8>,
}

/// One connection to a guest's agent.
pub trait GuestAgent: Send {
    /// Runs a command in the guest; its exit code.
    fn exec(&mut self, argv: &[String], timeout: Duration) -> Result<i32, AgentError>;
    /// Stops the workload from changing its state (serving, writing its files); its
    /// connections' incoming bytes are kept.
    fn freeze(&mut self) -> Result<(), AgentError>;
    /// Checkpoints the frozen workload. On return, what the workload wrote to its files is on
    /// the VM's disks (not only in the guest's caches), so the last catch-up carries it.
    fn checkpoint(&mut self) -> Result<WorkloadImage, AgentError>;
    /// Restores a checkpointed workload in this guest.
    fn restore(&mut self, image: &WorkloadImage) -> Result<(), AgentError>;
    /// Gives the workload up for good (the old copy, after the commit).
    fn release(&mut self) -> Result<(), AgentError>;
    /// Undoes a freeze or checkpoint: the workload runs again here.
    fn rollback(&mut self) -> Result<(), AgentError>;
    /// A one-line status, for logs and checks.
    fn status(&mut self) -> Result<String, AgentError>;
    /// On the backup, right after the clone: stops its copy of the workload, which must not run
    /// beside the one restored there (a Linux guest's agent kills it; the default does nothing,
    /// for guests whose copy stands by by itself, as the `service` guest's after its vsock
    /// transport reset).
    fn discard(&mut self) -> Result<(), AgentError> {
        Ok(())
    }
    /// Something that ends a call blocked on this agent at once, with an error, from any thread
    /// (the orchestrator uses it when the guest's vCPU stops: a dead guest never answers).
    /// `None` when the connection cannot give one.
    fn interrupter(&self) -> Option<Interrupter> {
        None
    }
}

/// Ends a blocked agent call (see [`GuestAgent::interrupter`]).
pub type Interrupter = Box<dyn Fn() + Send + Sync>;

/// Makes agent connections.
pub trait AgentConnector: Send + Sync {
    /// Connects to the agent at `endpoint` and checks that it answers.
    fn connect(&self, endpoint: &AgentEndpoint) -> Result<Box<dyn GuestAgent>, AgentError>;
}
