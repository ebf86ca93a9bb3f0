//! Step 5: move the application process. In the active VM it is frozen (the client gap starts;
//! its incoming bytes are kept) and checkpointed through its agent; the backup's agent
//! restores it from the image.

use std::time::Instant;

use vmm::Machine;

use crate::StepError;
use crate::phase::Phase;
use crate::session::Session;

/// Freezes the workload in the active VM and takes its resources off the active VM's devices
/// (so no more client bytes reach the frozen copy).
pub(crate) fn freeze(s: &mut Session<'_>, active: &Machine) -> Result<(), StepError> {
    s.enter(Phase::Freeze)?;
    s.cutover_start = Some(Instant::now());
    s.active_agent()?.freeze()?;
    s.frozen = true;
    crate::move_resources::detach(s, active)
}

/// Checkpoints the frozen workload, then runs the last catch-up.
pub(crate) fn checkpoint(s: &mut Session<'_>) -> Result<(), StepError> {
    s.enter(Phase::Checkpoint)?;
    let image = s.active_agent()?.checkpoint()?;
    s.report.image_bytes = image.bytes.len() as u64;
    s.timing().bytes = image.bytes.len() as u64;
    s.image = Some(image);
    crate::merge::final_catch_up(s)
}

/// Runs the plan's cutover commands in the backup (it has the merged disks), then restores the
/// workload there.
pub(crate) fn restore(s: &mut Session<'_>) -> Result<(), StepError> {
    s.enter(Phase::MoveProcess)?;
    let plan = s.plan;
    crate::upgrade_backup::run_commands(s, &plan.cutover_commands)?;
    let image = s
        .image
        .take()
        .ok_or_else(|| StepError::Internal("no workload image".into()))?;
    let r = s.backup_agent()?.restore(&image);
    s.image = Some(image);
    r?;
    Ok(())
}
