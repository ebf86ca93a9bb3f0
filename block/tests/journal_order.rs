//! The ordering of a flush that carries its data in the journal (journal version 2: one append,
//! one fdatasync, the data file synced later), checked by building the files a crash of the
//! machine can leave behind:
//!
//! - the journal append torn at any set of 512-byte sectors, with the data file holding the
//!   new or the old version of each block written in place (kill between the write and the
//!   sync; records without data; data without records);
//! - the journal complete but the data file missing the flushed writes (the data file is not
//!   synced by such a flush);
//! - a version 1 journal (records only) opened, appended to and converted by compaction.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

mod rng;
use rng::Rng;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use block::journal::{Record, RecordKind};
use block::{Base, BlockError, Delta, INLINE_FLUSH_BYTES, Layer};

const BS: u64 = 4096;
const BLOCKS: u64 = 64;
const SECTOR: usize = 512;

/// Content of `block` at `version` (0: the base). Self-checking, no zero sector.
fn pattern(block: u64, version: u64) -> Vec<u8> {
    let mut b = vec![(block as u8).wrapping_mul(7) ^ (version as u8) | 1; BS as usize];
    b[0..8].copy_from_slice(&block.to_le_bytes());
    b[8..16].copy_from_slice(&version.to_le_bytes());
    b
}

fn base(dir: &Path) -> Arc<Layer> {
    base_of(dir, BLOCKS)
}

/// A base of `blocks` blocks, each at version 0.
fn base_of(dir: &Path, blocks: u64) -> Arc<Layer> {
    let p = dir.join("base.img");
    let f = std::fs::File::create(&p).unwrap();
    for b in 0..blocks {
        f.write_all_at(&pattern(b, 0), b * BS).unwrap();
    }
    drop(f);
    Arc::new(Layer::Base(Base::adopt(&p).unwrap()))
}

/// The version each block shows (panics on anything that is not a whole version).
fn versions(d: &Delta) -> Vec<u64> {
    let mut buf = vec![0u8; BS as usize];
    (0..BLOCKS)
        .map(|b| {
            d.read_at(&mut buf, b * BS).unwrap();
            let v = u64::from_le_bytes(buf[8..16].try_into().unwrap());
            assert_eq!(buf, pattern(b, v), "block {b} is torn or garbage");
            v
        })
        .collect()
}

/// One round of writes (1 to 4 blocks each, `writes` of them) at `version`, then a flush;
/// updates `model`. The flush stays under [`INLINE_FLUSH_BYTES`], so it carries its data.
fn round(d: &Delta, rng: &mut Rng, version: u64, writes: u64, model: &mut [u64]) {
    let mut bytes = 0;
    for _ in 0..writes {
        let block = rng.below(BLOCKS);
        let n = (1 + rng.below(4)).min(BLOCKS - block);
        let buf: Vec<u8> = (block..block + n)
            .flat_map(|b| pattern(b, version))
            .collect();
        d.write_at(&buf, block * BS).unwrap();
        for b in block..block + n {
            model[b as usize] = version;
        }
        bytes += n * BS;
    }
    assert!(bytes <= INLINE_FLUSH_BYTES);
    d.flush().unwrap();
}

fn journal_path(dir: &Path) -> std::path::PathBuf {
    dir.join(block::JOURNAL_FILE)
}

fn data_path(dir: &Path) -> std::path::PathBuf {
    dir.join(block::DATA_FILE)
}

fn write_file(p: &Path, bytes: &[u8]) {
    std::fs::write(p, bytes).unwrap();
}

