//! The live guest-OS upgrade of a running microvmm VM, as one call.
//!
//! [`run`] takes the active [`Machine`] and an [`UpgradePlan`] and goes through the seven
//! steps, one (private) module each, driven by an explicit state machine ([`Phase`]) whose every
//! transition is recorded in the upgrade journal ([`journal`]) before it is acted on:
//!
//! 1. `clone`: live clone of the active VM into the backup (disks forked);
//! 2. `upgrade_backup`: the plan's commands run in the backup (and an optional restart);
//! 3. `merge`: dry run, three-way merge and catch-up rounds while the active VM serves;
//!    then the cutover: the workload is frozen and checkpointed (`move_process`), the last
//!    catch-up runs;
//! 4. `pause`: the backup, paused, gets the merged layers;
//! 5. `move_process`: the workload is restored in the backup;
//! 6. `move_resources`: its connections and listener move to the backup's devices;
//! 7. `resume`: the backup resumes and serves; the commit record follows (the commit point),
//!    and the old active VM is retired.
//!
//! Any failure before the commit point rolls back (`rollback`): the active VM serves on
//! with its workload, connections and disk, and nothing of the backup is left. After a crash
//! of the process, [`journal::recover`] tells which disk chain is the VM's.
//!
//! The guests are driven through [`agent::GuestAgent`]; [`service_agent`] implements it for the
//! `service` test guest ([`service_guest`]), which the embedded demo upgrades, and
//! [`criu_agent`] for Linux guests running `guest-agent` (CRIU).

pub mod agent;
mod clone;
pub mod criu_agent;
#[cfg(feature = "demo")]
pub mod demo;
pub mod journal;
mod merge;
mod move_process;
mod move_resources;
mod pause;
pub mod phase;
pub mod plan;
pub mod report;
mod resume;
mod rollback;
pub mod service_agent;
pub mod service_guest;
mod session;
mod upgrade_backup;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::{Machine, MachineError};

pub use agent::{AgentConnector, AgentEndpoint, AgentError, GuestAgent, Role, WorkloadImage};
pub use journal::{JournalError, Recovery, recover};
pub use phase::Phase;
pub use plan::{PlanError, UpgradePlan};
pub use report::UpgradeReport;

use journal::{DiskPaths, Journal, Record};
use session::{CommitGate, DiskSet, Resources, ResourcesAt, Session};

/// Something the upgrade reports while it runs (for progress bars and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A phase starts.
    Phase(Phase),
    /// Merge progress of one disk: output bytes done of total.
    MergeProgress {
        /// Disk index.
        disk: usize,
        /// Bytes written.
        done: u64,
        /// Bytes to write.
        total: u64,
    },
}

/// Callback for [`Event`]s.
pub type EventFn = Arc<dyn Fn(&Event) + Send + Sync>;

/// How to run an upgrade besides its plan.
#[derive(Clone)]
pub struct UpgradeOptions {
    /// Connects to the guests' agents.
    pub connector: Arc<dyn AgentConnector>,
    /// Called on each [`Event`].
    pub on_event: Option<EventFn>,
    /// Fail at the start of this phase (tests and drills of the rollback path).
    pub fail_at: Option<Phase>,
    /// Set to cancel: the upgrade rolls back at its next phase boundary before the commit
    /// point (from the resume of the backup on, there is no way back and it is ignored).
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl std::fmt::Debug for UpgradeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpgradeOptions")
            .field("fail_at", &self.fail_at)
            .field("cancel", &self.cancel)
            .finish_non_exhaustive()
    }
}

impl UpgradeOptions {
    /// Options with this agent connector, no callback, no injected failure.
    pub fn new(connector: Arc<dyn AgentConnector>) -> Self {
        Self {
            connector,
            on_event: None,
            fail_at: None,
            cancel: None,
        }
    }
}

