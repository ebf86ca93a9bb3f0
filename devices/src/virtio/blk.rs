//! virtio-blk: request parsing (untrusted descriptor chains) apart from execution on a disk backend.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use virtio_bindings::{virtio_blk as vb, virtio_ids};

use block::{BlockError, Disk};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};

use super::ring_view::AvailView;
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, Activation, GuestMemory, GuestReader, GuestWriter, INT_VRING, Interrupt,
    SharedQueue, VIRTIO_F_VERSION_1, VirtioDevice, WorkerThread,
};

/// Virtio device ID of a block device.
pub const DEVICE_TYPE_BLOCK: u32 = virtio_ids::VIRTIO_ID_BLOCK;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Largest data payload of one request.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Largest number of discard/write-zeroes segments in one request.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;

const F_SEG_MAX: u32 = vb::VIRTIO_BLK_F_SEG_MAX;
const F_RO: u32 = vb::VIRTIO_BLK_F_RO;
const F_BLK_SIZE: u32 = vb::VIRTIO_BLK_F_BLK_SIZE;
const F_TOPOLOGY: u32 = vb::VIRTIO_BLK_F_TOPOLOGY;
const F_FLUSH: u32 = vb::VIRTIO_BLK_F_FLUSH;
const F_DISCARD: u32 = vb::VIRTIO_BLK_F_DISCARD;
const F_WRITE_ZEROES: u32 = vb::VIRTIO_BLK_F_WRITE_ZEROES;

const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
const T_DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
const T_WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;

/// Request status: success.
#[allow(clippy::cast_possible_truncation)] // the status constants are 0..=2
pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
/// Request status: I/O error (also bad requests).
#[allow(clippy::cast_possible_truncation)]
pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
/// Request status: unsupported request type.
#[allow(clippy::cast_possible_truncation)]
pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

/// Why a descriptor chain is not a well-formed request.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain points outside guest memory, loops, or is otherwise unusable.
    #[error("invalid descriptor chain")]
    InvalidChain,
    /// The chain has no device-writable byte for the status.
    #[error("no writable status byte")]
    NoStatus,
    /// The device-readable part is shorter than the 16-byte header.
    #[error("request header truncated")]
    ShortHeader,
    /// A data length is not a multiple of the block size, or too large.
    #[error("bad data length {0}")]
    BadLength(usize),
    /// The sector range leaves the disk or is not block-aligned.
    #[error("sector {sector} + {bytes} bytes is outside the disk or unaligned")]
    OutOfRange {
        /// Start sector.
        sector: u64,
        /// Length in bytes.
        bytes: u64,
    },
    /// Discard/write-zeroes segment list malformed.
    #[error("bad discard/write-zeroes segments")]
    BadSegments,
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// An unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

/// One discard or write-zeroes range, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
}

/// A parsed, validated request. Data buffers stay in guest memory until execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset` into the chain's writable buffers.
    In {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: usize,
    },
    /// Write the chain's readable data (after the header) at `offset`.
    Out {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: usize,
    },
    /// Flush.
    Flush,
    /// Return the device ID string.
    GetId,
    /// Discard ranges.
    Discard(Vec<Range>),
    /// Write zeroes to ranges.
    WriteZeroes(Vec<Range>),
}

/// Disk geometry a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct DiskLimits {
    /// Size in bytes.
    pub size: u64,
    /// Logical block size in bytes.
    pub block_size: u64,
    /// Refuse writes.
    pub read_only: bool,
}

impl DiskLimits {
    fn check(&self, sector: u64, bytes: u64) -> Result<u64, RequestError> {
        let err = RequestError::OutOfRange { sector, bytes };
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(err.clone())?;
        let end = offset.checked_add(bytes).ok_or(err.clone())?;
        if end > self.size
            || offset % self.block_size != 0
            || !bytes.is_multiple_of(self.block_size)
        {
            return Err(err);
        }
        Ok(offset)
    }
}

/// A request that failed to parse, with the status byte's writer when the chain has one.
pub type ParseFailure<'a> = (RequestError, Option<GuestWriter<'a>>);

