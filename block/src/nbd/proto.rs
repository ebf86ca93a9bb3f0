//! NBD wire format (fixed newstyle handshake, simple replies), as in the NBD protocol document.

use std::io::{self, Read, Write};

/// `NBDMAGIC`, first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server word and the prefix of each client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client understands fixed newstyle.
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zero padding after NBD_OPT_EXPORT_NAME.
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

/// Option: select an export and enter transmission (old style, no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the handshake.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: information about an export.
pub const REP_INFO: u32 = 3;
/// Option reply error: option not supported.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option reply error: the option is not valid here or malformed.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option reply error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

/// Info type: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: flags field is valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: read-only export.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: FLUSH is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: FUA is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: TRIM is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: WRITE_ZEROES is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: several connections may share the export with consistent flush semantics.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: WRITE_ZEROES must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// NBD error: operation not permitted (write to a read-only export).
pub const EPERM: u32 = 1;
/// NBD error: I/O error.
pub const EIO: u32 = 5;
/// NBD error: invalid argument (out-of-range or malformed request).
pub const EINVAL: u32 = 22;
/// NBD error: no space left (write past the end).
pub const ENOSPC: u32 = 28;
/// NBD error: command not supported.
pub const ENOTSUP: u32 = 95;

/// Largest option payload accepted during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest READ/WRITE payload accepted (advertised as the maximum block size).
pub const MAX_REQUEST_LEN: u32 = 32 * 1024 * 1024;

/// Transmission-phase command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes at `offset`.
    Read,
    /// Write the payload at `offset`.
    Write,
    /// Disconnect.
    Disconnect,
    /// Make every completed write durable.
    Flush,
    /// Discard a range.
    Trim,
    /// Write zeroes to a range.
    WriteZeroes,
    /// A command this server does not implement.
    Other(u16),
}

impl From<u16> for Command {
    fn from(v: u16) -> Self {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            6 => Command::WriteZeroes,
            other => Command::Other(other),
        }
    }
}

/// A transmission request header (the WRITE payload follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

/// Errors of the wire format.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The peer closed or the socket failed.
    #[error("NBD connection I/O failed")]
    Io(#[from] io::Error),
    /// A magic number did not match.
    #[error("bad NBD magic {found:#x} (expected {expected:#x})")]
    BadMagic {
        /// What was received.
        found: u64,
        /// What the protocol requires.
        expected: u64,
    },
    /// An option payload exceeds [`MAX_OPTION_LEN`].
    #[error("NBD option payload of {0} bytes is too large")]
    OptionTooLarge(u32),
    /// The client does not speak fixed newstyle.
    #[error("client flags {0:#x} lack fixed newstyle")]
    NotFixedNewstyle(u32),
}

/// Reads a big-endian u16.
pub fn read_u16(r: &mut (impl Read + ?Sized)) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

/// Reads a big-endian u32.
pub fn read_u32(r: &mut (impl Read + ?Sized)) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Reads a big-endian u64.
pub fn read_u64(r: &mut (impl Read + ?Sized)) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Parses a 28-byte request header.
pub fn parse_request(hdr: &[u8; 28]) -> Result<Request, ProtoError> {
    let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            found: magic.into(),
            expected: REQUEST_MAGIC.into(),
        });
    }
    let be16 = |i: usize| u16::from_be_bytes([hdr[i], hdr[i + 1]]);
    let be64 = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&hdr[i..i + 8]);
        u64::from_be_bytes(b)
    };
    Ok(Request {
        flags: be16(4),
        command: Command::from(be16(6)),
        cookie: be64(8),
        offset: be64(16),
        length: u32::from_be_bytes([hdr[24], hdr[25], hdr[26], hdr[27]]),
    })
}

/// One option sent by the client during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOption {
    /// Option code (`OPT_*`).
    pub code: u32,
    /// Option payload.
    pub data: Vec<u8>,
}

/// Reads one client option, refusing payloads over [`MAX_OPTION_LEN`].
pub fn read_option(r: &mut (impl Read + ?Sized)) -> Result<ClientOption, ProtoError> {
    let magic = read_u64(r)?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            found: magic,
            expected: IHAVEOPT,
        });
    }
    let code = read_u32(r)?;
    let len = read_u32(r)?;
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLarge(len));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data)?;
    Ok(ClientOption { code, data })
}

/// Writes one option reply.
pub fn write_option_reply(
    w: &mut (impl Write + ?Sized),
    option: u32,
    reply: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(20 + data.len());
    buf.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(&reply.to_be_bytes());
    // Option replies are built by this server from small fixed fields and export names
    // capped by MAX_OPTION_LEN, so the length always fits.
    buf.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf)
}

/// Writes a simple reply header (READ data, if any, follows separately).
pub fn write_simple_reply(
    w: &mut (impl Write + ?Sized),
    error: u32,
    cookie: u64,
) -> io::Result<()> {
    let mut buf = [0u8; 16];
    buf[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    buf[4..8].copy_from_slice(&error.to_be_bytes());
    buf[8..16].copy_from_slice(&cookie.to_be_bytes());
    w.write_all(&buf)
}

/// Parses the payload of NBD_OPT_INFO / NBD_OPT_GO: export name and requested info types.
pub fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name_end = 4usize.checked_add(name_len)?;
    let name = std::str::from_utf8(data.get(4..name_end)?).ok()?.to_owned();
    let n = u16::from_be_bytes(data.get(name_end..name_end + 2)?.try_into().ok()?) as usize;
    let rest = data.get(name_end + 2..)?;
    if rest.len() != n * 2 {
        return None;
    }
    let infos = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, infos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(magic: u32, flags: u16, cmd: u16, cookie: u64, off: u64, len: u32) -> [u8; 28] {
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&magic.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&cmd.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h[16..24].copy_from_slice(&off.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        h
    }

    #[test]
    fn parses_request_fields() {
        let r = parse_request(&header(REQUEST_MAGIC, 1, 1, 7, 4096, 512)).unwrap();
        assert_eq!(
            r,
            Request {
                flags: 1,
                command: Command::Write,
                cookie: 7,
                offset: 4096,
                length: 512
            }
        );
        let r = parse_request(&header(REQUEST_MAGIC, 0, 99, 0, 0, 0)).unwrap();
        assert_eq!(r.command, Command::Other(99));
    }

    #[test]
    fn rejects_bad_request_magic() {
        let err = parse_request(&header(0xdead_beef, 0, 0, 0, 0, 0)).unwrap_err();
        assert!(matches!(
            err,
            ProtoError::BadMagic {
                found: 0xdead_beef,
                ..
            }
        ));
    }

    #[test]
    fn option_length_is_bounded() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&IHAVEOPT.to_be_bytes());
        wire.extend_from_slice(&OPT_GO.to_be_bytes());
        wire.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        let err = read_option(&mut wire.as_slice()).unwrap_err();
        assert!(matches!(err, ProtoError::OptionTooLarge(_)));
    }

    #[test]
    fn info_request_round_trip_and_malformed() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Some(("abc".to_owned(), vec![INFO_EXPORT, INFO_BLOCK_SIZE]))
        );
        // Name length pointing past the end, truncated info list, huge counts.
        assert_eq!(parse_info_request(&d[..5]), None);
        let mut bad = d.clone();
        bad[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_info_request(&bad), None);
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
    }
}
