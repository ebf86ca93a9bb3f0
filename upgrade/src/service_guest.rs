//! Host side of the `service` test guest (`test-guests/guests/service.c`): a tiny stateful network
//! service with its own agent, the stand-in for a Java service and the guest agent in the live
//! OS-upgrade demo.
//!
//! The guest runs on one writable virtio-blk disk (the first virtio-mmio device) and a
//! virtio-vsock device (the second). It keeps an "OS" stamp in the first sector of the disk's
//! [OS region](OS_REGION_LEN) and logs every served request in the [log region](LOG_START),
//! one 512-byte slot per request, flushed before the reply.
//!
//! - The **service** ([`ServiceClient`], vsock port [`DEFAULT_SERVICE_PORT`]) takes 16-byte
//!   requests (u64 LE seq, u64 LE value). Request `seq` must be the last served seq + 1; the
//!   guest then computes `checksum = (checksum ^ value) * 0x100000001b3 + seq` (wrapping, from
//!   0; [`next_checksum`]), logs the record, flushes, and replies (seq, checksum). A request
//!   with a wrong seq is answered (seq, [`REJECTED`]) and not logged. All connections (up to
//!   [`MAX_SERVICE_CONNECTIONS`]) share one sequence.
//! - The **agent** ([`ServiceAgent`], port [`DEFAULT_AGENT_PORT`]) answers one text line with
//!   one line: `status`, `exec <argv...>`, `freeze`, `checkpoint`, `restore <hex>`, `release`,
//!   `rollback`; `err <reason>` becomes [`ServiceGuestError::Refused`].
//!
//! Modes ([`Mode`]): a booted guest is *serving*. `freeze` holds service requests (they are
//! buffered, not answered) and closes the receive window of every service connection, so the
//! host side stops sending: everything the device delivered before the `ok` is in the guest,
//! and a later `checkpoint` ([`ServiceImage`]) holds all of it; bytes the client wrote after
//! that stay in the host socket. `rollback` reopens the windows and serves what was held. A
//! copy that sees a vsock transport reset (the VMM cloned or restored the VM) drops all its
//! connections without a word and, if it was serving or frozen, becomes *standby*: it never
//! answers the old clients nor writes the log, and waits for `restore <image>`, which adopts
//! the service state and the listed connections and makes it serve. `release` makes the old
//! copy *released* for good.
//!
//! Connections created by `restore` belong to host sockets the VMM moves into the new VM's
//! vsock device (a muxer import) before or after the agent's answer: until the device shows it
//! knows such a connection (any packet on it but RST), the guest sends nothing on it except a
//! CREDIT_REQUEST probe every 5 ms, ignores the device's RST answers to those probes, and
//! gives the connection up silently after 30 s. For a consistent cut, [`ImageConn::rx_cnt`]
//! (bytes the guest received) equals the device's `tx_cnt` for that connection.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Name of the guest in the test-guest kit (`vmm_test_guests::SERVICE`).
pub const GUEST_NAME: &str = "service";
/// Start of the OS region (the OS stamp is its first sector).
pub const OS_REGION_START: u64 = 0;
/// Length of the OS region: bytes `[0, 1 MiB)`.
pub const OS_REGION_LEN: u64 = 1 << 20;
/// Magic of the OS stamp (bytes 0..8 of sector 0; bytes 8..16 are the u64 LE version).
pub const OS_MAGIC: &[u8; 8] = b"MVOSVER1";
/// Start of the log region (it runs to the end of the disk).
pub const LOG_START: u64 = 1 << 20;
/// Size of one log slot: slot `i` is at `LOG_START + i * LOG_SLOT_SIZE`.
pub const LOG_SLOT_SIZE: u64 = 512;
/// Magic of a log record (bytes 0..8; then u64 LE seq, value, checksum; zeros).
pub const LOG_MAGIC: &[u8; 8] = b"MVLOGREC";
/// Smallest disk the guest is meant for.
pub const MIN_DISK_SIZE: u64 = 4 << 20;
/// Default vsock port of the service (`shared_service_port`).
pub const DEFAULT_SERVICE_PORT: u32 = 5000;
/// Default vsock port of the agent (`shared_agent_port`).
pub const DEFAULT_AGENT_PORT: u32 = 1100;
/// Default guest-physical base of the virtio-blk window (`shared_blk_base`).
pub const DEFAULT_BLK_BASE: u64 = 0xd000_0000;
/// Default guest-physical base of the virtio-vsock window (`shared_vsock_base`).
pub const DEFAULT_VSOCK_BASE: u64 = 0xd000_1000;
/// Multiplier of the checksum chain.
pub const CHECKSUM_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Checksum field of the reply to a request with a wrong seq.
pub const REJECTED: u64 = u64::MAX;
/// Most service connections the guest holds at once.
pub const MAX_SERVICE_CONNECTIONS: usize = 4;
/// Receive buffer of a service connection in the guest (bytes of unconsumed requests).
pub const SERVICE_BUFFER: u32 = 4096;
/// Longest agent command line the guest takes (without its newline); longer ones are
/// answered `err too long`.
pub const AGENT_LINE_MAX: usize = 65535;
/// Magic of a checkpoint image.
pub const IMAGE_MAGIC: &[u8; 8] = b"MVSVCST1";
/// Format number of a checkpoint image.
pub const IMAGE_FORMAT: u32 = 1;
/// Size of the fixed head of a checkpoint image.
const IMAGE_HEAD: usize = 48;
/// Size of one connection's fixed fields in a checkpoint image.
const IMAGE_CONN: usize = 32;
/// Longest reply line the agent client accepts.
const MAX_REPLY_LINE: usize = 1 << 20;

