//! Wire protocol: versioned, length-prefixed frames carrying JSON messages and raw data chunks.
//!
//! Every frame is a 12-byte header followed by `len` payload bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"MVGA"` |
//! | 4 | 1 | protocol version ([`VERSION`]) |
//! | 5 | 1 | kind: 1 message (JSON), 2 data chunk, 3 end of stream |
//! | 6 | 2 | reserved, must be 0 |
//! | 8 | 4 | payload length, little endian, at most [`MAX_PAYLOAD`] |

use std::io::{self, Read, Write};
use std::net::Ipv4Addr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"MVGA";
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of a frame header in bytes.
pub const HEADER_LEN: usize = 12;
/// Largest payload a frame may carry (1 MiB); bigger frames are rejected before allocation.
pub const MAX_PAYLOAD: u32 = 1 << 20;
/// Size of the data chunks the agent and relay send.
pub const CHUNK: usize = 256 * 1024;

/// Errors reading or writing frames and messages.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The underlying stream failed.
    #[error("agent connection I/O failed")]
    Io(#[source] io::Error),
    /// The peer closed the connection at a frame boundary.
    #[error("agent connection closed by peer")]
    Closed,
    /// The stream ended inside a frame.
    #[error("frame truncated: got {got} of {want} bytes")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The header does not start with [`MAGIC`].
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {0} (this agent speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// Unknown frame kind byte.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Reserved header bits were set.
    #[error("reserved header field is {0:#x}, must be 0")]
    Reserved(u16),
    /// The payload is larger than [`MAX_PAYLOAD`].
    #[error("frame payload of {len} bytes exceeds the limit of {MAX_PAYLOAD}")]
    Oversized {
        /// Announced or attempted payload length.
        len: u64,
    },
    /// A message payload is not valid JSON for the expected type.
    #[error("malformed message")]
    BadMessage(#[source] serde_json::Error),
    /// A frame of another kind than the protocol state expects.
    #[error("expected a {expected} frame, got {got:?}")]
    Unexpected {
        /// What the reader expected.
        expected: &'static str,
        /// The kind received.
        got: FrameKind,
    },
}

/// Kind of a frame.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A JSON-encoded [`Request`] or [`Response`].
    Message = 1,
    /// A chunk of a byte stream (file contents, command output).
    Data = 2,
    /// End of the current byte stream.
    End = 3,
}

impl FrameKind {
    fn from_u8(b: u8) -> Result<Self, ProtocolError> {
        match b {
            1 => Ok(Self::Message),
            2 => Ok(Self::Data),
            3 => Ok(Self::End),
            other => Err(ProtocolError::UnknownKind(other)),
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

/// Encodes a frame header for `kind` and a payload of `len` bytes.
pub fn encode_header(kind: FrameKind, len: usize) -> Result<[u8; HEADER_LEN], ProtocolError> {
    if len > MAX_PAYLOAD as usize {
        return Err(ProtocolError::Oversized { len: len as u64 });
    }
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[5] = kind as u8;
    // Bytes 6..8 reserved (zero); `len` fits in u32 after the check above.
    #[allow(clippy::cast_possible_truncation)]
    h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(h)
}

/// Validates a frame header; returns the kind and payload length.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<(FrameKind, usize), ProtocolError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    if h[4] != VERSION {
        return Err(ProtocolError::UnsupportedVersion(h[4]));
    }
    let kind = FrameKind::from_u8(h[5])?;
    let reserved = u16::from_le_bytes([h[6], h[7]]);
    if reserved != 0 {
        return Err(ProtocolError::Reserved(reserved));
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::Oversized { len: len.into() });
    }
    Ok((kind, len as usize))
}

/// Writes one frame.
pub fn write_frame<W: Write + ?Sized>(
    w: &mut W,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    let h = encode_header(kind, payload.len())?;
    // One buffer so a frame goes out in one write where possible.
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.extend_from_slice(&h);
    buf.extend_from_slice(payload);
    w.write_all(&buf).map_err(ProtocolError::Io)?;
    w.flush().map_err(ProtocolError::Io)
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the first byte.
fn read_full<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    eof_ok: bool,
) -> Result<bool, ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 && eof_ok => return Ok(false),
            Ok(0) => {
                return Err(ProtocolError::Truncated {
                    got,
                    want: buf.len(),
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    Ok(true)
}

/// Reads one frame; [`ProtocolError::Closed`] on a clean end of stream.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Frame, ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    if !read_full(r, &mut h, true)? {
        return Err(ProtocolError::Closed);
    }
    let (kind, len) = decode_header(&h)?;
    let mut payload = vec![0u8; len];
    read_full(r, &mut payload, false).map_err(|e| match e {
        ProtocolError::Truncated { got, .. } => ProtocolError::Truncated {
            got: HEADER_LEN + got,
            want: HEADER_LEN + len,
        },
        e => e,
    })?;
    Ok(Frame { kind, payload })
}

/// Serializes `msg` and writes it as a message frame.
pub fn write_message<W: Write + ?Sized, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), ProtocolError> {
    let bytes = serde_json::to_vec(msg).map_err(ProtocolError::BadMessage)?;
    write_frame(w, FrameKind::Message, &bytes)
}

