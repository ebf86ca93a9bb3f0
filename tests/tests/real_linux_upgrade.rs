//! The whole upgrade on a real Linux guest under microvmm (hardware KVM: the nested harness runs
//! it, `nested_real_linux_upgrade`; on an emulating KVM it prints SKIP).
//!
//! One active VM runs the full Debian guest with two volumes on our deltas: the OS (root, owned
//! by the upgrade) and the data volume (`/var/lib/demo`, owned by the active side), the guest
//! agent on vsock and the Java demo service behind a service address, which appends every
//! request to a file on the data volume and answers a client over one TCP connection through
//! virtio-net. The client runs in a network namespace of the test (a bridge with the VMs' TAPs),
//! where a packet watch counts RSTs. On that one VM and that one connection:
//! 1. an upgrade whose `dpkg -i` fails in the backup rolls back;
//! 2. an upgrade whose CRIU restore fails in the backup (its cutover commands move the log file
//!    away) rolls back;
//! 3. an upgrade that installs staged packages with dpkg (an upgrade of an installed package and
//!    a new one) completes: the backup is cut off from the client network, its copy of the
//!    service discarded, its data volume unmounted; after the merge it mounts the data volume,
//!    restores the service with its open file and TCP connection, takes over the TAP.
//!
//! Then: every reply in order, no RST; the log holds every request once; the new packages run;
//! both merged volumes are `e2fsck -fn` clean; the process holds no more threads or fds than
//! before. And the baseline in the same run: the bare CRIU handoff of the same service between
//! two running microvmm guests, with the client gap of each printed side by side.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use devices::virtio::testing::{NetNs, net_or_skip};
use guest_agent::host::AgentClient;
use guest_agent::protocol::{ServiceAddr, WorkloadSpec};
use guest_agent::testing::{RstWatch, echo_log_argv};
use microvmm_tests::hardware_kvm_or_skip;
use microvmm_tests::linux_guest::{
    agent_stream, connect_service, full_guest_vm_with, try_agent_stream, upgrade_kernel_image,
};
use microvmm_tests::nested::{self, Nested, NestedOptions};

const SERVICE_IP: &str = "10.0.0.10";
const SERVICE_PORT: u16 = 7000;
const LOG: &str = "/var/lib/demo/requests.log";

/// A client on one connection: a request every 20 ms, each reply checked (its line, the
/// serving guest's hostname, the log offset after it); the time of every reply is kept.
struct Client {
    stop: Arc<AtomicBool>,
    replies: Arc<Mutex<Vec<Instant>>>,
    thread: thread::JoinHandle<Result<usize, String>>,
}