/// Parses the request header and validates it against `limits`, consuming the header from
/// `reader` and splitting the status byte off the end of `writer`; returns the request and the
/// status byte's writer (`writer` keeps the data area).
pub fn parse<'a>(
    reader: &mut GuestReader<'a>,
    writer: &mut GuestWriter<'a>,
    limits: &DiskLimits,
) -> Result<(Request, GuestWriter<'a>), ParseFailure<'a>> {
    let avail = writer.available_bytes();
    if avail == 0 {
        return Err((RequestError::NoStatus, None));
    }
    let status = writer
        .split_at(avail - 1)
        .map_err(|_| (RequestError::NoStatus, None))?;
    match parse_body(reader, writer, limits) {
        Ok(req) => Ok((req, status)),
        Err(e) => Err((e, Some(status))),
    }
}

fn parse_body(
    reader: &mut GuestReader<'_>,
    writer: &GuestWriter<'_>,
    limits: &DiskLimits,
) -> Result<Request, RequestError> {
    let mut hdr = [0u8; 16];
    reader
        .read_exact(&mut hdr)
        .map_err(|_| RequestError::ShortHeader)?;
    let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes(
        hdr[8..16]
            .try_into()
            .map_err(|_| RequestError::ShortHeader)?,
    );
    match ty {
        T_IN => {
            let len = writer.available_bytes();
            if len > MAX_REQUEST_BYTES {
                return Err(RequestError::BadLength(len));
            }
            let offset = limits.check(sector, len as u64)?;
            Ok(Request::In { offset, len })
        }
        T_OUT => {
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            let len = reader.available_bytes();
            if len > MAX_REQUEST_BYTES {
                return Err(RequestError::BadLength(len));
            }
            let offset = limits.check(sector, len as u64)?;
            Ok(Request::Out { offset, len })
        }
        T_FLUSH => Ok(Request::Flush),
        T_GET_ID => Ok(Request::GetId),
        T_DISCARD | T_WRITE_ZEROES => {
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            let bytes = reader.available_bytes();
            if bytes == 0 || !bytes.is_multiple_of(16) || bytes / 16 > MAX_DISCARD_SEGMENTS as usize
            {
                return Err(RequestError::BadSegments);
            }
            let mut ranges = Vec::with_capacity(bytes / 16);
            for _ in 0..bytes / 16 {
                let mut seg = [0u8; 16];
                reader
                    .read_exact(&mut seg)
                    .map_err(|_| RequestError::BadSegments)?;
                let sector = u64::from_le_bytes(
                    seg[0..8]
                        .try_into()
                        .map_err(|_| RequestError::BadSegments)?,
                );
                let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
                let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                // Only the "unmap" flag (bit 0) exists, and only for write-zeroes.
                if flags & !1 != 0 || (ty == T_DISCARD && flags != 0) {
                    return Err(RequestError::BadSegments);
                }
                let len = u64::from(num) * SECTOR_SIZE;
                let offset = limits.check(sector, len)?;
                ranges.push(Range { offset, len });
            }
            Ok(if ty == T_DISCARD {
                Request::Discard(ranges)
            } else {
                Request::WriteZeroes(ranges)
            })
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Executes a parsed request; returns the status byte and the bytes written into the chain's data.
pub fn execute(
    req: &Request,
    reader: &mut GuestReader<'_>,
    writer: &mut GuestWriter<'_>,
    disk: &dyn Disk,
    id: &[u8; ID_BYTES],
    buf: &mut Vec<u8>,
) -> (u8, usize) {
    let io = |r: Result<(), BlockError>| if r.is_ok() { S_OK } else { S_IOERR };
    match req {
        Request::In { offset, len } => {
            buf.resize(*len, 0);
            if disk.read_at(buf, *offset).is_err() {
                return (S_IOERR, 0);
            }
            match writer.write_all(buf) {
                Ok(()) => (S_OK, *len),
                Err(_) => (S_IOERR, writer.bytes_written()),
            }
        }
        Request::Out { offset, len } => {
            buf.resize(*len, 0);
            if reader.read_exact(buf).is_err() {
                return (S_IOERR, 0);
            }
            (io(disk.write_at(buf, *offset)), 0)
        }
        Request::Flush => (io(disk.flush()), 0),
        Request::GetId => {
            let n = writer.available_bytes().min(ID_BYTES);
            match writer.write_all(&id[..n]) {
                Ok(()) => (S_OK, n),
                Err(_) => (S_IOERR, 0),
            }
        }
        Request::Discard(ranges) => (
            io(ranges
                .iter()
                .try_for_each(|r| disk.discard(r.offset, r.len))),
            0,
        ),
        Request::WriteZeroes(ranges) => (
            io(ranges
                .iter()
                .try_for_each(|r| disk.write_zeroes(r.offset, r.len))),
            0,
        ),
    }
}

/// Errors while processing a queue: the ring itself is broken, so the device needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Reading the available ring or writing the used ring failed.
    #[error("virtqueue access failed")]
    Ring(#[source] virtio_queue::Error),
    /// The available ring says requests are pending but none can be taken: its index is more
    /// than a queue ahead of the device, or the ring cannot be read (found by fuzzing: the
    /// device used to retry forever, holding the queue lock).
    #[error("the available ring is broken (its index is out of range or it cannot be read)")]
    BrokenRing,
}

/// Handles one descriptor chain end to end, as [`process_queue`] does (the fast path, else the
/// general one); returns the used length to report.
#[cfg(test)]
fn handle_chain(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    disk: &dyn Disk,
    limits: &DiskLimits,
    id: &[u8; ID_BYTES],
    buf: &mut Vec<u8>,
) -> u32 {
    if let Some(used) = fast_read_write(chain.clone(), mem, disk, limits, buf) {
        return used;
    }
    handle_chain_general(chain, mem, disk, limits, id, buf)
}

/// The common request in one walk of the chain and without allocating: a read or write whose
/// chain is exactly a 16-byte device-readable header, one data descriptor (readable for a
/// write, writable for a read) and a 1-byte writable status, all inside one memory region
/// each, on a request that is valid. Anything else returns `None` before touching the disk
/// or guest memory, and the general path (reader and writer over the chain) handles it, with
/// the same result this path would have given (`fast_path_agrees_with_the_general_path`).
fn fast_read_write(
    mut descs: impl Iterator<Item = Descriptor>,
    mem: &GuestMemory,
    disk: &dyn Disk,
    limits: &DiskLimits,
    buf: &mut Vec<u8>,
) -> Option<u32> {
    let (h, d, st) = (descs.next()?, descs.next()?, descs.next()?);
    if descs.next().is_some()
        || h.is_write_only()
        || h.len() != 16
        || !st.is_write_only()
        || st.len() != 1
    {
        return None;
    }
    let hdr: [u8; 16] = mem.read_obj(h.addr()).ok()?;
    let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&hdr[8..16]);
    let sector = u64::from_le_bytes(sector);
    let len = d.len() as usize;
    let write = match ty {
        T_OUT if !d.is_write_only() && !limits.read_only => true,
        T_IN if d.is_write_only() => false,
        _ => return None,
    };
    if len > MAX_REQUEST_BYTES {
        return None;
    }
    let offset = limits.check(sector, len as u64).ok()?;
    // Both buffers must be addressable before anything happens (the general path refuses
    // the whole chain otherwise).
    let data = mem.get_slice(d.addr(), len).ok()?;
    let status = mem.get_slice(st.addr(), 1).ok()?;
    let (code, used) = if write {
        let ok = write_from_guest(disk, &data, offset, buf).is_ok();
        (if ok { S_OK } else { S_IOERR }, 1)
    } else {
        buf.resize(len, 0);
        match disk.read_at(buf, offset) {
            Ok(()) => {
                data.copy_from(&buf[..]);
                #[allow(clippy::cast_possible_truncation)] // len <= MAX_REQUEST_BYTES (16 MiB)
                (S_OK, len as u32 + 1)
            }
            Err(_) => (S_IOERR, 1),
        }
    };
    status.copy_from(&[code]);
    Some(used)
}

/// Writes the guest memory `data` at `offset` of `disk`, which reads it directly where it
/// can (no copy into `scratch`).
fn write_from_guest(
    disk: &dyn Disk,
    data: &vm_memory::VolatileSlice<'_, vm_memory::bitmap::BS<'_, vm_memory::bitmap::AtomicBitmap>>,
    offset: u64,
    scratch: &mut Vec<u8>,
) -> Result<(), BlockError> {
    let guard = data.ptr_guard();
    // SAFETY: `data` is `data.len()` bytes of a guest memory region, mapped for as long as
    // the memory `data` borrows from lives (beyond this call); the guest may change them
    // meanwhile: the disk writes whatever bytes it reads, and forms no reference to them.
    unsafe { disk.write_at_raw(guard.as_ptr(), data.len(), offset, scratch) }
}

/// Any chain: a reader over its readable and a writer over its writable descriptors.
fn handle_chain_general(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    disk: &dyn Disk,
    limits: &DiskLimits,
    id: &[u8; ID_BYTES],
    buf: &mut Vec<u8>,
) -> u32 {
    let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem)) else {
        // No usable buffers: nothing can be reported back but the used entry itself.
        return 0;
    };
    match parse(&mut reader, &mut writer, limits) {
        Ok((req, mut status)) => {
            let (code, written) = execute(&req, &mut reader, &mut writer, disk, id, buf);
            // `written` is at most MAX_REQUEST_BYTES (16 MiB): the checks in `parse`.
            #[allow(clippy::cast_possible_truncation)]
            match status.write_all(&[code]) {
                Ok(()) => (written + 1) as u32,
                Err(_) => written as u32,
            }
        }
        Err((e, status)) => {
            let code = if matches!(e, RequestError::Unsupported(_)) {
                S_UNSUPP
            } else {
                S_IOERR
            };
            match status {
                Some(mut w) => u32::from(w.write_all(&[code]).is_ok()),
                None => 0,
            }
        }
    }
}

/// Completed requests published with one used-index update, at most.
const USED_BATCH: usize = 8;

/// Processes every available request on `queue`; returns whether the driver must be notified.
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemory,
    disk: &dyn Disk,
    id: &[u8; ID_BYTES],
    buf: &mut Vec<u8>,
) -> Result<bool, QueueError> {
    let limits = DiskLimits {
        size: disk.size(),
        block_size: block::SECTOR_SIZE,
        read_only: disk.is_read_only(),
    };
    let mut used_any = false;
    // Whether the last look at the available index found requests pending.
    let mut pending = false;
    // Completions wait here for one used-index update per few requests (a short wait: the
    // requests run one after the other on this thread).
    let mut done = [(0u16, 0u32); USED_BATCH];
    loop {
        queue.disable_notification(mem).map_err(QueueError::Ring)?;
        let mut took = false;
        let mut n = 0;
        // One look at the driver's index per pass; an index out of range or a ring that cannot
        // be read yields nothing (then `BrokenRing` below, if requests were pending).
        let mut view = AvailView::new(queue, mem).ok();
        while let Some(chain) = view.as_mut().and_then(AvailView::next_chain) {
            let mut head = chain.head_index();
            // Taken (a head past the ring too, as virtio-queue's pop would have).
            let next = queue.next_avail().wrapping_add(1);
            queue.set_next_avail(next);
            if head < queue.size() {
                // Common requests take the fast path on the view's chain; the others go
                // through virtio-queue's reader and writer, on the same chain taken again.
                let len = match fast_read_write(chain, mem, disk, &limits, buf) {
                    Some(used) => Some(used),
                    None => {
                        queue.set_next_avail(next.wrapping_sub(1));
                        queue.pop_descriptor_chain(mem).and_then(|c| {
                            head = c.head_index();
                            (head < queue.size())
                                .then(|| handle_chain_general(c, mem, disk, &limits, id, buf))
                        })
                    }
                };
                if let Some(len) = len {
                    done[n] = (head, len);
                    n += 1;
                    if n == USED_BATCH {
                        super::publish_used(queue, mem, &done).map_err(QueueError::Ring)?;
                        n = 0;
                    }
                    used_any = true;
                    took = true;
                    continue;
                }
            }
            // A broken ring: the requests done before it are acknowledged, nothing after it
            // runs.
            super::publish_used(queue, mem, &done[..n]).map_err(QueueError::Ring)?;
            return Err(QueueError::Ring(
                virtio_queue::Error::InvalidDescriptorIndex,
            ));
        }
        super::publish_used(queue, mem, &done[..n]).map_err(QueueError::Ring)?;
        // A driver's index only grows: pending requests that cannot be taken mean a broken
        // ring, not a reason to look again (forever).
        if pending && !took {
            return Err(QueueError::BrokenRing);
        }
        pending = queue.enable_notification(mem).map_err(QueueError::Ring)?;
        if !pending {
            break;
        }
    }
    Ok(used_any && queue.needs_notification(mem).map_err(QueueError::Ring)?)
}

