//! Three-way merge: property tests against a reference model, policies, dry run, flatten,
//! catch-up and resumption.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

mod common;

use common::dir_files;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use block::merge::{
    self, Action, ConflictReason, MergeError, MergeOptions, OwnershipMap, Policy, ProgressFn,
    Resolution, Side,
};
use block::{Base, Delta, Layer, fork};
use proptest::prelude::*;

const BS: u64 = 4096;
const BLOCKS: u64 = 48;

fn base_byte(i: u64) -> u8 {
    0x80 | (i as u8)
}

fn make_base(dir: &Path) -> Arc<Layer> {
    let p = dir.join("base.img");
    let f = std::fs::File::create(&p).unwrap();
    for i in 0..BLOCKS {
        f.write_all_at(&vec![base_byte(i); BS as usize], i * BS)
            .unwrap();
    }
    drop(f);
    Arc::new(Layer::Base(Base::adopt(&p).unwrap()))
}

#[derive(Clone, Debug)]
enum Op {
    Write { start: u64, len: u64, fill: u8 },
    Zero { start: u64, len: u64 },
    Discard { start: u64, len: u64 },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..BLOCKS, 1..6u64, 0..3u8).prop_map(|(s, l, f)| Op::Write { start: s, len: l.min(BLOCKS - s), fill: f }),
        2 => (0..BLOCKS, 1..6u64).prop_map(|(s, l)| Op::Zero { start: s, len: l.min(BLOCKS - s) }),
        1 => (0..BLOCKS, 1..6u64).prop_map(|(s, l)| Op::Discard { start: s, len: l.min(BLOCKS - s) }),
        1 => Just(Op::Flush),
    ]
}

/// Applies ops to a delta and to the model (per block: None = inherited, Some(fill)).
fn run(d: &Delta, ops: &[Op], model: &mut [Option<u8>]) {
    for o in ops {
        match *o {
            Op::Write { start, len, fill } => {
                d.write_at(&vec![fill; (len * BS) as usize], start * BS)
                    .unwrap();
                model[start as usize..(start + len) as usize].fill(Some(fill));
            }
            Op::Zero { start, len } => {
                d.write_zeroes(start * BS, len * BS).unwrap();
                model[start as usize..(start + len) as usize].fill(Some(0));
            }
            Op::Discard { start, len } => {
                d.discard(start * BS, len * BS).unwrap();
                model[start as usize..(start + len) as usize].fill(Some(0));
            }
            Op::Flush => {
                d.flush().unwrap();
            }
        }
    }
}

fn blocks_of(d: &Delta) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; BS as usize];
    for i in 0..BLOCKS {
        d.read_at(&mut buf, i * BS).unwrap();
        assert!(buf.iter().all(|&x| x == buf[0]), "block {i} is not uniform");
        out.push(buf[0]);
    }
    out
}

fn read_image(p: &Path) -> Vec<u8> {
    let b = std::fs::read(p).unwrap();
    b.chunks(BS as usize).map(|c| c[0]).collect()
}

struct Case {
    _t: tempfile::TempDir,
    a: Delta,
    b: Delta,
    ma: Vec<Option<u8>>,
    mb: Vec<Option<u8>>,
    out: std::path::PathBuf,
}

fn setup(a_ops: &[Op], b_ops: &[Op]) -> Case {
    let t = tempfile::tempdir().unwrap();
    let base = make_base(t.path());
    let (a, b) = fork(base, &t.path().join("a"), &t.path().join("b")).unwrap();
    let mut ma = vec![None; BLOCKS as usize];
    let mut mb = vec![None; BLOCKS as usize];
    run(&a, a_ops, &mut ma);
    run(&b, b_ops, &mut mb);
    let out = t.path().join("out");
    Case {
        _t: t,
        a,
        b,
        ma,
        mb,
        out,
    }
}