impl Client {
    /// Starts on `conn`; `first` is the number of the first request, `offset` the log offset
    /// before it, `host` the hostname replies carry.
    fn start(conn: TcpStream, first: usize, offset: usize, host: &'static str) -> Self {
        conn.set_read_timeout(Some(Duration::from_secs(300)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let (stop2, replies2) = (Arc::clone(&stop), Arc::clone(&replies));
        let thread = thread::spawn(move || -> Result<usize, String> {
            let mut w = conn.try_clone().map_err(|e| e.to_string())?;
            let mut r = BufReader::new(conn);
            let (mut n, mut offset) = (first, offset);
            while !stop2.load(Ordering::SeqCst) {
                let line = format!("request-{n}");
                w.write_all(format!("{line}\n").as_bytes())
                    .map_err(|e| format!("request {n}: {e}"))?;
                let mut reply = String::new();
                r.read_line(&mut reply)
                    .map_err(|e| format!("reply {n}: {e}"))?;
                offset += line.len() + 1;
                let want = format!("{line} {host} {offset}\n");
                if reply != want {
                    return Err(format!("reply {n}: {reply:?}, want {want:?}"));
                }
                replies2.lock().unwrap().push(Instant::now());
                n += 1;
                thread::sleep(Duration::from_millis(20));
            }
            Ok(n)
        });
        Self {
            stop,
            replies,
            thread,
        }
    }

    /// Replies so far.
    fn count(&self) -> usize {
        self.replies.lock().unwrap().len()
    }

    /// Longest time between two consecutive replies that overlaps `[from, to]`.
    fn gap(&self, from: Instant, to: Instant) -> Duration {
        let r = self.replies.lock().unwrap();
        r.windows(2)
            .filter(|w| w[1] >= from && w[0] <= to)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    /// Waits until `n` more replies arrived (up to 180 s: after a long outage, such as a
    /// rollback's, TCP's next retransmission may come up to 120 s later).
    fn wait_more(&self, n: usize) {
        let want = self.count() + n;
        let end = Instant::now() + Duration::from_secs(180);
        while self.count() < want {
            assert!(
                Instant::now() < end,
                "the client got no {n} more replies in 180 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops; the number of the next request (= requests answered, counting from 0).
    fn stop(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.join().unwrap() {
            Ok(n) => n,
            Err(e) => panic!("client: {e}"),
        }
    }
}

/// Runs `cmd` in the guest with `sh -c`; its stdout; panics unless it exits 0.
fn sh(agent: &mut AgentClient, cmd: &str) -> String {
    // Two emulation levels deep, dpkg and friends take many seconds.
    agent
        .set_read_timeout(Some(Duration::from_secs(150)))
        .unwrap();
    let out = agent
        .exec(&["sh", "-c", cmd], Some(Duration::from_secs(120)))
        .unwrap();
    assert_eq!(out.code, Some(0), "{cmd}: {out:?}");
    out.stdout
}

/// Builds Debian packages in the guest (with its own `dpkg-deb`): `microvmm-demo-tool` 1.0
/// installed; staged in `/var/cache/microvmm-staged`: `microvmm-demo-tool` 2.0 (an upgrade)
/// and `microvmm-demo-extra` 1.0 (new), and `microvmm-initramfs` (provides
/// `linux-initramfs-tool`); in `/var/cache/microvmm-broken`, a package whose `preinst` fails.
const PACKAGES: &str = r#"set -e
mkpkg() {
    d=$(mktemp -d)
    mkdir -p "$d/DEBIAN" "$d/usr/share/microvmm-demo"
    printf 'Package: %s\nVersion: %s\nArchitecture: all\nMaintainer: microvmm tests <tests@microvmm.invalid>\nDescription: microvmm upgrade test package\n' "$1" "$2" >"$d/DEBIAN/control"
    echo "$1 $2" >"$d/usr/share/microvmm-demo/$1"
    [ "$1" = microvmm-initramfs ] && echo 'Provides: linux-initramfs-tool' >>"$d/DEBIAN/control"
    if [ -n "${4:-}" ]; then printf '#!/bin/sh\necho preinst refuses >&2\nexit 1\n' >"$d/DEBIAN/preinst"; chmod 755 "$d/DEBIAN/preinst"; fi
    mkdir -p "$3"
    dpkg-deb -Zgzip --build "$d" "$3/$1_$2_all.deb" >/dev/null
    rm -rf "$d"
}
mkpkg microvmm-demo-tool 1.0 /root/pkgs
dpkg -i /root/pkgs/microvmm-demo-tool_1.0_all.deb >/dev/null
mkpkg microvmm-demo-tool 2.0 /var/cache/microvmm-staged
mkpkg microvmm-demo-extra 1.0 /var/cache/microvmm-staged
mkpkg microvmm-demo-broken 1.0 /var/cache/microvmm-broken fail
# The initramfs of a kernel comes from the host (microvmm boots it): this satisfies a kernel
# package's dependency on an initramfs tool.
mkpkg microvmm-initramfs 1.0 /var/cache/microvmm-staged
sync
"#;

/// The installed versions of the demo packages, one `name version` line each.
fn demo_packages(agent: &mut AgentClient) -> String {
    sh(
        agent,
        "dpkg-query -W -f='${Package} ${Version}\\n' 'microvmm-demo-*' 2>/dev/null | sort",
    )
}

/// The upgrade plan (work directory `work`): the root volume owned by the upgrade, the data volume by the active side
/// (the backup unmounts it first and mounts the merged one at the cutover), `commands` run in
/// the backup, `cutover_extra` appended to the mount. With `kernel`, the staging volume is the
/// third disk; with `upgrade_kernel` too, the backup first installs the kernel packages and
/// restarts into the new kernel after the commands.
fn plan(
    work: &Path,
    commands: &str,
    cutover_extra: &str,
    kernel: Option<&NewKernel>,
    upgrade_kernel: bool,
) -> upgrade::UpgradePlan {
    let mut disks = vec![
        serde_json::json!({"ownership": [{"owner": "upgrade"}]}),
        serde_json::json!({"ownership": [{"owner": "active"}]}),
    ];
    let mut restart = serde_json::Value::Null;
    let mut commands = commands.to_string();
    if let Some(k) = kernel {
        // The staging volume: read by the backup only.
        disks.push(serde_json::json!({"ownership": [{"owner": "upgrade"}]}));
        if upgrade_kernel {
            // The kernel package pre-depends on linux-base: configured first, on its own.
            commands = format!(
                "dpkg -i /mnt/staging/linux-base_*.deb && dpkg -i /mnt/staging/linux-image-*.deb \
                 /var/cache/microvmm-staged/microvmm-initramfs_*.deb && {commands}"
            );
            restart = serde_json::json!({
                "kernel": {"file": k.vmlinuz},
                "initrd": k.initrd,
                "cmdline": "console=ttyS0 panic=-1 microvmm.hostname=g1 microvmm.ip=10.0.0.2/24",
            });
        }
    }
    serde_json::from_value(serde_json::json!({
        "restart": restart,
        "prepare_commands": [{"argv": ["sh", "-c", "umount /var/lib/demo"], "timeout_ms": 60000}],
        // Their output on the backup's console (`<work>/backup.console`), shown on failure.
        // The limits leave room for level 1 of the nested harness running twice as slowly as
        // measured (dpkg and the restart together took 236 s there).
        "commands": [{"argv": ["sh", "-c", format!("exec >/dev/console 2>&1; {commands}")],
                      "timeout_ms": 900000}],
        "cutover_commands": [{"argv": ["sh", "-c",
            format!("blockdev --flushbufs /dev/vdb && mount /dev/vdb /var/lib/demo{cutover_extra}")],
            "timeout_ms": 60000}],
        "disks": disks,
        "workload": {"agent_port": 1024, "service": format!("{SERVICE_IP}:{SERVICE_PORT}")},
        "limits": {"max_cutover_ms": 300000, "agent_timeout_ms": 600000},
        "work_dir": work,
    }))
    .unwrap()
}

/// The newer kernel the backup installs and restarts into, and its initramfs (bookworm-backports'
/// 6.12 bzImage: it boots under microvmm in the nested harness since level 1 runs on QEMU 10;
/// under bookworm's QEMU 7.2 its decompressor triple-faulted there).
struct NewKernel {
    vmlinuz: PathBuf,
    initrd: PathBuf,
}

/// What this process's open fds point at, and its thread count.
fn fds_and_threads() -> (Vec<String>, usize) {
    let fds = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    (fds, std::fs::read_dir("/proc/self/task").unwrap().count())
}

/// Waits (up to 15 s) until every fd opened since `before` is one `allowed` accepts; returns
/// them and the thread count, or panics naming the others.
fn settled_fds(before: &[String], allowed: impl Fn(&str) -> bool) -> (Vec<String>, usize) {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let (now, threads) = fds_and_threads();
        let added = microvmm_tests::added(before, &now);
        let other: Vec<&String> = added.iter().filter(|f| !allowed(f)).collect();
        if other.is_empty() {
            return (added, threads);
        }
        assert!(
            Instant::now() < end,
            "fds left behind: {:?}",
            other.iter().map(|f| describe_fd(f)).collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(500));
    }
}

/// `target` (an fd's link), with what the kernel's socket tables say of a socket: its unix
/// path and state, or its TCP endpoints.
fn describe_fd(target: &str) -> String {
    let Some(inode) = target
        .strip_prefix("socket:[")
        .and_then(|t| t.strip_suffix(']'))
    else {
        return target.to_owned();
    };
    // This thread's network namespace and the process's (the test may run in its own).
    let tables = ["thread-self", "self"].into_iter().flat_map(|who| {
        ["unix", "tcp", "tcp6", "udp"].map(move |t| format!("/proc/{who}/net/{t}"))
    });
    for table in tables {
        let text = std::fs::read_to_string(&table).unwrap_or_default();
        // The inode is the 7th field of a unix line and the 10th of a tcp/udp line.
        let col = if table.ends_with("unix") { 6 } else { 9 };
        if let Some(line) = text
            .lines()
            .find(|l| l.split_whitespace().nth(col) == Some(inode))
        {
            return format!("{target} in {table}: {}", line.trim());
        }
    }
    format!("{target} (in no socket table)")
}

/// Copies the disk chain at `path` into a raw image `out`, replays its ext4 journal there and
/// runs `e2fsck -fn` on the result.
fn e2fsck_clean(path: &Path, out: &Path) -> String {
    let layer = block::Layer::open(path).unwrap();
    let mut f = std::fs::File::create(out).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let size = layer.size();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        layer.read_at(&mut buf[..n], off).unwrap();
        f.write_all(&buf[..n]).unwrap();
        off += n as u64;
    }
    drop(f);
    // The VM was stopped like a power cut: first what a boot would do, the journal replayed
    // (on this copy), then the full read-only check of the result.
    let replay = Command::new("e2fsck")
        .args(["-y", "-E", "journal_only"])
        .arg(out)
        .output()
        .expect("run e2fsck");
    // 0: nothing to replay; 1: the journal was replayed.
    assert!(
        matches!(replay.status.code(), Some(0 | 1)),
        "e2fsck -E journal_only {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );
    let o = Command::new("e2fsck")
        .args(["-fn"])
        .arg(out)
        .output()
        .expect("run e2fsck");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "e2fsck -fn {}: {text}", path.display());
    std::fs::remove_file(out).unwrap();
    text
}

/// The console tail of the backup of the last upgrade, for failure messages.
fn backup_console(work: &Path) -> String {
    let c = std::fs::read_to_string(work.join("backup.console")).unwrap_or_default();
    let n = c.chars().count();
    c.chars().skip(n.saturating_sub(3000)).collect()
}

/// Reconnects to the agent of the VM now serving (its vsock socket).
fn agent_of(vm: &microvmm_tests::TestVm) -> AgentClient {
    let uds = vm.machine.vsock_uds_path().unwrap();
    AgentClient::from_connection(Box::new(agent_stream(vm, &uds)))
}

#[test]
fn real_linux_upgrade() {
    let test = "real_linux_upgrade";
    if !hardware_kvm_or_skip(test) || !net_or_skip(test) {
        return;
    }
    let t_test = Instant::now();
    // The client network: a bridge with the VMs' TAPs, in a namespace of this test.
    let ns = NetNs::new("rlu").unwrap();
    ns.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "br0"])
        .unwrap();
    ns.ip(&["link", "set", "br0", "up"]).unwrap();
    for tap in ["tap0", "tap1"] {
        ns.add_tap(tap, None).unwrap();
        ns.ip(&["link", "set", tap, "master", "br0"]).unwrap();
    }
    let _in_ns = ns.enter().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data_img = dir.path().join("data.ext4");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "demo-data"])
        .arg(&data_img)
        .arg("64M")
        .status()
        .expect("run mkfs.ext4");
    assert!(st.success());
    let nic = |tap: &str, mac: &str| vmm::config::NetConfig {
        iface_id: "eth0".into(),
        host_dev_name: tap.into(),
        guest_mac: Some(mac.parse().unwrap()),
    };
    // The newer kernel's packages on a staging volume (a copy: it becomes a delta's base).
    let kernel = upgrade_kernel_image().map(|(staging, vmlinuz, initrd)| {
        let copy = dir.path().join("staging.ext4");
        std::fs::copy(&staging, &copy).unwrap();
        (copy, NewKernel { vmlinuz, initrd })
    });
    if kernel.is_none() {
        println!(
            "{test}: no newer kernel available (guest/build-upgrade-kernel.sh): packages only"
        );
    }
    let mut extra = vec![data_img.clone()];
    extra.extend(kernel.as_ref().map(|(img, _)| img.clone()));
    let kernel = kernel.map(|(_, k)| k);
    // Under nested emulation a guest vCPU has triple-faulted now and then, in a plain boot too
    // (see docs/ARCHITECTURE.md): a guest that dies while booting is booted once more, afresh.
    let mut boot = 0;
    let (mut vm, _uds, mut agent) = loop {
        boot += 1;
        let at = if boot == 1 {
            dir.path().to_owned()
        } else {
            dir.path().join(format!("boot{boot}"))
        };
        std::fs::create_dir_all(&at).unwrap();
        let (vm, uds) = full_guest_vm_with(&at, vec![nic("tap0", "06:00:0a:00:00:02")], &extra);
        match try_agent_stream(&vm, &uds) {
            Ok(s) => break (vm, uds, AgentClient::from_connection(Box::new(s))),
            Err(e) if boot < 2 && vm.machine.stopped_vcpu().is_some() => {
                let first = e.lines().next().unwrap_or_default().to_owned();
                println!("{test}: boot {boot}: {first}; booting again");
            }
            Err(e) => panic!("{e}"),
        }
    };
    println!("{test}: active VM up in {:.1?}", t_test.elapsed());
    sh(
        &mut agent,
        &format!(
            "ip link set eth0 up && ip addr add 10.0.0.2/24 dev eth0 && \
             ip addr add {SERVICE_IP}/32 dev eth0 && mkdir -p /var/lib/demo && \
             {{ mount /dev/vdb /var/lib/demo || {{ cat /proc/partitions; dmesg | tail -n 20; exit 1; }}; }}"
        ),
    );
    sh(&mut agent, PACKAGES);
    if kernel.is_some() {
        sh(
            &mut agent,
            "mkdir -p /mnt/staging && mount -o ro /dev/vdc /mnt/staging",
        );
    }
    let kernel_before = sh(&mut agent, "uname -r");
    assert_eq!(demo_packages(&mut agent), "microvmm-demo-tool 1.0\n");
    let service = ServiceAddr {
        ip: SERVICE_IP.parse().unwrap(),
        prefix: 32,
        dev: "eth0".into(),
    };
    let spec = WorkloadSpec {
        argv: echo_log_argv(SERVICE_PORT, LOG),
        cwd: None,
        env: vec![],
        // The log moves with the data volume, not in the checkpoint image.
        data_files: vec![],
        pid_base: Some(20000),
        service: Some(service.clone()),
    };
    agent.start(&spec).expect("start the Java service");
    drop(agent);
    let watch = RstWatch::start("br0", SERVICE_PORT);
    // Until the JVM listens, each connection attempt is refused (an RST to that attempt); the
    // client's own connection is the one that must never see one.
    let stream = connect_service(&format!("{SERVICE_IP}:{SERVICE_PORT}"));
    let client_port = stream.local_addr().unwrap().port();
    let client = Client::start(stream, 0, 0, "g1");
    client.wait_more(20);
    let (fds0, threads0) = fds_and_threads();
    let connector = Arc::new(upgrade::criu_agent::CriuConnector::default());
    let mut opts = upgrade::UpgradeOptions::new(connector);
    // Each phase as it starts (two emulation levels deep an upgrade takes minutes).
    opts.on_event = Some(Arc::new(move |e: &upgrade::Event| {
        if let upgrade::Event::Phase(p) = e {
            eprintln!("{test}: {:>7.1?} phase {}", t_test.elapsed(), p.name());
        }
    }));