/// The journal append of the last flush torn at random sets of sectors (in place data old or
/// new per block): the delta always opens and shows exactly the state of the previous flush,
/// or, when every sector of the append reached the file, exactly the new one.
#[test]
fn a_torn_append_shows_the_previous_flush_or_the_new_one() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("d");
    let d = Delta::create(&dir, base(t.path())).unwrap();
    let mut rng = Rng(0x5eed_1234_abcd);
    let mut before = vec![0u64; BLOCKS as usize];
    for v in 1..=5 {
        round(&d, &mut rng, v, 3, &mut before);
    }
    let l0 = d.journal_len() as usize;
    let (j0, d0) = (
        std::fs::read(journal_path(&dir)).unwrap(),
        std::fs::read(data_path(&dir)).unwrap(),
    );
    let mut after = before.clone();
    round(&d, &mut rng, 6, 6, &mut after);
    let l1 = d.journal_len() as usize;
    assert!(
        l1 - l0 > 6 * BS as usize,
        "the flush carries its data in the journal"
    );
    drop(d);
    let (j1, d1) = (
        std::fs::read(journal_path(&dir)).unwrap(),
        std::fs::read(data_path(&dir)).unwrap(),
    );
    let changed: Vec<u64> = (0..BLOCKS)
        .filter(|&b| before[b as usize] != after[b as usize])
        .collect();
    let sectors = (l0 / SECTOR)..l1.div_ceil(SECTOR);
    let (mut complete, mut torn) = (0, 0);
    for trial in 0..300u64 {
        // Which sectors of the append reached the file: all, none, a prefix, a suffix, or
        // each with probability 1/2 or 7/8.
        let mode = trial % 6;
        let cut = sectors.start + rng.below((sectors.end - sectors.start) as u64) as usize;
        let mut j = j0.clone();
        j.resize(j1.len(), 0);
        for s in sectors.clone() {
            let written = match mode {
                0 => true,
                1 => false,
                2 => s < cut,
                3 => s >= cut,
                4 => rng.below(2) == 0,
                _ => rng.below(8) != 0,
            };
            if written {
                let (lo, hi) = ((s * SECTOR).max(l0), ((s + 1) * SECTOR).min(j1.len()));
                j[lo..hi].copy_from_slice(&j1[lo..hi]);
            }
        }
        // Each block written in place shows its old or its new version in the data file.
        let mut data = d0.clone();
        for &b in &changed {
            if rng.below(2) == 0 {
                let r = (b * BS) as usize..((b + 1) * BS) as usize;
                data[r.clone()].copy_from_slice(&d1[r]);
            }
        }
        write_file(&journal_path(&dir), &j);
        write_file(&data_path(&dir), &data);
        let whole = j[l0..l1] == j1[l0..l1];
        let d = Delta::open(&dir).unwrap_or_else(|e| panic!("trial {trial}: open failed: {e}"));
        let want = if whole { &after } else { &before };
        assert_eq!(
            &versions(&d),
            want,
            "trial {trial} (mode {mode}, whole {whole})"
        );
        if whole {
            complete += 1;
        } else {
            torn += 1;
        }
        // The torn tail was cleared: the delta takes writes and flushes again.
        d.write_at(&pattern(0, 99), 0).unwrap();
        d.flush().unwrap();
        drop(d);
        let d = Delta::open_read_only(&dir).unwrap();
        assert_eq!(versions(&d)[0], 99);
    }
    assert!(
        complete >= 50 && torn >= 150,
        "{complete} complete, {torn} torn"
    );
}

/// After a flush that carried its data, the data file may miss those writes (it was not
/// synced): each written block holds zeros, an older version, or a mix of sectors of two
/// versions. Opening (read-only or writable) shows exactly the flushed contents.
#[test]
fn flushed_data_missing_from_the_data_file_is_replayed_from_the_journal() {
    for read_only_first in [true, false] {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("d");
        let d = Delta::create(&dir, base(t.path())).unwrap();
        let mut rng = Rng(if read_only_first { 77 } else { 78 });
        let mut model = vec![0u64; BLOCKS as usize];
        let mut history: Vec<Vec<u64>> = vec![model.clone()];
        for v in 1..=8 {
            round(&d, &mut rng, v, 4, &mut model);
            history.push(model.clone());
        }
        drop(d);
        let path = data_path(&dir);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut lost = 0;
        for b in 0..BLOCKS {
            let v = model[b as usize];
            if v == 0 {
                continue;
            }
            // A version of this block the data file could hold: none yet (zeros), or one
            // written before (an older page written back, the newer one not).
            let older: Vec<u64> = history
                .iter()
                .map(|h| h[b as usize])
                .filter(|&o| o != 0 && o < v)
                .collect();
            let stale = match rng.below(3) {
                0 => vec![0u8; BS as usize],
                1 if !older.is_empty() => pattern(b, older[rng.below(older.len() as u64) as usize]),
                _ => {
                    let mut mix = pattern(b, v);
                    let s = 1 + rng.below(BS / SECTOR as u64 - 1) as usize;
                    mix[s * SECTOR..].fill(0);
                    mix
                }
            };
            f.write_all_at(&stale, b * BS).unwrap();
            lost += 1;
        }
        drop(f);
        assert!(lost > 10);
        if read_only_first {
            let d = Delta::open_read_only(&dir).unwrap();
            assert_eq!(versions(&d), model, "read-only open");
        }
        let d = Delta::open(&dir).unwrap();
        assert_eq!(versions(&d), model, "writable open");
    }
}

