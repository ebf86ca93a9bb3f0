//! Durable three-way merge throughput: a 2 GiB base with 256 MiB of real data; the active
//! delta holds 256 MiB in random 64 KiB extents, or 256 MiB sequential; the merge writes a
//! new delta and fsyncs it.

use std::time::{Duration, Instant};

use block::Delta;
use block::merge::{self, MergeOptions};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use microvmm_benches::{DIRTY, Pattern, build};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("merge_throughput");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Bytes(DIRTY));
    for (name, pattern) in [
        ("random_64k", Pattern::Random),
        ("sequential", Pattern::Sequential),
    ] {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let w = build(dir.path(), pattern).unwrap();
        let a = Delta::open_read_only(&w.active).unwrap();
        let b = Delta::open_read_only(&w.upgrade).unwrap();
        let out = dir.path().join("out");
        g.bench_function(name, |bench| {
            bench.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let r = merge::merge(&a, &b, &out, &MergeOptions::default()).unwrap();
                    total += t.elapsed();
                    assert_eq!(r.bytes_to_write, DIRTY);
                    std::fs::remove_dir_all(&out).unwrap();
                }
                total
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
