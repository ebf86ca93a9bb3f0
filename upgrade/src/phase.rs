//! The phases of one upgrade, in order. Each transition is recorded in the upgrade journal
//! before it is acted on.

use serde::{Deserialize, Serialize};

/// A phase of the upgrade state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Checking the plan and the machine, writing the journal's first record.
    Prepare,
    /// Step 1: the live clone of the active VM (disks forked).
    Clone,
    /// Step 2: the backup runs the plan's commands (and restarts, if asked).
    UpgradeBackup,
    /// Step 3: dry run, three-way merge and catch-up rounds while the active VM serves.
    Merge,
    /// Cutover begins: the workload stops in the active VM and its VMM resources (service
    /// connections, host listener) are taken off the active VM's devices.
    Freeze,
    /// The workload is checkpointed in the active VM; the last catch-up (not yet durable).
    Checkpoint,
    /// Step 4: the backup is paused and given the merged disk layers.
    PauseBackup,
    /// Step 5: the application process is restored in the backup.
    MoveProcess,
    /// Step 6: its resources (connections, listener) are given to the backup's devices.
    MoveResources,
    /// Step 7: the backup resumes and serves; the commit record follows.
    Resume,
    /// Past the commit point: the old active VM is retired.
    Commit,
    /// Finished.
    Done,
}

impl Phase {
    /// Every phase, in the order an upgrade goes through them.
    pub const ALL: [Phase; 12] = [
        Phase::Prepare,
        Phase::Clone,
        Phase::UpgradeBackup,
        Phase::Merge,
        Phase::Freeze,
        Phase::Checkpoint,
        Phase::PauseBackup,
        Phase::MoveProcess,
        Phase::MoveResources,
        Phase::Resume,
        Phase::Commit,
        Phase::Done,
    ];

    /// The phase's name as the timeline prints it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Prepare => "prepare",
            Phase::Clone => "clone",
            Phase::UpgradeBackup => "upgrade backup",
            Phase::Merge => "merge",
            Phase::Freeze => "freeze",
            Phase::Checkpoint => "checkpoint",
            Phase::PauseBackup => "pause backup",
            Phase::MoveProcess => "move process",
            Phase::MoveResources => "move resources",
            Phase::Resume => "resume",
            Phase::Commit => "commit",
            Phase::Done => "done",
        }
    }

    /// Whether the phase is part of the cutover (the client gap).
    pub fn in_cutover(self) -> bool {
        (Phase::Freeze..=Phase::Resume).contains(&self)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