/// The virtio-blk configuration space (virtio 1.2 §5.2.4, `struct virtio_blk_config` up to
/// `write_zeroes_may_unmap`), little endian on x86_64; 60 bytes, no padding.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
struct BlkConfig {
    capacity: u64,
    size_max: u32,
    seg_max: u32,
    geometry: [u8; 4],
    blk_size: u32,
    topology: [u8; 8],
    writeback: u8,
    unused0: u8,
    num_queues: u16,
    max_discard_sectors: u32,
    max_discard_seg: u32,
    discard_sector_alignment: u32,
    max_write_zeroes_sectors: u32,
    max_write_zeroes_seg: u32,
    write_zeroes_may_unmap: u8,
    unused1: [u8; 3],
}

/// `struct virtio_blk_topology` for physical blocks of `per_block` logical ones (a power of
/// two): `physical_block_exp`, `alignment_offset` 0, `min_io_size` and `opt_io_size` one
/// physical block (in logical blocks), little endian.
fn topology(per_block: u32) -> [u8; 8] {
    let mut t = [0u8; 8];
    #[allow(clippy::cast_possible_truncation)] // at most 32
    let shift = per_block.trailing_zeros() as u8;
    t[0] = shift;
    // Callers pass the constant BLOCK_SIZE / SECTOR_SIZE (8).
    #[allow(clippy::cast_possible_truncation)]
    t[2..4].copy_from_slice(&(per_block as u16).to_le_bytes());
    t[4..8].copy_from_slice(&per_block.to_le_bytes());
    t
}

// SAFETY: `BlkConfig` is plain old data: packed (no padding), every field an integer or byte
// array, so any bit pattern is valid and it may be viewed as bytes.
unsafe impl vm_memory::ByteValued for BlkConfig {}

const _: () = assert!(std::mem::size_of::<BlkConfig>() == 60);

/// The disk behind a running [`Block`], replaceable while the device runs (a live clone swaps the
/// active VM onto its fork child during the final pause). The worker takes the current disk for
/// each batch of requests, under the queue lock, so holding every queue lock and then calling
/// [`DiskSlot::swap`] switches disks between two requests.
#[derive(Clone)]
pub struct DiskSlot {
    disk: Arc<std::sync::RwLock<Arc<dyn Disk>>>,
    /// Size and writability the guest was told.
    size: u64,
    read_only: bool,
}

