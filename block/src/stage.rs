//! The next small flush's journal append, laid out in memory as it will be in the journal.
//!
//! A flush that carries its data appends its records and the blocks they wrote with one write.
//! The stage builds that write as the writes come in: from the start of the page the journal
//! ends in (its partial last page copied first), each record and the blocks it carries where
//! they will be in the journal, in memory aligned for `O_DIRECT`. A carried write is copied
//! once, into the stage; its overlay entry is a [`Slice`] of the stage, and the flush writes
//! the stage's pages as they are. Bytes are written into the stage only past its end, and a
//! buffer is reused only once no [`Slice`] of it is left, so a slice never changes.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;
use std::sync::Arc;

const PAGE: usize = 4096;

/// Bytes of one stage buffer: the journal's partial last page, the most data a small flush
/// carries, room for 256 records besides it, and the page the FLUSH record and padding end in.
#[allow(clippy::cast_possible_truncation)] // 512 KiB
const STAGE_BYTES: usize =
    PAGE + crate::delta::INLINE_FLUSH_BYTES as usize + 256 * crate::journal::RECORD_SIZE + PAGE;

/// Room kept at the end of a stage for the FLUSH record.
const FLUSH_ROOM: usize = crate::journal::RECORD_SIZE;

/// A zeroed, page-aligned allocation of [`STAGE_BYTES`].
pub(crate) struct StageBuf {
    ptr: NonNull<u8>,
}

// SAFETY: the buffer is plain bytes owned by this value; shared access only reads ranges that
// are no longer written (see the module's rule), and writes go through `Stage`, which holds
// the buffer's only write access.
unsafe impl Send for StageBuf {}
// SAFETY: as above: readers through `&StageBuf` (slices) read only ranges that no one writes.
unsafe impl Sync for StageBuf {}

fn layout() -> Layout {
    // A non-zero size that is a multiple of its power-of-two alignment: always valid.
    Layout::from_size_align(STAGE_BYTES, PAGE).unwrap_or_else(|_| unreachable!())
}

impl StageBuf {
    /// A new zeroed buffer; `None` if memory runs out.
    fn new() -> Option<Arc<Self>> {
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout()) };
        NonNull::new(p).map(|ptr| Arc::new(Self { ptr }))
    }

    /// The bytes `[at, at + len)` (inside the buffer; the caller makes sure no one writes
    /// them while the result lives).
    fn bytes(&self, at: usize, len: usize) -> &[u8] {
        assert!(at <= STAGE_BYTES && len <= STAGE_BYTES - at);
        // SAFETY: in bounds (checked); the memory is initialized (zeroed at allocation) and
        // lives as long as `self`; by the module's rule nothing writes a range that is read.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(at), len) }
    }

    /// Copies `len` bytes from `src` to `[at, at + len)` of the buffer.
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes and not overlap the buffer; no one may
    /// read or write `[at, at + len)` of the buffer meanwhile.
    unsafe fn write(&self, at: usize, src: *const u8, len: usize) {
        assert!(at <= STAGE_BYTES && len <= STAGE_BYTES - at);
        // SAFETY: in bounds (checked); `src` is readable and disjoint, and the range is ours
        // alone (the caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(src, self.ptr.as_ptr().add(at), len) };
    }
}

impl Drop for StageBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { dealloc(self.ptr.as_ptr(), layout()) };
    }
}

/// Bytes written into a stage (a carried write's blocks), shared by the overlay, reads and
/// the writeback thread; they never change.
#[derive(Clone)]
pub(crate) struct Slice {
    buf: Arc<StageBuf>,
    at: usize,
    len: usize,
}

impl std::fmt::Debug for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slice({}..{})", self.at, self.at + self.len)
    }
}

impl std::ops::Deref for Slice {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.bytes(self.at, self.len)
    }
}

/// The append being built: `[0, head)` is the journal's partial last page (journal offset
/// `base` on), then the batch's records and data up to `end`.
pub(crate) struct Stage {
    buf: Arc<StageBuf>,
    /// Buffers of earlier batches, reused once their slices are gone.
    spare: Vec<Arc<StageBuf>>,
    base: u64,
    head: usize,
    end: usize,
}

/// Buffers one stage uses at most (its own and those whose batches wait for the writeback):
/// a bound on the memory queued batches hold, 8.5 MiB.
const STAGE_BUFFERS: usize = 16;

impl Stage {
    /// A stage for an append at journal offset `base` whose page starts with `head`; `None`
    /// if memory runs out.
    pub(crate) fn new(base: u64, head: &[u8]) -> Option<Self> {
        let mut s = Self {
            buf: StageBuf::new()?,
            spare: Vec::new(),
            base: 0,
            head: 0,
            end: 0,
        };
        s.start(base, head);
        Some(s)
    }

