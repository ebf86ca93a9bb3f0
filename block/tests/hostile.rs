//! Crafted on-disk input: parent chains that loop or go too deep, journals at the top of the
//! sequence range, and catch-up into a delta that is not the merge output.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use block::journal::{JournalError, MAX_SEQ};
use block::journal::{Record, RecordKind};
use block::merge::{self, MergeError, MergeOptions};
use block::{Base, BlockError, Delta, Layer, MAX_CHAIN_DEPTH, fork};

const MIB: u64 = 1 << 20;

fn base(dir: &Path) -> Arc<Layer> {
    let p = dir.join("base.img");
    Arc::new(Layer::Base(Base::create(&p, MIB).unwrap()))
}

/// Rewrites a delta's `meta` (JSON line + CRC32C line) with `edit` applied to its JSON.
fn edit_meta(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("meta");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    edit(&mut v);
    let json = serde_json::to_string(&v).unwrap();
    let body = format!("{json}\ncrc32c:{:08x}\n", crc32c::crc32c(json.as_bytes()));
    std::fs::write(&path, body).unwrap();
}

fn set_parent(dir: &Path, parent: &Path) {
    let parent = std::fs::canonicalize(parent).unwrap();
    edit_meta(dir, |v| {
        v["parent"]["path"] = serde_json::Value::String(parent.display().to_string());
    });
}

fn is_loop(e: &BlockError, at: &Path) -> bool {
    matches!(e, BlockError::ChainLoop { path } if path == at)
}

#[test]
fn a_delta_that_is_its_own_parent_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d");
    drop(Delta::create(&d, base(t.path())).unwrap());
    set_parent(&d, &d);
    for writable in [false, true] {
        let err = Delta::open_with(&d, writable, false).unwrap_err();
        assert!(err.to_string().contains("loops"), "{err}");
        assert!(matches!(err, BlockError::ChainLoop { .. }), "{err}");
    }
    assert!(matches!(Layer::open(&d), Err(BlockError::ChainLoop { .. })));
}

#[test]
fn a_parent_chain_through_a_descendant_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    drop(fork(base(t.path()), &a, &b).unwrap());
    // a over b, b over a: opening either comes back to it.
    set_parent(&a, &b);
    set_parent(&b, &a);
    let at = |p: &Path| std::fs::canonicalize(p).unwrap();
    let err = Delta::open_read_only(&a).unwrap_err();
    assert!(is_loop(&err, &at(&a)), "{err:?}");
    let err = Delta::open(&b).unwrap_err();
    assert!(is_loop(&err, &at(&b)), "{err:?}");
    // A copy of a delta (same UUID, other directory) as its own ancestor is a loop too.
    let c = t.path().join("c");
    std::fs::create_dir(&c).unwrap();
    for f in ["meta", "data", "journal"] {
        std::fs::copy(a.join(f), c.join(f)).unwrap();
    }
    set_parent(&a, &c);
    set_parent(&c, &a);
    let err = Delta::open_read_only(&a).unwrap_err();
    assert!(matches!(err, BlockError::ChainLoop { .. }), "{err:?}");
}

#[test]
fn a_chain_deeper_than_the_limit_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let b = base(t.path());
    // MAX_CHAIN_DEPTH + 5 deltas, each (by its meta) over the next: no loop, just too deep.
    let dirs: Vec<PathBuf> = (0..MAX_CHAIN_DEPTH + 5)
        .map(|i| t.path().join(format!("d{i}")))
        .collect();
    for d in &dirs {
        drop(Delta::create(d, Arc::clone(&b)).unwrap());
    }
    for w in dirs.windows(2) {
        set_parent(&w[0], &w[1]);
    }
    let err = Delta::open_read_only(&dirs[0]).unwrap_err();
    assert!(
        matches!(err, BlockError::ChainTooDeep { max, .. } if max == MAX_CHAIN_DEPTH),
        "{err:?}"
    );

    // Creating or forking a child past the limit is refused too (it could not be opened).
    let mut parent = b;
    let mut depth = 1;
    while depth < MAX_CHAIN_DEPTH {
        let (x, y) = (
            t.path().join(format!("x{depth}")),
            t.path().join(format!("y{depth}")),
        );
        let (cx, _) = fork(parent, &x, &y).unwrap();
        parent = Arc::new(Layer::Delta(cx));
        depth += 1;
    }
    assert_eq!(parent.depth(), MAX_CHAIN_DEPTH);
    parent.as_delta().unwrap().freeze().unwrap();
    let over = t.path().join("over");
    let err = Delta::create(&over, Arc::clone(&parent)).unwrap_err();
    assert!(matches!(err, BlockError::ChainTooDeep { .. }), "{err:?}");
    assert!(!over.exists());
    let err = fork(parent, &over, &t.path().join("over2")).unwrap_err();
    assert!(matches!(err, BlockError::ChainTooDeep { .. }), "{err:?}");
    assert!(!over.exists());
    // The deepest allowed chain opens.
    let last = t.path().join(format!("x{}", MAX_CHAIN_DEPTH - 1));
    assert_eq!(Layer::open(&last).unwrap().depth(), MAX_CHAIN_DEPTH);
}

