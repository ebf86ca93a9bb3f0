//! `microvmm run` end to end: exit status, console output and error messages.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::process::{Command, Output};

use vmm_test_guests::kvm_or_skip;

fn microvmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_microvmm"))
        .args(args)
        .output()
        .expect("run microvmm")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn run_without_kernel_boots_the_embedded_guest() {
    if !kvm_or_skip("run_without_kernel_boots_the_embedded_guest") {
        return;
    }
    let out = microvmm(&["run", "--timings"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Hello from the microvmm test guest\n");
    let err = text(&out.stderr);
    assert!(err.contains("KVM_CREATE_VM to first serial byte"), "{err}");
}

#[test]
fn guest_errors_give_status_1_and_a_message() {
    if !kvm_or_skip("guest_errors_give_status_1_and_a_message") {
        return;
    }
    let out = microvmm(&["run", "--test-guest", "triple_fault"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("triple fault"),
        "{}",
        text(&out.stderr)
    );
    let out = microvmm(&["run", "--test-guest", "emulation_failure"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("vCPU 0:"), "{err}");
}

#[test]
fn config_file_and_console_file() {
    if !kvm_or_skip("config_file_and_console_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let cfg = dir.path().join("vm.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"test_guest": "smp", "machine-config": {{"vcpu_count": 2, "mem_size_mib": 32}},
                "console": {{"file": {:?}}}}}"#,
            log.display().to_string()
        ),
    )
    .unwrap();
    let out = microvmm(&["run", "--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "smp: 2 of 2 cpus done\n"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_inputs_are_reported_clearly() {
    if !kvm_or_skip("bad_inputs_are_reported_clearly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = microvmm(&["run", "--kernel", "/nonexistent/vmlinuz"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot open kernel image /nonexistent/vmlinuz"),
        "{err}"
    );

    let bad = dir.path().join("bad");
    std::fs::write(&bad, b"not a kernel").unwrap();
    let out = microvmm(&["run", "--kernel", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("neither an ELF file nor a bzImage"));

    let out = microvmm(&["run", "--mem-mib", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("guest memory size"),
        "{}",
        text(&out.stderr)
    );

    let out = microvmm(&["run", "--vcpus", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("invalid vCPU count 0"));

    let out = microvmm(&["run", "--disk", "/nonexistent/disk.img"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot open disk /nonexistent/disk.img"));
}

#[test]
fn snapshot_then_restore_in_a_new_process_continues_counting() {
    if !kvm_or_skip("snapshot_then_restore_in_a_new_process_continues_counting") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let run = |extra: &[&str], to: &std::path::Path| {
        let mut args = vec!["run", "--test-guest", "counter", "--mem-mib", "32"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            "--snapshot-after",
            "300",
            "--snapshot-to",
            to.to_str().unwrap(),
        ]);
        let out = microvmm(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("snapshot of 1 vCPU(s) and 32 MiB"),
            "{}",
            text(&out.stderr)
        );
        out
    };
    let first = run(&[], &a);
    assert!(text(&first.stdout).contains("counter: ready"));
    // The restored guest does not boot again: no banner, and its counter goes on.
    let second = run(&["--restore", a.to_str().unwrap()], &b);
    assert!(
        !text(&second.stdout).contains("counter: ready"),
        "{}",
        text(&second.stdout)
    );
    let at = vmm_test_guests::COUNTER.symbol("shared_counter").unwrap() as usize;
    let counter = |d: &std::path::Path| {
        let mem = std::fs::read(d.join("memory")).unwrap();
        u64::from_le_bytes(mem[at..at + 8].try_into().unwrap())
    };
    let (ca, cb) = (counter(&a), counter(&b));
    assert!(ca > 0 && cb > ca, "counter {ca} then {cb}");
    // A corrupt snapshot is refused with a message.
    std::fs::write(a.join("state"), b"MVMMSNAP garbage").unwrap();
    let out = microvmm(&[
        "run",
        "--test-guest",
        "counter",
        "--restore",
        a.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("snapshot"),
        "{}",
        text(&out.stderr)
    );
}

/// `microvmm ARGS` with stdout and stderr piped.
fn spawn(args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_microvmm"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The `virtio_vsock` test guest (an echo server on vsock port 1234), CID 42.
const VSOCK_GUEST: [&str; 5] = ["run", "--test-guest", "virtio_vsock", "--vsock-cid", "42"];

/// Writes `msg` on the connection and checks that the guest echoes it.
fn echo(host: &mut std::os::unix::net::UnixStream, msg: &[u8]) {
    use std::io::{Read, Write};
    host.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    host.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

/// A second process restoring `snap` with the vsock connections handed over at `ho`.
fn spawn_restorer(uds: &str, snap: &str, ho: &str) -> std::process::Child {
    spawn(
        &[
            &VSOCK_GUEST[..],
            &["--vsock-uds", uds, "--console", "null"],
            &["--restore", snap, "--handover", ho],
        ]
        .concat(),
    )
}

/// Waits for the restorer that took one connection to end well.
fn restorer_took_one(second: std::process::Child) {
    let second = second.wait_with_output().unwrap();
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert!(
        text(&second.stderr).contains("took over 1 vsock connection(s)"),
        "{}",
        text(&second.stderr)
    );
}

#[test]
fn vsock_connection_goes_on_across_a_snapshot_handover_between_two_processes() {
    use std::time::Duration;
    if !kvm_or_skip("vsock_connection_goes_on_across_a_snapshot_handover_between_two_processes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let (snap, ho, uds1, uds2) = (p("snap"), p("ho.sock"), p("v1.sock"), p("v2.sock"));
    let first = spawn(
        &[
            &VSOCK_GUEST[..],
            &["--vsock-uds", &uds1, "--snapshot-after", "10000"],
            &["--snapshot-to", &snap, "--handover", &ho],
        ]
        .concat(),
    );
    let mut host =
        vmm::handover::vsock_connect(uds1.as_ref(), 1234, Duration::from_secs(60)).unwrap();
    echo(&mut host, b"before the snapshot");
    let second = spawn_restorer(&uds2, &snap, &ho);
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(
        text(&first.stderr).contains("handed 1 vsock connection(s) over"),
        "{}",
        text(&first.stderr)
    );
    // The first process is gone; the same socket talks to the restored guest.
    echo(&mut host, b"after the restore, in another process");
    host.shutdown(std::net::Shutdown::Both).unwrap();
    restorer_took_one(second);
}

/// The same handover started through the API (`microvmm ctl snapshot DIR --vsock-handover
/// PATH`): a bad handover path is refused before anything changes, then the snapshot is
/// written, the VM stops and the restoring process takes the connection.
#[test]
fn vsock_connection_goes_on_across_a_snapshot_handover_through_the_api() {
    use std::time::{Duration, Instant};
    if !kvm_or_skip("vsock_connection_goes_on_across_a_snapshot_handover_through_the_api") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let (snap, ho, uds1, uds2, api) = (
        p("snap"),
        p("ho.sock"),
        p("v1.sock"),
        p("v2.sock"),
        p("api.sock"),
    );
    let first = spawn(
        &[
            &VSOCK_GUEST[..],
            &["--vsock-uds", &uds1, "--api-socket", &api],
        ]
        .concat(),
    );
    let end = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&api).is_err() {
        assert!(Instant::now() < end, "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let ctl = |args: &[&str]| microvmm(&[&["ctl", "--api-socket", &api][..], args].concat());
    let mut host =
        vmm::handover::vsock_connect(uds1.as_ref(), 1234, Duration::from_secs(60)).unwrap();
    echo(&mut host, b"before the snapshot");
    // Refused while running, and with a file that is not a socket at the handover path.
    let out = ctl(&["snapshot", &snap, "--vsock-handover", &ho]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("pause it first"),
        "{}",
        text(&out.stderr)
    );
    assert!(ctl(&["pause"]).status.success());
    let taken = p("taken");
    std::fs::write(&taken, b"keep me").unwrap();
    let out = ctl(&["snapshot", &snap, "--vsock-handover", &taken]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not a socket"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(&taken).unwrap(), b"keep me");
    // Nothing changed: the VM resumes and answers on the same connection.
    assert!(ctl(&["resume"]).status.success());
    echo(&mut host, b"still in the first process");
    assert!(ctl(&["pause"]).status.success());
    let second = spawn_restorer(&uds2, &snap, &ho);
    let out = ctl(&["snapshot", &snap, "--vsock-handover", &ho]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["vsock_connections"], 1, "{answer}");
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", text(&first.stderr));
    echo(&mut host, b"after the restore, in another process");
    host.shutdown(std::net::Shutdown::Both).unwrap();
    restorer_took_one(second);
}

#[test]
fn config_file_refuses_the_options_it_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.json");
    std::fs::write(&cfg, r#"{"test_guest": "hello"}"#).unwrap();
    for extra in [
        &["--vcpus", "2"][..],
        &["--mem-mib", "64"],
        &["--disk", "/x"],
        &["--cmdline", "x"],
        &["--console", "null"],
    ] {
        let mut args = vec!["run", "--config", cfg.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = microvmm(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains("cannot be used with"), "{extra:?}: {err}");
    }
}

#[test]
fn a_vsock_socket_path_that_cannot_be_used_fails_run() {
    if !kvm_or_skip("a_vsock_socket_path_that_cannot_be_used_fails_run") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A regular file at the path is neither replaced nor ignored.
    let file = dir.path().join("precious");
    std::fs::write(&file, b"keep me").unwrap();
    let guest = [
        "run",
        "--test-guest",
        "hello",
        "--vsock-cid",
        "3",
        "--vsock-uds",
    ];
    let out = microvmm(&[&guest[..], &[file.to_str().unwrap()]].concat());
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // A socket that cannot be bound (no such directory).
    let missing = dir.path().join("no/such/dir/v.sock");
    let out = microvmm(&[&guest[..], &[missing.to_str().unwrap()]].concat());
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot listen on vsock host socket"), "{err}");
}
