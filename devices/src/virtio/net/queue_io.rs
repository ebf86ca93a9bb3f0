//! The guest-facing half of virtio-net, apart from TAP I/O: taking frames out of untrusted
//! transmit chains, and placing received frames into the guest's receive buffers (one chain
//! each, or spread over several with mergeable receive buffers). Nothing here does host I/O.

use std::io::Read;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_net as vn;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::tap::VNET_HDR_LEN;
use crate::virtio::{GuestMemory, GuestWriter};

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

/// Reads one transmit chain (header and frame, all device-readable) into `buf`, validated
/// against `neg`; returns its length. `buf` never grows past [`MAX_BUFFER`].
pub fn read_tx_chain(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    neg: &Negotiated,
    buf: &mut Vec<u8>,
) -> Result<usize, TxError> {
    let writable = chain
        .clone()
        .writer(mem)
        .map_err(|_| TxError::InvalidChain)?
        .available_bytes();
    if writable != 0 {
        return Err(TxError::WritableBuffer);
    }
    let mut reader = chain.reader(mem).map_err(|_| TxError::InvalidChain)?;
    let len = reader.available_bytes();
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
    buf.resize(len, 0);
    reader
        .read_exact(&mut buf[..len])
        .map_err(|_| TxError::InvalidChain)?;
    neg.check_header(&buf[..VNET_HDR_LEN])?;
    // `num_buffers` means nothing on transmit; the TAP ignores it.
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

/// Publishes `(head, len)` used entries in one step: the used index moves once, after all
/// entries are written, so the driver never sees part of a mergeable frame.
pub fn publish_used(
    queue: &mut Queue,
    mem: &GuestMemory,
    entries: &[(u16, u32)],
) -> Result<(), RingError> {
    let size = queue.size();
    if size == 0 {
        return Err(RingError::Queue(virtio_queue::Error::InvalidSize));
    }
    let ring = queue.used_ring();
    let mut idx = queue.next_used();
    for &(head, len) in entries {
        if head >= size {
            return Err(RingError::Queue(
                virtio_queue::Error::InvalidDescriptorIndex,
            ));
        }
        let at = ring
            .checked_add(4 + u64::from(idx % size) * 8)
            .ok_or(RingError::Queue(virtio_queue::Error::AddressOverflow))?;
        mem.write_obj(u32::from(head).to_le(), GuestAddress(at))?;
        mem.write_obj(len.to_le(), GuestAddress(at + 4))?;
        idx = idx.wrapping_add(1);
    }
    let at = ring
        .checked_add(2)
        .ok_or(RingError::Queue(virtio_queue::Error::AddressOverflow))?;
    mem.store(idx.to_le(), GuestAddress(at), Ordering::Release)?;
    queue.set_next_used(idx);
    Ok(())
}

/// Places `frame` (a 12-byte virtio-net header, then the Ethernet frame, as the TAP gives it)
/// into the guest's receive buffers and publishes them. With `mergeable`, the frame may span
/// several chains and the header's `num_buffers` says how many; without, it must fit one.
/// Unusable chains met on the way are returned to the driver empty. `used` is scratch space.
pub fn deliver_rx(
    queue: &mut Queue,
    mem: &GuestMemory,
    frame: &mut [u8],
    mergeable: bool,
    used: &mut Vec<(u16, u32)>,
) -> Result<RxOutcome, RingError> {
    used.clear();
    if frame.len() < VNET_HDR_LEN {
        return Ok(RxOutcome::Dropped);
    }
    let start = queue.next_avail();
    let size = queue.size();
    let mut writers: Vec<(u16, GuestWriter<'_>)> = Vec::new();
    let mut room = 0usize;
    let mut popped = 0u16;
    let mut broken: Vec<(u16, u32)> = Vec::new();
    while room < frame.len() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            // Everything popped goes back, broken chains too (they are met, and returned, with
            // the next frame that fits). A frame larger than the whole ring never fits.
            queue.set_next_avail(start);
            return Ok(if popped >= size {
                RxOutcome::Dropped
            } else {
                RxOutcome::NoBuffers
            });
        };
        popped = popped.saturating_add(1);
        let head = chain.head_index();
        let readable = chain.clone().reader(mem).map(|r| r.available_bytes());
        let writer = chain.writer(mem);
        let w = match (readable, writer) {
            (Ok(0), Ok(w)) if w.available_bytes() >= VNET_HDR_LEN || !writers.is_empty() => w,
            _ => {
                broken.push((head, 0));
                continue;
            }
        };
        if !mergeable && w.available_bytes() < frame.len() {
            // This chain can never hold it, and it is the only one the frame may use.
            queue.set_next_avail(start);
            return Ok(RxOutcome::Dropped);
        }
        room += w.available_bytes();
        writers.push((head, w));
        if !mergeable {
            break;
        }
    }
    let count = u16::try_from(writers.len()).unwrap_or(u16::MAX);
    frame[10..12].copy_from_slice(&count.to_le_bytes());
    let mut rest: &[u8] = frame;
    for (head, mut w) in writers {
        let n = rest.len().min(w.available_bytes());
        // The writer was sized from the same chain: a failure means guest memory changed
        // under us (a bad chain); report what was written.
        let written = match std::io::Write::write_all(&mut w, &rest[..n]) {
            Ok(()) => n,
            Err(_) => w.bytes_written(),
        };
        rest = &rest[n..];
        used.push((head, u32::try_from(written).unwrap_or(u32::MAX)));
    }
    // The broken chains skipped on the way are consumed too, returned empty.
    used.extend_from_slice(&broken);
    let entries = std::mem::take(used);
    publish_used(queue, mem, &entries)?;
    *used = entries;
    Ok(RxOutcome::Delivered(count))
}