/// Errors of the service guest's host side.
#[derive(Debug, thiserror::Error)]
pub enum ServiceGuestError {
    /// Connecting to a vsock port of the guest failed.
    #[error("cannot connect to vsock port {port} through {uds}")]
    Connect {
        /// The vsock device's host socket.
        uds: PathBuf,
        /// The guest port.
        port: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("vsock connection i/o")]
    Io(#[from] std::io::Error),
    /// No (complete) answer within the time allowed.
    #[error("no answer from the guest within {0:?}")]
    Timeout(Duration),
    /// The guest closed the connection.
    #[error("the guest closed the connection")]
    Eof,
    /// The guest rejected the request's seq (it was not its last seq + 1).
    #[error("the guest rejected request seq {seq} as out of order")]
    OutOfOrder {
        /// The rejected seq.
        seq: u64,
    },
    /// A reply for another request than the oldest one waiting.
    #[error("reply for seq {got}, expected seq {expected}")]
    UnexpectedReply {
        /// The seq of the oldest request waiting for a reply.
        expected: u64,
        /// The seq in the reply.
        got: u64,
    },
    /// The reply's checksum is not the one the client computed.
    #[error("checksum mismatch at seq {seq}: expected {expected:#018x}, got {got:#018x}")]
    ChecksumMismatch {
        /// The request.
        seq: u64,
        /// What the client computed.
        expected: u64,
        /// What the guest answered.
        got: u64,
    },
    /// `read_reply` with no request waiting for a reply.
    #[error("no request is waiting for a reply")]
    NothingInFlight,
    /// The agent answered `err <reason>`.
    #[error("the agent refused: {0}")]
    Refused(String),
    /// The agent's answer is malformed.
    #[error("malformed agent answer: {0:?}")]
    Protocol(String),
    /// An argument the guest cannot take (e.g. an exec argument with whitespace).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A checkpoint image is malformed.
    #[error("bad checkpoint image: {0}")]
    BadImage(String),
    /// Reading or creating the disk failed.
    #[error("disk")]
    Disk(#[from] block::BlockError),
    /// The log does not match the acknowledged requests.
    #[error("log check failed: {0}")]
    BadLog(String),
}

/// Result of this module.
pub type Result<T, E = ServiceGuestError> = std::result::Result<T, E>;

/// The checksum after request (`seq`, `value`) when it was `checksum` before.
pub fn next_checksum(checksum: u64, seq: u64, value: u64) -> u64 {
    (checksum ^ value)
        .wrapping_mul(CHECKSUM_PRIME)
        .wrapping_add(seq)
}

/// A stream with a read buffer that keeps partial data across timeouts.
#[derive(Debug)]
struct Wire {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Wire {
    fn connect(uds: &Path, port: u32, wait: Duration) -> Result<Self> {
        let stream = vmm::handover::vsock_connect(uds, port, wait).map_err(|source| {
            ServiceGuestError::Connect {
                uds: uds.to_owned(),
                port,
                source,
            }
        })?;
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    /// Reads once more into the buffer, waiting until `deadline` at most.
    fn fill(&mut self, deadline: Instant, timeout: Duration) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ServiceGuestError::Timeout(timeout));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut b = [0u8; 8192];
        loop {
            return match self.stream.read(&mut b) {
                Ok(0) => Err(ServiceGuestError::Eof),
                Ok(n) => {
                    self.buf.extend_from_slice(&b[..n]);
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    Err(ServiceGuestError::Timeout(timeout))
                }
                Err(e) => Err(e.into()),
            };
        }
    }

    /// The next `n` bytes.
    fn take(&mut self, n: usize, timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        while self.buf.len() < n {
            self.fill(deadline, timeout)?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// The next line, without its newline.
    fn line(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let mut l: Vec<u8> = self.buf.drain(..scanned + i + 1).collect();
                l.pop();
                return String::from_utf8(l)
                    .map_err(|e| ServiceGuestError::Protocol(format!("not UTF-8: {e}")));
            }
            scanned = self.buf.len();
            if scanned > MAX_REPLY_LINE {
                return Err(ServiceGuestError::Protocol(format!(
                    "a line of more than {MAX_REPLY_LINE} bytes"
                )));
            }
            self.fill(deadline, timeout)?;
        }
    }
}

/// A service reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The request's seq.
    pub seq: u64,
    /// The service checksum after it ([`REJECTED`] for a rejected seq).
    pub checksum: u64,
}

/// A request sent and not yet answered.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    seq: u64,
    expected: u64,
}