fn expected(c: &Case, prefer: Side) -> (Vec<u8>, Vec<u64>) {
    let mut conflicts = Vec::new();
    let v = (0..BLOCKS)
        .map(|i| match (c.ma[i as usize], c.mb[i as usize]) {
            (None, None) => base_byte(i),
            (Some(x), None) | (None, Some(x)) => x,
            (Some(x), Some(y)) if x == y => x,
            (Some(x), Some(y)) => {
                conflicts.push(i);
                if prefer == Side::Active { x } else { y }
            }
        })
        .collect();
    (v, conflicts)
}

fn conflict_blocks(r: &merge::MergeReport) -> Vec<u64> {
    r.conflicts
        .iter()
        .flat_map(|c| c.offset / BS..(c.offset + c.len) / BS)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn merge_matches_model(a_ops in prop::collection::vec(op(), 0..12), b_ops in prop::collection::vec(op(), 0..12), prefer_active: bool) {
        let c = setup(&a_ops, &b_ops);
        let prefer = if prefer_active { Side::Active } else { Side::Upgrade };
        let (want, want_conflicts) = expected(&c, prefer);
        // Fail policy: exact conflict set, or success equal to the model.
        match merge::merge(&c.a, &c.b, &c.out, &MergeOptions::default()) {
            Err(MergeError::Conflicts(r)) => {
                prop_assert!(!want_conflicts.is_empty());
                prop_assert_eq!(conflict_blocks(&r), want_conflicts.clone());
                prop_assert!(!c.out.exists(), "failed merge wrote output");
            }
            Ok(_) => {
                prop_assert!(want_conflicts.is_empty());
                let out = Delta::open_read_only(&c.out).unwrap();
                prop_assert_eq!(blocks_of(&out), want.clone());
            }
            Err(e) => prop_assert!(false, "{e}"),
        }
        let _ = std::fs::remove_dir_all(&c.out);
        let policy = if prefer_active { Policy::PreferActive } else { Policy::PreferUpgrade };
        let opts = MergeOptions { policy, ..MergeOptions::default() };
        let r = merge::merge(&c.a, &c.b, &c.out, &opts).unwrap();
        prop_assert_eq!(conflict_blocks(&r), want_conflicts);
        let out = Delta::open_read_only(&c.out).unwrap();
        prop_assert_eq!(blocks_of(&out), want.clone());
        // The output holds exactly the blocks either side wrote.
        let held: u64 = out.changed_since(0).iter().map(|e| e.len).sum();
        let written = (0..BLOCKS as usize).filter(|&i| c.ma[i].is_some() || c.mb[i].is_some()).count() as u64;
        prop_assert_eq!(held, written * BS);
        // Flatten gives the same content as a raw image.
        let flat = c.out.with_extension("img");
        merge::merge(&c.a, &c.b, &flat, &MergeOptions { flatten: true, ..opts }).unwrap();
        prop_assert_eq!(read_image(&flat), want);
        Base::open(&flat).unwrap();
    }
}

fn w(d: &Delta, block: u64, n: u64, fill: u8) {
    d.write_at(&vec![fill; (n * BS) as usize], block * BS)
        .unwrap();
}

#[test]
fn conflict_report_has_both_checksums_and_dry_run_writes_nothing() {
    let c = setup(&[], &[]);
    w(&c.a, 2, 2, 0xa1);
    w(&c.b, 3, 2, 0xb1);
    c.b.write_zeroes(10 * BS, BS).unwrap();
    let err = merge::merge(&c.a, &c.b, &c.out, &MergeOptions::default()).unwrap_err();
    let MergeError::Conflicts(r) = err else {
        panic!("not a conflict error")
    };
    assert_eq!(r.conflicts.len(), 1);
    let k = &r.conflicts[0];
    assert_eq!(
        (k.offset, k.len, k.reason),
        (3 * BS, BS, ConflictReason::BothWrote)
    );
    assert_eq!(k.active.crc32c, crc32c::crc32c(&[0xa1; BS as usize]));
    assert_eq!(k.upgrade.crc32c, crc32c::crc32c(&[0xb1; BS as usize]));
    assert_eq!(k.resolution, Resolution::Unresolved);
    assert!(!c.out.exists());
    let dry = MergeOptions {
        dry_run: true,
        policy: Policy::PreferUpgrade,
        ..MergeOptions::default()
    };
    let r = merge::merge(&c.a, &c.b, &c.out, &dry).unwrap();
    assert!(!c.out.exists());
    assert_eq!(
        (r.only_active, r.only_upgrade, r.conflicting),
        (BS, 2 * BS, BS)
    );
    assert!(
        r.plan
            .iter()
            .any(|o| o.action == Action::Zero && o.offset == 10 * BS)
    );
}

