//! `BlockError`: failures of layer I/O (base, delta, fork).

use std::io;
use std::path::PathBuf;

use crate::journal::JournalError;

/// Errors of opening, creating, reading and writing layers.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// A file operation failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The request reaches past the end of the disk.
    #[error("I/O at offset {offset} length {len} is outside the disk of {size} bytes")]
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// The request is not aligned to the sector size.
    #[error("I/O at offset {offset} length {len} is not aligned to {align} bytes")]
    Unaligned {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Required alignment.
        align: u64,
    },
    /// The disk size is zero or not a multiple of the block size.
    #[error("disk size {size} is not a positive multiple of {block} bytes")]
    BadSize {
        /// Size asked for.
        size: u64,
        /// Block size.
        block: u64,
    },
    /// A write to a read-only or frozen layer.
    #[error("layer {path} is read-only")]
    ReadOnly {
        /// The layer.
        path: PathBuf,
    },
    /// The path to create already exists.
    #[error("{path} already exists")]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// A raw image has no identity sidecar.
    #[error(
        "raw image {path} has no identity file {sidecar} (give it one with `microvmm disk create -f raw --adopt {path}`)"
    )]
    MissingIdentity {
        /// The image.
        path: PathBuf,
        /// The sidecar expected.
        sidecar: PathBuf,
    },
    /// A metadata file is damaged or malformed.
    #[error("metadata {path} is invalid: {reason}")]
    BadMeta {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A layer is not the one a child (or a check) expects.
    #[error("layer {path} has identity {found}, expected {expected}")]
    IdentityMismatch {
        /// The layer.
        path: PathBuf,
        /// Expected identity (display form).
        expected: String,
        /// Identity found (display form).
        found: String,
    },
    /// A delta used as a parent is not frozen.
    #[error("delta {path} is not frozen; only frozen deltas can be parents")]
    NotFrozen {
        /// The delta.
        path: PathBuf,
    },
    /// Another process holds the layer open for writing (or reading, for a writable open).
    #[error("layer {path} is locked by another user")]
    Locked {
        /// The layer.
        path: PathBuf,
    },
    /// A delta directory whose creation or fork was never committed (the process stopped in
    /// between). Nothing written to it was ever reported durable; remove it and fork again.
    #[error(
        "delta {path} was never committed (interrupted create or fork); nothing in it was durable: remove it"
    )]
    IncompleteFork {
        /// The child directory.
        path: PathBuf,
    },
    /// A layer's parent chain comes back to a layer already in it (a `meta` naming the delta
    /// itself or one of its descendants as parent).
    #[error("the parent chain loops: {path} is its own ancestor")]
    ChainLoop {
        /// The layer met twice.
        path: PathBuf,
    },
    /// A parent chain with more layers than [`crate::MAX_CHAIN_DEPTH`].
    #[error("the parent chain at {path} is more than {max} layers deep")]
    ChainTooDeep {
        /// The layer that would go past the limit.
        path: PathBuf,
        /// The limit.
        max: usize,
    },
    /// A file of a layer (an image, a `meta`, `data` or `journal`) is a FIFO, device, socket or
    /// directory; it is refused before it is read (a FIFO would block the open).
    #[error("{path} is not a regular file")]
    NotRegularFile {
        /// The file.
        path: PathBuf,
    },
    /// The delta's journal could not be read or written.
    #[error("journal failure in delta {path}")]
    Journal {
        /// The delta.
        path: PathBuf,
        /// The journal error.
        #[source]
        source: JournalError,
    },
}

impl BlockError {
    /// Maps an error creating `path`: `Exists` if it is already there, else `Io`.
    pub(crate) fn create(path: &std::path::Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| match source.kind() {
            io::ErrorKind::AlreadyExists => Self::Exists { path },
            _ => Self::Io {
                op: "create",
                path,
                source,
            },
        }
    }

    pub(crate) fn io(op: &'static str, path: &std::path::Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { op, path, source }
    }

    /// Opens `path` with `opts`, refusing anything but a regular file (without blocking: a
    /// FIFO is opened non-blocking, then refused).
    pub(crate) fn open_regular(
        opts: &mut std::fs::OpenOptions,
        path: &std::path::Path,
    ) -> Result<std::fs::File, Self> {
        let file = crate::sys::open_nonblocking(opts, path).map_err(Self::io("open", path))?;
        let meta = file.metadata().map_err(Self::io("stat", path))?;
        if !meta.is_file() {
            return Err(Self::NotRegularFile {
                path: path.to_path_buf(),
            });
        }
        Ok(file)
    }
}