/// A client of the guest's service: sends the next seq with a value, checks each reply's seq and
/// checksum against its own computation. Requests can be pipelined
/// ([`send_request`](Self::send_request) several times, then [`read_reply`](Self::read_reply)).
#[derive(Debug)]
pub struct ServiceClient {
    wire: Wire,
    timeout: Duration,
    /// Last seq sent and the checksum expected after it.
    sent_seq: u64,
    sent_checksum: u64,
    /// Last seq answered and its checksum.
    acked_seq: u64,
    acked_checksum: u64,
    in_flight: VecDeque<InFlight>,
}

impl ServiceClient {
    /// Connects to the service on guest port `port` through the vsock device's host socket
    /// `uds`, waiting up to `wait` for the socket and the guest; `wait` is also the timeout of
    /// each reply (see [`set_timeout`](Self::set_timeout)). The client starts at seq 1 from
    /// checksum 0 (a fresh service; see [`with_start`](Self::with_start)).
    pub fn connect(uds: &Path, port: u32, wait: Duration) -> Result<Self> {
        Ok(Self {
            wire: Wire::connect(uds, port, wait)?,
            timeout: wait,
            sent_seq: 0,
            sent_checksum: 0,
            acked_seq: 0,
            acked_checksum: 0,
            in_flight: VecDeque::new(),
        })
    }

    /// Continues from a known service state: `seq` was the last request served and `checksum`
    /// the checksum after it. Requests in flight are forgotten.
    pub fn with_start(mut self, seq: u64, checksum: u64) -> Self {
        self.set_start(seq, checksum);
        self
    }

    /// Like [`with_start`](Self::with_start), on a client in use (e.g. after another client
    /// advanced the shared sequence).
    pub fn set_start(&mut self, seq: u64, checksum: u64) {
        self.sent_seq = seq;
        self.sent_checksum = checksum;
        self.acked_seq = seq;
        self.acked_checksum = checksum;
        self.in_flight.clear();
    }