    // An upgrade under `p` that must fail in `phase` and roll back, the client going on; the
    // client's longest gap meanwhile.
    let mut rolls_back = |what: &str, p: upgrade::UpgradePlan, phase: upgrade::Phase| {
        let t = Instant::now();
        let e = upgrade::run(&mut vm.machine, &p, &opts)
            .expect_err(&format!("an upgrade whose {what} fails"));
        println!("{test}: failing {what}: {e} ({:.1?})", t.elapsed());
        assert!(e.rolled_back(), "{e:?}");
        assert_eq!(e.phase(), Some(phase), "{e:?}");
        let gap = client.gap(t, Instant::now());
        client.wait_more(10);
        gap
    };
    // 1. dpkg fails in the backup: rolled back in the upgrade phase.
    let gap_dpkg = rolls_back(
        "dpkg",
        plan(
            &dir.path().join("upgrade1"),
            "dpkg -i /var/cache/microvmm-broken/*.deb",
            "",
            kernel.as_ref(),
            false,
        ),
        upgrade::Phase::UpgradeBackup,
    );
    // 2. The CRIU restore fails in the backup (its cutover moves the log away): rolled back
    //    after the checkpoint, the service restored in the active VM.
    let gap_restore = rolls_back(
        "restore",
        plan(
            &dir.path().join("upgrade2"),
            "true",
            " && mv /var/lib/demo/requests.log /var/lib/demo/requests.moved",
            kernel.as_ref(),
            false,
        ),
        upgrade::Phase::MoveProcess,
    );
    {
        // Nothing of either backup reached the active VM's disks.
        let mut agent = agent_of(&vm);
        assert_eq!(demo_packages(&mut agent), "microvmm-demo-tool 1.0\n");
        let files = sh(&mut agent, "ls /var/lib/demo");
        assert!(!files.contains("requests.moved"), "{files}");
    }
    // After a rollback the active VM runs on its fork children (one per disk, in that
    // upgrade's work directory): their files are the only new fds; nothing of a backup. (A
    // vsock connection of the agent client just dropped may take a moment to close.)
    let (added, threads1) = settled_fds(&fds0, |f| {
        (f.contains("/upgrade1/disk") || f.contains("/upgrade2/disk")) && f.contains("-active/")
    });
    println!(
        "{test}: after two rollbacks: {} new fds (the active VM's fork children), {threads1} \
         threads (before: {threads0})",
        added.len()
    );
    assert!(threads1 <= threads0, "the rolled-back backups left threads");

