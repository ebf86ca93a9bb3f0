//! The machine's vCPUs: before they start (created, configured, restored), their threads once
//! started, the channel their threads report on when they finish, and the pause/resume/task
//! handshake with each thread.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use super::MachineError;
use crate::vcpu::{
    ExitCounters, StopNotice, Vcpu, VcpuEvent, VcpuExitReport, VcpuHandle, VcpuResponse, VcpuTask,
};

/// How long a pause or resume waits for each vCPU's answer by default.
pub(super) const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The vCPUs of one machine.
pub(super) struct VcpuManager {
    /// vCPUs without a thread (before start, after stop), by id.
    idle: Vec<Vcpu>,
    /// Threads of the started vCPUs.
    handles: Vec<VcpuHandle>,
    exit_tx: Sender<VcpuExitReport>,
    exit_rx: Receiver<VcpuExitReport>,
    ack_timeout: Duration,
    exits: Arc<ExitCounters>,
    stops: Arc<StopNotice>,
}

impl VcpuManager {
    pub(super) fn new() -> Self {
        let (exit_tx, exit_rx) = channel();
        Self {
            idle: Vec::new(),
            handles: Vec::new(),
            exit_tx,
            exit_rx,
            ack_timeout: VCPU_ACK_TIMEOUT,
            exits: Arc::default(),
            stops: Arc::default(),
        }
    }

    /// Adds a vCPU not yet started.
    pub(super) fn push(&mut self, vcpu: Vcpu) {
        self.idle.push(vcpu);
    }

    /// The vCPUs without a thread.
    pub(super) fn idle(&self) -> &[Vcpu] {
        &self.idle
    }

    /// Exit counters shared by the vCPU threads.
    pub(super) fn exits(&self) -> &Arc<ExitCounters> {
        &self.exits
    }

    /// Raised when a vCPU stops on its own.
    pub(super) fn stops(&self) -> &Arc<StopNotice> {
        &self.stops
    }

    /// Sets the per-vCPU answer timeout of pause, resume and tasks.
    pub(super) fn set_ack_timeout(&mut self, t: Duration) {
        self.ack_timeout = t;
    }

    /// Starts a thread for every idle vCPU.
    pub(super) fn start(&mut self) -> Result<(), MachineError> {
        for vcpu in self.idle.drain(..) {
            let h = vcpu.start(self.exit_tx.clone(), true)?;
            self.handles.push(h);
        }
        Ok(())
    }

    /// Sends `event` to every vCPU thread, then waits for each to answer `want`.
    pub(super) fn broadcast(
        &self,
        event: VcpuEvent,
        want: VcpuResponse,
    ) -> Result<(), MachineError> {
        for h in &self.handles {
            h.send(event.clone())?;
        }
        for h in &self.handles {
            let got = h.response(self.ack_timeout)?;
            if got != want {
                let why = (got == VcpuResponse::Finished)
                    .then(|| self.finish_reason(h.id()))
                    .flatten();
                return Err(MachineError::VcpuAnswer {
                    id: h.id(),
                    sent: event.clone(),
                    got,
                    why,
                });
            }
        }
        Ok(())
    }

    /// Parks every vCPU; if one does not answer, lets the others run again.
    pub(super) fn pause(&self) -> Result<(), MachineError> {
        self.broadcast(VcpuEvent::Pause, VcpuResponse::Paused)
            .inspect_err(|_| {
                if let Err(undo) = self.broadcast(VcpuEvent::Resume, VcpuResponse::Resumed) {
                    tracing::warn!("a failed pause could not resume every vCPU: {undo}");
                }
            })
    }

    /// Lets every vCPU run again; if one does not answer, parks the others again.
    pub(super) fn resume(&self) -> Result<(), MachineError> {
        self.broadcast(VcpuEvent::Resume, VcpuResponse::Resumed)
            .inspect_err(|_| {
                if let Err(undo) = self.broadcast(VcpuEvent::Pause, VcpuResponse::Paused) {
                    tracing::warn!("a failed resume could not park every vCPU again: {undo}");
                }
            })
    }

    /// Runs `task` on every vCPU: on its thread if started, directly otherwise.
    pub(super) fn on_each(&self, task: VcpuTask) -> Result<(), MachineError> {
        if self.handles.is_empty() {
            self.idle.iter().for_each(|v| task(v));
            return Ok(());
        }
        self.broadcast(VcpuEvent::Run(task), VcpuResponse::Ran)
    }

    /// What vCPU `id` reported when its thread finished, if it did (`it stopped: ...` or `it
    /// failed: ...`). Every report stays queued for [`VcpuManager::next_exit`].
    fn finish_reason(&self, id: u8) -> Option<String> {
        let reports: Vec<VcpuExitReport> = self.exit_rx.try_iter().collect();
        let found = reports
            .iter()
            .find(|r| r.id == id)
            .map(|r| match &r.result {
                Ok(stop) => format!("it stopped: {stop:?}"),
                Err(e) => format!("it failed: {e}"),
            });
        for r in reports {
            // Our own channel: the receiver lives in `self`, so the send cannot fail.
            let _ = self.exit_tx.send(r);
        }
        found
    }

    /// The next exit report, waiting up to `timeout` (forever for `None`).
    pub(super) fn next_exit(
        &self,
        timeout: Option<Duration>,
    ) -> Result<VcpuExitReport, MachineError> {
        match timeout {
            Some(t) => match self.exit_rx.recv_timeout(t) {
                Ok(r) => Ok(r),
                Err(RecvTimeoutError::Timeout) => Err(MachineError::Timeout(t)),
                Err(RecvTimeoutError::Disconnected) => unreachable_disconnect(),
            },
            None => match self.exit_rx.recv() {
                Ok(r) => Ok(r),
                Err(_) => unreachable_disconnect(),
            },
        }
    }

    /// Ends every vCPU thread and takes its vCPU back; the first thread error, if any.
    pub(super) fn join(&mut self) -> Result<(), MachineError> {
        let mut first_err = None;
        for h in self.handles.drain(..) {
            match h.finish() {
                Ok(v) => self.idle.push(v),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.idle.sort_by_key(Vcpu::id);
        match first_err {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

impl Drop for VcpuManager {
    fn drop(&mut self) {
        if !self.handles.is_empty()
            && let Err(e) = self.join()
        {
            tracing::warn!("a vCPU thread ended with an error at teardown: {e}");
        }
    }
}

fn unreachable_disconnect() -> ! {
    // The manager holds a sender of the exit channel, so the channel cannot disconnect.
    unreachable!("the vCPU manager holds a sender of its own exit channel")
}