    /// Sets the timeout of each reply.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The last seq answered and the checksum after it.
    pub fn acked(&self) -> (u64, u64) {
        (self.acked_seq, self.acked_checksum)
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Sends the next request with `value` without waiting; returns its seq.
    pub fn send_request(&mut self, value: u64) -> Result<u64> {
        let seq = self.sent_seq + 1;
        self.send_raw(seq, value)?;
        self.sent_seq = seq;
        self.sent_checksum = next_checksum(self.sent_checksum, seq, value);
        self.in_flight.push_back(InFlight {
            seq,
            expected: self.sent_checksum,
        });
        Ok(seq)
    }

    /// Sends the next requests with `values` in one write, without waiting; returns the seq of
    /// the first. (Many small writes to a socket nobody reads block early: each write is
    /// charged its full buffer overhead against the socket's send buffer.)
    pub fn send_requests(&mut self, values: &[u64]) -> Result<u64> {
        let first = self.sent_seq + 1;
        let mut b = Vec::with_capacity(values.len() * 16);
        let (mut seq, mut checksum) = (self.sent_seq, self.sent_checksum);
        let mut batch = Vec::with_capacity(values.len());
        for &value in values {
            seq += 1;
            checksum = next_checksum(checksum, seq, value);
            b.extend_from_slice(&seq.to_le_bytes());
            b.extend_from_slice(&value.to_le_bytes());
            batch.push(InFlight {
                seq,
                expected: checksum,
            });
        }
        self.wire.stream.write_all(&b)?;
        self.sent_seq = seq;
        self.sent_checksum = checksum;
        self.in_flight.extend(batch);
        Ok(first)
    }

    /// Reads the reply to the oldest request in flight and checks it. A timeout leaves that
    /// request in flight (a later call may still get its reply); any other error ends it.
    pub fn read_reply(&mut self) -> Result<Reply> {
        let Some(front) = self.in_flight.front().copied() else {
            return Err(ServiceGuestError::NothingInFlight);
        };
        let r = self.read_raw()?;
        self.in_flight.pop_front();
        if r.seq != front.seq {
            return Err(ServiceGuestError::UnexpectedReply {
                expected: front.seq,
                got: r.seq,
            });
        }
        if r.checksum == REJECTED {
            return Err(ServiceGuestError::OutOfOrder { seq: r.seq });
        }
        if r.checksum != front.expected {
            return Err(ServiceGuestError::ChecksumMismatch {
                seq: r.seq,
                expected: front.expected,
                got: r.checksum,
            });
        }
        self.acked_seq = r.seq;
        self.acked_checksum = r.checksum;
        Ok(r)
    }

    /// Sends the next request with `value` and waits for its checked reply.
    pub fn request(&mut self, value: u64) -> Result<Reply> {
        if !self.in_flight.is_empty() {
            return Err(ServiceGuestError::InvalidArgument(format!(
                "{} requests still wait for their replies",
                self.in_flight.len()
            )));
        }
        self.send_request(value)?;
        self.read_reply()
    }

    /// Sends a request with any seq, not tracked by the client (to test the guest).
    pub fn send_raw(&mut self, seq: u64, value: u64) -> Result<()> {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&seq.to_le_bytes());
        b[8..].copy_from_slice(&value.to_le_bytes());
        self.wire.stream.write_all(&b)?;
        Ok(())
    }

    /// Sends raw bytes (e.g. a request split in pieces).
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.wire.stream.write_all(bytes)?;
        Ok(())
    }

    /// Reads the next 16-byte reply as it is, unchecked.
    pub fn read_raw(&mut self) -> Result<Reply> {
        let b = self.wire.take(16, self.timeout)?;
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        Ok(Reply {
            seq: u(0),
            checksum: u(8),
        })
    }

    /// The connection (e.g. to shut it down).
    pub fn stream(&self) -> &UnixStream {
        &self.wire.stream
    }
}

/// The guest's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serving requests (after boot, `rollback` or `restore`).
    Serving,
    /// Holding requests unanswered (after `freeze`).
    Frozen,
    /// A copy after a transport reset, waiting for `restore`.
    Standby,
    /// The old copy after `release`: never serves again.
    Released,
}

impl Mode {
    /// The value of the guest's `shared_mode` for this mode.
    pub fn shared_value(self) -> u64 {
        match self {
            Self::Serving => 0,
            Self::Frozen => 1,
            Self::Standby => 2,
            Self::Released => 3,
        }
    }

    /// The mode of a `shared_mode` value.
    pub fn from_shared_value(v: u64) -> Option<Self> {
        Some(match v {
            0 => Self::Serving,
            1 => Self::Frozen,
            2 => Self::Standby,
            3 => Self::Released,
            _ => return None,
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = ServiceGuestError;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "serving" => Self::Serving,
            "frozen" => Self::Frozen,
            "standby" => Self::Standby,
            "released" => Self::Released,
            _ => return Err(ServiceGuestError::Protocol(format!("unknown mode {s:?}"))),
        })
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Serving => "serving",
            Self::Frozen => "frozen",
            Self::Standby => "standby",
            Self::Released => "released",
        })
    }
}

/// The agent's `status` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// The guest's mode.
    pub mode: Mode,
    /// The OS version (from the OS stamp).
    pub version: u64,
    /// Last served seq.
    pub seq: u64,
    /// Checksum after it.
    pub checksum: u64,
    /// Service connections held.
    pub conns: u64,
}

/// A client of the guest's agent: one command line, one answer line, each within the timeout
/// given to [`connect`](Self::connect). After a timeout the late answer is skipped before the
/// next command's.
#[derive(Debug)]
pub struct ServiceAgent {
    wire: Wire,
    timeout: Duration,
    /// Answers still to come for commands that timed out.
    late: usize,
}

