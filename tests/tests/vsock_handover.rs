//! A vsock connection survives a snapshot and a restore in a new process: the saving process
//! hands its host socket over (`Machine::save_snapshot_handover`, `VsockHandover::send`), the
//! restoring process takes it (`Machine::restore_snapshot_handover`), and the host peer's
//! stream goes on byte-exact, with bytes that were in flight at the snapshot, and no reset.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use devices::legacy::{SerialOutput, SharedBuffer};
use microvmm_tests::{TestVm, kvm_or_skip};
use vm_memory::{Bytes, GuestAddress};
use vmm::config::{MachineConfig, VsockConfig};
use vmm::handover::VsockHandover;
use vmm::{Machine, StopReason};
use vmm_test_guests::VIRTIO_VSOCK;

const LIMIT: Duration = Duration::from_secs(60);
const CID: u64 = 42;

fn config(uds: &Path) -> MachineConfig {
    let mut cfg = MachineConfig::test_guest("virtio_vsock");
    cfg.vsock = Some(VsockConfig {
        guest_cid: CID,
        uds_path: uds.to_owned(),
    });
    cfg
}

fn sym(name: &'static str) -> GuestAddress {
    GuestAddress(VIRTIO_VSOCK.symbol(name).unwrap())
}

fn pattern(from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|i| (i % 251) as u8).collect()
}

/// Run by the parent test in a new process: receives the sockets, restores, runs the guest
/// until it powers off (the host shut the connection down), prints what it saw.
#[test]
#[ignore = "child process of vsock_connection_survives_snapshot_restore_in_a_new_process"]
fn child_restores_vsock_handover() {
    let (Ok(snap), Ok(sock), Ok(uds)) = (
        std::env::var("MICROVMM_HO_SNAPSHOT"),
        std::env::var("MICROVMM_HO_SOCKET"),
        std::env::var("MICROVMM_HO_UDS"),
    ) else {
        println!("SKIP: child_restores_vsock_handover: run by its parent test only");
        return;
    };
    let mut s = UnixStream::connect(&sock).unwrap();
    let handover = VsockHandover::receive(&mut s).unwrap();
    println!("child: received {} socket(s)", handover.len());
    let console = SharedBuffer::default();
    let mut m = Machine::restore_snapshot_handover(
        config(Path::new(&uds)),
        Some(SerialOutput::Buffer(console.clone())),
        Path::new(&snap),
        handover,
    )
    .unwrap();
    m.start().unwrap();
    s.write_all(b"started\n").unwrap();
    assert_eq!(m.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    let echoed: u64 = m.memory().read_obj(sym("shared_echoed")).unwrap();
    println!("child: echoed {echoed}");
    let serial = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    println!("child: serial {serial:?}");
}

#[test]
fn vsock_connection_survives_snapshot_restore_in_a_new_process() {
    if !kvm_or_skip("vsock_connection_survives_snapshot_restore_in_a_new_process") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let mut vm = TestVm::boot(config(&uds)).unwrap();
    vm.machine
        .memory()
        .write_obj(0u64, sym("shared_mode"))
        .unwrap();
    vm.machine
        .memory()
        .write_obj(1234u64, sym("shared_port"))
        .unwrap();
    vm.machine.start().unwrap();
    let mut host = vmm::handover::vsock_connect(&uds, 1234, LIMIT).unwrap();
    // Some traffic, then bytes still in flight when the VM pauses.
    let first = pattern(0, 1000);
    host.write_all(&first).unwrap();
    let mut back = vec![0u8; first.len()];
    host.read_exact(&mut back).unwrap();
    assert_eq!(back, first);
    let in_flight = pattern(1000, 3000);
    host.write_all(&in_flight).unwrap();
    vm.machine.pause().unwrap();

    let snap = dir.path().join("snap");
    let (_, handover) = vm.machine.save_snapshot_handover(&snap).unwrap();
    assert_eq!(handover.len(), 1, "one connection handed over");
    // A handover that does not match the snapshot is refused before any VM is built.
    for (cfg, fds) in [
        (config(&dir.path().join("x.sock")), VsockHandover::default()),
        (
            MachineConfig::test_guest("virtio_vsock"),
            VsockHandover::default(),
        ),
    ] {
        let err = Machine::restore_snapshot_handover(cfg, None, &snap, fds).unwrap_err();
        assert!(
            matches!(
                err,
                vmm::MachineError::Handover(vmm::handover::HandoverError::Mismatch(_))
            ),
            "{err:?}"
        );
    }
    vm.machine.stop().unwrap();
    drop(vm);

    let ho_path = dir.path().join("handover.sock");
    let listener = UnixListener::bind(&ho_path).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_restores_vsock_handover",
            "--ignored",
            "--nocapture",
        ])
        .env("MICROVMM_HO_SNAPSHOT", &snap)
        .env("MICROVMM_HO_SOCKET", &ho_path)
        .env("MICROVMM_HO_UDS", dir.path().join("v2.sock"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut to_child, _) = listener.accept().unwrap();
    handover.send(&mut to_child).unwrap();
    drop(handover); // this process's copy of the socket is gone now
    to_child.set_read_timeout(Some(LIMIT)).unwrap();
    let mut started = [0u8; 8];
    to_child.read_exact(&mut started).unwrap();
    assert_eq!(&started, b"started\n");

    // The same host socket: the in-flight bytes come back, then more traffic.
    let mut back = vec![0u8; in_flight.len()];
    host.read_exact(&mut back).unwrap();
    assert!(back == in_flight, "in-flight bytes echoed exactly");
    let after = pattern(4000, 10_000);
    host.write_all(&after).unwrap();
    let mut back = vec![0u8; after.len()];
    host.read_exact(&mut back).unwrap();
    assert!(back == after, "bytes after the restore echoed exactly");
    host.shutdown(std::net::Shutdown::Both).unwrap();

    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("child: received 1 socket(s)"), "{text}");
    assert!(text.contains("child: echoed 14000"), "{text}");
    assert!(
        text.contains(r#"child: serial "virtio-vsock: ok\n""#),
        "{text}"
    );
}