#[test]
fn ownership_and_resolver_policies() {
    let c = setup(&[], &[]);
    w(&c.a, 0, 1, 1); // in A's range: fine
    w(&c.b, 1, 1, 2); // B writes A's range: conflict
    w(&c.b, 20, 1, 3); // in B's range: fine
    w(&c.a, 40, 1, 4); // unowned, only A: fine
    let map =
        OwnershipMap::parse("# owner offset length\nactive 0 64K\nupgrade 64K 64K\n").unwrap();
    let err = merge::merge(
        &c.a,
        &c.b,
        &c.out,
        &MergeOptions {
            policy: Policy::Ownership(map.clone()),
            ..MergeOptions::default()
        },
    )
    .unwrap_err();
    let MergeError::Conflicts(r) = err else {
        panic!("not a conflict error")
    };
    assert_eq!(conflict_blocks(&r), vec![1]);
    assert_eq!(
        r.conflicts[0].reason,
        ConflictReason::NonOwnerWrite {
            owner: Side::Active
        }
    );
    assert_eq!(r.conflicts[0].active.state, merge::BlockState::Inherited);
    assert_eq!(
        r.conflicts[0].active.crc32c,
        crc32c::crc32c(&[base_byte(1); BS as usize])
    );
    assert!(OwnershipMap::parse("active 0 100").is_err());
    assert!(OwnershipMap::parse("active 0 8K\nupgrade 4K 8K").is_err());
    assert!(OwnershipMap::parse("nobody 0 4K").is_err());

    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = Arc::clone(&calls);
    let resolver: merge::Resolver = Arc::new(move |_| {
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Resolution::Zero
    });
    w(&c.a, 1, 1, 9); // now both wrote block 1
    let r = merge::merge(
        &c.a,
        &c.b,
        &c.out,
        &MergeOptions {
            policy: Policy::Resolver(resolver),
            ..MergeOptions::default()
        },
    )
    .unwrap();
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(r.conflicts[0].resolution, Resolution::Zero);
    let out = Delta::open_read_only(&c.out).unwrap();
    let b = blocks_of(&out);
    assert_eq!(
        (b[0], b[1], b[20], b[40], b[41]),
        (1, 0, 3, 4, base_byte(41))
    );
}

#[test]
fn catch_up_applies_later_active_writes() {
    let c = setup(&[], &[]);
    w(&c.a, 0, 4, 1);
    w(&c.b, 8, 4, 2);
    let r = merge::merge(&c.a, &c.b, &c.out, &MergeOptions::default()).unwrap();
    // The active VM keeps writing after the merge point.
    w(&c.a, 2, 1, 5);
    w(&c.a, 30, 2, 6);
    c.a.write_zeroes(31 * BS, BS).unwrap();
    let out = Delta::open(&c.out).unwrap();
    let r2 = merge::catch_up(&out, &c.a, r.active_seq, &c.b, &MergeOptions::default()).unwrap();
    assert_eq!(r2.bytes_to_write, 2 * BS);
    let b = blocks_of(&out);
    assert_eq!(&b[0..4], &[1, 1, 5, 1]);
    assert_eq!(&b[8..12], &[2, 2, 2, 2]);
    assert_eq!((b[30], b[31]), (6, 0));
    // A later write that collides with the upgrade is a conflict in the catch-up too.
    w(&c.a, 9, 1, 7);
    let err =
        merge::catch_up(&out, &c.a, r2.active_seq, &c.b, &MergeOptions::default()).unwrap_err();
    assert!(matches!(err, MergeError::Conflicts(_)));
    // Nothing new: an empty pass.
    let r3 = merge::catch_up(&out, &c.a, c.a.last_seq(), &c.b, &MergeOptions::default()).unwrap();
    assert!(r3.plan.is_empty());
}