    /// Starts the next batch (at `base`, its page starting with `head`), in a buffer no
    /// slice refers to: this one, a spare one, or a new one. `false` (and the stage has no
    /// room) if [`STAGE_BUFFERS`] are all held by queued batches, or memory runs out.
    pub(crate) fn reset(&mut self, base: u64, head: &[u8]) -> bool {
        // `Arc::get_mut` (not a count): it orders the other holders' last reads before our
        // writes into the buffer.
        if Arc::get_mut(&mut self.buf).is_none() {
            let free = self
                .spare
                .iter_mut()
                .position(|b| Arc::get_mut(b).is_some());
            let next = match free {
                Some(i) => Some(self.spare.swap_remove(i)),
                None if self.spare.len() + 1 < STAGE_BUFFERS => StageBuf::new(),
                None => None,
            };
            let Some(next) = next else {
                self.head = STAGE_BYTES;
                self.end = STAGE_BYTES;
                return false;
            };
            let old = std::mem::replace(&mut self.buf, next);
            self.spare.push(old);
        }
        self.start(base, head);
        true
    }

    fn start(&mut self, base: u64, head: &[u8]) {
        debug_assert!(head.len() < PAGE && Arc::get_mut(&mut self.buf).is_some());
        // SAFETY: the buffer is ours alone (no slice of it is left), `head` is another
        // allocation, and it is shorter than a page.
        unsafe { self.buf.write(0, head.as_ptr(), head.len()) };
        self.base = base;
        self.head = head.len();
        self.end = self.head;
    }

    /// True if `len` more bytes fit (the FLUSH record's room kept).
    pub(crate) fn fits(&self, len: usize) -> bool {
        STAGE_BYTES - self.end >= len.saturating_add(FLUSH_ROOM)
    }

    /// Appends a record without data. The caller checked [`Stage::fits`].
    pub(crate) fn push_record(&mut self, record: &[u8; crate::journal::RECORD_SIZE]) {
        assert!(self.fits(record.len()));
        // SAFETY: past `end`, where no slice reaches and nothing reads; `record` is another
        // allocation.
        unsafe { self.buf.write(self.end, record.as_ptr(), record.len()) };
        self.end += record.len();
    }

    /// Appends the `len` bytes at `src` after room for their record, then the record that
    /// `record` makes from the copy (so a checksum covers exactly the bytes kept, whatever
    /// `src` does meanwhile). Returns the copy. The caller checked [`Stage::fits`] for both.
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes until the call returns.
    pub(crate) unsafe fn push_data(
        &mut self,
        src: *const u8,
        len: usize,
        record: impl FnOnce(&[u8]) -> [u8; crate::journal::RECORD_SIZE],
    ) -> Slice {
        let r = crate::journal::RECORD_SIZE;
        assert!(self.fits(r + len));
        let at = self.end + r;
        // SAFETY: past `end`, where no slice reaches and nothing reads; `src` is readable
        // (the caller's contract) and not in a stage buffer of this delta's batch.
        unsafe { self.buf.write(at, src, len) };
        let rec = record(self.buf.bytes(at, len));
        // SAFETY: as above, the record's room just before the copy.
        unsafe { self.buf.write(self.end, rec.as_ptr(), r) };
        self.end = at + len;
        Slice {
            buf: Arc::clone(&self.buf),
            at,
            len,
        }
    }

    /// The batch's bytes (records and data, without the head).
    pub(crate) fn body(&self) -> &[u8] {
        self.buf.bytes(self.head, self.end - self.head)
    }

    /// True if the stage was laid out for an append at `base` whose page starts with `head`.
    pub(crate) fn starts(&self, base: u64, head: &[u8]) -> bool {
        self.base == base && self.buf.bytes(0, self.head) == head
    }

    /// The whole pages of the append: head, body, then `last` (the FLUSH record) and zeros to
    /// the end of its page. Does not change the batch (a failed append can be retried).
    pub(crate) fn pages(&mut self, last: &[u8; crate::journal::RECORD_SIZE]) -> &[u8] {
        let r = crate::journal::RECORD_SIZE;
        assert!(STAGE_BYTES - self.end >= r);
        let stop = (self.end + r).div_ceil(PAGE) * PAGE;
        // SAFETY: past `end`, where no slice reaches and nothing reads.
        unsafe { self.buf.write(self.end, last.as_ptr(), r) };
        let zeros = [0u8; PAGE];
        // SAFETY: `[end + r, stop)` is past `end`, inside the buffer (its size is a whole
        // number of pages) and shorter than a page.
        unsafe {
            self.buf
                .write(self.end + r, zeros.as_ptr(), stop - self.end - r);
        }
        self.buf.bytes(0, stop)
    }
}
