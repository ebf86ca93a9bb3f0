//! Data of journaled writes on its way to a delta's data file.
//!
//! A write whose flush carries its data in the journal does not touch the data file when it
//! is made: its bytes wait in the *overlay* (by sequence number; reads look there first).
//! Once the flush that carries them is durable, a writeback thread writes them into the data
//! file, batch after batch in commit order, and drops each from the overlay after its write.
//! So the data file is written off the flush's path, and a crash before the writeback loses
//! nothing: the journal holds the data and recovery puts it in place
//! (`Delta::replay_data`). Anything that writes, punches or syncs the data file itself waits
//! for the writeback first ([`Writeback::drain`]), so an older batch never lands on top of a
//! newer change.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crate::error::BlockError;
use crate::journal::Space;

/// Committed bytes waiting for the writeback beyond which a flush waits for it first (memory
/// bound of the overlay's committed part).
const QUEUE_LIMIT: u64 = 32 << 20;

/// The blocks one write put at `offset` (whole, aligned blocks).
#[derive(Clone, Debug)]
pub(crate) struct Chunk {
    pub(crate) offset: u64,
    pub(crate) data: crate::stage::Slice,
}

#[derive(Default)]
struct Inner {
    /// Writes not yet in the data file, by sequence number.
    overlay: HashMap<u64, Chunk>,
    /// Committed batches for the thread, oldest first.
    queue: VecDeque<Vec<(u64, Chunk)>>,
    queued_bytes: u64,
    /// The thread is writing the queue's front batch.
    busy: bool,
    /// The first failed write (the batch stays queued and in the overlay).
    failed: Option<(io::ErrorKind, String)>,
    /// The thread leaves the queue alone ([`Writeback::hold`]).
    held: bool,
    /// The journal's space, which the thread extends when the queue is empty.
    space: Option<Arc<Space>>,
    stop: bool,
}

/// The overlay and writeback thread of one writable delta.
pub(crate) struct Writeback {
    inner: Mutex<Inner>,
    /// Entries in the overlay (reads skip the lock when 0).
    entries: AtomicUsize,
    work: Condvar,
    idle: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
    dir: PathBuf,
}

