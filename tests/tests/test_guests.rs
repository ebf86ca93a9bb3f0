//! Boots the test-guest kit under this machine's /dev/kvm: serial output, power-off, triple fault
//! and emulation failure as typed errors, two vCPUs, the counter guest with pause/resume, and the
//! configuration errors a user can hit.

use std::time::Duration;

use microvmm_tests::{TestVm, kvm_or_skip};
use vm_memory::{Bytes, GuestAddress};
use vmm::config::{KernelSource, MachineConfig};
use vmm::cpuid::HostKvm;
use vmm::machine::VmState;
use vmm::vcpu::VcpuError;
use vmm::{Machine, MachineError, StopReason};
use vmm_test_guests::{CHAOS, COUNTER, CounterProbe, SMP};

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn hello_prints_and_powers_off() {
    if !kvm_or_skip("hello_prints_and_powers_off") {
        return;
    }
    let mut vm = TestVm::start_guest("hello", 1).unwrap();
    let reason = vm.machine.wait(Some(LIMIT)).unwrap();
    assert_eq!(reason, StopReason::PowerOff);
    assert_eq!(vm.serial_text(), "Hello from the microvmm test guest\n");
    assert_eq!(vm.machine.state(), VmState::Stopped);
    let t = vm.machine.timeline();
    let first = vm.machine.serial_stats().first_byte_at().unwrap();
    assert!(first > t.created);
    println!(
        "hello: KVM_CREATE_VM to first serial byte {:?}, power-off request to stopped {:?}",
        first - t.created,
        t.stopped.unwrap() - vm.machine.power().requested_at().unwrap()
    );
}

#[test]
fn i8042_reset_ends_the_vm_in_order() {
    if !kvm_or_skip("i8042_reset_ends_the_vm_in_order") {
        return;
    }
    let mut vm = TestVm::start_guest("reset", 2).unwrap();
    assert_eq!(vm.machine.wait(Some(LIMIT)).unwrap(), StopReason::Reset);
    let text = vm.serial_text();
    assert_eq!(text, "reset: via i8042\n");
    assert_eq!(vm.machine.state(), VmState::Stopped);
    assert_eq!(vm.machine.vcpus().len(), 2, "both vCPU threads ended");
}

