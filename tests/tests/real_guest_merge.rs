//! The three-way merge on what real Linux guests write: ext4 metadata, journals and a dpkg install.
//!
//! A two-volume Debian guest (`guest/merge-build-image.sh`: OS volume = debootstrap ext4 root with
//! `.deb` files staged in it, data volume = a fresh ext4) is forked with `block::fork`. Two QEMU (TCG)
//! guests run at the same time on NBD exports of the children served by an in-process
//! `block::nbd::NbdServer`: guest A (the active VM) writes files on the data volume and a log on the
//! OS volume; guest B (the upgrade VM, booted from the fork point) installs the staged packages with
//! dpkg (new packages, and an upgrade of tzdata) and writes a marker on the data volume. Then:
//! - without an ownership map (`Policy::Fail`) both volumes' ext4 metadata conflicts are reported,
//!   exactly the blocks both sides wrote differently, and nothing is written;
//! - with the ownership map (OS volume -> upgrade, data volume -> active) the dry run reports exactly
//!   the non-owner writes, and they are resolved in favour of the owner;
//! - the merged volumes are `e2fsck -fn` clean (host, on flattened copies), a third guest booted on
//!   them (read-only NBD exports) sees the packages installed at their versions and every file A
//!   wrote byte-exact (guest SHA-256 and a host `debugfs rdump` byte comparison), and nothing of what
//!   the non-owners wrote.
//!
//! Needs root (debootstrap, QEMU) and the image `scripts/setup.d/40-merge-image.sh` builds; prints
//! `SKIP:` when not root or when QEMU is missing. Cost: ~35 s warm (four short TCG boots), plus
//! ~30-60 s once to build the image if setup has not.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use block::merge::{
    self, BlockState, ConflictReason, MergeError, MergeOptions, MergeReport, OwnershipMap, Policy,
    Resolution, Side,
};
use block::nbd::{Listener, NbdServer};
use block::{BLOCK_SIZE, Base, Delta, Disk, ExtentKind, Layer};

/// Bound on one guest run (they take ~4-10 s here).
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);
/// Files the application writes.
const APP_FILES: u32 = 100;

struct Images {
    kernel: PathBuf,
    initrd: PathBuf,
    os: PathBuf,
    data: PathBuf,
    /// Staged packages: `NAME VERSION [UPGRADED-FROM]` lines.
    pkgs: PathBuf,
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Builds (or finds cached) the merge guest images.
fn images() -> Images {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/merge-build-image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run guest/merge-build-image.sh");
    assert!(out.status.success(), "guest/merge-build-image.sh failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<PathBuf> = text.lines().map(PathBuf::from).collect();
    let [.., kernel, initrd, os, data, pkgs] = &lines[..] else {
        panic!("unexpected output of merge-build-image.sh: {text}");
    };
    Images {
        kernel: kernel.clone(),
        initrd: initrd.clone(),
        os: os.clone(),
        data: data.clone(),
        pkgs: pkgs.clone(),
    }
}

/// A QEMU guest booted on two NBD exports, its console going to a file.
struct Guest {
    child: Child,
    log: PathBuf,
    started: Instant,
}

/// Boots `role` (console log `<label>.console`, `extra` appended to the kernel command line) on
/// the NBD exports `exports` (vda, vdb); the `check` role gets them read-only.
fn boot(
    img: &Images,
    sock: &Path,
    role: &str,
    label: &str,
    extra: &str,
    exports: [&str; 2],
) -> Guest {
    let ro = role == "check";
    let log = sock.with_file_name(format!("{label}.console"));
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&img.initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 merge.role={role} merge.files={APP_FILES} {extra}"
        ));
    for e in exports {
        c.arg("-drive").arg(format!(
            "file=nbd+unix:///{e}?socket={},format=raw,if=virtio{}",
            sock.display(),
            if ro { ",readonly=on" } else { "" }
        ));
    }
    let child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu-system-x86_64");
    Guest {
        child,
        log,
        started: Instant::now(),
    }
}

/// An in-process NBD server on a Unix socket, serving on its own thread.
struct Served {
    server: Arc<NbdServer>,
    thread: std::thread::JoinHandle<Result<(), String>>,
    sock: PathBuf,
}

fn serve(sock: PathBuf, exports: Vec<(&str, Arc<dyn Disk>)>) -> Served {
    let exports = exports
        .into_iter()
        .map(|(n, d)| (n.to_owned(), d))
        .collect();
    let server = Arc::new(NbdServer::new(exports).unwrap());
    let listener = UnixListener::bind(&sock).unwrap();
    let s2 = Arc::clone(&server);
    let thread = std::thread::spawn(move || {
        s2.serve(Listener::Unix(listener))
            .map_err(|e| e.to_string())
    });
    Served {
        server,
        thread,
        sock,
    }
}