impl ServiceAgent {
    /// A second handle on the agent connection (its `shutdown` ends a blocked command).
    pub fn stream_handle(&self) -> std::io::Result<UnixStream> {
        self.wire.stream.try_clone()
    }

    /// Connects to the agent on guest port `port` through the vsock device's host socket `uds`,
    /// waiting up to `wait`; `wait` is also each command's timeout.
    pub fn connect(uds: &Path, port: u32, wait: Duration) -> Result<Self> {
        Ok(Self {
            wire: Wire::connect(uds, port, wait)?,
            timeout: wait,
            late: 0,
        })
    }

    /// Sets each command's timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends `bytes` as they are (they should end with a newline) and returns the next answer
    /// line as it is (`ok ...` or `err ...`), within `timeout`.
    pub fn raw(&mut self, bytes: &[u8], timeout: Duration) -> Result<String> {
        while self.late > 0 {
            self.wire.line(timeout)?;
            self.late -= 1;
        }
        self.wire.stream.write_all(bytes)?;
        match self.wire.line(timeout) {
            Err(e @ ServiceGuestError::Timeout(_)) => {
                self.late += 1;
                Err(e)
            }
            r => r,
        }
    }

    /// Runs command `line` (no newline) within `timeout`; returns what follows `ok` (trimmed),
    /// or [`ServiceGuestError::Refused`] with the reason of an `err` answer.
    pub fn command_with_timeout(&mut self, line: &str, timeout: Duration) -> Result<String> {
        if line.contains('\n') {
            return Err(ServiceGuestError::InvalidArgument(
                "a command line with a newline".into(),
            ));
        }
        let answer = self.raw(format!("{line}\n").as_bytes(), timeout)?;
        if let Some(rest) = answer.strip_prefix("err") {
            return Err(ServiceGuestError::Refused(rest.trim().to_string()));
        }
        match answer.strip_prefix("ok") {
            Some(rest) if rest.is_empty() || rest.starts_with(' ') => Ok(rest.trim().to_string()),
            _ => Err(ServiceGuestError::Protocol(answer)),
        }
    }

    /// Runs command `line` within the agent's timeout (see
    /// [`command_with_timeout`](Self::command_with_timeout)).
    pub fn command(&mut self, line: &str) -> Result<String> {
        self.command_with_timeout(line, self.timeout)
    }

    /// The guest's mode, OS version, service state and connection count.
    pub fn status(&mut self) -> Result<Status> {
        let answer = self.command("status")?;
        let field = |name: &str| -> Result<&str> {
            answer
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .ok_or_else(|| ServiceGuestError::Protocol(answer.clone()))
        };
        let dec = |name: &str| -> Result<u64> {
            field(name)?
                .parse()
                .map_err(|_| ServiceGuestError::Protocol(answer.clone()))
        };
        Ok(Status {
            mode: field("mode")?.parse()?,
            version: dec("version")?,
            seq: dec("seq")?,
            checksum: u64::from_str_radix(field("checksum")?, 16)
                .map_err(|_| ServiceGuestError::Protocol(answer.clone()))?,
            conns: dec("conns")?,
        })
    }

    /// Runs a command in the guest (`upgrade` raises the OS version, `true`, `false`,
    /// `sleep <ms>`; anything else exits 127) and returns its exit code, within `timeout`
    /// ([`ServiceGuestError::Timeout`] otherwise). Arguments must be non-empty printable ASCII
    /// without whitespace.
    pub fn exec(&mut self, argv: &[String], timeout: Duration) -> Result<i32> {
        if argv.is_empty() {
            return Err(ServiceGuestError::InvalidArgument("an empty argv".into()));
        }
        if let Some(a) = argv
            .iter()
            .find(|a| a.is_empty() || !a.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ServiceGuestError::InvalidArgument(format!(
                "exec argument {a:?}"
            )));
        }
        let answer = self.command_with_timeout(&format!("exec {}", argv.join(" ")), timeout)?;
        answer
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("exit="))
            .and_then(|v| v.parse().ok())
            .ok_or(ServiceGuestError::Protocol(answer))
    }

    /// Freezes the service: requests are held unanswered, the connections' windows closed.
    pub fn freeze(&mut self) -> Result<()> {
        self.command("freeze").map(drop)
    }

    /// The service state and connections of a frozen guest as a checkpoint image (see
    /// [`ServiceImage`]); the guest stays frozen.
    pub fn checkpoint(&mut self) -> Result<Vec<u8>> {
        let answer = self.command("checkpoint")?;
        hex_decode(&answer).ok_or(ServiceGuestError::Protocol(answer))
    }

    /// Makes a standby guest adopt a checkpoint image and serve; returns the adopted seq.
    pub fn restore(&mut self, image: &[u8]) -> Result<u64> {
        let answer = self.command(&format!("restore {}", hex_encode(image)))?;
        answer
            .strip_prefix("seq=")
            .and_then(|v| v.parse().ok())
            .ok_or(ServiceGuestError::Protocol(answer))
    }

    /// Makes the guest released for good (the old copy after a handover); its service
    /// connections are forgotten without a word.
    pub fn release(&mut self) -> Result<()> {
        self.command("release").map(drop)
    }

    /// Unfreezes a frozen guest: it serves again, held requests first.
    pub fn rollback(&mut self) -> Result<()> {
        self.command("rollback").map(drop)
    }
}