    // 3. The upgrade. Under nested emulation a backup's vCPU has triple-faulted now and then
    //    under load (see docs/ARCHITECTURE.md); the upgrade then rolls back at once with the
    //    active VM serving (checked like any rollback), and is tried again, as an operator
    //    would, at most twice more.
    const ATTEMPTS: usize = 3;
    let mut attempt = 0;
    let (t, report) = loop {
        attempt += 1;
        let work = dir.path().join(format!("upgrade3-{attempt}"));
        let t = Instant::now();
        let res = upgrade::run(
            &mut vm.machine,
            &plan(
                &work,
                "dpkg -i /var/cache/microvmm-staged/*.deb && echo v2 > /etc/microvmm-os-version && sync",
                "",
                kernel.as_ref(),
                true,
            ),
            &opts,
        );
        match res {
            Ok(r) => break (t, r),
            Err(upgrade::UpgradeError::Failed {
                cause,
                rolled_back: true,
                rollback_errors,
                phase,
            }) if attempt < ATTEMPTS
                && rollback_errors.is_empty()
                && matches!(*cause, upgrade::StepError::VcpuStopped { vm: "backup", .. }) =>
            {
                println!(
                    "{test}: attempt {attempt}: the backup lost a vCPU in phase {phase:?} \
                     ({cause}); rolled back after {:.1?}, trying again",
                    t.elapsed()
                );
                // The active VM serves on: the client gets replies again.
                client.wait_more(5);
            }
            Err(e) => {
                let active = vm.serial_text();
                let n = active.chars().count();
                let active: String = active.chars().skip(n.saturating_sub(3000)).collect();
                panic!(
                    "upgrade failed: {e}\n{e:?}\nbackup console tail:\n{}\nactive console tail:\n{active}",
                    backup_console(&work)
                )
            }
        }
    };
    let t_end = Instant::now();
    println!("{}", report.table());
    client.wait_more(20);
    let gap_upgrade = client.gap(t, t_end);
    let answered = client.stop();
    let (segments, resets) = watch.stop();
    let (on_client, refused): (Vec<_>, Vec<_>) = resets
        .into_iter()
        .partition(|&(src, dst)| src == client_port || dst == client_port);
    println!(
        "{test}: {answered} requests answered on one connection; client gap: upgrade \
         {gap_upgrade:.0?}, failed dpkg {gap_dpkg:.0?}, failed restore {gap_restore:.0?}; \
         {segments} segments of port {SERVICE_PORT}, {} RST on the client's connection \
         (port {client_port}), {} on connection attempts before the service listened",
        on_client.len(),
        refused.len()
    );
    assert!(
        on_client.is_empty(),
        "RST on the client's connection (port {client_port}): {on_client:?}"
    );
    // The upgraded VM runs on the merged layers (the last attempt's), whose parents are the
    // frozen layers of the earlier rollbacks; the old VM's fork children and every fd of its
    // own are gone.
    let last = format!("/upgrade3-{attempt}/disk");
    // The serving VM (the backup, restarted) writes its console to the plan's default file.
    let console = format!("/upgrade3-{attempt}/backup.console");
    let (added, threads2) = settled_fds(&fds0, |f| {
        f.contains(&last) && f.contains("-merged/")
            || f.ends_with(&console)
            || (f.contains("/upgrade1/disk")
                || f.contains("/upgrade2/disk")
                || f.contains("/upgrade3-"))
                && f.contains("-active/")
    });
    println!(
        "{test}: after the upgrade: {} new fds (the merged chains, the console), {threads2} threads",
        added.len()
    );
    assert!(threads2 <= threads0, "the old VM left threads");

