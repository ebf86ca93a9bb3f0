//! `microvmm run --net`: a snapshot taken while the host pings the guest, restored in a new
//! process on the same TAP, goes on answering; configuration errors are clear and come before
//! any VM exists. TAPs live in private network namespaces; as root only (SKIP otherwise).

use std::process::{Command, Stdio};
use std::time::Instant;

use devices::virtio::testing::{NetNs, net_or_skip, ping_replies};
use vmm_test_guests::kvm_or_skip;

const BIN: &str = env!("CARGO_BIN_EXE_microvmm");
const MAC: &str = "06:00:0a:00:00:02";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn skip(test: &str) -> bool {
    !(kvm_or_skip(test) && net_or_skip(test))
}

#[test]
fn a_snapshot_restored_in_a_new_process_answers_on_the_same_tap() {
    let name = "a_snapshot_restored_in_a_new_process_answers_on_the_same_tap";
    if skip(name) {
        return;
    }
    let ns = NetNs::new("snap").unwrap();
    ns.add_tap("tap0", Some("10.0.0.1/24")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let snap_s = snap.to_str().unwrap();

    let t0 = Instant::now();
    let mut first = ns
        .command(BIN)
        .args(["run", "--test-guest", "virtio_net", "--console", "null"])
        .args(["--net", &format!("tap=tap0,mac={MAC}")])
        .args(["--snapshot-after", "2000", "--snapshot-to", snap_s])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Ping every 20 ms across the snapshot and the restore (10 s: the restored debug build
    // has several seconds to answer before the last 100).
    let pinger = ns
        .command("ping")
        .args(["-n", "-c", "500", "-i", "0.02", "-W", "1", "10.0.0.2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let status = first.wait().unwrap();
    let saved_at = t0.elapsed();
    let mut err = String::new();
    std::io::Read::read_to_string(first.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("snapshot of 1 vCPU"), "{err}");

    // The new process names no MAC: the guest keeps the one it was given.
    let mut second = ns
        .command(BIN)
        .args(["run", "--test-guest", "virtio_net", "--console", "null"])
        .args(["--restore", snap_s, "--net", "tap=tap0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let restored_at = t0.elapsed();
    let out = pinger.wait_with_output().unwrap();
    let seqs = ping_replies(&text(&out.stdout));
    // Replies before the snapshot, and after the restore, to the same ping stream.
    let before = u32::try_from(saved_at.as_millis() / 20).unwrap();
    let after = u32::try_from(restored_at.as_millis() / 20).unwrap();
    println!(
        "snapshot at {saved_at:?}, restored at {restored_at:?}: {} of 500 answered",
        seqs.len()
    );
    assert!(
        seqs.iter().filter(|&&s| s < before).count() >= 40,
        "answers before the snapshot: {seqs:?}"
    );
    let late = seqs.iter().filter(|&&s| s > after + 10).count();
    assert!(late >= 100, "answers after the restore: {late} ({seqs:?})");

    // And it answers ARP with the saved address.
    ns.ip(&["neigh", "flush", "dev", "tap0"]).unwrap();
    assert_eq!(
        ns.ping("10.0.0.2", 20, "0.01"),
        20,
        "echo requests answered after an ARP"
    );
    let neigh = Command::new("ip")
        .args(["-n", &ns.name, "neigh", "show", "10.0.0.2"])
        .output()
        .unwrap();
    assert!(text(&neigh.stdout).contains(MAC), "{}", text(&neigh.stdout));
    second.kill().unwrap();
    second.wait().unwrap();
}

#[test]
fn net_configuration_errors_come_before_the_vm() {
    let name = "net_configuration_errors_come_before_the_vm";
    if skip(name) {
        return;
    }
    let ns = NetNs::new("neterr").unwrap();
    ns.add_tap("tap0", None).unwrap();
    let run = |extra: &[&str]| {
        let out = ns
            .command(BIN)
            .args(["run", "--test-guest", "virtio_net", "--console", "null"])
            .args(extra)
            .output()
            .unwrap();
        (out.status.code(), text(&out.stderr))
    };
    let (code, err) = run(&["--net", "tap=nosuch0"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("nosuch0") && err.contains("does not exist"),
        "{err}"
    );
    let (code, err) = run(&["--net", "tap=tap0,mac=06:00:zz:00:00:01"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("06:00:zz:00:00:01"), "{err}");
    let (code, err) = run(&["--net", "tap=tap0", "--net", "tap=tap0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("configured twice"), "{err}");

    // A user who may not open /dev/net/tun: the binary, copied where that user can run it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let bin = dir.path().join("microvmm");
    std::fs::copy(BIN, &bin).unwrap();
    let out = ns
        .command("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&bin)
        .args(["run", "--test-guest", "virtio_net", "--net", "tap=tap0"])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/dev/net/tun") && err.contains("ermission denied"),
        "{err}"
    );
}

#[test]
fn the_api_shows_each_nic_with_its_tap_and_mac() {
    let name = "the_api_shows_each_nic_with_its_tap_and_mac";
    if skip(name) || Command::new("curl").arg("-V").output().is_err() {
        return;
    }
    let ns = NetNs::new("netapi").unwrap();
    ns.add_tap("tap0", Some("10.0.0.1/24")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("api.sock");
    let mut vm = ns
        .command(BIN)
        .args(["run", "--test-guest", "virtio_net", "--console", "null"])
        .args(["--net", &format!("id=uplink,tap=tap0,mac={MAC}")])
        .arg("--api-socket")
        .arg(&api)
        .spawn()
        .unwrap();
    let get = || {
        Command::new("curl")
            .args(["-s", "--unix-socket"])
            .arg(&api)
            .arg("http://localhost/")
            .output()
            .unwrap()
    };
    let t = Instant::now();
    let body = loop {
        let out = get();
        if out.status.success() && !out.stdout.is_empty() {
            break text(&out.stdout);
        }
        assert!(t.elapsed().as_secs() < 30, "the API never answered");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["net"],
        serde_json::json!([{"iface_id": "uplink", "host_dev_name": "tap0", "guest_mac": MAC}]),
        "{body}"
    );
    vm.kill().unwrap();
    vm.wait().unwrap();
}
