//! The append-only journal: fixed 64-byte records with a sequence number and a CRC32C each.
//!
//! A delta's journal starts with a `HEADER` record (the delta's UUID and size); then come
//! `WRITE`/`ZERO`/`DISCARD` records, each batch closed by a `FLUSH` (or a `FORK`) record that
//! commits it. In a version 2 journal a batch may also carry its data: a `WRITE_DATA` record
//! is followed by the bytes it wrote (CRC32C in `aux`), so that a flush is one append and one
//! `fdatasync`. Recovery applies only committed batches, stops at the first torn or corrupt
//! record (or data that does not verify), and refuses (typed error) a journal whose damage is
//! followed by valid records.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

/// Size of one record.
pub const RECORD_SIZE: usize = 64;
/// Magic of every record: "MVJ1".
pub const RECORD_MAGIC: u32 = 0x4d56_4a31;
/// Journal space is preallocated (written as zeros) in chunks of this size.
const PREALLOCATE: u64 = 256 << 10;
/// Version of the journal format new journals get (stored in the header's `aux`). Version 1
/// journals (no `WRITE_DATA` records) are still read and appended to.
pub const JOURNAL_VERSION: u64 = 2;
/// The first journal format: records only, data synced in the data file before them.
pub const JOURNAL_VERSION_1: u64 = 1;
/// `aux` flag of a `FLUSH` record: the data file was synced before the record was written, so
/// the data carried by earlier `WRITE_DATA` records is in the data file and needs no replay.
pub const FLUSH_CHECKPOINT: u64 = 1;
/// Largest data a `WRITE_DATA` record may carry (a larger one is refused at open).
pub const MAX_INLINE_LEN: u64 = 4 << 20;
/// Granularity at which a torn append is recognised: an unwritten sector of a torn batch reads
/// as zeros (journal space past the committed prefix is always zeros before an append).
const TORN_SECTOR: u64 = 512;
/// [`TORN_SECTOR`] as a slice length.
const TORN_SECTOR_BYTES: usize = 512;
/// Largest sequence number a journal may hold. A record above it is refused at open
/// ([`JournalError::SequenceLimit`]) instead of letting the next number wrap past `u64::MAX`
/// (which would make the next committed batch look like damage and drop it at reopen); a
/// delta refuses writes that would need a number above it. 2^62 changes are never reached
/// by counting.
pub const MAX_SEQ: u64 = 1 << 62;

/// Errors of journal reading and writing.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A read, write or sync failed.
    #[error("I/O error on journal {path}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The first record is missing, damaged or not a header.
    #[error("journal {path} has no valid header record")]
    BadHeader {
        /// The journal file.
        path: PathBuf,
    },
    /// The header names a format version this code does not read.
    #[error("journal {path} has unsupported version {version}")]
    Version {
        /// The journal file.
        path: PathBuf,
        /// The version found.
        version: u64,
    },
    /// A damaged record is followed by valid records: not a torn tail.
    #[error("journal {path} is corrupt at byte {offset} (valid records follow it)")]
    Corrupt {
        /// The journal file.
        path: PathBuf,
        /// Offset of the first damaged record.
        offset: u64,
    },
    /// A record carries a sequence number above [`MAX_SEQ`] (a crafted journal), or a delta
    /// ran out of sequence numbers.
    #[error("journal {path}: sequence number {seq} is above the limit {MAX_SEQ}")]
    SequenceLimit {
        /// The journal file.
        path: PathBuf,
        /// The sequence number.
        seq: u64,
    },
    /// A record's fields are inconsistent (checksum right, content wrong).
    #[error("journal {path} has an invalid record at byte {offset}: {reason}")]
    InvalidRecord {
        /// The journal file.
        path: PathBuf,
        /// Offset of the record.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Kinds of records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// First record of a delta journal: `tag` = delta UUID, `offset` = disk size, `aux` = version.
    Header = 0,
    /// Data written at `[offset, offset+len)` (data file, same offsets).
    Write = 1,
    /// `[offset, offset+len)` reads as zeros.
    Zero = 2,
    /// `[offset, offset+len)` discarded (reads as zeros).
    Discard = 3,
    /// Commits the records before it.
    Flush = 4,
    /// The delta is frozen at this sequence number (commits, like `Flush`).
    Fork = 5,
    /// Version 2: data written at `[offset, offset+len)`, carried in the journal: the `len`
    /// bytes right after the record (CRC32C in `aux`); also in the data file at that offset.
    WriteData = 6,
    /// Merge log: the merge's identity (`tag` = digest).
    MergeIntent = 0x20,
    /// Merge log: plan steps before `aux` are durable in the output (`offset` = phase).
    MergeProgress = 0x21,
    /// Merge log: the output is complete and about to be published.
    MergeDone = 0x22,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Header,
            1 => Self::Write,
            2 => Self::Zero,
            3 => Self::Discard,
            4 => Self::Flush,
            5 => Self::Fork,
            6 => Self::WriteData,
            0x20 => Self::MergeIntent,
            0x21 => Self::MergeProgress,
            0x22 => Self::MergeDone,
            _ => return None,
        })
    }
}

