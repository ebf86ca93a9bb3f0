//! Host side of virtio-vsock on Unix sockets, following Firecracker's convention:
//! - host-initiated: connect to `uds_path`, send `CONNECT <port>\n`, receive `OK <hostport>\n`
//!   once the guest accepted;
//! - guest-initiated: a guest connection to port P reaches the listener at `<uds_path>_<P>`.
//!
//! The muxer is a plain state machine with no queue or thread knowledge: the device feeds it guest
//! packets and asks it for packets to deliver, which makes it testable on its own.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::packet::{
    HOST_CID, Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer this side advertises per connection (bytes buffered toward the host socket).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// At most this many connections at once; further requests are refused with RST.
pub const MAX_CONNECTIONS: usize = 256;
/// At most this many host sockets may be waiting to send their `CONNECT` line.
pub const MAX_PENDING_HOST: usize = 64;
/// Longest accepted `CONNECT <port>\n` line.
const MAX_LINE: usize = 32;
/// First port number handed out to host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// How long the guest has to answer our SHUTDOWN (sent when the host side closed) with an
/// RST; after that the connection is reset and its host socket closed (a guest that never
/// answers must not keep host sockets open). Checked whenever the worker wakes, at least once
/// a second, so the reset comes 2 to 3 s after the SHUTDOWN (the clock runs while the VM is
/// paused too: its host side is gone already).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of the vsock host side.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// Handed-over connections do not fit: a different number of sockets than connections, a
    /// duplicate or out-of-range port pair, a buffer over `BUF_ALLOC`, or too many connections.
    #[error("invalid vsock connection handover: {0}")]
    BadHandover(String),
    /// A handed-over socket could not be set up.
    #[error("handed-over vsock socket")]
    HandoverSocket(#[source] io::Error),
    /// Binding the host socket failed.
    #[error("cannot listen on vsock host socket {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host asked; waiting for the guest's RESPONSE.
    HostConnecting,
    /// Data flows.
    Established,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    state: State,
    /// Bytes from the guest not yet written to the host socket.
    to_host: Vec<u8>,
    /// Bytes received from the guest in total (wrapping).
    rx_cnt: u32,
    /// Bytes written to the host socket in total (wrapping): our fwd_cnt.
    fwd_cnt: u32,
    /// fwd_cnt last told to the guest.
    fwd_cnt_sent: u32,
    /// Bytes sent to the guest in total (wrapping).
    tx_cnt: u32,
    /// Guest's receive buffer and consumed count.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The host socket reached EOF (we told the guest SHUTDOWN).
    host_eof: bool,
    /// The guest will send no more.
    guest_send_done: bool,
    /// When the connection is reset if the guest has not answered our SHUTDOWN by then.
    close_deadline: Option<Instant>,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            to_host: Vec::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_eof: false,
            guest_send_done: false,
            close_deadline: None,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            match self.stream.write(&self.to_host) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    // Credit counters are modulo 2^32 (virtio-vsock); `n` is a buffer length.
                    #[allow(clippy::cast_possible_truncation)]
                    let n = n as u32;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.guest_send_done {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }
}

/// (host-side port, guest-side port).
type Key = (u32, u32);

/// One connection's state without its host socket, for a handover to another process.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnState {
    /// Host-side port.
    pub host_port: u32,
    /// Guest-side port.
    pub guest_port: u32,
    /// Data flows (false: the host asked and the guest has not answered yet).
    pub established: bool,
    /// Bytes from the guest not yet written to the host socket.
    pub to_host: Vec<u8>,
    /// Byte counters (wrapping), as in the virtio-vsock credit scheme.
    pub rx_cnt: u32,
    /// Bytes written to the host socket (our fwd_cnt).
    pub fwd_cnt: u32,
    /// fwd_cnt last told to the guest.
    pub fwd_cnt_sent: u32,
    /// Bytes sent to the guest.
    pub tx_cnt: u32,
    /// The guest's receive buffer.
    pub peer_buf_alloc: u32,
    /// The guest's consumed count.
    pub peer_fwd_cnt: u32,
    /// The host socket reached EOF.
    pub host_eof: bool,
    /// The guest will send no more.
    pub guest_send_done: bool,
}

