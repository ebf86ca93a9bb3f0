//! Thin wrappers over the Linux file syscalls that `std` does not expose.
//!
//! Most `unsafe` of the crate lives here, one small function per syscall; the rest is the
//! stage buffer (`stage.rs`) and writes from raw guest memory (`layer.rs`, `delta.rs`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// `x` as a length of at most `cap` bytes (lossless: `x` is only narrowed below `cap`).
pub(crate) fn clamp_len(x: u64, cap: usize) -> usize {
    usize::try_from(x).map_or(cap, |x| x.min(cap))
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `fallocate(2)` of `[offset, offset + len)` of `file` with `mode`.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = (to_off(offset)?, to_off(len)?);
    // SAFETY: fallocate only takes an fd owned by `file` (valid for the call) and integers.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Deallocates `[offset, offset + len)` of `file`; reads of the range then return zeros.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    ) {
        // File system without hole punching: write zeros instead.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => write_zeros(file, offset, len),
        r => r,
    }
}

/// Allocates `[offset, offset + len)` of `file` (`fallocate`, mode 0: the file grows to cover
/// it; new blocks read as zeros).
pub(crate) fn allocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(file, 0, offset, len)
}

/// A megabyte of zeros, aligned for `O_DIRECT` (in the zero-initialized data: never copied
/// or cleared at run time).
static ZERO_PAGES: [Page; 256] = [Page([0; 4096]); 256];

