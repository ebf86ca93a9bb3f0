//! Shared helpers for the criterion benchmarks in `benches/benches/` and the
//! `mkworkload` tool used by `benches/compare-qemu-img.sh`.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use block::{Base, BlockError, Layer, fork};

/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// Size of the benchmark base image.
pub const BASE_SIZE: u64 = 2 << 30;
/// Real data in the base.
pub const BASE_DATA: u64 = 256 * MIB;
/// Data the active delta writes.
pub const DIRTY: u64 = 256 * MIB;
/// Extent size of the random workload.
pub const EXTENT: u64 = 64 << 10;

/// Where the active delta's writes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// 256 MiB in distinct random 64 KiB extents over the whole disk.
    Random,
    /// 256 MiB in one run starting at 512 MiB.
    Sequential,
}

/// A built workload: a base, and the two children of a fork of it.
#[derive(Debug)]
pub struct Workload {
    /// The raw base image.
    pub base: PathBuf,
    /// The active delta (holds the dirty data).
    pub active: PathBuf,
    /// The upgrade delta (empty: the comparison with `qemu-img commit` is two-way).
    pub upgrade: PathBuf,
    /// The extents the active delta wrote (offset, length).
    pub extents: Vec<(u64, u64)>,
}

/// A small deterministic generator (xorshift64*).
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    /// `n` distinct values below `bound`, in random order.
    pub fn distinct(&mut self, n: u64, bound: u64) -> Vec<u64> {
        let mut all: Vec<u64> = (0..bound).collect();
        for i in 0..n as usize {
            let j = i + (self.next_u64() % (bound - i as u64)) as usize;
            all.swap(i, j);
        }
        all.truncate(n as usize);
        all
    }
}

/// Builds the workload in `dir` (which must be empty).
pub fn build(dir: &Path, pattern: Pattern) -> Result<Workload, BlockError> {
    let mut rng = Rng(0x00c0_ffee_1234_5678);
    let base = dir.join("base.img");
    let f = std::fs::File::create(&base).map_err(|e| io(&base, e))?;
    f.set_len(BASE_SIZE).map_err(|e| io(&base, e))?;
    let mut buf = vec![0u8; MIB as usize];
    for slot in rng.distinct(BASE_DATA / MIB, BASE_SIZE / MIB) {
        rng.fill(&mut buf);
        f.write_all_at(&buf, slot * MIB).map_err(|e| io(&base, e))?;
    }
    f.sync_all().map_err(|e| io(&base, e))?;
    drop(f);
    let parent = Arc::new(Layer::Base(Base::adopt(&base)?));
    let (active, upgrade) = (dir.join("active"), dir.join("upgrade"));
    let (a, _b) = fork(parent, &active, &upgrade)?;
    let extents: Vec<(u64, u64)> = match pattern {
        Pattern::Random => {
            let mut slots = rng.distinct(DIRTY / EXTENT, BASE_SIZE / EXTENT);
            slots.sort_unstable();
            slots.into_iter().map(|s| (s * EXTENT, EXTENT)).collect()
        }
        Pattern::Sequential => (0..DIRTY / MIB)
            .map(|i| (512 * MIB + i * MIB, MIB))
            .collect(),
    };
    for &(off, len) in &extents {
        rng.fill(&mut buf[..len as usize]);
        a.write_at(&buf[..len as usize], off)?;
    }
    a.flush()?;
    Ok(Workload {
        base,
        active,
        upgrade,
        extents,
    })
}

fn io(path: &Path, source: std::io::Error) -> BlockError {
    BlockError::Io {
        op: "write",
        path: path.to_path_buf(),
        source,
    }
}