impl MuxerState {
    /// Checks a handed-over state (untrusted: it comes from a snapshot file) against `fds`
    /// sockets: one per connection, no port pair twice, at most [`MAX_CONNECTIONS`], buffers
    /// within [`BUF_ALLOC`], control packets of header size.
    pub fn validate(&self, fds: usize) -> Result<(), MuxerError> {
        let bad = |m: String| Err(MuxerError::BadHandover(m));
        if self.conns.len() != fds {
            return bad(format!(
                "{} connections but {fds} sockets",
                self.conns.len()
            ));
        }
        if self.conns.len() > MAX_CONNECTIONS {
            return bad(format!("more than {MAX_CONNECTIONS} connections"));
        }
        let mut keys = std::collections::BTreeSet::new();
        for c in &self.conns {
            let key = (c.host_port, c.guest_port);
            if !keys.insert(key) {
                return bad(format!("port pair {key:?} twice"));
            }
            if c.to_host.len() > BUF_ALLOC as usize {
                return bad(format!(
                    "{} bytes buffered toward the host",
                    c.to_host.len()
                ));
            }
        }
        if let Some(h) = self
            .control
            .iter()
            .find(|h| h.len() != super::packet::HDR_LEN)
        {
            return bad(format!("a control packet of {} bytes", h.len()));
        }
        Ok(())
    }
}

/// The connections of a muxer taken out for a handover: their states (to serialize) and, in
/// the same order, their host sockets (to pass to the new owner).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct MuxerState {
    /// Live connections.
    pub conns: Vec<ConnState>,
    /// Control packets not yet delivered to the guest (encoded headers).
    pub control: Vec<Vec<u8>>,
    /// Next host-side port to hand out.
    pub next_host_port: u32,
}

impl crate::persist::Versioned for MuxerState {
    const KIND: &'static str = "vsock-connections";
    const VERSION: u32 = 1;
}

/// A vsock device's host listener in transit between two devices of one process
/// ([`Muxer::take_listener`], [`Muxer::adopt_listener`]).
#[derive(Debug)]
pub struct HostListener {
    listener: UnixListener,
    path: PathBuf,
    socket_id: Option<(u64, u64)>,
    pending: Vec<(UnixStream, Vec<u8>)>,
}

impl HostListener {
    /// The socket path it listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The vsock host side: a listener for host-initiated connections and the live connections.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    /// `None` once the connections were exported (the VM's host side moved elsewhere).
    listener: Option<UnixListener>,
    /// (device, inode) of the socket file this muxer bound, so that only it is unlinked.
    socket_id: Option<(u64, u64)>,
    pending_host: Vec<(UnixStream, Vec<u8>)>,
    conns: BTreeMap<Key, Conn>,
    control: VecDeque<Header>,
    next_host_port: u32,
    /// Round-robin cursor over connections for fair reading.
    cursor: Option<Key>,
}

impl Drop for Muxer {
    fn drop(&mut self) {
        self.unlink_socket();
    }
}

