//! KVM dirty-page logging on the memfd-backed guest memory, with the counter guest writing one
//! page: the page shows up dirty while the guest runs and stays clean while it is paused.

use std::time::Duration;

use microvmm_tests::{TestVm, kvm_or_skip};
use vmm::StopReason;
use vmm_test_guests::COUNTER;

/// Waits until the u64 the guest keeps at `addr` has grown by `by` (progress, not time).
fn wait_progress(vm: &TestVm, addr: u64, by: u64) {
    use vm_memory::{Bytes, GuestAddress};
    let mem = vm.machine.memory();
    let read = || mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
    let start = read();
    let t = std::time::Instant::now();
    while read() < start + by {
        assert!(t.elapsed() < Duration::from_secs(30), "no guest progress");
        std::thread::yield_now();
    }
}

fn dirty_pages(vm: &TestVm) -> Vec<u64> {
    let mut pages = Vec::new();
    for (slot, bitmap) in vm.machine.vm().dirty_log().unwrap() {
        for (w, word) in bitmap.iter().enumerate() {
            for bit in 0..64 {
                if word & (1 << bit) != 0 {
                    pages.push(slot.guest_addr + ((w * 64 + bit) as u64) * 4096);
                }
            }
        }
    }
    pages
}

#[test]
fn dirty_log_tracks_guest_writes() {
    if !kvm_or_skip("dirty_log_tracks_guest_writes") {
        return;
    }
    let mut vm = TestVm::start_guest("counter", 1).unwrap();
    assert!(vm.wait_serial("counter: ready\n", Duration::from_secs(30)));
    vm.machine.vm_mut().set_dirty_logging(true).unwrap();
    assert!(vm.machine.vm().dirty_logging());
    let _ = dirty_pages(&vm); // clear what logging-on itself reports
    let counter = COUNTER.symbol("shared_counter").unwrap();
    wait_progress(&vm, counter, 2);
    let counter_page = counter & !0xfff;
    let dirty = dirty_pages(&vm);
    assert!(dirty.contains(&counter_page), "{dirty:x?}");
    assert!(dirty.len() < 16, "only a few pages are written: {dirty:x?}");

    vm.machine.pause().unwrap();
    let _ = dirty_pages(&vm);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        dirty_pages(&vm),
        Vec::<u64>::new(),
        "a paused guest writes nothing"
    );
    vm.machine.resume().unwrap();
    wait_progress(&vm, counter, 2);
    assert!(dirty_pages(&vm).contains(&counter_page));

    vm.machine.vm_mut().set_dirty_logging(false).unwrap();
    vm.machine.stop().unwrap();
    assert_eq!(vm.machine.stop().unwrap(), StopReason::Stopped);
}

#[test]
fn dirtier_guest_dirties_the_pages_the_host_asks_for() {
    use vm_memory::{Bytes, GuestAddress};
    use vmm_test_guests::DIRTIER;

    if !kvm_or_skip("dirtier_guest_dirties_the_pages_the_host_asks_for") {
        return;
    }
    let mut vm = TestVm::start_guest("dirtier", 1).unwrap();
    assert!(vm.wait_serial("dirtier: ready\n", Duration::from_secs(30)));
    let sym = |s| GuestAddress(DIRTIER.symbol(s).unwrap());
    let mem = vm.machine.memory().clone();
    vm.machine.vm_mut().set_dirty_logging(true).unwrap();
    let passes_at = DIRTIER.symbol("shared_passes").unwrap();
    let _ = dirty_pages(&vm);
    // Two more passes: at least one whole pass ran after the log was cleared.
    wait_progress(&vm, passes_at, 2);
    let dirty = dirty_pages(&vm);
    let base = 16u64 << 20;
    let in_range = |d: &[u64], n: u64| {
        d.iter()
            .filter(|&&p| p >= base && p < base + n * 4096)
            .count()
    };
    assert_eq!(
        in_range(&dirty, 256),
        256,
        "all 256 default pages are written"
    );
    assert_eq!(in_range(&dirty, 1 << 20), 256, "and none beyond them");

    mem.write_obj(8u64, sym("shared_dirty_pages")).unwrap();
    // Let a pass that may have started with the old count finish, then look afresh.
    let passes = mem.read_obj::<u64>(sym("shared_passes")).unwrap();
    while mem.read_obj::<u64>(sym("shared_passes")).unwrap() < passes + 2 {
        std::thread::yield_now();
    }
    let _ = dirty_pages(&vm);
    wait_progress(&vm, passes_at, 2);
    let dirty = dirty_pages(&vm);
    assert_eq!(in_range(&dirty, 1 << 20), 8, "{dirty:x?}");
    let first: u64 = mem.read_obj(GuestAddress(base)).unwrap();
    assert!(first > passes, "pages hold the pass number");

    mem.write_obj(1u64, sym("shared_stop")).unwrap();
    let reported = vm.reports.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(reported >= first);
    assert_eq!(
        vm.machine.wait(Some(Duration::from_secs(30))).unwrap(),
        StopReason::PowerOff
    );
}
