//! Step 4: pause the backup and give it the merged disk layers (the upgrade's writes plus the
//! active VM's, caught up to the freeze). The swap happens with its vCPUs stopped and its block
//! workers held off their queues; the backup's first flush on a merged layer waits for the
//! commit record ([`crate::resume`]), so nothing it acknowledges precedes the commit point.
//! The backup runs again right after the swap: restoring the workload needs its guest kernel.

use std::sync::Arc;
use std::time::Duration;

use crate::StepError;
use crate::phase::Phase;
use crate::session::Session;

/// Longest time the backup's first disk flush waits for the commit record.
const GATE_LIMIT: Duration = Duration::from_secs(60);

pub(crate) fn run(s: &mut Session<'_>) -> Result<(), StepError> {
    s.enter(Phase::PauseBackup)?;
    let merged: Vec<_> = s
        .disks
        .iter()
        .map(|d| {
            d.merged
                .clone()
                .ok_or_else(|| StepError::Internal("no merged layer".into()))
        })
        .collect::<Result<_, _>>()?;
    for m in &merged {
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
