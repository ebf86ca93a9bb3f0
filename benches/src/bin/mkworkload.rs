//! `mkworkload DIR random|sequential`: builds the merge benchmark workload (base image and
//! the two forked deltas) in DIR and prints the active delta's extents, one `offset length`
//! per line, for `compare-qemu-img.sh`.

use std::path::PathBuf;
use std::process::ExitCode;

use microvmm_benches::{Pattern, build};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let pattern = match args.get(2).map(String::as_str) {
        Some("random") => Pattern::Random,
        Some("sequential") => Pattern::Sequential,
        _ => {
            eprintln!("usage: mkworkload DIR random|sequential");
            return ExitCode::from(2);
        }
    };
    match build(&PathBuf::from(&args[1]), pattern) {
        Ok(w) => {
            for (off, len) in w.extents {
                println!("{off} {len}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mkworkload: {e}");
            ExitCode::FAILURE
        }
    }
}
