//! Helpers shared by the block crate's integration tests.

use std::path::Path;

/// The files of a directory and their bytes, sorted by name (to compare outputs byte for byte).
pub fn dir_files(p: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}