/// The header's format version, read from the journal file.
fn journal_version(dir: &Path) -> u64 {
    let j = std::fs::read(journal_path(dir)).unwrap();
    Record::decode(j[..64].try_into().unwrap()).unwrap().aux
}

/// A delta written before journal version 2 (records only, data synced in the data file
/// first) opens, is appended to in its own format, and is converted by compaction.
#[test]
fn a_version_1_delta_opens_and_is_converted_by_compaction() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("d");
    drop(Delta::create(&dir, base(t.path())).unwrap());
    let created = std::fs::read(journal_path(&dir)).unwrap();
    let uuid = Record::decode(created[..64].try_into().unwrap())
        .unwrap()
        .tag;
    // What version 1 wrote for two writes and their flush.
    let data = std::fs::OpenOptions::new()
        .write(true)
        .open(data_path(&dir))
        .unwrap();
    data.write_all_at(&[pattern(3, 1), pattern(4, 1)].concat(), 3 * BS)
        .unwrap();
    data.write_all_at(&pattern(9, 2), 9 * BS).unwrap();
    let mut header = Record::new(RecordKind::Header, 0, BLOCKS * BS, 0);
    header.aux = 1;
    header.tag = uuid;
    let mut j = Vec::new();
    for r in [
        header,
        Record::new(RecordKind::Write, 1, 3 * BS, 2 * BS),
        Record::new(RecordKind::Write, 2, 9 * BS, BS),
        Record::new(RecordKind::Flush, 3, 0, 0),
    ] {
        j.extend_from_slice(&r.encode());
    }
    write_file(&journal_path(&dir), &j);

    let d = Delta::open(&dir).unwrap();
    let mut want = vec![0u64; BLOCKS as usize];
    want[3] = 1;
    want[4] = 1;
    want[9] = 2;
    assert_eq!(versions(&d), want);
    // Appended to in version 1: records only.
    let len = d.journal_len();
    d.write_at(&pattern(5, 3), 5 * BS).unwrap();
    d.flush().unwrap();
    want[5] = 3;
    assert_eq!(d.journal_len() - len, 128, "WRITE and FLUSH, no data");
    assert_eq!(journal_version(&dir), 1);
    drop(d);
    let d = Delta::open(&dir).unwrap();
    assert_eq!(versions(&d), want);
    // Compaction converts it; flushes then carry their data.
    d.compact().unwrap();
    assert_eq!(journal_version(&dir), 2);
    let len = d.journal_len();
    d.write_at(&pattern(6, 4), 6 * BS).unwrap();
    d.flush().unwrap();
    want[6] = 4;
    assert!(d.journal_len() - len > BS);
    drop(d);
    let d = Delta::open(&dir).unwrap();
    assert_eq!(versions(&d), want);
    assert!(d.changed_since(3).iter().any(|e| e.offset == 5 * BS));
}

/// A version this code does not know is refused with a typed error naming it.
#[test]
fn an_unknown_journal_version_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("d");
    drop(Delta::create(&dir, base(t.path())).unwrap());
    let mut j = std::fs::read(journal_path(&dir)).unwrap();
    let mut h = Record::decode(j[..64].try_into().unwrap()).unwrap();
    h.aux = 3;
    j[..64].copy_from_slice(&h.encode());
    write_file(&journal_path(&dir), &j);
    let e = Delta::open(&dir).unwrap_err();
    assert!(
        matches!(
            e,
            BlockError::Journal {
                source: block::journal::JournalError::Version { version: 3, .. },
                ..
            }
        ),
        "{e}"
    );
}