impl std::fmt::Debug for DiskSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskSlot")
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl DiskSlot {
    /// A slot holding `disk`.
    pub fn new(disk: Arc<dyn Disk>) -> Self {
        Self {
            size: disk.size(),
            read_only: disk.is_read_only(),
            disk: Arc::new(std::sync::RwLock::new(disk)),
        }
    }

    /// The current disk.
    pub fn get(&self) -> Arc<dyn Disk> {
        Arc::clone(&self.disk.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the disk and returns the previous one. The new disk must have the size and
    /// writability the device was created with (the guest was told them); a different one is
    /// returned as `Err`.
    pub fn swap(&self, disk: Arc<dyn Disk>) -> Result<Arc<dyn Disk>, Arc<dyn Disk>> {
        if disk.size() != self.size || disk.is_read_only() != self.read_only {
            return Err(disk);
        }
        let mut cur = self.disk.write().unwrap_or_else(|p| p.into_inner());
        Ok(std::mem::replace(&mut *cur, disk))
    }
}

/// A virtio-blk device on a [`BlockBackend`].
pub struct Block {
    disk: DiskSlot,
    id: [u8; ID_BYTES],
    config: BlkConfig,
    features: u64,
    worker: Option<WorkerThread>,
    counters: Arc<super::DeviceCounters>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("id", &String::from_utf8_lossy(&self.id))
            .field("size", &self.disk.get().size())
            .field("running", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

impl Block {
    /// A block device serving `disk`, identified by `id` (up to 20 bytes, as GET_ID returns it).
    pub fn new(disk: Arc<dyn Disk>, id: &str) -> Self {
        let mut idb = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        // Logical blocks of 512 bytes (any file system's block size works; `blk_size` is what
        // Linux takes as the logical block size), and the delta's tracking granularity as the
        // physical block and the minimum and optimal I/O size, so a guest prefers whole 4 KiB
        // blocks (512-byte aligned requests are still served).
        #[allow(clippy::cast_possible_truncation)] // 4096
        let block_size = block::BLOCK_SIZE as u32;
        #[allow(clippy::cast_possible_truncation)] // 512
        let per_block = block_size / SECTOR_SIZE as u32;
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << F_SEG_MAX)
            | (1 << F_BLK_SIZE)
            | (1 << F_TOPOLOGY)
            | (1 << F_FLUSH);
        if disk.is_read_only() {
            features |= 1 << F_RO;
        } else {
            features |= (1 << F_DISCARD) | (1 << F_WRITE_ZEROES);
        }
        // Constants only: 512 and MAX_REQUEST_BYTES / 512 (32768).
        #[allow(clippy::cast_possible_truncation)]
        let config = BlkConfig {
            capacity: disk.size() / SECTOR_SIZE,
            seg_max: u32::from(QUEUE_SIZE) - 2,
            blk_size: SECTOR_SIZE as u32,
            topology: topology(per_block),
            max_discard_sectors: (MAX_REQUEST_BYTES as u64 / SECTOR_SIZE) as u32,
            max_discard_seg: MAX_DISCARD_SEGMENTS,
            discard_sector_alignment: block_size / 512,
            max_write_zeroes_sectors: (MAX_REQUEST_BYTES as u64 / SECTOR_SIZE) as u32,
            max_write_zeroes_seg: MAX_DISCARD_SEGMENTS,
            write_zeroes_may_unmap: 1,
            ..BlkConfig::default()
        };
        Self {
            disk: DiskSlot::new(disk),
            id: idb,
            config,
            features,
            worker: None,
            counters: Arc::default(),
        }
    }

    /// The slot holding this device's disk (keep it to swap the disk while the device runs).
    pub fn disk_slot(&self) -> DiskSlot {
        self.disk.clone()
    }
}

/// Waits until `a` or `b` is readable; returns (a_ready, b_ready).
fn wait2(a: &EventFd, b: &EventFd) -> (bool, bool) {
    let mut fds = [
        libc::pollfd {
            fd: a.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd structs that outlives the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    if n < 0 {
        return (false, false);
    }
    (fds[0].revents != 0, fds[1].revents != 0)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let config = vm_memory::ByteValued::as_slice(&self.config);
        let clamp = |o: u64| usize::try_from(o).map_or(config.len(), |o| o.min(config.len()));
        let start = clamp(offset);
        let end = clamp(offset.saturating_add(data.len() as u64));
        data[..end - start].copy_from_slice(&config[start..end]);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The writeback toggle is not offered; the config space is read-only.
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            mut queue_events,
            interrupt,
            ..
        } = a;
        if queues.len() != 1 || queue_events.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let queue = queues.into_iter().next().ok_or(ActivateError::QueueCount {
            expected: 1,
            got: 0,
        })?;
        let notify = queue_events.remove(0);
        // Requests may already wait in the ring (a device restored from a snapshot, or a
        // clone's, whose guest notified the source device): look at the queue once at start.
        notify.write(1).map_err(ActivateError::Worker)?;
        let disk = self.disk.clone();
        let id = self.id;
        let counters = Arc::clone(&self.counters);
        self.worker = Some(WorkerThread::spawn("virtio-blk", move |kill| {
            worker(
                &queue, &mem, &disk, &id, &notify, kill, &interrupt, &counters,
            );
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }

    fn counters(&self) -> Option<Arc<super::DeviceCounters>> {
        Some(Arc::clone(&self.counters))
    }
}

#[allow(clippy::too_many_arguments)] // the worker's whole context, passed once
fn worker(
    queue: &SharedQueue,
    mem: &GuestMemory,
    disk: &DiskSlot,
    id: &[u8; ID_BYTES],
    notify: &EventFd,
    kill: &EventFd,
    interrupt: &Interrupt,
    counters: &super::DeviceCounters,
) {
    let mut buf = Vec::new();
    loop {
        let (queue_ready, killed) = wait2(notify, kill);
        if killed {
            return;
        }
        if !queue_ready {
            continue;
        }
        let _ = notify.read();
        let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
        let disk = disk.get();
        let before = q.next_used();
        let result = process_queue(&mut q, mem, disk.as_ref(), id, &mut buf);
        super::DeviceCounters::add(
            &counters.requests,
            u64::from(q.next_used().wrapping_sub(before)),
        );
        match result {
            Ok(true) => interrupt.trigger(INT_VRING),
            Ok(false) => {}
            Err(_) => {
                interrupt.set_needs_reset();
                return;
            }
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests {
    // test code: values are small and fixed
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use std::time::Duration;

    use crate::virtio::testing::{AVAIL, DATA, Driver, QSIZE, RamDisk, memory, queue};
    use crate::virtio::{INT_CONFIG, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET};

    const VERSION_1: u64 = 1 << 32;
    const HDR: u64 = DATA;
    const BUF: u64 = DATA + 0x1000;
    const STATUS: u64 = DATA + 0x100;

    fn header(d: &Driver, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        d.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(d: &Driver) -> u8 {
        d.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn ready(disk: Arc<RamDisk>) -> Driver {
        let mut d = Driver::new(Box::new(Block::new(disk, "disk-0")));
        let st = d.init(VERSION_1 | (1 << F_FLUSH), 1);
        assert_eq!(
            st & (STATUS_FEATURES_OK | STATUS_DRIVER_OK),
            STATUS_FEATURES_OK | STATUS_DRIVER_OK
        );
        d
    }

    /// The config space a guest reads: 512-byte logical blocks (so a file system with 1 KiB
    /// blocks mounts: with `blk_size` 4096 Linux refused it) and 4 KiB physical blocks.
    #[test]
    fn config_space_has_512_byte_logical_and_4k_physical_blocks() {
        let b = Block::new(RamDisk::new(1 << 20, false), "disk-0");
        assert_ne!(b.device_features() & (1 << F_BLK_SIZE), 0);
        assert_ne!(b.device_features() & (1 << F_TOPOLOGY), 0);
        let mut cfg = [0u8; 60];
        b.read_config(0, &mut cfg);
        let u32_at = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
        assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32_at(20), 512, "blk_size");
        // topology: physical_block_exp, alignment_offset, min_io_size (u16), opt_io_size (u32)
        assert_eq!(cfg[24], 3);
        assert_eq!(cfg[25], 0);
        assert_eq!(u16::from_le_bytes([cfg[26], cfg[27]]), 8);
        assert_eq!(u32_at(28), 8);
    }

    #[test]
    fn disk_slot_swaps_only_a_matching_disk_and_requests_use_the_new_one() {
        let first = RamDisk::new(1 << 20, false);
        let block = Block::new(first.clone(), "disk-0");
        let slot = block.disk_slot();
        let mut d = Driver::new(Box::new(block));
        d.init(VERSION_1, 1);
        assert!(
            slot.swap(RamDisk::new(2 << 20, false)).is_err(),
            "size differs"
        );
        assert!(
            slot.swap(RamDisk::new(1 << 20, true)).is_err(),
            "writability differs"
        );
        let second = RamDisk::new(1 << 20, false);
        assert!(slot.swap(second.clone()).is_ok());
        d.mem.write_slice(&[0x5a; 4096], GuestAddress(BUF)).unwrap();
        header(&d, 1, 8);
        d.add_chain(&[(HDR, 16, false), (BUF, 4096, false), (STATUS, 1, true)]);
        d.kick_and_wait(1);
        assert_eq!(status(&d), 0);
        assert!(
            second.data.lock().unwrap()[4096..8192]
                .iter()
                .all(|&b| b == 0x5a)
        );
        assert!(first.data.lock().unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn requests_waiting_in_the_ring_at_activation_are_served_without_a_kick() {
        // As in a restored or cloned VM: the guest made the request available (and notified
        // another device), then this device is activated on the same rings.
        let disk = RamDisk::new(1 << 20, false);
        let mut d = Driver::new(Box::new(Block::new(disk.clone(), "disk-0")));
        d.wr(0x70, 1 | 2);
        d.wr(0x24, 1);
        d.wr(0x20, 1);
        d.wr(0x70, 1 | 2 | 8);
        d.wr(0x30, 0);
        use crate::virtio::testing::{AVAIL, DESC, QSIZE, USED};
        d.wr(0x38, u32::from(QSIZE));
        d.set_addr(0x80, DESC);
        d.set_addr(0x90, AVAIL);
        d.set_addr(0xa0, USED);
        d.wr(0x44, 1);
        d.mem.write_slice(&[0x77; 512], GuestAddress(BUF)).unwrap();
        header(&d, T_OUT, 0);
        d.add_chain(&[(HDR, 16, false), (BUF, 512, false), (STATUS, 1, true)]);
        d.wr(0x70, 1 | 2 | 8 | 4);
        assert_eq!(
            d.wait_used(0, 1).len(),
            1,
            "served without a queue notification"
        );
        assert_eq!(status(&d), S_OK);
        assert!(disk.data.lock().unwrap()[..512].iter().all(|&b| b == 0x77));
    }

    #[test]
    fn write_read_flush_get_id_through_the_transport() {
        let disk = RamDisk::new(1 << 20, false);
        let mut d = ready(Arc::clone(&disk));
        assert_eq!(d.rd(0x000), 0x7472_6976);
        assert_eq!(d.rd(0x008), DEVICE_TYPE_BLOCK);
        // Capacity in the config space, read as two 32-bit halves.
        assert_eq!(d.rd(0x100), (1 << 20) / 512);

        let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        d.mem.write_slice(&pattern, GuestAddress(BUF)).unwrap();
        header(&d, T_OUT, 8);
        let head = d.add_chain(&[(HDR, 16, false), (BUF, 8192, false), (STATUS, 1, true)]);
        assert_eq!(d.kick_and_wait(1), vec![(u32::from(head), 1)]);
        assert_eq!(status(&d), S_OK);
        assert_eq!(disk.data.lock().unwrap()[4096..4096 + 8192], pattern[..]);
        assert!(d.transport.interrupt().status() & INT_VRING != 0);
        assert!(d.transport.interrupt().eventfd().read().unwrap() >= 1);

        // Read it back into a fresh buffer split over two descriptors.
        d.mem.write_slice(&[0u8; 8192], GuestAddress(BUF)).unwrap();
        header(&d, T_IN, 8);
        let head = d.add_chain(&[
            (HDR, 16, false),
            (BUF, 4096, true),
            (BUF + 4096, 4096, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(d.kick_and_wait(1), vec![(u32::from(head), 8193)]);
        assert_eq!(status(&d), S_OK);
        // The device's writes into guest memory are in the dirty bitmap (for live copy).
        {
            use vm_memory::GuestMemoryRegion;
            use vm_memory::bitmap::Bitmap;
            let region = <GuestMemory as vm_memory::GuestMemoryBackend>::find_region(
                &d.mem,
                GuestAddress(BUF),
            )
            .unwrap();
            assert!(region.bitmap().dirty_at(BUF as usize));
            assert!(region.bitmap().dirty_at(BUF as usize + 4096));
            assert!(!region.bitmap().dirty_at(BUF as usize + 0x100000));
        }
        let mut back = vec![0u8; 8192];
        d.mem.read_slice(&mut back, GuestAddress(BUF)).unwrap();
        assert_eq!(back, pattern);

        header(&d, T_FLUSH, 0);
        d.add_chain(&[(HDR, 16, false), (STATUS, 1, true)]);
        d.kick_and_wait(1);
        assert_eq!(status(&d), S_OK);
        assert_eq!(*disk.flushes.lock().unwrap(), 1);

        header(&d, T_GET_ID, 0);
        d.add_chain(&[(HDR, 16, false), (BUF, 20, true), (STATUS, 1, true)]);
        assert_eq!(d.kick_and_wait(1)[0].1, 21);
        let mut id = [0u8; 20];
        d.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        assert_eq!(&id[..6], b"disk-0");
    }

    #[test]
    fn discard_and_write_zeroes_reach_the_backend_as_ranges() {
        let disk = RamDisk::new(1 << 20, false);
        disk.data.lock().unwrap().fill(0xee);
        let mut d = ready(Arc::clone(&disk));
        let mut seg = Vec::new();
        for (sector, n, flags) in [(8u64, 8u32, 0u32), (64, 16, 0)] {
            seg.extend_from_slice(&sector.to_le_bytes());
            seg.extend_from_slice(&n.to_le_bytes());
            seg.extend_from_slice(&flags.to_le_bytes());
        }
        d.mem.write_slice(&seg, GuestAddress(BUF)).unwrap();
        header(&d, T_DISCARD, 0);
        d.add_chain(&[(HDR, 16, false), (BUF, 32, false), (STATUS, 1, true)]);
        d.kick_and_wait(1);
        assert_eq!(status(&d), S_OK);
        header(&d, T_WRITE_ZEROES, 0);
        d.add_chain(&[(HDR, 16, false), (BUF, 16, false), (STATUS, 1, true)]);
        d.kick_and_wait(1);
        assert_eq!(status(&d), S_OK);
        assert_eq!(
            *disk.log.lock().unwrap(),
            vec![('d', 4096, 4096), ('d', 32768, 8192), ('z', 4096, 4096)]
        );
        let data = disk.data.lock().unwrap();
        assert!(data[4096..8192].iter().all(|&b| b == 0));
        assert!(data[8192..32768].iter().all(|&b| b == 0xee));
    }

    #[test]
    fn bad_requests_get_error_status_and_touch_nothing() {
        let disk = RamDisk::new(64 * 1024, false);
        let mut d = ready(Arc::clone(&disk));
        type Chain = Vec<(u64, u32, bool)>;
        let cases: Vec<(u32, u64, Chain, u8)> = vec![
            // Past the end of the disk.
            (
                T_OUT,
                128,
                vec![(HDR, 16, false), (BUF, 4096, false), (STATUS, 1, true)],
                S_IOERR,
            ),
            // Read ending past the disk from an in-range start.
            (
                T_IN,
                127,
                vec![(HDR, 16, false), (BUF, 1024, true), (STATUS, 1, true)],
                S_IOERR,
            ),
            // Length not a sector multiple.
            (
                T_OUT,
                0,
                vec![(HDR, 16, false), (BUF, 100, false), (STATUS, 1, true)],
                S_IOERR,
            ),
            // Sector number that overflows.
            (
                T_IN,
                u64::MAX / 2,
                vec![(HDR, 16, false), (BUF, 4096, true), (STATUS, 1, true)],
                S_IOERR,
            ),
            // Unknown type.
            (77, 0, vec![(HDR, 16, false), (STATUS, 1, true)], S_UNSUPP),
            // Header too short.
            (T_IN, 0, vec![(HDR, 8, false), (STATUS, 1, true)], S_IOERR),
            // Oversized request.
            (
                T_IN,
                0,
                vec![
                    (HDR, 16, false),
                    (0x20000, 17 << 20, true),
                    (STATUS, 1, true),
                ],
                S_IOERR,
            ),
        ];
        for (ty, sector, chain, want) in cases {
            header(&d, ty, sector);
            d.add_chain(&chain);
            d.kick_and_wait(1);
            assert_eq!(status(&d), want, "type {ty} sector {sector}");
        }
        assert!(disk.log.lock().unwrap().is_empty());
        // A chain whose buffer lies outside guest memory and one without a status byte:
        // completed with used length 0, nothing written, device still works afterwards.
        header(&d, T_IN, 0);
        d.add_chain(&[
            (HDR, 16, false),
            (0x7fff_0000_0000, 4096, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(d.kick_and_wait(1)[0].1, 0);
        d.add_chain(&[(HDR, 16, false)]);
        assert_eq!(d.kick_and_wait(1)[0].1, 0);
        header(&d, T_FLUSH, 0);
        d.add_chain(&[(HDR, 16, false), (STATUS, 1, true)]);
        d.kick_and_wait(1);
        assert_eq!(status(&d), S_OK);
        assert_eq!(d.rd(0x70) & STATUS_NEEDS_RESET, 0);
    }

    /// Found by the `virtio_blk` fuzz target (a device write landed on the available index): an
    /// index more than a queue ahead made `process_queue` spin forever, holding the queue lock.
    #[test]
    fn requests_before_a_bad_head_are_acknowledged_and_none_after_it_runs() {
        use crate::virtio::testing::{DESC, USED, publish, write_desc};
        let mem = memory();
        // Two writes of 512 bytes (sectors 0 and 1) around a head past the ring.
        for (k, sector) in [(0u64, 0u64), (1, 1)] {
            let hdr = HDR + k * 0x20;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&T_OUT.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            mem.write_slice(&[0x40 + k as u8; 512], GuestAddress(BUF + k * 0x200))
                .unwrap();
            let d = u16::try_from(k * 3).unwrap();
            write_desc(&mem, DESC, d, hdr, 16, 1, d + 1);
            write_desc(&mem, DESC, d + 1, BUF + k * 0x200, 512, 1, d + 2);
            write_desc(&mem, DESC, d + 2, STATUS + k, 1, 2, 0);
        }
        publish(&mem, &[0, QSIZE + 5, 3]);
        let disk = RamDisk::new(4096, false);
        let mut q = queue();
        let r = process_queue(&mut q, &mem, disk.as_ref(), &[0; ID_BYTES], &mut Vec::new());
        assert!(matches!(r, Err(QueueError::Ring(_))), "{r:?}");
        let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, 1, "the request before the bad head is acknowledged");
        let id: u32 = mem.read_obj(GuestAddress(USED + 4)).unwrap();
        assert_eq!(id, 0);
        let mut got = [0u8; 1024];
        disk.read_at(&mut got, 0).unwrap();
        assert!(
            got[..512].iter().all(|&b| b == 0x40),
            "the first write landed"
        );
        assert!(
            got[512..].iter().all(|&b| b == 0),
            "nothing after the bad head ran"
        );
    }

    #[test]
    fn an_available_index_out_of_range_is_a_broken_ring_not_a_busy_loop() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mem = memory();
            mem.write_obj(QSIZE + 1, GuestAddress(AVAIL + 2)).unwrap();
            let disk = RamDisk::new(4096, false);
            let mut q = queue();
            let r = process_queue(&mut q, &mem, disk.as_ref(), &[0; ID_BYTES], &mut Vec::new());
            let _ = tx.send(r);
        });
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("process_queue did not return");
        assert!(matches!(r, Err(QueueError::BrokenRing)), "{r:?}");
    }

    /// The same through a running device: the guest sees NEEDS_RESET.
    #[test]
    fn a_guest_with_a_broken_available_index_gets_needs_reset() {
        let disk = RamDisk::new(64 * 1024, false);
        let mut d = ready(Arc::clone(&disk));
        d.mem
            .write_obj(QSIZE.wrapping_add(7), GuestAddress(AVAIL + 2))
            .unwrap();
        d.wr(0x50, 0);
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while d.rd(0x70) & STATUS_NEEDS_RESET == 0 {
            assert!(std::time::Instant::now() < end, "no NEEDS_RESET");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(disk.log.lock().unwrap().is_empty());
        // A reset stops the worker (it does not hang) and the device can be set up again.
        d.wr(0x70, 0);
        assert_eq!(d.rd(0x70), 0);
        d.mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
        assert_ne!(d.init(VERSION_1, 1) & STATUS_DRIVER_OK, 0);
    }

    #[test]
    fn looping_chain_is_rejected_not_followed_forever() {
        let disk = RamDisk::new(64 * 1024, false);
        let mut d = ready(Arc::clone(&disk));
        header(&d, T_IN, 0);
        // 0 -> 1 -> 0 -> ... never ends.
        d.put_desc(0, HDR, 16, 1, 1);
        d.put_desc(1, BUF, 512, 1 | 2, 0);
        d.publish(0);
        // The queue stops following the chain after queue-size descriptors; the request is then
        // malformed (a 4095-byte read) and fails with an error status in its last writable byte.
        assert_eq!(d.kick_and_wait(1), vec![(0, 1)]);
        assert_eq!(
            d.mem.read_obj::<u8>(GuestAddress(BUF + 511)).unwrap(),
            S_IOERR
        );
        assert!(disk.log.lock().unwrap().is_empty());
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let disk = RamDisk::new(64 * 1024, true);
        let mut d = Driver::new(Box::new(Block::new(
            Arc::clone(&disk) as Arc<dyn Disk>,
            "ro",
        )));
        // Offered features include RO; accept it.
        let st = d.init(VERSION_1 | (1 << F_RO), 1);
        assert_ne!(st & STATUS_DRIVER_OK, 0);
        header(&d, T_OUT, 0);
        d.add_chain(&[(HDR, 16, false), (BUF, 512, false), (STATUS, 1, true)]);
        d.kick_and_wait(1);
        assert_eq!(status(&d), S_IOERR);
        assert!(disk.log.lock().unwrap().is_empty());
    }

    #[test]
    fn feature_negotiation_refuses_unoffered_or_legacy() {
        let disk = RamDisk::new(4096, false);
        let mut d = Driver::new(Box::new(Block::new(
            Arc::clone(&disk) as Arc<dyn Disk>,
            "x",
        )));
        // Bit 40 is not offered.
        assert_eq!(d.init(VERSION_1 | (1 << 40), 1) & STATUS_FEATURES_OK, 0);
        // A legacy driver (no VERSION_1) is refused.
        assert_eq!(d.init(1 << F_FLUSH, 1) & STATUS_FEATURES_OK, 0);
        assert_ne!(d.init(VERSION_1, 1) & STATUS_DRIVER_OK, 0);
    }

    #[test]
    fn misconfigured_queue_sets_needs_reset() {
        let disk = RamDisk::new(4096, false);
        let mut d = Driver::new(Box::new(Block::new(disk, "x")));
        d.wr(0x70, 1);
        d.wr(0x70, 3);
        d.wr(0x24, 1);
        d.wr(0x20, 1);
        d.wr(0x70, 11);
        d.wr(0x30, 0);
        d.wr(0x38, 16);
        // Used ring far outside guest memory.
        d.set_addr(0x80, 0x1000);
        d.set_addr(0x90, 0x2000);
        d.set_addr(0xa0, 0x7fff_ffff_0000);
        d.wr(0x44, 1);
        d.wr(0x70, 15);
        assert_ne!(d.rd(0x70) & STATUS_NEEDS_RESET, 0);
        assert_ne!(d.transport.interrupt().status() & INT_CONFIG, 0);
        assert!(!d.transport.is_activated());
        // Reset clears it and the device can be set up properly.
        d.wr(0x70, 0);
        assert_eq!(d.rd(0x70), 0);
        assert_ne!(d.init(VERSION_1, 1) & STATUS_DRIVER_OK, 0);
    }

    #[test]
    fn transport_state_round_trips_and_resumes_processing() {
        let disk = RamDisk::new(64 * 1024, false);
        let mut d = ready(Arc::clone(&disk));
        d.mem.write_slice(&[7u8; 512], GuestAddress(BUF)).unwrap();
        header(&d, T_OUT, 0);
        d.add_chain(&[(HDR, 16, false), (BUF, 512, false), (STATUS, 1, true)]);
        d.kick_and_wait(1);
        let state = d.transport.state();
        assert_eq!(state.queues[0].next_avail, 1);
        let json = serde_json::to_string(&state).unwrap();

        // A new transport + device on the same memory continues from the saved ring positions.
        let mut d2 = Driver::new(Box::new(Block::new(
            Arc::clone(&disk) as Arc<dyn Disk>,
            "d",
        )));
        d2.mem = d.mem.clone();
        let irq = crate::virtio::Interrupt::new(vmm_sys_util::eventfd::EventFd::new(0).unwrap());
        d2.transport = crate::virtio::mmio::MmioTransport::new(
            Box::new(Block::new(Arc::clone(&disk) as Arc<dyn Disk>, "d")),
            d.mem.clone(),
            irq,
        )
        .unwrap();
        d.transport.write(0x70, &0u32.to_le_bytes()); // stop the old device first
        let restored: crate::virtio::mmio::MmioState = serde_json::from_str(&json).unwrap();
        crate::persist::Persist::restore(&mut d2.transport, &restored).unwrap();
        assert!(d2.transport.is_activated());
        assert_eq!(d2.transport.state(), state);
    }
}

#[cfg(test)]
mod fuzz {
    // test code: values are small and fixed
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::testing::{DESC, RamDisk, USED, memory, publish, queue, write_desc};

    /// A guest address: mostly inside the test memory, sometimes across its two regions'
    /// boundary, sometimes anywhere.
    fn addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            8 => (0x4000u64..0xf_0000).prop_map(|a| a & !0xf),
            1 => Just(0x8_0000u64 - 0x800),
            1 => any::<u64>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Random descriptor tables, ring contents and request headers never panic the device,
        /// never complete more requests than were published, and never write the disk outside it.
        #[test]
        fn random_descriptor_tables_are_handled(
            descs in proptest::collection::vec((0u64..(40 << 20), 0u32..(1 << 21), 0u16..8, 0u16..32), 16),
            heads in proptest::collection::vec(0u16..24, 0..16),
            header in proptest::collection::vec(any::<u8>(), 16),
            ty in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
            sector in prop_oneof![0u64..256, any::<u64>()],
        ) {
            let mem = memory();
            for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
                write_desc(&mem, DESC, i as u16, *addr, *len, *flags, *next);
            }
            publish(&mem, &heads);
            // Put a plausible header wherever the first descriptors point.
            let mut h = header.clone();
            h[0..4].copy_from_slice(&ty.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            for (addr, ..) in descs.iter().take(4) {
                let _ = mem.write_slice(&h, GuestAddress(*addr));
            }
            let disk = RamDisk::new(128 * 1024, false);
            let mut q = queue();
            let mut buf = Vec::new();
            let _ = process_queue(&mut q, &mem, disk.as_ref(), &[0; ID_BYTES], &mut buf);
            let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
            prop_assert!(usize::from(used) <= heads.len());
            for (_, off, len) in disk.log.lock().unwrap().iter() {
                prop_assert!(off + len <= 128 * 1024);
            }
        }

        /// The fast path for plain reads and writes gives exactly what the general path gives
        /// (used length, status, disk contents and log, guest memory), including for chains it
        /// hands over: odd lengths, wrong directions, addresses outside memory or across the
        /// boundary of two memory regions, a read-only disk, other request types.
        #[test]
        fn fast_path_agrees_with_the_general_path(
            hdr in (addr(), prop_oneof![9 => Just(16u32), 1 => 0u32..64], prop::bool::weighted(0.1)),
            data in (addr(), prop_oneof![Just(4096u32), Just(0x1_0000), Just(512), 0u32..0x2_0000], any::<bool>()),
            status in (addr(), prop_oneof![9 => Just(1u32), 1 => 0u32..4], prop::bool::weighted(0.9)),
            extra in proptest::option::weighted(0.1, (addr(), 0u32..0x1000, any::<bool>())),
            ty in prop_oneof![4 => Just(T_IN), 4 => Just(T_OUT), 1 => Just(T_FLUSH), 1 => any::<u32>()],
            sector in prop_oneof![8 => 0u64..200, 1 => any::<u64>()],
            read_only in prop::bool::weighted(0.2),
        ) {
            let descs: Vec<_> = [hdr, data, status].into_iter().chain(extra).collect();
            // Two regions, so that a buffer can straddle their boundary.
            let half = 0x8_0000;
            let mem = |_| GuestMemory::from_ranges(&[(GuestAddress(0), half), (GuestAddress(half as u64), half)]).unwrap();
            let run = |general: bool| {
                let mem = mem(());
                let n = descs.len();
                for (i, (addr, len, write)) in descs.iter().enumerate() {
                    let mut flags = if *write { 2u16 } else { 0 };
                    if i + 1 < n {
                        flags |= 1;
                    }
                    write_desc(&mem, DESC, i as u16, *addr, *len, flags, i as u16 + 1);
                }
                publish(&mem, &[0]);
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&ty.to_le_bytes());
                h[8..16].copy_from_slice(&sector.to_le_bytes());
                // Recognisable guest data and disk contents.
                let fill: Vec<u8> = (0..half * 2).map(|i| (i * 7 % 251) as u8).collect();
                mem.write_slice(&fill[0x4000..], GuestAddress(0x4000)).unwrap();
                let _ = mem.write_slice(&h, GuestAddress(descs[0].0));
                let disk = RamDisk::new(128 * 1024, read_only);
                disk.data.lock().unwrap().iter_mut().enumerate().for_each(|(i, b)| *b = (i % 253) as u8);
                let limits = DiskLimits { size: disk.size(), block_size: block::SECTOR_SIZE, read_only };
                let mut q = queue();
                let chain = q.pop_descriptor_chain(&mem).unwrap();
                let mut buf = Vec::new();
                let used = if general {
                    handle_chain_general(chain, &mem, disk.as_ref(), &limits, &[7; ID_BYTES], &mut buf)
                } else {
                    handle_chain(chain, &mem, disk.as_ref(), &limits, &[7; ID_BYTES], &mut buf)
                };
                let mut all = vec![0u8; half * 2];
                mem.read_slice(&mut all, GuestAddress(0)).unwrap();
                let data = disk.data.lock().unwrap().clone();
                let log = disk.log.lock().unwrap().clone();
                (used, all, data, log)
            };
            let (fast, general) = (run(false), run(true));
            prop_assert_eq!(fast.0, general.0, "used length");
            prop_assert!(fast.1 == general.1, "guest memory differs");
            prop_assert!(fast.2 == general.2, "disk differs");
            prop_assert_eq!(fast.3, general.3);
        }
    }
}
