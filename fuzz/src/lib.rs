//! Helpers shared by the fuzz targets.

use std::path::Path;
use std::sync::OnceLock;

/// A scratch directory for targets that need files, on tmpfs when there is one (it lives as
/// long as the fuzzing process).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let b = tempfile::Builder::new()
            .prefix("microvmm-fuzz")
            .tempdir_in(if shm.is_dir() { shm } else { Path::new("/tmp") });
        b.expect("cannot create a scratch directory")
    })
    .path()
}

/// Splits `data` at the first `sep` byte (the whole of it and nothing when there is none).
pub fn split(data: &[u8], sep: u8) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == sep) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// `text` (one JSON line) followed by its `crc32c:` line, as block's metadata files are
/// written, so the parser behind the checksum is reached.
pub fn with_crc(text: &[u8]) -> Vec<u8> {
    let line: Vec<u8> = text.iter().copied().filter(|&b| b != b'\n').collect();
    let mut out = line.clone();
    out.extend_from_slice(format!("\ncrc32c:{:08x}\n", crc32c::crc32c(&line)).as_bytes());
    out
}

/// Makes a delta over a zeroed 1 MiB base in the scratch directory's `name`; returns the
/// delta's directory and the base image's path.
pub fn delta_over_base(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let root = scratch().join(name);
    std::fs::create_dir_all(&root).expect("scratch directory");
    let base = root.join("base.img");
    std::fs::write(&base, vec![0u8; 1 << 20]).expect("base image");
    let b = block::Base::adopt(&base).expect("base identity");
    let delta = root.join("delta");
    block::Delta::create(&delta, std::sync::Arc::new(block::Layer::Base(b))).expect("delta");
    (delta, base)
}
