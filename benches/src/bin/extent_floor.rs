//! A reference for the merge comparison: writes the extents listed in a file (`offset len`
//! per line, as `mkworkload` prints them) from memory into a new sparse file of `size` bytes,
//! starting the writeback of every 1 MiB written (the merge's own setting), then fdatasyncs,
//! and prints the seconds taken. No reads: what writing these bytes durably costs this file
//! system and device with one writer through the page cache, for any tool.
//!
//! Usage: extent_floor EXTENTS OUT SIZE

use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::process::ExitCode;

const KICK: u64 = 1 << 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(list), Some(out), Some(size)) = (
        args.get(1),
        args.get(2),
        args.get(3).and_then(|s| s.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: extent_floor EXTENTS OUT SIZE");
        return ExitCode::from(2);
    };
    match run(list, out, size) {
        Ok(secs) => {
            println!("{secs:.6}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("extent_floor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(list: &str, out: &str, size: u64) -> std::io::Result<f64> {
    let mut extents = Vec::new();
    for line in std::io::BufReader::new(std::fs::File::open(list)?).lines() {
        let line = line?;
        let mut it = line.split_whitespace().map(str::parse::<u64>);
        if let (Some(Ok(off)), Some(Ok(len))) = (it.next(), it.next()) {
            extents.push((off, len));
        }
    }
    let max = extents.iter().map(|e| e.1).max().unwrap_or(0);
    let mut buf = vec![0u8; usize::try_from(max).unwrap_or(0)];
    let mut rng = microvmm_benches::Rng(0x5eed);
    rng.fill(&mut buf);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(out)?;
    f.set_len(size)?;
    let t0 = std::time::Instant::now();
    let mut since: Option<(u64, u64)> = None;
    for &(off, len) in &extents {
        f.write_all_at(&buf[..usize::try_from(len).unwrap_or(0)], off)?;
        let (lo, n) = since.get_or_insert((off, 0));
        *n += len;
        if *n >= KICK {
            start_writeback(&f, *lo, off + len - *lo)?;
            since = None;
        }
    }
    f.sync_data()?;
    Ok(t0.elapsed().as_secs_f64())
}

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)` over `[off, off + len)`.
fn start_writeback(f: &std::fs::File, off: u64, len: u64) -> std::io::Result<()> {
    let (off, len) = (
        i64::try_from(off).map_err(std::io::Error::other)?,
        i64::try_from(len).map_err(std::io::Error::other)?,
    );
    // SAFETY: an fd owned by `f` and integers; no memory is passed.
    let rc = unsafe { libc::sync_file_range(f.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
