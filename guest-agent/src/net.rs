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
    /// Sockets on the service address outlived `ss -K`.
    #[error("TCP sockets on the service address outlived ss -K: {0}")]
    SocketsLeft(String),
}

/// The guard rules in `iptables -S` form (without the leading `-A`).
fn guard_rules(svc: &ServiceAddr) -> [String; 2] {
    [
        format!("INPUT -d {}/32 -j DROP", svc.ip),
        format!("OUTPUT -s {}/32 -j DROP", svc.ip),
    ]
}

/// Applies `-I`/`-D` lines to the filter table in one `iptables-restore --noflush` transaction.
fn apply(lines: &[String]) -> Result<(), NetError> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut input = String::from("*filter\n");
    for l in lines {
        input.push_str(l);
        input.push('\n');
    }
    input.push_str("COMMIT\n");
    sys::run_with_input(&["iptables-restore", "-w", "--noflush"], &input)?;
    Ok(())
}

/// Inserts DROP rules for all traffic to and from the service address, unless `current` (an
/// [`rules_snapshot`]) already has them.
pub fn guard_add(svc: &ServiceAddr, current: &[String]) -> Result<(), NetError> {
    let missing: Vec<String> = guard_rules(svc)
        .into_iter()
        .filter(|r| !current.contains(&format!("-A {r}")))
        .map(|r| format!("-I {r}"))
        .collect();
    apply(&missing)
}

/// Removes the guard rules (absent is fine).
pub fn guard_remove(svc: &ServiceAddr) -> Result<(), NetError> {
    let guards: Vec<String> = guard_rules(svc).iter().map(|r| format!("-A {r}")).collect();
    let present: Vec<String> = rules_snapshot()?
        .into_iter()
        .filter(|l| guards.contains(l))
        .map(|l| format!("-D {}", &l[3..]))
        .collect();
    apply(&present)
}

/// The current `iptables -S` rule lines of the filter table (`-A ...`).
pub fn rules_snapshot() -> Result<Vec<String>, NetError> {
    Ok(sys::run(&["iptables", "-w", "-S"])?
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect())
}

/// Deletes the guard of `svc` and every filter rule not in `keep` (CRIU's per-connection lock
/// rules), CRIU's own chain, and nftables tables CRIU left (named `CRIU-*`).
pub fn reset_rules(svc: &ServiceAddr, keep: &[String]) -> Result<(), NetError> {
    let guards: Vec<String> = guard_rules(svc).iter().map(|r| format!("-A {r}")).collect();
    let listing = sys::run(&["iptables", "-w", "-S"])?;
    let extra: Vec<String> = listing
        .lines()
        .filter(|l| l.starts_with("-A ") && !l.starts_with("-A CRIU "))
        .filter(|l| guards.iter().any(|g| g == l) || !keep.iter().any(|k| k == l))
        .map(|l| format!("-D {}", &l[3..]))
        .collect();
    apply(&extra)?;
    if listing.lines().any(|l| l == "-N CRIU") {
        sys::run(&["iptables", "-w", "-F", "CRIU"])?;
        sys::run(&["iptables", "-w", "-X", "CRIU"])?;
    }
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
    sys::run(&["ip", "addr", "replace", &cidr, "dev", &svc.dev])?;
    Ok(())
}

/// Removes the service address (absent is fine).
pub fn addr_del(svc: &ServiceAddr) -> Result<(), NetError> {
    let cidr = format!("{}/{}", svc.ip, svc.prefix);
    match sys::run(&["ip", "addr", "del", &cidr, "dev", &svc.dev]) {
        Ok(_) => Ok(()),
        Err(e) if has_addr(svc)? => Err(e.into()),
        Err(_) => Ok(()),
    }
}

/// The `ss` filters for TCP sockets on the service address: IPv4 sockets, and IPv6 sockets on
/// its IPv4-mapped form (a JVM's sockets).
fn socket_filters(svc: &ServiceAddr) -> [String; 2] {
    [format!("{}", svc.ip), format!("[::ffff:{}]", svc.ip)]
}

/// Destroys every TCP socket on the service address (`ss -K`, the kernel's SOCK_DESTROY), and
/// fails if any is left. A killed process's connections linger in FIN_WAIT for minutes; in a VM
/// that will restore the same connections (a clone whose copy of the workload was discarded)
/// they would hold the connections' address pairs and make the restore's reconnect fail with
/// "Cannot assign requested address". The resets they send go out of the VM's own link.
pub fn destroy_sockets(svc: &ServiceAddr) -> Result<(), NetError> {
    let mut left = String::new();
    for f in socket_filters(svc) {
        sys::run(&["ss", "-K", "-t", "-n", "-H", "src", &f])?;
        left.push_str(&sys::run(&["ss", "-t", "-n", "-H", "src", &f])?);
    }
    if left.trim().is_empty() {
        Ok(())
    } else {
        Err(NetError::SocketsLeft(left.trim().to_string()))
    }
}

/// Whether the device carries the service address.
pub fn has_addr(svc: &ServiceAddr) -> Result<bool, NetError> {
    let out = sys::run(&["ip", "-o", "-4", "addr", "show", "dev", &svc.dev])?;
    let needle = format!(" {}/", svc.ip);
    Ok(out.contains(&needle))
}

/// Sends gratuitous ARP for the service address so neighbours update their caches. The first
/// announcement goes out at once; the command (which repeats it once a second) finishes in the
/// background.
pub fn announce(svc: &ServiceAddr) -> Result<(), NetError> {
    let ip = svc.ip.to_string();
    let argv = [
        "arping",
        "-U",
        "-c",
        "3",
        "-I",
        svc.dev.as_str(),
        ip.as_str(),
    ];
    let mut child = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|source| SysError::Spawn {
            cmd: argv.join(" "),
            source,
        })?;
    // iputils arping exits 1 when no reply came, which is normal for unsolicited ARP.
    std::thread::spawn(move || child.wait());
    Ok(())
}
