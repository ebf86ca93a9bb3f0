//! virtio-blk request handling in the device model (simulated queue in test memory, requests
//! parsed and executed by `process_queue`) against the `block` crate's raw write rate, in the
//! same run: the ratio is the device model's overhead on top of the delta. Only
//! `process_queue` is timed: the driver's side (headers and descriptors put into the queue,
//! the guest's work in a VM) is done between the timed calls.
//!
//! Before the criterion groups, a paired run alternates a raw batch and a device batch (each
//! round flipping which goes first, so that the shared machine's noise hits both) and prints
//! the medians, their ratio and its spread over five slices of the rounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{Base, Delta, Layer};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use devices::virtio::blk::{Block, ID_BYTES, process_queue};
use devices::virtio::testing::{DATA, Driver, queue};
use vm_memory::{Bytes, GuestAddress};

/// Requests per measured batch (3 descriptors each; the test queue has 16).
const BATCH: u64 = 4;
/// Region of the disk the requests cycle over.
const SPAN: u64 = 256 << 20;
const HDR_AT: u64 = DATA;
const STATUS_AT: u64 = DATA + 0x100;
const DATA_AT: u64 = DATA + 0x10000;

fn delta(dir: &std::path::Path) -> Arc<Delta> {
    let base = Base::create(&dir.join("base.img"), SPAN).unwrap();
    Arc::new(Delta::create(&dir.join("delta"), Arc::new(Layer::Base(base))).unwrap())
}

/// A raw delta and a device on another delta, with the next offsets each writes.
struct Setup {
    size: u32,
    data: Vec<u8>,
    raw: Arc<Delta>,
    raw_off: u64,
    dev: Arc<Delta>,
    driver: Driver,
    q: virtio_queue::Queue,
    buf: Vec<u8>,
    sector: u64,
    _dirs: [tempfile::TempDir; 2],
}

impl Setup {
    fn new(size: u32) -> Self {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let raw = delta(dirs[0].path());
        let dev = delta(dirs[1].path());
        let driver = Driver::new(Box::new(Block::new(dev.clone(), "bench")));
        let data = vec![0x5au8; size as usize];
        driver
            .mem
            .write_slice(&data, GuestAddress(DATA_AT))
            .unwrap();
        Self {
            size,
            data,
            raw,
            raw_off: 0,
            dev,
            driver,
            q: queue(),
            buf: Vec::new(),
            sector: 0,
            _dirs: dirs,
        }
    }

    /// `BATCH` writes straight to the delta; their time.
    fn raw_batch(&mut self) -> Duration {
        let t = Instant::now();
        for _ in 0..BATCH {
            self.raw.write_at(&self.data, self.raw_off).unwrap();
            self.raw_off = (self.raw_off + u64::from(self.size)) % SPAN;
        }
        t.elapsed()
    }

    /// `BATCH` write requests put in the queue, then processed; the processing's time.
    fn device_batch(&mut self) -> Duration {
        for k in 0..BATCH {
            // Each request gets its own header slot so the batch is independent.
            let h = HDR_AT + k * 16;
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&1u32.to_le_bytes());
            hdr[8..16].copy_from_slice(&self.sector.to_le_bytes());
            self.driver.mem.write_slice(&hdr, GuestAddress(h)).unwrap();
            self.driver.add_chain(&[
                (h, 16, false),
                (DATA_AT, self.size, false),
                (STATUS_AT + k, 1, true),
            ]);
            self.sector = (self.sector + u64::from(self.size) / 512) % (SPAN / 512);
        }
        let t = Instant::now();
        process_queue(
            &mut self.q,
            &self.driver.mem,
            self.dev.as_ref(),
            &[0; ID_BYTES],
            &mut self.buf,
        )
        .unwrap();
        t.elapsed()
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("virtio_blk_write");
    for size in [4096u32, 65536] {
        g.throughput(Throughput::Bytes(BATCH * u64::from(size)));
        let mut s = Setup::new(size);
        g.bench_with_input(
            BenchmarkId::new("block_delta_write_at", size),
            &size,
            |b, _| b.iter_custom(|iters| (0..iters).map(|_| s.raw_batch()).sum()),
        );
        g.bench_with_input(
            BenchmarkId::new("virtio_blk_request", size),
            &size,
            |b, _| b.iter_custom(|iters| (0..iters).map(|_| s.device_batch()).sum()),
        );
    }
    g.finish();
}

/// The `p`th percentile of `v` (unsorted).
fn pct(v: &[Duration], p: usize) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[(s.len() - 1) * p / 100]
}

/// Interleaved raw and device batches: medians, their ratio (raw time / device time: the
/// device's rate as a fraction of the raw rate) and its spread over five slices.
fn paired() {
    for (size, rounds) in [(4096u32, 20_000usize), (65536, 5_000)] {
        let mut s = Setup::new(size);
        let (mut raw, mut dev) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            for pass in 0..2 {
                if (pass + r) % 2 == 0 {
                    raw.push(s.raw_batch());
                } else {
                    dev.push(s.device_batch());
                }
            }
        }
        let ratio =
            |r: &[Duration], d: &[Duration]| pct(r, 50).as_secs_f64() / pct(d, 50).as_secs_f64();
        let slices: Vec<f64> = raw
            .chunks(rounds / 5)
            .zip(dev.chunks(rounds / 5))
            .map(|(r, d)| ratio(r, d))
            .collect();
        let (lo, hi) = slices
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        println!(
            "virtio_blk paired, {size} B writes, batches of {BATCH} ({rounds} rounds): raw write_at {:?} ({:?}..{:?}), virtio-blk {:?} ({:?}..{:?}); device rate / raw rate {:.2} (five slices: {lo:.2}..{hi:.2})",
            pct(&raw, 50),
            pct(&raw, 10),
            pct(&raw, 90),
            pct(&dev, 50),
            pct(&dev, 10),
            pct(&dev, 90),
            ratio(&raw, &dev),
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    paired();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
