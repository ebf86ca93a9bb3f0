//! The guest-facing half of virtio-net, apart from TAP I/O: taking frames out of untrusted
//! transmit chains, and placing received frames into the guest's receive buffers (one chain
//! each, or spread over several with mergeable receive buffers). Nothing here does host I/O.

use std::marker::PhantomData;

use virtio_bindings::virtio_net as vn;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};

use crate::virtio::ring_view::{AvailView, Chain};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::tap::VNET_HDR_LEN;
use crate::virtio::GuestMemory;
pub use crate::virtio::publish_used;

/// Largest Ethernet frame without offloads: 1500 bytes of payload, the 14-byte header and a
/// VLAN tag.
pub const MAX_MTU_FRAME: usize = 1518;
/// Largest frame with segmentation offload: a 64 KiB IP packet, the Ethernet header and a VLAN
/// tag.
pub const MAX_GSO_FRAME: usize = 65_553;
/// Largest buffer (header and frame) the device ever handles.
pub const MAX_BUFFER: usize = VNET_HDR_LEN + MAX_GSO_FRAME;

/// Why a transmit chain was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// The chain points outside guest memory, loops, or is otherwise unusable.
    #[error("invalid descriptor chain")]
    InvalidChain,
    /// A transmit chain has device-writable buffers.
    #[error("device-writable buffer in a transmit chain")]
    WritableBuffer,
    /// Shorter than the virtio-net header.
    #[error("transmit chain of {0} bytes has no full header")]
    ShortHeader(usize),
    /// A header with no frame, or a frame shorter than an Ethernet header.
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    Runt(usize),
    /// Larger than the negotiated maximum.
    #[error("frame of {len} bytes exceeds the negotiated maximum of {max}")]
    TooLarge {
        /// The frame's length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The header asks for an offload the driver did not negotiate.
    #[error("header asks for offload (flags {flags:#x}, gso {gso:#x}) not negotiated")]
    Offload {
        /// `flags` of the header.
        flags: u8,
        /// `gso_type` of the header.
        gso: u8,
    },
}

/// What the driver negotiated, as far as frame handling goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// `VIRTIO_NET_F_MRG_RXBUF`: a received frame may span several chains.
    pub mergeable: bool,
    /// `VIRTIO_NET_F_CSUM`: the guest may send partially checksummed frames.
    pub tx_csum: bool,
    /// `VIRTIO_NET_F_HOST_TSO4`.
    pub tx_tso4: bool,
    /// `VIRTIO_NET_F_HOST_TSO6`.
    pub tx_tso6: bool,
    /// `VIRTIO_NET_F_HOST_ECN`.
    pub tx_ecn: bool,
}

impl Negotiated {
    /// From the accepted feature bits.
    pub fn from_features(acked: u64) -> Self {
        let has = |bit: u32| acked & (1u64 << bit) != 0;
        Self {
            mergeable: has(vn::VIRTIO_NET_F_MRG_RXBUF),
            tx_csum: has(vn::VIRTIO_NET_F_CSUM),
            tx_tso4: has(vn::VIRTIO_NET_F_HOST_TSO4),
            tx_tso6: has(vn::VIRTIO_NET_F_HOST_TSO6),
            tx_ecn: has(vn::VIRTIO_NET_F_HOST_ECN),
        }
    }

    /// The largest frame (without header) the guest may send.
    pub fn max_tx_frame(&self) -> usize {
        if self.tx_tso4 || self.tx_tso6 {
            MAX_GSO_FRAME
        } else {
            MAX_MTU_FRAME
        }
    }

    /// Checks a transmit header's offload requests against what was negotiated.
    fn check_header(&self, hdr: &[u8]) -> Result<(), TxError> {
        let (flags, gso) = (hdr[0], hdr[1]);
        let needs_csum = u32::from(flags) & vn::VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
        let ecn = u32::from(gso) & vn::VIRTIO_NET_HDR_GSO_ECN != 0;
        let ok_flags = u32::from(flags) & !vn::VIRTIO_NET_HDR_F_NEEDS_CSUM == 0
            && (!needs_csum || self.tx_csum);
        let ok_gso = match u32::from(gso) & !vn::VIRTIO_NET_HDR_GSO_ECN {
            vn::VIRTIO_NET_HDR_GSO_NONE => !ecn,
            vn::VIRTIO_NET_HDR_GSO_TCPV4 => self.tx_tso4 && (!ecn || self.tx_ecn),
            vn::VIRTIO_NET_HDR_GSO_TCPV6 => self.tx_tso6 && (!ecn || self.tx_ecn),
            _ => false,
        };
        if ok_flags && ok_gso {
            Ok(())
        } else {
            Err(TxError::Offload { flags, gso })
        }
    }
}