/// Writes smaller than a block (read-modify-written), overlapping writes and zeroed ranges in
/// one flush, then the data file loses every block: the journal alone gives the contents.
#[test]
fn partial_and_overlapping_writes_of_one_flush_are_replayed() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("d");
    let d = Delta::create(&dir, base(t.path())).unwrap();
    let mut want: Vec<u8> = (0..BLOCKS).flat_map(|b| pattern(b, 0)).collect();
    let mut write = |d: &Delta, off: u64, bytes: Vec<u8>| {
        d.write_at(&bytes, off).unwrap();
        want[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
    };
    write(&d, 2 * BS + 512, vec![0xa1; 1024]);
    write(&d, 3 * BS, vec![0xb2; 3 * BS as usize]);
    write(&d, 4 * BS + 1536, vec![0xc3; 2048 + BS as usize]);
    d.write_zeroes(5 * BS + 512, 512).unwrap();
    want[(5 * BS + 512) as usize..(5 * BS + 1024) as usize].fill(0);
    d.flush().unwrap();
    drop(d);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(data_path(&dir))
        .unwrap();
    f.write_all_at(&vec![0u8; (BLOCKS * BS) as usize], 0)
        .unwrap();
    drop(f);
    let d = Delta::open(&dir).unwrap();
    let mut got = vec![0u8; (BLOCKS * BS) as usize];
    d.read_at(&mut got, 0).unwrap();
    assert!(got == want, "contents differ from the flushed writes");
}

/// `write_at_raw` (the device's write from guest memory): aligned writes while the pending
/// flush carries its data (copied into it), after it stopped doing so (written straight from
/// the caller's memory), and unaligned ones, all survive a flush and a reopen.
#[test]
fn raw_writes_land_whether_or_not_the_flush_carries_data() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("d");
    const N: u64 = 256;
    let d = Delta::create(&dir, base_of(t.path(), N)).unwrap();
    let mut want: Vec<u8> = (0..N).flat_map(|b| pattern(b, 0)).collect();
    let mut scratch = Vec::new();
    let mut raw = |d: &Delta, off: u64, bytes: Vec<u8>| {
        // SAFETY: `bytes` is valid for its length during the call.
        unsafe { d.write_at_raw(bytes.as_ptr(), bytes.len(), off, &mut scratch) }.unwrap();
        want[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
    };
    raw(&d, BS, pattern(1, 1));
    raw(&d, 2 * BS + 512, vec![0x77; 512]);
    // More than a flush carries: the rest is written straight from the caller's memory.
    let big = INLINE_FLUSH_BYTES / BS + 1;
    raw(
        &d,
        8 * BS,
        (8..8 + big).flat_map(|b| pattern(b, 2)).collect(),
    );
    raw(&d, 3 * BS, pattern(3, 3));
    raw(&d, 4 * BS + 1024, vec![0x88; 1024]);
    d.flush().unwrap();
    drop(d);
    let d = Delta::open(&dir).unwrap();
    let mut got = vec![0u8; (N * BS) as usize];
    d.read_at(&mut got, 0).unwrap();
    assert!(got == want, "contents differ from the raw writes");
}

/// Aligned raw writes whose flush carries their data: a data file that lost them (never
/// synced, as after a power cut) gets them back from the journal's copy at the next open.
#[test]
fn raw_writes_carried_by_the_flush_are_restored_from_the_journal() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("d");
    const N: u64 = 16;
    let d = Delta::create(&dir, base_of(t.path(), N)).unwrap();
    let mut want: Vec<u8> = (0..N).flat_map(|b| pattern(b, 0)).collect();
    let mut scratch = Vec::new();
    for (block, round) in [(1u64, 1u64), (3, 2), (4, 3), (3, 4)] {
        let bytes: Vec<u8> = (block..block + 2).flat_map(|b| pattern(b, round)).collect();
        let off = block * BS;
        // SAFETY: `bytes` is valid for its length during the call.
        unsafe { d.write_at_raw(bytes.as_ptr(), bytes.len(), off, &mut scratch) }.unwrap();
        want[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
    }
    d.flush().unwrap();
    drop(d);
    let data = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("data"))
        .unwrap();
    data.write_all_at(&vec![0xee; (5 * BS) as usize], BS)
        .unwrap();
    drop(data);
    let d = Delta::open(&dir).unwrap();
    let mut got = vec![0u8; (N * BS) as usize];
    d.read_at(&mut got, 0).unwrap();
    assert!(
        got == want,
        "the journal's copies did not restore the raw writes"
    );
}

