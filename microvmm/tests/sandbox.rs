//! The sandbox of `microvmm run` and `disk serve`: every thread under its seccomp filter (on by
//! default), a forbidden system call ending the process with SIGSYS, and `--user`.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_test_guests::kvm_or_skip;

const BIN: &str = env!("CARGO_BIN_EXE_microvmm");
/// The user the `--user` tests switch to (`nobody` on Debian).
const USER: u32 = 65534;

/// A child killed (by its id) on drop.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `microvmm ARGS` with stderr captured.
fn spawn(args: &[&str]) -> Kid {
    Kid(Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits for `child` to end, at most `limit`; `None` if it still runs.
fn wait_for(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_path(p: &Path, child: &mut Child) {
    let end = Instant::now() + Duration::from_secs(30);
    while !p.exists() {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("microvmm ended before {} appeared: {s}", p.display());
        }
        assert!(Instant::now() < end, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(e) = child.stderr.as_mut() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// `microvmm ARGS` with the test hook on (vmm's `test-hooks`, in this binary only through the
/// tests: vCPU 0 opens a file before its first KVM_RUN): (status, stdout, stderr).
fn with_forbidden_call(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    forbidden_call_at("vcpu", args)
}

/// `microvmm ARGS` with the test hook making the forbidden call at `point` (`vcpu`, `upgrade`).
fn forbidden_call_at(point: &str, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("MICROVMM_TEST_FORBIDDEN_SYSCALL", point)
        .output()
        .unwrap();
    (out.status, text(&out.stdout), text(&out.stderr))
}

#[test]
fn a_forbidden_syscall_on_a_vcpu_thread_ends_the_process_with_sigsys() {
    if !kvm_or_skip("a_forbidden_syscall_on_a_vcpu_thread_ends_the_process_with_sigsys") {
        return;
    }
    let run =
        |extra: &[&str]| with_forbidden_call(&[&["run", "--test-guest", "hello"], extra].concat());
    let (status, stdout, stderr) = run(&[]);
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}: {stderr}");
    assert!(
        stderr.contains(
            "microvmm: seccomp: a vcpu thread made system call 257 (openat), which its filter \
             forbids: ending the process with SIGSYS"
        ),
        "{stderr}"
    );
    assert!(!stdout.contains("Hello"), "the guest ran: {stdout}");
    // The same call without the filters is harmless: the guest runs to its end.
    let (status, stdout, stderr) = run(&["--no-seccomp"]);
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        stdout.contains("Hello from the microvmm test guest"),
        "{stdout}"
    );
}

/// `microvmm upgrade` (the demo) runs its VMs' threads under the filters too: the same
/// forbidden call on vCPU 0 ends it with SIGSYS; with `--no-seccomp` the demo completes.
#[test]
fn the_upgrade_demo_runs_its_vms_under_the_filters() {
    if !kvm_or_skip("the_upgrade_demo_runs_its_vms_under_the_filters") {
        return;
    }
    let run = |extra: &[&str]| with_forbidden_call(&[&["upgrade"], extra].concat());
    let (status, _, stderr) = run(&[]);
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}: {stderr}");
    assert!(
        stderr.contains("microvmm: seccomp: a vcpu thread made system call 257 (openat)"),
        "{stderr}"
    );
    let (status, stdout, stderr) = run(&["--no-seccomp"]);
    assert!(status.success(), "{status}: {stderr}");
    assert!(stdout.contains("client gap:"), "{stdout}");
}

/// The thread that runs `microvmm upgrade`'s orchestrator is filtered too (the `upgrade` kind):
/// a system call its list lacks (`syslog`) ends the demo with SIGSYS, before any VM exists.
#[test]
fn the_upgrade_orchestrator_runs_under_its_filter() {
    if !kvm_or_skip("the_upgrade_orchestrator_runs_under_its_filter") {
        return;
    }
    let (status, stdout, stderr) = forbidden_call_at("upgrade", &["upgrade"]);
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}: {stderr}");
    assert!(
        stderr.contains("microvmm: seccomp: an upgrade thread made system call 103 (syslog)"),
        "{stderr}"
    );
    assert!(!stdout.contains("client gap:"), "{stdout}");
    // Without the filters the same call is harmless and the demo completes.
    let (status, stdout, stderr) = forbidden_call_at("upgrade", &["upgrade", "--no-seccomp"]);
    assert!(status.success(), "{status}: {stderr}");
    assert!(stdout.contains("client gap:"), "{stdout}");
    // Under the filter, with a relative --dir (resolving it takes `getcwd`, found missing from
    // the list by review: the demo died with SIGSYS).
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["upgrade", "--dir", "rel"])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert!(stdout.contains("client gap:"), "{stdout}");
    assert!(cwd.path().join("rel/upgrade").is_dir());
}

