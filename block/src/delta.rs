//! A copy-on-write delta: a directory with `meta` (identity and parent), `data` (a sparse file
//! holding written blocks at their own offsets) and `journal` (the dirty-extent journal).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use serde::{Deserialize, Serialize};

use crate::error::BlockError;
use crate::extent::{Extent, ExtentKind, ExtentMap};
use crate::journal::{FLUSH_CHECKPOINT, JOURNAL_VERSION, Journal, Record, RecordKind, Replay};
use crate::journal::{JournalError, MAX_SEQ, RECORD_SIZE};
use crate::layer::{Chain, Layer};
use crate::meta::{self, Identity, LayerKind};
use crate::stage::{Slice, Stage};
use crate::writeback::{Chunk, Writeback};
use crate::{BLOCK_SIZE, check_io};

const DELTA_FORMAT: &str = "microvmm-delta";
/// A writable open compacts a journal with more records than this (and 4x its extents).
const AUTO_COMPACT_RECORDS: u64 = 1 << 16;
/// A flush whose writes hold at most this many bytes carries them in the journal (one append,
/// one fdatasync); a larger one syncs the data file first (two fdatasyncs, no data copied).
pub const INLINE_FLUSH_BYTES: u64 = 512 << 10;
/// Data carried in the journal is not needed any more once the data file is synced: a journal
/// grown past this (or 8x the size of its compacted form, if larger) gets a flush that syncs
/// the data file and then is compacted.
const INLINE_JOURNAL_BUDGET: u64 = 64 << 20;
/// File names inside a delta directory.
pub const META_FILE: &str = "meta";
/// The sparse data file.
pub const DATA_FILE: &str = "data";
/// The journal file.
pub const JOURNAL_FILE: &str = "journal";

/// Where a delta's parent is and what it must be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// Absolute path of the parent (a raw image or a delta directory).
    pub path: PathBuf,
    /// The parent's identity when the delta was created.
    pub identity: Identity,
}

/// Contents of a delta's `meta` file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaMeta {
    /// Always `microvmm-delta`.
    pub format: String,
    /// Format version (1).
    pub version: u32,
    /// This delta's id (hex).
    pub uuid: String,
    /// Disk size in bytes.
    pub size: u64,
    /// The parent layer.
    pub parent: ParentRef,
    /// For a merge output: the merge digest (hex) that produced it.
    #[serde(default)]
    pub merged_from: Option<String>,
    /// For a merge output: the deltas merged into it (a catch-up checks it is given the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_inputs: Option<MergeInputs>,
}

/// The inputs of the merge that produced a delta (its provenance).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeInputs {
    /// UUID of the active VM's delta.
    pub active: String,
    /// The active delta's last sequence number the merge read (the first merge point).
    pub active_seq: u64,
    /// UUID of the upgrade's delta.
    pub upgrade: String,
    /// The upgrade delta's last sequence number the merge read.
    pub upgrade_seq: u64,
}

struct WriteState {
    journal: Journal,
    pending: Vec<Record>,
    next_seq: u64,
    durable_seq: u64,
    frozen_seq: Option<u64>,
    /// A freeze cut in memory ([`Delta::freeze_deferred`]) whose records (pending writes, FLUSH,
    /// FORK) are not in the journal yet; the next flush writes them.
    deferred: Option<Vec<Record>>,
    /// Runs after the next flush made everything durable and before that flush returns
    /// ([`Delta::set_flush_hook`]); dropped once it succeeded.
    flush_hook: Option<FlushHook>,
    /// The journal holds batches with their data after its last checkpoint: the data file
    /// must be synced before that data may be dropped (compaction).
    data_in_journal: bool,
    /// The next flush carries the pending writes' data: the pending records are laid out
    /// in `stage` (each WRITE as a WRITE_DATA record followed by the bytes written) as the
    /// writes come in. False when that flush cannot carry them (a version 1 journal, more
    /// than [`INLINE_FLUSH_BYTES`] of data pending, or a full stage): it syncs the data
    /// file instead.
    carrying: bool,
    /// The append of the next flush that carries its data (`None` for a version 1 journal
    /// or a read-only delta, or if no memory was left for it).
    stage: Option<Stage>,
    /// Data bytes in `stage`.
    inline_bytes: u64,
    /// Pending writes whose bytes are only in the overlay (not in the data file), oldest
    /// first: queued for writeback when their flush carries them, written in place before
    /// anything else touches the data file.
    unplaced: Vec<(u64, Chunk)>,
}

/// A step that must complete before a flush of this delta is acknowledged (e.g. an upgrade's
/// commit record, made durable after the data it covers).
pub type FlushHook = Arc<dyn Fn() -> Result<(), BlockError> + Send + Sync>;

/// A copy-on-write layer over a read-only parent. `Send + Sync`: share it with `Arc`.
pub struct Delta {
    dir: PathBuf,
    meta: DeltaMeta,
    parent: Arc<Layer>,
    data: Arc<File>,
    writable: bool,
    state: Mutex<WriteState>,
    index: RwLock<ExtentMap>,
    recovered_discarded: u64,
    lock: File,
    /// For a child of a cut but uncommitted fork: the commit its first flush must complete.
    commit: Option<Arc<crate::fork::ForkCommit>>,
    /// Carried writes not yet in the data file, and the thread that puts them there.
    wb: Arc<Writeback>,
    /// Flushes that wrote journal records (metrics).
    flushes: std::sync::atomic::AtomicU64,
}

/// A child directory made ready before its parent is frozen (see [`crate::prepare_fork`]):
/// the data file and the journal exist and are durable; the meta is written at commit, into
/// the held `meta.tmp`, which then becomes `meta`.
#[derive(Debug)]
pub(crate) struct PreparedChild {
    pub(crate) dir: PathBuf,
    id: [u8; 16],
    size: u64,
    data: File,
    journal: Journal,
    /// `meta.tmp`, locked exclusively; renamed to `meta` at commit.
    pub(crate) pending_meta: File,
}

