//! VM lifecycle under KVM with the `counter` test guest: 1000 pause/resume cycles driven from
//! another thread, full snapshot to files and restore into a fresh machine, typed errors for
//! corrupt or wrong-version snapshots, and a live in-process clone that continues from the
//! clone instant while the original goes on.

use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use devices::legacy::{SerialOutput, SharedBuffer};
use microvmm_tests::{TestVm, kvm_or_skip};
use vm_memory::{Bytes, GuestAddress};
use vmm::config::MachineConfig;
use vmm::machine::CloneOptions;
use vmm::snapfile::SnapshotFileError;
use vmm::snapshot::SnapshotError;
use vmm::{Machine, MachineError, StopReason};
use vmm_test_guests::{COUNTER, CounterProbe, REPORT_PORT, REPORT_PORT_LEN, ReportDevice};

const LIMIT: Duration = Duration::from_secs(60);

fn counter_addr() -> GuestAddress {
    GuestAddress(COUNTER.symbol("shared_counter").unwrap())
}

fn peek(m: &Machine) -> u64 {
    m.memory().read_obj::<u64>(counter_addr()).unwrap()
}

/// Waits until the counter in `m` passes `v`.
fn wait_past(m: &Machine, v: u64, what: &str) -> u64 {
    let start = Instant::now();
    loop {
        let now = peek(m);
        if now > v {
            return now;
        }
        assert!(start.elapsed() < LIMIT, "{what}: counter stuck at {now}");
        std::thread::yield_now();
    }
}

fn take_reports(vm: &mut TestVm) -> Receiver<u64> {
    std::mem::replace(&mut vm.reports, channel().1)
}

/// A started one-vCPU counter VM whose guest has printed its banner.
fn counter_vm(vcpus: u8) -> TestVm {
    let vm = TestVm::start_guest("counter", vcpus).unwrap();
    assert!(
        vm.wait_serial("counter: ready\n", LIMIT),
        "{}",
        vm.serial_text()
    );
    vm
}

/// Attaches the report device to a machine not yet started.
fn with_reports(m: &Machine) -> Receiver<u64> {
    let (dev, rx) = ReportDevice::new();
    m.pio_bus()
        .insert(REPORT_PORT, REPORT_PORT_LEN, dev)
        .unwrap();
    rx
}

#[test]
fn thousand_pause_resume_cycles_from_another_thread_lose_and_repeat_nothing() {
    if !kvm_or_skip("thousand_pause_resume_cycles_from_another_thread_lose_and_repeat_nothing") {
        return;
    }
    // Two vCPUs count in the same variable (no reports: both would answer a request).
    let vm = TestVm::start_guest("counter", 2).unwrap();
    let machine = vm.machine;
    // The pauses and resumes come from a thread that did not create the machine.
    let driver = std::thread::spawn(move || {
        let mut m = machine;
        let mut last = 0;
        for i in 0..1000 {
            let resumed_at = last;
            last = wait_past(&m, last, &format!("cycle {i}"));
            m.pause().unwrap();
            if i % 10 == 0 {
                m.pause().unwrap(); // idempotent
            }
            let frozen = peek(&m);
            assert!(
                frozen >= last && last > resumed_at,
                "cycle {i}: counter went back"
            );
            std::thread::sleep(Duration::from_micros(100));
            assert_eq!(peek(&m), frozen, "cycle {i}: counting while paused");
            last = frozen;
            m.resume().unwrap();
            if i % 10 == 0 {
                m.resume().unwrap(); // idempotent
            }
        }
        assert_eq!(m.stop().unwrap(), StopReason::Stopped);
    });
    driver.join().unwrap();
}

