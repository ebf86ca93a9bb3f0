//! Journal overhead: 64 KiB writes through a delta (data + journal, durable at flush) against
//! plain `pwrite` + `fdatasync` on a file, for 16 MiB per flush and for a flush per write.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use block::journal::{RECORD_SIZE, Record};
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

/// A delta whose journal is version 1 (records only): flushes keep the old ordering (data
/// fdatasync, then records and journal fdatasync), for comparison in the same run.
fn version_1_delta(dir: &std::path::Path, parent: Arc<Layer>) -> Delta {
    drop(Delta::create(dir, parent).unwrap());
    let path = dir.join(block::JOURNAL_FILE);
    let j = std::fs::read(&path).unwrap();
    let mut header = Record::decode(j[..RECORD_SIZE].try_into().unwrap()).unwrap();
    header.aux = 1;
    std::fs::write(&path, header.encode()).unwrap();
    Delta::open(dir).unwrap()
}

/// Interleaved measurement (plain file, delta, and a delta with a version 1 journal take
/// turns, each round rotating which goes first, so shared-disk noise hits all): prints the
/// median time per flush of each with its spread (10th..90th percentile), each delta's
/// overhead over plain, and the spread of that overhead over five consecutive slices of the
/// rounds (each slice's medians compared).
fn paired() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let base = Arc::new(Layer::Base(
        Base::create(&dir.path().join("base.img"), SPAN).unwrap(),
    ));
    let delta = Delta::create(&dir.path().join("d"), base.clone()).unwrap();
    let delta_v1 = version_1_delta(&dir.path().join("d1"), base);
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
        // Times of plain, delta, version 1 delta.
        let mut t: [Vec<Duration>; 3] = Default::default();
        let mut next = [0u64; 3];
        for r in 0..rounds {
            for pass in 0..3 {
                let who = (pass + r) % 3;
                let t0 = std::time::Instant::now();
                for _ in 0..per_flush {
                    let off = (next[who] % slots) * WRITE as u64;
                    next[who] = next[who].wrapping_add(7919);
                    match who {
                        0 => plain.write_all_at(&buf, off).unwrap(),
                        1 => delta.write_at(&buf, off).unwrap(),
                        _ => delta_v1.write_at(&buf, off).unwrap(),
                    }
                }
                match who {
                    0 => plain.sync_data().unwrap(),
                    1 => drop(delta.flush().unwrap()),
                    _ => drop(delta_v1.flush().unwrap()),
                }
                t[who].push(t0.elapsed());
            }
        }
        let overhead = |p: &[Duration], d: &[Duration]| {
            (pct(d, 50).as_secs_f64() / pct(p, 50).as_secs_f64() - 1.0) * 100.0
        };
        let line = |d: &[Duration]| {
            let slices: Vec<f64> = t[0]
                .chunks(rounds / 5)
                .zip(d.chunks(rounds / 5))
                .map(|(p, d)| overhead(p, d))
                .collect();
            let (lo, hi) = slices
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
            format!(
                "{:?} ({:?}..{:?}), overhead of the medians {:+.1}% (five slices: {lo:+.1}%..{hi:+.1}%), of the means {:+.1}%",
                pct(d, 50),
                pct(d, 10),
                pct(d, 90),
                overhead(&t[0], d),
                (mean(d).as_secs_f64() / mean(&t[0]).as_secs_f64() - 1.0) * 100.0,
            )
        };
        println!(
            "journal_overhead paired, {name} ({rounds} rounds): plain pwrite+fdatasync {:?} ({:?}..{:?}, mean {:?})\n  delta write+flush: {}\n  delta with a version 1 journal (two fdatasyncs): {}",
            pct(&t[0], 50),
            pct(&t[0], 10),
            pct(&t[0], 90),
            mean(&t[0]),
            line(&t[1]),
            line(&t[2]),
        );
    }
}

/// The mean of `v`.
fn mean(v: &[Duration]) -> Duration {
    v.iter().sum::<Duration>() / u32::try_from(v.len()).unwrap_or(u32::MAX)
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
