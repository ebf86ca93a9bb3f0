//! Service-address handling around a handoff: the DROP guard, moving the address, cleaning CRIU's
//! leftover netfilter rules, gratuitous ARP.

use crate::protocol::ServiceAddr;
use crate::sys::{self, SysError};

/// Errors changing the guest's network configuration.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A network command failed.
    #[error("network command failed")]
    Command(#[from] SysError),
}

fn guard_rules(svc: &ServiceAddr) -> [[String; 5]; 2] {
    let ip = format!("{}/32", svc.ip);
    [
        [
            "INPUT".into(),
            "-d".into(),
            ip.clone(),
            "-j".into(),
            "DROP".into(),
        ],
        ["OUTPUT".into(), "-s".into(), ip, "-j".into(), "DROP".into()],
    ]
}

/// Inserts DROP rules for all traffic to and from the service address (idempotent).
pub fn guard_add(svc: &ServiceAddr) -> Result<(), NetError> {
    for r in guard_rules(svc) {
        let rule: Vec<&str> = r.iter().map(String::as_str).collect();
        let mut check = vec!["iptables", "-w", "-C"];
        check.extend(&rule);
        if sys::run(&check).is_err() {
            let mut add = vec!["iptables", "-w", "-I"];
            add.extend(&rule);
            sys::run(&add)?;
        }
    }
    Ok(())
}

/// Removes the guard rules (all copies; absent is fine).
pub fn guard_remove(svc: &ServiceAddr) -> Result<(), NetError> {
    for r in guard_rules(svc) {
        let rule: Vec<&str> = r.iter().map(String::as_str).collect();
        let mut del = vec!["iptables", "-w", "-D"];
        del.extend(&rule);
        for _ in 0..16 {
            if sys::run(&del).is_err() {
                break;
            }
        }
    }
    Ok(())
}

/// The current `iptables -S` rule lines (`-A ...`).
pub fn rules_snapshot() -> Result<Vec<String>, NetError> {
    Ok(sys::run(&["iptables", "-w", "-S"])?
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect())
}

/// Deletes every rule not in `keep` (CRIU's per-connection lock rules), CRIU's own chain, and
/// nftables tables CRIU left (named `CRIU-*`).
pub fn clear_rules_except(keep: &[String]) -> Result<(), NetError> {
    for line in rules_snapshot()? {
        if keep.contains(&line) {
            continue;
        }
        let mut argv = vec!["iptables", "-w", "-D"];
        argv.extend(line.split_whitespace().skip(1));
        sys::run(&argv)?;
    }
    let _ = sys::run(&["iptables", "-w", "-F", "CRIU"]);
    let _ = sys::run(&["iptables", "-w", "-X", "CRIU"]);
    if let Ok(tables) = sys::run(&["nft", "list", "tables"]) {
        for l in tables.lines() {
            let parts: Vec<&str> = l.split_whitespace().collect();
            if let ["table", family, name] = parts.as_slice()
                && name.starts_with("CRIU")
            {
                sys::run(&["nft", "delete", "table", family, name])?;
            }
        }
    }
    Ok(())
}

/// Adds the service address to its device (already present is fine).
pub fn addr_add(svc: &ServiceAddr) -> Result<(), NetError> {
    let cidr = format!("{}/{}", svc.ip, svc.prefix);
    if has_addr(svc)? {
        return Ok(());
    }
    sys::run(&["ip", "addr", "add", &cidr, "dev", &svc.dev])?;
    Ok(())
}

/// Removes the service address (absent is fine).
pub fn addr_del(svc: &ServiceAddr) -> Result<(), NetError> {
    if has_addr(svc)? {
        let cidr = format!("{}/{}", svc.ip, svc.prefix);
        sys::run(&["ip", "addr", "del", &cidr, "dev", &svc.dev])?;
    }
    Ok(())
}

/// Whether the device carries the service address.
pub fn has_addr(svc: &ServiceAddr) -> Result<bool, NetError> {
    let out = sys::run(&["ip", "-o", "-4", "addr", "show", "dev", &svc.dev])?;
    let needle = format!(" {}/", svc.ip);
    Ok(out.contains(&needle))
}

/// Sends gratuitous ARP for the service address so neighbours update their caches.
pub fn announce(svc: &ServiceAddr) -> Result<(), NetError> {
    let ip = svc.ip.to_string();
    // iputils arping exits 1 when no reply came, which is normal for unsolicited ARP: only a failure to
    // run it is an error.
    match sys::run(&["arping", "-U", "-c", "2", "-I", &svc.dev, &ip]) {
        Ok(_) | Err(SysError::Failed { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
