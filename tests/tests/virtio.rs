//! virtio devices under KVM, driven by CPL3 drivers from the test-guest kit:
//! - `virtio_blk` writes a pattern through virtio-blk into a `block` delta, flushes, reads it
//!   back; the delta's journal then holds exactly those extents, durable;
//! - `virtio_vsock` answers a connection from the host (echo), and connects out to the host.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use block::{Base, Delta, ExtentKind};
use microvmm_tests::{TestVm, kvm_or_skip};
use vm_memory::{Bytes, GuestAddress};
use vmm::StopReason;
use vmm::config::{DiskConfig, MachineConfig, VsockConfig};
use vmm_test_guests::{VIRTIO_BLK, VIRTIO_VSOCK};

const LIMIT: Duration = Duration::from_secs(60);

fn set(vm: &TestVm, sym: u64, v: u64) {
    vm.machine.memory().write_obj(v, GuestAddress(sym)).unwrap();
}

#[test]
fn guest_writes_through_virtio_blk_land_in_the_delta_journal() {
    if !kvm_or_skip("guest_writes_through_virtio_blk_land_in_the_delta_journal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = microvmm_tests::guest_with_fresh_delta("virtio_blk", dir.path(), 8 << 20);
    let mut vm = TestVm::boot(cfg).unwrap();
    set(&vm, VIRTIO_BLK.symbol("shared_sector").unwrap(), 2048);
    set(&vm, VIRTIO_BLK.symbol("shared_blocks").unwrap(), 5);
    vm.machine.start().unwrap();
    assert_eq!(vm.machine.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    assert_eq!(vm.serial_text(), "virtio-blk: ok 5\n");
    assert_eq!(vm.reports.try_recv().ok(), Some(0xb10c_0000));
    drop(vm);

    // Reopen the delta: journal recovery finds exactly the 5 blocks at sector 2048 (1 MiB).
    let delta = Delta::open(&dir.path().join("delta")).unwrap();
    let ext: Vec<(u64, u64, ExtentKind)> = delta
        .changed_since(0)
        .into_iter()
        .map(|e| (e.offset, e.len, e.kind))
        .collect();
    assert_eq!(ext, vec![(1 << 20, 5 * 4096, ExtentKind::Data)]);
    assert_eq!(
        delta.durable_seq(),
        delta.last_seq(),
        "the guest's FLUSH made it durable"
    );
    let mut b = vec![0u8; 4096];
    delta.read_at(&mut b, (1 << 20) + 2 * 4096).unwrap();
    let want: Vec<u8> = (0..4096u64).map(|i| (i * 7 + 2 * 13 + 1) as u8).collect();
    assert_eq!(b, want);
}

#[test]
fn read_only_raw_base_and_writable_raw_is_refused() {
    if !kvm_or_skip("read_only_raw_base_and_writable_raw_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("base.img");
    drop(Base::create(&img, 4 << 20).unwrap());
    let mut cfg = MachineConfig::test_guest("virtio_blk");
    cfg.disks = vec![DiskConfig {
        path: img.clone(),
        read_only: false,
    }];
    let err = TestVm::boot(cfg.clone()).unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    // Read-only: the guest driver's first write fails with an I/O error status.
    cfg.disks[0].read_only = true;
    let mut vm = TestVm::boot(cfg).unwrap();
    vm.machine.start().unwrap();
    assert_eq!(vm.machine.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    assert_eq!(vm.serial_text(), "virtio-blk: FAIL 10\n");
}

fn vsock_vm(dir: &Path, mode: u64, port: u64) -> TestVm {
    let mut cfg = MachineConfig::test_guest("virtio_vsock");
    cfg.vsock = Some(VsockConfig {
        guest_cid: 42,
        uds_path: dir.join("v.sock"),
    });
    let vm = TestVm::boot(cfg).unwrap();
    set(&vm, VIRTIO_VSOCK.symbol("shared_mode").unwrap(), mode);
    set(&vm, VIRTIO_VSOCK.symbol("shared_port").unwrap(), port);
    vm
}

#[test]
fn host_connects_to_a_guest_echo_server_over_vsock() {
    if !kvm_or_skip("host_connects_to_a_guest_echo_server_over_vsock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut vm = vsock_vm(dir.path(), 0, 1234);
    vm.machine.start().unwrap();
    // The host side listens once the guest driver has activated the device.
    let mut s = vmm::handover::vsock_connect(&dir.path().join("v.sock"), 1234, LIMIT).unwrap();
    let msg: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg, "echoed byte for byte");
    s.shutdown(std::net::Shutdown::Both).unwrap();
    assert_eq!(vm.machine.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    assert_eq!(vm.serial_text(), "virtio-vsock: ok\n");
    let echoed: u64 = vm
        .machine
        .memory()
        .read_obj(GuestAddress(VIRTIO_VSOCK.symbol("shared_echoed").unwrap()))
        .unwrap();
    assert_eq!(echoed, msg.len() as u64);
}

#[test]
fn guest_connects_out_to_the_host_over_vsock() {
    if !kvm_or_skip("guest_connects_out_to_the_host_over_vsock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("v.sock_5678")).unwrap();
    let mut vm = vsock_vm(dir.path(), 1, 5678);
    vm.machine.start().unwrap();
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let mut got = [0u8; 16];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping from guest\n");
    s.write_all(b"pong from host\n").unwrap();
    assert_eq!(vm.machine.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    assert_eq!(vm.serial_text(), "virtio-vsock: ok\n");
    // The guest shut the connection down: the host sees EOF.
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0);
}