    // The VM now serving is the upgraded one.
    let mut agent = agent_of(&vm);
    assert_eq!(
        demo_packages(&mut agent),
        "microvmm-demo-extra 1.0\nmicrovmm-demo-tool 2.0\n"
    );
    assert_eq!(
        sh(
            &mut agent,
            "cat /usr/share/microvmm-demo/microvmm-demo-tool"
        ),
        "microvmm-demo-tool 2.0\n"
    );
    assert_eq!(sh(&mut agent, "cat /etc/microvmm-os-version"), "v2\n");
    let kernel_after = sh(&mut agent, "uname -r");
    if kernel.is_some() {
        // The backup installed the newer kernel's package and restarted into it (its NIC kept
        // the guest's MAC).
        let installed = sh(
            &mut agent,
            "dpkg-query -W -f='${Package}\\n' 'linux-image-*' | sed 's/^linux-image-//'",
        );
        // Debian ships a kernel as `linux-image-<release>` and, beside it, its
        // `-unsigned` build: both name the release.
        let installed: Vec<&str> = installed
            .lines()
            .map(|l| l.trim_end_matches("-unsigned"))
            .collect();
        assert_ne!(
            kernel_after.trim(),
            kernel_before.trim(),
            "the serving guest runs the newer kernel"
        );
        assert!(
            installed.contains(&kernel_after.trim()),
            "the running kernel {} is an installed one: {installed:?}",
            kernel_after.trim()
        );
        println!(
            "{test}: restarted from {} into the installed {}",
            kernel_before.trim(),
            kernel_after.trim()
        );
        assert_eq!(
            sh(&mut agent, "cat /sys/class/net/eth0/address").trim(),
            "06:00:0a:00:00:02"
        );
        let up = sh(&mut agent, "cut -d. -f1 /proc/uptime");
        println!(
            "{test}: the serving guest has been up {}s (restarted)",
            up.trim()
        );
    } else {
        assert_eq!(kernel_after, kernel_before);
    }
    // Every request once, in order (the client saw each reply's log offset too).
    let log = sh(&mut agent, &format!("cat {LOG}"));
    let want: String = (0..answered).map(|i| format!("request-{i}\n")).collect();
    assert!(
        log == want,
        "the log does not hold requests 0..{answered} once each, in order"
    );

