//! Journal overhead: 64 KiB writes through a delta (data + journal, durable at flush) against
//! plain `pwrite` + `fdatasync` on a file, for 16 MiB per flush and for a flush per write.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use block::{Base, Delta, Layer};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const WRITE: usize = 64 << 10;
const SPAN: u64 = 1 << 30;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let base = Base::create(&dir.path().join("base.img"), SPAN).unwrap();
    let delta = Delta::create(&dir.path().join("d"), Arc::new(Layer::Base(base))).unwrap();
    let plain = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("plain"))
        .unwrap();
    plain.set_len(SPAN).unwrap();
    let buf = vec![0x5au8; WRITE];
    let slots = SPAN / WRITE as u64;
    for (name, per_flush) in [
        ("batch_256_writes_per_flush", 256u64),
        ("flush_every_write", 1),
    ] {
        let mut g = c.benchmark_group(format!("journal_overhead/{name}"));
        g.sample_size(20);
        g.measurement_time(Duration::from_secs(8));
        g.throughput(Throughput::Bytes(per_flush * WRITE as u64));
        let mut next = 0u64;
        g.bench_function("plain_pwrite_fdatasync", |b| {
            b.iter(|| {
                for _ in 0..per_flush {
                    plain
                        .write_all_at(&buf, (next % slots) * WRITE as u64)
                        .unwrap();
                    next = next.wrapping_add(7919);
                }
                plain.sync_data().unwrap();
            });
        });
        let mut next = 0u64;
        g.bench_function("delta_write_flush", |b| {
            b.iter(|| {
                for _ in 0..per_flush {
                    delta.write_at(&buf, (next % slots) * WRITE as u64).unwrap();
                    next = next.wrapping_add(7919);
                }
                delta.flush().unwrap();
            });
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