impl Muxer {
    /// Listens on `uds_path`. A stale socket file there (nobody listening) is replaced; any
    /// other file, and a socket in use, is refused ([`MuxerError::Bind`]).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        let bind = || -> io::Result<UnixListener> {
            free_socket_path(uds_path)?;
            let l = UnixListener::bind(uds_path)?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let listener = bind().map_err(|source| MuxerError::Bind {
            path: uds_path.to_owned(),
            source,
        })?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            socket_id: file_id(uds_path),
            listener: Some(listener),
            pending_host: Vec::new(),
            conns: BTreeMap::new(),
            control: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
            cursor: None,
        })
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Takes every live connection out (no RST is sent: they continue elsewhere) with the
    /// undelivered control packets; host sockets that have not sent their `CONNECT` line yet
    /// are closed. Returns the states and, in the same order, the host sockets.
    pub fn export(&mut self) -> (MuxerState, Vec<OwnedFd>) {
        self.pending_host.clear();
        self.cursor = None;
        let mut fds = Vec::with_capacity(self.conns.len());
        let conns = std::mem::take(&mut self.conns)
            .into_iter()
            .map(|((host_port, guest_port), c)| {
                fds.push(OwnedFd::from(c.stream));
                ConnState {
                    host_port,
                    guest_port,
                    established: c.state == State::Established,
                    to_host: c.to_host,
                    rx_cnt: c.rx_cnt,
                    fwd_cnt: c.fwd_cnt,
                    fwd_cnt_sent: c.fwd_cnt_sent,
                    tx_cnt: c.tx_cnt,
                    peer_buf_alloc: c.peer_buf_alloc,
                    peer_fwd_cnt: c.peer_fwd_cnt,
                    host_eof: c.host_eof,
                    guest_send_done: c.guest_send_done,
                }
            })
            .collect();
        let control = self
            .control
            .drain(..)
            .map(|h| h.encode().to_vec())
            .collect();
        let state = MuxerState {
            conns,
            control,
            next_host_port: self.next_host_port,
        };
        (state, fds)
    }

    /// Like [`Muxer::export`], but only the connections whose guest-side port is in
    /// `guest_ports` (and the undelivered control packets addressed to those ports): the
    /// connections of one guest service, moved to another VM while the others stay.
    pub fn export_ports(&mut self, guest_ports: &[u32]) -> (MuxerState, Vec<OwnedFd>) {
        let keys: Vec<Key> = self
            .conns
            .keys()
            .filter(|k| guest_ports.contains(&k.1))
            .copied()
            .collect();
        let mut rest = std::mem::take(&mut self.conns);
        for k in &keys {
            if let Some(c) = rest.remove(k) {
                self.conns.insert(*k, c);
            }
        }
        let (keep, moved): (VecDeque<Header>, VecDeque<Header>) = self
            .control
            .drain(..)
            .partition(|h| !guest_ports.contains(&h.dst_port));
        self.control = moved;
        let (state, fds) = self.export();
        self.conns = rest;
        self.control = keep;
        (state, fds)
    }

    /// Takes the host listener out (with host connections still sending their `CONNECT`
    /// line), so that another in-process device answers on this socket path from now on.
    /// `None` if it was already taken or stopped.
    pub fn take_listener(&mut self) -> Option<HostListener> {
        let listener = self.listener.take()?;
        Some(HostListener {
            listener,
            path: self.uds_path.clone(),
            socket_id: self.socket_id.take(),
            pending: std::mem::take(&mut self.pending_host),
        })
    }

    /// Answers on another device's listener (from [`Muxer::take_listener`]) from now on:
    /// host connections to its path reach this device's guest, and guest connections to port
    /// P go to `<its path>_<P>`. This device's own listener is closed and its socket file
    /// removed (if still ours); returns nothing to undo: give the listener back with
    /// [`Muxer::take_listener`] on this device and `adopt_listener` on the other.
    pub fn adopt_listener(&mut self, l: HostListener) {
        self.listener = None;
        self.pending_host.clear();
        self.unlink_socket();
        self.listener = Some(l.listener);
        self.uds_path = l.path;
        self.socket_id = l.socket_id;
        self.pending_host = l.pending;
    }

    /// The path of the host socket this device answers on.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Takes over connections exported by [`Muxer::export`] (possibly in another process):
    /// `fds` are their host sockets, in order. Checked before anything changes.
    pub fn import(&mut self, state: MuxerState, fds: Vec<OwnedFd>) -> Result<(), MuxerError> {
        state.validate(fds.len())?;
        if self.conns.len() + state.conns.len() > MAX_CONNECTIONS {
            return Err(MuxerError::BadHandover(format!(
                "more than {MAX_CONNECTIONS} connections"
            )));
        }
        if let Some(c) = state
            .conns
            .iter()
            .find(|c| self.conns.contains_key(&(c.host_port, c.guest_port)))
        {
            return Err(MuxerError::BadHandover(format!(
                "port pair {:?} is already connected",
                (c.host_port, c.guest_port)
            )));
        }
        let control: Vec<Header> = state
            .control
            .iter()
            .filter_map(|h| <[u8; super::packet::HDR_LEN]>::try_from(h.as_slice()).ok())
            .map(|b| Header::decode(&b))
            // Addressed to this guest (a clone's CID differs from its source's).
            .map(|h| Header {
                dst_cid: self.guest_cid,
                ..h
            })
            .collect();
        let mut streams = Vec::with_capacity(fds.len());
        for fd in fds {
            let s = UnixStream::from(fd);
            s.set_nonblocking(true)
                .map_err(MuxerError::HandoverSocket)?;
            streams.push(s);
        }
        let mut established = Vec::new();
        for (c, stream) in state.conns.into_iter().zip(streams) {
            if c.established {
                established.push((c.host_port, c.guest_port));
            }
            let mut conn = Conn::new(
                stream,
                if c.established {
                    State::Established
                } else {
                    State::HostConnecting
                },
            );
            conn.to_host = c.to_host;
            conn.rx_cnt = c.rx_cnt;
            conn.fwd_cnt = c.fwd_cnt;
            conn.fwd_cnt_sent = c.fwd_cnt_sent;
            conn.tx_cnt = c.tx_cnt;
            conn.peer_buf_alloc = c.peer_buf_alloc;
            conn.peer_fwd_cnt = c.peer_fwd_cnt;
            conn.host_eof = c.host_eof;
            conn.guest_send_done = c.guest_send_done;
            conn.close_deadline = c.host_eof.then(|| Instant::now() + CLOSE_TIMEOUT);
            self.conns.insert((c.host_port, c.guest_port), conn);
        }
        self.control.extend(control);
        // Ask the guest for its credit on each connection: a guest that took its side of the
        // connections over (a restored process, a cloned VM) learns this way that the device
        // knows them now, and its answer reopens its receive window at once.
        for key in established {
            self.send_control(key, OP_CREDIT_REQUEST, 0);
        }
        if state.next_host_port >= FIRST_HOST_PORT {
            self.next_host_port = state.next_host_port;
        }
        Ok(())
    }

    fn header(&self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let conn = self.conns.get(&key);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: conn.map_or(0, |c| c.fwd_cnt),
        }
    }

    fn send_control(&mut self, key: Key, op: u16, flags: u32) {
        let h = self.header(key, op, flags, 0);
        if let Some(c) = self.conns.get_mut(&key) {
            c.fwd_cnt_sent = c.fwd_cnt;
        }
        self.control.push_back(h);
    }

    fn reset(&mut self, key: Key) {
        self.conns.remove(&key);
        self.send_control(key, OP_RST, 0);
    }

    /// Handles one validated packet from the guest.
    pub fn handle_guest_packet(&mut self, h: &Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        if h.op == OP_REQUEST {
            self.guest_connect(key, h);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                self.send_control(key, OP_RST, 0);
            }
            return;
        };
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if conn.state == State::HostConnecting => {
                conn.state = State::Established;
                let line = format!("OK {}\n", key.0);
                // The host socket is fresh and empty: a short line fits its buffer.
                if conn.stream.write_all(line.as_bytes()).is_err() {
                    self.reset(key);
                }
            }
            OP_RW if conn.state == State::Established => {
                let buffered = conn.rx_cnt.wrapping_sub(conn.fwd_cnt) as usize + payload.len();
                if buffered > BUF_ALLOC as usize {
                    // The guest ignored our credit: drop the connection rather than buffer more.
                    self.reset(key);
                    return;
                }
                // Credit counters are modulo 2^32; a payload comes from one u32-sized buffer.
                #[allow(clippy::cast_possible_truncation)]
                let n = payload.len() as u32;
                conn.rx_cnt = conn.rx_cnt.wrapping_add(n);
                conn.to_host.extend_from_slice(payload);
                if conn.flush_to_host().is_err() {
                    self.reset(key);
                    return;
                }
                self.maybe_credit_update(key);
            }
            OP_SHUTDOWN => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_send_done = true;
                }
                let both = h.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV;
                let flushed = conn.flush_to_host().is_ok() && conn.to_host.is_empty();
                if both || !flushed {
                    self.reset(key);
                }
            }
            OP_RST => {
                self.conns.remove(&key);
            }
            OP_CREDIT_REQUEST => self.send_control(key, OP_CREDIT_UPDATE, 0),
            OP_CREDIT_UPDATE => {}
            _ => self.reset(key),
        }
    }

    fn maybe_credit_update(&mut self, key: Key) {
        if let Some(c) = self.conns.get(&key)
            && c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent) >= BUF_ALLOC / 4
        {
            self.send_control(key, OP_CREDIT_UPDATE, 0);
        }
    }

    fn guest_connect(&mut self, key: Key, h: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.send_control(key, OP_RST, 0);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), key.0);
        let stream = UnixStream::connect(path).and_then(|s| s.set_nonblocking(true).map(|()| s));
        match stream {
            Ok(s) => {
                let mut c = Conn::new(s, State::Established);
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                self.conns.insert(key, c);
                self.send_control(key, OP_RESPONSE, 0);
            }
            Err(_) => self.send_control(key, OP_RST, 0),
        }
    }

    /// Accepts host connections, reads their `CONNECT` lines, flushes buffered data to host
    /// sockets and notices host-side EOF. Call after the host fds polled readable/writable.
    pub fn service_host(&mut self) {
        while let Some(listener) = &self.listener {
            match listener.accept() {
                Ok((s, _)) => {
                    if self.pending_host.len() < MAX_PENDING_HOST && s.set_nonblocking(true).is_ok()
                    {
                        self.pending_host.push((s, Vec::new()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let pending = std::mem::take(&mut self.pending_host);
        for (mut s, mut line) in pending {
            let mut byte = [0u8; 1];
            let done = loop {
                match s.read(&mut byte) {
                    Ok(0) => break Some(None),
                    Ok(_) if byte[0] == b'\n' => break Some(parse_connect(&line)),
                    Ok(_) if line.len() >= MAX_LINE => break Some(None),
                    Ok(_) => line.push(byte[0]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break Some(None),
                }
            };
            match done {
                None => self.pending_host.push((s, line)),
                Some(Some(port)) if self.conns.len() < MAX_CONNECTIONS => {
                    let host_port = self.alloc_host_port();
                    let key = (host_port, port);
                    self.conns.insert(key, Conn::new(s, State::HostConnecting));
                    self.send_control(key, OP_REQUEST, 0);
                }
                Some(_) => {} // malformed line, EOF or too many connections: drop the socket
            }
        }
        self.expire(Instant::now());
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            if c.flush_to_host().is_err() {
                self.reset(key);
                continue;
            }
            self.maybe_credit_update(key);
        }
    }

    /// Resets the connections whose guest has not answered our SHUTDOWN by `now`.
    fn expire(&mut self, now: Instant) {
        let due: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.close_deadline.is_some_and(|d| now >= d))
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            self.reset(key);
        }
    }

    fn alloc_host_port(&mut self) -> u32 {
        loop {
            let p = self.next_host_port;
            self.next_host_port = self
                .next_host_port
                .checked_add(1)
                .unwrap_or(FIRST_HOST_PORT);
            if !self.conns.keys().any(|k| k.0 == p) {
                return p;
            }
        }
    }

    /// Whether a control packet is waiting (deliverable regardless of data credit).
    pub fn has_control(&self) -> bool {
        !self.control.is_empty()
    }

    /// The next packet for the guest, with at most `max_payload` bytes of data, or `None`.
    /// Data is read from host sockets only within the guest's credit.
    pub fn next_rx(&mut self, max_payload: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, Vec::new()));
        }
        let keys: Vec<Key> = match self.cursor {
            Some(c) => self
                .conns
                .range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded))
                .chain(self.conns.range(..=c))
                .map(|(k, _)| *k)
                .collect(),
            None => self.conns.keys().copied().collect(),
        };
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            if c.state != State::Established || c.host_eof {
                continue;
            }
            let want = (c.peer_credit() as usize).min(max_payload);
            if want == 0 {
                continue;
            }
            let mut buf = vec![0u8; want];
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    c.host_eof = true;
                    c.close_deadline = Some(Instant::now() + CLOSE_TIMEOUT);
                    self.cursor = Some(key);
                    let h = self.header(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0);
                    return Some((h, Vec::new()));
                }
                Ok(n) => {
                    buf.truncate(n);
                    // `n` is at most `want`, below the peer's u32 credit.
                    #[allow(clippy::cast_possible_truncation)]
                    let n32 = n as u32;
                    c.tx_cnt = c.tx_cnt.wrapping_add(n32);
                    c.fwd_cnt_sent = c.fwd_cnt;
                    self.cursor = Some(key);
                    let h = self.header(key, OP_RW, 0, n32);
                    return Some((h, buf));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.reset(key);
                    return self.control.pop_front().map(|h| (h, Vec::new()));
                }
            }
        }
        None
    }

    /// The host fds to wait on: the listener and pending sockets (readable), connections that
    /// can send to the guest (readable, when `want_data`), connections with buffered data
    /// toward the host (writable).
    pub fn poll_fds(&self, want_data: bool) -> Vec<(RawFd, i16)> {
        let mut fds: Vec<(RawFd, i16)> = self
            .listener
            .iter()
            .map(|l| (l.as_raw_fd(), libc::POLLIN))
            .collect();
        fds.extend(
            self.pending_host
                .iter()
                .map(|(s, _)| (s.as_raw_fd(), libc::POLLIN)),
        );
        for c in self.conns.values() {
            let mut ev = 0;
            if want_data && c.state == State::Established && !c.host_eof && c.peer_credit() > 0 {
                ev |= libc::POLLIN;
            }
            if !c.to_host.is_empty() {
                ev |= libc::POLLOUT;
            }
            if ev != 0 {
                fds.push((c.stream.as_raw_fd(), ev));
            }
        }
        fds
    }
}