    // The baseline: the bare CRIU handoff of the same service between two running microvmm
    // guests (a fresh copy of the service on the upgraded VM, its log streamed with the image;
    // the target VM on the other TAP of the bridge).
    let bare = bare_handoff(&mut agent, dir.path(), &service, &nic);
    println!(
        "{test}: client gap: upgrade {gap_upgrade:.0?}, bare handoff {bare:.0?}, ratio {:.2} \
         (target <= 1.2)",
        gap_upgrade.as_secs_f64() / bare.as_secs_f64()
    );
    drop(agent);
    vm.machine.stop().unwrap();

    // Both merged volumes are clean.
    let disks: Vec<PathBuf> = vm
        .machine
        .config()
        .disks
        .iter()
        .map(|d| d.path.clone())
        .collect();
    // The machine holds its layers locked until it is dropped.
    drop(vm);
    for (i, d) in disks.iter().enumerate() {
        let text = e2fsck_clean(d, &dir.path().join(format!("check{i}.raw")));
        println!(
            "{test}: disk {i} ({}): e2fsck -fn: {}",
            d.display(),
            text.lines().last().unwrap_or("")
        );
    }
    println!(
        "{test}: kernel {} before, {} after; {:.0?} in all",
        kernel_before.trim(),
        kernel_after.trim(),
        t_test.elapsed()
    );
}