/// The versions the data file itself holds (no overlay, no replay), one per block; `None`
/// where it holds something else (a hole, or a torn block).
fn data_file_versions(dir: &Path) -> Vec<Option<u64>> {
    let bytes = std::fs::read(data_path(dir)).unwrap();
    (0..BLOCKS)
        .map(|b| {
            let blk = &bytes[(b * BS) as usize..((b + 1) * BS) as usize];
            let v = u64::from_le_bytes(blk[8..16].try_into().unwrap());
            (blk == pattern(b, v).as_slice()).then_some(v)
        })
        .collect()
}

/// Asserts that the data file holds, in place, the version `model` gives every block a
/// delta wrote (blocks it never wrote, version 0, are not looked at).
fn assert_data_file_holds(dir: &Path, model: &[u64]) {
    let got: Vec<Option<u64>> = data_file_versions(dir)
        .iter()
        .zip(model)
        .map(|(&g, &m)| if m == 0 { None } else { g })
        .collect();
    let want: Vec<Option<u64>> = model.iter().map(|&v| (v != 0).then_some(v)).collect();
    assert_eq!(got, want, "the data file after the writeback");
}

/// Writes carried by their flush reach the data file after the flush, in the background:
/// reads see every write at once (pending, committed and waiting, or written back), and once
/// the delta is closed the data file holds the latest version of every block in place, even
/// though each block was overwritten in many batches (the batches land in commit order).
#[test]
fn carried_writes_are_read_at_once_and_reach_the_data_file_in_commit_order() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("d");
    let d = Delta::create(&dir, base(t.path())).unwrap();
    let mut rng = Rng(91);
    let mut model = vec![0u64; BLOCKS as usize];
    for v in 1..=300u64 {
        // Overwrites of a few hot blocks, so that queued batches overlap.
        let block = rng.below(8);
        let n = 1 + rng.below(4);
        let buf: Vec<u8> = (block..block + n).flat_map(|b| pattern(b, v)).collect();
        d.write_at(&buf, block * BS).unwrap();
        for b in block..block + n {
            model[b as usize] = v;
        }
        // Before its flush: the write is only in the overlay.
        assert_eq!(versions(&d), model, "before the flush of version {v}");
        d.flush().unwrap();
        assert_eq!(versions(&d), model, "after the flush of version {v}");
    }
    drop(d);
    assert_data_file_holds(&dir, &model);
    let d = Delta::open(&dir).unwrap();
    assert_eq!(versions(&d), model, "reopened");
}

/// A carried write's bytes wait in the buffer its flush's append was laid out in; while its
/// batch is queued for the writeback (held here), later batches must be laid out elsewhere,
/// not over it: every queued version stays readable, and reaches the data file once released.
/// Forty batches: more than a delta has stage buffers for, so that a flush also finds them
/// all held and writes the queued batches to free them.
#[test]
fn queued_batches_keep_their_bytes_while_later_ones_are_laid_out() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("d");
    let d = Delta::create(&dir, base(t.path())).unwrap();
    d.hold_writeback(true);
    let mut model = vec![0u64; BLOCKS as usize];
    for v in 1..=40u64 {
        // Different blocks each time, 1 to 3 of them, so that a batch laid out over a queued
        // one shows at once.
        let block = (5 * v) % (BLOCKS - 3);
        let n = 1 + v % 3;
        let buf: Vec<u8> = (block..block + n).flat_map(|b| pattern(b, v)).collect();
        d.write_at(&buf, block * BS).unwrap();
        for b in block..block + n {
            model[b as usize] = v;
        }
        d.flush().unwrap();
        assert_eq!(
            versions(&d),
            model,
            "after the flush of version {v}, writeback held"
        );
    }
    d.hold_writeback(false);
    drop(d);
    assert_data_file_holds(&dir, &model);
    let d = Delta::open(&dir).unwrap();
    assert_eq!(versions(&d), model, "reopened");
}

