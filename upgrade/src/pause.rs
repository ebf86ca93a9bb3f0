//! Step 4: pause the backup and give it the merged disk layers (the upgrade's writes plus the
//! active VM's, caught up to the freeze). The swap happens with its vCPUs stopped and its block
//! workers held off their queues. The backup runs again right after the swap: restoring the
//! workload needs its guest kernel, and the restore may flush (a Linux guest's does), so its
//! flushes go through until the backup is about to serve; from then on ([`gate_flushes`], at
//! step 7) its flushes wait for the commit record, so nothing it acknowledges to a client
//! precedes the commit point.

use std::sync::Arc;
use std::time::Duration;

use crate::StepError;
use crate::phase::Phase;
use crate::session::Session;

/// Longest time the backup's first disk flush waits for the commit record.
const GATE_LIMIT: Duration = Duration::from_secs(60);

/// The merged layers, one per disk.
fn merged(s: &Session<'_>) -> Result<Vec<Arc<block::Layer>>, StepError> {
    s.disks
        .iter()
        .map(|d| {
            d.merged
                .clone()
                .ok_or_else(|| StepError::Internal("no merged layer".into()))
        })
        .collect()
}

/// From now on the backup's flushes on its merged layers wait for the commit record (called
/// with the backup paused, just before it resumes to serve).
pub(crate) fn gate_flushes(s: &Session<'_>) -> Result<(), StepError> {
    for m in merged(s)? {
        if let Some(d) = m.as_delta() {
            let gate = Arc::clone(&s.gate);
            let path = d.path().to_owned();
            d.set_flush_hook(Arc::new(move || {
                gate.wait(GATE_LIMIT).map_err(|msg| block::BlockError::Io {
                    op: "commit the upgrade before flushing",
                    path: path.clone(),
                    source: std::io::Error::other(msg),
                })
            }));
        }
    }
    Ok(())
}

pub(crate) fn run(s: &mut Session<'_>) -> Result<(), StepError> {
    s.enter(Phase::PauseBackup)?;
    let merged = merged(s)?;
    let backup = s.backup()?;
    backup.pause()?;
    let mut swapped = Ok(());
    for (i, m) in merged.into_iter().enumerate() {
        if let Err(e) = backup.replace_disk(i, m) {
            swapped = Err(e);
            break;
        }
    }
    let resumed = backup.resume();
    swapped?;
    resumed?;
    Ok(())
}
