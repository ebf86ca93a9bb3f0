//! The state one upgrade carries from phase to phase, and what rollback needs to know.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use block::Layer;
use block::merge::Policy;
use devices::virtio::vsock::muxer::{HostListener, MuxerState};
use vmm::Machine;

use crate::agent::{GuestAgent, WorkloadImage};
use crate::journal::{Journal, Record};
use crate::phase::Phase;
use crate::plan::UpgradePlan;
use crate::report::{PhaseTiming, UpgradeReport};
use crate::{Event, StepError, UpgradeOptions};

/// One disk's layers during the upgrade.
pub(crate) struct DiskSet {
    pub(crate) original: PathBuf,
    pub(crate) active_dir: PathBuf,
    pub(crate) backup_dir: PathBuf,
    pub(crate) merged_dir: PathBuf,
    pub(crate) policy: Policy,
    /// The active VM's fork child (after the clone).
    pub(crate) active: Option<Arc<Layer>>,
    /// The backup's fork child.
    pub(crate) backup: Option<Arc<Layer>>,
    /// The merge output.
    pub(crate) merged: Option<Arc<Layer>>,
    /// The active delta's sequence number up to which the output has its writes.
    pub(crate) since: u64,
}

/// The service's VMM resources taken off a VM's devices, in transit.
#[derive(Default)]
pub(crate) struct Resources {
    pub(crate) conns: Option<(MuxerState, Vec<OwnedFd>)>,
    pub(crate) listener: Option<HostListener>,
}

/// Where the service's resources are.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ResourcesAt {
    Active,
    InTransit,
    Backup,
}

/// Holds the backup's first disk flush until the commit record is durable.
#[derive(Default)]
pub(crate) struct CommitGate {
    state: Mutex<Option<Result<(), String>>>,
    cv: Condvar,
}

impl CommitGate {
    pub(crate) fn open(&self, r: Result<(), String>) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        self.cv.notify_all();
    }

    /// Waits (at most `limit`) for the commit; its result.
    pub(crate) fn wait(&self, limit: Duration) -> Result<(), String> {
        let g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, limit, |s| s.is_none())
            .unwrap_or_else(|p| p.into_inner());
        g.clone()
            .unwrap_or_else(|| Err(format!("the upgrade did not commit within {limit:?}")))
    }
}

/// Watches a VM's vCPUs for a stop while the orchestrator may be blocked on its guest agent,
/// and then ends the agent call at once (a guest that is gone never answers: without this
/// the call would wait out its timeout, with the active VM's workload frozen meanwhile).
/// Dropping it ends the watch.
pub(crate) struct AgentWatch {
    quit: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AgentWatch {
    /// How often the watch looks at its quit flag.
    const POLL: Duration = Duration::from_millis(10);

    /// Watches `notice` (a VM's) and calls `interrupt` if it is raised; `None` when the watch
    /// thread cannot start (the agent calls then only have their timeouts).
    pub(crate) fn start(
        notice: Arc<vmm::vcpu::StopNotice>,
        interrupt: crate::agent::Interrupter,
    ) -> Option<Self> {
        use std::sync::atomic::Ordering;
        let quit = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let q = Arc::clone(&quit);
        let thread = std::thread::Builder::new()
            .name("agent-watch".into())
            .spawn(move || {
                while !q.load(Ordering::SeqCst) {
                    if let Some(why) = notice.wait(Self::POLL) {
                        tracing::warn!("{why}: ending the call to its guest agent");
                        interrupt();
                        return;
                    }
                }
            });
        match thread {
            Ok(t) => Some(Self {
                quit,
                thread: Some(t),
            }),
            Err(e) => {
                tracing::warn!("cannot start the agent watch: {e}");
                None
            }
        }
    }
}

impl Drop for AgentWatch {
    fn drop(&mut self) {
        self.quit.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!("the agent watch thread panicked");
        }
    }
}

pub(crate) struct Session<'a> {
    pub(crate) plan: &'a UpgradePlan,
    pub(crate) opts: &'a UpgradeOptions,
    pub(crate) work: PathBuf,
    pub(crate) journal: Journal,
    pub(crate) report: UpgradeReport,
    pub(crate) disks: Vec<DiskSet>,
    pub(crate) backup: Option<Machine>,
    pub(crate) active_agent: Option<Box<dyn GuestAgent>>,
    pub(crate) backup_agent: Option<Box<dyn GuestAgent>>,
    /// Ends a call blocked on the backup's agent when a backup vCPU stops.
    pub(crate) backup_watch: Option<AgentWatch>,
    /// The active VM's workload is frozen (or checkpointed).
    pub(crate) frozen: bool,
    pub(crate) resources: Resources,
    pub(crate) resources_at: ResourcesAt,
    /// The active VM was paused for the network takeover (the rollback resumes it).
    pub(crate) active_paused: bool,
    /// The backup holds the active VM's TAPs (the rollback gives them back).
    pub(crate) net_moved: bool,
    pub(crate) image: Option<WorkloadImage>,
    pub(crate) cutover_start: Option<Instant>,
    pub(crate) gate: Arc<CommitGate>,
    /// Flushes of the merged layers started after the last catch-up, off the cutover path.
    pub(crate) flushing: Vec<std::thread::JoinHandle<Result<u64, block::BlockError>>>,
    pub(crate) phase: Phase,
    pub(crate) phase_start: Instant,
    pub(crate) start: Instant,
}

