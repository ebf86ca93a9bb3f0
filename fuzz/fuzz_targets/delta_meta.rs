//! Delta meta and base identity parsing: a delta directory whose `meta` is the input's first
//! part and whose parent base's identity sidecar is its second part (split at a 0xff byte);
//! bits of the first byte give each part a valid checksum line so the JSON checks are reached.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use block::Delta;
use libfuzzer_sys::fuzz_target;

struct Paths {
    delta: PathBuf,
    sidecar: PathBuf,
}

fn paths() -> &'static Paths {
    static P: OnceLock<Paths> = OnceLock::new();
    P.get_or_init(|| {
        let (delta, base) = microvmm_fuzz::delta_over_base("meta");
        Paths {
            delta,
            sidecar: block::sidecar_path(&base),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let (meta, identity) = microvmm_fuzz::split(rest, 0xff);
    let p = paths();
    let meta = if ctl & 1 != 0 {
        microvmm_fuzz::with_crc(meta)
    } else {
        meta.to_vec()
    };
    let identity = if ctl & 2 != 0 {
        microvmm_fuzz::with_crc(identity)
    } else {
        identity.to_vec()
    };
    std::fs::write(p.delta.join(block::META_FILE), meta).unwrap();
    std::fs::write(&p.sidecar, identity).unwrap();
    if let Ok(d) = Delta::open_read_only(&p.delta) {
        let _ = d.identity();
    }
});