/// One journal record.
///
/// Layout (little endian): magic u32 | kind u8 | 3 reserved | seq u64 | offset u64 | len u64 |
/// aux u64 | tag [u8; 16] | 4 reserved | crc32c u32 (over bytes 0..60).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Record kind.
    pub kind: RecordKind,
    /// Sequence number (strictly increasing through a journal).
    pub seq: u64,
    /// Byte offset (kind-specific).
    pub offset: u64,
    /// Byte length (kind-specific).
    pub len: u64,
    /// Kind-specific value.
    pub aux: u64,
    /// Kind-specific 16 bytes (UUID or digest).
    pub tag: [u8; 16],
}

impl Record {
    /// A record with zero `aux` and `tag`.
    pub fn new(kind: RecordKind, seq: u64, offset: u64, len: u64) -> Self {
        Self {
            kind,
            seq,
            offset,
            len,
            aux: 0,
            tag: [0; 16],
        }
    }

    /// Serializes the record.
    pub fn encode(&self) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4] = self.kind as u8;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b[32..40].copy_from_slice(&self.aux.to_le_bytes());
        b[40..56].copy_from_slice(&self.tag);
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a record; `None` if the magic, checksum or kind is wrong.
    pub fn decode(b: &[u8; RECORD_SIZE]) -> Option<Self> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        if u32_at(0) != RECORD_MAGIC || u32_at(60) != crc32c::crc32c(&b[..60]) {
            return None;
        }
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&b[40..56]);
        Some(Self {
            kind: RecordKind::from_u8(b[4])?,
            seq: u64_at(8),
            offset: u64_at(16),
            len: u64_at(24),
            aux: u64_at(32),
            tag,
        })
    }
}

/// What recovery found in a journal (the committed records themselves went to the caller's
/// `apply`, one at a time).
#[derive(Debug)]
pub struct Replay {
    /// The header record.
    pub header: Record,
    /// Number of committed records after the header (commit records included).
    pub committed: u64,
    /// Byte length of the committed prefix (header included).
    pub committed_len: u64,
    /// Bytes after the committed prefix (uncommitted records or a torn tail).
    pub discarded_bytes: u64,
}

/// Bytes of journal read at once by recovery: its memory use, whatever the journal's size.
const READ_CHUNK: usize = 1 << 20;

/// Reads a journal's record slots through one fixed buffer (mostly front to back).
struct Slots<'a> {
    file: &'a File,
    path: &'a Path,
    /// Whole records in the file.
    slots: u64,
    buf: Vec<u8>,
    /// First slot in `buf`, and how many it holds.
    first: u64,
    held: u64,
}

impl<'a> Slots<'a> {
    fn new(file: &'a File, path: &'a Path, size: u64) -> Self {
        Self {
            file,
            path,
            slots: size / RECORD_SIZE as u64,
            buf: vec![0; READ_CHUNK],
            first: 0,
            held: 0,
        }
    }

    /// The raw bytes of slot `i` (`i < self.slots`).
    fn raw(&mut self, i: u64) -> Result<[u8; RECORD_SIZE], JournalError> {
        if i < self.first || i >= self.first + self.held {
            let per = (READ_CHUNK / RECORD_SIZE) as u64;
            let n = per.min(self.slots - i);
            let len = n as usize * RECORD_SIZE;
            self.file
                .read_exact_at(&mut self.buf[..len], i * RECORD_SIZE as u64)
                .map_err(Journal::io(self.path))?;
            (self.first, self.held) = (i, n);
        }
        #[allow(clippy::cast_possible_truncation)] // `i - first` is below `held`, records in `buf`
        let at = (i - self.first) as usize * RECORD_SIZE;
        let mut b = [0u8; RECORD_SIZE];
        b.copy_from_slice(&self.buf[at..at + RECORD_SIZE]);
        Ok(b)
    }