#[test]
fn snapshot_restores_into_a_fresh_vm_and_counting_continues() {
    if !kvm_or_skip("snapshot_restores_into_a_fresh_vm_and_counting_continues") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let mut vm = counter_vm(1);
    let probe = CounterProbe::new(vm.machine.memory().clone(), take_reports(&mut vm)).unwrap();
    let before = probe.request(LIMIT).unwrap();
    wait_past(&vm.machine, before, "before the snapshot");
    vm.machine.pause().unwrap();
    let saved = peek(&vm.machine);
    let meta = vm.machine.save_snapshot(&snap).unwrap();
    assert_eq!(meta.vcpus, 1);
    assert_eq!(meta.mem_size, 64 << 20);
    // The original goes on and is then powered off; the snapshot does not depend on it.
    vm.machine.resume().unwrap();
    wait_past(&vm.machine, saved, "the original after the snapshot");
    probe.stop(LIMIT).unwrap();
    assert_eq!(vm.machine.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    drop(vm);

    let serial = SharedBuffer::default();
    let mut m = Machine::restore_snapshot(
        MachineConfig::test_guest("counter"),
        Some(SerialOutput::Buffer(serial.clone())),
        &snap,
    )
    .unwrap();
    assert_eq!(peek(&m), saved, "restored RAM holds the saved counter");
    let reports = with_reports(&m);
    m.start().unwrap();
    let moved = wait_past(&m, saved, "the restored VM");
    let probe = CounterProbe::new(m.memory().clone(), reports).unwrap();
    let r = probe.request(LIMIT).unwrap();
    assert!(
        r >= moved,
        "the restored guest answers on its port: {r} < {moved}"
    );
    let last = probe.stop(LIMIT).unwrap();
    assert!(last >= r);
    assert_eq!(m.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    // The banner was printed before the snapshot, never by the restored guest.
    let text = String::from_utf8_lossy(&serial.lock().unwrap()).into_owned();
    assert!(!text.contains("counter: ready"), "{text}");
}

#[test]
fn two_vcpu_snapshot_restores_each_vcpu_state() {
    if !kvm_or_skip("two_vcpu_snapshot_restores_each_vcpu_state") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let mut vm = TestVm::start_guest("counter", 2).unwrap();
    wait_past(&vm.machine, 1000, "before the snapshot");
    vm.machine.pause().unwrap();
    let saved = peek(&vm.machine);
    let state = vm.machine.capture_state().unwrap();
    assert_eq!(vm.machine.save_snapshot(&snap).unwrap().vcpus, 2);
    vm.machine.stop().unwrap();
    drop(vm);
    // Two vCPUs both in the counting loop: different stacks, same loop.
    assert_ne!(state.vcpus[0].regs.rsp, state.vcpus[1].regs.rsp);
    // The MSRs include the TSC, the TSC deadline and kvmclock's.
    for v in &state.vcpus {
        for index in [0x10, 0x6e0, 0x4b56_4d00, 0x4b56_4d01] {
            assert!(
                v.msrs.iter().any(|m| m.index == index),
                "vCPU {}: MSR {index:#x} not saved",
                v.id
            );
        }
    }

    let mut m = Machine::restore_snapshot(
        MachineConfig::test_guest("counter"),
        Some(SerialOutput::Sink),
        &snap,
    )
    .unwrap();
    assert_eq!(m.config().vcpus, 2);
    for (v, s) in m.vcpus().iter().zip(&state.vcpus) {
        let regs = v.fd().get_regs().unwrap();
        let sregs = v.fd().get_sregs().unwrap();
        assert_eq!(
            (
                regs.rip,
                regs.rsp,
                regs.rbx,
                regs.r12,
                sregs.cr3,
                sregs.tr.selector
            ),
            (
                s.regs.rip,
                s.regs.rsp,
                s.regs.rbx,
                s.regs.r12,
                s.sregs.cr3,
                s.sregs.tr.selector
            ),
            "vCPU {}",
            v.id()
        );
        assert_eq!(
            v.fd().get_lapic().unwrap().regs,
            s.lapic.regs,
            "vCPU {}",
            v.id()
        );
        // Non-clock MSRs come back as saved (the TSC moves on by itself).
        let keep: Vec<_> = s
            .msrs
            .iter()
            .filter(|m| [0x277, 0x6e0, 0x4b56_4d01, 0xc000_0081].contains(&m.index))
            .collect();
        let indices: Vec<u32> = keep.iter().map(|m| m.index).collect();
        let got = vmm::snapshot::read_msrs(v.fd(), v.id(), &indices).unwrap();
        assert_eq!(got.len(), keep.len());
        for (got, want) in got.iter().zip(&keep) {
            assert_eq!((got.index, got.data), (want.index, want.data));
        }
    }
    m.start().unwrap();
    wait_past(&m, saved, "the restored two-vCPU VM");
    assert_eq!(m.stop().unwrap(), StopReason::Stopped);
}

#[test]
fn corrupt_and_wrong_version_snapshots_are_typed_errors() {
    if !kvm_or_skip("corrupt_and_wrong_version_snapshots_are_typed_errors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let mut vm = counter_vm(1);
    vm.machine.pause().unwrap();
    vm.machine.save_snapshot(&snap).unwrap();
    vm.machine.stop().unwrap();
    let restore = |d: &std::path::Path| {
        Machine::restore_snapshot(
            MachineConfig::test_guest("counter"),
            Some(SerialOutput::Sink),
            d,
        )
    };
    let state = snap.join(vmm::snapshot::STATE_FILE);
    let memory = snap.join(vmm::snapshot::MEMORY_FILE);
    let good_state = std::fs::read(&state).unwrap();

    // A flipped byte in a section.
    let mut bad = good_state.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(&state, &bad).unwrap();
    let err = restore(&snap).unwrap_err();
    assert!(
        matches!(
            err,
            MachineError::Snapshot(SnapshotError::File(SnapshotFileError::Corrupt { .. }))
        ),
        "{err:?}"
    );

    // A future format version.
    let mut bad = good_state.clone();
    bad[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&state, &bad).unwrap();
    let err = restore(&snap).unwrap_err();
    assert!(
        matches!(
            err,
            MachineError::Snapshot(SnapshotError::File(SnapshotFileError::UnsupportedVersion {
                found: 99,
                ..
            }))
        ),
        "{err:?}"
    );

    // Memory changed behind the state's back.
    std::fs::write(&state, &good_state).unwrap();
    let mut mem = std::fs::read(&memory).unwrap();
    mem[0x10_0000] ^= 1;
    std::fs::write(&memory, &mem).unwrap();
    let err = restore(&snap).unwrap_err();
    assert!(
        matches!(
            err,
            MachineError::Snapshot(SnapshotError::MemoryMismatch { .. })
        ),
        "{err:?}"
    );
    // And a truncated memory file.
    mem[0x10_0000] ^= 1;
    std::fs::write(&memory, &mem[..mem.len() - 4096]).unwrap();
    let err = restore(&snap).unwrap_err();
    assert!(
        matches!(
            err,
            MachineError::Snapshot(SnapshotError::MemoryMismatch { .. })
        ),
        "{err:?}"
    );
    // Restored intact, it works.
    std::fs::write(&memory, &mem).unwrap();
    assert!(restore(&snap).is_ok());

    // Well-formed containers with bad contents: undecodable or inconsistent sections.
    let good = vmm::snapfile::SnapshotReader::parse(&good_state).unwrap();
    let rewrite = |replace: &str, with: &[u8]| {
        let mut w = vmm::snapfile::SnapshotWriter::new();
        for name in ["meta", "vcpus", "vm", "devices"] {
            let payload = if name == replace {
                with.to_vec()
            } else {
                good.section(name).unwrap().to_vec()
            };
            w.section(name, payload);
        }
        w.write(&state).unwrap();
        restore(&snap).unwrap_err()
    };
    let err = rewrite("vcpus", b"{not json");
    assert!(
        matches!(
            err,
            MachineError::Snapshot(SnapshotError::Decode {
                section: "vcpus",
                ..
            })
        ),
        "{err:?}"
    );
    let err = rewrite("vcpus", b"[]");
    assert!(
        matches!(err, MachineError::Snapshot(SnapshotError::Mismatch(_))),
        "{err:?}"
    );
    let err = rewrite("devices", b"{}");
    assert!(
        matches!(
            err,
            MachineError::Snapshot(SnapshotError::Decode {
                section: "devices",
                ..
            })
        ),
        "{err:?}"
    );
    std::fs::write(&state, &good_state).unwrap();
    assert!(restore(&snap).is_ok());
}

#[test]
fn live_clone_continues_from_the_clone_instant_and_diverges() {
    if !kvm_or_skip("live_clone_continues_from_the_clone_instant_and_diverges") {
        return;
    }
    let mut vm = counter_vm(1);
    let probe = CounterProbe::new(vm.machine.memory().clone(), take_reports(&mut vm)).unwrap();
    let a = probe.request(LIMIT).unwrap();
    let before = wait_past(&vm.machine, a, "before the clone");
    // Wrong uses are typed errors: disk directories that do not match the disks, a paused source.
    let mut opts = CloneOptions::new(MachineConfig::test_guest("counter"));
    opts.disk_dirs = vec![("a".into(), "b".into())];
    let err = vm.machine.clone_running(opts).unwrap_err();
    assert!(
        matches!(
            err,
            MachineError::Clone(vmm::machine::CloneError::DiskDirs { pairs: 1, disks: 0 })
        ),
        "{err:?}"
    );
    vm.machine.pause().unwrap();
    let err = vm
        .machine
        .clone_running(CloneOptions::new(MachineConfig::test_guest("counter")))
        .unwrap_err();
    assert!(
        matches!(err, MachineError::InvalidTransition { .. }),
        "{err:?}"
    );
    vm.machine.resume().unwrap();

    let serial = SharedBuffer::default();
    let mut opts = CloneOptions::new(MachineConfig::test_guest("counter"));
    opts.console = Some(SerialOutput::Buffer(serial.clone()));
    let (mut clone, tl) = vm.machine.clone_running(opts).unwrap();
    let after = peek(&vm.machine);
    println!("clone timeline: {tl:?}");
    assert!(!tl.rounds.is_empty());
    assert_eq!(
        tl.rounds[0].pages,
        (64 << 20) / 4096,
        "round 0 copies all RAM"
    );
    assert!(tl.pause <= tl.total);

    // The clone holds the counter of one instant between the two reads of the original.
    let at_clone = peek(&clone);
    assert!(
        before <= at_clone && at_clone <= after,
        "clone value {at_clone} not within [{before}, {after}]"
    );
    // The original kept running during and after the clone.
    let orig_moved = wait_past(&vm.machine, after, "the original after the clone");

    let reports = with_reports(&clone);
    clone.start().unwrap();
    wait_past(&clone, at_clone, "the clone");
    let cprobe = CounterProbe::new(clone.memory().clone(), reports).unwrap();
    let c1 = cprobe.request(LIMIT).unwrap();
    assert!(c1 > at_clone);

    // They diverge: the original powers off, the clone goes on counting and answering.
    let o_last = probe.stop(LIMIT).unwrap();
    assert!(o_last >= orig_moved);
    assert_eq!(vm.machine.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    let c2 = wait_past(&clone, c1, "the clone after the original stopped");
    let c3 = cprobe.request(LIMIT).unwrap();
    assert!(c3 >= c2);
    cprobe.stop(LIMIT).unwrap();
    assert_eq!(clone.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
}

/// Reads the u64 stamp at the start of `block` (4 KiB blocks from 1 MiB) of `disk`.
fn stamp(disk: &dyn block::Disk, block: u64) -> u64 {
    let mut b = [0u8; 4096];
    disk.read_at(&mut b, (1 << 20) + block * 4096).unwrap();
    let s = u64::from_le_bytes(b[..8].try_into().unwrap());
    assert!(
        b.chunks(8).all(|c| c == &b[..8]),
        "block {block} is torn: {:x?}",
        &b[..32]
    );
    s
}

/// The stamps the looping `virtio_blk` guest leaves when write `last` was its last one.
fn expected_stamps(last: u64, blocks: u64, tag: u64) -> Vec<u64> {
    (0..blocks)
        .map(|j| {
            // The largest g <= last with (g - 1) % blocks == j.
            let g = last - ((last - 1 - j) % blocks);
            g | tag << 48
        })
        .collect()
}

#[test]
fn clone_of_a_disk_writing_vm_sees_the_disk_of_the_clone_instant() {
    use block::Delta;
    use vmm_test_guests::VIRTIO_BLK;
    if !kvm_or_skip("clone_of_a_disk_writing_vm_sees_the_disk_of_the_clone_instant") {
        return;
    }
    const BLOCKS: u64 = 16;
    let dir = tempfile::tempdir().unwrap();
    let cfg = microvmm_tests::guest_with_fresh_delta("virtio_blk", dir.path(), 8 << 20);
    let sym = |n| GuestAddress(VIRTIO_BLK.symbol(n).unwrap());
    let set = |m: &Machine, n, v: u64| m.memory().write_obj(v, sym(n)).unwrap();
    let get = |m: &Machine, n| m.memory().read_obj::<u64>(sym(n)).unwrap();
    let wait_written = |m: &Machine, v: u64| {
        let start = Instant::now();
        while get(m, "shared_written") < v {
            assert!(start.elapsed() < LIMIT, "the guest does not write");
            std::thread::sleep(Duration::from_millis(1));
        }
    };

    let mut vm = TestVm::boot(cfg).unwrap();
    set(&vm.machine, "shared_sector", 2048);
    set(&vm.machine, "shared_blocks", BLOCKS);
    set(&vm.machine, "shared_loop", 1);
    vm.machine.start().unwrap();
    wait_written(&vm.machine, 2 * BLOCKS);

    // A clone whose disk fork cannot be prepared (the clone's directory exists) fails before
    // anything changes: the disk is not frozen, the guest goes on writing it, nothing is left.
    std::fs::create_dir(dir.path().join("clone")).unwrap();
    let mut opts = CloneOptions::new(MachineConfig::test_guest("virtio_blk"));
    opts.disk_dirs = vec![(dir.path().join("active"), dir.path().join("clone"))];
    let err = vm.machine.clone_running(opts).unwrap_err();
    assert!(
        matches!(
            err,
            MachineError::Disk {
                source: block::BlockError::Exists { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!dir.path().join("active").exists());
    let disk = vm.machine.disks()[0].layer.clone();
    assert_eq!(disk.as_delta().unwrap().frozen_seq(), None);
    let before = get(&vm.machine, "shared_written");
    wait_written(&vm.machine, before + BLOCKS);
    drop(disk);
    std::fs::remove_dir(dir.path().join("clone")).unwrap();

    let mut opts = CloneOptions::new(MachineConfig::test_guest("virtio_blk"));
    opts.console = Some(SerialOutput::Sink);
    opts.disk_dirs = vec![(dir.path().join("active"), dir.path().join("clone"))];
    let (mut clone, tl) = vm.machine.clone_running(opts).unwrap();
    println!("disk clone timeline: {tl:?}");
    let g = get(&clone, "shared_written");
    assert!(g >= 2 * BLOCKS);

    // The active VM goes on writing (into its own new child) for more than a full cycle.
    wait_written(&vm.machine, g + 3 * BLOCKS);
    let clone_disk = clone.disks()[0].layer.clone();
    let active_disk = vm.machine.disks()[0].layer.clone();
    assert_eq!(
        clone_disk.as_delta().unwrap().changed_since(0).len(),
        0,
        "nothing wrote the clone's delta"
    );
    assert!(!active_disk.as_delta().unwrap().changed_since(0).is_empty());
    // The clone's disk is the disk of the clone instant: write g done, or g + 1 if the device
    // had completed it before the guest saw it (the guest's ring in the clone then says so too).
    let seen: Vec<u64> = (0..BLOCKS).map(|j| stamp(clone_disk.as_ref(), j)).collect();
    let last = seen.iter().max().copied().unwrap();
    assert!(
        last == g || last == g + 1,
        "clone disk at {last}, memory at {g}"
    );
    assert_eq!(seen, expected_stamps(last, BLOCKS, 0));
    // Read while the active VM writes: a block may be mid-rewrite, so look at its first stamp
    // only (every write since the clone carries a stamp above `last`).
    let active_now: Vec<u64> = (0..BLOCKS)
        .map(|j| {
            let mut b = [0u8; 512];
            block::Disk::read_at(active_disk.as_ref(), &mut b, (1 << 20) + j * 4096).unwrap();
            u64::from_le_bytes(b[..8].try_into().unwrap())
        })
        .collect();
    assert!(
        active_now.iter().all(|&s| s > last),
        "{active_now:?} vs {last}"
    );

    // The clone runs with its own tag; its writes stay in its delta.
    set(&clone, "shared_tag", 1);
    let reports = with_reports(&clone);
    clone.start().unwrap();
    wait_written(&clone, g + 2 * BLOCKS);
    set(&clone, "shared_stop", 1);
    let clone_last = reports.recv_timeout(LIMIT).unwrap();
    assert_eq!(clone.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    set(&vm.machine, "shared_stop", 1);
    assert_eq!(vm.machine.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    let active_last = vm.reports.recv_timeout(LIMIT).unwrap();

    assert_eq!(
        (0..BLOCKS)
            .map(|j| stamp(clone_disk.as_ref(), j))
            .collect::<Vec<_>>(),
        expected_stamps(clone_last, BLOCKS, 1),
        "the clone's disk holds its own writes"
    );
    assert_eq!(
        (0..BLOCKS)
            .map(|j| stamp(active_disk.as_ref(), j))
            .collect::<Vec<_>>(),
        expected_stamps(active_last, BLOCKS, 0),
        "the active disk holds only the active VM's writes"
    );
    // The frozen parent still reads as the clone instant.
    let parent = Delta::open_read_only(&dir.path().join("delta")).unwrap();
    let frozen: Vec<u64> = (0..BLOCKS).map(|j| stamp(&parent, j)).collect();
    assert_eq!(frozen, expected_stamps(last, BLOCKS, 0));
    drop(parent);

    // The fork was cut in the pause and committed after it: both children reopen from disk
    // (meta written, parent frozen on disk) with everything flushed into them.
    block::Disk::flush(clone_disk.as_ref()).unwrap();
    block::Disk::flush(active_disk.as_ref()).unwrap();
    drop((clone, clone_disk, active_disk, vm));
    for (name, tag, last) in [("clone", 1, clone_last), ("active", 0, active_last)] {
        let d = Delta::open(&dir.path().join(name)).unwrap();
        let stamps: Vec<u64> = (0..BLOCKS).map(|j| stamp(&d, j)).collect();
        assert_eq!(
            stamps,
            expected_stamps(last, BLOCKS, tag),
            "{name} reopened"
        );
    }
}

#[test]
fn clone_gets_its_own_vsock_cid_and_socket() {
    use vmm::config::VsockConfig;
    if !kvm_or_skip("clone_gets_its_own_vsock_cid_and_socket") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = MachineConfig::test_guest("counter");
    cfg.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: dir.path().join("active.sock"),
    });
    let mut vm = TestVm::boot(cfg).unwrap();
    vm.machine.start().unwrap();
    wait_past(&vm.machine, 0, "the source");
    let mut clone_cfg = MachineConfig::test_guest("counter");
    clone_cfg.vsock = Some(VsockConfig {
        guest_cid: 4,
        uds_path: dir.path().join("clone.sock"),
    });
    let mut opts = CloneOptions::new(clone_cfg);
    opts.console = Some(SerialOutput::Sink);
    let (mut clone, _) = vm.machine.clone_running(opts).unwrap();
    // The guest reads its CID from the device's config space (offset 0x100 of the window).
    let cid = |m: &Machine| {
        let mut b = [0u8; 8];
        assert!(
            m.mmio_bus()
                .read(m.virtio_devices()[0].addr + 0x100, &mut b)
        );
        u64::from_le_bytes(b)
    };
    assert_eq!(cid(&vm.machine), 3);
    assert_eq!(cid(&clone), 4);
    // A clone without the source's devices is refused.
    let mut opts = CloneOptions::new(MachineConfig::test_guest("counter"));
    opts.console = Some(SerialOutput::Sink);
    let err = vm.machine.clone_running(opts).unwrap_err();
    assert!(
        matches!(
            err,
            MachineError::Clone(vmm::machine::CloneError::Devices { .. })
        ),
        "{err:?}"
    );
    clone.start().unwrap();
    wait_past(&clone, peek(&clone), "the clone");
    assert_eq!(clone.stop().unwrap(), StopReason::Stopped);
    assert_eq!(vm.machine.stop().unwrap(), StopReason::Stopped);
}

/// Child half of [`snapshot_restores_in_a_new_process`]: restores the snapshot named by
/// `MICROVMM_SNAPSHOT_DIR` and checks the counter goes on from `MICROVMM_SNAPSHOT_COUNTER`.
#[test]
#[ignore = "run by snapshot_restores_in_a_new_process in a child process"]
fn child_restores_snapshot_from_env() {
    let (Ok(dir), Ok(saved)) = (
        std::env::var("MICROVMM_SNAPSHOT_DIR"),
        std::env::var("MICROVMM_SNAPSHOT_COUNTER"),
    ) else {
        println!("SKIP: child_restores_snapshot_from_env: run by its parent test only");
        return;
    };
    let saved: u64 = saved.parse().unwrap();
    let mut m = Machine::restore_snapshot(
        MachineConfig::test_guest("counter"),
        Some(SerialOutput::Sink),
        std::path::Path::new(&dir),
    )
    .unwrap();
    assert_eq!(peek(&m), saved);
    let reports = with_reports(&m);
    m.start().unwrap();
    let moved = wait_past(&m, saved, "the restored VM");
    let probe = CounterProbe::new(m.memory().clone(), reports).unwrap();
    let last = probe.stop(LIMIT).unwrap();
    assert!(last >= moved, "{last} after {moved}");
    assert_eq!(m.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    println!("restored counter went on from {saved} to {last}");
}

#[test]
fn snapshot_restores_in_a_new_process() {
    if !kvm_or_skip("snapshot_restores_in_a_new_process") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let mut vm = counter_vm(1);
    wait_past(&vm.machine, 1000, "before the snapshot");
    vm.machine.pause().unwrap();
    let saved = peek(&vm.machine);
    vm.machine.save_snapshot(&snap).unwrap();
    vm.machine.stop().unwrap();
    drop(vm);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_restores_snapshot_from_env",
            "--ignored",
            "--nocapture",
        ])
        .env("MICROVMM_SNAPSHOT_DIR", &snap)
        .env("MICROVMM_SNAPSHOT_COUNTER", saved.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("restored counter went on from {saved} to ")),
        "{text}"
    );
}

#[test]
fn clone_of_a_vm_with_a_read_only_disk_is_refused_up_front() {
    if !kvm_or_skip("clone_of_a_vm_with_a_read_only_disk_is_refused_up_front") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    drop(block::Base::create(&dir.path().join("base.img"), 1 << 20).unwrap());
    let mut cfg = MachineConfig::test_guest("counter");
    cfg.disks = vec![vmm::config::DiskConfig {
        path: dir.path().join("base.img"),
        read_only: true,
    }];
    let mut vm = TestVm::boot(cfg).unwrap();
    vm.machine.start().unwrap();
    let mut opts = CloneOptions::new(MachineConfig::test_guest("counter"));
    opts.disk_dirs = vec![(dir.path().join("a"), dir.path().join("b"))];
    let err = vm.machine.clone_running(opts).unwrap_err();
    assert!(
        matches!(
            err,
            MachineError::Clone(vmm::machine::CloneError::ReadOnlyDisk(_))
        ),
        "{err:?}"
    );
    assert!(!dir.path().join("a").exists() && !dir.path().join("b").exists());
    // The VM still runs.
    wait_past(&vm.machine, peek(&vm.machine), "after the refused clone");
    vm.machine.stop().unwrap();
}

/// A report-port device that holds the vCPU in its exit while `hold` is set (a device model
/// stuck in I/O).
struct HoldingDevice {
    hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
    entered: std::sync::mpsc::Sender<()>,
}

impl devices::bus::BusDevice for HoldingDevice {
    fn name(&self) -> &str {
        "holding"
    }
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        let _ = self.entered.send(());
        while self.hold.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn a_pause_a_vcpu_does_not_acknowledge_leaves_the_machine_running_and_can_be_retried() {
    if !kvm_or_skip("a_pause_a_vcpu_does_not_acknowledge") {
        return;
    }
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut cfg = MachineConfig::test_guest("counter");
    cfg.vcpus = 2;
    let mut m = Machine::new(cfg, Some(SerialOutput::Buffer(SharedBuffer::default()))).unwrap();
    let hold = Arc::new(AtomicBool::new(true));
    let (entered_tx, entered) = channel();
    m.pio_bus()
        .insert(
            REPORT_PORT,
            REPORT_PORT_LEN,
            Arc::new(std::sync::Mutex::new(HoldingDevice {
                hold: hold.clone(),
                entered: entered_tx,
            })),
        )
        .unwrap();
    m.boot().unwrap();
    m.start().unwrap();
    m.set_vcpu_ack_timeout(Duration::from_millis(300));
    wait_past(&m, 10, "start");
    // Ask the guest for a report: one vCPU writes the report port and is held there.
    let request = GuestAddress(COUNTER.symbol("shared_request").unwrap());
    m.memory().write_obj(1u64, request).unwrap();
    entered.recv_timeout(LIMIT).expect("the guest reports");
    let err = m.pause().unwrap_err();
    assert!(
        matches!(err, MachineError::VcpuHandle(_)),
        "a typed timeout, not {err:?}"
    );
    assert_eq!(m.state(), vmm::machine::VmState::Running);
    // The device lets go: the late vCPU answers the old pause, then the undo, and runs on.
    hold.store(false, Ordering::SeqCst);
    let v = peek(&m);
    wait_past(&m, v, "after the failed pause");
    // The next pause works, and stops the counter.
    m.set_vcpu_ack_timeout(Duration::from_secs(5));
    m.pause().unwrap();
    assert_eq!(m.state(), vmm::machine::VmState::Paused);
    let v = peek(&m);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(peek(&m), v, "paused: the counter stands");
    m.resume().unwrap();
    wait_past(&m, v, "after the resume");
    m.stop().unwrap();
}

/// The counter guest with the vsock device of the committed version 1 snapshot
/// (`tests/data/snapshot-v1-counter`, written by `microvmm run --test-guest counter --mem-mib 4
/// --vsock-cid 3 ... --snapshot-after 300` before the format moved to version 2).
fn v1_config(dir: &std::path::Path) -> MachineConfig {
    let mut cfg = MachineConfig::test_guest("counter");
    cfg.console = vmm::config::ConsoleTarget::Null;
    cfg.vsock = Some(vmm::config::VsockConfig {
        guest_cid: 3,
        uds_path: dir.join("v.sock"),
    });
    cfg
}

fn format_version(state: &std::path::Path) -> u32 {
    let b = std::fs::read(state).unwrap();
    u32::from_le_bytes(b[8..12].try_into().unwrap())
}

/// Restores `snap` in a fresh machine and checks that the guest counts on from `saved` and
/// answers on its report port.
fn restore_and_count(cfg: MachineConfig, snap: &std::path::Path, saved: u64) -> Machine {
    let mut m = Machine::restore_snapshot(cfg, None, snap).unwrap();
    assert_eq!(peek(&m), saved, "restored RAM holds the saved counter");
    let reports = with_reports(&m);
    m.start().unwrap();
    let moved = wait_past(&m, saved, "the restored VM");
    let probe = CounterProbe::new(m.memory().clone(), reports).unwrap();
    assert!(probe.request(LIMIT).unwrap() >= moved);
    m
}

/// Snapshots written by the first format (version 1: one fixed structure per section) still
/// restore: the committed one counts on from its saved counter with its vsock device, and a
/// snapshot of the restored machine is written as version 2 and restores too. A version 2 state
/// whose device entry claims a layout version this build does not know is refused, typed.
#[test]
fn a_committed_version_1_snapshot_restores_and_is_saved_as_version_2() {
    if !kvm_or_skip("a_committed_version_1_snapshot_restores_and_is_saved_as_version_2") {
        return;
    }
    let committed =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/snapshot-v1-counter");
    assert_eq!(format_version(&committed.join("state")), 1);
    let mem = std::fs::read(committed.join("memory")).unwrap();
    let at = usize::try_from(counter_addr().0).unwrap();
    let saved = u64::from_le_bytes(mem[at..at + 8].try_into().unwrap());
    assert!(saved > 0, "the committed guest had counted");

    let dir = tempfile::tempdir().unwrap();
    let mut m = restore_and_count(v1_config(dir.path()), &committed, saved);
    m.pause().unwrap();
    let again = peek(&m);
    let v2 = dir.path().join("v2");
    m.save_snapshot(&v2).unwrap();
    assert_eq!(m.stop().unwrap(), StopReason::Stopped);
    drop(m);
    assert_eq!(format_version(&v2.join("state")), 2);
    let dir2 = tempfile::tempdir().unwrap();
    let mut m = restore_and_count(v1_config(dir2.path()), &v2, again);
    assert_eq!(m.stop().unwrap(), StopReason::Stopped);
    drop(m);

    // The i8042's entry claims a layout version from the future.
    let r = vmm::snapfile::SnapshotReader::open(&v2.join("state")).unwrap();
    let mut devices: serde_json::Value =
        serde_json::from_slice(r.section("devices").unwrap()).unwrap();
    let entry = devices
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|e| e["name"] == "i8042")
        .unwrap();
    entry["version"] = 7.into();
    let mut w = vmm::snapfile::SnapshotWriter::new();
    for name in ["meta", "vcpus", "vm"] {
        w.section(name, r.section(name).unwrap().to_vec());
    }
    w.section("devices", serde_json::to_vec(&devices).unwrap());
    w.write(&v2.join("state")).unwrap();
    let err = Machine::restore_snapshot(v1_config(dir2.path()), None, &v2).unwrap_err();
    assert!(
        matches!(
            err,
            MachineError::Snapshot(SnapshotError::State(
                devices::persist::PersistError::Version { found: 7, .. }
            ))
        ),
        "{err:?}"
    );
}
