//! Step 3: merge three ways (the frozen parent, the active VM's delta, the upgrade's delta)
//! while the active VM serves: a dry run first (conflicts the policy does not resolve stop the
//! upgrade before anything is written), then the merge into a new delta, then catch-up rounds
//! (the active VM's writes since the last round) until a round is small. The last catch-up
//! runs in the cutover, unflushed ([`final_catch_up`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::merge::{self, MergeError, MergeOptions, MergeReport, ProgressFn};
use block::{Delta, Layer};

use crate::phase::Phase;
use crate::report::MergeRound;
use crate::session::Session;
use crate::{Event, StepError};

fn delta(l: &Option<Arc<Layer>>) -> Result<&Delta, StepError> {
    l.as_deref()
        .and_then(Layer::as_delta)
        .ok_or_else(|| StepError::Internal("disk layer is not a delta".into()))
}

fn conflicts(r: &MergeReport) -> u64 {
    r.conflicts.len() as u64
}

pub(crate) fn run(s: &mut Session<'_>) -> Result<(), StepError> {
    s.enter(Phase::Merge)?;
    let deadline = Instant::now() + Duration::from_millis(s.plan.limits.merge_timeout_ms);
    // Dry run of every disk before anything is written.
    for (i, d) in s.disks.iter().enumerate() {
        let r = merge::plan(delta(&d.active)?, delta(&d.backup)?, &d.policy)
            .map_err(StepError::Merge)?;
        if r.unresolved() > 0 {
            return Err(StepError::Conflicts {
                disk: i,
                count: r.unresolved(),
                report: Box::new(r),
            });
        }
    }
    for i in 0..s.disks.len() {
        let t = Instant::now();
        let on_event = s.opts.on_event.clone();
        let mut opts = MergeOptions {
            policy: s.disks[i].policy.clone(),
            ..MergeOptions::default()
        };
        if let Some(f) = on_event {
            opts.progress = Some(ProgressFn(Arc::new(move |done, total| {
                f(&Event::MergeProgress {
                    disk: i,
                    done,
                    total,
                });
            })));
        }
        let d = &s.disks[i];
        let r = merge::merge(delta(&d.active)?, delta(&d.backup)?, &d.merged_dir, &opts)
            .map_err(conflict_or(i))?;
        let out = Delta::open(&d.merged_dir).map_err(StepError::Block)?;
        let d = &mut s.disks[i];
        d.merged = Some(Arc::new(Layer::Delta(out)));
        d.since = r.active_seq;
        record(s, i, "merge", &r, t);
        // Catch-up rounds until one is small.
        for _ in 0..s.plan.limits.max_catch_up_rounds {
            if s.cancelled() {
                return Err(StepError::Cancelled);
            }
            if Instant::now() > deadline {
                return Err(StepError::Timeout {
                    what: "merge and catch-up",
                    limit: Duration::from_millis(s.plan.limits.merge_timeout_ms),
                });
            }
            let copied = catch_up(s, i, true)?;
            if copied <= s.plan.limits.converge_bytes.0 {
                break;
            }
        }
    }
    Ok(())
}

fn conflict_or(disk: usize) -> impl Fn(MergeError) -> StepError {
    move |e| match e {
        MergeError::Conflicts(report) => StepError::Conflicts {
            disk,
            count: report.unresolved(),
            report,
        },
        e => StepError::Merge(e),
    }
}

fn record(s: &mut Session<'_>, disk: usize, kind: &'static str, r: &MergeReport, t: Instant) {
    let round = MergeRound {
        disk,
        kind: kind.to_string(),
        bytes: r.bytes_to_write,
        conflicts: conflicts(r),
        duration: t.elapsed(),
    };
    tracing::info!(
        disk,
        kind,
        bytes = round.bytes,
        ms = round.duration.as_secs_f64() * 1e3,
        "merge round"
    );
    let timing = s.timing();
    timing.bytes += r.bytes_to_write;
    timing.conflicts += conflicts(r);
    s.report.merge_rounds.push(round);
}

/// One catch-up round of disk `i`: the active VM's writes since the last round into the
/// merge output, flushed or (the last one, in the cutover) not. Returns the bytes copied.
fn catch_up(s: &mut Session<'_>, i: usize, flush: bool) -> Result<u64, StepError> {
    let t = Instant::now();
    let d = &s.disks[i];
    let opts = MergeOptions {
        policy: d.policy.clone(),
        ..MergeOptions::default()
    };
    let run = if flush {
        merge::catch_up
    } else {
        merge::catch_up_unflushed
    };
    let r = run(
        delta(&d.merged)?,
        delta(&d.active)?,
        d.since,
        delta(&d.backup)?,
        &opts,
    )
    .map_err(conflict_or(i))?;
    s.disks[i].since = r.active_seq;
    let kind = if flush { "catch-up" } else { "final catch-up" };
    record(s, i, kind, &r, t);
    Ok(r.bytes_to_write)
}

/// The last catch-up, with the workload frozen: applies the active VM's remaining writes to
/// each output without a flush (no fsync in the cutover); they become durable before the
/// commit record (see [`crate::resume`]).
pub(crate) fn final_catch_up(s: &mut Session<'_>) -> Result<(), StepError> {
    for i in 0..s.disks.len() {
        catch_up(s, i, false)?;
    }
    // Make them durable off the cutover path: the commit record waits for these.
    for d in &s.disks {
        if let Some(m) = d.merged.clone() {
            let h = std::thread::Builder::new()
                .name("upgrade-flush".into())
                .spawn(move || match m.as_delta() {
                    Some(d) => d.flush_without_hook(),
                    None => Ok(0),
                })
                .map_err(|e| StepError::Internal(format!("cannot start a flush thread: {e}")))?;
            s.flushing.push(h);
        }
    }
    Ok(())
}
