//! Step 7: resume the backup, which serves from now on; then the commit point: the merged
//! layers are made durable (the last catch-up was written unflushed in the cutover) and the
//! commit record follows, after the resume, so no fsync sits in the client gap. The backup's
//! first disk flush waits for the commit record, so nothing it acknowledges can be lost to a
//! crash that recovery would resolve to the old chain. After the commit the old active VM is
//! retired: its workload released, the VM stopped, its and the upgrade's fork children removed.

use std::time::Instant;

use vmm::Machine;

use crate::StepError;
use crate::journal::Record;
use crate::phase::Phase;
use crate::session::Session;

/// Resumes the backup: the cutover ends.
pub(crate) fn run(s: &mut Session<'_>) -> Result<(), StepError> {
    s.enter(Phase::Resume)?;
    // The backup (paused since step 6) is about to serve: its flushes wait for the commit.
    crate::pause::gate_flushes(s)?;
    s.backup()?.resume()?;
    if let Some(start) = s.cutover_start {
        s.report.cutover = start.elapsed();
    }
    Ok(())
}

/// Makes the merged layers durable and writes the commit record; opens the backup's flushes.
pub(crate) fn commit(s: &mut Session<'_>) -> Result<(), StepError> {
    s.enter(Phase::Commit)?;
    let t = Instant::now();
    let r = (|| {
        s.join_flushes()?;
        for d in &s.disks {
            if let Some(m) = d.merged.as_ref().and_then(|l| l.as_delta()) {
                m.flush_without_hook().map_err(StepError::Block)?;
            }
        }
        s.journal
            .append(&Record::Commit)
            .map_err(StepError::Journal)
    })();
    s.gate
        .open(r.as_ref().map(|_| ()).map_err(|e| e.to_string()));
    s.report.commit = t.elapsed();
    r
}

/// After the commit: `active` becomes the upgraded VM (the backup), the old one is retired.
pub(crate) fn retire(s: &mut Session<'_>, active: &mut Machine) -> Result<(), StepError> {
    let mut backup = s
        .backup
        .take()
        .ok_or_else(|| StepError::Internal("no backup VM".into()))?;
    std::mem::swap(active, &mut backup);
    let mut old = backup;
    // A paused old VM (its NICs went to the backup) cannot answer; it is stopped below, and
    // its moved workload with it.
    if let Some(mut agent) = s.active_agent.take()
        && !s.active_paused
        && let Err(e) = agent.release()
    {
        tracing::warn!("the old VM's agent did not release its workload: {e}");
    }
    if let Err(e) = old.stop() {
        tracing::warn!("stopping the old active VM: {e}");
    }
    drop(old);
    s.report.disks = s.disks.iter().map(|d| d.merged_dir.clone()).collect();
    for d in &mut s.disks {
        d.active = None;
        d.backup = None;
        for p in [&d.active_dir, &d.backup_dir] {
            if p.exists()
                && let Err(e) = std::fs::remove_dir_all(p)
            {
                tracing::warn!("cannot remove {}: {e}", p.display());
            }
        }
    }
    s.enter(Phase::Done)?;
    s.journal.append(&Record::Done).map_err(StepError::Journal)
}
