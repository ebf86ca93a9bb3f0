//! Small metadata files (a base's identity sidecar, a delta's `meta`): one JSON line followed
//! by a `crc32c:<hex>` line, replaced atomically (write temp, fsync, rename, fsync dir).

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::BlockError;

/// Largest metadata file read (a real one is a few hundred bytes).
const MAX_META_LEN: u64 = 64 << 10;

/// What kind of layer an identity names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// A raw base image.
    Base,
    /// A copy-on-write delta.
    Delta,
}

/// The identity of a read-only layer, recorded by its children and checked when they open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Base or delta.
    pub kind: LayerKind,
    /// 128-bit random id, hex.
    pub uuid: String,
    /// Disk size in bytes.
    pub size: u64,
    /// Base: content fingerprint (CRC32C of sampled blocks). Delta: the frozen sequence number.
    pub check: u64,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            LayerKind::Base => "fingerprint",
            LayerKind::Delta => "frozen at seq",
        };
        write!(
            f,
            "{:?} {} size {} {what} {:#x}",
            self.kind, self.uuid, self.size, self.check
        )
    }
}

/// Hex form of a 16-byte id.
pub fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses the hex form of a 16-byte id.
pub fn unhex(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Writes `value` to `path` atomically and durably.
pub(crate) fn write<T: Serialize>(path: &Path, value: &T) -> Result<(), BlockError> {
    let tmp = tmp_path(path);
    let mut f = File::create(&tmp).map_err(BlockError::io("create", &tmp))?;
    write_via(&mut f, &tmp, path, value)
}

/// `path` with `.tmp` appended.
pub(crate) fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    tmp.into()
}

/// Writes `value` into the empty file `f`, already open at `tmp`, syncs it, renames it to
/// `path` and syncs the directory. The inode is kept, so a lock on `f` holds on `path`.
pub(crate) fn write_via<T: Serialize>(
    f: &mut File,
    tmp: &Path,
    path: &Path,
    value: &T,
) -> Result<(), BlockError> {
    let json = serde_json::to_string(value).map_err(|e| BlockError::BadMeta {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let body = format!("{json}\ncrc32c:{:08x}\n", crc32c::crc32c(json.as_bytes()));
    f.write_all(body.as_bytes())
        .map_err(BlockError::io("write", tmp))?;
    f.sync_all().map_err(BlockError::io("sync", tmp))?;
    std::fs::rename(tmp, path).map_err(BlockError::io("rename", tmp))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    crate::sys::sync_dir(dir).map_err(BlockError::io("sync", dir))
}

/// Reads and checks a file written by [`write`].
pub(crate) fn read<T: DeserializeOwned>(path: &Path) -> Result<T, BlockError> {
    let bad = |reason: &str| BlockError::BadMeta {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let mut bytes = Vec::new();
    let file = BlockError::open_regular(std::fs::OpenOptions::new().read(true), path)?;
    // A metadata file is one short line and its checksum: anything long is not one.
    (&file)
        .take(MAX_META_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(BlockError::io("read", path))?;
    if bytes.len() as u64 > MAX_META_LEN {
        return Err(bad("larger than a metadata file can be"));
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("not UTF-8"))?;
    let mut lines = text.lines();
    let json = lines.next().ok_or_else(|| bad("empty"))?;
    let crc = lines
        .next()
        .and_then(|l| l.strip_prefix("crc32c:"))
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| bad("missing checksum line"))?;
    if crc != crc32c::crc32c(json.as_bytes()) {
        return Err(bad("checksum mismatch"));
    }
    serde_json::from_str(json).map_err(|e| bad(&e.to_string()))
}