/// The bare handoff baseline: starts a fresh copy of the service on the VM of `agent` (its log streamed
/// with the image), boots a second guest on `tap1`, moves the service there with
/// `guest_agent::host::handoff` while a client keeps requesting, and returns the client's
/// longest gap during the handoff.
fn bare_handoff(
    agent: &mut AgentClient,
    dir: &Path,
    service: &ServiceAddr,
    nic: &dyn Fn(&str, &str) -> vmm::config::NetConfig,
) -> Duration {
    agent.discard().unwrap();
    sh(
        agent,
        &format!("ip addr add {SERVICE_IP}/32 dev eth0 && rm -f /var/lib/demo/bare.log"),
    );
    let log = "/var/lib/demo/bare.log";
    let spec = WorkloadSpec {
        argv: echo_log_argv(SERVICE_PORT, log),
        cwd: None,
        env: vec![],
        data_files: vec![log.into()],
        pid_base: Some(30000),
        service: Some(service.clone()),
    };
    agent.start(&spec).unwrap();
    let bdir = dir.join("bare");
    std::fs::create_dir_all(&bdir).unwrap();
    let (target, buds) = microvmm_tests::linux_guest::full_guest_vm_with(
        &bdir,
        vec![nic("tap1", "06:00:0a:00:00:03")],
        &[],
    );
    let mut tagent = AgentClient::from_connection(Box::new(agent_stream(&target, &buds)));
    sh(
        &mut tagent,
        "ip link set eth0 up && ip addr add 10.0.0.3/24 dev eth0 && mkdir -p /var/lib/demo",
    );
    let client = Client::start(
        connect_service(&format!("{SERVICE_IP}:{SERVICE_PORT}")),
        0,
        0,
        "g1",
    );
    client.wait_more(20);
    let t = Instant::now();
    let r =
        guest_agent::host::handoff(agent, &mut tagent, &Default::default()).expect("bare handoff");
    let t_end = Instant::now();
    client.wait_more(20);
    let gap = client.gap(t, t_end);
    let n = client.stop();
    println!(
        "bare handoff: {n} requests answered; checkpoint {} ms, restored after {} ms, total {} ms; \
         client gap {gap:.0?}",
        r.checkpoint_ms, r.restored_ms, r.total_ms
    );
    let logged = sh(&mut tagent, &format!("wc -l < {log}"));
    assert_eq!(
        logged.trim(),
        n.to_string(),
        "the bare handoff lost log lines"
    );
    drop(tagent);
    let mut target = target;
    target.machine.stop().unwrap();
    gap
}

