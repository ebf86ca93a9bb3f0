//! Reading a snapshot: the container parser on raw bytes, and `read_snapshot` on a directory
//! whose `state` file is either the raw input or a well-formed container of sections taken from
//! the input (so the JSON behind the checksums is reached), with a small `memory` file.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmm::snapfile::{SnapshotReader, SnapshotWriter};

const SECTIONS: [&str; 4] = ["meta", "vcpus", "vm", "devices"];

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = microvmm_fuzz::scratch().join("snap");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(vmm::snapshot::MEMORY_FILE), vec![0u8; 2 << 20]).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    if let Ok(r) = SnapshotReader::parse(rest) {
        for name in SECTIONS {
            let _ = r.section(name);
        }
        let _ = r.names().count();
    }
    let state = if ctl & 1 != 0 {
        let mut w = SnapshotWriter::new();
        let mut parts = rest.split(|&b| b == 0);
        for name in SECTIONS {
            w.section(name, parts.next().unwrap_or_default().to_vec());
        }
        w.to_bytes()
    } else {
        rest.to_vec()
    };
    let d = dir();
    std::fs::write(d.join(vmm::snapshot::STATE_FILE), state).unwrap();
    let _ = vmm::snapshot::read_snapshot(d);
});