impl Served {
    /// Stops the server (it flushes every writable export) and checks it ended cleanly.
    fn stop(self) {
        self.server.shutdown_flag().store(true, Ordering::SeqCst);
        assert_eq!(self.thread.join().unwrap(), Ok(()));
    }
}

/// Waits (bounded) for the guest to power off; returns its `MERGE ...` console lines.
fn finish(mut g: Guest, role: &str) -> Vec<String> {
    loop {
        if let Some(st) = g.child.try_wait().unwrap() {
            assert!(st.success(), "{role} guest: qemu exited with {st}");
            break;
        }
        if g.started.elapsed() > GUEST_TIMEOUT {
            let _ = g.child.kill();
            let _ = g.child.wait();
            let console = std::fs::read(&g.log).unwrap_or_default();
            panic!(
                "{role} guest did not finish in {GUEST_TIMEOUT:?}; console:\n{}",
                String::from_utf8_lossy(&console)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "{role} guest ran {:.1} s",
        g.started.elapsed().as_secs_f64()
    );
    let console = String::from_utf8_lossy(&std::fs::read(&g.log).unwrap()).into_owned();
    let lines: Vec<String> = console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("MERGE "))
        .map(str::to_owned)
        .collect();
    assert!(
        lines.iter().any(|l| l == &format!("END {role} ok"))
            && !lines.iter().any(|l| l.starts_with("ERROR")),
        "{role} guest failed; console:\n{console}"
    );
    lines
}

fn with_prefix(lines: &[String], prefix: &str) -> BTreeSet<String> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(str::to_owned)
        .collect()
}

/// The 4 KiB blocks a delta wrote (data or zero).
fn written_blocks(d: &Delta) -> BTreeSet<u64> {
    d.changed_since(0)
        .iter()
        .flat_map(|e| (e.offset / BLOCK_SIZE)..(e.end() / BLOCK_SIZE))
        .collect()
}

fn read_block(d: &Delta, blk: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE as usize];
    d.read_at(&mut b, blk * BLOCK_SIZE).unwrap();
    b
}

/// The blocks an independent reading of the two deltas says conflict (issue 2's rules): without
/// an owner, blocks both wrote with different content; with one, every block the non-owner wrote
/// except those the owner also wrote with the same content.
fn expected_conflicts(a: &Delta, b: &Delta, owner: Option<Side>) -> BTreeSet<u64> {
    let (wa, wb) = (written_blocks(a), written_blocks(b));
    let differs = |blk: u64| read_block(a, blk) != read_block(b, blk);
    match owner {
        None => wa
            .intersection(&wb)
            .copied()
            .filter(|&k| differs(k))
            .collect(),
        Some(o) => {
            let (non_owner, owner_w) = if o == Side::Upgrade {
                (wa, wb)
            } else {
                (wb, wa)
            };
            non_owner
                .into_iter()
                .filter(|&k| !owner_w.contains(&k) || differs(k))
                .collect()
        }
    }
}

fn conflict_blocks(r: &MergeReport) -> BTreeSet<u64> {
    r.conflicts
        .iter()
        .flat_map(|c| (c.offset / BLOCK_SIZE)..((c.offset + c.len) / BLOCK_SIZE))
        .collect()
}

/// Checks a report's conflicts: the expected blocks, the expected reason, and each side's
/// state and CRC32C as the deltas read.
fn check_conflicts(r: &MergeReport, a: &Delta, b: &Delta, owner: Option<Side>, vol: &str) {
    let expected = expected_conflicts(a, b, owner);
    let got = conflict_blocks(r);
    assert_eq!(
        got,
        expected,
        "{vol}: conflicts reported {} blocks, an independent comparison finds {}",
        got.len(),
        expected.len()
    );
    assert_eq!(r.conflicting, expected.len() as u64 * BLOCK_SIZE, "{vol}");
    let (ma, mb) = (a.snapshot().1, b.snapshot().1);
    for c in &r.conflicts {
        let want = match owner {
            None => ConflictReason::BothWrote,
            Some(o) => ConflictReason::NonOwnerWrite { owner: o },
        };
        assert_eq!(c.reason, want, "{vol}: {c:?}");
        for (side, d, m, view) in [
            (Side::Active, a, &ma, c.active),
            (Side::Upgrade, b, &mb, c.upgrade),
        ] {
            let mut buf = vec![0u8; c.len as usize];
            d.read_at(&mut buf, c.offset).unwrap();
            assert_eq!(view.crc32c, merge::checksum(&buf), "{vol} {side:?}: {c:?}");
            let state = match m.range(c.offset, c.len).first().map(|e| e.kind) {
                None => BlockState::Inherited,
                Some(ExtentKind::Data) => BlockState::Data,
                Some(ExtentKind::Zero) => BlockState::Zero,
            };
            assert_eq!(view.state, state, "{vol} {side:?}: {c:?}");
        }
    }
}

