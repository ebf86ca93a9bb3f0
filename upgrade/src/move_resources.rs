//! Step 6: move the resources the process holds on the VMM side: the service's vsock
//! connections (their states and host sockets, nothing reset) and the host listener, so a
//! client's connection continues on the backup and new clients reach it at the same socket
//! path; and the active VM's
//! network: its TAPs (the open fds) and MAC addresses go to the backup's NICs, so the backup
//! answers on the active VM's links. (Open files and the TCP connections' state travel in the
//! workload image.)

use vmm::Machine;

use crate::StepError;
use crate::phase::Phase;
use crate::session::{Resources, ResourcesAt, Session};

/// Takes the host listener (with the host connections still sending their `CONNECT` line)
/// and the service's connections off `vm`'s vsock device.
pub(crate) fn take(vm: &Machine, ports: &[u32]) -> Result<Resources, StepError> {
    let h = vm
        .vsock()
        .ok_or_else(|| StepError::Resources("the VM has no active vsock device".into()))?;
    // The listener first: an export closes the host connections not yet past `CONNECT`.
    let listener = h.take_listener();
    let conns = if ports.is_empty() {
        None
    } else {
        h.export_ports(ports)
    };
    Ok(Resources { conns, listener })
}

/// Gives resources to `vm`'s vsock device; on failure they stay in `res` (what was given stays
/// given).
pub(crate) fn give(vm: &Machine, res: &mut Resources) -> Result<(), StepError> {
    let h = vm
        .vsock()
        .ok_or_else(|| StepError::Resources("the VM has no active vsock device".into()))?;
    if let Some((state, fds)) = res.conns.take() {
        h.import(state, fds)
            .map_err(|e| StepError::Resources(format!("cannot import connections: {e}")))?;
    }
    if let Some(l) = res.listener.take()
        && let Err(l) = h.adopt_listener(l)
    {
        res.listener = Some(l);
        return Err(StepError::Resources(
            "the vsock device is not active".into(),
        ));
    }
    Ok(())
}

/// At the freeze: the resources leave the active VM. The host listener moves even when the
/// service has no vsock connections: the VM keeps its vsock socket path across the upgrade
/// (new host connections wait in its backlog until the backup answers them, or the active VM
/// again after a rollback).
pub(crate) fn detach(s: &mut Session<'_>, active: &Machine) -> Result<(), StepError> {
    if s.plan.workload.vsock_ports.is_empty() && active.vsock().is_none() {
        return Ok(());
    }
    s.resources = take(active, &s.plan.workload.vsock_ports)?;
    s.resources_at = ResourcesAt::InTransit;
    Ok(())
}

/// Step 6 proper: with the backup paused, its devices take the resources; with the active VM
/// paused too (its workload has left it), the backup takes over its TAPs; the cutover limit is
/// checked last (exceeded: roll back, before the commit point).
pub(crate) fn run(s: &mut Session<'_>, active: &mut Machine) -> Result<(), StepError> {
    s.enter(Phase::MoveResources)?;
    s.backup()?.pause()?;
    if !active.nets().is_empty() {
        active.pause()?;
        s.active_paused = true;
        let backup = s
            .backup
            .as_mut()
            .ok_or_else(|| StepError::Internal("no backup VM".into()))?;
        // The backup's own TAPs (attached to nothing) are closed with the returned handles.
        backup.take_over_net(active)?;
        s.net_moved = true;
    }
    if s.resources_at == ResourcesAt::InTransit {
        let mut res = std::mem::take(&mut s.resources);
        let r = match s.backup.as_ref() {
            Some(b) => give(b, &mut res),
            None => Err(StepError::Internal("no backup VM".into())),
        };
        s.resources = res;
        r?;
        s.resources_at = ResourcesAt::Backup;
    }
    if let Some(start) = s.cutover_start {
        let elapsed = start.elapsed();
        let limit = std::time::Duration::from_millis(s.plan.limits.max_cutover_ms);
        if elapsed > limit {
            return Err(StepError::CutoverLimit { elapsed, limit });
        }
    }
    Ok(())
}
