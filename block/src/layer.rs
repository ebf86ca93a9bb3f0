//! `Layer` (a base or a delta, as a parent or a disk), `fork`, and the `Disk` trait devices use.

use std::path::Path;

use crate::base::Base;
use crate::delta::Delta;
use crate::error::BlockError;
use crate::meta::Identity;

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
        if path.is_dir() {
            Delta::open_read_only(path).map(Self::Delta)
        } else {
            Base::open(path).map(Self::Base)
        }
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
}

impl Layer {
    fn writable(&self) -> Result<&Delta, BlockError> {
        self.as_delta().ok_or_else(|| BlockError::ReadOnly {
            path: self.path().to_path_buf(),
        })
    }
}