fn hex_encode(b: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One service connection in a checkpoint image (counters wrap, as in virtio-vsock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConn {
    /// The guest's port (the service port).
    pub guest_port: u32,
    /// The host side's port.
    pub host_port: u32,
    /// The host side's receive buffer, as it last told the guest.
    pub peer_buf_alloc: u32,
    /// The host side's consumed count, as it last told the guest.
    pub peer_fwd_cnt: u32,
    /// Bytes the service consumed (the guest's fwd_cnt).
    pub fwd_cnt: u32,
    /// The fwd_cnt the guest last told the host side.
    pub fwd_cnt_sent: u32,
    /// Bytes the guest sent.
    pub tx_cnt: u32,
    /// Bytes received and not yet consumed (partial or held requests).
    pub pending: Vec<u8>,
}

impl ImageConn {
    /// Bytes the guest received on this connection: for a consistent cut, the device's
    /// `tx_cnt` (`devices::virtio::vsock::muxer::ConnState::tx_cnt`).
    pub fn rx_cnt(&self) -> u32 {
        // Counters are modulo 2^32, like the device's.
        #[allow(clippy::cast_possible_truncation)]
        let pending = self.pending.len() as u32;
        self.fwd_cnt.wrapping_add(pending)
    }
}

/// A checkpoint image of the service (what `checkpoint` answers and `restore` takes).
///
/// Little-endian: bytes 0..8 [`IMAGE_MAGIC`], 8..12 u32 [`IMAGE_FORMAT`], 12..16 u32 connection
/// count, 16..24 u64 seq, 24..32 u64 checksum, 32..40 u64 next log slot, 40..48 u64 OS version;
/// then per connection eight u32 (guest port, host port, peer buf_alloc, peer fwd_cnt, fwd_cnt,
/// fwd_cnt last sent, tx_cnt, pending length) and the pending bytes; then a u32 CRC32C of all
/// bytes before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceImage {
    /// Last served seq.
    pub seq: u64,
    /// Checksum after it.
    pub checksum: u64,
    /// The log slot of the next request.
    pub next_slot: u64,
    /// The OS version of the checkpointed guest (informational: `restore` keeps the restoring
    /// guest's own).
    pub os_version: u64,
    /// Its service connections.
    pub conns: Vec<ImageConn>,
}

impl ServiceImage {
    /// Decodes and checks an image.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let bad = |m: &str| Err(ServiceGuestError::BadImage(m.to_string()));
        if b.len() < IMAGE_HEAD + 4 {
            return bad("too short");
        }
        let (body, crc) = b.split_at(b.len() - 4);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        if &b[..8] != IMAGE_MAGIC {
            return bad("bad magic");
        }
        if u32_at(8) != IMAGE_FORMAT {
            return bad("unknown format");
        }
        if crc32c::crc32c(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return bad("bad checksum");
        }
        let count = u32_at(12) as usize;
        if count > MAX_SERVICE_CONNECTIONS {
            return bad("too many connections");
        }
        let mut conns = Vec::with_capacity(count);
        let mut off = IMAGE_HEAD;
        for _ in 0..count {
            if off + IMAGE_CONN > body.len() {
                return bad("truncated");
            }
            let f = |k: usize| u32_at(off + 4 * k);
            let len = f(7) as usize;
            if len > SERVICE_BUFFER as usize || off + IMAGE_CONN + len > body.len() {
                return bad("bad pending length");
            }
            conns.push(ImageConn {
                guest_port: f(0),
                host_port: f(1),
                peer_buf_alloc: f(2),
                peer_fwd_cnt: f(3),
                fwd_cnt: f(4),
                fwd_cnt_sent: f(5),
                tx_cnt: f(6),
                pending: body[off + IMAGE_CONN..off + IMAGE_CONN + len].to_vec(),
            });
            off += IMAGE_CONN + len;
        }
        if off != body.len() {
            return bad("trailing bytes");
        }
        Ok(Self {
            seq: u64_at(16),
            checksum: u64_at(24),
            next_slot: u64_at(32),
            os_version: u64_at(40),
            conns,
        })
    }

    /// Encodes the image.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(IMAGE_HEAD + 4);
        b.extend_from_slice(IMAGE_MAGIC);
        b.extend_from_slice(&IMAGE_FORMAT.to_le_bytes());
        // A handful of connections (decoded from a u32 count or the service's live ones).
        #[allow(clippy::cast_possible_truncation)]
        let count = self.conns.len() as u32;
        b.extend_from_slice(&count.to_le_bytes());
        for v in [self.seq, self.checksum, self.next_slot, self.os_version] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for c in &self.conns {
            // Pending bytes stay within the peer's u32 credit.
            #[allow(clippy::cast_possible_truncation)]
            let pending = c.pending.len() as u32;
            for v in [
                c.guest_port,
                c.host_port,
                c.peer_buf_alloc,
                c.peer_fwd_cnt,
                c.fwd_cnt,
                c.fwd_cnt_sent,
                c.tx_cnt,
                pending,
            ] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.extend_from_slice(&c.pending);
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }
}