#[test]
fn every_kit_guest_runs_under_the_filters() {
    if !kvm_or_skip("every_kit_guest_runs_under_the_filters") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ok = |args: &[&str]| {
        assert!(
            Command::new(BIN)
                .args(args)
                .output()
                .unwrap()
                .status
                .success(),
            "{args:?}"
        );
    };
    let base = d.join("base.img");
    ok(&["disk", "create", "-f", "raw", base.to_str().unwrap(), "16M"]);
    let delta = d.join("delta");
    let (base, delta) = (base.to_str().unwrap(), delta.to_str().unwrap());
    ok(&["disk", "create", "-f", "delta", "-b", base, delta]);
    let uds = d.join("v.sock");
    let uds = uds.to_str().unwrap();
    let guests: &[(&str, &[&str])] = &[
        ("hello", &[]),
        ("counter", &[]),
        ("dirtier", &[]),
        ("smp", &["--vcpus", "2"]),
        ("reset", &[]),
        ("chaos", &["--vcpus", "2"]),
        ("triple_fault", &[]),
        ("emulation_failure", &[]),
        ("cpuid_dump", &[]),
        ("insn_probe", &[]),
        ("virtio_blk", &["--disk", delta]),
        ("virtio_vsock", &["--vsock-cid", "3", "--vsock-uds", uds]),
    ];
    for (guest, extra) in guests {
        let mut args = vec!["run", "--test-guest", guest, "--console", "null"];
        args.extend_from_slice(extra);
        let mut kid = spawn(&args);
        // Guests that run until stopped get two seconds.
        let status = wait_for(&mut kid.0, Duration::from_secs(2));
        if status.is_none() {
            kid.0.kill().unwrap();
        }
        let status = kid.0.wait().unwrap();
        let stderr = stderr_of(&mut kid.0);
        assert!(!stderr.contains("seccomp"), "{guest}: {stderr}");
        assert_ne!(status.signal(), Some(libc::SIGSYS), "{guest}: {stderr}");
    }
}

/// Raw HTTP/1.1 over the API socket: (status, body).
fn http(api: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(api).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// The `Uid:`/`Gid:`/`Groups:` lines of every thread of `pid`; a thread that ends while
/// the list is read (an NBD connection's thread after its client left) is left out.
fn ids_of_every_thread(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = match t.and_then(|t| std::fs::read_to_string(t.path().join("status"))) {
            Ok(s) => s,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ESRCH) =>
            {
                continue;
            }
            Err(e) => panic!("reading a thread of {pid}: {e}"),
        };
        let name = status.lines().next().unwrap_or("").to_string();
        for l in status.lines() {
            if l.starts_with("Uid:") || l.starts_with("Gid:") || l.starts_with("Groups:") {
                out.push(format!(
                    "{name} {}",
                    l.split_whitespace().collect::<Vec<_>>().join(" ")
                ));
            }
        }
    }
    out
}

/// Asserts every thread of `pid` runs as [`USER`] with no supplementary groups.
fn assert_runs_as_user(pid: u32) {
    let ids = ids_of_every_thread(pid);
    assert!(ids.len() >= 3, "{ids:?}");
    for l in &ids {
        let fields: Vec<&str> = l.split_whitespace().collect();
        let (key, vals) = (fields[2], &fields[3..]);
        match key {
            "Uid:" | "Gid:" => assert!(
                vals.len() == 4 && vals.iter().all(|v| *v == USER.to_string()),
                "{l}"
            ),
            _ => assert!(vals.is_empty(), "{l}"),
        }
    }
}

/// Whether the tests run as root (needed to switch users); prints a `SKIP` line when not.
fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        println!("SKIP: {test}: not running as root, cannot switch users");
    }
    root
}

/// A temporary directory the unprivileged user can use: `(root, its own subdirectory)`.
fn dir_for_user() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let own = dir.path().join("user");
    std::fs::create_dir(&own).unwrap();
    std::os::unix::fs::chown(&own, Some(USER), Some(USER)).unwrap();
    (dir, own)
}

