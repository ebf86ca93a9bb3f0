//! A versioned snapshot container: named sections, each with its own CRC32C, plus a CRC over
//! the whole file. Written to a temporary name, fsynced and renamed, so a crash never leaves a
//! half-written snapshot under the final name.
//!
//! Layout (little-endian):
//! ```text
//! magic "MVMMSNAP" | version u32 | section count u32
//! per section: name length u16 | name (UTF-8) | payload length u64 | payload CRC32C u32 | payload
//! file CRC32C u32 (over every byte before it)
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// File magic.
pub const MAGIC: &[u8; 8] = b"MVMMSNAP";
/// The format version this code writes. Version 2 keeps every state as a named, versioned
/// entry (`devices::persist::SavedState`); version 1 had one fixed structure per section.
pub const VERSION: u32 = 2;
/// The oldest format version this code reads.
pub const MIN_VERSION: u32 = 1;
/// Largest section accepted when reading (memory is stored beside the file, not in it).
pub const MAX_SECTION: u64 = 256 << 20;
/// Largest state file read (checked before it is read into memory).
pub const MAX_FILE: u64 = 4 * MAX_SECTION;

/// Errors of reading or writing a snapshot file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    /// The file could not be read or written.
    #[error("snapshot file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Not a snapshot file.
    #[error("{0} is not a microvmm snapshot (bad magic)")]
    BadMagic(PathBuf),
    /// Written by a format version this build cannot read.
    #[error(
        "snapshot format version {found} is not supported (this build reads {MIN_VERSION} to {supported})"
    )]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Newest version this build reads.
        supported: u32,
    },
    /// The file ends early.
    #[error("snapshot file truncated at byte {0}")]
    Truncated(usize),
    /// A checksum does not match.
    #[error("snapshot {what} checksum mismatch")]
    Corrupt {
        /// Which part ("file" or the section name).
        what: String,
    },
    /// A section header is malformed (bad name, duplicate, oversized).
    #[error("snapshot section header malformed: {0}")]
    BadSection(String),
    /// The file is larger than [`MAX_FILE`] (refused before it is read).
    #[error("snapshot file {path} is {len} bytes, more than the {max} a snapshot state can be")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A required section is missing.
    #[error("snapshot has no section {0:?}")]
    MissingSection(String),
}

/// Builds a snapshot file section by section.
#[derive(Debug, Default)]
pub struct SnapshotWriter {
    sections: Vec<(String, Vec<u8>)>,
}

impl SnapshotWriter {
    /// An empty snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a section.
    pub fn section(&mut self, name: &str, payload: Vec<u8>) -> &mut Self {
        self.sections.push((name.to_owned(), payload));
        self
    }

    /// Serializes the container.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        #[allow(clippy::cast_possible_truncation)] // a few sections
        let count = self.sections.len() as u32;
        b.extend_from_slice(&count.to_le_bytes());
        for (name, payload) in &self.sections {
            #[allow(clippy::cast_possible_truncation)] // section names are short constants
            let name_len = name.len() as u16;
            b.extend_from_slice(&name_len.to_le_bytes());
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            b.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
            b.extend_from_slice(payload);
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Writes the file durably: temporary file, fsync, rename, fsync of the directory.
    pub fn write(&self, path: &Path) -> Result<(), SnapshotFileError> {
        let io_err = |source| SnapshotFileError::Io {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(io_err)?;
        f.write_all(&self.to_bytes()).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        std::fs::rename(&tmp, path).map_err(io_err)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        }
        Ok(())
    }
}

/// A verified snapshot file.
#[derive(Debug)]
pub struct SnapshotReader {
    version: u32,
    sections: BTreeMap<String, Vec<u8>>,
}

impl SnapshotReader {
    /// Reads and verifies `path`.
    pub fn open(path: &Path) -> Result<Self, SnapshotFileError> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let io_err = |source| SnapshotFileError::Io {
            path: path.to_owned(),
            source,
        };
        // Non-blocking: a FIFO in place of the file must not hang the open.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(io_err)?;
        let m = f.metadata().map_err(io_err)?;
        if !m.is_file() {
            return Err(io_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        if m.len() > MAX_FILE {
            return Err(SnapshotFileError::TooLarge {
                path: path.to_owned(),
                len: m.len(),
                max: MAX_FILE,
            });
        }
        let mut bytes = Vec::new();
        (&f).take(MAX_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err)?;
        if bytes.len() as u64 > MAX_FILE {
            return Err(SnapshotFileError::TooLarge {
                path: path.to_owned(),
                len: bytes.len() as u64,
                max: MAX_FILE,
            });
        }
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(SnapshotFileError::BadMagic(path.to_owned()));
        }
        Self::parse(&bytes)
    }

