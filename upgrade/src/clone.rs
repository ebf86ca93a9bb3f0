//! Step 1: clone the active VM into the backup, in-process (RAM pre-copied while it runs, a
//! sub-millisecond pause, each disk forked: the active VM's delta becomes the frozen common
//! parent, each VM writes its own child). Then start the backup and reach its agent.

use std::time::{Duration, Instant};

use vmm::Machine;
use vmm::config::{ConsoleTarget, NetConfig, VsockConfig};
use vmm::machine::CloneOptions;

use crate::StepError;
use crate::agent::{AgentEndpoint, GuestAgent, Role};
use crate::phase::Phase;
use crate::session::Session;

pub(crate) fn run(s: &mut Session<'_>, active: &mut Machine) -> Result<(), StepError> {
    s.enter(Phase::Clone)?;
    let mut cfg = active.config().clone();
    let vsock = cfg
        .vsock
        .clone()
        .ok_or_else(|| StepError::Internal("no vsock device".into()))?;
    cfg.vsock = Some(VsockConfig {
        guest_cid: s.plan.backup.guest_cid.unwrap_or(vsock.guest_cid + 1),
        uds_path: s
            .plan
            .backup
            .uds_path
            .clone()
            .unwrap_or_else(|| s.work.join("backup.vsock")),
    });
    cfg.console = s
        .plan
        .backup
        .console
        .clone()
        .unwrap_or_else(|| ConsoleTarget::File(s.work.join("backup.console")));
    // The backup is cut off from the active VM's networks: each NIC gets a TAP of its own,
    // attached to nothing (and keeps the guest's MAC); it takes over the active VM's TAPs at
    // the cutover.
    cfg.net = cfg
        .net
        .iter()
        .map(|n| NetConfig {
            iface_id: n.iface_id.clone(),
            host_dev_name: String::new(),
            guest_mac: None,
        })
        .collect();
    let mut opts = CloneOptions::new(cfg);
    opts.disk_dirs = s
        .disks
        .iter()
        .map(|d| (d.active_dir.clone(), d.backup_dir.clone()))
        .collect();
    let (mut backup, tl) = active.clone_running(opts)?;
    s.report.clone_pause = tl.pause;
    s.report.clone_rounds = tl.rounds.iter().map(|r| r.pages).collect();
    let pages = tl.rounds.iter().map(|r| r.pages).sum::<u64>() + tl.final_pages;
    s.timing().pages = pages;
    for (d, (a, b)) in s
        .disks
        .iter_mut()
        .zip(active.disks().iter().zip(backup.disks()))
    {
        d.active = Some(a.layer.clone());
        d.backup = Some(b.layer.clone());
    }
    let started = backup.start();
    s.backup = Some(backup);
    started?;
    let uds = s
        .backup
        .as_ref()
        .and_then(Machine::vsock_uds_path)
        .ok_or_else(|| StepError::Internal("backup without vsock".into()))?;
    let agent = connect(s, Role::Backup, uds)?;
    s.set_backup_agent(agent);
    // The backup's copy of the workload must not run beside the one restored there later.
    s.backup_agent()?.discard()?;
    Ok(())
}

/// Connects to a guest agent, retrying until it answers or the agent timeout passes (a
/// freshly cloned guest first has to see its vsock transport reset).
pub(crate) fn connect(
    s: &Session<'_>,
    role: Role,
    uds: std::path::PathBuf,
) -> Result<Box<dyn GuestAgent>, StepError> {
    let timeout = s.plan.agent_timeout();
    let end = Instant::now() + timeout;
    let ep = AgentEndpoint {
        role,
        uds,
        port: s.plan.workload.agent_port,
        timeout: timeout.min(Duration::from_secs(2)),
    };
    loop {
        let r = s.opts.connector.connect(&ep);
        match r {
            Ok(a) => return Ok(a),
            Err(e) if Instant::now() >= end => return Err(e.into()),
            // A backup whose vCPU stopped (a restarted kernel that crashed) never answers.
            Err(e)
                if role == Role::Backup
                    && let Some(why) = s.backup.as_ref().and_then(Machine::stopped_vcpu) =>
            {
                return Err(StepError::VcpuStopped {
                    vm: "backup",
                    why: format!("{why} (while connecting to its agent: {e})"),
                });
            }
            Err(e) => {
                tracing::debug!(?role, "agent not ready yet: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
