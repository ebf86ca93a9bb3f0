//! Recovery reads a journal in bounded memory, however long the journal. Measured as the
//! process's peak RSS, so alone in its binary.

use std::io::Write;
use std::sync::Arc;

use block::journal::{RECORD_SIZE, Record, RecordKind};
use block::{Base, Delta, Layer};

/// `VmHWM` (peak RSS) of this process, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

#[test]
fn a_long_journal_is_recovered_in_bounded_memory() {
    const BATCHES: u64 = 500_000;
    let t = tempfile::tempdir().unwrap();
    let base = Arc::new(Layer::Base(
        Base::create(&t.path().join("base.img"), 1 << 20).unwrap(),
    ));
    let d = t.path().join("d");
    drop(Delta::create(&d, base).unwrap());
    // After the header: BATCHES committed batches, each one WRITE (blocks 0..16 in turn) and
    // its FLUSH: a 64 MB journal of a million records over 16 extents.
    let mut j = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("journal"))
        .unwrap();
    let mut at = RECORD_SIZE as u64;
    let mut buf = Vec::with_capacity(1 << 20);
    for k in 0..BATCHES {
        let w = Record::new(RecordKind::Write, 2 * k + 1, (k % 16) * 4096, 4096);
        let f = Record::new(RecordKind::Flush, 2 * k + 2, 0, 0);
        buf.extend_from_slice(&w.encode());
        buf.extend_from_slice(&f.encode());
        if buf.len() >= 1 << 20 || k + 1 == BATCHES {
            std::os::unix::fs::FileExt::write_all_at(&j, &buf, at).unwrap();
            at += buf.len() as u64;
            buf.clear();
        }
    }
    j.flush().unwrap();
    let journal_len = std::fs::metadata(d.join("journal")).unwrap().len();
    assert!(journal_len >= 64_000_000);

    let before = peak_rss();
    let delta = Delta::open_read_only(&d).unwrap();
    let grew = peak_rss().saturating_sub(before);
    println!(
        "opening a {} MB journal of {} records raised the peak RSS by {} KiB",
        journal_len / 1_000_000,
        2 * BATCHES,
        grew >> 10
    );
    assert_eq!(delta.last_seq(), 2 * BATCHES);
    let bytes = |d: &Delta, since| d.changed_since(since).iter().map(|e| e.len).sum::<u64>();
    assert_eq!(bytes(&delta, 0), 16 * 4096);
    // Before, recovery held the whole file and every committed record (~128 MB here).
    assert!(grew < 16 << 20, "{grew} bytes");
    drop(delta);
    // A writable open compacts it (one record per extent), keeping the sequence numbers.
    let delta = Delta::open(&d).unwrap();
    assert!(delta.journal_len() < 64 << 10, "{}", delta.journal_len());
    assert_eq!(delta.last_seq(), 2 * BATCHES);
    assert_eq!(bytes(&delta, 2 * BATCHES - 32), 16 * 4096);
    assert_eq!(bytes(&delta, 2 * BATCHES), 0);
}