/// Merges with the ownership map, each non-owner conflict resolved to the owner
/// (`Policy::OwnerWins`). Returns the output (writable, for a catch-up) and the merge point
/// (A's sequence number read).
fn merge_by_ownership(
    a: &Delta,
    b: &Delta,
    map: &OwnershipMap,
    out: &Path,
    vol: &str,
) -> (Delta, u64) {
    let opts = MergeOptions {
        policy: Policy::OwnerWins(map.clone()),
        ..MergeOptions::default()
    };
    let r = merge::merge(a, b, out, &opts)
        .unwrap_or_else(|e| panic!("{vol}: merge by ownership failed: {e}"));
    for c in &r.conflicts {
        let ConflictReason::NonOwnerWrite { owner } = c.reason else {
            panic!("{vol}: unowned conflict {c:?}");
        };
        let want = match owner {
            Side::Active => Resolution::Active,
            Side::Upgrade => Resolution::Upgrade,
        };
        assert_eq!(c.resolution, want, "{vol}: {c:?}");
    }
    (Delta::open(out).unwrap(), r.active_seq)
}

/// Writes a disk's content into a sparse raw file.
fn flatten(d: &dyn Disk, path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(d.size()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < d.size() {
        let n = (d.size() - off).min(buf.len() as u64) as usize;
        d.read_at(&mut buf[..n], off).unwrap();
        if buf[..n].iter().any(|&x| x != 0) {
            std::os::unix::fs::FileExt::write_all_at(&f, &buf[..n], off).unwrap();
        }
        off += n as u64;
    }
    f.flush().unwrap();
}

fn e2fsck_clean(image: &Path, vol: &str) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{vol}: e2fsck -fn not clean:\n{text}");
    let summary = text.lines().find(|l| l.contains(" files ")).unwrap_or("");
    println!("{vol}: e2fsck -fn clean: {summary}");
}