/// Decodes a message frame's payload.
pub fn decode_message<T: DeserializeOwned>(frame: &Frame) -> Result<T, ProtocolError> {
    if frame.kind != FrameKind::Message {
        return Err(ProtocolError::Unexpected {
            expected: "message",
            got: frame.kind,
        });
    }
    serde_json::from_slice(&frame.payload).map_err(ProtocolError::BadMessage)
}

/// Reads the next frame and decodes it as a message.
pub fn read_message<R: Read + ?Sized, T: DeserializeOwned>(r: &mut R) -> Result<T, ProtocolError> {
    decode_message(&read_frame(r)?)
}

/// The service address that moves with the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAddr {
    /// IPv4 address clients connect to.
    pub ip: Ipv4Addr,
    /// Prefix length used when the address is added.
    pub prefix: u8,
    /// Network device that carries it, e.g. `eth0`.
    pub dev: String,
}

/// How the agent starts and tracks the application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Absolute paths of the files the application writes; copied with the checkpoint.
    #[serde(default)]
    pub data_files: Vec<String>,
    /// First PID to hand out (ns_last_pid is raised to `pid_base - 1`) so the PIDs are free on the target.
    #[serde(default)]
    pub pid_base: Option<u32>,
    /// Service address moved with the application.
    #[serde(default)]
    pub service: Option<ServiceAddr>,
}

/// Checkpoint options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointOpts {
    /// Rounds of `criu pre-dump --track-mem` while the application runs, before the final dump.
    #[serde(default)]
    pub pre_dump_rounds: u32,
    /// Send memory pages to a CRIU page server at this address (`ip:port`, started on the target with
    /// [`Request::PageServer`]) instead of through the agent connection.
    #[serde(default)]
    pub page_server: Option<String>,
}

/// A failure the target agent injects on purpose (fault tests; only with the `fault-injection`
/// feature, which release builds do not enable).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Delete the first data file before running CRIU restore, so the restore fails.
    MissingDataFile,
}

/// What a streamed file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A CRIU image file; `name` is relative to the image directory.
    Image,
    /// A symbolic link in the image directory (CRIU's `parent` link); `name` relative, target in `link`.
    Symlink,
    /// An application data file; `name` is its absolute path.
    Data,
}

/// Header of one streamed file; its contents follow as data frames closed by an end frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHeader {
    /// Image, symlink or data file.
    pub kind: FileKind,
    /// Path (relative for images, absolute for data files).
    pub name: String,
    /// Size in bytes of the contents that follow.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Symlink target (symlinks only).
    #[serde(default)]
    pub link: Option<String>,
}

