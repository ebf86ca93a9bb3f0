//! `Layer` (a base or a delta, as a parent or a disk), `fork`, and the `Disk` trait devices use.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::base::Base;
use crate::delta::Delta;
use crate::error::BlockError;
use crate::meta::Identity;

/// Most layers a disk chain may have, base included: a deeper chain is refused at open
/// ([`BlockError::ChainTooDeep`]), and so is a delta created or forked at the limit.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// The layers met so far while opening one chain, child first: a layer met twice (a parent
/// chain that loops) and a chain deeper than [`MAX_CHAIN_DEPTH`] are refused before the
/// recursion can run away.
#[derive(Debug, Default)]
pub(crate) struct Chain {
    /// (device, inode) of each layer's file or directory.
    files: Vec<(u64, u64)>,
    /// UUIDs of the deltas.
    uuids: Vec<String>,
}

impl Chain {
    /// Records the layer at `path`; fails if it is already in the chain or the chain is full.
    pub(crate) fn enter(&mut self, path: &Path) -> Result<(), BlockError> {
        let m = std::fs::metadata(path).map_err(BlockError::io("stat", path))?;
        if self.files.contains(&(m.dev(), m.ino())) {
            return Err(BlockError::ChainLoop {
                path: path.to_path_buf(),
            });
        }
        if self.files.len() >= MAX_CHAIN_DEPTH {
            return Err(BlockError::ChainTooDeep {
                path: path.to_path_buf(),
                max: MAX_CHAIN_DEPTH,
            });
        }
        self.files.push((m.dev(), m.ino()));
        Ok(())
    }

    /// Records a delta's UUID; a second delta with the same one (a copy of a layer used as
    /// its own ancestor) is a loop too.
    pub(crate) fn enter_uuid(&mut self, uuid: &str, path: &Path) -> Result<(), BlockError> {
        if self.uuids.iter().any(|u| u == uuid) {
            return Err(BlockError::ChainLoop {
                path: path.to_path_buf(),
            });
        }
        self.uuids.push(uuid.to_owned());
        Ok(())
    }
}

/// A layer of a disk chain.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // a handful of layers per disk; no boxing needed
pub enum Layer {
    /// A raw base image.
    Base(Base),
    /// A copy-on-write delta.
    Delta(Delta),
}

impl Layer {
    /// Opens a layer read-only: a directory is a delta, a file a raw base.
    pub fn open(path: &Path) -> Result<Self, BlockError> {
        Self::open_in(path, &mut Chain::default())
    }

    /// Opens the parent layer at `path` of a chain being opened.
    pub(crate) fn open_in(path: &Path, chain: &mut Chain) -> Result<Self, BlockError> {
        if path.is_dir() {
            Delta::open_in(path, false, false, chain).map(Self::Delta)
        } else {
            let base = Base::open(path)?;
            chain.enter(path)?;
            Ok(Self::Base(base))
        }
    }

    /// Number of layers in the chain from this one down to the base (1 for a base).
    pub fn depth(&self) -> usize {
        let mut n = 1;
        let mut layer = self;
        while let Self::Delta(d) = layer {
            n += 1;
            layer = d.parent();
        }
        n
    }

    /// Refuses a new child of this layer (created or forked into `child`) whose chain would
    /// be deeper than [`MAX_CHAIN_DEPTH`].
    pub(crate) fn check_child_depth(&self, child: &Path) -> Result<(), BlockError> {
        if self.depth() >= MAX_CHAIN_DEPTH {
            return Err(BlockError::ChainTooDeep {
                path: child.to_path_buf(),
                max: MAX_CHAIN_DEPTH,
            });
        }
        Ok(())
    }

    /// Opens a layer for writing where that means something: a delta read-write, a base
    /// (always read-only) as is.
    pub fn open_writable(path: &Path) -> Result<Self, BlockError> {
        if path.is_dir() {
            Delta::open(path).map(Self::Delta)
        } else {
            Base::open(path).map(Self::Base)
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        match self {
            Self::Base(b) => b.read_at(buf, offset),
            Self::Delta(d) => d.read_at(buf, offset),
        }
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Self::Base(b) => b.size(),
            Self::Delta(d) => d.size(),
        }
    }

