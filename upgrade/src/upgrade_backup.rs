//! Step 2: upgrade the backup's guest OS while the active VM serves: run the plan's commands
//! through the backup's agent, then (if the plan says so) restart the backup into its new
//! kernel on its upgraded disk.

use std::time::Duration;

use vmm::Machine;
use vmm::config::DiskConfig;

use crate::StepError;
use crate::agent::{AgentError, Role};
use crate::phase::Phase;
use crate::session::Session;

pub(crate) fn run(s: &mut Session<'_>) -> Result<(), StepError> {
    s.enter(Phase::UpgradeBackup)?;
    let plan = s.plan;
    run_commands(s, &plan.prepare_commands)?;
    run_commands(s, &plan.commands)?;
    if let Some(r) = &plan.restart {
        restart(s, r)?;
    }
    Ok(())
}

/// Runs `commands` in the backup in order; a non-zero exit or a timeout is an error.
pub(crate) fn run_commands(
    s: &mut Session<'_>,
    commands: &[crate::plan::Command],
) -> Result<(), StepError> {
    for c in commands {
        let timeout = Duration::from_millis(c.timeout_ms);
        tracing::info!(argv = ?c.argv, "running in the backup");
        let code = match s.backup_agent()?.exec(&c.argv, timeout) {
            Ok(code) => code,
            Err(AgentError::Timeout(_)) => {
                return Err(StepError::CommandTimeout {
                    argv: c.argv.clone(),
                    timeout,
                });
            }
            Err(e) => return Err(e.into()),
        };
        if code != 0 {
            return Err(StepError::CommandFailed {
                argv: c.argv.clone(),
                code,
            });
        }
    }
    Ok(())
}

/// Stops the backup and boots a new one from the restart kernel on the backup's disks.
fn restart(s: &mut Session<'_>, r: &crate::plan::Restart) -> Result<(), StepError> {
    let mut old = s
        .backup
        .take()
        .ok_or_else(|| StepError::Internal("no backup VM".into()))?;
    s.drop_backup_agent();
    let mut cfg = old.config().clone();
    // The new kernel reads its NICs' MACs at probe: give it the ones the guest had (the
    // active VM's), so the backup answers with them when it takes over the TAPs.
    for (n, live) in cfg.net.iter_mut().zip(old.nets()) {
        n.guest_mac = Some(live.handle.mac());
    }
    old.stop()?;
    drop(old);
    // The old VM held the backup children open; the new one opens them by path.
    for d in &mut s.disks {
        d.backup = None;
    }
    cfg.kernel = r.kernel.clone();
    cfg.initrd = r.initrd.clone();
    cfg.cmdline = r.cmdline.clone();
    cfg.disks = s
        .disks
        .iter()
        .map(|d| DiskConfig {
            path: d.backup_dir.clone(),
            read_only: false,
        })
        .collect();
    let mut m = Machine::new(cfg, None)?;
    m.boot()?;
    for (d, a) in s.disks.iter_mut().zip(m.disks()) {
        d.backup = Some(a.layer.clone());
    }
    m.start()?;
    let uds = m
        .config()
        .vsock
        .as_ref()
        .map(|v| v.uds_path.clone())
        .ok_or_else(|| StepError::Internal("backup without vsock".into()))?;
    s.backup = Some(m);
    let agent = crate::clone::connect(s, Role::Backup, uds)?;
    s.set_backup_agent(agent);
    Ok(())
}