/// Output channel of an executed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Requests from the host (or relay) to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness check; answered with [`Response::Pong`].
    Ping,
    /// Run a command; output streams as [`Response::Output`] messages, then [`Response::Exited`].
    Exec {
        /// Program and arguments.
        argv: Vec<String>,
        /// Kill the command after this many milliseconds.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// FIFREEZE the file system mounted at `path`.
    Freeze {
        /// Mount point.
        path: String,
    },
    /// FITHAW the file system mounted at `path`.
    Thaw {
        /// Mount point.
        path: String,
    },
    /// Start the application under supervision.
    Start {
        /// How to start it.
        spec: WorkloadSpec,
    },
    /// Report the supervised application.
    Status,
    /// Checkpoint the application and stream the images back (see the module docs).
    Checkpoint {
        /// Dump options.
        opts: CheckpointOpts,
    },
    /// Receive images (as [`Request::File`] items closed by [`Request::EndOfImages`]) and restore them.
    Restore {
        /// The application as the source ran it.
        spec: WorkloadSpec,
        /// PIDs and TIDs of the dumped tree; the target refuses the restore if one is taken.
        #[serde(default)]
        tree: Vec<u32>,
        /// Fault to inject (tests; the `fault-injection` feature).
        #[cfg(feature = "fault-injection")]
        #[serde(default)]
        fault: Option<Fault>,
    },
    /// One streamed file during [`Request::Restore`].
    File(FileHeader),
    /// All images sent; restore now.
    EndOfImages,
    /// Start a CRIU page server on `port` for a following restore; answered with [`Response::Ok`].
    PageServer {
        /// TCP port to listen on.
        port: u16,
    },
    /// After a successful handoff: drop the service address, guard and images on the source.
    Release,
    /// After a failed handoff: resume the application on the source.
    Rollback,
    /// On a clone of the VM (an upgrade's backup, whose copy of the application must not run
    /// beside the one to be restored there): kill the application's whole process tree, drop
    /// its service address, forget it. Nothing to discard is fine; answered with
    /// [`Response::Ok`].
    Discard,
    /// Target, after a failed page-server handoff: stream back the images of the last restore
    /// (they hold the pages the source no longer has), as [`Response::File`] items then
    /// [`Response::FetchDone`].
    Fetch,
    /// Source, before [`Request::Rollback`] after a page-server dump: [`Request::File`] items closed by
    /// [`Request::EndOfImages`] complete the kept checkpoint; answered with [`Response::Ok`].
    AddImages,
}

/// Statistics of a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointStats {
    /// Wall time of the final `criu dump` (the application is frozen during it), ms.
    pub freeze_ms: u64,
    /// Wall time of all pre-dump rounds, ms.
    pub pre_dump_ms: u64,
    /// Bytes of image files streamed (pre-dumps included).
    pub image_bytes: u64,
    /// Bytes of data files streamed.
    pub data_bytes: u64,
    /// Number of files streamed.
    pub files: u64,
}

/// Responses from an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Ping`].
    Pong {
        /// Agent version string.
        version: String,
    },
    /// Generic success.
    Ok,
    /// A chunk of command output.
    Output {
        /// Which stream.
        stream: OutputStream,
        /// The bytes (lossy UTF-8).
        data: String,
    },
    /// The command ended.
    Exited {
        /// Exit code, or `None` if killed by a signal.
        code: Option<i32>,
        /// Whether the timeout killed it.
        timed_out: bool,
    },
    /// The application started.
    Started {
        /// PID of its root process.
        pid: u32,
    },
    /// Supervised application state.
    Status {
        /// The spec, if an application is supervised.
        spec: Option<WorkloadSpec>,
        /// Root PID, if running.
        pid: Option<u32>,
        /// All PIDs and TIDs of its process tree.
        tree: Vec<u32>,
    },
    /// Checkpoint begins; image files follow as [`Response::File`] items.
    CheckpointBegin {
        /// The application's spec (the target needs it to restore).
        spec: WorkloadSpec,
        /// PIDs and TIDs of the tree being dumped (they must be free on the target).
        #[serde(default)]
        tree: Vec<u32>,
    },
    /// One streamed file during a checkpoint.
    File(FileHeader),
    /// Checkpoint finished; the application is stopped on the source until release or rollback.
    CheckpointDone {
        /// Measurements.
        stats: CheckpointStats,
    },
    /// Restore finished; the application runs here.
    Restored {
        /// PID of the restored root process.
        pid: u32,
        /// Wall time of `criu restore`, ms.
        restore_ms: u64,
    },
    /// All images of the last restore were streamed back.
    FetchDone {
        /// Number of files streamed.
        files: u64,
    },
    /// Rollback finished; the application runs on the source again.
    RolledBack {
        /// PID of the resumed root process.
        pid: u32,
    },
    /// The request failed.
    Error {
        /// What failed.
        kind: ErrorKind,
        /// Human-readable detail.
        message: String,
    },
}