/// One log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRecord {
    /// Request seq.
    pub seq: u64,
    /// Request value.
    pub value: u64,
    /// Checksum after the request.
    pub checksum: u64,
}

/// What the guest left on its disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskState {
    /// OS version from the stamp; 0 if there is no stamp (a disk the guest never booted on).
    pub os_version: u64,
    /// The log, from slot 0 up to the first slot without the magic.
    pub records: Vec<LogRecord>,
}

/// Reads the OS stamp and scans the log of a service guest's disk.
pub fn read_disk_state(disk: &dyn block::Disk) -> Result<DiskState> {
    let size = disk.size();
    if size < LOG_START + LOG_SLOT_SIZE {
        return Err(ServiceGuestError::InvalidArgument(format!(
            "a disk of {size} bytes has no log region"
        )));
    }
    let mut sector = [0u8; 512];
    disk.read_at(&mut sector, OS_REGION_START)?;
    let u64_at = |b: &[u8], i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    let os_version = if &sector[..8] == OS_MAGIC {
        u64_at(&sector, 8)
    } else {
        0
    };
    let slots = (size - LOG_START) / LOG_SLOT_SIZE;
    let mut records = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let per_chunk = chunk.len() as u64 / LOG_SLOT_SIZE;
    let mut slot = 0;
    'scan: while slot < slots {
        let n = per_chunk.min(slots - slot);
        // `n * LOG_SLOT_SIZE` is at most `chunk.len()` (64 KiB).
        #[allow(clippy::cast_possible_truncation)]
        let buf = &mut chunk[..(n * LOG_SLOT_SIZE) as usize];
        disk.read_at(buf, LOG_START + slot * LOG_SLOT_SIZE)?;
        #[allow(clippy::cast_possible_truncation)] // a constant below 64 KiB
        let slot_len = LOG_SLOT_SIZE as usize;
        for r in buf.chunks(slot_len) {
            if &r[..8] != LOG_MAGIC {
                break 'scan;
            }
            records.push(LogRecord {
                seq: u64_at(r, 8),
                value: u64_at(r, 16),
                checksum: u64_at(r, 24),
            });
        }
        slot += n;
    }
    Ok(DiskState {
        os_version,
        records,
    })
}

