//! Layers, journal recovery, fork, and corruption handling.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use block::{Base, BlockError, Delta, Layer, fork, prepare_fork};

const MIB: u64 = 1 << 20;

fn base_with(dir: &Path, size: u64, fill: u8) -> Arc<Layer> {
    let p = dir.join("base.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(&vec![fill; size as usize], 0).unwrap();
    drop(f);
    Arc::new(Layer::Base(Base::adopt(&p).unwrap()))
}

fn same(got: &[u8], want: &[u8]) -> bool {
    if got == want {
        return true;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    eprintln!(
        "mismatch at byte {first:?} of {} / {}",
        got.len(),
        want.len()
    );
    false
}

fn read(d: &Delta, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read_at(&mut b, off).unwrap();
    b
}

#[test]
fn reads_fall_through_and_writes_survive_reopen() {
    let t = tempfile::tempdir().unwrap();
    let base = base_with(t.path(), MIB, 0xbb);
    let dp = t.path().join("d");
    let d = Delta::create(&dp, base).unwrap();
    assert!(same(&read(&d, 0, 8192), &vec![0xbb; 8192]));
    d.write_at(&[1; 4096], 4096).unwrap();
    d.write_at(&[2; 512], 512).unwrap(); // partial block: read-modify-write
    d.write_zeroes(16384, 8192).unwrap();
    let mut want = vec![0xbbu8; 32768];
    want[4096..8192].fill(1);
    want[512..1024].fill(2);
    want[16384..24576].fill(0);
    assert!(same(&read(&d, 0, 32768), &want));
    let seq = d.flush().unwrap();
    assert_eq!(seq, d.durable_seq());
    // Never flushed, to a block the delta did not hold: gone after reopen. (An unflushed
    // overwrite of a held block may or may not survive, like on a real disk.)
    d.write_at(&[9; 4096], 8192).unwrap();
    drop(d);
    let d = Delta::open(&dp).unwrap();
    assert!(same(&read(&d, 0, 32768), &want));
    assert_eq!(d.durable_seq(), seq);
    let ch = d.changed_since(0);
    assert_eq!(ch.iter().map(|e| e.len).sum::<u64>(), 4 * 4096);
    assert!(d.changed_since(seq).is_empty());
}

#[test]
fn bad_io_gives_typed_errors() {
    let t = tempfile::tempdir().unwrap();
    let base = base_with(t.path(), MIB, 0);
    let d = Delta::create(&t.path().join("d"), base).unwrap();
    assert!(matches!(
        d.write_at(&[0; 512], 100),
        Err(BlockError::Unaligned { .. })
    ));
    assert!(matches!(
        d.write_at(&[0; 4096], MIB),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        d.read_at(&mut [0; 512], u64::MAX - 511),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        d.write_zeroes(MIB - 4096, 8192),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        Delta::open(&t.path().join("nope")),
        Err(BlockError::Io { .. })
    ));
    assert!(matches!(
        Base::open(&t.path().join("nope")),
        Err(BlockError::Io { .. })
    ));
    assert!(matches!(
        Delta::create(&t.path().join("d"), d.parent().clone()),
        Err(BlockError::Exists { .. })
    ));
    // A second writer is refused.
    assert!(matches!(
        Delta::open(&t.path().join("d")),
        Err(BlockError::Locked { .. })
    ));
}

#[test]
fn fork_freezes_and_children_diverge() {
    let t = tempfile::tempdir().unwrap();
    let base = base_with(t.path(), MIB, 0x11);
    let p = t.path().join("p");
    let d = Delta::create(&p, base).unwrap();
    d.write_at(&[0x22; 8192], 0).unwrap();
    let parent = Arc::new(Layer::Delta(d));
    let (a, b) = fork(
        Arc::clone(&parent),
        &t.path().join("a"),
        &t.path().join("b"),
    )
    .unwrap();
    let pd = parent.as_delta().unwrap();
    assert!(pd.is_read_only());
    assert!(matches!(
        pd.write_at(&[0; 4096], 0),
        Err(BlockError::ReadOnly { .. })
    ));
    a.write_at(&[0xaa; 4096], 0).unwrap();
    b.write_at(&[0xbb; 4096], 4096).unwrap();
    a.flush().unwrap();
    b.flush().unwrap();
    assert!(same(
        &read(&a, 0, 12288),
        &[vec![0xaa; 4096], vec![0x22; 4096], vec![0x11; 4096]].concat()
    ));
    assert!(same(
        &read(&b, 0, 12288),
        &[vec![0x22; 4096], vec![0xbb; 4096], vec![0x11; 4096]].concat()
    ));
    drop((a, b));
    // Children reopen (their parent is opened read-only alongside the frozen writer handle).
    let a = Delta::open(&t.path().join("a")).unwrap();
    assert!(same(&read(&a, 0, 4096), &vec![0xaa; 4096]));
    drop(a);
    drop(parent);
    let p2 = Delta::open(&p).unwrap();
    assert!(p2.frozen_seq().is_some());
    assert!(matches!(
        p2.write_at(&[0; 4096], 0),
        Err(BlockError::ReadOnly { .. })
    ));
}

/// A parent delta holding 0x22 in its first 8 KiB (flushed) over a 0x11 base.
fn flushed_parent(dir: &Path) -> (Arc<Layer>, std::path::PathBuf) {
    let base = base_with(dir, MIB, 0x11);
    let p = dir.join("p");
    let d = Delta::create(&p, base).unwrap();
    d.write_at(&[0x22; 8192], 0).unwrap();
    d.flush().unwrap();
    (Arc::new(Layer::Delta(d)), p)
}

type CutFork = (
    Arc<Layer>,
    std::path::PathBuf,
    [std::path::PathBuf; 2],
    Delta,
    Delta,
    Arc<block::ForkCommit>,
);

/// [`flushed_parent`] in `dir`, its fork into `dir/a` and `dir/b` prepared and cut.
fn cut_fork(dir: &Path) -> CutFork {
    let (parent, p) = flushed_parent(dir);
    let (ap, bp) = (dir.join("a"), dir.join("b"));
    let (a, b, commit) = prepare_fork(Arc::clone(&parent), &ap, &bp)
        .unwrap()
        .cut()
        .unwrap();
    (parent, p, [ap, bp], a, b, commit)
}

#[test]
fn fork_in_phases_cuts_without_io_and_commits_in_order() {
    let t = tempfile::tempdir().unwrap();
    let (parent, p) = flushed_parent(t.path());
    let (ap, bp) = (t.path().join("a"), t.path().join("b"));
    let prepared = prepare_fork(Arc::clone(&parent), &ap, &bp).unwrap();
    // Prepared: the parent still takes writes (they belong to the fork instant), and the
    // children cannot be opened yet.
    let pd = parent.as_delta().unwrap();
    pd.write_at(&[0x33; 4096], 4096).unwrap();
    assert!(matches!(
        Delta::open(&ap),
        Err(BlockError::IncompleteFork { .. })
    ));
    let (a, b, commit) = prepared.cut().unwrap();
    assert!(!commit.is_committed());
    assert!(matches!(
        pd.write_at(&[0; 4096], 0),
        Err(BlockError::ReadOnly { .. })
    ));
    // Cut, not committed: the children work at once and see the parent at the cut.
    let at_cut = [vec![0x22; 4096], vec![0x33; 4096], vec![0x11; 4096]].concat();
    assert!(same(&read(&a, 0, 12288), &at_cut));
    assert!(same(&read(&b, 0, 12288), &at_cut));
    a.write_at(&[0xaa; 4096], 8192).unwrap();
    b.write_at(&[0xbb; 4096], 8192).unwrap();
    // On disk nothing changed yet: the parent's journal has no FORK, the children no meta.
    assert!(!ap.join("meta").exists() && !bp.join("meta").exists());
    // A child's flush commits the whole fork first.
    a.flush().unwrap();
    assert!(commit.is_committed());
    assert!(ap.join("meta").exists() && bp.join("meta").exists());
    commit.commit().unwrap(); // idempotent
    b.flush().unwrap();
    drop((a, b, commit));
    drop(parent);
    let p2 = Delta::open(&p).unwrap();
    assert!(p2.frozen_seq().is_some());
    assert!(same(&read(&p2, 0, 12288), &at_cut));
    drop(p2);
    let a = Delta::open(&ap).unwrap();
    let b = Delta::open(&bp).unwrap();
    assert!(same(&read(&a, 8192, 4096), &vec![0xaa; 4096]));
    assert!(same(&read(&b, 8192, 4096), &vec![0xbb; 4096]));
    assert!(same(&read(&b, 0, 8192), &at_cut[..8192]));
}

#[test]
fn a_cut_fork_lost_before_its_commit_loses_nothing_acknowledged() {
    let t = tempfile::tempdir().unwrap();
    let (parent, p, [ap, bp], a, b, commit) = cut_fork(t.path());
    a.write_at(&[0xaa; 4096], 0).unwrap();
    // The process goes away here (no destructor writes anything).
    drop((a, b, commit, parent));
    // The parent is as at its last flush and still writable; the children say what they are.
    let p2 = Delta::open(&p).unwrap();
    assert_eq!(p2.frozen_seq(), None);
    assert!(same(&read(&p2, 0, 8192), &vec![0x22; 8192]));
    for c in [&ap, &bp] {
        assert!(matches!(
            Delta::open(c),
            Err(BlockError::IncompleteFork { .. })
        ));
    }
    // Removing them and forking again works.
    drop(p2);
    std::fs::remove_dir_all(&ap).unwrap();
    std::fs::remove_dir_all(&bp).unwrap();
    let parent = Arc::new(Layer::Delta(Delta::open(&p).unwrap()));
    let (a, _b) = fork(parent, &ap, &bp).unwrap();
    assert!(same(&read(&a, 0, 8192), &vec![0x22; 8192]));
}

#[test]
fn an_abandoned_child_is_left_out_of_the_commit() {
    let t = tempfile::tempdir().unwrap();
    let (parent, p, [ap, bp], a, b, commit) = cut_fork(t.path());
    // The clone that would have used `b` never ran: it is removed before the commit.
    commit.abandon(&bp);
    drop(b);
    std::fs::remove_dir_all(&bp).unwrap();
    a.write_at(&[0xaa; 4096], 0).unwrap();
    a.flush().unwrap();
    assert!(commit.is_committed());
    drop((a, commit, parent));
    assert!(Delta::open(&p).unwrap().frozen_seq().is_some());
    assert!(same(
        &read(&Delta::open(&ap).unwrap(), 0, 4096),
        &[0xaa; 4096]
    ));
}

#[test]
fn an_abandoned_or_failed_prepare_leaves_the_parent_untouched() {
    let t = tempfile::tempdir().unwrap();
    let (parent, _p) = flushed_parent(t.path());
    let (ap, bp) = (t.path().join("a"), t.path().join("b"));
    drop(prepare_fork(Arc::clone(&parent), &ap, &bp).unwrap());
    assert!(!ap.exists() && !bp.exists());
    std::fs::create_dir(&bp).unwrap();
    assert!(matches!(
        prepare_fork(Arc::clone(&parent), &ap, &bp),
        Err(BlockError::Exists { .. })
    ));
    assert!(
        !ap.exists(),
        "the first child is removed when the second fails"
    );
    let pd = parent.as_delta().unwrap();
    assert_eq!(pd.frozen_seq(), None);
    pd.write_at(&[0x44; 4096], 0).unwrap();
}

#[test]
fn wrong_base_identity_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let base = base_with(t.path(), MIB, 0x33);
    let dp = t.path().join("d");
    drop(Delta::create(&dp, base).unwrap());
    // Rewrite the base's first block: its fingerprint no longer matches.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(t.path().join("base.img"))
        .unwrap();
    f.write_all_at(&[0x44; 4096], 0).unwrap();
    drop(f);
    assert!(matches!(
        Delta::open(&dp),
        Err(BlockError::IdentityMismatch { .. })
    ));
    // A different base at the same path (new identity) is refused too.
    std::fs::remove_file(t.path().join("base.img.identity")).unwrap();
    Base::adopt(&t.path().join("base.img")).unwrap();
    assert!(matches!(
        Delta::open(&dp),
        Err(BlockError::IdentityMismatch { .. })
    ));
}

fn journal_with_three_flushes(t: &Path) -> (std::path::PathBuf, u64) {
    let base = base_with(t, MIB, 0);
    let dp = t.join("d");
    let d = Delta::create(&dp, base).unwrap();
    for i in 0..3u8 {
        d.write_at(&[i + 1; 4096], u64::from(i) * 4096).unwrap();
        d.flush().unwrap();
    }
    let len = d.journal_len();
    (dp, len)
}

#[test]
fn torn_tail_recovers_committed_prefix() {
    let t = tempfile::tempdir().unwrap();
    let (dp, len) = journal_with_three_flushes(t.path());
    let j = dp.join(block::JOURNAL_FILE);
    // Cut into the last batch (WRITE + FLUSH = 128 bytes): the last write is gone, not torn.
    for cut in [1u64, 63, 64, 100] {
        let f = std::fs::OpenOptions::new().write(true).open(&j).unwrap();
        f.set_len(len - cut).unwrap();
        drop(f);
        let d = Delta::open(&dp).unwrap();
        assert!(
            same(
                &read(&d, 0, 12288),
                &[vec![1; 4096], vec![2; 4096], vec![0; 4096]].concat()
            ),
            "cut {cut}"
        );
        assert!(d.recovered_discarded_bytes() > 0 || cut >= 64);
        // Recovery truncated the journal; appending works again.
        d.write_at(&[3; 4096], 8192).unwrap();
        d.flush().unwrap();
        drop(d);
        let d = Delta::open(&dp).unwrap();
        assert!(same(&read(&d, 8192, 4096), &vec![3; 4096]));
        drop(d);
    }
}

#[test]
fn flipped_bits_give_typed_errors() {
    let t = tempfile::tempdir().unwrap();
    let (dp, len) = journal_with_three_flushes(t.path());
    let j = dp.join(block::JOURNAL_FILE);
    let orig = std::fs::read(&j).unwrap();
    // Any bit in the header: BadHeader. Any bit in a committed record followed by valid ones:
    // Corrupt. A bit in the last record only: a torn tail (recovers two writes).
    for byte in (0..len as usize).step_by(7) {
        let mut c = orig.clone();
        c[byte] ^= 0x10;
        std::fs::write(&j, &c).unwrap();
        let r = Delta::open_read_only(&dp);
        if byte < 64 {
            assert!(
                matches!(
                    r,
                    Err(BlockError::Journal {
                        source: block::journal::JournalError::BadHeader { .. },
                        ..
                    })
                ),
                "byte {byte}: {r:?}"
            );
        } else if byte < len as usize - 64 {
            assert!(
                matches!(
                    r,
                    Err(BlockError::Journal {
                        source: block::journal::JournalError::Corrupt { .. },
                        ..
                    })
                ),
                "byte {byte}: {r:?}"
            );
        } else {
            let d = r.unwrap();
            assert!(same(
                &read(&d, 0, 12288),
                &[vec![1; 4096], vec![2; 4096], vec![0; 4096]].concat()
            ));
        }
    }
    // Repair keeps the committed prefix before the damage.
    let mut c = orig.clone();
    // The second batch's WRITE record (after the header, the three batches are the same size:
    // WRITE + FLUSH, and with a version 2 journal the 4 KiB the WRITE carries).
    let batch = (len as usize - 64) / 3;
    c[64 + batch + 5] ^= 1;
    std::fs::write(&j, &c).unwrap();
    let d = Delta::open_with(&dp, true, true).unwrap();
    assert!(same(
        &read(&d, 0, 8192),
        &[vec![1; 4096], vec![0; 4096]].concat()
    ));
}

#[test]
fn garbage_and_truncated_files_give_typed_errors() {
    let t = tempfile::tempdir().unwrap();
    let (dp, _) = journal_with_three_flushes(t.path());
    let j = dp.join(block::JOURNAL_FILE);
    let journal = std::fs::read(&j).unwrap();
    std::fs::write(&j, b"garbage garbage garbage").unwrap();
    assert!(matches!(
        Delta::open_read_only(&dp),
        Err(BlockError::Journal { .. })
    ));
    std::fs::write(&j, []).unwrap();
    assert!(matches!(
        Delta::open_read_only(&dp),
        Err(BlockError::Journal { .. })
    ));
    std::fs::write(&j, &journal).unwrap();
    let m = dp.join(block::META_FILE);
    let meta = std::fs::read(&m).unwrap();
    let mut bad = meta.clone();
    bad[10] ^= 1;
    std::fs::write(&m, &bad).unwrap();
    assert!(matches!(
        Delta::open_read_only(&dp),
        Err(BlockError::BadMeta { .. })
    ));
    std::fs::write(&m, &meta[..meta.len() / 2]).unwrap();
    assert!(matches!(
        Delta::open_read_only(&dp),
        Err(BlockError::BadMeta { .. })
    ));
    std::fs::write(&m, &meta).unwrap();
    let data = std::fs::OpenOptions::new()
        .write(true)
        .open(dp.join(block::DATA_FILE))
        .unwrap();
    data.set_len(4096).unwrap();
    let r = Delta::open_read_only(&dp);
    assert!(matches!(r, Err(BlockError::BadMeta { .. })), "{r:?}");
    let img = t.path().join("garbage.img");
    std::fs::write(&img, b"xyz").unwrap();
    assert!(matches!(
        Base::open(&img),
        Err(BlockError::MissingIdentity { .. })
    ));
    assert!(matches!(Base::adopt(&img), Err(BlockError::BadSize { .. })));
    assert!(matches!(
        Layer::open(&img),
        Err(BlockError::MissingIdentity { .. })
    ));
}

#[test]
fn disk_trait_on_layers() {
    use block::Disk;
    let t = tempfile::tempdir().unwrap();
    let base = base_with(t.path(), MIB, 7);
    assert!(base.is_read_only());
    assert!(matches!(
        base.write_at(&[0; 4096], 0),
        Err(BlockError::ReadOnly { .. })
    ));
    let d: Box<dyn Disk> = Box::new(Delta::create(&t.path().join("d"), base).unwrap());
    assert!(!d.is_read_only());
    assert_eq!(d.size(), MIB);
    d.write_at(&[1; 4096], 0).unwrap();
    d.discard(4096, 8192).unwrap();
    d.flush().unwrap();
    let mut b = vec![0u8; 16384];
    d.read_at(&mut b, 0).unwrap();
    assert!(same(
        &b,
        &[vec![1; 4096], vec![0; 8192], vec![7; 4096]].concat()
    ));
}

#[test]
fn compaction_keeps_content_and_sequence_numbers() {
    let t = tempfile::tempdir().unwrap();
    let base = base_with(t.path(), MIB, 0x10);
    let dp = t.path().join("d");
    let d = Delta::create(&dp, base).unwrap();
    let mut mid = 0;
    for i in 0..200u64 {
        d.write_at(&[(i % 250) as u8 + 1; 4096], (i % 5) * 4096)
            .unwrap();
        if i == 100 {
            d.write_zeroes(8 * 4096, 8192).unwrap();
            mid = d.flush().unwrap();
        }
        d.flush().unwrap();
    }
    let before_len = d.journal_len();
    let want = read(&d, 0, 65536);
    let changed = (d.changed_since(0), d.changed_since(mid));
    d.compact().unwrap();
    assert!(
        d.journal_len() * 10 < before_len,
        "{} vs {before_len}",
        d.journal_len()
    );
    assert!(same(&read(&d, 0, 65536), &want));
    assert_eq!((d.changed_since(0), d.changed_since(mid)), changed);
    // Appends after compaction, then recovery from the compacted journal.
    d.write_at(&[0xee; 4096], 20 * 4096).unwrap();
    d.flush().unwrap();
    drop(d);
    assert!(matches!(Delta::open(&dp).map(|x| x.compact()), Ok(Ok(()))));
    let d = Delta::open(&dp).unwrap();
    assert!(same(&read(&d, 0, 65536), &want));
    assert!(same(&read(&d, 20 * 4096, 4096), &[0xee; 4096]));
    assert_eq!(
        d.changed_since(mid),
        [changed.1.clone(), d.changed_since(d.durable_seq() - 2)].concat()
    );
    // The lock survives the journal being replaced.
    assert!(matches!(Delta::open(&dp), Err(BlockError::Locked { .. })));
}

#[test]
fn shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Delta>();
    assert_send_sync::<Layer>();
    let t = tempfile::tempdir().unwrap();
    let base = base_with(t.path(), MIB, 0);
    let d = Arc::new(Delta::create(&t.path().join("d"), base).unwrap());
    let hs: Vec<_> = (0..4u8)
        .map(|i| {
            let d = Arc::clone(&d);
            std::thread::spawn(move || {
                for k in 0..16u64 {
                    d.write_at(&[i + 1; 4096], (u64::from(i) * 16 + k) * 4096)
                        .unwrap();
                    if k % 4 == 0 {
                        d.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    d.flush().unwrap();
    for i in 0..4u8 {
        assert!(same(
            &read(&d, u64::from(i) * 16 * 4096, 16 * 4096),
            &vec![i + 1; 16 * 4096]
        ));
    }
}

mod garbage {
    use super::*;
    use proptest::prelude::*;

    fn delta_dir() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let t = tempfile::tempdir().unwrap();
        let (dp, _) = journal_with_three_flushes(t.path());
        let j = std::fs::read(dp.join(block::JOURNAL_FILE)).unwrap();
        (t, dp, j)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Random bytes as a journal, or a valid journal with random bytes spliced in: opening
        /// gives a delta or a typed error, never a panic; whatever opens reads fine.
        #[test]
        fn random_journal_bytes_never_panic(
            junk in prop::collection::vec(any::<u8>(), 0..600),
            at in 0usize..1024,
            splice: bool,
        ) {
            let (_t, dp, orig) = delta_dir();
            let bytes = if splice {
                let mut b = orig.clone();
                let at = at.min(b.len());
                let end = (at + junk.len()).min(b.len());
                b[at..end].copy_from_slice(&junk[..end - at]);
                b
            } else {
                junk
            };
            std::fs::write(dp.join(block::JOURNAL_FILE), &bytes).unwrap();
            for writable in [false, true] {
                if let Ok(d) = Delta::open_with(&dp, writable, false) {
                    let mut buf = vec![0u8; 12288];
                    d.read_at(&mut buf, 0).unwrap();
                }
            }
        }

        /// Random bytes as `meta`: a typed error, never a panic.
        #[test]
        fn random_meta_bytes_never_panic(junk in prop::collection::vec(any::<u8>(), 0..300)) {
            let (_t, dp, _) = delta_dir();
            std::fs::write(dp.join(block::META_FILE), &junk).unwrap();
            prop_assert!(Delta::open_read_only(&dp).is_err());
        }
    }
}