/// Writes zeros over `[offset, offset + len)` of `file`, 1 MiB at a time from a buffer aligned
/// for `O_DIRECT` (so `file` may be open with it, `offset` and `len` then multiples of 4096).
pub(crate) fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let bytes = page_bytes(&ZERO_PAGES);
    let mut at = offset;
    while at < offset + len {
        let n = clamp_len(offset + len - at, bytes.len());
        file.write_all_at(&bytes[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off`, in the kernel when possible.
pub(crate) fn copy_range(
    src: &File,
    mut src_off: u64,
    dst: &File,
    mut dst_off: u64,
    mut len: u64,
) -> io::Result<()> {
    while len > 0 {
        let mut s = to_off(src_off)?;
        let mut d = to_off(dst_off)?;
        let chunk = len.min(1 << 30) as usize;
        // SAFETY: both fds are owned by live `File`s; the offset pointers point to locals that
        // outlive the call; the kernel writes only through those two pointers.
        let n = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut s, dst.as_raw_fd(), &mut d, chunk, 0)
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP) => {
                    return copy_by_hand(src, src_off, dst, dst_off, len);
                }
                _ => return Err(err),
            }
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let n = n.unsigned_abs() as u64;
        src_off += n;
        dst_off += n;
        len -= n;
    }
    Ok(())
}

fn copy_by_hand(src: &File, mut so: u64, dst: &File, mut d: u64, mut len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while len > 0 {
        let n = clamp_len(len, buf.len());
        src.read_exact_at(&mut buf[..n], so)?;
        dst.write_all_at(&buf[..n], d)?;
        so += n as u64;
        d += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// Writes `len` bytes from `src` at `offset` of `file` (the kernel reads them; no Rust
/// reference to them is formed).
///
/// # Safety
/// `src` must be valid for reads of `len` bytes until the call returns.
pub(crate) unsafe fn pwrite_raw(
    file: &File,
    src: *const u8,
    len: usize,
    offset: u64,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let off = to_off(offset + done as u64)?;
        // SAFETY: `src + done .. src + len` is valid for reads (the caller's contract, and
        // `done < len`); pwrite only reads that memory and writes to the fd `file` owns.
        let n = unsafe { libc::pwrite(file.as_raw_fd(), src.add(done).cast(), len - done, off) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        done += n.unsigned_abs();
    }
    Ok(())
}

/// One page, aligned for `O_DIRECT`.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// The bytes of `pages`, one after the other.
fn page_bytes(pages: &[Page]) -> &[u8] {
    // SAFETY: `Page` is repr(C) around a `[u8; 4096]` (size 4096, no padding), so `pages` is
    // `pages.len() * 4096` contiguous initialized bytes, borrowed for as long as the result.
    unsafe { std::slice::from_raw_parts(pages.as_ptr().cast::<u8>(), pages.len() * 4096) }
}

/// A buffer of whole pages, aligned for `O_DIRECT`, reused from one write to the next.
#[derive(Default)]
pub(crate) struct AlignedBuf {
    pages: Vec<Page>,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} pages)", self.pages.len())
    }
}

impl AlignedBuf {
    /// The bytes of `pieces` one after the other, then zeros up to a whole number of pages.
    pub(crate) fn fill(&mut self, pieces: &[&[u8]]) -> &[u8] {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        let n = total.div_ceil(4096);
        // Grown (zeroed) only when a larger write comes; every byte handed out below is
        // written first: the pieces, then zeros to the end of the last page.
        if self.pages.len() < n {
            self.pages.resize(n, Page([0; 4096]));
        }
        let pages = &mut self.pages[..n];
        let mut at = 0;
        for piece in pieces {
            let mut rest: &[u8] = piece;
            while !rest.is_empty() {
                let (page, off) = (at / 4096, at % 4096);
                let k = rest.len().min(4096 - off);
                pages[page].0[off..off + k].copy_from_slice(&rest[..k]);
                rest = &rest[k..];
                at += k;
            }
        }
        if at % 4096 != 0 {
            pages[at / 4096].0[at % 4096..].fill(0);
        }
        page_bytes(pages)
    }
}

/// At most this many buffers per `pwritev` (the kernel's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Writes all of `bufs`, one after the other, at `offset` of `file` (`pwritev`, retried on
/// short writes and interruptions; at most [`IOV_MAX`] buffers per call).
pub(crate) fn pwritev_all(
    file: &File,
    mut bufs: &mut [io::IoSlice<'_>],
    offset: u64,
) -> io::Result<()> {
    let mut at = offset;
    io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = bufs.len().min(IOV_MAX);
        let off = to_off(at)?;
        // `n <= IOV_MAX`, which fits a C int.
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        let count = n as libc::c_int;
        // SAFETY: `IoSlice` is ABI compatible with `iovec` (documented by std); the first `n`
        // slices are valid for reads for the duration of the call, and pwritev only reads
        // them and writes to the fd `file` owns.
        let rc = unsafe { libc::pwritev(file.as_raw_fd(), bufs.as_ptr().cast(), count, off) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if rc == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        let written = rc.unsigned_abs();
        at += written as u64;
        io::IoSlice::advance_slices(&mut bufs, written);
    }
    Ok(())
}

/// Starts writeback of the dirty pages of `[offset, offset + len)` without waiting, so that a
/// later fdatasync has less left to do.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = (to_off(offset)?, to_off(len)?);
    // SAFETY: sync_file_range takes an fd owned by `file` and integers; no memory is passed.
    let rc =
        unsafe { libc::sync_file_range(file.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The next offset `>= from` holding data (`SEEK_DATA`), or `None` past the last data.
pub(crate) fn next_data(file: &File, from: u64) -> io::Result<Option<u64>> {
    seek(file, from, libc::SEEK_DATA)
}

/// The next hole offset `>= from` (`SEEK_HOLE`; the end of file counts as a hole).
pub(crate) fn next_hole(file: &File, from: u64) -> io::Result<Option<u64>> {
    seek(file, from, libc::SEEK_HOLE)
}

fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = to_off(from)?;
    // SAFETY: lseek takes an fd owned by `file` and integers. The file position it moves is
    // not used by this crate (all I/O is positional).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(err);
    }
    Ok(Some(r.unsigned_abs()))
}

/// Takes a non-blocking `flock` on `file` (exclusive or shared); `Ok(false)` if someone
/// else holds a conflicting lock.
pub(crate) fn try_lock(file: &File, exclusive: bool) -> io::Result<bool> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: flock takes an fd owned by `file` and an integer; the lock is released when the
    // file is closed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(err)
}

/// Opens `path` with `O_NONBLOCK` added, so that opening a FIFO does not wait for a writer
/// (the flag changes nothing for a regular file). Check the file type before reading.
pub(crate) fn open_nonblocking(
    opts: &mut std::fs::OpenOptions,
    path: &std::path::Path,
) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    opts.custom_flags(libc::O_NONBLOCK).open(path)
}

/// fsyncs a directory so that entries created or renamed in it are durable.
pub(crate) fn sync_dir(path: &std::path::Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// 16 random bytes from the kernel.
pub(crate) fn random_id() -> io::Result<[u8; 16]> {
    use std::io::Read;
    let mut b = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}