    /// Verifies and splits a serialized container.
    pub fn parse(bytes: &[u8]) -> Result<Self, SnapshotFileError> {
        let mut c = Cursor { b: bytes, pos: 0 };
        if c.take(8)? != MAGIC {
            return Err(SnapshotFileError::BadMagic(PathBuf::new()));
        }
        let version = c.u32()?;
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(SnapshotFileError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        if bytes.len() < 4 + 16 {
            return Err(SnapshotFileError::Truncated(bytes.len()));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        if crc32c::crc32c(body) != stored {
            return Err(SnapshotFileError::Corrupt {
                what: "file".into(),
            });
        }
        c.b = body;
        let count = c.u32()?;
        let mut sections = BTreeMap::new();
        for _ in 0..count {
            let name_len = usize::from(c.u16()?);
            let name = std::str::from_utf8(c.take(name_len)?)
                .map_err(|_| SnapshotFileError::BadSection("name is not UTF-8".into()))?
                .to_owned();
            let len = c.u64()?;
            if len > MAX_SECTION {
                return Err(SnapshotFileError::BadSection(format!(
                    "{name}: {len} bytes"
                )));
            }
            let crc = c.u32()?;
            let len = usize::try_from(len)
                .map_err(|_| SnapshotFileError::BadSection(format!("{name}: {len} bytes")))?;
            let payload = c.take(len)?;
            if crc32c::crc32c(payload) != crc {
                return Err(SnapshotFileError::Corrupt { what: name });
            }
            if sections.insert(name.clone(), payload.to_vec()).is_some() {
                return Err(SnapshotFileError::BadSection(format!("{name}: duplicate")));
            }
        }
        if c.pos != body.len() {
            return Err(SnapshotFileError::BadSection("trailing bytes".into()));
        }
        Ok(Self { version, sections })
    }

    /// The file's format version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// A section's payload.
    pub fn section(&self, name: &str) -> Result<&[u8], SnapshotFileError> {
        self.sections
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| SnapshotFileError::MissingSection(name.to_owned()))
    }

    /// Names of all sections.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sections.keys().map(String::as_str)
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotFileError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(SnapshotFileError::Truncated(self.pos))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, SnapshotFileError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, SnapshotFileError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, SnapshotFileError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let mut w = SnapshotWriter::new();
        w.section("vcpu0", vec![1, 2, 3])
            .section("devices", b"{}".to_vec());
        w.to_bytes()
    }

    #[test]
    fn round_trip_and_file_write() {
        let r = SnapshotReader::parse(&sample()).unwrap();
        assert_eq!(r.section("vcpu0").unwrap(), &[1, 2, 3]);
        assert_eq!(r.section("devices").unwrap(), b"{}");
        assert!(matches!(
            r.section("nope"),
            Err(SnapshotFileError::MissingSection(_))
        ));
        let dir = std::env::temp_dir().join(format!("snapfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("vm.snap");
        let mut w = SnapshotWriter::new();
        w.section("a", vec![9; 1000]);
        w.write(&p).unwrap();
        assert_eq!(
            SnapshotReader::open(&p).unwrap().section("a").unwrap(),
            &[9; 1000][..]
        );
        std::fs::write(dir.join("junk"), b"hello world, not a snapshot").unwrap();
        // A state file larger than any snapshot's is refused before it is read (here 64 GiB
        // of holes: reading it would allocate 64 GiB).
        let big = dir.join("big");
        let f = File::create(&big).unwrap();
        f.set_len(64 << 30).unwrap();
        drop(f);
        assert!(matches!(
            SnapshotReader::open(&big),
            Err(SnapshotFileError::TooLarge { .. })
        ));
        assert!(matches!(
            SnapshotReader::open(&dir.join("junk")),
            Err(SnapshotFileError::BadMagic(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wrong_version_is_a_typed_error() {
        for v in [0u32, VERSION + 1, 7] {
            let mut b = sample();
            b[8..12].copy_from_slice(&v.to_le_bytes());
            // Re-seal the file CRC so that only the version is wrong.
            let n = b.len() - 4;
            let crc = crc32c::crc32c(&b[..n]);
            b[n..].copy_from_slice(&crc.to_le_bytes());
            assert!(
                matches!(
                    SnapshotReader::parse(&b),
                    Err(SnapshotFileError::UnsupportedVersion { found, supported: VERSION })
                        if found == v
                ),
                "{v}"
            );
        }
        assert_eq!(SnapshotReader::parse(&sample()).unwrap().version(), VERSION);
        // Version 1 files (the first format) are still read.
        let mut b = sample();
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        let n = b.len() - 4;
        let crc = crc32c::crc32c(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(SnapshotReader::parse(&b).unwrap().version(), 1);
    }

    #[test]
    fn every_single_bit_flip_and_truncation_is_detected() {
        let good = sample();
        for i in 0..good.len() * 8 {
            let mut b = good.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(
                SnapshotReader::parse(&b).is_err(),
                "bit {i} flip undetected"
            );
        }
        for n in 0..good.len() {
            assert!(
                SnapshotReader::parse(&good[..n]).is_err(),
                "truncation at {n} undetected"
            );
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&VERSION.to_le_bytes());
            b.extend_from_slice(&bytes);
            let _ = SnapshotReader::parse(&b);
            let _ = SnapshotReader::parse(&bytes);
        }
    }
}