/// A batch with more records than a stage has room for (thousands of discards between carried
/// writes) stops carrying its data mid-batch and takes the two-sync path: the writes carried
/// before that point are put in place first, and every change is there, flushed and reopened.
#[test]
fn a_batch_of_many_records_stops_carrying_and_keeps_every_change() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("d");
    let d = Delta::create(&dir, base(t.path())).unwrap();
    // Every block a version of its own, flushed.
    for b in 0..BLOCKS {
        d.write_at(&pattern(b, 1), b * BS).unwrap();
    }
    d.flush().unwrap();
    // One batch: carried writes (even blocks get version 2 or 3), then 9600 discards (of the
    // odd blocks, over and over: more records than the stage has room for).
    let mut want: Vec<Option<u64>> = (0..BLOCKS).map(|_| Some(1)).collect();
    for b in (0..BLOCKS).step_by(2) {
        d.write_at(&pattern(b, 2), b * BS).unwrap();
        want[b as usize] = Some(2);
    }
    for b in (0..BLOCKS).step_by(4) {
        d.write_at(&pattern(b, 3), b * BS).unwrap();
        want[b as usize] = Some(3);
    }
    // The batch ends with discards, thousands of them: the stage fills up among them, with
    // no write after.
    for _ in 0..300 {
        for b in (1..BLOCKS).step_by(2) {
            d.discard(b * BS, BS).unwrap();
            want[b as usize] = None;
        }
    }
    // The last records discard blocks this batch wrote: they must reach the journal too.
    d.discard(0, 8 * BS).unwrap();
    for w in &mut want[..8] {
        *w = None;
    }
    let check = |d: &Delta, when: &str| {
        let mut buf = vec![0u8; BS as usize];
        for b in 0..BLOCKS {
            d.read_at(&mut buf, b * BS).unwrap();
            let expect = match want[b as usize] {
                Some(v) => pattern(b, v),
                None => vec![0; BS as usize],
            };
            assert!(
                buf == expect,
                "block {b} {when}: want {:?}",
                want[b as usize]
            );
        }
    };
    check(&d, "before the flush");
    d.flush().unwrap();
    check(&d, "after the flush");
    drop(d);
    let d = Delta::open(&dir).unwrap();
    check(&d, "reopened");
}

/// A write that the flush cannot carry (more than [`INLINE_FLUSH_BYTES`]) goes to the data
/// file at once; the carried writes queued before it must land first, so it is never
/// overwritten by an older one; a discard is never undone by one; and a freeze (whose FORK
/// record says the data file holds every write) puts them all in place. The writeback is held
/// so that flushed batches are still queued when each of these comes.
#[test]
fn writes_to_the_data_file_wait_for_carried_ones() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("d");
    let blocks = 2 * (INLINE_FLUSH_BYTES / BS);
    let d = Delta::create(&dir, base_of(t.path(), blocks)).unwrap();
    d.hold_writeback(true);
    let mut model = vec![0u64; BLOCKS as usize];
    for v in 1..=40u64 {
        let b = v % 4;
        // Carried: block b at version v, flushed (queued for the writeback).
        d.write_at(&pattern(b, v), b * BS).unwrap();
        d.flush().unwrap();
        // Not carried: more than INLINE_FLUSH_BYTES in one write, over block b again.
        let big = INLINE_FLUSH_BYTES / BS + 1;
        let buf: Vec<u8> = (b..b + big).flat_map(|x| pattern(x, v + 1000)).collect();
        d.write_at(&buf, b * BS).unwrap();
        for x in b..(b + big).min(BLOCKS) {
            model[x as usize] = v + 1000;
        }
        d.flush().unwrap();
        assert_eq!(versions(&d), model, "round {v}");
    }
    // A carried write, then a discard of it.
    d.write_at(&pattern(60, 7), 60 * BS).unwrap();
    d.flush().unwrap();
    d.discard(60 * BS, BS).unwrap();
    d.flush().unwrap();
    model[60] = 0;
    // A carried write, then a freeze.
    d.write_at(&pattern(61, 9), 61 * BS).unwrap();
    d.flush().unwrap();
    model[61] = 9;
    d.freeze().unwrap();
    let check = |when: &str| {
        let on_disk = data_file_versions(&dir);
        for b in 0..BLOCKS {
            let m = model[b as usize];
            if m != 0 {
                assert_eq!(
                    on_disk[b as usize],
                    Some(m),
                    "block {b} in the data file {when}"
                );
            }
        }
        let bytes = std::fs::read(data_path(&dir)).unwrap();
        assert!(
            bytes[(60 * BS) as usize..(61 * BS) as usize]
                .iter()
                .all(|&x| x == 0),
            "the discarded block was written back after its discard ({when})"
        );
    };
    check("after the freeze");
    drop(d);
    check("after close");
}

