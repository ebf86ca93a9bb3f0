//! Copy-on-write disk layers, the dirty-extent journal and the three-way merge.
//!
//! A disk is a chain: a read-only raw [`Base`] at the bottom, then [`Delta`]s, each holding
//! the 4 KiB blocks written since it was created (in a sparse data file, at their own
//! offsets) and a crash-safe [`journal`] of what changed, with sequence numbers. [`fork`]
//! freezes a layer and starts two children on it in O(1); [`merge::merge`] combines two
//! children three ways into a new delta (or a flat raw image).

mod base;
mod delta;
mod error;
mod extent;
mod fork;
pub mod journal;
mod layer;
pub mod merge;
mod meta;
pub mod nbd;
mod stage;
mod sys;
mod writeback;

pub use base::{Base, sidecar_path};
pub use delta::{
    DATA_FILE, Delta, DeltaMeta, FlushHook, INLINE_FLUSH_BYTES, JOURNAL_FILE, META_FILE,
    MergeInputs, ParentRef,
};
pub use error::BlockError;
pub use extent::{BLOCK_SIZE, Extent, ExtentKind, ExtentMap, coalesce};
pub use fork::{ForkCommit, PreparedFork, fork, prepare_fork};
pub use layer::{Disk, Layer, MAX_CHAIN_DEPTH};
pub use meta::{Identity, LayerKind};

/// Alignment required of I/O offsets and lengths.
pub const SECTOR_SIZE: u64 = 512;

pub(crate) fn check_io(offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    if !offset.is_multiple_of(SECTOR_SIZE) || !len.is_multiple_of(SECTOR_SIZE) {
        return Err(BlockError::Unaligned {
            offset,
            len,
            align: SECTOR_SIZE,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

pub(crate) fn check_size(size: u64) -> Result<(), BlockError> {
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
        return Err(BlockError::BadSize {
            size,
            block: BLOCK_SIZE,
        });
    }
    Ok(())
}
