//! The upgrade journal: which disk chain is the VM's disk, across a crash of the process.
//!
//! One file, `<work_dir>/upgrade.journal`, of records appended in order and each made durable
//! (`fdatasync`) before the step it announces is acted on. A record is
//! `magic "MVUJ" | u32 payload length | u32 CRC32C of the payload | payload (JSON)`, little
//! endian. Reading stops at the first record that does not verify (a torn tail: the step it
//! would have announced never started). The rule [`recover`] applies: with a `commit` record
//! the VM's disks are the merged layers; without one they are the active VM's own chain, and
//! everything the upgrade made for the backup is removed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::phase::Phase;

/// The journal's file name in the work directory.
pub const JOURNAL_FILE: &str = "upgrade.journal";
const MAGIC: &[u8; 4] = b"MVUJ";
/// Largest record payload accepted when reading.
const MAX_PAYLOAD: u32 = 1 << 20;

/// Errors of the upgrade journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file operation failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The work directory already holds an upgrade that did not finish.
    #[error(
        "{0} holds an unfinished upgrade: run its recovery first (`microvmm upgrade --recover DIR`)"
    )]
    Unfinished(PathBuf),
    /// The journal is readable but makes no sense (no `begin` first).
    #[error("upgrade journal {path} is invalid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Recovery could not set a disk chain right.
    #[error("recovery of {path} failed")]
    Recover {
        /// The layer concerned.
        path: PathBuf,
        /// The block error.
        #[source]
        source: block::BlockError,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + use<> {
    let path = path.to_owned();
    move |source| JournalError::Io { op, path, source }
}

/// The layers of one disk during an upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskPaths {
    /// The active VM's delta before the upgrade (frozen by the clone: the common parent).
    pub original: PathBuf,
    /// The active VM's fork child (its disk from the clone on).
    pub active: PathBuf,
    /// The backup's fork child (the upgrade's writes).
    pub backup: PathBuf,
    /// The merge output (the VM's disk after the commit).
    pub merged: PathBuf,
}

/// One journal record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "kebab-case")]
pub enum Record {
    /// The upgrade starts: its disks.
    Begin {
        /// Per disk, in attach order.
        disks: Vec<DiskPaths>,
    },
    /// A phase starts.
    Phase {
        /// The phase.
        phase: Phase,
    },
    /// The commit point: the merged layers are durable and are the VM's disks.
    Commit,
    /// Rolled back: the active VM's chain stays.
    RolledBack {
        /// The phase that failed.
        phase: Phase,
    },
    /// Cleanup finished (after a commit or a rollback).
    Done,
}

/// An open upgrade journal, appended to in order.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Creates the journal in `dir` (created if missing) and writes `begin`. Refuses a
    /// directory whose journal has no `done` record (an unfinished upgrade).
    pub fn create(dir: &Path, begin: &Record) -> Result<Self, JournalError> {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let path = dir.join(JOURNAL_FILE);
        if path.exists() {
            let recs = read(&path)?;
            if recs.last() != Some(&Record::Done) && !recs.is_empty() {
                return Err(JournalError::Unfinished(dir.to_owned()));
            }
        }
        let tmp = dir.join(format!("{JOURNAL_FILE}.tmp"));
        let mut file = File::create(&tmp).map_err(io("create", &tmp))?;
        file.write_all(&encode(begin)).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("sync", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
        sync_dir(dir)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io("open", &path))?;
        Ok(Self { path, file })
    }

    /// Appends a record and makes it durable.
    pub fn append(&mut self, rec: &Record) -> Result<(), JournalError> {
        self.file
            .write_all(&encode(rec))
            .map_err(io("write", &self.path))?;
        self.file.sync_data().map_err(io("sync", &self.path))
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", dir))
}

fn encode(rec: &Record) -> Vec<u8> {
    let payload = serde_json::to_vec(rec).unwrap_or_default();
    let mut out = Vec::with_capacity(12 + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes records from the start of `bytes`, stopping at the first that does not verify.
pub fn decode(bytes: &[u8]) -> Vec<Record> {
    let mut recs = Vec::new();
    let mut pos = 0usize;
    while let Some(h) = bytes.get(pos..pos + 12) {
        if &h[..4] != MAGIC {
            break;
        }
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let crc = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if len > MAX_PAYLOAD {
            break;
        }
        let Some(p) = bytes.get(pos + 12..pos + 12 + len as usize) else {
            break;
        };
        if crc32c::crc32c(p) != crc {
            break;
        }
        match serde_json::from_slice(p) {
            Ok(r) => recs.push(r),
            Err(_) => break,
        }
        pos += 12 + len as usize;
    }
    recs
}

/// Reads a journal file's valid records.
pub fn read(path: &Path) -> Result<Vec<Record>, JournalError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io("read", path))?;
    Ok(decode(&bytes))
}

