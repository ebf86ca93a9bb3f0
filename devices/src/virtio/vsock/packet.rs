//! virtio-vsock packet header: parsing untrusted guest packets and building packets for the guest.

/// Size of the packet header on the wire.
pub const HDR_LEN: usize = 44;
/// CID of the host.
pub const HOST_CID: u64 = 2;
/// Largest payload accepted from the guest or sent to it in one packet.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Socket type: stream (the only one this device supports).
pub const TYPE_STREAM: u16 = 1;

/// Operation: connection request.
pub const OP_REQUEST: u16 = 1;
/// Operation: connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Operation: connection reset / refused.
pub const OP_RST: u16 = 3;
/// Operation: one side will send or receive no more.
pub const OP_SHUTDOWN: u16 = 4;
/// Operation: data.
pub const OP_RW: u16 = 5;
/// Operation: credit information, unsolicited.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Operation: please send a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// Shutdown flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet header (little-endian on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

/// Why a guest packet is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// The chain's readable part is shorter than a header.
    #[error("vsock packet header truncated ({0} bytes)")]
    Truncated(usize),
    /// The header's length exceeds [`MAX_PAYLOAD`] or the bytes present.
    #[error("vsock payload length {len} invalid ({available} bytes present)")]
    BadLength {
        /// Claimed length.
        len: u32,
        /// Bytes actually in the chain after the header.
        available: usize,
    },
    /// Not a stream socket.
    #[error("vsock socket type {0} unsupported")]
    BadType(u16),
    /// Source CID is not the guest's own (spoofing) or destination is not the host.
    #[error("vsock packet from cid {src} to cid {dst} refused")]
    BadAddress {
        /// Source CID.
        src: u64,
        /// Destination CID.
        dst: u64,
    },
    /// Unknown operation.
    #[error("vsock operation {0} unknown")]
    BadOp(u16),
    /// The chain could not be read.
    #[error("vsock descriptor chain unusable")]
    BadChain,
}

impl Header {
    /// Decodes a header.
    pub fn decode(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes a header.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Validates a header received from the guest whose CID is `guest_cid`, with `available`
    /// payload bytes present in the chain.
    pub fn validate(&self, guest_cid: u64, available: usize) -> Result<(), PacketError> {
        if self.type_ != TYPE_STREAM {
            return Err(PacketError::BadType(self.type_));
        }
        if self.src_cid != guest_cid || self.dst_cid != HOST_CID {
            return Err(PacketError::BadAddress {
                src: self.src_cid,
                dst: self.dst_cid,
            });
        }
        if self.len as usize > MAX_PAYLOAD || self.len as usize > available {
            return Err(PacketError::BadLength {
                len: self.len,
                available,
            });
        }
        if !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&self.op) {
            return Err(PacketError::BadOp(self.op));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    // test code: values are small and fixed
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encode_decode_round_trip() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 52,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 17,
        };
        assert_eq!(Header::decode(&h.encode()), h);
    }

    #[test]
    fn validation_rejects_spoofing_bad_type_length_and_op() {
        let ok = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            type_: TYPE_STREAM,
            op: OP_RW,
            len: 10,
            ..Header::default()
        };
        assert_eq!(ok.validate(3, 10), Ok(()));
        assert!(matches!(
            ok.validate(4, 10),
            Err(PacketError::BadAddress { .. })
        ));
        assert!(matches!(
            Header { dst_cid: 7, ..ok }.validate(3, 10),
            Err(PacketError::BadAddress { .. })
        ));
        assert_eq!(
            Header { type_: 2, ..ok }.validate(3, 10),
            Err(PacketError::BadType(2))
        );
        assert!(matches!(
            ok.validate(3, 9),
            Err(PacketError::BadLength { .. })
        ));
        assert!(matches!(
            Header {
                len: (MAX_PAYLOAD + 1) as u32,
                ..ok
            }
            .validate(3, usize::MAX),
            Err(PacketError::BadLength { .. })
        ));
        assert_eq!(
            Header { op: 0, ..ok }.validate(3, 10),
            Err(PacketError::BadOp(0))
        );
        assert_eq!(
            Header { op: 99, ..ok }.validate(3, 10),
            Err(PacketError::BadOp(99))
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics_and_round_trips(bytes in proptest::array::uniform32(any::<u8>()), tail in proptest::array::uniform12(any::<u8>())) {
            let mut b = [0u8; HDR_LEN];
            b[..32].copy_from_slice(&bytes);
            b[32..].copy_from_slice(&tail);
            let h = Header::decode(&b);
            prop_assert_eq!(h.encode(), b);
            let _ = h.validate(3, usize::from(bytes[0]) * 1000);
        }
    }
}