/// `real_linux_upgrade` run for real on hardware-style KVM one level down (the nested harness,
/// `scripts/nested.sh`), with `MICROVMM_NESTED_UPGRADE=1` (and `MICROVMM_NESTED=1` or
/// `require`): 8-11 minutes. `scripts/test.sh`, the project's test command, sets both.
#[test]
fn nested_real_linux_upgrade() {
    let test = "nested_real_linux_upgrade";
    if std::env::var("MICROVMM_NESTED_UPGRADE").as_deref() != Ok("1") {
        println!(
            "SKIP: {test}: run only with MICROVMM_NESTED_UPGRADE=1 (8-11 minutes in the nested \
             harness; scripts/test.sh sets it)"
        );
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let opts = NestedOptions {
        tools: vec!["mkfs.ext4".into(), "e2fsck".into(), "ip".into()],
        images: true,
        test_name: Some(test.into()),
        ..Default::default()
    };
    let run = match nested::run_tests(
        &exe,
        &["real_linux_upgrade"],
        Duration::from_secs(1800),
        &opts,
    ) {
        Ok(Nested::Ran(r)) => r,
        Ok(Nested::Skipped(_)) => return,
        Err(e) => panic!("{test}: {e}"),
    };
    println!("{test}: {}", run.summary());
    run.assert_all_passed();
}