/// A flush whose data would take the journal past its budget syncs the data file instead,
/// and the journal is compacted by that same flush, so later flushes carry their data again
/// (before, only a journal that itself reached the budget was compacted, so flushes of
/// records alone kept taking the two-sync path until they filled the gap).
#[test]
fn a_flush_stopped_by_the_journal_budget_compacts_it() {
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let dir = t.path().join("d");
    let d = Delta::create(&dir, base_of(t.path(), 256)).unwrap();
    // 48 KiB per flush: the last flush that fits leaves a gap of at least 48 KiB below the
    // budget (64 MiB, about 1400 flushes).
    let write = 48u64 << 10;
    let buf = vec![0x5au8; write as usize];
    let mut prev = d.journal_len();
    let mut compacted = false;
    for i in 0..2000u64 {
        d.write_at(&buf, (i % 16) * write).unwrap();
        d.flush().unwrap();
        let len = d.journal_len();
        if len < prev {
            compacted = true;
            break;
        }
        assert!(
            len >= prev + write,
            "flush {i} did not carry its data ({prev} -> {len}) and the journal was not compacted"
        );
        prev = len;
    }
    assert!(compacted, "the journal was never compacted");
    // And flushes carry their data again.
    let before = d.journal_len();
    d.write_at(&buf, 0).unwrap();
    d.flush().unwrap();
    assert!(
        d.journal_len() >= before + write,
        "the next flush carried no data"
    );
}

/// Once a journal holds a few MiB, the writeback thread keeps zeroed space ahead of its end
/// (so that flushes seldom grow it themselves): the file then reaches past the journal's length,
/// that space reads as zeros (what recovery takes for never-written space), later appends land
/// in it, and the delta reopens with every flushed write and nothing discarded.
#[test]
fn zeros_kept_ahead_of_the_journal_are_appended_into_and_recovered() {
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let dir = t.path().join("d");
    let blocks = 64u64;
    let d = Delta::create(&dir, base_of(t.path(), blocks)).unwrap();
    let jp = journal_path(&dir);
    let mut model = vec![0u64; BLOCKS as usize];
    let mut version = 0;
    let mut flushes = |d: &Delta, n: u64, model: &mut [u64]| {
        for _ in 0..n {
            version += 1;
            let b = version % (blocks - 16);
            let buf: Vec<u8> = (b..b + 16).flat_map(|x| pattern(x, version)).collect();
            d.write_at(&buf, b * BS).unwrap();
            for x in b..b + 16 {
                model[x as usize] = version;
            }
            d.flush().unwrap();
        }
    };
    flushes(&d, 48, &mut model);
    // The thread extends the space when it is idle after a batch.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let ahead = |d: &Delta| {
        std::fs::metadata(&jp)
            .unwrap()
            .len()
            .saturating_sub(d.journal_len())
    };
    while ahead(&d) < (1 << 20) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(ahead(&d) >= 1 << 20, "no zeros ahead: {} bytes", ahead(&d));
    let bytes = std::fs::read(&jp).unwrap();
    assert!(
        bytes[d.journal_len() as usize..].iter().all(|&x| x == 0),
        "the space ahead of the journal is not zeros"
    );
    // Appends into that space, then a reopen.
    flushes(&d, 64, &mut model);
    assert_eq!(versions(&d), model);
    drop(d);
    let d = Delta::open(&dir).unwrap();
    assert_eq!(versions(&d), model, "reopened");
    assert_eq!(d.recovered_discarded_bytes(), 0);
}