/// Appends committed records (a WRITE of block 0 and a FLUSH) with the given sequence numbers
/// after a fresh delta's journal header.
fn craft_journal(d: &Path, write_seq: u64, flush_seq: u64) {
    let j = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("journal"))
        .unwrap();
    let w = Record::new(RecordKind::Write, write_seq, 0, 4096);
    let f = Record::new(RecordKind::Flush, flush_seq, 0, 0);
    j.write_all_at(&w.encode(), 64).unwrap();
    j.write_all_at(&f.encode(), 128).unwrap();
}

fn is_seq_limit(e: &BlockError) -> bool {
    matches!(
        e,
        BlockError::Journal {
            source: JournalError::SequenceLimit { .. },
            ..
        }
    )
}

#[test]
fn a_journal_at_the_top_of_the_sequence_range_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d");
    drop(Delta::create(&d, base(t.path())).unwrap());
    // Left as it was, the next write would take u64::MAX and the one after wrap to 0: that
    // batch would read as damage at the next open and be dropped.
    craft_journal(&d, u64::MAX - 2, u64::MAX - 1);
    for writable in [false, true] {
        let err = Delta::open_with(&d, writable, false).unwrap_err();
        assert!(is_seq_limit(&err), "{err:?}");
    }
    craft_journal(&d, MAX_SEQ, MAX_SEQ + 1);
    assert!(is_seq_limit(&Delta::open(&d).unwrap_err()));
}

#[test]
fn a_delta_runs_out_of_sequence_numbers_with_an_error_and_loses_nothing() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d");
    drop(Delta::create(&d, base(t.path())).unwrap());
    craft_journal(&d, MAX_SEQ - 3, MAX_SEQ - 2);
    let delta = Delta::open(&d).unwrap();
    // One write and its FLUSH still fit (MAX_SEQ - 1, MAX_SEQ).
    delta.write_at(&[8; 4096], 16384).unwrap();
    assert_eq!(delta.flush().unwrap(), MAX_SEQ);
    let err = delta.write_at(&[9; 4096], 32768).unwrap_err();
    assert!(is_seq_limit(&err), "{err:?}");
    assert!(is_seq_limit(&delta.write_zeroes(0, 8192).unwrap_err()));
    assert!(is_seq_limit(&delta.freeze().unwrap_err()));
    drop(delta);
    let delta = Delta::open(&d).unwrap();
    let mut b = vec![0u8; 4096];
    delta.read_at(&mut b, 16384).unwrap();
    assert_eq!(b, vec![8; 4096], "a flushed write was lost");
    delta.read_at(&mut b, 32768).unwrap();
    assert_eq!(b, vec![0; 4096], "a refused write landed");
}

#[test]
fn catch_up_writes_only_into_the_output_of_a_merge_of_the_same_inputs() {
    let t = tempfile::tempdir().unwrap();
    let b = base(t.path());
    let (a, u) = fork(Arc::clone(&b), &t.path().join("a"), &t.path().join("u")).unwrap();
    a.write_at(&[1; 4096], 0).unwrap();
    a.flush().unwrap();
    let out = t.path().join("out");
    let r = merge::merge(&a, &u, &out, &MergeOptions::default()).unwrap();
    a.write_at(&[2; 4096], 4096).unwrap();
    let opts = MergeOptions::default();
    // A writable delta over the same parent that no merge produced.
    let other = Delta::create(&t.path().join("other"), Arc::clone(&b)).unwrap();
    let err = merge::catch_up(&other, &a, r.active_seq, &u, &opts).unwrap_err();
    assert!(matches!(err, MergeError::NotMergeOutput { .. }), "{err}");
    assert!(other.changed_since(0).is_empty());
    // The output of this merge, with another upgrade delta over the same parent.
    let u2 = Delta::create(&t.path().join("u2"), Arc::clone(&b)).unwrap();
    let out_d = Delta::open(&out).unwrap();
    let err = merge::catch_up(&out_d, &a, r.active_seq, &u2, &opts).unwrap_err();
    assert!(matches!(err, MergeError::NotMergeOutput { .. }), "{err}");
    let err = merge::catch_up(&out_d, &u2, r.active_seq, &u, &opts).unwrap_err();
    assert!(matches!(err, MergeError::NotMergeOutput { .. }), "{err}");
    // With its own inputs it goes on as before.
    let r2 = merge::catch_up(&out_d, &a, r.active_seq, &u, &opts).unwrap();
    assert_eq!(r2.bytes_to_write, 4096);
    let m = out_d.meta().merge_inputs.clone().unwrap();
    assert_eq!(
        (m.active, m.upgrade),
        (a.meta().uuid.clone(), u.meta().uuid.clone())
    );
    assert_eq!(m.active_seq, r.active_seq);
}
