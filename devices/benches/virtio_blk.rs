//! virtio-blk request handling in the device model (simulated queue in test memory, requests
//! parsed and executed by `process_queue`) against the `block` crate's raw write rate, in the
//! same run: the ratio is the device model's overhead on top of the delta.

use std::sync::Arc;

use block::{Base, Delta, Layer};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use devices::virtio::blk::{Block, ID_BYTES, process_queue};
use devices::virtio::testing::{DATA, Driver, queue};
use vm_memory::{Bytes, GuestAddress};

/// Requests per measured batch (3 descriptors each; the test queue has 16).
const BATCH: u64 = 4;
/// Region of the disk the requests cycle over.
const SPAN: u64 = 256 << 20;

fn delta(dir: &std::path::Path) -> Arc<Delta> {
    let base = Base::create(&dir.join("base.img"), SPAN).unwrap();
    Arc::new(Delta::create(&dir.join("delta"), Arc::new(Layer::Base(base))).unwrap())
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("virtio_blk_write");
    for size in [4096u32, 65536] {
        g.throughput(Throughput::Bytes(BATCH * u64::from(size)));

        let dir = tempfile::tempdir().unwrap();
        let disk = delta(dir.path());
        let data = vec![0x5au8; size as usize];
        let mut off = 0u64;
        g.bench_with_input(
            BenchmarkId::new("block_delta_write_at", size),
            &size,
            |b, &size| {
                b.iter(|| {
                    for _ in 0..BATCH {
                        disk.write_at(&data, off).unwrap();
                        off = (off + u64::from(size)) % SPAN;
                    }
                });
            },
        );

        let dir = tempfile::tempdir().unwrap();
        let disk = delta(dir.path());
        let mut d = Driver::new(Box::new(Block::new(disk.clone(), "bench")));
        let mut q = queue();
        let mut buf = Vec::new();
        let hdr_at = DATA;
        let status_at = DATA + 0x100;
        let data_at = DATA + 0x10000;
        d.mem.write_slice(&data, GuestAddress(data_at)).unwrap();
        let mut sector = 0u64;
        g.bench_with_input(
            BenchmarkId::new("virtio_blk_request", size),
            &size,
            |b, &size| {
                b.iter(|| {
                    for k in 0..BATCH {
                        // Each request gets its own header slot so the batch is independent.
                        let h = hdr_at + k * 16;
                        let mut hdr = [0u8; 16];
                        hdr[0..4].copy_from_slice(&1u32.to_le_bytes());
                        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
                        d.mem.write_slice(&hdr, GuestAddress(h)).unwrap();
                        d.add_chain(&[
                            (h, 16, false),
                            (data_at, size, false),
                            (status_at + k, 1, true),
                        ]);
                        sector = (sector + u64::from(size) / 512) % (SPAN / 512);
                    }
                    process_queue(&mut q, &d.mem, disk.as_ref(), &[0; ID_BYTES], &mut buf).unwrap();
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