/// Why one step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A machine operation (clone, pause, resume, disk swap) failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// A guest agent failed or refused.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The merge failed.
    #[error("merge failed")]
    Merge(#[source] block::merge::MergeError),
    /// A layer operation failed.
    #[error(transparent)]
    Block(block::BlockError),
    /// Conflicts the plan's policy does not resolve (nothing was written).
    #[error("{count} unresolved conflict(s) on disk {disk}")]
    Conflicts {
        /// Disk index.
        disk: usize,
        /// Unresolved conflicts.
        count: usize,
        /// The dry run's report, with every conflict.
        report: Box<block::merge::MergeReport>,
    },
    /// A backup command exited non-zero.
    #[error("backup command {argv:?} exited with {code}")]
    CommandFailed {
        /// The command.
        argv: Vec<String>,
        /// Its exit code.
        code: i32,
    },
    /// A backup command ran past its timeout.
    #[error("backup command {argv:?} did not finish within {timeout:?}")]
    CommandTimeout {
        /// The command.
        argv: Vec<String>,
        /// Its timeout.
        timeout: Duration,
    },
    /// A phase ran past its limit.
    #[error("{what} took longer than {limit:?}")]
    Timeout {
        /// The phase.
        what: &'static str,
        /// The limit.
        limit: Duration,
    },
    /// The cutover took longer than the plan allows.
    #[error("the cutover took {elapsed:?}, over the limit of {limit:?}")]
    CutoverLimit {
        /// Time since the freeze.
        elapsed: Duration,
        /// The plan's limit.
        limit: Duration,
    },
    /// A vCPU of the backup stopped on its own (the guest powered off or reset, or the vCPU
    /// failed): the upgrade does not go on with a guest that lost a vCPU.
    #[error("a vCPU of the {vm} VM stopped: {why}")]
    VcpuStopped {
        /// `active` or `backup`.
        vm: &'static str,
        /// What the vCPU reported.
        why: String,
    },
    /// Moving the service's connections or listener failed.
    #[error("moving the service's resources failed: {0}")]
    Resources(String),
    /// The upgrade journal could not be written.
    #[error(transparent)]
    Journal(JournalError),
    /// A failure injected through [`UpgradeOptions::fail_at`].
    #[error("failure injected at phase {0}")]
    Injected(Phase),
    /// Cancelled through [`UpgradeOptions::cancel`].
    #[error("cancelled")]
    Cancelled,
    /// An internal inconsistency (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

/// The upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The plan is invalid; nothing started.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The work directory could not be set up; nothing started.
    #[error("cannot start the upgrade")]
    Start(#[source] JournalError),
    /// A phase failed. Before the commit point the upgrade rolled back (`rolled_back`): the
    /// active VM serves as before, unless `rollback_errors` lists what the rollback could not
    /// undo (or that the active VM itself lost a vCPU).
    #[error("upgrade failed in phase {phase}{}", match (*.rolled_back, .rollback_errors.is_empty()) {
        (true, true) => "; rolled back, the active VM keeps serving",
        (true, false) => "; rolled back, with errors (see rollback_errors)",
        (false, _) => "",
    })]
    Failed {
        /// The phase that failed.
        phase: Phase,
        /// Whether the upgrade was rolled back.
        rolled_back: bool,
        /// What went wrong.
        #[source]
        cause: Box<StepError>,
        /// Rollback steps that failed.
        rollback_errors: Vec<String>,
    },
}

impl UpgradeError {
    /// The phase that failed, if one did.
    pub fn phase(&self) -> Option<Phase> {
        match self {
            Self::Failed { phase, .. } => Some(*phase),
            _ => None,
        }
    }

    /// Whether the active VM was left serving as before.
    pub fn rolled_back(&self) -> bool {
        match self {
            Self::Failed { rolled_back, .. } => *rolled_back,
            _ => true,
        }
    }
}

/// The work directory of an upgrade of `machine` under `plan`.
pub fn work_dir(machine: &Machine, plan: &UpgradePlan) -> PathBuf {
    if let Some(w) = &plan.work_dir {
        return w.clone();
    }
    match machine.disks().first() {
        Some(d) => {
            let mut p = d.layer.path().as_os_str().to_owned();
            p.push(".upgrade");
            PathBuf::from(p)
        }
        None => std::env::temp_dir().join("microvmm-upgrade"),
    }
}