/// Host-side copy of `/app` out of an ext4 image (debugfs, no mount).
fn rdump_app(image: &Path, to: &Path) -> Vec<(String, Vec<u8>)> {
    std::fs::create_dir_all(to).unwrap();
    let st = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump /app {}", to.display()))
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "debugfs rdump on {}", image.display());
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(to.join("app"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn real_guests_upgrade_and_app_writes_merge_three_ways() {
    if !is_root() {
        println!("SKIP: needs root (debootstrap builds the guest image)");
        return;
    }
    if !have("qemu-system-x86_64") || !have("e2fsck") || !have("debugfs") {
        println!(
            "SKIP: qemu-system-x86_64/e2fsprogs not installed (scripts/setup.d/40-merge-image.sh)"
        );
        return;
    }
    let t0 = Instant::now();
    let img = images();
    let dir = std::env::temp_dir().join(format!("real-guest-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // Bases (copies of the cached images, adopted as read-only bases) and their forks.
    let mut forks = Vec::new();
    for (vol, src) in [("os", &img.os), ("data", &img.data)] {
        let path = dir.join(format!("{vol}.base"));
        let st = Command::new("cp")
            .args(["--sparse=always"])
            .arg(src)
            .arg(&path)
            .status()
            .unwrap();
        assert!(st.success());
        let base = Arc::new(Layer::Base(Base::adopt(&path).unwrap()));
        let (a, b) = block::fork(
            base,
            &dir.join(format!("{vol}.a")),
            &dir.join(format!("{vol}.b")),
        )
        .unwrap();
        forks.push((Arc::new(a), Arc::new(b)));
    }
    let [(os_a, os_b), (data_a, data_b)] = &forks[..] else {
        unreachable!()
    };

    // Guests A and B at the same time, each on its children, served over NBD.
    let srv = serve(
        dir.join("nbd.sock"),
        vec![
            ("os-a", Arc::clone(os_a) as Arc<dyn Disk>),
            ("data-a", Arc::clone(data_a) as Arc<dyn Disk>),
            ("os-b", Arc::clone(os_b) as Arc<dyn Disk>),
            ("data-b", Arc::clone(data_b) as Arc<dyn Disk>),
        ],
    );
    let ga = boot(&img, &srv.sock, "active", "active", "", ["os-a", "data-a"]);
    let gb = boot(
        &img,
        &srv.sock,
        "upgrade",
        "upgrade",
        "",
        ["os-b", "data-b"],
    );
    let a_lines = finish(ga, "active");
    let b_lines = finish(gb, "upgrade");
    srv.stop();

    let a_files = with_prefix(&a_lines, "FILE ");
    assert_eq!(a_files.len(), APP_FILES as usize, "{a_lines:?}");
    assert!(b_lines.iter().any(|l| l == "DPKG ok"), "{b_lines:?}");
    // B installed every staged package at the staged version (upgrading those the root held).
    let staged = std::fs::read_to_string(&img.pkgs).unwrap();
    let mut want = BTreeSet::new();
    for line in staged.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        want.insert(format!("{} {} install ok installed", f[0], f[1]));
        if let Some(old) = f.get(2) {
            println!("upgrade: {} {old} -> {}", f[0], f[1]);
        }
    }
    let b_pkgs = with_prefix(&b_lines, "PKG ");
    assert!(!want.is_empty());
    assert_eq!(b_pkgs, want, "packages in the upgrade VM");
    for (vol, a, b) in [("os", os_a, os_b), ("data", data_a, data_b)] {
        println!(
            "{vol}: A wrote {} KiB, B wrote {} KiB",
            written_blocks(a).len() * 4,
            written_blocks(b).len() * 4
        );
    }

    // Without an ownership map: the ext4 metadata both wrote conflicts; nothing is written.
    for (vol, a, b) in [("os", os_a, os_b), ("data", data_a, data_b)] {
        let out = dir.join(format!("{vol}.fail"));
        let Err(MergeError::Conflicts(r)) = merge::merge(a, b, &out, &MergeOptions::default())
        else {
            panic!("{vol}: Policy::Fail merged ext4 metadata both guests wrote");
        };
        assert!(!out.exists(), "{vol}: a failed merge published output");
        check_conflicts(&r, a, b, None, vol);
        // Both mounted the volume: its superblock (in block 0) differs at least.
        assert!(
            conflict_blocks(&r).contains(&0),
            "{vol}: superblock not in conflict"
        );
        assert_eq!(r.unresolved(), r.conflicts.len());
        println!(
            "{vol}: Policy::Fail: {} conflicts ({} KiB), nothing written",
            r.conflicts.len(),
            r.conflicting / 1024
        );
    }

    // With the ownership map: the dry run reports exactly the non-owner writes.
    let mut merged = Vec::new();
    for (vol, a, b, owner) in [
        ("os", os_a, os_b, Side::Upgrade),
        ("data", data_a, data_b, Side::Active),
    ] {
        let map = OwnershipMap::new(vec![(0, a.size(), owner)]).unwrap();
        let r = merge::plan(a, b, &Policy::Ownership(map.clone())).unwrap();
        check_conflicts(&r, a, b, Some(owner), vol);
        assert!(
            !r.conflicts.is_empty(),
            "{vol}: the non-owner wrote nothing?"
        );
        println!(
            "{vol}: ownership dry run: {} conflicts ({} KiB), {} KiB only-A, {} KiB only-B",
            r.conflicts.len(),
            r.conflicting / 1024,
            r.only_active / 1024,
            r.only_upgrade / 1024
        );
        let out = dir.join(format!("{vol}.merged"));
        let (m, since) = merge_by_ownership(a, b, &map, &out, vol);
        // The owner's volume reads exactly as the owner left it.
        let ownerd = if owner == Side::Active { a } else { b };
        for blk in written_blocks(a).union(&written_blocks(b)) {
            assert_eq!(
                read_block(&m, *blk),
                read_block(ownerd, *blk),
                "{vol}: block {blk}"
            );
        }
        let flat = dir.join(format!("{vol}.merged.raw"));
        flatten(&m, &flat);
        e2fsck_clean(&flat, vol);
        merged.push((Arc::new(m), flat, since));
    }

    // Catch-up: A runs on (a second session writes more files and logs), then its writes since
    // the merge point are applied to the merge output as a second, small pass. Data volume (A
    // owns it): A's new blocks win (`PreferActive` = ownership here, as a catch-up only looks at
    // A's blocks). OS volume (B owns it): A's new writes are non-owner writes, not applied.
    let srv = serve(
        dir.join("nbd-a2.sock"),
        vec![
            ("os-a", Arc::clone(os_a) as Arc<dyn Disk>),
            ("data-a", Arc::clone(data_a) as Arc<dyn Disk>),
        ],
    );
    let extra = format!("merge.prefix=g merge.files={}", APP_FILES / 2);
    let a2 = finish(
        boot(
            &img,
            &srv.sock,
            "active",
            "active-2",
            &extra,
            ["os-a", "data-a"],
        ),
        "active",
    );
    srv.stop();
    let a_files = with_prefix(&a2, "FILE ");
    assert_eq!(
        a_files.len(),
        (APP_FILES + APP_FILES / 2) as usize,
        "{a2:?}"
    );
    let (data_m, _, data_since) = &merged[1];
    let opts = MergeOptions {
        policy: Policy::PreferActive,
        ..MergeOptions::default()
    };
    let r = merge::catch_up(data_m, data_a, *data_since, data_b, &opts).unwrap();
    let new_blocks: BTreeSet<u64> = data_a
        .changed_since(*data_since)
        .iter()
        .flat_map(|e| (e.offset / BLOCK_SIZE)..(e.end() / BLOCK_SIZE))
        .collect();
    assert!(!new_blocks.is_empty());
    for blk in &new_blocks {
        assert_eq!(
            read_block(data_m, *blk),
            read_block(data_a, *blk),
            "data: block {blk}"
        );
    }
    println!(
        "data: catch-up applied {} KiB ({} KiB of A's blocks since seq {data_since}; {} conflicts taken from A)",
        r.bytes_to_write / 1024,
        new_blocks.len() * 4,
        r.conflicts.len()
    );
    let (os_m, _, os_since) = &merged[0];
    let os_map = OwnershipMap::new(vec![(0, os_a.size(), Side::Upgrade)]).unwrap();
    let os_opts = MergeOptions {
        policy: Policy::OwnerWins(os_map),
        ..MergeOptions::default()
    };
    let r = merge::catch_up(os_m, os_a, *os_since, os_b, &os_opts).unwrap();
    assert!(
        r.conflicts.iter().all(|c| c.reason
            == ConflictReason::NonOwnerWrite {
                owner: Side::Upgrade
            }
            && c.resolution == Resolution::Upgrade),
        "{r:?}"
    );
    println!(
        "os: catch-up resolved {} KiB of A's non-owner writes to the owner (B)",
        r.conflicting / 1024
    );
    for blk in written_blocks(os_a).union(&written_blocks(os_b)) {
        assert_eq!(
            read_block(os_m, *blk),
            read_block(os_b, *blk),
            "os: block {blk}"
        );
    }
    for (m, flat, _) in &merged {
        flatten(&**m, flat);
    }
    e2fsck_clean(&merged[0].1, "os after catch-up");
    e2fsck_clean(&merged[1].1, "data after catch-up");

    // Host byte comparison of the application's files: merged data volume vs A's.
    let a_flat = dir.join("data.a.raw");
    flatten(&**data_a, &a_flat);
    let from_a = rdump_app(&a_flat, &dir.join("dump-a"));
    let from_merged = rdump_app(&merged[1].1, &dir.join("dump-merged"));
    assert_eq!(from_a.len(), a_files.len());
    assert!(
        from_a == from_merged,
        "the merged data volume's /app differs from A's"
    );

    // A guest on the merged volumes (read-only exports).
    let srv = serve(
        dir.join("nbd-merged.sock"),
        vec![
            ("os", Arc::clone(&merged[0].0) as Arc<dyn Disk>),
            ("data", Arc::clone(&merged[1].0) as Arc<dyn Disk>),
        ],
    );
    let check = finish(
        boot(&img, &srv.sock, "check", "check", "", ["os", "data"]),
        "check",
    );
    srv.stop();

    assert_eq!(
        with_prefix(&check, "PKG "),
        b_pkgs,
        "packages after the merge"
    );
    assert_eq!(
        with_prefix(&check, "FILE "),
        a_files,
        "application files after the merge"
    );
    assert!(
        !check.iter().any(|l| l == "MARKER present"),
        "B's data-volume write survived"
    );
    assert!(
        !check.iter().any(|l| l == "APPLOG present"),
        "A's OS-volume log survived"
    );
    println!(
        "real-guest merge: {} packages installed, {} files byte-exact, {:.1} s in all",
        b_pkgs.len(),
        a_files.len(),
        t0.elapsed().as_secs_f64()
    );
    drop(merged);
    let _ = std::fs::remove_dir_all(&dir);
}