/// What recovery found and did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recovery {
    /// Whether the upgrade had committed (the merged layers are the disks).
    pub committed: bool,
    /// The phase last recorded.
    pub last_phase: Option<Phase>,
    /// The VM's disk per attached disk: boot the VM on these.
    pub disks: Vec<PathBuf>,
    /// Layers removed (the side that lost).
    pub removed: Vec<PathBuf>,
}

/// Removes a layer directory (or whatever file is in its place); true if something was there.
pub(crate) fn remove_path(p: &Path) -> std::io::Result<bool> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).map(|()| true),
        Ok(_) => std::fs::remove_file(p).map(|()| true),
    }
}

fn remove_layer(path: &Path, removed: &mut Vec<PathBuf>) -> Result<(), JournalError> {
    for p in [path.to_owned(), staging(path)] {
        if remove_path(&p).map_err(io("remove", &p))? {
            removed.push(p);
        }
    }
    Ok(())
}

fn staging(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".merging");
    PathBuf::from(s)
}

/// Recovers the upgrade whose journal is in `dir` after the orchestrating process ended at
/// any moment: decides the VM's disk chain (the merged layers if the commit record is
/// durable, else the active VM's chain), removes the other side's layers, and writes `done`.
/// Idempotent; a directory without a journal, or a finished one, changes nothing.
pub fn recover(dir: &Path) -> Result<Option<Recovery>, JournalError> {
    let path = dir.join(JOURNAL_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let recs = read(&path)?;
    let Some(Record::Begin { disks }) = recs.first().cloned() else {
        if recs.is_empty() {
            // Torn first record: nothing was started.
            std::fs::remove_file(&path).map_err(io("remove", &path))?;
            return Ok(None);
        }
        return Err(JournalError::Invalid {
            path,
            reason: "the first record is not `begin`".into(),
        });
    };
    let committed = recs.contains(&Record::Commit);
    let last_phase = recs.iter().rev().find_map(|r| match r {
        Record::Phase { phase } => Some(*phase),
        _ => None,
    });
    let mut removed = Vec::new();
    let mut chosen = Vec::with_capacity(disks.len());
    for d in &disks {
        if committed {
            remove_layer(&d.active, &mut removed)?;
            remove_layer(&d.backup, &mut removed)?;
            chosen.push(d.merged.clone());
            continue;
        }
        remove_layer(&d.merged, &mut removed)?;
        remove_layer(&d.backup, &mut removed)?;
        chosen.push(recover_active(d, &mut removed)?);
    }
    let done = recs.last() == Some(&Record::Done);
    if !done {
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io("open", &path))?;
        f.write_all(&encode(&Record::Done))
            .and_then(|()| f.sync_data())
            .map_err(io("write", &path))?;
    }
    Ok(Some(Recovery {
        committed,
        last_phase,
        disks: chosen,
        removed,
    }))
}

/// The active side's disk of one uncommitted upgrade: the original delta if the clone's fork
/// never committed (the parent is not frozen: its children hold nothing acknowledged, whatever
/// state a crash left them in), else the active fork child. A frozen parent whose active child
/// is missing or incomplete (killed between the parent's FORK record and the child's `meta`)
/// gets a fresh empty child: nothing was acknowledged in the lost one, since a child's first
/// flush commits the fork.
fn recover_active(d: &DiskPaths, removed: &mut Vec<PathBuf>) -> Result<PathBuf, JournalError> {
    let rec = |path: &Path| {
        let path = path.to_owned();
        move |source| JournalError::Recover { path, source }
    };
    let original = block::Delta::open_read_only(&d.original).map_err(rec(&d.original))?;
    if original.frozen_seq().is_none() {
        drop(original);
        remove_layer(&d.active, removed)?;
        return Ok(d.original.clone());
    }
    let incomplete = !d.active.join(block::META_FILE).exists();
    match block::Delta::open_read_only(&d.active) {
        Ok(_) => return Ok(d.active.clone()),
        Err(block::BlockError::IncompleteFork { .. }) => {}
        Err(_) if incomplete => {}
        Err(e) => return Err(rec(&d.active)(e)),
    }
    remove_layer(&d.active, removed)?;
    let parent = std::sync::Arc::new(block::Layer::Delta(original));
    let child = block::Delta::create(&d.active, parent).map_err(rec(&d.active))?;
    child.flush().map_err(rec(&d.active))?;
    Ok(d.active.clone())
}