/// Walks a receive chain once: all its buffers must be device-writable and inside guest
/// memory. On the way it copies the start of `data` into them (each buffer looked up once) and
/// appends them to `regions`, if given. Returns the chain's capacity, or `None` for a broken chain. (Its
/// buffers may have been written: available buffers belong to the device, and a broken chain
/// goes back empty. Loops end at the queue size and indirect tables are followed, by the chain
/// iterator, [`Chain`].)
fn fill_rx(
    chain: Chain<'_>,
    mem: &GuestMemory,
    data: &[u8],
    mut regions: Option<&mut Vec<(GuestAddress, usize)>>,
) -> Option<usize> {
    let mut cap = 0usize;
    for d in chain {
        if !d.is_write_only() {
            return None;
        }
        let len = d.len() as usize;
        let done = cap.min(data.len());
        if let Ok(s) = mem.get_slice(d.addr(), len) {
            // One region holds almost every buffer.
            s.copy_from(&data[done..]);
        } else {
            // A buffer that crosses from one region into the next, or lies outside memory.
            if !mem.check_range(d.addr(), len) {
                return None;
            }
            let mut at = done;
            for s in mem.get_slices(d.addr(), len) {
                let s = s.ok()?;
                s.copy_from(&data[at.min(data.len())..]);
                at = at.saturating_add(s.len());
            }
        }
        cap = cap.checked_add(len)?;
        if let Some(r) = regions.as_deref_mut() {
            r.push((d.addr(), len));
        }
    }
    Some(cap)
}

/// Writes `bytes` at byte `at` of the buffers `regions` (taken in order as one space).
fn write_at(
    mem: &GuestMemory,
    regions: &[(GuestAddress, usize)],
    mut at: usize,
    mut bytes: &[u8],
) -> Result<(), RingError> {
    for &(addr, len) in regions {
        if bytes.is_empty() {
            break;
        }
        if at >= len {
            at -= len;
            continue;
        }
        let n = (len - at).min(bytes.len());
        let to = addr
            .checked_add(at as u64)
            .ok_or(RingError::Queue(virtio_queue::Error::AddressOverflow))?;
        mem.write_slice(&bytes[..n], to)?;
        bytes = &bytes[n..];
        at = 0;
    }
    Ok(())
}

/// Reusable space for the guest buffers of one transmit chain (see [`TxBuffers`]).
#[derive(Debug, Default)]
pub struct TxScratch {
    iov: Vec<libc::iovec>,
}

/// The guest buffers of one validated transmit chain, as an I/O vector for the TAP. Every entry
/// points into a guest memory region borrowed for `'m`, so the vector stays valid for host I/O
/// while this value lives.
#[derive(Debug)]
pub struct TxBuffers<'s, 'm> {
    scratch: &'s mut TxScratch,
    _mem: PhantomData<&'m GuestMemory>,
}

impl<'s, 'm> TxBuffers<'s, 'm> {
    /// Buffers for a chain of `mem`, kept in `scratch` ([`parse_tx_chain`] fills them).
    pub fn new(scratch: &'s mut TxScratch, _mem: &'m GuestMemory) -> Self {
        Self {
            scratch,
            _mem: PhantomData,
        }
    }

    fn push<B: vm_memory::bitmap::BitmapSlice>(&mut self, s: &vm_memory::VolatileSlice<'m, B>) {
        self.scratch.iov.push(libc::iovec {
            iov_base: s.ptr_guard().as_ptr().cast_mut().cast(),
            iov_len: s.len(),
        });
    }

    /// The I/O vector: header and frame, in chain order.
    pub fn iov(&self) -> &[libc::iovec] {
        &self.scratch.iov
    }
}

