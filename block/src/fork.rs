//! Forking a layer into two children, whole ([`fork`]) or in three phases so that the part a
//! running VM must be paused for does no I/O ([`prepare_fork`], [`PreparedFork::cut`],
//! [`ForkCommit::commit`]).
//!
//! Ordering (crash safety): the children's files are created and synced before the cut; the
//! cut only changes memory; the commit makes the parent's freeze durable (data fdatasync, then
//! the FORK record) *before* it writes each child's `meta`; and a child's flush commits first,
//! so nothing written to a child is reported durable before the fork is. A crash before the
//! commit leaves the parent as it was at its last flush and the children without `meta`
//! ([`BlockError::IncompleteFork`] on open).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::delta::{Delta, DeltaMeta, META_FILE, PreparedChild};
use crate::error::BlockError;
use crate::layer::Layer;
use crate::meta;

/// Forks `parent`: freezes it (if it is a delta; a base is always read-only) and creates two
/// empty children on it in the new directories `a` and `b`, durable on return. O(1) in the
/// disk size.
pub fn fork(parent: Arc<Layer>, a: &Path, b: &Path) -> Result<(Delta, Delta), BlockError> {
    let (da, db, commit) = prepare_fork(parent, a, b)?.cut()?;
    commit.commit()?;
    Ok((da, db))
}

/// Does the slow part of a fork of `parent` while it is still in use: creates the child
/// directories `a` and `b` with their data files and journals, durable. Nothing about the
/// parent changes. Dropping the result without [`PreparedFork::cut`] removes both directories.
pub fn prepare_fork(parent: Arc<Layer>, a: &Path, b: &Path) -> Result<PreparedFork, BlockError> {
    let parent_path =
        std::fs::canonicalize(parent.path()).map_err(BlockError::io("resolve", parent.path()))?;
    if let Layer::Delta(d) = &*parent
        && d.frozen_seq().is_none()
        && d.is_read_only()
    {
        return Err(BlockError::ReadOnly {
            path: parent.path().to_path_buf(),
        });
    }
    parent.check_child_depth(a)?;
    let size = parent.size();
    let ca = Delta::prepare_child(a, size)?;
    let cb = match Delta::prepare_child(b, size) {
        Ok(c) => c,
        Err(e) => {
            drop(ca);
            let _ = std::fs::remove_dir_all(a);
            return Err(e);
        }
    };
    Ok(PreparedFork {
        parent,
        parent_path,
        children: Some([ca, cb]),
    })
}

/// A fork whose children exist on disk but not yet as layers (see [`prepare_fork`]).
#[derive(Debug)]
pub struct PreparedFork {
    parent: Arc<Layer>,
    parent_path: PathBuf,
    children: Option<[PreparedChild; 2]>,
}

impl PreparedFork {
    /// The instant of the fork, without I/O: freezes the parent in memory (writes to it are
    /// refused from here on) and returns both children, usable at once, with the commit that
    /// makes the fork durable. Call [`ForkCommit::commit`] after the pause; a child's first
    /// flush also commits.
    pub fn cut(mut self) -> Result<(Delta, Delta, Arc<ForkCommit>), BlockError> {
        // Everything that can fail comes before the freeze: a failed cut changes nothing (the
        // prepared directories are removed when `self` drops).
        let mut handles = Vec::with_capacity(2);
        for c in self.children.iter().flatten() {
            let dup = || {
                c.pending_meta
                    .try_clone()
                    .map_err(BlockError::io("dup", &c.dir))
            };
            handles.push((dup()?, dup()?));
        }
        if let Layer::Delta(d) = &*self.parent {
            d.freeze_deferred()?;
        }
        let [ca, cb] = self
            .children
            .take()
            .expect("children are taken only by cut");
        let mut pending = Vec::with_capacity(2);
        let mut parts = Vec::with_capacity(2);
        for (c, (file, lock)) in [ca, cb].into_iter().zip(handles) {
            // Cannot fail now: the parent's identity is fixed (a base, or frozen above).
            let meta = Delta::child_meta(&c, &self.parent, self.parent_path.clone())?;
            pending.push(PendingMeta {
                dir: c.dir.clone(),
                meta: meta.clone(),
                file: Some(file),
            });
            parts.push((c, meta, lock));
        }
        let commit = Arc::new(ForkCommit {
            parent: Arc::clone(&self.parent),
            state: Mutex::new(pending),
        });
        let mut children = parts.into_iter().map(|(c, meta, lock)| {
            Delta::from_prepared(c, meta, Arc::clone(&self.parent), lock, Arc::clone(&commit))
        });
        let (Some(da), Some(db)) = (children.next(), children.next()) else {
            unreachable!("two children were prepared");
        };
        Ok((da, db, commit))
    }
}

impl Drop for PreparedFork {
    fn drop(&mut self) {
        // Prepared but never cut: the directories hold nothing anyone wrote.
        if let Some(children) = self.children.take() {
            for c in children {
                let dir = c.dir.clone();
                drop(c);
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// A child's meta still to be written.
#[derive(Debug)]
struct PendingMeta {
    dir: PathBuf,
    meta: DeltaMeta,
    /// `meta.tmp` (the child's lock file); `None` once renamed to `meta`.
    file: Option<File>,
}

/// The durable half of a cut fork, shared by both children.
#[derive(Debug)]
pub struct ForkCommit {
    parent: Arc<Layer>,
    state: Mutex<Vec<PendingMeta>>,
}

impl ForkCommit {
    /// Makes the fork durable: the parent's freeze (data fdatasync, FORK record), then each
    /// child's `meta`. Idempotent; after an error, a later call retries what is left.
    pub fn commit(&self) -> Result<(), BlockError> {
        self.ensure()
    }

    /// Leaves the child in `dir` out of the fork, for a caller about to delete it (a clone that
    /// never ran): the commit then makes only the parent and the other child durable. Its
    /// layer must not be used any more.
    pub fn abandon(&self, dir: &Path) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|p| p.file.is_none() || p.dir != dir);
    }

    /// True once the fork is durable.
    pub fn is_committed(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .all(|p| p.file.is_none())
    }

    pub(crate) fn ensure(&self) -> Result<(), BlockError> {
        let mut pending = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.iter().all(|p| p.file.is_none()) {
            return Ok(());
        }
        if let Layer::Delta(d) = &*self.parent {
            d.flush()?;
        }
        for p in pending.iter_mut() {
            if let Some(mut f) = p.file.take() {
                let path = p.dir.join(META_FILE);
                let tmp = meta::tmp_path(&path);
                let written = if !tmp.exists() && path.exists() {
                    // An earlier try renamed it but failed to sync the directory.
                    crate::sys::sync_dir(&p.dir).map_err(BlockError::io("sync", &p.dir))
                } else {
                    meta::write_via(&mut f, &tmp, &path, &p.meta)
                };
                if let Err(e) = written {
                    if tmp.exists() {
                        // Not renamed yet: start over on the next try (the file may hold a
                        // partial body). Once renamed, the body is whole and only the
                        // directory sync is left to retry.
                        let _ = f.set_len(0);
                        use std::io::Seek;
                        let _ = f.seek(std::io::SeekFrom::Start(0));
                    }
                    p.file = Some(f);
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}