#[test]
fn run_as_another_user_keeps_the_vm_running_under_the_filters() {
    let name = "run_as_another_user_keeps_the_vm_running_under_the_filters";
    if !kvm_or_skip(name) || !root_or_skip(name) {
        return;
    }
    let (dir, own) = dir_for_user();
    let api = dir.path().join("api.sock");
    let user = format!("{USER}:{USER}");
    let mut kid = spawn(&[
        "run",
        "--test-guest",
        "counter",
        "--mem-mib",
        "32",
        "--console",
        "null",
        "--user",
        &user,
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    wait_for_path(&api, &mut kid.0);
    let pid = kid.0.id();
    // Snapshots taken through the API as that user, with the guest running between them: its
    // counter went on.
    let snapshot = |name: &str| {
        assert_eq!(http(&api, "PATCH", "/vm", r#"{"state": "Paused"}"#).0, 204);
        let to = own.join(name);
        let body = format!(r#"{{"snapshot_path": "{}"}}"#, to.display());
        let (code, answer) = http(&api, "PUT", "/snapshot/create", &body);
        assert_eq!(code, 204, "{answer}");
        assert_eq!(http(&api, "PATCH", "/vm", r#"{"state": "Resumed"}"#).0, 204);
        assert_eq!(std::fs::metadata(to.join("memory")).unwrap().uid(), USER);
        let at = vmm_test_guests::COUNTER.symbol("shared_counter").unwrap() as usize;
        let mem = std::fs::read(to.join("memory")).unwrap();
        u64::from_le_bytes(mem[at..at + 8].try_into().unwrap())
    };
    // Snapshots every 300 ms until the counter is above `above` (for up to 30 s: the guest may
    // still be starting on a busy machine).
    let counter_above = |name: &str, above: u64| {
        let end = Instant::now() + Duration::from_secs(30);
        for i in 0.. {
            std::thread::sleep(Duration::from_millis(300));
            let v = snapshot(&format!("{name}-{i}"));
            if v > above || Instant::now() > end {
                return v;
            }
        }
        unreachable!()
    };
    let first = counter_above("s1", 0);
    assert_runs_as_user(pid);
    let second = counter_above("s2", first);
    assert!(first > 0 && second > first, "counter {first} then {second}");
    let (code, state) = http(&api, "GET", "/", "");
    assert!(
        code == 200 && state.contains("\"Running\""),
        "{code} {state}"
    );
    assert_runs_as_user(pid);
    assert_eq!(
        http(&api, "PUT", "/actions", r#"{"action_type": "Stop"}"#).0,
        204
    );
    let status = wait_for(&mut kid.0, Duration::from_secs(30)).expect("run did not stop");
    let stderr = stderr_of(&mut kid.0);
    assert!(status.success(), "{status}: {stderr}");
    assert!(!stderr.contains("seccomp"), "{stderr}");
}

#[test]
fn disk_serve_as_another_user_under_the_filters() {
    if !root_or_skip("disk_serve_as_another_user_under_the_filters") {
        return;
    }
    if Command::new("qemu-io").arg("--version").output().is_err() {
        println!("SKIP: disk_serve_as_another_user_under_the_filters: qemu-io not installed");
        return;
    }
    let (dir, own) = dir_for_user();
    let base = dir.path().join("base.img");
    let delta = own.join("d");
    let (base_s, delta_s) = (base.to_str().unwrap(), delta.to_str().unwrap());
    for args in [
        &["disk", "create", "-f", "raw", base_s, "16M"][..],
        &["disk", "create", "-f", "delta", "-b", base_s, delta_s],
    ] {
        assert!(Command::new(BIN).args(args).status().unwrap().success());
    }
    // The user owns the delta it writes (its journal is compacted in place).
    for e in std::fs::read_dir(&delta).unwrap() {
        std::os::unix::fs::chown(e.unwrap().path(), Some(USER), Some(USER)).unwrap();
    }
    std::os::unix::fs::chown(&delta, Some(USER), Some(USER)).unwrap();
    let sock = dir.path().join("nbd.sock");
    let user = format!("{USER}:{USER}");
    let (disk, base) = (format!("disk={delta_s}"), format!("base={base_s},ro"));
    let mut kid = spawn(&[
        "disk",
        "serve",
        "--socket",
        sock.to_str().unwrap(),
        "--user",
        &user,
        "--export",
        &disk,
        "--export",
        &base,
    ]);
    wait_for_path(&sock, &mut kid.0);
    let qemu_io = |export: &str, cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        if export == "base" {
            c.arg("-r");
        }
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let out = c
            .arg(format!("nbd+unix:///{export}?socket={}", sock.display()))
            .output()
            .unwrap();
        let t = text(&out.stdout) + &text(&out.stderr);
        assert!(out.status.success() && !t.contains("failed"), "{t}");
    };
    qemu_io(
        "disk",
        &[
            "write -P 0x5a 64k 128k",
            "flush",
            "discard 0 64k",
            "write -z 1M 64k",
        ],
    );
    qemu_io("disk", &["read -P 0x5a 64k 128k", "read -P 0 1M 64k"]);
    qemu_io("base", &["read -P 0 0 64k"]);
    assert_runs_as_user(kid.0.id());
    // SAFETY: signalling our own child by its pid.
    assert_eq!(unsafe { libc::kill(kid.0.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_for(&mut kid.0, Duration::from_secs(30)).expect("serve did not stop");
    let stderr = stderr_of(&mut kid.0);
    assert!(status.success(), "{status}: {stderr}");
    assert!(!stderr.contains("seccomp"), "{stderr}");
    let d = block::Delta::open_read_only(&delta).unwrap();
    let mut b = vec![0u8; 128 << 10];
    d.read_at(&mut b, 64 << 10).unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
}