#[test]
fn different_parents_and_existing_output_are_refused() {
    let c = setup(&[], &[]);
    let c2 = setup(&[], &[]);
    assert!(matches!(
        merge::merge(&c.a, &c2.b, &c.out, &MergeOptions::default()),
        Err(MergeError::DifferentParents { .. })
    ));
    std::fs::create_dir(&c.out).unwrap();
    assert!(matches!(
        merge::merge(&c.a, &c.b, &c.out, &MergeOptions::default()),
        Err(MergeError::OutputExists { .. })
    ));
}

#[test]
fn interrupted_merge_resumes_to_identical_output() {
    let c = setup(&[], &[]);
    for i in 0..BLOCKS / 2 {
        w(&c.a, i * 2, 1, (i % 7) as u8 + 1);
        w(&c.b, i * 2 + 1, 1, (i % 5) as u8 + 1);
    }
    let reference = c.out.with_extension("ref");
    let small = MergeOptions {
        checkpoint_bytes: 4 * BS,
        ..MergeOptions::default()
    };
    merge::merge(&c.a, &c.b, &reference, &small).unwrap();
    for stop_at in [BS, 5 * BS, 17 * BS, 40 * BS] {
        let _ = std::fs::remove_dir_all(&c.out);
        // Interrupt the merge from its progress callback (a panic unwinds out of it).
        let opts = MergeOptions {
            progress: Some(ProgressFn(Arc::new(move |done, _| {
                assert!(done < stop_at, "interrupt");
            }))),
            ..small.clone()
        };
        let c2 = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            merge::merge(&c.a, &c.b, &c.out, &opts)
        }));
        assert!(c2.is_err());
        assert!(!c.out.exists(), "published before the end");
        let r = merge::merge(&c.a, &c.b, &c.out, &small).unwrap();
        assert!(r.resumed_from.is_some());
        assert_eq!(dir_files(&c.out), dir_files(&reference));
        // Re-running a finished merge is a no-op with the same result.
        let again = merge::merge(&c.a, &c.b, &c.out, &small).unwrap();
        assert_eq!(again.digest, r.digest);
    }
}

#[test]
fn interrupted_flatten_resumes_to_identical_image() {
    let c = setup(&[], &[]);
    for i in 0..BLOCKS / 3 {
        w(&c.a, i * 3, 1, (i % 7) as u8 + 1);
        w(&c.b, i * 3 + 1, 1, (i % 5) as u8 + 1);
    }
    c.a.write_zeroes(2 * BS, BS).unwrap();
    let small = MergeOptions {
        flatten: true,
        checkpoint_bytes: 8 * BS,
        ..MergeOptions::default()
    };
    let reference = c.out.with_extension("ref.img");
    merge::merge(&c.a, &c.b, &reference, &small).unwrap();
    let want = std::fs::read(&reference).unwrap();
    // Stops in the parent copy (phase 0) and in the plan (phase 1).
    for stop_at in [BS, 20 * BS, BLOCKS * BS + BS, BLOCKS * BS + 20 * BS] {
        let _ = std::fs::remove_file(&c.out);
        let opts = MergeOptions {
            progress: Some(ProgressFn(Arc::new(move |done, _| {
                assert!(done < stop_at, "interrupt");
            }))),
            ..small.clone()
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            merge::merge(&c.a, &c.b, &c.out, &opts)
        }));
        assert!(r.is_err());
        assert!(!c.out.exists(), "published before the end");
        let r = merge::merge(&c.a, &c.b, &c.out, &small).unwrap();
        assert!(r.resumed_from.is_some());
        assert!(std::fs::read(&c.out).unwrap() == want, "stop at {stop_at}");
        Base::open(&c.out).unwrap();
    }
}

