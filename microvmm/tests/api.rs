//! The control API of `microvmm run --api-socket`, driven with curl (a real HTTP client) and
//! `microvmm ctl`/`microvmm upgrade --api-socket`, on the `service` test guest.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use upgrade::demo::Client;
use upgrade::service_guest::{self, ServiceAgent, ServiceClient, ServiceVmConfig};
use vmm_test_guests::kvm_or_skip;

const BIN: &str = env!("CARGO_BIN_EXE_microvmm");

/// A `microvmm run` child, killed on drop.
struct Run {
    child: Child,
    api: PathBuf,
    uds: PathBuf,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_service(dir: &Path, disk: &Path, name: &str, extra: &[&str]) -> Run {
    let api = dir.join(format!("{name}.api"));
    let uds = dir.join(format!("{name}.vsock"));
    let child = Command::new(BIN)
        .arg("--log")
        .arg(dir.join(format!("{name}.log")))
        .args([
            "run",
            "--test-guest",
            "service",
            "--vsock-cid",
            "3",
            "--console",
            "null",
        ])
        .arg("--disk")
        .arg(disk)
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--api-socket")
        .arg(&api)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start microvmm run");
    let end = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&api).is_err() {
        assert!(Instant::now() < end, "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    Run { child, api, uds }
}

/// `curl --unix-socket`: (status, body).
fn curl(api: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
        "--unix-socket",
    ])
    .arg(api)
    .arg(format!("http://localhost{path}"));
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = c.output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// `PUT /actions` with `action_type`: the status and body.
fn action(vm: &Run, action_type: &str) -> (u16, String) {
    let body = format!(r#"{{"action_type": "{action_type}"}}"#);
    curl(&vm.api, "PUT", "/actions", Some(&body))
}

/// `PUT /actions Stop`, which must be accepted.
fn stop(vm: &Run) {
    let (code, body) = action(vm, "Stop");
    assert_eq!(code, 204, "{body}");
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[test]
fn api_pause_resume_snapshot_status_and_bad_requests() {
    if !kvm_or_skip("api_pause_resume_snapshot") || Command::new("curl").arg("-V").output().is_err()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = ServiceVmConfig::create_disk(dir.path(), 64 << 20).unwrap();
    let vm = run_service(dir.path(), &disk, "a", &[]);
    let mode = std::fs::metadata(&vm.api).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "API socket mode");
    // GET /: state, devices, the disk's chain.
    let (code, body) = curl(&vm.api, "GET", "/", None);
    assert_eq!(code, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["state"], "Running");
    assert_eq!(v["devices"].as_array().unwrap().len(), 2);
    let chain = v["disks"][0]["chain"].as_array().unwrap();
    assert_eq!(
        (chain[0]["kind"].as_str(), chain[1]["kind"].as_str()),
        (Some("delta"), Some("base"))
    );
    // The service answers; a pause stops it, a resume lets it answer again.
    let mut c = ServiceClient::connect(&vm.uds, 5000, Duration::from_secs(10)).unwrap();
    for v in 0..20 {
        c.request(v).unwrap();
    }
    assert_eq!(
        curl(&vm.api, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0,
        204
    );
    assert_eq!(json(&curl(&vm.api, "GET", "/", None).1)["state"], "Paused");
    c.set_timeout(Duration::from_millis(300));
    c.send_request(20).unwrap();
    assert!(c.read_reply().is_err(), "a paused VM answered");
    // The power button needs a running guest.
    let (code, body) = action(&vm, "Shutdown");
    assert_eq!(code, 409, "Shutdown of a paused VM: {body}");
    assert!(body.contains("not running"), "{body}");
    // A snapshot only of a paused VM.
    let snap = dir.path().join("snap");
    let body = format!(r#"{{"snapshot_path": "{}"}}"#, snap.display());
    assert_eq!(curl(&vm.api, "PUT", "/snapshot/create", Some(&body)).0, 204);
    assert!(snap.join("state").exists() && snap.join("memory").exists());
    assert_eq!(
        curl(&vm.api, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0,
        204
    );
    c.set_timeout(Duration::from_secs(10));
    assert_eq!(
        c.read_reply().unwrap().seq,
        21,
        "the held request is answered"
    );
    let (code, body) = curl(
        &vm.api,
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "/tmp/x"}"#),
    );
    assert_eq!(code, 409, "snapshot of a running VM: {body}");
    assert!(
        json(&body)["fault_message"]
            .as_str()
            .unwrap()
            .contains("pause")
    );
    // Bad requests: each its status and a fault message; the VM keeps running.
    for (method, path, body, want, says) in [
        ("PATCH", "/vm", Some("{not json"), 400, "malformed"),
        (
            "PATCH",
            "/vm",
            Some(r#"{"state": "Paused", "extra": 1}"#),
            400,
            "extra",
        ),
        ("PATCH", "/vm", Some(r#"{"state": 5}"#), 400, "malformed"),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type": "Reboot"}"#),
            400,
            "Reboot",
        ),
        ("PUT", "/upgrade", Some(r#"{"disks": []}"#), 400, "workload"),
        ("GET", "/nope", None, 404, "/nope"),
        ("DELETE", "/vm", None, 405, "DELETE"),
        ("DELETE", "/upgrade", None, 409, "no upgrade"),
    ] {
        let (code, b) = curl(&vm.api, method, path, body);
        assert_eq!(code, want, "{method} {path}: {b}");
        assert!(
            json(&b)["fault_message"].as_str().unwrap().contains(says),
            "{method} {path}: {b}"
        );
    }
    let huge = format!(r#"{{"snapshot_path": "{}"}}"#, "x".repeat(100 << 10));
    assert_eq!(curl(&vm.api, "PUT", "/snapshot/create", Some(&huge)).0, 413);
    // A client that sends half a request and stalls does not hold up the others.
    let mut stalled = UnixStream::connect(&vm.api).unwrap();
    stalled.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t = Instant::now();
    assert_eq!(curl(&vm.api, "GET", "/", None).0, 200);
    // Held up, it would wait for the stalled client, which stays until the test ends; the
    // bound only leaves room for a slow curl start on a busy machine.
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    // 100 concurrent clients.
    let threads: Vec<_> = (0..100)
        .map(|_| {
            let api = vm.api.clone();
            std::thread::spawn(move || curl(&api, "GET", "/metrics", None).0)
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
    drop(stalled);
    let m = json(&curl(&vm.api, "GET", "/metrics", None).1);
    assert!(
        m["api_requests"].as_u64().unwrap() >= 115 && m["api_errors"].as_u64().unwrap() >= 11,
        "{m}"
    );
    // The VM's own counters: exits, device requests, journal flushes (one per served request).
    let vmm = &m["vm"];
    assert!(vmm["vcpu_exits"]["mmio_write"].as_u64().unwrap() > 0, "{m}");
    let dev = |t: u64| {
        vmm["virtio"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_type"] == t)
            .unwrap()["counters"]
            .clone()
    };
    assert!(dev(2)["requests"].as_u64().unwrap() >= 40, "blk: {m}");
    assert!(dev(19)["requests"].as_u64().unwrap() >= 21, "vsock TX: {m}");
    assert!(
        dev(19)["bytes_in"].as_u64().unwrap() >= 21 * 16,
        "vsock TX bytes: {m}"
    );
    assert!(
        vmm["disks"][0]["journal_flushes"].as_u64().unwrap() >= 21,
        "{m}"
    );
    // Every request went to the log file.
    let log = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
    assert!(
        log.contains("API request") && log.contains("/metrics"),
        "{log}"
    );
    c.request(99).unwrap();
    // Shutdown presses the ACPI power button; this test guest does not listen for it (a Linux
    // guest's init does: see the nested Linux tests) and keeps serving.
    let (code, body) = action(&vm, "Shutdown");
    assert_eq!(code, 204, "{body}");
    c.request(100).unwrap();
    // `microvmm ctl` speaks the same API.
    let o = Command::new(BIN)
        .args(["ctl", "--api-socket"])
        .arg(&vm.api)
        .arg("status")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(
        json(&String::from_utf8_lossy(&o.stdout))["state"],
        "Running"
    );
    // Stop ends `run` (exit 0) and removes the socket.
    let mut vm = vm;
    stop(&vm);
    let st = vm.child.wait().unwrap();
    assert!(st.success(), "{st:?}");
    assert!(!vm.api.exists());
    // The snapshot restores in a new process: the guest's state is the one at the pause.
    let restored = Command::new(BIN)
        .args([
            "run",
            "--test-guest",
            "service",
            "--vsock-cid",
            "3",
            "--console",
            "null",
            "--restore",
        ])
        .arg(&snap)
        .arg("--disk")
        .arg(&disk)
        .arg("--vsock-uds")
        .arg(dir.path().join("r.vsock"))
        .arg("--api-socket")
        .arg(dir.path().join("r.api"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut r = Run {
        child: restored,
        api: dir.path().join("r.api"),
        uds: dir.path().join("r.vsock"),
    };
    let mut agent = ServiceAgent::connect(&r.uds, 1100, Duration::from_secs(10)).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = agent.status().unwrap();
        if st.mode == service_guest::Mode::Standby || Instant::now() > end {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Restored with a transport reset: its connections are gone, its state is the pause's.
    assert_eq!(
        (st.mode, st.seq),
        (service_guest::Mode::Standby, 20),
        "{st:?}"
    );
    let _ = r.child.kill();
    let _ = r.child.wait();
}

#[test]
fn an_upgrade_through_the_api_and_a_cancelled_one() {
    if !kvm_or_skip("an_upgrade_through_the_api")
        || Command::new("curl").arg("-V").output().is_err()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = ServiceVmConfig::create_disk(dir.path(), 64 << 20).unwrap();
    let mut vm = run_service(dir.path(), &disk, "a", &[]);
    let client = Client::start(&vm.uds, 5000).unwrap();
    assert!(client.wait_for(30, Duration::from_secs(10)));
    // A cancelled upgrade: the backup command takes 3 s; DELETE while it runs.
    let mut plan = upgrade::demo::plan(&dir.path().join("cancelled"));
    plan.commands[0].argv = vec!["sleep".into(), "3000".into()];
    let body = serde_json::to_string(&plan).unwrap();
    let (code, b) = curl(&vm.api, "PUT", "/upgrade", Some(&body));
    assert_eq!(code, 202, "{b}");
    let (code, b) = curl(&vm.api, "PUT", "/upgrade", Some(&body));
    assert_eq!(code, 409, "a second upgrade while one runs: {b}");
    let end = Instant::now() + Duration::from_secs(20);
    while json(&curl(&vm.api, "GET", "/upgrade", None).1)["phase"] != "upgrade-backup" {
        assert!(Instant::now() < end, "never reached the backup's command");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(curl(&vm.api, "DELETE", "/upgrade", None).0, 202);
    let st = loop {
        let st = json(&curl(&vm.api, "GET", "/upgrade", None).1);
        if st["state"] != "running" {
            break st;
        }
        assert!(Instant::now() < end + Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(st["state"], "rolled-back", "{st}");
    assert!(st["error"].as_str().unwrap().contains("cancelled"), "{st}");
    let n = client.answered();
    assert!(
        client.wait_for(n + 20, Duration::from_secs(10)),
        "serving after the cancel"
    );
    // Ctrl-C on `microvmm upgrade --api-socket` asks; "y" cancels it, rolled back.
    let o = interrupted_upgrade(&vm, &slow_plan(dir.path(), "interrupted"), "y\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("cancel the upgrade") && err.contains("cancelling"),
        "{err}"
    );
    assert!(
        err.contains("rolled-back") && err.contains("cancelled"),
        "{err}"
    );
    let n = client.answered();
    assert!(
        client.wait_for(n + 20, Duration::from_secs(10)),
        "serving after the Ctrl-C cancel"
    );
    // The real one, with `microvmm upgrade --api-socket` following it; a Ctrl-C answered "n"
    // lets it go on.
    let o = interrupted_upgrade(&vm, &slow_plan(dir.path(), "upgraded"), "n\n");
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        err.contains("cancel the upgrade") && !err.contains("cancelling"),
        "{err}"
    );
    assert!(
        out.contains("cutover:") && out.contains("clone pause:"),
        "{out}"
    );
    let n = client.answered();
    assert!(
        client.wait_for(n + 30, Duration::from_secs(10)),
        "serving after the upgrade"
    );
    let (stats, acked) = client.finish();
    assert_eq!(
        (stats.errors, stats.out_of_order),
        (0, 0),
        "{}",
        stats.line()
    );
    let v = json(&curl(&vm.api, "GET", "/", None).1);
    let merged = dir.path().join("upgraded").join("disk0-merged");
    assert_eq!(
        v["disks"][0]["chain"][0]["path"],
        merged.display().to_string(),
        "{v}"
    );
    assert_eq!(
        v["vsock"]["uds_path"],
        vm.uds.display().to_string(),
        "answers on the old socket"
    );
    assert_eq!(
        json(&curl(&vm.api, "GET", "/metrics", None).1)["upgrades"],
        1
    );
    stop(&vm);
    assert!(vm.child.wait().unwrap().success());
    let mut err = String::new();
    if let Some(mut e) = vm.child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let layer = block::Layer::open(&merged).unwrap();
    let state = service_guest::read_disk_state(&layer).unwrap();
    assert_eq!(state.os_version, 2, "{err}");
    service_guest::check_log(&state.records, &acked).unwrap();
}

/// The demo plan (work dir `DIR/name`) with a 3 s command run in the backup first, written to
/// `DIR/name.json`.
fn slow_plan(dir: &Path, name: &str) -> PathBuf {
    let mut plan = upgrade::demo::plan(&dir.join(name));
    let mut sleep = plan.commands[0].clone();
    sleep.argv = vec!["sleep".into(), "3000".into()];
    plan.commands.insert(0, sleep);
    let file = dir.join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_string(&plan).unwrap()).unwrap();
    file
}

/// Runs `microvmm upgrade --api-socket` with `plan`, sends it SIGINT (Ctrl-C) once the backup's
/// first command runs, and answers its question with `answer` on stdin.
fn interrupted_upgrade(vm: &Run, plan: &Path, answer: &str) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(["upgrade", "--api-socket"])
        .arg(&vm.api)
        .arg("--plan")
        .arg(plan)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A client that already ended has closed its stdin; its own output says why.
    let _ = child.stdin.take().unwrap().write_all(answer.as_bytes());
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let st = json(&curl(&vm.api, "GET", "/upgrade", None).1);
        if st["state"] == "running" && st["phase"] == "upgrade-backup" {
            break;
        }
        assert!(
            Instant::now() < end,
            "never reached the backup's command: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid, which has not been waited for, so it is not reused.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    child.wait_with_output().unwrap()
}
