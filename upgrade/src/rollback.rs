//! Rollback before the commit point: whatever the failed phase left, the active VM ends up
//! serving with its workload, its connections and its disk (its fork child over the frozen
//! parent, with every write it made), and nothing of the backup is left (VM stopped, its
//! layers and the merge output removed).

use vmm::Machine;

use crate::journal::Record;
use crate::session::{ResourcesAt, Session};

/// Rolls back; the errors met on the way (each step is still tried).
pub(crate) fn run(s: &mut Session<'_>, active: &mut Machine) -> Vec<String> {
    let mut errors = Vec::new();
    let mut note = |what: &str, e: &dyn std::fmt::Display| {
        tracing::error!("rollback: {what}: {e}");
        errors.push(format!("{what}: {e}"));
    };
    // The service's resources go back to the active VM.
    if s.resources_at == ResourcesAt::Backup
        && let Some(b) = s.backup.as_mut()
    {
        if let Err(e) = b.pause() {
            note("pausing the backup", &e);
        }
        match crate::move_resources::take(b, &s.plan.workload.vsock_ports) {
            Ok(r) => {
                s.resources = r;
                s.resources_at = ResourcesAt::InTransit;
            }
            Err(e) => note("taking the resources off the backup", &e),
        }
    }
    if s.resources_at == ResourcesAt::InTransit {
        let mut res = std::mem::take(&mut s.resources);
        match crate::move_resources::give(active, &mut res) {
            Ok(()) => s.resources_at = ResourcesAt::Active,
            Err(e) => note("giving the resources back to the active VM", &e),
        }
    }
    // The network goes back to the active VM, which resumes.
    if s.net_moved
        && let Some(b) = s.backup.as_mut()
    {
        if let Err(e) = b.pause() {
            note("pausing the backup", &e);
        }
        match active.take_over_net(b) {
            Ok(_) => s.net_moved = false,
            Err(e) => note("giving the TAPs back to the active VM", &e),
        }
    }
    if s.active_paused {
        match active.resume() {
            Ok(()) => s.active_paused = false,
            Err(e) => note("resuming the active VM", &e),
        }
    }
    // The backup goes away first, so the restored copy can never serve.
    s.drop_backup_agent();
    if let Some(mut b) = s.backup.take()
        && let Err(e) = b.stop()
    {
        note("stopping the backup", &e);
    }
    if s.frozen
        && let Some(a) = s.active_agent.as_mut()
    {
        match a.rollback() {
            Ok(()) => s.frozen = false,
            Err(e) => note("thawing the workload", &e),
        }
    }
    if let Err(e) = s.join_flushes() {
        note("flushing the merged layers", &e);
    }
    for d in &mut s.disks {
        d.backup = None;
        d.merged = None;
        let mut staging = d.merged_dir.as_os_str().to_owned();
        staging.push(".merging");
        for p in [d.backup_dir.clone(), d.merged_dir.clone(), staging.into()] {
            if let Err(e) = crate::journal::remove_path(&p) {
                note(&format!("removing {}", p.display()), &e);
            }
        }
    }
    let phase = s.phase;
    if let Err(e) = s.journal.append(&Record::RolledBack { phase }) {
        note("journal", &e);
    }
    if let Err(e) = s.journal.append(&Record::Done) {
        note("journal", &e);
    }
    errors
}
