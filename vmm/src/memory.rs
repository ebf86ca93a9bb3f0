//! Guest RAM: one memfd (so it can be shared, copied or mapped by another VM or process) mapped
//! into this process as `vm-memory` regions, with a dirty bitmap for writes the VMM itself makes.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout;

/// Guest memory as the VMM sees it; the bitmap records the VMM's own writes (device DMA).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One mapped region.
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Errors of guest memory setup.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is below the minimum or not page-aligned.
    #[error("guest memory size {size:#x} is invalid (at least {min:#x} bytes, 4 KiB multiple)")]
    InvalidSize {
        /// Requested size.
        size: u64,
        /// The minimum.
        min: u64,
    },
    /// The requested size is beyond what the VMM supports.
    #[error("guest memory size {size:#x} is above the supported maximum {max:#x}")]
    TooBig {
        /// Requested size.
        size: u64,
        /// The maximum.
        max: u64,
    },
    /// memfd_create failed.
    #[error("cannot create guest memory memfd")]
    Memfd(#[source] io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size guest memory memfd to {size:#x} bytes")]
    Truncate {
        /// Requested size.
        size: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Mapping the regions failed.
    #[error("cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
}

/// Guest RAM backed by a memfd.
#[derive(Debug, Clone)]
pub struct GuestRam {
    memfd: Arc<File>,
    memory: GuestMemoryMmap,
    size: u64,
}

fn memfd_create(name: &CStr) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string; the return value is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl GuestRam {
    /// `size` bytes of zeroed RAM laid out by [`layout::ram_ranges`].
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < layout::MIN_MEM_SIZE || !size.is_multiple_of(4096) {
            return Err(MemoryError::InvalidSize {
                size,
                min: layout::MIN_MEM_SIZE,
            });
        }
        if size > layout::MAX_MEM_SIZE {
            return Err(MemoryError::TooBig {
                size,
                max: layout::MAX_MEM_SIZE,
            });
        }
        let file = memfd_create(c"microvmm-guest-ram").map_err(MemoryError::Memfd)?;
        file.set_len(size)
            .map_err(|source| MemoryError::Truncate { size, source })?;
        Self::from_memfd(Arc::new(file), size)
    }

    /// Maps an existing memfd of `size` bytes (e.g. one shared with another VM).
    pub fn from_memfd(memfd: Arc<File>, size: u64) -> Result<Self, MemoryError> {
        let mut offset = 0u64;
        let ranges: Vec<_> = layout::ram_ranges(size)
            .into_iter()
            .map(|(gpa, len)| {
                // u64 to usize is lossless on x86_64, the only target.
                #[allow(clippy::cast_possible_truncation)]
                let size = len as usize;
                let r = (
                    GuestAddress(gpa),
                    size,
                    Some(FileOffset::from_arc(Arc::clone(&memfd), offset)),
                );
                offset += len;
                r
            })
            .collect();
        let memory = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Mmap)?;
        Ok(Self {
            memfd,
            memory,
            size,
        })
    }

    /// The `vm-memory` view.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The backing memfd; region `i` starts at the sum of the sizes of regions before it.
    pub fn memfd(&self) -> &Arc<File> {
        &self.memfd
    }

    /// Total RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// `(guest address, size, host address)` of every region, in address order.
    pub fn regions(&self) -> Vec<(u64, u64, u64)> {
        self.memory
            .iter()
            .map(|r| {
                let host = r
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .map(|p| p as u64)
                    .unwrap_or(0);
                (r.start_addr().0, r.len(), host)
            })
            .collect()
    }

    /// The end of RAM below the MMIO gap.
    pub fn low_end(&self) -> u64 {
        self.size.min(layout::MMIO_GAP_START)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn memfd_backed_and_shared() {
        let ram = GuestRam::new(8 << 20).unwrap();
        ram.memory()
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        // A second mapping of the same memfd sees the write.
        let other = GuestRam::from_memfd(Arc::clone(ram.memfd()), ram.size()).unwrap();
        let v: u32 = other.memory().read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0xdead_beef);
        assert_eq!(ram.regions().len(), 1);
        assert_eq!(ram.low_end(), 8 << 20);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            GuestRam::new(4096),
            Err(MemoryError::InvalidSize { .. })
        ));
        assert!(matches!(
            GuestRam::new((8 << 20) + 1),
            Err(MemoryError::InvalidSize { .. })
        ));
        assert!(matches!(
            GuestRam::new(!0xfff_u64),
            Err(MemoryError::TooBig { .. })
        ));
    }
}