impl std::fmt::Debug for Delta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delta")
            .field("dir", &self.dir)
            .field("uuid", &self.meta.uuid)
            .finish()
    }
}

fn align_down(v: u64) -> u64 {
    v / BLOCK_SIZE * BLOCK_SIZE
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

impl Delta {
    /// Creates an empty delta in the new directory `dir` over `parent` (a base or a frozen delta).
    pub fn create(dir: &Path, parent: Arc<Layer>) -> Result<Self, BlockError> {
        let id =
            crate::sys::random_id().map_err(BlockError::io("read", Path::new("/dev/urandom")))?;
        Self::create_with_id(dir, parent, id, None)
    }

    pub(crate) fn create_with_id(
        dir: &Path,
        parent: Arc<Layer>,
        id: [u8; 16],
        merged_from: Option<String>,
    ) -> Result<Self, BlockError> {
        let identity = parent.identity()?;
        parent.check_child_depth(dir)?;
        let parent_path = std::fs::canonicalize(parent.path())
            .map_err(BlockError::io("resolve", parent.path()))?;
        std::fs::create_dir(dir).map_err(BlockError::create(dir))?;
        let meta = DeltaMeta {
            format: DELTA_FORMAT.into(),
            version: 1,
            uuid: meta::hex(&id),
            size: identity.size,
            parent: ParentRef {
                path: parent_path,
                identity,
            },
            merged_from,
            merge_inputs: None,
        };
        Self::init_files(dir, &meta, &[])
            .and_then(|()| Self::open_with(dir, true, false))
            .inspect_err(|_| {
                // The directory is ours (just created) and nothing in it was ever acknowledged.
                let _ = std::fs::remove_dir_all(dir);
            })
    }

    /// Writes data/journal/meta files of a delta into an existing directory. `records` (already
    /// durable data) are journaled after the header and committed with a FLUSH.
    pub(crate) fn init_files(
        dir: &Path,
        meta: &DeltaMeta,
        records: &[Record],
    ) -> Result<(), BlockError> {
        let id = meta::unhex(&meta.uuid).unwrap_or_default();
        let (_, mut journal) = Self::create_data_and_journal(dir, meta.size, id)?;
        let jerr = |source| BlockError::Journal {
            path: dir.to_path_buf(),
            source,
        };
        if !records.is_empty() {
            let mut all = records.to_vec();
            let seq = records.last().map_or(0, |r| r.seq) + 1;
            all.push(Self::flush_record(seq, journal.len(), true));
            journal.append(&all).map_err(jerr)?;
        }
        meta::write(&dir.join(META_FILE), meta)?;
        let up = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        crate::sys::sync_dir(up).map_err(BlockError::io("sync", up))
    }

    /// A FLUSH record committing the batch appended at journal offset `batch_start`;
    /// `checkpoint` if the data file was synced before it.
    fn flush_record(seq: u64, batch_start: u64, checkpoint: bool) -> Record {
        let mut r = Record::new(RecordKind::Flush, seq, batch_start, 0);
        if checkpoint {
            r.aux = FLUSH_CHECKPOINT;
        }
        r
    }

    /// The journal's first record for a delta of `size` bytes with id `id`.
    fn header_record(size: u64, id: [u8; 16]) -> Record {
        let mut header = Record::new(RecordKind::Header, 0, size, 0);
        header.aux = JOURNAL_VERSION;
        header.tag = id;
        header
    }

    /// Creates (or resizes, keeping its contents) the data file of `size` bytes, synced, and
    /// a fresh journal holding only its header (an old journal is replaced).
    fn create_data_and_journal(
        dir: &Path,
        size: u64,
        id: [u8; 16],
    ) -> Result<(File, Journal), BlockError> {
        let data_path = dir.join(DATA_FILE);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(BlockError::io("create", &data_path))?;
        data.set_len(size)
            .map_err(BlockError::io("resize", &data_path))?;
        data.sync_all()
            .map_err(BlockError::io("sync", &data_path))?;
        let jpath = dir.join(JOURNAL_FILE);
        let _ = std::fs::remove_file(&jpath);
        let journal =
            Journal::create(&jpath, &Self::header_record(size, id)).map_err(|source| {
                BlockError::Journal {
                    path: dir.to_path_buf(),
                    source,
                }
            })?;
        Ok((data, journal))
    }

    /// Opens a delta for reading and writing (recovering its journal).
    pub fn open(dir: &Path) -> Result<Self, BlockError> {
        Self::open_with(dir, true, false)
    }

    /// Opens a delta read-only (its journal is replayed but not repaired).
    pub fn open_read_only(dir: &Path) -> Result<Self, BlockError> {
        Self::open_with(dir, false, false)
    }

    /// Opens a delta. With `repair`, mid-journal corruption truncates the journal at the last
    /// commit before it instead of failing (records after it are lost).
    pub fn open_with(dir: &Path, writable: bool, repair: bool) -> Result<Self, BlockError> {
        Self::open_in(dir, writable, repair, &mut Chain::default())
    }

    /// Opens the delta at `dir` as a layer of the chain being opened (its parents are opened
    /// into the same `chain`, which refuses loops and runaway depth).
    pub(crate) fn open_in(
        dir: &Path,
        writable: bool,
        repair: bool,
        chain: &mut Chain,
    ) -> Result<Self, BlockError> {
        let meta_path = dir.join(META_FILE);
        if dir.is_dir() && !meta_path.exists() && meta::tmp_path(&meta_path).exists() {
            return Err(BlockError::IncompleteFork {
                path: dir.to_path_buf(),
            });
        }
        if !dir.is_dir() || !meta_path.exists() {
            return Err(BlockError::Io {
                op: "open",
                path: meta_path,
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        chain.enter(dir)?;
        let meta: DeltaMeta = meta::read(&meta_path)?;
        if meta.format != DELTA_FORMAT || meta.version != 1 || meta::unhex(&meta.uuid).is_none() {
            return Err(BlockError::BadMeta {
                path: meta_path,
                reason: format!("not a {DELTA_FORMAT} v1 meta"),
            });
        }
        chain.enter_uuid(&meta.uuid, dir)?;
        crate::check_size(meta.size)?;
        let jerr = |source| BlockError::Journal {
            path: dir.to_path_buf(),
            source,
        };
        // Lock (on `meta`, which is never replaced) before replaying: a writable open zeroes
        // a torn journal tail, and compaction replaces the journal file.
        let jpath = dir.join(JOURNAL_FILE);
        let lock = BlockError::open_regular(OpenOptions::new().read(true), &meta_path)?;
        // A lock can be held for a moment by a process forked elsewhere in this program
        // before it execs (the fd is close-on-exec): retry briefly before giving up.
        let mut tries = 0;
        while !crate::sys::try_lock(&lock, writable).map_err(BlockError::io("lock", dir))? {
            tries += 1;
            if tries == 40 {
                return Err(BlockError::Locked {
                    path: dir.to_path_buf(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if writable {
            // A compaction interrupted before its rename.
            let _ = std::fs::remove_file(crate::journal::compact_path(&jpath));
        }
        // The index is built as the journal is read (its committed records are not collected).
        let mut index = ExtentMap::new();
        let mut frozen_seq = None;
        let mut last = 0;
        // WRITE_DATA records whose data the data file may not hold durably: seq -> (disk
        // offset, journal offset of the data).
        let mut in_journal = std::collections::HashMap::new();
        let (journal, replay) = Journal::open(&jpath, writable, repair, |r, data_at| {
            if let Some(at) = data_at {
                in_journal.insert(r.seq, (r.offset, at));
            }
            match r.kind {
                RecordKind::Write | RecordKind::WriteData => {
                    index.insert(r.offset, r.len, ExtentKind::Data, r.seq);
                }
                RecordKind::Zero | RecordKind::Discard => {
                    index.insert(r.offset, r.len, ExtentKind::Zero, r.seq);
                }
                RecordKind::Fork => frozen_seq = Some(r.seq),
                _ => {}
            }
            last = r.seq;
        })
        .map_err(jerr)?;
        if Some(replay.header.tag) != meta::unhex(&meta.uuid) || replay.header.offset != meta.size {
            return Err(BlockError::BadMeta {
                path: meta_path,
                reason: "journal header does not match meta".into(),
            });
        }
        let parent = Arc::new(Layer::open_in(&meta.parent.path, chain)?);
        let found = parent.identity()?;
        if found != meta.parent.identity {
            return Err(BlockError::IdentityMismatch {
                path: meta.parent.path.clone(),
                expected: meta.parent.identity.to_string(),
                found: found.to_string(),
            });
        }
        let data_path = dir.join(DATA_FILE);
        let data =
            BlockError::open_regular(OpenOptions::new().read(true).write(writable), &data_path)?;
        let data_len = data
            .metadata()
            .map_err(BlockError::io("stat", &data_path))?
            .len();
        if data_len != meta.size {
            return Err(BlockError::BadMeta {
                path: data_path,
                reason: format!("data file is {data_len} bytes, disk is {}", meta.size),
            });
        }
        let Replay {
            committed: records,
            discarded_bytes,
            ..
        } = replay;
        let data_in_journal = !in_journal.is_empty();
        if data_in_journal {
            Self::replay_data(dir, &data, &journal, &index, &in_journal)?;
        }
        if frozen_seq.is_some() && writable {
            // A frozen delta is never written again: share it with its children's readers.
            crate::sys::try_lock(&lock, false).map_err(BlockError::io("lock", dir))?;
        }
        let delta = Self {
            dir: dir.to_path_buf(),
            meta,
            parent,
            data: Arc::new(data),
            writable,
            state: Mutex::new(WriteState {
                journal,
                pending: Vec::new(),
                next_seq: last + 1,
                durable_seq: last,
                frozen_seq,
                deferred: None,
                flush_hook: None,
                data_in_journal,
                carrying: false,
                stage: None,
                inline_bytes: 0,
                unplaced: Vec::new(),
            }),
            index: RwLock::new(index),
            recovered_discarded: discarded_bytes,
            lock,
            commit: None,
            wb: Writeback::new(dir),
            flushes: std::sync::atomic::AtomicU64::new(0),
        };
        if writable && frozen_seq.is_none() {
            delta.reset_inline(&mut delta.state());
        }
        if writable
            && frozen_seq.is_none()
            && records > AUTO_COMPACT_RECORDS
            && records > 4 * delta.extent_count() as u64
        {
            delta.compact()?;
        }
        Ok(delta)
    }

    /// Puts the data of committed `WRITE_DATA` records after the journal's last checkpoint
    /// into the data file where it differs (after a crash of the machine the data file may
    /// miss it: a batch carrying its data is durable with the journal's fdatasync alone).
    /// Only the blocks whose latest committed change is such a record are compared: the data
    /// file then holds exactly the committed contents for them, then it is synced. A read-only
    /// open does the same (through a second, writable handle) when a block differs: the
    /// committed contents are fixed, only their copy in the data file is repaired.
    fn replay_data(
        dir: &Path,
        data: &File,
        journal: &Journal,
        index: &ExtentMap,
        in_journal: &std::collections::HashMap<u64, (u64, u64)>,
    ) -> Result<(), BlockError> {
        let data_path = dir.join(DATA_FILE);
        let mut writer: Option<File> = None;
        let mut want = Vec::new();
        let mut have = Vec::new();
        for e in index.iter() {
            let Some(&(rec_offset, at)) = in_journal.get(&e.seq) else {
                continue;
            };
            if e.kind != ExtentKind::Data {
                continue;
            }
            // The extent comes from the journal: check it fits in memory.
            let len = usize::try_from(e.len).map_err(|_| BlockError::BadMeta {
                path: data_path.clone(),
                reason: format!("journal extent of {} bytes is too long", e.len),
            })?;
            want.resize(len, 0);
            have.resize(len, 0);
            journal
                .read_data(&mut want, at + (e.offset - rec_offset))
                .map_err(|source| BlockError::Journal {
                    path: dir.to_path_buf(),
                    source,
                })?;
            data.read_exact_at(&mut have, e.offset)
                .map_err(BlockError::io("read", &data_path))?;
            if want == have {
                continue;
            }
            if writer.is_none() {
                writer = Some(
                    OpenOptions::new()
                        .write(true)
                        .open(&data_path)
                        .map_err(BlockError::io("open", &data_path))?,
                );
            }
            if let Some(w) = &writer {
                w.write_all_at(&want, e.offset)
                    .map_err(BlockError::io("write", &data_path))?;
            }
        }
        if let Some(w) = writer {
            w.sync_data().map_err(BlockError::io("sync", &data_path))?;
        }
        Ok(())
    }

    fn extent_count(&self) -> usize {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Flushes, then rewrites the journal as one record per extent (each keeping its sequence
    /// number, so `changed_since` is unchanged); overwritten records are dropped. Done at a
    /// writable open when the journal holds many more records than extents.
    pub fn compact(&self) -> Result<(), BlockError> {
        let mut st = self.writer()?;
        self.flush_locked(&mut st)?;
        self.compact_locked(&mut st)
    }

    /// Compaction of a flushed delta (nothing pending).
    fn compact_locked(&self, st: &mut WriteState) -> Result<(), BlockError> {
        if st.data_in_journal {
            // The rewritten journal carries no data: the data file must hold it durably.
            self.settle(st)?;
            self.data
                .sync_data()
                .map_err(BlockError::io("sync", &self.dir))?;
        }
        let mut extents: Vec<Extent> = self
            .index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .collect();
        extents.sort_by_key(|e| (e.seq, e.offset));
        let mut records: Vec<Record> = extents
            .iter()
            .map(|e| {
                let kind = if e.kind == ExtentKind::Data {
                    RecordKind::Write
                } else {
                    RecordKind::Zero
                };
                Record::new(kind, e.seq, e.offset, e.len)
            })
            .collect();
        records.push(Self::flush_record(st.durable_seq, RECORD_SIZE as u64, true));
        let header = Self::header_record(
            self.meta.size,
            meta::unhex(&self.meta.uuid).unwrap_or_default(),
        );
        st.journal = Journal::rewrite(&self.dir.join(JOURNAL_FILE), &header, &records).map_err(
            |source| BlockError::Journal {
                path: self.dir.clone(),
                source,
            },
        )?;
        st.data_in_journal = false;
        self.reset_inline(st);
        Ok(())
    }

    fn state(&self) -> MutexGuard<'_, WriteState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn writer(&self) -> Result<MutexGuard<'_, WriteState>, BlockError> {
        let st = self.state();
        if !self.writable || st.frozen_seq.is_some() {
            return Err(BlockError::ReadOnly {
                path: self.dir.clone(),
            });
        }
        self.wb.check()?;
        Ok(st)
    }

    /// Puts every write whose bytes are only in the overlay into the data file (the queued
    /// committed batches, then the pending writes), before anything else writes, punches or
    /// syncs it. The pending writes stay in the batch their flush carries.
    fn settle(&self, st: &mut WriteState) -> Result<(), BlockError> {
        self.wb.place(&self.data, &st.unplaced)?;
        st.unplaced.clear();
        Ok(())
    }

    /// True if a write of `len` bytes is carried by the next flush (its bytes then wait in
    /// the overlay); stops carrying once more than [`INLINE_FLUSH_BYTES`] would be pending.
    fn carries(st: &mut WriteState, len: u64) -> bool {
        let fits = st.stage.as_ref().is_some_and(|s| {
            usize::try_from(len).is_ok_and(|n| s.fits(n.saturating_add(RECORD_SIZE)))
        });
        if st.inline_bytes + len > INLINE_FLUSH_BYTES || !fits {
            st.carrying = false;
        }
        st.carrying
    }

    /// Refuses an operation that needs `n` more sequence numbers than are left below
    /// [`MAX_SEQ`] (never in practice: the journal refuses a crafted one at open).
    fn reserve_seqs(&self, st: &WriteState, n: u64) -> Result<(), BlockError> {
        if st.next_seq.saturating_add(n - 1) > MAX_SEQ {
            return Err(BlockError::Journal {
                path: self.dir.clone(),
                source: JournalError::SequenceLimit {
                    path: self.dir.join(JOURNAL_FILE),
                    seq: st.next_seq,
                },
            });
        }
        Ok(())
    }

    /// Records a change whose data (for a WRITE) is in the data file already; fails only
    /// when the sequence numbers run out (one must stay for the FLUSH that commits it).
    fn record(
        &self,
        st: &mut WriteState,
        kind: RecordKind,
        offset: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        self.reserve_seqs(st, 2)?;
        // A WRITE comes here only once its flush cannot carry it ([`Delta::carries`] said so).
        debug_assert!(kind != RecordKind::Write || !st.carrying);
        let r = self.next_record(st, kind, offset, len);
        match st.stage.as_mut().filter(|s| s.fits(RECORD_SIZE)) {
            Some(stage) if st.carrying => stage.push_record(&r.encode()),
            _ => st.carrying = false,
        }
        Ok(())
    }

    /// Records a WRITE of `len` bytes of whole blocks at `offset` that the next flush carries
    /// ([`Delta::carries`] said so): `copy` puts the bytes into the stage (through
    /// [`Stage::push_data`] with the record maker it is given), which is where they wait in
    /// the overlay; the data file is not written.
    fn record_carried(
        &self,
        st: &mut WriteState,
        offset: u64,
        len: u64,
        copy: impl FnOnce(&mut Stage, &dyn Fn(&[u8]) -> [u8; RECORD_SIZE]) -> Slice,
    ) -> Result<(), BlockError> {
        self.reserve_seqs(st, 2)?;
        let seq = st.next_seq;
        let make = |d: &[u8]| {
            let r = Record::new(RecordKind::Write, seq, offset, len);
            write_data_record(r, crc32c::crc32c(d))
        };
        let Some(stage) = st.stage.as_mut() else {
            // Not carrying without a stage ([`Delta::carries`]).
            return Err(BlockError::io("write", &self.dir)(std::io::Error::other(
                "no stage for a carried write",
            )));
        };
        let chunk = Chunk {
            offset,
            data: copy(stage, &make),
        };
        // In the overlay before the index, so that a reader finding the extent finds its bytes.
        self.wb.insert(seq, chunk.clone());
        let r = self.next_record(st, RecordKind::Write, offset, len);
        debug_assert_eq!(r.seq, seq);
        st.unplaced.push((seq, chunk));
        st.inline_bytes += len;
        Ok(())
    }

    /// The next record of the pending batch (its sequence number taken, the extent index
    /// updated); the caller has reserved the sequence numbers.
    fn next_record(&self, st: &mut WriteState, kind: RecordKind, offset: u64, len: u64) -> Record {
        let seq = st.next_seq;
        st.next_seq += 1;
        let r = Record::new(kind, seq, offset, len);
        st.pending.push(r);
        let ek = if kind == RecordKind::Write {
            ExtentKind::Data
        } else {
            ExtentKind::Zero
        };
        self.index
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(offset, len, ek, seq);
        r
    }

    /// Reads `buf.len()` bytes at `offset` (512-byte aligned), falling through to the parent
    /// for blocks this delta does not hold.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let len = buf.len() as u64;
        check_io(offset, len, self.meta.size)?;
        let extents = self
            .index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .range(offset, len);
        let mut pos = offset;
        for e in extents.iter().copied().chain(std::iter::once(Extent {
            offset: offset + len,
            len: 0,
            kind: ExtentKind::Zero,
            seq: 0,
        })) {
            if e.offset > pos {
                // Extents are clipped to `[offset, offset + buf.len())`: indices fit `buf`.
                #[allow(clippy::cast_possible_truncation)]
                let b = &mut buf[(pos - offset) as usize..(e.offset - offset) as usize];
                self.parent.read_at(b, pos)?;
            }
            #[allow(clippy::cast_possible_truncation)] // as above
            let b = &mut buf[(e.offset - offset) as usize..(e.end() - offset) as usize];
            match e.kind {
                ExtentKind::Data => {
                    // A write's extents lie inside the range it wrote.
                    #[allow(clippy::cast_possible_truncation)]
                    let carried = self.wb.get(e.seq).and_then(|c| {
                        let at = e.offset.checked_sub(c.offset)? as usize;
                        c.data
                            .get(at..at + b.len())
                            .map(|src| b.copy_from_slice(src))
                    });
                    if carried.is_none() {
                        self.data
                            .read_exact_at(b, e.offset)
                            .map_err(BlockError::io("read", &self.dir))?;
                    }
                }
                ExtentKind::Zero => b.fill(0),
            }
            pos = e.end();
        }
        Ok(())
    }

    /// Writes `buf` at `offset` (512-byte aligned; partial 4 KiB blocks are read-modify-written).
    /// Durable after the next [`Delta::flush`].
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        check_io(offset, buf.len() as u64, self.meta.size)?;
        let mut st = self.writer()?;
        self.write_locked(&mut st, buf, offset)
    }

    /// Like [`Delta::write_at`] with the bytes at `src` (see [`crate::Disk::write_at_raw`]):
    /// a block-aligned write is copied once, into the overlay when the next flush carries it,
    /// or straight from `src` into the data file when it does not; any other is copied into
    /// `scratch` first.
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes until the call returns.
    pub unsafe fn write_at_raw(
        &self,
        src: *const u8,
        len: usize,
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> Result<(), BlockError> {
        check_io(offset, len as u64, self.meta.size)?;
        let mut st = self.writer()?;
        let aligned = offset.is_multiple_of(BLOCK_SIZE) && (len as u64).is_multiple_of(BLOCK_SIZE);
        if len > 0 && aligned {
            self.reserve_seqs(&st, 2)?;
            if Self::carries(&mut st, len as u64) {
                return self.record_carried(&mut st, offset, len as u64, |stage, make| {
                    // SAFETY: `src` is valid for `len` bytes (the caller's contract).
                    unsafe { stage.push_data(src, len, make) }
                });
            }
            self.settle(&mut st)?;
            // SAFETY: `src` is valid for `len` bytes (the caller's contract).
            unsafe { crate::sys::pwrite_raw(&self.data, src, len, offset) }
                .map_err(BlockError::io("write", &self.dir))?;
            return self.record(&mut st, RecordKind::Write, offset, len as u64);
        }
        // SAFETY: `src` is valid for `len` bytes (the caller's contract).
        unsafe { crate::layer::copy_raw(src, len, scratch) };
        self.write_locked(&mut st, scratch, offset)
    }

    fn write_locked(&self, st: &mut WriteState, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        // Before the data file changes: a write that cannot be recorded must not land.
        self.reserve_seqs(st, 2)?;
        let (start, end) = (align_down(offset), align_up(offset + len));
        let mut tmp = Vec::new();
        let blocks: &[u8] = if start == offset && end == offset + len {
            buf
        } else {
            // `end - start` is `buf.len()` plus at most two blocks.
            #[allow(clippy::cast_possible_truncation)]
            tmp.resize((end - start) as usize, 0);
            #[allow(clippy::cast_possible_truncation)] // BLOCK_SIZE is 4096
            let bs = BLOCK_SIZE as usize;
            self.read_at(&mut tmp[..bs], start)?;
            if end - start > BLOCK_SIZE {
                let n = tmp.len();
                self.read_at(&mut tmp[n - bs..], end - BLOCK_SIZE)?;
            }
            #[allow(clippy::cast_possible_truncation)] // less than BLOCK_SIZE
            let at = (offset - start) as usize;
            tmp[at..at + buf.len()].copy_from_slice(buf);
            &tmp
        };
        if Self::carries(st, end - start) {
            return self.record_carried(st, start, end - start, |stage, make| {
                // SAFETY: `blocks` is a live slice of `blocks.len()` bytes.
                unsafe { stage.push_data(blocks.as_ptr(), blocks.len(), make) }
            });
        }
        self.settle(st)?;
        self.data
            .write_all_at(blocks, start)
            .map_err(BlockError::io("write", &self.dir))?;
        self.record(st, RecordKind::Write, start, end - start)
    }

    /// Makes `[offset, offset + len)` read as zeros (partial blocks are written as zero data).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.zero_range(offset, len, RecordKind::Zero)
    }

    /// Discards the whole blocks of `[offset, offset + len)`; they then read as zeros. Partial
    /// blocks at the edges are left unchanged.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.zero_range(offset, len, RecordKind::Discard)
    }

    fn zero_range(&self, offset: u64, len: u64, kind: RecordKind) -> Result<(), BlockError> {
        check_io(offset, len, self.meta.size)?;
        let mut st = self.writer()?;
        // Up to three records (two partial edges and the range) and their FLUSH.
        self.reserve_seqs(&st, 4)?;
        let (start, end) = (align_up(offset), align_down(offset + len));
        if start >= end {
            if kind == RecordKind::Zero {
                // `start >= end`: `len` is under two blocks.
                #[allow(clippy::cast_possible_truncation)]
                self.write_locked(&mut st, &vec![0u8; len as usize], offset)?;
            }
            return Ok(());
        }
        if kind == RecordKind::Zero {
            // Both edges are shorter than BLOCK_SIZE.
            #[allow(clippy::cast_possible_truncation)]
            self.write_locked(&mut st, &vec![0u8; (start - offset) as usize], offset)?;
            #[allow(clippy::cast_possible_truncation)]
            self.write_locked(&mut st, &vec![0u8; (offset + len - end) as usize], end)?;
        }
        // No older carried write may land in the range after the punch.
        self.settle(&mut st)?;
        crate::sys::punch_hole(&self.data, start, end - start)
            .map_err(BlockError::io("punch", &self.dir))?;
        self.record(&mut st, kind, start, end - start)
    }

    /// Makes every earlier write durable: one journal append (the records, the data of at
    /// most [`INLINE_FLUSH_BYTES`] of writes, a FLUSH record) and its fdatasync; or, for more
    /// data, data fdatasync, then the records and a FLUSH, then journal fdatasync. Returns the
    /// durable sequence number.
    pub fn flush(&self) -> Result<u64, BlockError> {
        let (seq, hook) = {
            let mut st = self.state();
            let seq = self.flush_locked(&mut st)?;
            (seq, st.flush_hook.clone())
        };
        if let Some(hook) = hook {
            // Not under the state lock: the hook may wait for another thread that flushes
            // this delta with [`Delta::flush_without_hook`].
            hook()?;
            let mut st = self.state();
            if st
                .flush_hook
                .as_ref()
                .is_some_and(|h| Arc::ptr_eq(h, &hook))
            {
                st.flush_hook = None;
            }
        }
        Ok(seq)
    }

    /// Like [`Delta::flush`], but does not run the flush hook: for the hook's owner, which
    /// makes this delta durable before it lets the hook complete.
    pub fn flush_without_hook(&self) -> Result<u64, BlockError> {
        let mut st = self.state();
        self.flush_locked(&mut st)
    }

    /// Makes every later [`Delta::flush`] run `hook` after the delta's own records are durable
    /// and before it returns, until the hook succeeds once: no flush is acknowledged before
    /// that. A failing hook fails that flush; the next flush runs it again.
    pub fn set_flush_hook(&self, hook: FlushHook) {
        self.state().flush_hook = Some(hook);
    }

    fn flush_locked(&self, st: &mut WriteState) -> Result<u64, BlockError> {
        self.flush_records(st)
    }

    fn flush_records(&self, st: &mut WriteState) -> Result<u64, BlockError> {
        if let Some(commit) = &self.commit {
            // Nothing of a fork child may be durable before the fork itself is.
            commit.ensure()?;
        }
        if let Some(recs) = st.deferred.take() {
            return self.complete_freeze(st, recs);
        }
        if st.pending.is_empty() {
            return Ok(st.durable_seq);
        }
        let seq = st.next_seq;
        let batch_start = st.journal.len();
        let budget = INLINE_JOURNAL_BUDGET.max(8 * RECORD_SIZE as u64 * self.extent_count() as u64);
        let over_budget = batch_start + st.inline_bytes >= budget;
        let inline = !over_budget && st.carrying;
        let appended = match st.stage.as_mut().filter(|_| inline) {
            // One append carries the records and the data they wrote; its fdatasync is the
            // only one. The data file gets the data from the writeback afterwards (and is
            // synced at the next checkpoint), or is repaired from here after a crash.
            Some(stage) => {
                let flush = Self::flush_record(seq, batch_start, false).encode();
                let end = batch_start + (stage.body().len() + RECORD_SIZE) as u64;
                let laid_out = st
                    .journal
                    .append_start()
                    .is_some_and(|(base, head)| stage.starts(base, head));
                if laid_out {
                    // The stage's pages are the append as it is.
                    st.journal.append_pages(stage.pages(&flush), end)
                } else {
                    // The journal changed since the stage began. Every append resets the
                    // stage, so this does not happen; if it did, the copy is still right.
                    let mut iov = [
                        std::io::IoSlice::new(stage.body()),
                        std::io::IoSlice::new(&flush),
                    ];
                    st.journal.append_vectored(&mut iov)
                }
                .map_err(|source| BlockError::Journal {
                    path: self.dir.clone(),
                    source,
                })
            }
            None => {
                // The data file first, then the records: two fdatasyncs, the data written once.
                let mut recs = st.pending.clone();
                recs.push(Self::flush_record(seq, batch_start, true));
                self.sync_data_then_append(st, &recs)
            }
        };
        appended?;
        st.pending.clear();
        self.reset_inline(st);
        if inline {
            // Durable in the journal: the data file gets these bytes in the background.
            let placed = std::mem::take(&mut st.unplaced);
            self.wb.enqueue(&self.data, placed, st.journal.space());
        }
        st.next_seq += 1;
        st.durable_seq = seq;
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if inline {
            st.data_in_journal = true;
        } else {
            st.data_in_journal = false;
            // Compacted whenever the budget stopped a flush from carrying its data (not
            // only once the journal itself passed it: flushes of records alone would then
            // keep taking the two-sync path until they filled the gap).
            if st.journal.version() >= JOURNAL_VERSION && over_budget {
                self.compact_locked(st)?;
            }
        }
        Ok(seq)
    }

    /// The ordering of a checkpoint: every write in the data file, data fdatasync, then `recs`
    /// appended (journal fdatasync).
    fn sync_data_then_append(
        &self,
        st: &mut WriteState,
        recs: &[Record],
    ) -> Result<(), BlockError> {
        self.settle(st)?;
        self.data
            .sync_data()
            .map_err(BlockError::io("sync", &self.dir))?;
        st.journal
            .append(recs)
            .map_err(|source| BlockError::Journal {
                path: self.dir.clone(),
                source,
            })
    }

    /// An empty pending batch: the next flush can carry its data if the journal's version can.
    fn reset_inline(&self, st: &mut WriteState) {
        st.inline_bytes = 0;
        st.carrying = false;
        if st.journal.version() < JOURNAL_VERSION {
            return;
        }
        let (base, head) = st.journal.append_start().unwrap_or((st.journal.len(), &[]));
        st.carrying = match &mut st.stage {
            // Every buffer held by queued batches: write them, which frees their buffers (a
            // failure is kept for the next write or flush, which it fails).
            Some(stage) => {
                stage.reset(base, head)
                    || (self.wb.drain(&self.data).is_ok() && stage.reset(base, head))
            }
            None => {
                st.stage = Stage::new(base, head);
                st.stage.is_some()
            }
        };
    }

    /// Writes a deferred freeze: data fdatasync, then the pending records, FLUSH and FORK in
    /// one journal append (and fdatasync).
    fn complete_freeze(
        &self,
        st: &mut WriteState,
        mut recs: Vec<Record>,
    ) -> Result<u64, BlockError> {
        let seq = st.frozen_seq.unwrap_or(st.durable_seq);
        // The commit records name where their batch starts; the data file is synced first.
        let batch_start = st.journal.len();
        for r in &mut recs {
            if matches!(r.kind, RecordKind::Flush | RecordKind::Fork) {
                r.offset = batch_start;
                if r.kind == RecordKind::Flush {
                    r.aux = FLUSH_CHECKPOINT;
                }
            }
        }
        if let Err(e) = self.sync_data_then_append(st, &recs) {
            st.deferred = Some(recs);
            return Err(e);
        }
        st.durable_seq = seq;
        st.data_in_journal = false;
        // Never written again: no writeback thread, no zeros ahead of the journal.
        self.wb.shutdown();
        st.journal.space().close();
        crate::sys::try_lock(&self.lock, false).map_err(BlockError::io("lock", &self.dir))?;
        Ok(seq)
    }

    /// Flushes and freezes the delta at its current sequence number (a FORK record); it is
    /// read-only from then on and can be a parent. Returns the frozen sequence number.
    pub fn freeze(&self) -> Result<u64, BlockError> {
        let seq = self.freeze_deferred()?;
        self.flush()?;
        Ok(seq)
    }

    /// Freezes the delta in memory only, without I/O: writes are refused from now on, and the
    /// frozen sequence number (returned) is fixed, so [`Delta::identity`] answers. The FORK
    /// record reaches the journal at the next [`Delta::flush`]; until then, a crash leaves the
    /// delta unfrozen with its last flushed contents. Idempotent.
    pub fn freeze_deferred(&self) -> Result<u64, BlockError> {
        let mut st = self.state();
        if let Some(seq) = st.frozen_seq {
            return Ok(seq);
        }
        if !self.writable {
            return Err(BlockError::ReadOnly {
                path: self.dir.clone(),
            });
        }
        // Room for the FLUSH of pending records and the FORK.
        self.reserve_seqs(&st, 2)?;
        let mut recs = std::mem::take(&mut st.pending);
        st.carrying = false;
        // Never written again: its stage buffers go (slices still queued keep theirs).
        st.stage = None;
        if !recs.is_empty() {
            recs.push(Record::new(RecordKind::Flush, st.next_seq, 0, 0));
            st.next_seq += 1;
        }
        let seq = st.next_seq;
        recs.push(Record::new(RecordKind::Fork, seq, 0, 0));
        st.next_seq += 1;
        st.frozen_seq = Some(seq);
        st.deferred = Some(recs);
        Ok(seq)
    }

    /// Makes a child directory ready for a fork of a disk of `size` bytes: creates `dir` with
    /// its data file and journal (durable) and a locked `meta.tmp`; see [`crate::prepare_fork`].
    pub(crate) fn prepare_child(dir: &Path, size: u64) -> Result<PreparedChild, BlockError> {
        let id =
            crate::sys::random_id().map_err(BlockError::io("read", Path::new("/dev/urandom")))?;
        std::fs::create_dir(dir).map_err(BlockError::create(dir))?;
        Self::prepare_files(dir, size, id).inspect_err(|_| {
            // Nothing in it yet: leave no half-made directory behind.
            let _ = std::fs::remove_dir_all(dir);
        })
    }

    fn prepare_files(dir: &Path, size: u64, id: [u8; 16]) -> Result<PreparedChild, BlockError> {
        let tmp = meta::tmp_path(&dir.join(META_FILE));
        let pending_meta = File::create(&tmp).map_err(BlockError::io("create", &tmp))?;
        if !crate::sys::try_lock(&pending_meta, true).map_err(BlockError::io("lock", dir))? {
            return Err(BlockError::Locked {
                path: dir.to_path_buf(),
            });
        }
        let (data, journal) = Self::create_data_and_journal(dir, size, id)?;
        crate::sys::sync_dir(dir).map_err(BlockError::io("sync", dir))?;
        let up = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        crate::sys::sync_dir(up).map_err(BlockError::io("sync", up))?;
        Ok(PreparedChild {
            dir: dir.to_path_buf(),
            id,
            size,
            data,
            journal,
            pending_meta,
        })
    }

    /// The meta a prepared child gets over `parent` (whose identity must be fixed: a base, or
    /// a delta frozen at least in memory).
    pub(crate) fn child_meta(
        child: &PreparedChild,
        parent: &Layer,
        parent_path: PathBuf,
    ) -> Result<DeltaMeta, BlockError> {
        Ok(DeltaMeta {
            format: DELTA_FORMAT.into(),
            version: 1,
            uuid: meta::hex(&child.id),
            size: child.size,
            parent: ParentRef {
                path: parent_path,
                identity: parent.identity()?,
            },
            merged_from: None,
            merge_inputs: None,
        })
    }

    /// An empty writable delta on a prepared child, usable at once; its first flush completes
    /// `commit` (which writes its meta). No I/O.
    pub(crate) fn from_prepared(
        child: PreparedChild,
        meta: DeltaMeta,
        parent: Arc<Layer>,
        lock: File,
        commit: Arc<crate::fork::ForkCommit>,
    ) -> Self {
        let wb = Writeback::new(&child.dir);
        let delta = Self {
            dir: child.dir,
            meta,
            parent,
            data: Arc::new(child.data),
            writable: true,
            state: Mutex::new(WriteState {
                journal: child.journal,
                pending: Vec::new(),
                next_seq: 1,
                durable_seq: 0,
                frozen_seq: None,
                deferred: None,
                flush_hook: None,
                data_in_journal: false,
                carrying: false,
                stage: None,
                inline_bytes: 0,
                unplaced: Vec::new(),
            }),
            wb,
            index: RwLock::new(ExtentMap::new()),
            recovered_discarded: 0,
            lock,
            commit: Some(commit),
            flushes: std::sync::atomic::AtomicU64::new(0),
        };
        delta.reset_inline(&mut delta.state());
        delta
    }

    /// The identity children record (only a frozen delta has one).
    pub fn identity(&self) -> Result<Identity, BlockError> {
        let seq = self
            .state()
            .frozen_seq
            .ok_or_else(|| BlockError::NotFrozen {
                path: self.dir.clone(),
            })?;
        Ok(Identity {
            kind: LayerKind::Delta,
            uuid: self.meta.uuid.clone(),
            size: self.meta.size,
            check: seq,
        })
    }

    /// Extents changed after sequence number `seq` (pending writes included).
    pub fn changed_since(&self, seq: u64) -> Vec<Extent> {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .changed_since(seq)
    }

    /// The last sequence number used and a copy of the extent index at that point.
    pub fn snapshot(&self) -> (u64, ExtentMap) {
        let st = self.state();
        let idx = self
            .index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        (st.next_seq - 1, idx)
    }

    /// The last sequence number used (pending records included).
    pub fn last_seq(&self) -> u64 {
        self.state().next_seq - 1
    }

    /// The sequence number of the last FLUSH or FORK on disk.
    pub fn durable_seq(&self) -> u64 {
        self.state().durable_seq
    }

    /// The sequence number the delta is frozen at, if frozen.
    pub fn frozen_seq(&self) -> Option<u64> {
        self.state().frozen_seq
    }

    /// True if writes are refused (opened read-only or frozen).
    pub fn is_read_only(&self) -> bool {
        !self.writable || self.frozen_seq().is_some()
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.meta.size
    }

    /// The delta directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The parsed `meta` file.
    pub fn meta(&self) -> &DeltaMeta {
        &self.meta
    }

    /// The parent layer.
    pub fn parent(&self) -> &Arc<Layer> {
        &self.parent
    }

    /// Journal bytes dropped by recovery at open (uncommitted records or a torn tail).
    pub fn recovered_discarded_bytes(&self) -> u64 {
        self.recovered_discarded
    }

    /// Flushes since open that made writes durable (each one journal append and fdatasync).
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Keeps (`true`) or lets (`false`) the background writeback from putting flushed data
    /// into the data file; anything that needs the data file still writes it first. For tests
    /// of that ordering.
    #[doc(hidden)]
    pub fn hold_writeback(&self, held: bool) {
        self.wb.hold(held);
    }

    /// Journal length in bytes.
    pub fn journal_len(&self) -> u64 {
        self.state().journal.len()
    }

    /// The data file, holding every write made so far (the overlay's are put in place first).
    pub(crate) fn data_file(&self) -> Result<&File, BlockError> {
        self.settle(&mut self.state())?;
        Ok(&self.data)
    }
}

impl Drop for Delta {
    /// Puts the overlay's writes into the data file (as if they had been written there at
    /// once; nothing is synced) and stops the writeback thread.
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = self.settle(&mut st);
        drop(st);
        self.wb.shutdown();
    }
}

/// The `WRITE_DATA` form of the write record `r`, for a batch that carries its data (whose
/// CRC32C is `crc`).
fn write_data_record(r: Record, crc: u32) -> [u8; RECORD_SIZE] {
    let mut w = r;
    w.kind = RecordKind::WriteData;
    w.aux = u64::from(crc);
    w.encode()
}