    /// The record in slot `i`, `None` if it does not decode.
    fn record(&mut self, i: u64) -> Result<Option<Record>, JournalError> {
        Ok(Record::decode(&self.raw(i)?))
    }
}

/// An append-only journal file.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    len: u64,
    space: Arc<Space>,
    version: u64,
    /// The journal's bytes from the start of the page that holds its end (`None` for a merge
    /// log): an append rewrites them and pads its own end with zeros, so that it writes whole
    /// pages and never has the kernel read a page that is not cached.
    tail: Option<Vec<u8>>,
    /// The pages of the last append written with `O_DIRECT`.
    pages: crate::sys::AlignedBuf,
}

/// Appends of a delta's journal cover whole pages of this size.
const PAGE: u64 = 4096;

/// Zeros for padding an append to [`PAGE`].
static ZERO_PAGE: [u8; 4096] = [0; 4096];

/// Zeros kept ahead of the journal's end by the writeback thread, when it waits anyway, once
/// the journal holds this much (a journal that small grows in the appends, as before).
const AHEAD_STEP: u64 = 2 << 20;

/// The journal's preallocated space (written zeros past its length), which an append grows
/// when it needs more, and which [`Space::zero_ahead`] (on another thread) extends ahead of
/// the appends with `O_DIRECT` writes, so that a flush seldom writes zeros itself: writing
/// them through the page cache would make the next fdatasync write them too.
#[derive(Debug)]
pub(crate) struct Space {
    /// The journal opened with `O_DIRECT` when it was opened or created (so that it is this
    /// journal's inode whatever is renamed later); `None` where the filesystem refuses it,
    /// after a failed extension, for a read-only journal, or once closed: the appends then
    /// grow the space themselves.
    direct: Mutex<Option<Arc<File>>>,
    state: Mutex<SpaceState>,
    done: Condvar,
}

#[derive(Debug)]
struct SpaceState {
    /// Bytes from the start that are allocated and written.
    zeroed: u64,
    /// The journal's length.
    len: u64,
    /// An extension in progress writes zeros up to here: an append must not write past
    /// `zeroed` until it is over.
    extending: Option<u64>,
}