/// Validates one transmit chain (header and frame, all device-readable, inside guest memory)
/// against `neg` without copying the frame; `bufs` receives its guest buffers (each looked up
/// once, the header read from them). Returns its length.
pub fn parse_tx_chain<'m>(
    chain: impl IntoIterator<Item = Descriptor>,
    mem: &'m GuestMemory,
    neg: &Negotiated,
    bufs: &mut TxBuffers<'_, 'm>,
) -> Result<usize, TxError> {
    bufs.scratch.iov.clear();
    let mut hdr = [0u8; VNET_HDR_LEN];
    let mut have = 0usize;
    let mut len = 0usize;
    // Loops end at the queue size and indirect tables are followed, by the chain iterator.
    for d in chain {
        if d.is_write_only() {
            return Err(TxError::WritableBuffer);
        }
        let n = d.len() as usize;
        len = len.checked_add(n).ok_or(TxError::InvalidChain)?;
        if let Ok(s) = mem.get_slice(d.addr(), n) {
            // One region holds almost every buffer.
            have += s.copy_to(&mut hdr[have..]);
            bufs.push(&s);
        } else {
            // A buffer that crosses from one region into the next, or lies outside memory.
            if !mem.check_range(d.addr(), n) {
                return Err(TxError::InvalidChain);
            }
            for s in mem.get_slices(d.addr(), n) {
                let s = s.map_err(|_| TxError::InvalidChain)?;
                have += s.copy_to(&mut hdr[have..]);
                bufs.push(&s);
            }
        }
    }
    if len < VNET_HDR_LEN {
        return Err(TxError::ShortHeader(len));
    }
    let frame = len - VNET_HDR_LEN;
    let max = neg.max_tx_frame();
    if frame > max {
        return Err(TxError::TooLarge { len: frame, max });
    }
    if frame < 14 {
        return Err(TxError::Runt(frame));
    }
    neg.check_header(&hdr)?;
    // `num_buffers` means nothing on transmit; the TAP ignores it.
    Ok(len)
}

/// Like [`parse_tx_chain`], and copies the chain (header and frame) into `buf`, which never
/// grows past [`MAX_BUFFER`].
pub fn read_tx_chain(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    neg: &Negotiated,
    buf: &mut Vec<u8>,
) -> Result<usize, TxError> {
    let mut scratch = TxScratch::default();
    let len = parse_tx_chain(
        chain.clone(),
        mem,
        neg,
        &mut TxBuffers::new(&mut scratch, mem),
    )?;
    buf.resize(len, 0);
    // Validated: every buffer device-readable and inside guest memory.
    let mut r = chain.reader(mem).map_err(|_| TxError::InvalidChain)?;
    std::io::Read::read_exact(&mut r, &mut buf[..len]).map_err(|_| TxError::InvalidChain)?;
    Ok(len)
}

/// What became of a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Placed into this many chains and published to the used ring.
    Delivered(u16),
    /// Not enough receive buffers yet: nothing was consumed; try again when the driver adds
    /// some.
    NoBuffers,
    /// It can never fit (a chain too small without mergeable buffers, or larger than the
    /// whole ring): dropped, nothing consumed.
    Dropped,
}