/// Upgrades the running machine `active` live, as `plan` says. On success `active` is the
/// upgraded VM (the former backup, serving on the merged disks) and the old one is retired;
/// on failure before the commit point everything is rolled back and `active` serves as
/// before.
pub fn run(
    active: &mut Machine,
    plan: &UpgradePlan,
    opts: &UpgradeOptions,
) -> Result<UpgradeReport, UpgradeError> {
    let start = Instant::now();
    plan.validate(active)?;
    if active.state() != vmm::machine::VmState::Running {
        return Err(PlanError::Field {
            field: "machine".into(),
            reason: format!("the machine is {:?}, not running", active.state()),
        }
        .into());
    }
    let work = work_dir(active, plan);
    let mut disks = Vec::with_capacity(plan.disks.len());
    for (i, (p, a)) in plan.disks.iter().zip(active.disks()).enumerate() {
        let policy = p
            .policy_for(a.layer.size())
            .map_err(|(f, reason)| PlanError::Field {
                field: format!("disks[{i}].{f}"),
                reason,
            })?;
        disks.push(DiskSet {
            original: a.layer.path().to_owned(),
            active_dir: work.join(format!("disk{i}-active")),
            backup_dir: work.join(format!("disk{i}-backup")),
            merged_dir: work.join(format!("disk{i}-merged")),
            policy,
            active: None,
            backup: None,
            merged: None,
            since: 0,
        });
    }
    let begin = Record::Begin {
        disks: disks
            .iter()
            .map(|d| DiskPaths {
                original: d.original.clone(),
                active: d.active_dir.clone(),
                backup: d.backup_dir.clone(),
                merged: d.merged_dir.clone(),
            })
            .collect(),
    };
    // A layer of an earlier upgrade (the merged one after a commit, the active fork child
    // after a rollback) may be the VM's disk now: never reuse its name.
    if let Some(p) = disks
        .iter()
        .flat_map(|d| [&d.active_dir, &d.merged_dir])
        .find(|p| p.exists())
    {
        return Err(PlanError::Field {
            field: "work_dir".into(),
            reason: format!(
                "{} already holds {} (from an earlier upgrade): give this upgrade its own work \
                 directory (or leave work_dir out: the default is beside the VM's current disk)",
                work.display(),
                p.display()
            ),
        }
        .into());
    }
    let journal = Journal::create(&work, &begin).map_err(UpgradeError::Start)?;
    let now = Instant::now();
    let mut s = Session {
        plan,
        opts,
        work,
        journal,
        report: UpgradeReport::default(),
        disks,
        backup: None,
        active_agent: None,
        backup_agent: None,
        backup_watch: None,
        frozen: false,
        resources: Resources::default(),
        resources_at: ResourcesAt::Active,
        active_paused: false,
        net_moved: false,
        image: None,
        cutover_start: None,
        gate: Arc::new(CommitGate::default()),
        flushing: Vec::new(),
        phase: Phase::Prepare,
        phase_start: now,
        start,
    };
    match before_commit(&mut s, active) {
        Ok(()) => {}
        Err(cause) => {
            let phase = s.phase;
            // A step that failed because the backup's guest is gone (its agent call ended by
            // the watch, or timed out) failed because of that.
            // The same for the active VM (whose guest the upgrade cannot bring back).
            let active_lost = active.stopped_vcpu();
            let cause = match (
                &active_lost,
                s.backup.as_ref().and_then(Machine::stopped_vcpu),
            ) {
                _ if matches!(cause, StepError::VcpuStopped { .. }) => cause,
                (Some(why), _) => StepError::VcpuStopped {
                    vm: "active",
                    why: format!("{why} (the step then failed: {cause})"),
                },
                (None, Some(why)) => StepError::VcpuStopped {
                    vm: "backup",
                    why: format!("{why} (the step then failed: {cause})"),
                },
                (None, None) => cause,
            };
            tracing::error!(
                phase = phase.name(),
                "upgrade failed: {cause}; rolling back"
            );
            let mut rollback_errors = rollback::run(&mut s, active);
            if let Some(why) = active_lost {
                rollback_errors.push(format!("the active VM does not serve: {why}"));
            }
            return Err(UpgradeError::Failed {
                phase,
                rolled_back: true,
                cause: Box::new(cause),
                rollback_errors,
            });
        }
    }
    // The backup serves: from here on there is no way back.
    let after = resume::commit(&mut s).and_then(|()| resume::retire(&mut s, active));
    if let Err(cause) = after {
        return Err(UpgradeError::Failed {
            phase: s.phase,
            rolled_back: false,
            cause: Box::new(cause),
            rollback_errors: Vec::new(),
        });
    }
    s.close_phase();
    s.report.total = s.start.elapsed();
    Ok(s.report)
}

fn before_commit(s: &mut Session<'_>, active: &mut Machine) -> Result<(), StepError> {
    s.fault(Phase::Prepare)?;
    let uds = active
        .vsock_uds_path()
        .ok_or_else(|| StepError::Internal("no vsock".into()))?;
    s.active_agent = Some(clone::connect(s, Role::Active, uds)?);
    clone::run(s, active)?;
    upgrade_backup::run(s)?;
    merge::run(s)?;
    move_process::freeze(s, active)?;
    move_process::checkpoint(s)?;
    pause::run(s)?;
    move_process::restore(s)?;
    move_resources::run(s, active)?;
    resume::run(s)
}
