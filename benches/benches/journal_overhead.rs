//! Journal overhead: 64 KiB writes through a delta (data + journal, durable at flush) against
//! plain `pwrite` + `fdatasync` on a file, for 16 MiB per flush and for a flush per write.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use block::{Base, Delta, Layer};
use criterion::{Criterion, Throughput, criterion_group};

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

/// Interleaved measurement (plain and delta alternate, each round flipping which goes first,
/// so shared-disk noise hits both): prints the median time per flush of each with its spread
/// (10th..90th percentile), the overhead of the medians, and the spread of the overhead over
/// five consecutive slices of the rounds (each slice's medians compared).
fn paired() {
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
    for (name, per_flush, rounds) in [
        ("256 writes per flush", 256u64, 60usize),
        ("flush every write", 1, 1500),
    ] {
        let (mut tp, mut td) = (Vec::new(), Vec::new());
        let mut next = 0u64;
        for r in 0..rounds {
            for pass in 0..2 {
                let plain_turn = (pass + r) % 2 == 0;
                let t = std::time::Instant::now();
                for _ in 0..per_flush {
                    let off = (next % slots) * WRITE as u64;
                    next = next.wrapping_add(7919);
                    if plain_turn {
                        plain.write_all_at(&buf, off).unwrap();
                    } else {
                        delta.write_at(&buf, off).unwrap();
                    }
                }
                if plain_turn {
                    plain.sync_data().unwrap();
                    tp.push(t.elapsed());
                } else {
                    delta.flush().unwrap();
                    td.push(t.elapsed());
                }
            }
        }
        let overhead = |p: &[Duration], d: &[Duration]| {
            (pct(d, 50).as_secs_f64() / pct(p, 50).as_secs_f64() - 1.0) * 100.0
        };
        let slices: Vec<f64> = tp
            .chunks(rounds / 5)
            .zip(td.chunks(rounds / 5))
            .map(|(p, d)| overhead(p, d))
            .collect();
        let (lo, hi) = slices
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        println!(
            "journal_overhead paired, {name} ({rounds} rounds): plain pwrite+fdatasync {:?} ({:?}..{:?}), delta write+flush {:?} ({:?}..{:?}); overhead of the medians {:+.1}% (five slices: {lo:+.1}%..{hi:+.1}%)",
            pct(&tp, 50),
            pct(&tp, 10),
            pct(&tp, 90),
            pct(&td, 50),
            pct(&td, 10),
            pct(&td, 90),
            overhead(&tp, &td),
        );
    }
}

/// The `p`th percentile of `v` (unsorted).
fn pct(v: &[Duration], p: usize) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[(s.len() - 1) * p / 100]
}

criterion_group!(benches, bench);

fn main() {
    paired();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