#[test]
fn random_port_and_mmio_accesses_do_not_upset_the_vmm() {
    if !kvm_or_skip("random_port_and_mmio_accesses_do_not_upset_the_vmm") {
        return;
    }
    for seed in [1u64, 0xdead_beef, 0x1234_5678_9abc_def1] {
        let mut vm = TestVm::boot(MachineConfig::test_guest("chaos")).unwrap();
        let mem = vm.machine.memory();
        mem.write_obj(seed, GuestAddress(CHAOS.symbol("shared_seed").unwrap()))
            .unwrap();
        mem.write_obj(
            3000u64,
            GuestAddress(CHAOS.symbol("shared_rounds").unwrap()),
        )
        .unwrap();
        vm.machine.start().unwrap();
        assert_eq!(vm.machine.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
        assert!(
            vm.reports.try_recv().is_ok(),
            "seed {seed:#x}: rounds not done"
        );
        assert!(
            vm.serial_text().ends_with("chaos: survived\n"),
            "seed {seed:#x}: {:?}",
            vm.serial_text()
        );
    }
}

#[test]
fn triple_fault_is_a_typed_error() {
    if !kvm_or_skip("triple_fault_is_a_typed_error") {
        return;
    }
    let mut vm = TestVm::start_guest("triple_fault", 1).unwrap();
    let err = vm.machine.wait(Some(LIMIT)).unwrap_err();
    match err {
        MachineError::Vcpu(VcpuError::TripleFault { id, state }) => {
            assert_eq!(id, 0);
            // It faulted at CPL3 on its ud2 (0f 0b).
            assert_eq!(state.cpl(), 3);
            let mut insn = [0u8; 2];
            vm.machine
                .memory()
                .read_slice(&mut insn, GuestAddress(state.regs.rip))
                .unwrap();
            assert_eq!(insn, [0x0f, 0x0b]);
        }
        other => panic!("expected a triple fault, got {other:?}"),
    }
    assert_eq!(vm.serial_text(), "triple_fault: faulting now\n");
    assert_eq!(vm.machine.state(), VmState::Stopped);
}

#[test]
fn emulation_failure_is_a_typed_error() {
    if !kvm_or_skip("emulation_failure_is_a_typed_error") {
        return;
    }
    let mut vm = TestVm::start_guest("emulation_failure", 1).unwrap();
    let err = vm.machine.wait(Some(LIMIT)).unwrap_err();
    assert_eq!(vm.serial_text(), "!");
    match (HostKvm::detect(), err) {
        (
            HostKvm::Emulating,
            MachineError::Vcpu(VcpuError::EmulationFailure { id, insn, state }),
        ) => {
            assert_eq!(id, 0);
            assert_eq!(state.cpl(), 0);
            // popcnt rax, rbx
            assert_eq!(&insn[..5], &[0xf3, 0x48, 0x0f, 0xb8, 0xc3], "{insn:02x?}");
            let msg =
                MachineError::Vcpu(VcpuError::EmulationFailure { id, insn, state }).to_string();
            assert!(msg.contains("f3 48 0f b8 c3"), "{msg}");
        }
        // With hardware virtualization popcnt runs; the guest then jumps into unbacked memory.
        (
            HostKvm::Hardware,
            MachineError::Vcpu(
                VcpuError::EmulationFailure { .. } | VcpuError::InternalError { .. },
            ),
        ) => {}
        (host, other) => panic!("{host:?}: expected an emulation failure, got {other:?}"),
    }
}

#[test]
fn two_vcpus_both_run() {
    if !kvm_or_skip("two_vcpus_both_run") {
        return;
    }
    let mut vm = TestVm::start_guest("smp", 2).unwrap();
    assert_eq!(vm.machine.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    assert_eq!(vm.serial_text(), "smp: 2 of 2 cpus done\n");
    let base = SMP.symbol("shared_cpu_counter").unwrap();
    let mem = vm.machine.memory();
    for cpu in 0..2u64 {
        let n: u64 = mem.read_obj(GuestAddress(base + 8 * cpu)).unwrap();
        assert_eq!(n, 1_000_000, "vCPU {cpu}");
    }
    let idle: u64 = mem.read_obj(GuestAddress(base + 16)).unwrap();
    assert_eq!(idle, 0, "no third vCPU");
}

#[test]
fn counter_reports_pauses_and_resumes() {
    if !kvm_or_skip("counter_reports_pauses_and_resumes") {
        return;
    }
    let mut vm = TestVm::start_guest("counter", 1).unwrap();
    assert!(
        vm.wait_serial("counter: ready\n", LIMIT),
        "{}",
        vm.serial_text()
    );
    let probe = CounterProbe::new(
        vm.machine.memory().clone(),
        std::mem::replace(&mut vm.reports, std::sync::mpsc::channel().1),
    )
    .unwrap();
    let a = probe.request(LIMIT).unwrap();
    let start = std::time::Instant::now();
    while probe.peek().unwrap() <= a {
        assert!(start.elapsed() < LIMIT, "the counter does not advance");
        std::thread::sleep(Duration::from_millis(1));
    }
    let b = probe.request(LIMIT).unwrap();
    assert!(b > a, "counter advances: {a} then {b}");

    vm.machine.pause().unwrap();
    vm.machine.pause().unwrap(); // idempotent
    let p1 = probe.peek().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let p2 = probe.peek().unwrap();
    assert_eq!(p1, p2, "a paused guest does not count");
    assert!(p1 >= b);

    vm.machine.resume().unwrap();
    let start = std::time::Instant::now();
    while probe.peek().unwrap() == p2 {
        assert!(start.elapsed() < LIMIT, "counting did not resume");
        std::thread::sleep(Duration::from_millis(1));
    }
    let c = probe.request(LIMIT).unwrap();
    assert!(c > p2, "counting resumes: {p2} then {c}");
    let last = probe.stop(LIMIT).unwrap();
    assert!(last >= c);
    assert_eq!(vm.machine.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
    assert!(COUNTER.symbol("shared_counter").is_ok());
}

#[test]
fn wait_times_out_and_stop_ends_a_busy_guest() {
    if !kvm_or_skip("wait_times_out_and_stop_ends_a_busy_guest") {
        return;
    }
    let mut vm = TestVm::start_guest("counter", 1).unwrap();
    assert!(matches!(
        vm.machine.wait(Some(Duration::from_millis(50))),
        Err(MachineError::Timeout(_))
    ));
    assert_eq!(vm.machine.state(), VmState::Running);
    assert_eq!(vm.machine.stop().unwrap(), StopReason::Stopped);
    assert_eq!(vm.machine.state(), VmState::Stopped);
    assert_eq!(vm.machine.vcpus().len(), 1, "the vCPU is handed back");
    assert!(matches!(
        vm.machine.resume(),
        Err(MachineError::InvalidTransition { .. })
    ));
}

#[test]
fn lifecycle_transitions_are_checked() {
    if !kvm_or_skip("lifecycle_transitions_are_checked") {
        return;
    }
    let mut m = Machine::new(MachineConfig::test_guest("hello"), None).unwrap();
    assert!(matches!(
        m.start(),
        Err(MachineError::InvalidTransition { .. })
    ));
    assert!(matches!(
        m.pause(),
        Err(MachineError::InvalidTransition { .. })
    ));
    m.boot().unwrap();
    assert!(matches!(
        m.boot(),
        Err(MachineError::InvalidTransition { .. })
    ));
}

#[test]
fn configuration_errors_are_typed() {
    if !kvm_or_skip("configuration_errors_are_typed") {
        return;
    }
    let mut cfg = MachineConfig::test_guest("hello");
    cfg.vcpus = 0;
    assert!(matches!(
        Machine::new(cfg, None),
        Err(MachineError::VcpuCount { count: 0, .. })
    ));
    let mut cfg = MachineConfig::test_guest("no_such_guest");
    cfg.vcpus = 1;
    let mut m = Machine::new(cfg, None).unwrap();
    assert!(matches!(m.boot(), Err(MachineError::Guest(_))));

    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, vec![0x42u8; 8192]).unwrap();
    let mut cfg = MachineConfig::test_guest("hello");
    cfg.kernel = KernelSource::File(garbage);
    let mut m = Machine::new(cfg, None).unwrap();
    let err = m.boot().unwrap_err();
    assert!(
        matches!(
            err,
            MachineError::Boot(vmm::boot::BootError::UnknownKernelFormat)
        ),
        "{err:?}"
    );

    let big = dir.path().join("big");
    std::fs::write(&big, vec![0u8; 6 << 20]).unwrap();
    let mut cfg = MachineConfig::test_guest("hello");
    cfg.kernel = KernelSource::File(big);
    cfg.mem_mib = 4;
    let mut m = Machine::new(cfg, None).unwrap();
    assert!(matches!(
        m.boot(),
        Err(MachineError::MemoryTooSmall {
            mem_mib: 4,
            need_mib: 7
        })
    ));

    let mut cfg = MachineConfig::test_guest("hello");
    cfg.kernel = KernelSource::File(dir.path().join("missing"));
    let mut m = Machine::new(cfg, None).unwrap();
    assert!(matches!(m.boot(), Err(MachineError::Open { .. })));

    let mut cfg = MachineConfig::test_guest("hello");
    cfg.mem_mib = 1;
    assert!(matches!(
        Machine::new(cfg, None),
        Err(MachineError::Memory(_))
    ));
}

#[test]
fn several_vms_run_at_once() {
    if !kvm_or_skip("several_vms_run_at_once") {
        return;
    }
    let mut vms: Vec<TestVm> = (0..3)
        .map(|_| TestVm::start_guest("hello", 1).unwrap())
        .collect();
    for vm in &mut vms {
        assert_eq!(vm.machine.wait(Some(LIMIT)).unwrap(), StopReason::PowerOff);
        assert_eq!(vm.serial_text(), "Hello from the microvmm test guest\n");
    }
}

#[test]
fn tasks_run_on_paused_vcpu_threads() {
    if !kvm_or_skip("tasks_run_on_paused_vcpu_threads") {
        return;
    }
    // Both vCPUs run the counter loop (they share the counter); neither stops on its own.
    // Their "ready" lines may interleave on the serial port, so wait for the count instead.
    let mut vm = TestVm::start_guest("counter", 2).unwrap();
    let counter = GuestAddress(COUNTER.symbol("shared_counter").unwrap());
    let start = std::time::Instant::now();
    while vm.machine.memory().read_obj::<u64>(counter).unwrap() == 0 {
        assert!(start.elapsed() < LIMIT, "the counter never moved");
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.machine.pause().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    vm.machine
        .on_each_vcpu(std::sync::Arc::new(move |v| {
            let regs = v.fd().get_regs().unwrap();
            s.lock().unwrap().push((v.id(), regs.rip));
        }))
        .unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![0, 1]
    );
    for (id, rip) in &seen {
        assert!(
            (0x10_0000..0x20_0000).contains(rip),
            "vCPU {id} rip {rip:#x}"
        );
    }
    vm.machine.resume().unwrap();
    assert_eq!(vm.machine.stop().unwrap(), StopReason::Stopped);
}

#[test]
fn many_pause_resume_cycles_with_two_vcpus() {
    if !kvm_or_skip("many_pause_resume_cycles_with_two_vcpus") {
        return;
    }
    let mut vm = TestVm::start_guest("counter", 2).unwrap();
    let counter = GuestAddress(COUNTER.symbol("shared_counter").unwrap());
    let read = |vm: &TestVm| vm.machine.memory().read_obj::<u64>(counter).unwrap();
    let mut last = 0;
    for i in 0..300 {
        let start = std::time::Instant::now();
        while read(&vm) == last {
            assert!(
                start.elapsed() < LIMIT,
                "cycle {i}: no progress after resume"
            );
            std::thread::yield_now();
        }
        vm.machine.pause().unwrap();
        last = read(&vm);
        std::thread::sleep(Duration::from_micros(200));
        assert_eq!(read(&vm), last, "cycle {i}: counting while paused");
        vm.machine.resume().unwrap();
    }
    assert_eq!(vm.machine.stop().unwrap(), StopReason::Stopped);
}
