//! Live clone against stop-and-copy, with the `dirtier` guest: the final pause and the total
//! time of `Machine::clone_running` for 64 MiB, 256 MiB and 1 GiB of guest RAM, idle (no page
//! written per pass) and busy (4096 pages = 16 MiB rewritten in a loop), beside a baseline that
//! pauses the VM, copies all of RAM into a new memfd and resumes (what a clone through a full
//! snapshot costs at least). Prints `SKIP:` and measures nothing without /dev/kvm.
//!
//! `idle+disk` is the idle guest with a virtio-blk disk (a delta) attached: every clone also
//! forks the disk, whose cut is inside the pause and whose commit comes after it.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use devices::legacy::SerialOutput;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm::Machine;
use vmm::config::MachineConfig;
use vmm::machine::CloneOptions;
use vmm::memory::GuestRam;
use vmm_test_guests::{DIRTIER, kvm_or_skip};

fn dirtier(mem_mib: u64, pages: u64, disk: Option<&Path>) -> Machine {
    let mut cfg = MachineConfig::test_guest("dirtier");
    cfg.mem_mib = mem_mib;
    if let Some(dir) = disk {
        let base = block::Base::create(&dir.join("base.img"), 64 << 20).expect("base");
        let delta = dir.join("d0");
        drop(block::Delta::create(&delta, Arc::new(block::Layer::Base(base))).expect("delta"));
        cfg.disks = vec![vmm::config::DiskConfig {
            path: delta,
            read_only: false,
        }];
    }
    let mut m = Machine::new(cfg, Some(SerialOutput::Sink)).expect("machine");
    m.boot().expect("boot");
    let sym = GuestAddress(DIRTIER.symbol("shared_dirty_pages").expect("symbol"));
    m.memory().write_obj(pages, sym).expect("set pages");
    m.start().expect("start");
    // Let the guest get going.
    let passes = GuestAddress(DIRTIER.symbol("shared_passes").expect("symbol"));
    let t = Instant::now();
    while m.memory().read_obj::<u64>(passes).unwrap_or(0) < 2 && t.elapsed().as_secs() < 60 {
        std::thread::sleep(Duration::from_millis(1));
    }
    m
}

/// Fork generations so far (each clone of a VM with a disk forks it again).
static FORKS: AtomicU64 = AtomicU64::new(0);

fn clone_once(m: &mut Machine, disk: Option<&Path>) -> vmm::machine::CloneTimeline {
    let mut cfg = MachineConfig::test_guest("dirtier");
    cfg.mem_mib = m.config().mem_mib;
    let mut opts = CloneOptions::new(cfg);
    opts.console = Some(SerialOutput::Sink);
    if let Some(dir) = disk {
        let n = FORKS.fetch_add(1, Ordering::Relaxed) + 1;
        opts.disk_dirs = vec![(dir.join(format!("d{n}")), dir.join(format!("clone{n}")))];
    }
    let (clone, tl) = m.clone_running(opts).expect("clone");
    drop(clone);
    if let Some(dir) = disk {
        let n = FORKS.load(Ordering::Relaxed);
        let _ = std::fs::remove_dir_all(dir.join(format!("clone{n}")));
    }
    tl
}

/// Pause, copy all RAM into a fresh memfd, resume; returns the pause.
fn stop_and_copy(m: &mut Machine) -> Duration {
    let ram = GuestRam::new(m.vm().ram().size()).expect("ram");
    let t = Instant::now();
    m.pause().expect("pause");
    for (s, d) in m.memory().iter().zip(ram.memory().iter()) {
        let len = s.len() as usize;
        let src = s.get_slice(MemoryRegionAddress(0), len).expect("slice");
        let dst = d.get_slice(MemoryRegionAddress(0), len).expect("slice");
        src.copy_to_volatile_slice(dst);
    }
    m.resume().expect("resume");
    t.elapsed()
}

fn bench(c: &mut Criterion) {
    if !kvm_or_skip("clone bench") {
        return;
    }
    let sizes: Vec<u64> = std::env::var("CLONE_BENCH_MIB")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![64, 256, 1024]);
    let mut g = c.benchmark_group("clone");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(10))
        .measurement_time(Duration::from_secs(1));
    for &mib in &sizes {
        for (load, pages, with_disk) in [
            ("idle", 0u64, false),
            ("busy", 4096, false),
            ("idle+disk", 0, true),
        ] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let disk = with_disk.then_some(tmp.path());
            let mut m = dirtier(mib, pages, disk);
            g.bench_function(BenchmarkId::new(format!("live_pause/{load}"), mib), |b| {
                b.iter_custom(|n| (0..n).map(|_| clone_once(&mut m, disk).pause).sum());
            });
            g.bench_function(BenchmarkId::new(format!("live_total/{load}"), mib), |b| {
                b.iter_custom(|n| (0..n).map(|_| clone_once(&mut m, disk).total).sum());
            });
            if !with_disk {
                g.bench_function(
                    BenchmarkId::new(format!("stop_and_copy/{load}"), mib),
                    |b| {
                        b.iter_custom(|n| (0..n).map(|_| stop_and_copy(&mut m)).sum());
                    },
                );
            }
            let tl = clone_once(&mut m, disk);
            println!("clone {mib} MiB {load}: {tl:?}");
            m.stop().expect("stop");
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