    /// The identity a child records (a delta must be frozen).
    pub fn identity(&self) -> Result<Identity, BlockError> {
        match self {
            Self::Base(b) => Ok(b.identity().clone()),
            Self::Delta(d) => d.identity(),
        }
    }

    /// Path of the image file or delta directory.
    pub fn path(&self) -> &Path {
        match self {
            Self::Base(b) => b.path(),
            Self::Delta(d) => d.path(),
        }
    }

    /// The delta, if this layer is one.
    pub fn as_delta(&self) -> Option<&Delta> {
        match self {
            Self::Delta(d) => Some(d),
            Self::Base(_) => None,
        }
    }
}

/// What a block device model (virtio-blk, an NBD server) needs from a disk.
pub trait Disk: Send + Sync {
    /// Disk size in bytes.
    fn size(&self) -> u64;
    /// True if writes are refused.
    fn is_read_only(&self) -> bool;
    /// Reads at a 512-byte aligned offset.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError>;
    /// Writes at a 512-byte aligned offset.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError>;
    /// Makes a range read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Discards a range.
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Makes earlier writes durable.
    fn flush(&self) -> Result<(), BlockError>;
    /// Writes `len` bytes read from `src` (memory another party may change meanwhile, such as
    /// a guest's) at a 512-byte aligned offset, without copying them into a buffer first
    /// where the backend can (the bytes the backend saw are what is written). The default
    /// copies them into `scratch` and calls [`Disk::write_at`].
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes until the call returns.
    unsafe fn write_at_raw(
        &self,
        src: *const u8,
        len: usize,
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> Result<(), BlockError> {
        // SAFETY: `src` is valid for `len` bytes (the caller's contract); `scratch` is ours.
        unsafe { copy_raw(src, len, scratch) };
        self.write_at(scratch, offset)
    }
}

/// Copies `len` bytes from `src` into `dst` (resized to `len`).
///
/// # Safety
/// `src` must be valid for reads of `len` bytes.
pub(crate) unsafe fn copy_raw(src: *const u8, len: usize, dst: &mut Vec<u8>) {
    dst.resize(len, 0);
    // SAFETY: `src` is valid for `len` bytes (the caller's contract), `dst` holds `len` bytes
    // and is a distinct allocation of ours, so the two do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), len) };
}

impl Disk for Delta {
    fn size(&self) -> u64 {
        Delta::size(self)
    }
    fn is_read_only(&self) -> bool {
        Delta::is_read_only(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        Delta::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        Delta::write_at(self, buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        Delta::write_zeroes(self, offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        Delta::discard(self, offset, len)
    }
    fn flush(&self) -> Result<(), BlockError> {
        Delta::flush(self).map(|_| ())
    }
    unsafe fn write_at_raw(
        &self,
        src: *const u8,
        len: usize,
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> Result<(), BlockError> {
        // SAFETY: the caller's contract, passed on.
        unsafe { Delta::write_at_raw(self, src, len, offset, scratch) }
    }
}

impl Disk for Layer {
    fn size(&self) -> u64 {
        Layer::size(self)
    }
    fn is_read_only(&self) -> bool {
        self.as_delta().is_none_or(Delta::is_read_only)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        Layer::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.writable()?.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.writable()?.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.writable()?.discard(offset, len)
    }
    fn flush(&self) -> Result<(), BlockError> {
        match self {
            Self::Base(_) => Ok(()),
            Self::Delta(d) => d.flush().map(|_| ()),
        }
    }
    unsafe fn write_at_raw(
        &self,
        src: *const u8,
        len: usize,
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> Result<(), BlockError> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.writable()?.write_at_raw(src, len, offset, scratch) }
    }
}

impl Layer {
    fn writable(&self) -> Result<&Delta, BlockError> {
        self.as_delta().ok_or_else(|| BlockError::ReadOnly {
            path: self.path().to_path_buf(),
        })
    }
}