impl Space {
    fn new(path: &Path, zeroed: u64, len: u64, writable: bool) -> Arc<Self> {
        let direct = writable
            .then(|| {
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .ok()
            })
            .flatten()
            .map(Arc::new);
        Arc::new(Self {
            direct: Mutex::new(direct),
            state: Mutex::new(SpaceState {
                zeroed,
                len,
                extending: None,
            }),
            done: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpaceState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Extends the zeroed space by [`AHEAD_STEP`] when less than half of that is left past the
    /// end of a journal of at least that length (allocated with `fallocate`, then written with
    /// `O_DIRECT` so that nothing of it is left in the page cache for the journal's
    /// fdatasync). Does nothing where `O_DIRECT` is not available; a failure turns it off.
    pub(crate) fn zero_ahead(&self) {
        let Some(file) = self.direct() else {
            return;
        };
        let (from, to) = {
            let mut st = self.lock();
            if st.extending.is_some() || st.len < AHEAD_STEP || st.zeroed >= st.len + AHEAD_STEP / 2
            {
                return;
            }
            let to = st.zeroed + AHEAD_STEP;
            st.extending = Some(to);
            (st.zeroed, to)
        };
        let written = crate::sys::allocate(&file, from, to - from)
            .and_then(|()| crate::sys::write_zeros(&file, from, to - from));
        if written.is_err() {
            self.close();
        }
        let mut st = self.lock();
        st.extending = None;
        if written.is_ok() {
            st.zeroed = st.zeroed.max(to);
        }
        self.done.notify_all();
    }

    /// The journal open with `O_DIRECT`, if it is.
    fn direct(&self) -> Option<Arc<File>> {
        self.direct
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops extending the space and closes the `O_DIRECT` file (a frozen delta's journal).
    pub(crate) fn close(&self) {
        *self.direct.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// True for the records that commit a batch.
fn is_commit(r: &Record) -> bool {
    matches!(r.kind, RecordKind::Flush | RecordKind::Fork)
}

/// True for a commit record written after a sync of the data file (see [`FLUSH_CHECKPOINT`]).
fn is_checkpoint(r: &Record) -> bool {
    r.kind == RecordKind::Fork || (r.kind == RecordKind::Flush && r.aux & FLUSH_CHECKPOINT != 0)
}

impl Journal {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
        move |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Creates a journal holding `header` (whose `aux` is the format version), durable on
    /// return. Fails if `path` exists.
    pub fn create(path: &Path, header: &Record) -> Result<Self, JournalError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(Self::io(path))?;
        let space = Space::new(path, 0, 0, true);
        let mut j = Self {
            path: path.to_path_buf(),
            file,
            len: 0,
            space,
            version: header.aux,
            tail: Some(Vec::new()),
            pages: crate::sys::AlignedBuf::default(),
        };
        j.append(std::slice::from_ref(header))?;
        Ok(j)
    }

    /// Replaces the journal at `path` atomically (temp file, fdatasync, rename, directory
    /// fsync) with `header` then `records`, and returns it open for appending.
    pub fn rewrite(path: &Path, header: &Record, records: &[Record]) -> Result<Self, JournalError> {
        let tmp = compact_path(path);
        let _ = std::fs::remove_file(&tmp);
        let mut j = Self::create(&tmp, header)?;
        j.append(records)?;
        std::fs::rename(&tmp, path).map_err(Self::io(path))?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        crate::sys::sync_dir(dir).map_err(Self::io(path))?;
        j.path = path.to_path_buf();
        Ok(j)
    }

    /// Opens and replays a delta journal: `apply` gets each committed record after the header,
    /// in order (commit records included), with, for a `WRITE_DATA` record after the last
    /// checkpoint (whose data the data file may not hold durably), the journal offset of its
    /// data (read it with [`Journal::read_data`]). `repair` accepts mid-journal damage (keeping
    /// the committed prefix before it) instead of failing with [`JournalError::Corrupt`].
    ///
    /// Memory use is bounded whatever the journal's size: it is read a chunk at a time, once to
    /// find and check the committed prefix, then again to hand its records to `apply`.
    pub fn open(
        path: &Path,
        writable: bool,
        repair: bool,
        mut apply: impl FnMut(&Record, Option<u64>),
    ) -> Result<(Self, Replay), JournalError> {
        let file =
            crate::sys::open_nonblocking(OpenOptions::new().read(true).write(writable), path)
                .map_err(Self::io(path))?;
        let meta = file.metadata().map_err(Self::io(path))?;
        if !meta.is_file() {
            return Err(JournalError::Io {
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        let size = meta.len();
        let mut slots = Slots::new(&file, path, size);
        let header = match if slots.slots > 0 {
            slots.record(0)?
        } else {
            None
        } {
            Some(h) if h.kind == RecordKind::Header && h.seq == 0 => h,
            _ => {
                return Err(JournalError::BadHeader {
                    path: path.to_path_buf(),
                });
            }
        };
        let version = header.aux;
        if version != JOURNAL_VERSION && version != JOURNAL_VERSION_1 {
            return Err(JournalError::Version {
                path: path.to_path_buf(),
                version,
            });
        }
        // Pass 1: where the committed prefix ends, every record in it checked (and the data
        // of every WRITE_DATA record verified).
        let mut committed_slots = 1u64;
        let mut checkpoint_slots = 1u64;
        let mut last_seq = 0u64;
        let mut i = 1u64;
        let mut data = Vec::new();
        while i < slots.slots {
            let Some(r) = slots.record(i)? else { break };
            if r.seq > MAX_SEQ {
                return Err(JournalError::SequenceLimit {
                    path: path.to_path_buf(),
                    seq: r.seq,
                });
            }
            // Sequence numbers never go down (a compacted journal repeats one per extent).
            if r.seq < last_seq
                || r.kind == RecordKind::Header
                || r.kind as u8 >= 0x20
                || (r.kind == RecordKind::WriteData && version == JOURNAL_VERSION_1)
            {
                break;
            }
            let mut data_slots = 0;
            if matches!(
                r.kind,
                RecordKind::Write | RecordKind::WriteData | RecordKind::Zero | RecordKind::Discard
            ) {
                let bad = |reason| JournalError::InvalidRecord {
                    path: path.to_path_buf(),
                    offset: i * RECORD_SIZE as u64,
                    reason,
                };
                let end = r
                    .offset
                    .checked_add(r.len)
                    .ok_or_else(|| bad("range overflows"))?;
                if r.offset % crate::BLOCK_SIZE != 0 || r.len % crate::BLOCK_SIZE != 0 {
                    return Err(bad("range not block-aligned"));
                }
                if end > header.offset {
                    return Err(bad("range past the end of the disk"));
                }
                if r.kind == RecordKind::WriteData {
                    if r.len == 0 || r.len > MAX_INLINE_LEN {
                        return Err(bad("data record length out of range"));
                    }
                    data_slots = r.len / RECORD_SIZE as u64;
                    let at = (i + 1) * RECORD_SIZE as u64;
                    if at + r.len > size {
                        break; // its data was cut off: a torn tail
                    }
                    let len = usize::try_from(r.len)
                        .map_err(|_| bad("data record length out of range"))?;
                    data.resize(len, 0);
                    file.read_exact_at(&mut data, at).map_err(Self::io(path))?;
                    if u64::from(crc32c::crc32c(&data)) != r.aux {
                        break; // its data did not all reach the disk (or was damaged)
                    }
                }
            }
            last_seq = r.seq;
            i += 1 + data_slots;
            if is_commit(&r) {
                committed_slots = i;
                if is_checkpoint(&r) {
                    checkpoint_slots = i;
                }
            }
        }
        if i < slots.slots && !repair {
            let corrupt = if version == JOURNAL_VERSION_1 {
                // Damage at slot i: a torn tail unless a valid record follows.
                let mut found = false;
                for k in i + 1..slots.slots {
                    if let Some(r) = slots.record(k)?
                        && r.seq > last_seq
                        && r.kind != RecordKind::Header
                    {
                        found = true;
                        break;
                    }
                }
                found
            } else {
                Self::damage_is_corrupt(&file, path, &mut slots, i, committed_slots, last_seq)?
            };
            if corrupt {
                return Err(JournalError::Corrupt {
                    path: path.to_path_buf(),
                    offset: i * RECORD_SIZE as u64,
                });
            }
        }
        // Pass 2: the committed records, in order (the lock the caller holds keeps writers
        // out, so they are the ones checked above; a record that no longer decodes is damage).
        let mut k = 1;
        while k < committed_slots {
            let r = slots.record(k)?.ok_or_else(|| JournalError::Corrupt {
                path: path.to_path_buf(),
                offset: k * RECORD_SIZE as u64,
            })?;
            let mut data_at = None;
            let mut data_slots = 0;
            if r.kind == RecordKind::WriteData {
                data_slots = r.len / RECORD_SIZE as u64;
                data_at = (k >= checkpoint_slots).then_some((k + 1) * RECORD_SIZE as u64);
            }
            apply(&r, data_at);
            k += 1 + data_slots;
        }
        let committed_len = committed_slots * RECORD_SIZE as u64;
        // After the committed prefix: zeros (space preallocated by `append`) and possibly
        // uncommitted records or a torn write, which are discarded (zeroed when writable).
        let discarded_bytes = last_nonzero_after(&file, path, committed_len, size)?
            .map_or(0, |end| end - committed_len);
        let replay = Replay {
            header,
            committed: committed_slots - 1,
            committed_len,
            discarded_bytes,
        };
        let tail = if writable {
            // Below the committed length: bytes the first pass read.
            #[allow(clippy::cast_possible_truncation)] // under PAGE
            let mut t = vec![0u8; (committed_len % PAGE) as usize];
            file.read_exact_at(&mut t, committed_len - committed_len % PAGE)
                .map_err(Self::io(path))?;
            Some(t)
        } else {
            None
        };
        let j = Self {
            path: path.to_path_buf(),
            file,
            len: committed_len,
            space: Space::new(path, size, committed_len, writable),
            version,
            tail,
            pages: crate::sys::AlignedBuf::default(),
        };
        if writable && discarded_bytes > 0 {
            let zeros = vec![0u8; crate::sys::clamp_len(discarded_bytes, READ_CHUNK)];
            let mut at = committed_len;
            while at < committed_len + discarded_bytes {
                let n = crate::sys::clamp_len(committed_len + discarded_bytes - at, zeros.len());
                j.file
                    .write_all_at(&zeros[..n], at)
                    .map_err(Self::io(path))?;
                at += n as u64;
            }
            j.file.sync_data().map_err(Self::io(path))?;
        }
        Ok((j, replay))
    }

    /// Version 2: is the damage at slot `at` (in the batch that starts at slot `committed`)
    /// corruption rather than a torn append? Every commit record of version 2 names the
    /// journal offset its batch starts at (`offset`). It is corruption if a later batch
    /// follows (a commit record of another batch, or any valid record after the damaged
    /// batch's own commit): a batch is only appended once the one before it is durable. If
    /// only records of the damaged batch follow, the append was torn when an unwritten sector
    /// (zeros) lies in the batch; damage without one is corruption.
    fn damage_is_corrupt(
        file: &File,
        path: &Path,
        slots: &mut Slots<'_>,
        at: u64,
        committed: u64,
        last_seq: u64,
    ) -> Result<bool, JournalError> {
        let start = committed * RECORD_SIZE as u64;
        let mut own_end = None;
        let mut batch_end = None;
        for k in at + 1..slots.slots {
            let Some(r) = slots.record(k)? else { continue };
            if r.seq <= last_seq || r.kind == RecordKind::Header {
                continue;
            }
            if is_commit(&r) && r.offset == start {
                own_end = Some(k + 1);
            } else if own_end.is_some() || is_commit(&r) {
                return Ok(true);
            }
            batch_end = Some(k + 1);
        }
        let Some(end) = batch_end else {
            return Ok(false); // nothing valid follows: a torn tail
        };
        Ok(!has_zero_sector(
            file,
            path,
            start,
            end * RECORD_SIZE as u64,
        )?)
    }

    /// Appends `records` with one write, then fdatasyncs.
    pub fn append(&mut self, records: &[Record]) -> Result<(), JournalError> {
        let mut buf = Vec::with_capacity(records.len() * RECORD_SIZE);
        for r in records {
            buf.extend_from_slice(&r.encode());
        }
        self.append_bytes(&buf)
    }

    /// Appends encoded records (with the data of `WRITE_DATA` records after them) with one
    /// write, then fdatasyncs. `buf` must be a whole number of records.
    pub(crate) fn append_bytes(&mut self, buf: &[u8]) -> Result<(), JournalError> {
        self.append_vectored(&mut [io::IoSlice::new(buf)])
    }

    /// Like [`Journal::append_bytes`] with the bytes of `bufs` one after the other (records
    /// and the data they carry, each where it already is in memory).
    pub(crate) fn append_vectored(
        &mut self,
        bufs: &mut [io::IoSlice<'_>],
    ) -> Result<(), JournalError> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        // Taken out while the append reads it (put back if the append fails).
        let kept = self.tail.take();
        let pieces: Vec<&[u8]> = std::iter::once(kept.as_deref().unwrap_or(&[]))
            .chain(bufs.iter().map(|b| &b[..]))
            .collect();
        let end = self.len + total as u64;
        let tail_len = kept.as_ref().map(Vec::len);
        let written = self.write_append(end, tail_len, Append::Pieces(&pieces));
        drop(pieces);
        self.tail = kept;
        self.finish_append(end, written?);
        Ok(())
    }

    /// Where the next append's pages start, and the bytes the journal already has there (its
    /// partial last page); `None` if appends do not write whole pages.
    pub(crate) fn append_start(&self) -> Option<(u64, &[u8])> {
        let t = self.tail.as_deref()?;
        Some((self.len - t.len() as u64, t))
    }

    /// Appends the bytes of `pages` past the journal's end, then fdatasyncs: `pages` starts
    /// with what [`Journal::append_start`] returned, is a whole number of pages (aligned for
    /// `O_DIRECT`), and holds the appended bytes up to journal offset `end`, zeros after.
    pub(crate) fn append_pages(&mut self, pages: &[u8], end: u64) -> Result<(), JournalError> {
        debug_assert!(
            self.tail.is_some(),
            "append_pages on a journal without whole pages"
        );
        let tail_len = self.tail.as_ref().map(Vec::len);
        let tail = self.write_append(end, tail_len, Append::Pages(pages))?;
        self.finish_append(end, tail);
        Ok(())
    }

    /// Writes an append that ends the journal at `end` (whole pages from the journal's last
    /// partial page, of `tail_len` bytes, when it keeps one), then fdatasyncs; returns the new
    /// partial last page to keep.
    fn write_append(
        &mut self,
        end: u64,
        tail_len: Option<usize>,
        src: Append<'_>,
    ) -> Result<Option<Vec<u8>>, JournalError> {
        // What is written: the whole pages from the one holding the journal's end.
        let (start, write_end) = match tail_len {
            Some(t) => (self.len - t as u64, end.div_ceil(PAGE) * PAGE),
            None => (self.len, end),
        };
        let mut st = self.space.lock();
        while write_end > st.zeroed && st.extending.is_some() {
            // Zeros are being written there: wait rather than have them land on the append.
            st = self
                .space
                .done
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if write_end > st.zeroed {
            // Grow by writing zeros, a chunk at a time, so that most appends overwrite
            // allocated blocks inside the file size and their fdatasync has no metadata to
            // commit.
            let new_alloc = write_end.div_ceil(PREALLOCATE) * PREALLOCATE;
            // `len <= zeroed`: the growth is at most `total` plus one PREALLOCATE.
            #[allow(clippy::cast_possible_truncation)]
            let zeros = vec![0u8; (new_alloc - st.zeroed) as usize];
            self.file
                .write_all_at(&zeros, st.zeroed)
                .map_err(Self::io(&self.path))?;
            st.zeroed = new_alloc;
        }
        drop(st);
        #[allow(clippy::cast_possible_truncation)] // under PAGE
        let pad = &ZERO_PAGE[..(write_end - end) as usize];
        #[allow(clippy::cast_possible_truncation)] // one append, in memory
        let src = match src {
            Append::Pages(pages) => Append::Pages(&pages[..(write_end - start) as usize]),
            pieces => pieces,
        };
        let direct = self.space.direct().filter(|_| tail_len.is_some());
        let mut written = false;
        if let Some(direct) = direct {
            // Whole pages, past the page cache: nothing of the append is left for the
            // fdatasync but the device's cache flush.
            let pages = match src {
                Append::Pieces(pieces) => self.pages.fill(pieces),
                Append::Pages(pages) => pages,
            };
            if direct.write_all_at(pages, start).is_ok() {
                written = true;
            } else {
                // Not this file system, or an I/O error: the buffered write says which.
                self.space.close();
            }
        }
        if !written {
            let mut iov: Vec<io::IoSlice<'_>> = match src {
                Append::Pieces(pieces) => pieces
                    .iter()
                    .chain(std::iter::once(&pad))
                    .map(|p| io::IoSlice::new(p))
                    .collect(),
                Append::Pages(pages) => vec![io::IoSlice::new(pages)],
            };
            crate::sys::pwritev_all(&self.file, &mut iov, start).map_err(Self::io(&self.path))?;
        }
        self.file.sync_data().map_err(Self::io(&self.path))?;
        if tail_len.is_none() {
            return Ok(None);
        }
        #[allow(clippy::cast_possible_truncation)] // under PAGE
        let keep = (end % PAGE) as usize;
        Ok(Some(match src {
            Append::Pieces(pieces) => last_bytes(pieces, keep),
            #[allow(clippy::cast_possible_truncation)] // one append, in memory
            Append::Pages(pages) => {
                let e = (end - start) as usize;
                pages[e - keep..e].to_vec()
            }
        }))
    }

    fn finish_append(&mut self, end: u64, tail: Option<Vec<u8>>) {
        if tail.is_some() {
            self.tail = tail;
        }
        self.len = end;
        self.space.lock().len = end;
    }

    /// The journal's space, for [`Space::zero_ahead`] on another thread.
    pub(crate) fn space(&self) -> Arc<Space> {
        Arc::clone(&self.space)
    }

    /// Reads data carried in the journal (at an offset [`Journal::open`] handed out).
    pub(crate) fn read_data(&self, buf: &mut [u8], at: u64) -> Result<(), JournalError> {
        self.file
            .read_exact_at(buf, at)
            .map_err(Self::io(&self.path))
    }

    /// Bytes in the journal.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if the journal holds no record (never, once created).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The format version (the header's `aux`).
    pub fn version(&self) -> u64 {
        self.version
    }
}

/// The bytes of an append.
#[derive(Clone, Copy)]
enum Append<'a> {
    /// Pieces one after the other, from the journal's partial last page on.
    Pieces(&'a [&'a [u8]]),
    /// Whole pages laid out already ([`Journal::append_pages`]).
    Pages(&'a [u8]),
}

/// The last `n` bytes of `pieces` one after the other (they hold at least `n`).
fn last_bytes(pieces: &[&[u8]], n: usize) -> Vec<u8> {
    // Skip whole pieces, then part of one, up to the first byte kept.
    let mut skip = pieces
        .iter()
        .map(|p| p.len())
        .sum::<usize>()
        .saturating_sub(n);
    let mut out = Vec::with_capacity(n);
    for p in pieces {
        let k = skip.min(p.len());
        skip -= k;
        out.extend_from_slice(&p[k..]);
    }
    out
}

/// True if `[from, to)` of `file` holds an all-zero [`TORN_SECTOR`]-aligned sector (or runs
/// past the end of the file).
fn has_zero_sector(file: &File, path: &Path, from: u64, to: u64) -> Result<bool, JournalError> {
    let size = file.metadata().map_err(Journal::io(path))?.len();
    if to > size {
        return Ok(true);
    }
    let mut s = from.div_ceil(TORN_SECTOR) * TORN_SECTOR;
    let mut buf = vec![0u8; READ_CHUNK];
    while s + TORN_SECTOR <= to {
        let n = crate::sys::clamp_len((to - s) / TORN_SECTOR * TORN_SECTOR, READ_CHUNK);
        file.read_exact_at(&mut buf[..n], s)
            .map_err(Journal::io(path))?;
        if buf[..n]
            .chunks_exact(TORN_SECTOR_BYTES)
            .any(|c| c.iter().all(|&b| b == 0))
        {
            return Ok(true);
        }
        s += n as u64;
    }
    Ok(false)
}

/// The end (offset + 1) of the last non-zero byte of `[from, size)` of `file`, read a chunk
/// at a time; `None` if the range is all zeros.
fn last_nonzero_after(
    file: &File,
    path: &Path,
    from: u64,
    size: u64,
) -> Result<Option<u64>, JournalError> {
    let mut buf = vec![0u8; crate::sys::clamp_len(size.saturating_sub(from), READ_CHUNK)];
    let mut last = None;
    let mut at = from;
    while at < size {
        let n = crate::sys::clamp_len(size - at, buf.len());
        file.read_exact_at(&mut buf[..n], at)
            .map_err(Journal::io(path))?;
        if let Some(p) = buf[..n].iter().rposition(|&b| b != 0) {
            last = Some(at + p as u64 + 1);
        }
        at += n as u64;
    }
    Ok(last)
}

/// Where [`Journal::rewrite`] builds the new journal (a leftover is ignored and removed).
pub fn compact_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".compact");
    PathBuf::from(s)
}

/// Reads the valid prefix of a log of records that has no commit structure (the merge log).
pub(crate) fn read_log(path: &Path) -> Result<Vec<Record>, JournalError> {
    let data = std::fs::read(path).map_err(Journal::io(path))?;
    let mut out = Vec::new();
    for chunk in data.chunks_exact(RECORD_SIZE) {
        let mut b = [0u8; RECORD_SIZE];
        b.copy_from_slice(chunk);
        match Record::decode(&b) {
            Some(r) => out.push(r),
            None => break,
        }
    }
    Ok(out)
}

/// Opens a merge log for appending after its valid prefix (created if missing).
pub(crate) fn open_log(path: &Path, valid_records: usize) -> Result<Journal, JournalError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(Journal::io(path))?;
    let len = (valid_records * RECORD_SIZE) as u64;
    file.set_len(len).map_err(Journal::io(path))?;
    Ok(Journal {
        path: path.to_path_buf(),
        file,
        len,
        space: Space::new(path, u64::MAX, len, false),
        version: JOURNAL_VERSION_1,
        tail: None,
        pages: crate::sys::AlignedBuf::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip_and_bitflips() {
        let mut r = Record::new(RecordKind::Write, 7, 4096, 8192);
        r.tag = [3; 16];
        let b = r.encode();
        assert_eq!(Record::decode(&b), Some(r));
        for bit in 0..RECORD_SIZE * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(Record::decode(&c), None, "bit {bit} flip not detected");
        }
    }
}