/// Errors of the ring itself: the device needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// Reading the available ring or writing the used ring failed.
    #[error("virtqueue access failed")]
    Queue(#[from] virtio_queue::Error),
    /// Writing the used ring failed.
    #[error("used ring write failed")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Reusable space for [`deliver_rx`], so that receiving does not allocate per frame.
#[derive(Debug, Default)]
pub struct RxScratch {
    /// The buffers of the frame's first chain.
    regions: Vec<(GuestAddress, usize)>,
    /// Per chain taken for the frame: head, bytes of the frame placed in it.
    chains: Vec<(u16, usize)>,
    broken: Vec<(u16, u32)>,
    /// Used entries of frames placed by [`place_rx`] and not yet published.
    used: Vec<(u16, u32)>,
}

impl RxScratch {
    /// Publishes the used entries of every frame placed since the last call, with one
    /// used-index update.
    pub fn publish(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<(), RingError> {
        if self.used.is_empty() {
            return Ok(());
        }
        let r = publish_used(queue, mem, &self.used);
        self.used.clear();
        Ok(r?)
    }
}

/// Places `frame` (a 12-byte virtio-net header, then the Ethernet frame, as the TAP gives it)
/// into the guest's receive buffers and publishes them. With `mergeable`, the frame may span
/// several chains and the header's `num_buffers` says how many; without, it must fit one.
/// Unusable chains met on the way are returned to the driver empty.
pub fn deliver_rx(
    queue: &mut Queue,
    mem: &GuestMemory,
    frame: &mut [u8],
    mergeable: bool,
    s: &mut RxScratch,
) -> Result<RxOutcome, RingError> {
    let mut chains = AvailView::new(queue, mem)?;
    let out = place_rx(&mut chains, queue.size(), mem, frame, mergeable, s);
    queue.set_next_avail(chains.next_avail());
    // Whatever was placed before an error is published too: its chains are consumed.
    s.publish(queue, mem)?;
    out
}

/// [`deliver_rx`] taking chains from `chains` (of a ring of `size` entries), and without the
/// publication: the frame's used entries (after those of frames placed before it) wait in `s`
/// for [`RxScratch::publish`], so that a batch of frames moves the used index once. `Delivered`
/// counts the frame's chains, as `deliver_rx` does; on `NoBuffers` and `Dropped` the chains
/// taken go back to `chains`. The caller stores `chains.next_avail()` back into the queue.
pub fn place_rx(
    chains: &mut AvailView<'_>,
    size: u16,
    mem: &GuestMemory,
    frame: &mut [u8],
    mergeable: bool,
    s: &mut RxScratch,
) -> Result<RxOutcome, RingError> {
    s.regions.clear();
    s.chains.clear();
    s.broken.clear();
    if frame.len() < VNET_HDR_LEN {
        return Ok(RxOutcome::Dropped);
    }
    // The frame is copied while the chains are walked. Most frames take one chain: the
    // header says so until a second one is needed.
    frame[10..12].copy_from_slice(&1u16.to_le_bytes());
    let mut placed = 0usize;
    let mut popped = 0u16;
    let give_back = |chains: &mut AvailView<'_>, popped: u16| {
        for _ in 0..popped {
            chains.go_back();
        }
    };
    while placed < frame.len() {
        let Some(chain) = chains.next_chain() else {
            // Everything popped goes back, broken chains too (they are met, and returned, with
            // the next frame that fits). A frame larger than the whole ring never fits.
            give_back(chains, popped);
            return Ok(if popped >= size {
                RxOutcome::Dropped
            } else {
                RxOutcome::NoBuffers
            });
        };
        popped = popped.saturating_add(1);
        let head = chain.head_index();
        let mark = s.regions.len();
        // Only the first chain's buffers are kept (for `num_buffers`, below).
        let regions = s.chains.is_empty().then_some(&mut s.regions);
        match fill_rx(chain, mem, &frame[placed..], regions) {
            // The first chain must hold at least the header.
            Some(cap) if cap >= VNET_HDR_LEN || (!s.chains.is_empty() && cap > 0) => {
                if !mergeable && cap < frame.len() {
                    // This chain can never hold it, and it is the only one the frame may use.
                    give_back(chains, popped);
                    return Ok(RxOutcome::Dropped);
                }
                let take = (frame.len() - placed).min(cap);
                placed += take;
                s.chains.push((head, take));
                if !mergeable {
                    break;
                }
            }
            _ => {
                s.regions.truncate(mark);
                s.broken.push((head, 0));
            }
        }
    }
    let count = u16::try_from(s.chains.len()).unwrap_or(u16::MAX);
    if count != 1 {
        // `num_buffers`, in the first chain (which holds the whole header).
        frame[10..12].copy_from_slice(&count.to_le_bytes());
        write_at(mem, &s.regions, 10, &frame[10..12])?;
    }
    for &(head, take) in &s.chains {
        s.used.push((head, u32::try_from(take).unwrap_or(u32::MAX)));
    }
    // The broken chains skipped on the way are consumed too, returned empty.
    s.used.extend_from_slice(&s.broken);
    Ok(RxOutcome::Delivered(count))
}