#[test]
fn owner_wins_resolves_non_owner_writes_to_the_owner() {
    let c = setup(&[], &[]);
    w(&c.b, 1, 1, 2); // B writes A's range; A did not: the parent's content wins
    w(&c.a, 2, 1, 5); // both write A's range: A's content wins
    w(&c.b, 2, 1, 6);
    w(&c.a, 20, 1, 7); // A writes B's range, B wrote it too: B's content wins
    w(&c.b, 20, 1, 8);
    w(&c.a, 40, 1, 4); // unowned, only A: taken
    let map = OwnershipMap::parse("active 0 64K\nupgrade 64K 64K\n").unwrap();
    let r = merge::merge(
        &c.a,
        &c.b,
        &c.out,
        &MergeOptions {
            policy: Policy::OwnerWins(map.clone()),
            ..MergeOptions::default()
        },
    )
    .unwrap();
    assert_eq!(conflict_blocks(&r), vec![1, 2, 20]);
    let res: Vec<Resolution> = r.conflicts.iter().map(|c| c.resolution).collect();
    assert_eq!(
        res,
        vec![Resolution::Active, Resolution::Active, Resolution::Upgrade]
    );
    let out = Delta::open_read_only(&c.out).unwrap();
    let b = blocks_of(&out);
    assert_eq!(
        (b[1], b[2], b[20], b[40]),
        (base_byte(1), 5, 8, 4),
        "owner's content, or the parent's where the owner did not write"
    );
    // A differing write by both sides in an unowned range still fails.
    let c2 = setup(&[], &[]);
    w(&c2.a, 45, 1, 1);
    w(&c2.b, 45, 1, 2);
    let err = merge::merge(
        &c2.a,
        &c2.b,
        &c2.out,
        &MergeOptions {
            policy: Policy::OwnerWins(map),
            ..MergeOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, MergeError::Conflicts(_)));
}

#[test]
fn unflushed_catch_up_is_readable_and_durable_only_after_a_flush() {
    let c = setup(&[], &[]);
    w(&c.a, 0, 2, 1);
    let r = merge::merge(&c.a, &c.b, &c.out, &MergeOptions::default()).unwrap();
    w(&c.a, 5, 1, 9);
    c.a.flush().unwrap();
    let out = Delta::open(&c.out).unwrap();
    let durable = out.durable_seq();
    let r2 = merge::catch_up_unflushed(&out, &c.a, r.active_seq, &c.b, &MergeOptions::default())
        .unwrap();
    assert_eq!(r2.bytes_to_write, BS);
    assert_eq!(blocks_of(&out)[5], 9, "readable at once");
    assert_eq!(out.durable_seq(), durable, "nothing flushed");
    // Reopened without a flush, the catch-up is gone (it was never durable) ...
    drop(out);
    let out = Delta::open(&c.out).unwrap();
    assert_eq!(blocks_of(&out)[5], base_byte(5));
    // ... and after a flush it stays.
    merge::catch_up_unflushed(&out, &c.a, r.active_seq, &c.b, &MergeOptions::default()).unwrap();
    out.flush().unwrap();
    drop(out);
    assert_eq!(blocks_of(&Delta::open(&c.out).unwrap())[5], 9);
}

#[test]
fn a_flush_hook_runs_after_the_records_and_gates_the_flush() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let c = setup(&[], &[]);
    let calls = Arc::new(AtomicU32::new(0));
    let (calls2, dir) = (calls.clone(), c.a.path().to_owned());
    c.a.set_flush_hook(Arc::new(move || {
        // The first call fails, the second succeeds.
        if calls2.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(block::BlockError::ReadOnly { path: dir.clone() });
        }
        Ok(())
    }));
    w(&c.a, 1, 1, 3);
    // Without the hook: durable, the hook not run.
    let seq = c.a.flush_without_hook().unwrap();
    assert_eq!(c.a.durable_seq(), seq);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    w(&c.a, 2, 1, 4);
    assert!(c.a.flush().is_err(), "a failing hook fails the flush");
    assert_eq!(
        c.a.durable_seq(),
        c.a.last_seq(),
        "the records were durable before the hook"
    );
    c.a.flush().unwrap();
    c.a.flush().unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "run until it succeeded once"
    );
}