/// (device, inode) of the file at `path`.
/// Checks, before a VM is built, that its vsock device will be able to listen at `path` (the
/// device binds it only when the guest driver activates it, too late for the error to reach
/// whoever started the VM): frees the path as [`Muxer::new`] does, binds it once, and removes
/// that socket again.
pub fn check_host_socket(path: &Path) -> Result<(), MuxerError> {
    let probe = || -> io::Result<()> {
        free_socket_path(path)?;
        let l = UnixListener::bind(path)?;
        let ours = file_id(path);
        drop(l);
        if ours.is_some() && file_id(path) == ours {
            std::fs::remove_file(path)?;
        }
        Ok(())
    };
    probe().map_err(|source| MuxerError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Makes `path` free for a listening socket: nothing there, or a stale socket file (nobody
/// listens on it), which is removed. Refused: a file of any other type (it is not ours to
/// delete) and a socket something listens on (another VM's, say).
fn free_socket_path(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let kind = match std::fs::symlink_metadata(path) {
        Ok(m) => m.file_type(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !kind.is_socket() {
        let what = if kind.is_file() {
            "a regular file"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_symlink() {
            "a symbolic link"
        } else {
            "a special file"
        };
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("the path is {what}, not a socket; refusing to replace it"),
        ));
    }
    if socket_is_live(path)? {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "a process is listening on this socket",
        ));
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// True if something accepts connections on the Unix socket at `path`; false if the socket is
/// stale (connection refused) or gone. The connect does not block (a listener that does not
/// accept, its backlog full, counts as live).
fn socket_is_live(path: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        #[allow(clippy::cast_possible_truncation)] // AF_UNIX is 1
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    let fd = nonblocking_unix_socket()?;
    match connect_unix(&fd, &addr) {
        Ok(()) => Ok(true),
        Err(e) => match e.raw_os_error() {
            Some(libc::ECONNREFUSED | libc::ENOENT) => Ok(false),
            Some(libc::EAGAIN | libc::EINPROGRESS) => Ok(true),
            _ => Err(e),
        },
    }
}

/// A new non-blocking, close-on-exec Unix stream socket.
fn nonblocking_unix_socket() -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket() takes only integers; its result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor just created that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `connect(2)` of `fd` to `addr`.
fn connect_unix(fd: &OwnedFd, addr: &libc::sockaddr_un) -> io::Result<()> {
    #[allow(clippy::cast_possible_truncation)] // 110 bytes
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket; `addr` points to an initialized `sockaddr_un` of `len`
    // bytes that lives across the call and is only read.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Muxer {
    /// Stops taking host connections and removes the socket file (if still ours): after a
    /// handover, new host connections belong to the process that took the VM over.
    pub fn stop_listening(&mut self) {
        self.listener = None;
        self.pending_host.clear();
        self.unlink_socket();
    }

    /// Removes the listening socket's file, unless it is no longer ours (another process may
    /// have bound the same path since, e.g. the one that took the connections over).
    fn unlink_socket(&mut self) {
        if let Some(id) = self.socket_id.take()
            && file_id(&self.uds_path) == Some(id)
        {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    s.strip_prefix("CONNECT ")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::super::packet::MAX_PAYLOAD;
    use super::*;
    use std::time::Duration;

    const CID: u64 = 3;

    fn guest_packet(op: u16, host_port: u32, guest_port: u32, len: u32, fwd: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: fwd,
        }
    }

    /// The next RW packet for the guest (waiting for host data to arrive).
    fn next_data(m: &mut Muxer) -> (Header, Vec<u8>) {
        for _ in 0..2000 {
            match m.next_rx(MAX_PAYLOAD) {
                Some((h, p)) if h.op == OP_RW => return (h, p),
                Some(_) => {}
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        panic!("no data for the guest");
    }

    /// The next packet of any kind for the guest (waiting for host events).
    fn next_packet(m: &mut Muxer) -> Header {
        for _ in 0..2000 {
            m.service_host();
            match m.next_rx(MAX_PAYLOAD) {
                Some((h, _)) => return h,
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        panic!("no packet for the guest");
    }

    #[test]
    fn only_a_stale_socket_at_the_path_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file is refused and left as it was.
        let file = dir.path().join("precious");
        std::fs::write(&file, b"keep me").unwrap();
        let err = Muxer::new(CID, &file).unwrap_err();
        assert!(matches!(err, MuxerError::Bind { .. }), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        // So is a directory.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(Muxer::new(CID, &sub).is_err());
        assert!(sub.is_dir());
        // A socket somebody listens on is in use: refused, still listening.
        let live = dir.path().join("live.sock");
        let listener = UnixListener::bind(&live).unwrap();
        assert!(Muxer::new(CID, &live).is_err());
        assert!(UnixStream::connect(&live).is_ok());
        // A stale socket (its listener gone, the file left behind) is replaced.
        drop(listener);
        let m = Muxer::new(CID, &live).unwrap();
        assert!(UnixStream::connect(&live).is_ok());
        drop(m);
    }

    #[test]
    fn a_muxer_removes_only_its_own_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let mut a = Muxer::new(CID, &path).unwrap();
        // Another process took the VM over and bound the same path.
        a.stop_listening();
        assert!(!path.exists());
        let _theirs = UnixListener::bind(&path).unwrap();
        drop(a);
        assert!(path.exists(), "the new owner's socket file is left alone");
        // A muxer that still owns its file removes it.
        std::fs::remove_file(&path).unwrap();
        drop(Muxer::new(CID, &path).unwrap());
        assert!(!path.exists());
    }

    #[test]
    fn exported_connections_continue_in_another_muxer() {
        let dir = tempfile::tempdir().unwrap();
        let (a_path, b_path) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
        // A host service the guest connects to (port 700).
        let service = UnixListener::bind(format!("{}_700", a_path.display())).unwrap();
        let mut a = Muxer::new(CID, &a_path).unwrap();
        a.handle_guest_packet(&guest_packet(OP_REQUEST, 700, 5000, 0, 0), &[]);
        let (mut host, _) = service.accept().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(a.next_rx(MAX_PAYLOAD).unwrap().0.op, OP_RESPONSE);
        // Traffic both ways before the handover.
        a.handle_guest_packet(&guest_packet(OP_RW, 700, 5000, 5, 0), b"hello");
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        host.write_all(b"abc").unwrap();
        let (h, p) = next_data(&mut a);
        assert_eq!((h.len, p.as_slice()), (3, &b"abc"[..]));

        let (state, fds) = a.export();
        assert_eq!(a.connection_count(), 0);
        assert_eq!(state.conns.len(), 1);
        assert_eq!((state.conns[0].tx_cnt, state.conns[0].fwd_cnt), (3, 5));
        // A wrong number of sockets is refused and changes nothing.
        let mut b = Muxer::new(CID, &b_path).unwrap();
        assert!(matches!(
            b.import(state.clone(), Vec::new()),
            Err(MuxerError::BadHandover(_))
        ));
        assert_eq!(b.connection_count(), 0);
        // Through serialization, as in a snapshot.
        let state: MuxerState =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        b.import(state, fds).unwrap();
        drop(a);
        // The same host socket, the same counters: the stream goes on.
        host.write_all(b"defg").unwrap();
        let (h, p) = next_data(&mut b);
        assert_eq!((h.src_port, h.dst_port), (700, 5000));
        assert_eq!(p, b"defg");
        assert_eq!(h.fwd_cnt, 5, "fwd_cnt carried over");
        b.handle_guest_packet(&guest_packet(OP_RW, 700, 5000, 5, 7), b"world");
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"world");
        // A duplicate import of the same ports is refused.
        let (state, fds) = b.export();
        let dup = state.clone();
        b.import(state, fds).unwrap();
        assert!(matches!(
            b.import(dup, vec![OwnedFd::from(UnixStream::pair().unwrap().0)]),
            Err(MuxerError::BadHandover(_))
        ));
    }

    /// Host-initiated connection to guest `port` through `path`; the muxer sees its REQUEST
    /// and the guest answers RESPONSE. Returns the host stream and the connection's host port.
    fn host_connect(m: &mut Muxer, path: &Path, port: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        for _ in 0..2000 {
            m.service_host();
            if let Some((h, _)) = m.next_rx(MAX_PAYLOAD) {
                assert_eq!((h.op, h.dst_port), (OP_REQUEST, port));
                let mut r = guest_packet(OP_RESPONSE, h.src_port, port, 0, 0);
                r.src_port = port;
                r.dst_port = h.src_port;
                m.handle_guest_packet(&r, &[]);
                m.service_host();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut line = [0u8; 3];
                s.read_exact(&mut line).unwrap();
                assert_eq!(&line, b"OK ");
                let mut rest = Vec::new();
                let mut b = [0u8; 1];
                while b[0] != b'\n' {
                    s.read_exact(&mut b).unwrap();
                    rest.push(b[0]);
                }
                return (s, h.src_port);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("no REQUEST for the guest");
    }

    #[test]
    fn a_guest_that_never_answers_our_shutdown_is_reset_after_the_close_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let mut m = Muxer::new(CID, &path).unwrap();
        let (host, host_port) = host_connect(&mut m, &path, 52);
        drop(host);
        // The host side closed: the guest is told SHUTDOWN and has CLOSE_TIMEOUT to answer.
        let t0 = Instant::now();
        let h = next_packet(&mut m);
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_SHUTDOWN, host_port, 52));
        m.expire(t0);
        assert_eq!(m.connection_count(), 1, "reset before the timeout");
        assert!(m.next_rx(MAX_PAYLOAD).is_none());
        m.expire(Instant::now() + CLOSE_TIMEOUT);
        assert_eq!(m.connection_count(), 0);
        let (h, _) = m.next_rx(MAX_PAYLOAD).unwrap();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, host_port, 52));
        // A guest that answers in time is not reset twice.
        let (host, _) = host_connect(&mut m, &path, 53);
        drop(host);
        let h = next_packet(&mut m);
        assert_eq!(h.op, OP_SHUTDOWN);
        m.handle_guest_packet(&guest_packet(OP_RST, h.src_port, 53, 0, 0), &[]);
        assert_eq!(m.connection_count(), 0);
        m.expire(Instant::now() + CLOSE_TIMEOUT);
        assert!(m.next_rx(MAX_PAYLOAD).is_none());
    }

    #[test]
    fn one_service_moves_to_another_muxer_with_the_listener() {
        let dir = tempfile::tempdir().unwrap();
        let (a_path, b_path) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
        let mut a = Muxer::new(CID, &a_path).unwrap();
        let mut b = Muxer::new(CID + 1, &b_path).unwrap();
        let (mut svc, svc_port) = host_connect(&mut a, &a_path, 5000);
        let (_agent, _) = host_connect(&mut a, &a_path, 1100);
        assert_eq!(a.connection_count(), 2);
        // A control packet for each port is pending; only the service's moves.
        a.send_control((svc_port, 5000), OP_CREDIT_REQUEST, 0);
        let (state, fds) = a.export_ports(&[5000]);
        assert_eq!(state.conns.len(), 1);
        assert_eq!(state.conns[0].guest_port, 5000);
        assert_eq!(state.control.len(), 1);
        assert_eq!(a.connection_count(), 1, "the agent connection stays");
        let l = a.take_listener().unwrap();
        assert_eq!(l.path(), a_path.as_path());
        assert!(a.take_listener().is_none());
        b.import(state, fds).unwrap();
        b.adopt_listener(l);
        assert!(!b_path.exists(), "b's own socket file is gone");
        assert_eq!(b.uds_path(), a_path.as_path());
        // The moved connection continues on b (its control packet first).
        let (h, _) = b.next_rx(MAX_PAYLOAD).unwrap();
        assert_eq!((h.op, h.dst_cid), (OP_CREDIT_REQUEST, CID + 1));
        svc.write_all(b"req").unwrap();
        let (h, p) = next_data(&mut b);
        assert_eq!(
            (h.src_port, h.dst_port, p.as_slice()),
            (svc_port, 5000, &b"req"[..])
        );
        // New host connections to a's path now reach b's guest.
        let (_new, _) = host_connect(&mut b, &a_path, 5000);
        assert_eq!(b.connection_count(), 2);
        // a no longer owns the socket file: dropping it leaves the file to b.
        drop(a);
        assert!(a_path.exists());
        drop(b);
        assert!(!a_path.exists());
    }

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT x"), None);
        assert_eq!(parse_connect(b"connect 52"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
