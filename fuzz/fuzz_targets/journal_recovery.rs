//! Journal recovery: a delta over a small base opened (read-only, writable, or writable with
//! repair) with its journal replaced by the input, taken 64 bytes a record; a record whose
//! reserved byte 5 is even gets a valid magic and checksum, so replay logic is reached.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use block::Delta;
use block::journal::{RECORD_MAGIC, RECORD_SIZE};
use libfuzzer_sys::fuzz_target;

fn delta_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| microvmm_fuzz::delta_over_base("journal").0)
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let mut journal = Vec::with_capacity(rest.len());
    for chunk in rest.chunks(RECORD_SIZE) {
        let mut r = chunk.to_vec();
        if r.len() == RECORD_SIZE && r[5] % 2 == 0 {
            r[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
            let crc = crc32c::crc32c(&r[..60]);
            r[60..64].copy_from_slice(&crc.to_le_bytes());
        }
        journal.extend_from_slice(&r);
    }
    let dir = delta_dir();
    std::fs::write(dir.join(block::JOURNAL_FILE), &journal).unwrap();
    let writable = ctl & 1 != 0;
    let repair = ctl & 2 != 0;
    if let Ok(d) = Delta::open_with(dir, writable, repair) {
        let mut buf = vec![0u8; 4096];
        let _ = d.read_at(&mut buf, u64::from(ctl) * 4096);
        let _ = d.changed_since(0);
    }
});