/// Classes of failures an agent reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is not valid in the agent's current state or has bad arguments.
    BadRequest,
    /// A command (exec, iptables, ip, ...) failed.
    Command,
    /// CRIU dump failed (the application keeps running).
    Dump,
    /// CRIU restore failed (cleaned up on the target).
    Restore,
    /// Rollback failed.
    Rollback,
    /// Filesystem or other I/O failure.
    Io,
    /// Protocol error on the stream.
    Protocol,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn frame_bytes(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, kind, payload).unwrap();
        v
    }

    #[test]
    fn roundtrip_messages_and_data() {
        let mut buf = Vec::new();
        let req = Request::Exec {
            argv: vec!["echo".into(), "hi".into()],
            timeout_ms: Some(5),
        };
        write_message(&mut buf, &req).unwrap();
        write_frame(&mut buf, FrameKind::Data, b"abc").unwrap();
        write_frame(&mut buf, FrameKind::End, b"").unwrap();
        let mut r = Cursor::new(buf);
        let got: Request = read_message(&mut r).unwrap();
        assert_eq!(got, req);
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Frame {
                kind: FrameKind::Data,
                payload: b"abc".to_vec()
            }
        );
        assert_eq!(read_frame(&mut r).unwrap().kind, FrameKind::End);
        assert!(matches!(read_frame(&mut r), Err(ProtocolError::Closed)));
    }

    #[test]
    fn bad_magic_is_typed_error() {
        let mut b = frame_bytes(FrameKind::Data, b"x");
        b[0] = b'X';
        assert!(
            matches!(read_frame(&mut Cursor::new(b)), Err(ProtocolError::BadMagic(m)) if m == *b"XVGA")
        );
    }

    #[test]
    fn unknown_version_is_typed_error() {
        let mut b = frame_bytes(FrameKind::Data, b"x");
        b[4] = 2;
        assert!(matches!(
            read_frame(&mut Cursor::new(b)),
            Err(ProtocolError::UnsupportedVersion(2))
        ));
    }

    #[test]
    fn unknown_kind_and_reserved_bits_are_typed_errors() {
        let mut b = frame_bytes(FrameKind::Data, b"x");
        b[5] = 9;
        assert!(matches!(
            read_frame(&mut Cursor::new(b)),
            Err(ProtocolError::UnknownKind(9))
        ));
        let mut b = frame_bytes(FrameKind::Data, b"x");
        b[7] = 1;
        assert!(matches!(
            read_frame(&mut Cursor::new(b)),
            Err(ProtocolError::Reserved(0x100))
        ));
    }

    #[test]
    fn oversized_frames_rejected_both_ways() {
        // Announced length over the limit: rejected from the header, before allocating.
        let mut b = frame_bytes(FrameKind::Data, b"");
        b[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            read_frame(&mut Cursor::new(b)),
            Err(ProtocolError::Oversized { len }) if len == u64::from(MAX_PAYLOAD) + 1
        ));
        let big = vec![0u8; MAX_PAYLOAD as usize + 1];
        let mut out = Vec::new();
        assert!(matches!(
            write_frame(&mut out, FrameKind::Data, &big),
            Err(ProtocolError::Oversized { .. })
        ));
        assert!(out.is_empty());
        // Exactly the limit is fine.
        let max = vec![7u8; MAX_PAYLOAD as usize];
        let b = frame_bytes(FrameKind::Data, &max);
        assert_eq!(
            read_frame(&mut Cursor::new(b)).unwrap().payload.len(),
            max.len()
        );
    }

    #[test]
    fn truncated_frames_are_typed_errors() {
        let b = frame_bytes(FrameKind::Data, b"hello");
        for cut in 1..b.len() {
            let r = read_frame(&mut Cursor::new(&b[..cut]));
            assert!(
                matches!(r, Err(ProtocolError::Truncated { got, .. }) if got == cut),
                "cut {cut}: {r:?}"
            );
        }
    }

    #[test]
    fn malformed_json_and_wrong_kind_are_typed_errors() {
        let b = frame_bytes(FrameKind::Message, b"{\"op\":\"no_such_op\"}");
        let r: Result<Request, _> = read_message(&mut Cursor::new(b));
        assert!(matches!(r, Err(ProtocolError::BadMessage(_))));
        let b = frame_bytes(FrameKind::Message, b"\xff\x00garbage");
        let r: Result<Request, _> = read_message(&mut Cursor::new(b));
        assert!(matches!(r, Err(ProtocolError::BadMessage(_))));
        let b = frame_bytes(FrameKind::Data, b"{}");
        let r: Result<Request, _> = read_message(&mut Cursor::new(b));
        assert!(matches!(
            r,
            Err(ProtocolError::Unexpected {
                got: FrameKind::Data,
                ..
            })
        ));
    }

    proptest::proptest! {
        /// Any byte string read as frames yields frames or typed errors, never a panic, and a
        /// message decode of any frame is typed too.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let mut r = Cursor::new(bytes);
            for _ in 0..64 {
                match read_frame(&mut r) {
                    Ok(f) => {
                        let _ = decode_message::<Request>(&f);
                    }
                    Err(_) => break,
                }
            }
        }

        /// Headers that differ from a valid one in any byte are either still valid or rejected
        /// with a typed error.
        #[test]
        fn corrupted_headers_are_typed(pos in 0usize..HEADER_LEN, val in proptest::prelude::any::<u8>()) {
            let mut b = frame_bytes(FrameKind::Data, b"abc");
            b[pos] = val;
            match read_frame(&mut Cursor::new(b)) {
                Ok(f) => proptest::prop_assert!(f.payload.len() <= 3),
                Err(e) => proptest::prop_assert!(!matches!(e, ProtocolError::Io(_))),
            }
        }

        /// Any payload up to a few chunks round-trips through data frames.
        #[test]
        fn data_roundtrip(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096)) {
            let b = frame_bytes(FrameKind::Data, &payload);
            proptest::prop_assert_eq!(read_frame(&mut Cursor::new(b)).unwrap().payload, payload);
        }
    }

    #[test]
    fn every_request_roundtrips() {
        let spec = WorkloadSpec {
            argv: vec!["java".into()],
            cwd: None,
            env: vec![("A".into(), "b".into())],
            data_files: vec!["/data/x".into()],
            pid_base: Some(30000),
            service: Some(ServiceAddr {
                ip: Ipv4Addr::new(10, 0, 0, 1),
                prefix: 24,
                dev: "eth0".into(),
            }),
        };
        let reqs = vec![
            Request::Ping,
            Request::Freeze { path: "/".into() },
            Request::Thaw { path: "/".into() },
            Request::Start { spec: spec.clone() },
            Request::Status,
            Request::Checkpoint {
                opts: CheckpointOpts {
                    pre_dump_rounds: 2,
                    page_server: Some("1.2.3.4:5".into()),
                },
            },
            Request::Restore {
                spec,
                tree: vec![20000, 20001],
                #[cfg(feature = "fault-injection")]
                fault: Some(Fault::MissingDataFile),
            },
            Request::File(FileHeader {
                kind: FileKind::Symlink,
                name: "parent".into(),
                size: 0,
                mode: 0o777,
                link: Some("../pre0".into()),
            }),
            Request::EndOfImages,
            Request::PageServer { port: 1 },
            Request::Release,
            Request::Rollback,
            Request::Fetch,
            Request::AddImages,
        ];
        for r in reqs {
            let mut buf = Vec::new();
            write_message(&mut buf, &r).unwrap();
            let back: Request = read_message(&mut Cursor::new(buf)).unwrap();
            assert_eq!(back, r);
        }
    }
}