impl Writeback {
    pub(crate) fn new(dir: &Path) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            entries: AtomicUsize::new(0),
            work: Condvar::new(),
            idle: Condvar::new(),
            thread: Mutex::new(None),
            dir: dir.to_path_buf(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn error(&self, failed: &(io::ErrorKind, String)) -> BlockError {
        BlockError::io("write back", &self.dir)(io::Error::new(failed.0, failed.1.clone()))
    }

    /// The error of a failed writeback, if any: the data file misses committed data (it is
    /// in the journal; reopening the delta puts it in place).
    pub(crate) fn check(&self) -> Result<(), BlockError> {
        match &self.lock().failed {
            Some(f) => Err(self.error(f)),
            None => Ok(()),
        }
    }

    /// Adds a write to the overlay (before it enters the extent index, so a reader that finds
    /// its extent finds its bytes).
    pub(crate) fn insert(&self, seq: u64, chunk: Chunk) {
        let mut g = self.lock();
        if g.overlay.insert(seq, chunk).is_none() {
            self.entries.fetch_add(1, Ordering::Release);
        }
    }

    /// The bytes of the write `seq`, if they are not in the data file yet.
    pub(crate) fn get(&self, seq: u64) -> Option<Chunk> {
        if self.entries.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.lock().overlay.get(&seq).cloned()
    }

    fn remove(&self, g: &mut Inner, batch: &[(u64, Chunk)]) {
        for (seq, _) in batch {
            if g.overlay.remove(seq).is_some() {
                self.entries.fetch_sub(1, Ordering::Release);
            }
        }
    }

    /// Hands a committed batch to the writeback thread (started on first use; `data` is the
    /// delta's data file). Waits for the thread first when much is queued already. If no
    /// thread can start, the batch is written here.
    pub(crate) fn enqueue(
        self: &Arc<Self>,
        data: &Arc<File>,
        batch: Vec<(u64, Chunk)>,
        space: Arc<Space>,
    ) {
        if batch.is_empty() {
            return;
        }
        self.lock().space = Some(space);
        let mut t = self.thread.lock().unwrap_or_else(PoisonError::into_inner);
        if t.is_none() && !self.lock().stop {
            let me = Arc::clone(self);
            // Through the sandbox's spawner (the caller, a device worker say, may not start
            // threads itself); the thread runs under a device worker's filter (disk I/O).
            let file = Arc::clone(data);
            *t = sandbox::spawn(
                sandbox::ThreadKind::DeviceWorker,
                std::thread::Builder::new().name("delta-writeback".into()),
                move || me.run(&file),
            )
            .ok();
        }
        let bytes: u64 = batch.iter().map(|(_, c)| c.data.len() as u64).sum();
        let mut g = self.lock();
        if t.is_none() {
            drop(t);
            g.queue.push_back(batch);
            g.queued_bytes += bytes;
            drop(g);
            // No thread (it could not start, or the delta is frozen): written here (a failure
            // is kept for the next write or flush).
            let _ = self.drain(data);
            return;
        }
        drop(t);
        // Much queued already: help the thread before adding more.
        while g.queued_bytes > QUEUE_LIMIT && g.failed.is_none() {
            if g.busy {
                g = self.idle.wait(g).unwrap_or_else(PoisonError::into_inner);
            } else {
                g = self.write_front(g, data);
            }
        }
        g.queue.push_back(batch);
        g.queued_bytes += bytes;
        drop(g);
        self.work.notify_one();
    }

    fn run(&self, data: &File) {
        let mut g = self.lock();
        loop {
            while (g.queue.is_empty() || g.busy || g.held || g.failed.is_some()) && !g.stop {
                g = self.work.wait(g).unwrap_or_else(PoisonError::into_inner);
            }
            if g.stop {
                // Dropping the delta: it drains the queue itself first.
                return;
            }
            g = self.write_front(g, data);
            if g.queue.is_empty() && !g.held {
                // Idle until the next flush: keep zeros ahead of the journal's end.
                let space = g.space.clone();
                drop(g);
                if let Some(space) = space {
                    space.zero_ahead();
                }
                g = self.lock();
            }
        }
    }

    /// Writes the queue's front batch (the lock released meanwhile, `busy` set so that no one
    /// else takes a batch), then drops it from the queue and the overlay, or records the
    /// failure.
    fn write_front<'a>(
        &'a self,
        mut g: MutexGuard<'a, Inner>,
        data: &File,
    ) -> MutexGuard<'a, Inner> {
        let Some(batch) = g.queue.front().cloned() else {
            return g;
        };
        g.busy = true;
        drop(g);
        let written = write_chunks(data, &batch);
        let mut g = self.lock();
        g.busy = false;
        match written {
            Ok(()) => {
                g.queue.pop_front();
                let bytes: u64 = batch.iter().map(|(_, c)| c.data.len() as u64).sum();
                g.queued_bytes -= bytes;
                self.remove(&mut g, &batch);
            }
            Err(e) => g.failed = Some((e.kind(), e.to_string())),
        }
        self.idle.notify_all();
        self.work.notify_one();
        g
    }

    /// Writes every queued batch into the data file (not synced): the caller takes the
    /// batches the thread has not started, and waits for the one it is writing.
    pub(crate) fn drain(&self, data: &File) -> Result<(), BlockError> {
        let mut g = self.lock();
        loop {
            if let Some(f) = &g.failed {
                return Err(self.error(f));
            }
            if g.busy {
                g = self.idle.wait(g).unwrap_or_else(PoisonError::into_inner);
            } else if g.queue.is_empty() {
                return Ok(());
            } else {
                g = self.write_front(g, data);
            }
        }
    }

    /// Keeps (`true`) or lets (`false`) the thread from writing queued batches: for tests
    /// that need batches waiting (a drain still writes them).
    pub(crate) fn hold(&self, held: bool) {
        self.lock().held = held;
        self.work.notify_one();
    }

    /// Writes `pending` (uncommitted writes, oldest first) into the data file now, after the
    /// queue, and drops them from the overlay.
    pub(crate) fn place(&self, data: &File, pending: &[(u64, Chunk)]) -> Result<(), BlockError> {
        self.drain(data)?;
        if pending.is_empty() {
            return Ok(());
        }
        write_chunks(data, pending).map_err(BlockError::io("write", &self.dir))?;
        let mut g = self.lock();
        self.remove(&mut g, pending);
        Ok(())
    }

    /// Stops the thread (the queue must have been drained: what is left is written by the
    /// next drain); batches enqueued later are written by the caller.
    pub(crate) fn shutdown(&self) {
        self.lock().stop = true;
        self.work.notify_all();
        let t = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

/// Writes `batch` into the data file and starts the writeback of what it wrote (not waiting
/// for it), so that the next checkpoint's data sync finds little left to write instead of
/// everything written since the last one.
fn write_chunks(data: &File, batch: &[(u64, Chunk)]) -> io::Result<()> {
    for (_, c) in batch {
        data.write_all_at(&c.data, c.offset)?;
    }
    for (_, c) in batch {
        crate::sys::start_writeback(data, c.offset, c.data.len() as u64)?;
    }
    Ok(())
}
