//! The read-only raw base image and its identity sidecar (`<image>.identity`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::BlockError;
use crate::meta::{self, Identity, LayerKind};
use crate::{BLOCK_SIZE, check_io};

const BASE_FORMAT: &str = "microvmm-base";
const FINGERPRINT_SAMPLES: u64 = 16;

#[derive(Debug, Serialize, Deserialize)]
struct BaseIdFile {
    format: String,
    version: u32,
    uuid: String,
    size: u64,
    fingerprint: u64,
}

/// A raw disk image used read-only as the bottom layer.
#[derive(Debug)]
pub struct Base {
    path: PathBuf,
    file: File,
    identity: Identity,
}

/// Opens a raw image read-only; anything but a regular file (a FIFO would block the open, a
/// device has no length) is [`BlockError::NotRegularFile`].
fn open_image(path: &Path) -> Result<File, BlockError> {
    BlockError::open_regular(OpenOptions::new().read(true), path)
}

/// The identity sidecar of a raw image: `<path>.identity`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".identity");
    PathBuf::from(s)
}

fn fingerprint(file: &File, size: u64, path: &Path) -> Result<u64, BlockError> {
    let blocks = size / BLOCK_SIZE;
    let mut crc = 0u32;
    #[allow(clippy::cast_possible_truncation)] // BLOCK_SIZE is 4096
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for i in 0..FINGERPRINT_SAMPLES.min(blocks) {
        let block = if FINGERPRINT_SAMPLES >= blocks {
            i
        } else {
            i * (blocks - 1) / (FINGERPRINT_SAMPLES - 1)
        };
        file.read_exact_at(&mut buf, block * BLOCK_SIZE)
            .map_err(BlockError::io("read", path))?;
        crc = crc32c::crc32c_append(crc, &buf);
    }
    Ok(u64::from(crc))
}

impl Base {
    /// Creates a sparse, all-zero raw image of `size` bytes and its identity.
    /// A failure leaves nothing behind (neither the image nor its sidecar).
    pub fn create(path: &Path, size: u64) -> Result<Self, BlockError> {
        crate::check_size(size)?;
        let sidecar = sidecar_path(path);
        if sidecar.exists() {
            // Left by an earlier image of this name: it would be taken as the new one's.
            return Err(BlockError::Exists { path: sidecar });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(BlockError::create(path))?;
        let made = file
            .set_len(size)
            .map_err(BlockError::io("resize", path))
            .and_then(|()| file.sync_all().map_err(BlockError::io("sync", path)));
        drop(file);
        made.and_then(|()| Self::adopt(path)).inspect_err(|_| {
            // Both files are ours: the image was created above, the sidecar did not exist.
            let _ = std::fs::remove_file(&sidecar);
            let _ = std::fs::remove_file(path);
        })
    }

    /// Gives an existing raw image an identity (writes the sidecar) and opens it.
    /// An image that already has one is just opened.
    pub fn adopt(path: &Path) -> Result<Self, BlockError> {
        if sidecar_path(path).exists() {
            return Self::open(path);
        }
        let file = open_image(path)?;
        let size = file.metadata().map_err(BlockError::io("stat", path))?.len();
        crate::check_size(size)?;
        let uuid = meta::hex(
            &crate::sys::random_id().map_err(BlockError::io("read", Path::new("/dev/urandom")))?,
        );
        let id = BaseIdFile {
            format: BASE_FORMAT.into(),
            version: 1,
            uuid,
            size,
            fingerprint: fingerprint(&file, size, path)?,
        };
        meta::write(&sidecar_path(path), &id)?;
        Self::open(path)
    }

    /// Opens a raw image read-only and checks it against its identity sidecar.
    pub fn open(path: &Path) -> Result<Self, BlockError> {
        let sidecar = sidecar_path(path);
        let file = open_image(path)?;
        if !sidecar.exists() {
            return Err(BlockError::MissingIdentity {
                path: path.to_path_buf(),
                sidecar,
            });
        }
        let id: BaseIdFile = meta::read(&sidecar)?;
        if id.format != BASE_FORMAT || id.version != 1 || meta::unhex(&id.uuid).is_none() {
            return Err(BlockError::BadMeta {
                path: sidecar,
                reason: format!("not a {BASE_FORMAT} v1 identity"),
            });
        }
        let size = file.metadata().map_err(BlockError::io("stat", path))?.len();
        let expected = Identity {
            kind: LayerKind::Base,
            uuid: id.uuid,
            size: id.size,
            check: id.fingerprint,
        };
        let found = Identity {
            size,
            check: if size == id.size {
                fingerprint(&file, size, path)?
            } else {
                0
            },
            ..expected.clone()
        };
        if found != expected {
            return Err(BlockError::IdentityMismatch {
                path: path.to_path_buf(),
                expected: expected.to_string(),
                found: found.to_string(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            identity: expected,
        })
    }

    /// Reads `buf.len()` bytes at `offset` (512-byte aligned).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        check_io(offset, buf.len() as u64, self.identity.size)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(BlockError::io("read", &self.path))
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.identity.size
    }

    /// The identity children record.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open image file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }
}

/// Writes the identity sidecar `sidecar` for the raw image at `image` with the given UUID.
pub(crate) fn write_identity(image: &Path, sidecar: &Path, uuid: &str) -> Result<(), BlockError> {
    let file = open_image(image)?;
    let size = file
        .metadata()
        .map_err(BlockError::io("stat", image))?
        .len();
    let id = BaseIdFile {
        format: BASE_FORMAT.into(),
        version: 1,
        uuid: uuid.to_string(),
        size,
        fingerprint: fingerprint(&file, size, image)?,
    };
    meta::write(sidecar, &id)
}