/// Checks a log against the requests a client saw acknowledged (`(seq, value)`): the records
/// are seqs 1..=n in order, their checksums chain from 0 ([`next_checksum`]), and each
/// acknowledged request is in the log once, with its value.
pub fn check_log(records: &[LogRecord], acked: &[(u64, u64)]) -> Result<()> {
    let mut checksum = 0;
    for (i, r) in records.iter().enumerate() {
        let want = i as u64 + 1;
        if r.seq != want {
            return Err(ServiceGuestError::BadLog(format!(
                "slot {i} holds seq {}, expected {want}",
                r.seq
            )));
        }
        checksum = next_checksum(checksum, r.seq, r.value);
        if r.checksum != checksum {
            return Err(ServiceGuestError::BadLog(format!(
                "seq {}: checksum {:#x}, expected {checksum:#x}",
                r.seq, r.checksum
            )));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for &(seq, value) in acked {
        if !seen.insert(seq) {
            return Err(ServiceGuestError::BadLog(format!(
                "seq {seq} acknowledged twice"
            )));
        }
        match seq
            .checked_sub(1)
            .and_then(|i| records.get(usize::try_from(i).ok()?))
        {
            None => {
                return Err(ServiceGuestError::BadLog(format!(
                    "acknowledged seq {seq} is not in the log ({} records)",
                    records.len()
                )));
            }
            Some(r) if r.value != value => {
                return Err(ServiceGuestError::BadLog(format!(
                    "seq {seq}: logged value {:#x}, acknowledged {value:#x}",
                    r.value
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Machine configuration and disk for a service guest.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServiceVmConfig;

impl ServiceVmConfig {
    /// One vCPU, `mem_mib` MiB, the `service` guest, the delta directory `disk_dir` as its
    /// writable disk (first virtio device) and a vsock device with guest CID `cid` whose host
    /// socket is `uds` (second virtio device); console to stdout (tests pass their own).
    pub fn config(
        disk_dir: &Path,
        uds: &Path,
        cid: u64,
        mem_mib: u64,
    ) -> vmm::config::MachineConfig {
        let mut cfg = vmm::config::MachineConfig::test_guest(GUEST_NAME);
        cfg.mem_mib = mem_mib;
        cfg.disks = vec![vmm::config::DiskConfig {
            path: disk_dir.to_owned(),
            read_only: false,
        }];
        cfg.vsock = Some(vmm::config::VsockConfig {
            guest_cid: cid,
            uds_path: uds.to_owned(),
        });
        cfg
    }

    /// Creates an empty disk of `size` bytes (at least [`MIN_DISK_SIZE`]) in the existing
    /// directory `dir`: a raw base `dir/base.img` and a writable delta `dir/disk` on it;
    /// returns the delta's path.
    pub fn create_disk(dir: &Path, size: u64) -> Result<PathBuf> {
        if size < MIN_DISK_SIZE {
            return Err(ServiceGuestError::InvalidArgument(format!(
                "a disk of {size} bytes; the service guest needs {MIN_DISK_SIZE}"
            )));
        }
        let base = block::Base::create(&dir.join("base.img"), size)?;
        let delta = dir.join("disk");
        drop(block::Delta::create(
            &delta,
            Arc::new(block::Layer::Base(base)),
        )?);
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_round_trips_and_refuses_corruption() {
        let img = ServiceImage {
            seq: 7,
            checksum: 0xdead_beef,
            next_slot: 7,
            os_version: 2,
            conns: vec![ImageConn {
                guest_port: 5000,
                host_port: 1 << 30,
                peer_buf_alloc: 256 << 10,
                peer_fwd_cnt: 112,
                fwd_cnt: 112,
                fwd_cnt_sent: 112,
                tx_cnt: 112,
                pending: vec![1, 2, 3],
            }],
        };
        let b = img.encode();
        assert_eq!(ServiceImage::decode(&b).unwrap(), img);
        assert_eq!(img.conns[0].rx_cnt(), 115);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(ServiceImage::decode(&c).is_err(), "byte {i} flipped");
        }
        assert!(ServiceImage::decode(&b[..b.len() - 1]).is_err());
        assert_eq!(hex_decode(&hex_encode(&b)).unwrap(), b);
        assert!(hex_decode("abc").is_none());
        assert!(hex_decode("zz").is_none());
    }

    #[test]
    fn log_check_finds_gaps_bad_chains_and_missing_acks() {
        let mut ck = 0;
        let records: Vec<LogRecord> = (1..=5)
            .map(|seq| {
                ck = next_checksum(ck, seq, seq * 10);
                LogRecord {
                    seq,
                    value: seq * 10,
                    checksum: ck,
                }
            })
            .collect();
        check_log(&records, &[(1, 10), (5, 50)]).unwrap();
        assert!(check_log(&records, &[(6, 60)]).is_err());
        assert!(check_log(&records, &[(2, 21)]).is_err());
        assert!(check_log(&records, &[(2, 20), (2, 20)]).is_err());
        assert!(check_log(&records, &[(0, 0)]).is_err());
        let mut gap = records.clone();
        gap.remove(2);
        assert!(check_log(&gap, &[]).is_err());
        let mut bad = records.clone();
        bad[3].checksum ^= 1;
        assert!(check_log(&bad, &[]).is_err());
    }
}