impl Session<'_> {
    /// Waits for the background flushes of the merged layers; the first error.
    pub(crate) fn join_flushes(&mut self) -> Result<(), StepError> {
        let mut r = Ok(());
        for h in self.flushing.drain(..) {
            let one = h
                .join()
                .map_err(|_| StepError::Internal("a flush thread panicked".into()))
                .and_then(|f| f.map(|_| ()).map_err(StepError::Block));
            if r.is_ok() {
                r = one;
            }
        }
        r
    }

    /// Records the transition to `phase` (durably, before acting on it) and closes the
    /// previous phase's timing.
    pub(crate) fn enter(&mut self, phase: Phase) -> Result<(), StepError> {
        self.close_phase();
        self.journal
            .append(&Record::Phase { phase })
            .map_err(StepError::Journal)?;
        self.phase = phase;
        self.phase_start = Instant::now();
        tracing::info!(phase = phase.name(), "upgrade phase");
        self.event(Event::Phase(phase));
        self.fault(phase)
    }

    pub(crate) fn close_phase(&mut self) {
        if let Some(last) = self.report.phases.last_mut()
            && last.phase == self.phase
        {
            last.duration = self.phase_start.elapsed();
            return;
        }
        self.report.phases.push(PhaseTiming {
            phase: self.phase,
            duration: self.phase_start.elapsed(),
            pages: 0,
            bytes: 0,
            conflicts: 0,
        });
    }

    /// The current phase's timing entry (created on first use).
    pub(crate) fn timing(&mut self) -> &mut PhaseTiming {
        if self
            .report
            .phases
            .last()
            .is_none_or(|p| p.phase != self.phase)
        {
            self.report.phases.push(PhaseTiming {
                phase: self.phase,
                duration: Duration::ZERO,
                pages: 0,
                bytes: 0,
                conflicts: 0,
            });
        }
        let last = self.report.phases.len() - 1;
        &mut self.report.phases[last]
    }

    pub(crate) fn event(&self, e: Event) {
        if let Some(f) = &self.opts.on_event {
            f(&e);
        }
    }

    /// A failure injected at the start of `phase` (for tests and drills), or a cancellation
    /// (honoured up to the resume, the last phase before the commit point).
    pub(crate) fn fault(&self, phase: Phase) -> Result<(), StepError> {
        if self.opts.fail_at == Some(phase) {
            return Err(StepError::Injected(phase));
        }
        if phase <= Phase::Resume {
            if self.cancelled() {
                return Err(StepError::Cancelled);
            }
            // A guest whose vCPU stopped (a failed vCPU, an unexpected power-off) would go on
            // half-dead, unnoticed: before the commit point, that ends the upgrade.
            if let Some(why) = self.backup.as_ref().and_then(Machine::stopped_vcpu) {
                return Err(StepError::VcpuStopped { vm: "backup", why });
            }
        }
        Ok(())
    }

    /// Whether the upgrade was asked to stop.
    pub(crate) fn cancelled(&self) -> bool {
        self.opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst))
    }

    pub(crate) fn backup(&mut self) -> Result<&mut Machine, StepError> {
        self.backup
            .as_mut()
            .ok_or_else(|| StepError::Internal("no backup VM".into()))
    }

    pub(crate) fn active_agent(&mut self) -> Result<&mut Box<dyn GuestAgent>, StepError> {
        self.active_agent
            .as_mut()
            .ok_or_else(|| StepError::Internal("no active agent".into()))
    }

    /// Takes `agent` as the backup's agent, watched: a backup vCPU that stops ends a call
    /// blocked on it.
    pub(crate) fn set_backup_agent(&mut self, agent: Box<dyn GuestAgent>) {
        self.backup_watch = None;
        self.backup_watch = match (self.backup.as_ref(), agent.interrupter()) {
            (Some(b), Some(interrupt)) => AgentWatch::start(b.stop_notice(), interrupt),
            _ => None,
        };
        self.backup_agent = Some(agent);
    }

    /// Drops the backup's agent connection and its watch.
    pub(crate) fn drop_backup_agent(&mut self) {
        self.backup_watch = None;
        self.backup_agent = None;
    }

    pub(crate) fn backup_agent(&mut self) -> Result<&mut Box<dyn GuestAgent>, StepError> {
        self.backup_agent
            .as_mut()
            .ok_or_else(|| StepError::Internal("no backup agent".into()))
    }
}
