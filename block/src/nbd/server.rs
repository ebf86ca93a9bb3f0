//! An NBD server: fixed newstyle handshake, several named exports, one thread per connection.
//!
//! Bounds (see [`NbdLimits`]): at most `max_connections` clients are served at once (others
//! are accepted and closed at once); each connection holds at most
//! [`CONNECTION_BUFFER_BOUND`] bytes of buffers whatever its requests (READ data and WRITE
//! payloads are streamed [`IO_CHUNK`] bytes at a time), plus its thread's stack. A failing
//! `accept` (e.g. `EMFILE`) is retried after a back-off while the connected clients are
//! served on; a connection thread that cannot be started refuses that client. At stop, the
//! connections get `shutdown_grace` to finish; then their sockets are shut down (a client
//! that stopped reading no longer holds the stop), and the exports are flushed.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::proto::{self, Command, ProtoError, Request};
use crate::{BlockError, Disk};

/// Every I/O is a multiple of this (the `block` crate's sector alignment).
#[allow(clippy::cast_possible_truncation)] // SECTOR_SIZE is 512
const BLOCK_SIZE: u32 = crate::SECTOR_SIZE as u32;

/// Errors of the NBD server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Binding or accepting on the listening socket failed.
    #[error("NBD listener failed")]
    Listen(#[source] io::Error),
    /// A connection broke the protocol; that connection is closed.
    #[error("NBD protocol error")]
    Protocol(#[from] ProtoError),
    /// The client asked for an export that does not exist (NBD_OPT_EXPORT_NAME).
    #[error("no NBD export named {0:?}")]
    UnknownExport(String),
    /// Flushing an export at shutdown failed.
    #[error("flushing export {name:?} at shutdown failed")]
    ShutdownFlush {
        /// Export name.
        name: String,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// No export was configured.
    #[error("an NBD server needs at least one export")]
    NoExports,
    /// Reading the export failed after part of the READ reply was sent: a simple reply cannot
    /// carry the error any more, so the connection is closed.
    #[error("reading the export at offset {offset} failed in the middle of a reply")]
    ReadFailed {
        /// Offset of the chunk that failed.
        offset: u64,
        /// Cause.
        #[source]
        source: BlockError,
    },
}

/// Default [`NbdLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// READ data and WRITE payloads go through a buffer of this size, however large the request.
pub const IO_CHUNK: usize = 256 * 1024;
/// Replies held back at most (larger writes go straight to the socket).
const REPLY_BUFFER: usize = 64 * 1024;
/// Bytes read from the socket at once.
const READ_BUFFER: usize = 256 * 1024;
/// Most buffer memory one connection holds (request and reply buffers, the I/O chunk and a
/// reply header, a handshake option); the delta layer may add a chunk-sized read-modify-write
/// buffer while a WRITE that is not 4 KiB aligned is applied.
pub const CONNECTION_BUFFER_BOUND: usize =
    READ_BUFFER + REPLY_BUFFER + 16 + IO_CHUNK + proto::MAX_OPTION_LEN as usize;
/// First and longest wait before `accept` is tried again after it failed.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// At stop, how long connection threads get to end once their sockets are shut down.
const STOP_AFTER_SHUTDOWN: Duration = Duration::from_secs(2);

/// Limits of a server ([`NbdServer::with_limits`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdLimits {
    /// Most clients served at once; a client beyond it is accepted and closed at once.
    pub max_connections: usize,
    /// At stop, how long connections may take to finish the request they are in and send its
    /// reply before their sockets are shut down.
    pub shutdown_grace: Duration,
    /// A reply the client does not take within this time (it stopped reading) closes its
    /// connection; `None` waits forever.
    pub write_timeout: Option<Duration>,
    /// Stack size of a connection thread.
    pub thread_stack: usize,
}

impl Default for NbdLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_grace: Duration::from_secs(5),
            write_timeout: Some(Duration::from_secs(60)),
            thread_stack: 2 << 20,
        }
    }
}

/// The set of exports and the shutdown flag shared by all connections.
pub struct NbdServer {
    exports: BTreeMap<String, Arc<dyn Disk>>,
    default_export: String,
    shutdown: Arc<AtomicBool>,
    limits: NbdLimits,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("exports", &self.exports.keys().collect::<Vec<_>>())
            .field("default_export", &self.default_export)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A connected stream the server can serve and shut down from another thread.
trait Conn: Read + Write + Send + 'static {
    /// A second handle on the socket, to shut it down from the accepting thread.
    fn control(&self) -> io::Result<Box<dyn ConnControl>>;
    fn set_send_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

/// Shuts a connection's socket down (waking its thread from a blocked read or send).
trait ConnControl: Send {
    fn close(&self, how: Shutdown);
}

impl Conn for UnixStream {
    fn control(&self) -> io::Result<Box<dyn ConnControl>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_send_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
}

impl ConnControl for UnixStream {
    fn close(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
}

impl Conn for TcpStream {
    fn control(&self) -> io::Result<Box<dyn ConnControl>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_send_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
}

impl ConnControl for TcpStream {
    fn close(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
}

/// A connection buffered both ways. Requests are read in large chunks (a pipelining client's
/// requests arrive several per read), and replies are held until the next read would have to
/// wait on the socket, so replies to pipelined requests leave in one send. Nothing is held
/// while the server waits for the client.
struct Buffered<'a, S: ?Sized> {
    inner: &'a mut S,
    rbuf: Box<[u8]>,
    rpos: usize,
    rlen: usize,
    wbuf: Vec<u8>,
}

impl<'a, S: Read + Write + ?Sized> Buffered<'a, S> {
    fn new(inner: &'a mut S) -> Self {
        Self {
            inner,
            rbuf: vec![0; READ_BUFFER].into_boxed_slice(),
            rpos: 0,
            rlen: 0,
            wbuf: Vec::with_capacity(REPLY_BUFFER),
        }
    }

    fn send_replies(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.inner.write_all(&self.wbuf)?;
            self.wbuf.clear();
        }
        Ok(())
    }
}

impl<S: Read + Write + ?Sized> Read for Buffered<'_, S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.rpos == self.rlen {
            // About to wait on the client: everything answered so far must be on its way.
            self.send_replies()?;
            self.inner.flush()?;
            if out.len() >= self.rbuf.len() {
                return self.inner.read(out);
            }
            self.rlen = self.inner.read(&mut self.rbuf)?;
            self.rpos = 0;
        }
        let n = out.len().min(self.rlen - self.rpos);
        out[..n].copy_from_slice(&self.rbuf[self.rpos..self.rpos + n]);
        self.rpos += n;
        Ok(n)
    }
}

impl<S: Read + Write + ?Sized> Write for Buffered<'_, S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.wbuf.len() + data.len() > REPLY_BUFFER {
            self.send_replies()?;
            if data.len() > REPLY_BUFFER {
                return self.inner.write(data);
            }
        }
        self.wbuf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_replies()?;
        self.inner.flush()
    }
}

/// A connection thread and its socket.
struct ConnHandle {
    thread: JoinHandle<()>,
    socket: Box<dyn ConnControl>,
}

/// A listening socket of either family.
#[derive(Debug)]
pub enum Listener {
    /// A Unix domain socket.
    Unix(UnixListener),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl NbdServer {
    /// Builds a server over `exports` (name, export); the first one is also served under the
    /// empty name. Default [`NbdLimits`].
    pub fn new(exports: Vec<(String, Arc<dyn Disk>)>) -> Result<Self, NbdError> {
        Self::with_limits(exports, NbdLimits::default())
    }

    /// Like [`NbdServer::new`], with the given limits.
    pub fn with_limits(
        exports: Vec<(String, Arc<dyn Disk>)>,
        limits: NbdLimits,
    ) -> Result<Self, NbdError> {
        let default_export = exports.first().ok_or(NbdError::NoExports)?.0.clone();
        Ok(Self {
            exports: exports.into_iter().collect(),
            default_export,
            shutdown: Arc::new(AtomicBool::new(false)),
            limits,
        })
    }

    /// The server's limits.
    pub fn limits(&self) -> &NbdLimits {
        &self.limits
    }

    /// The flag that stops [`NbdServer::serve`] when set (e.g. from a SIGTERM handler).
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.shutdown)
    }

    fn export(&self, name: &str) -> Option<(&str, &Arc<dyn Disk>)> {
        let name = if name.is_empty() {
            self.default_export.as_str()
        } else {
            name
        };
        self.exports
            .get_key_value(name)
            .map(|(k, v)| (k.as_str(), v))
    }

    /// Accepts connections until the shutdown flag is set, then stops reading new requests,
    /// lets in-flight requests finish (for up to [`NbdLimits::shutdown_grace`], then shuts the
    /// sockets down), and flushes every export so that nothing acknowledged is lost. A failed
    /// `accept` is retried after a back-off; the connected clients are served meanwhile.
    pub fn serve(self: &Arc<Self>, listener: Listener) -> Result<(), NbdError> {
        match &listener {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
        .map_err(NbdError::Listen)?;
        let mut conns: Vec<ConnHandle> = Vec::new();
        // While `accept` fails: the next wait before trying again.
        let mut backoff: Option<Duration> = None;
        while !self.shutdown.load(Ordering::SeqCst) {
            let accepted: io::Result<Box<dyn Conn>> = match &listener {
                Listener::Unix(l) => l.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    Box::new(s) as Box<dyn Conn>
                }),
            };
            conns.retain(|c| !c.thread.is_finished());
            match accepted {
                Ok(stream) => {
                    if backoff.take().is_some() {
                        log(format_args!("accepting connections again"));
                    }
                    if conns.len() >= self.limits.max_connections {
                        log(format_args!(
                            "{} connections already: client refused",
                            conns.len()
                        ));
                        drop(stream);
                    } else {
                        conns.extend(self.spawn_conn(stream));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors or memory, or a client gone before it was accepted:
                    // the waiting clients wait a little, the connected ones are served on.
                    let wait = match backoff {
                        None => {
                            log(format_args!("accept failed ({e}); retrying"));
                            ACCEPT_BACKOFF.0
                        }
                        Some(w) => (w * 2).min(ACCEPT_BACKOFF.1),
                    };
                    backoff = Some(wait);
                    self.sleep_unless_stopped(wait);
                }
            }
        }
        self.stop_connections(conns);
        for (name, export) in &self.exports {
            if !export.is_read_only() {
                export.flush().map_err(|source| NbdError::ShutdownFlush {
                    name: name.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    fn sleep_unless_stopped(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.shutdown.load(Ordering::SeqCst) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10).min(d));
        }
    }

    /// Stops every connection in bounded time: reads are shut down (a connection ends after
    /// the request it is in); after the grace period the sockets are shut down both ways, which
    /// fails a send blocked on a client that stopped reading. A thread still busy after that is
    /// inside the export (a slow disk) and is left to end on its own.
    fn stop_connections(&self, mut conns: Vec<ConnHandle>) {
        for c in &conns {
            c.socket.close(Shutdown::Read);
        }
        join_finished(&mut conns, Instant::now() + self.limits.shutdown_grace);
        if conns.is_empty() {
            return;
        }
        log(format_args!(
            "{} connection(s) still busy after {:?}: closing their sockets",
            conns.len(),
            self.limits.shutdown_grace
        ));
        for c in &conns {
            c.socket.close(Shutdown::Both);
        }
        join_finished(&mut conns, Instant::now() + STOP_AFTER_SHUTDOWN);
        if !conns.is_empty() {
            log(format_args!(
                "{} connection(s) still inside an export; not waiting for them",
                conns.len()
            ));
        }
    }

    /// Starts the thread of a new connection; `None` (the client refused, its socket closed)
    /// if that is not possible.
    fn spawn_conn(self: &Arc<Self>, stream: Box<dyn Conn>) -> Option<ConnHandle> {
        let socket = match stream.control() {
            Ok(s) => s,
            Err(e) => {
                log(format_args!(
                    "cannot set up a connection ({e}); client refused"
                ));
                return None;
            }
        };
        if let Err(e) = stream.set_send_timeout(self.limits.write_timeout) {
            log(format_args!(
                "cannot set a send timeout ({e}); client refused"
            ));
            return None;
        }
        let server = Arc::clone(self);
        let spawned = sandbox::spawn(
            sandbox::ThreadKind::NbdConnection,
            std::thread::Builder::new()
                .name("nbd-conn".into())
                .stack_size(self.limits.thread_stack),
            move || {
                let mut stream = stream;
                if let Err(e) = server.handle(&mut stream) {
                    log_conn_error(&e);
                }
            },
        );
        match spawned {
            Ok(thread) => Some(ConnHandle { thread, socket }),
            Err(e) => {
                // The closure, and with it the stream, is dropped: the client sees EOF.
                log(format_args!(
                    "cannot start a connection thread ({e}); client refused"
                ));
                None
            }
        }
    }

    /// Serves one connection: handshake, then transmission until disconnect or EOF.
    pub fn handle<S: Read + Write + ?Sized>(&self, stream: &mut S) -> Result<(), NbdError> {
        let mut conn = Buffered::new(stream);
        let served = match self.handshake(&mut conn)? {
            Some(export) => transmission(export.as_ref(), &mut conn),
            None => Ok(()),
        };
        let flushed = conn.flush().map_err(|e| ProtoError::Io(e).into());
        served.and(flushed)
    }

    /// Returns the export chosen by the client, or `None` if the client aborted.
    fn handshake<S: Read + Write + ?Sized>(
        &self,
        s: &mut S,
    ) -> Result<Option<Arc<dyn Disk>>, NbdError> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
        hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        hello
            .extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello).map_err(ProtoError::Io)?;
        let client_flags = proto::read_u32(s).map_err(ProtoError::Io)?;
        if client_flags & proto::CLIENT_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ProtoError::NotFixedNewstyle(client_flags).into());
        }
        let no_zeroes = client_flags & proto::CLIENT_FLAG_NO_ZEROES != 0;
        loop {
            let opt = proto::read_option(s)?;
            match opt.code {
                proto::OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&opt.data).into_owned();
                    let Some((_, export)) = self.export(&name) else {
                        // This option has no error reply: the spec says to close.
                        return Err(NbdError::UnknownExport(name));
                    };
                    let mut reply = Vec::with_capacity(134);
                    reply.extend_from_slice(&export.size().to_be_bytes());
                    reply.extend_from_slice(&transmission_flags(export.as_ref()).to_be_bytes());
                    if !no_zeroes {
                        reply.extend_from_slice(&[0u8; 124]);
                    }
                    s.write_all(&reply).map_err(ProtoError::Io)?;
                    return Ok(Some(Arc::clone(export)));
                }
                proto::OPT_ABORT => {
                    let _ = proto::write_option_reply(s, opt.code, proto::REP_ACK, &[]);
                    return Ok(None);
                }
                proto::OPT_LIST => {
                    if !opt.data.is_empty() {
                        reply_err(s, opt.code, proto::REP_ERR_INVALID)?;
                        continue;
                    }
                    for name in self.exports.keys() {
                        let mut d = Vec::with_capacity(4 + name.len());
                        // Export names come from the host's configuration, far below 4 GiB.
                        #[allow(clippy::cast_possible_truncation)]
                        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        d.extend_from_slice(name.as_bytes());
                        proto::write_option_reply(s, opt.code, proto::REP_SERVER, &d)
                            .map_err(ProtoError::Io)?;
                    }
                    proto::write_option_reply(s, opt.code, proto::REP_ACK, &[])
                        .map_err(ProtoError::Io)?;
                }
                proto::OPT_INFO | proto::OPT_GO => {
                    let Some((name, infos)) = proto::parse_info_request(&opt.data) else {
                        reply_err(s, opt.code, proto::REP_ERR_INVALID)?;
                        continue;
                    };
                    let Some((_, export)) = self.export(&name) else {
                        reply_err(s, opt.code, proto::REP_ERR_UNKNOWN)?;
                        continue;
                    };
                    let mut info = Vec::with_capacity(12);
                    info.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
                    info.extend_from_slice(&export.size().to_be_bytes());
                    info.extend_from_slice(&transmission_flags(export.as_ref()).to_be_bytes());
                    proto::write_option_reply(s, opt.code, proto::REP_INFO, &info)
                        .map_err(ProtoError::Io)?;
                    if infos.contains(&proto::INFO_BLOCK_SIZE) {
                        let bs = BLOCK_SIZE;
                        let mut d = Vec::with_capacity(14);
                        d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
                        d.extend_from_slice(&bs.to_be_bytes()); // minimum
                        d.extend_from_slice(&bs.max(4096).to_be_bytes()); // preferred
                        d.extend_from_slice(&proto::MAX_REQUEST_LEN.to_be_bytes()); // maximum
                        proto::write_option_reply(s, opt.code, proto::REP_INFO, &d)
                            .map_err(ProtoError::Io)?;
                    }
                    proto::write_option_reply(s, opt.code, proto::REP_ACK, &[])
                        .map_err(ProtoError::Io)?;
                    if opt.code == proto::OPT_GO {
                        return Ok(Some(Arc::clone(export)));
                    }
                }
                other => reply_err(s, other, proto::REP_ERR_UNSUP)?,
            }
        }
    }
}

/// Joins the threads that end before `deadline`; those still running stay in `conns`.
fn join_finished(conns: &mut Vec<ConnHandle>, deadline: Instant) {
    loop {
        let (done, busy): (Vec<_>, Vec<_>) = std::mem::take(conns)
            .into_iter()
            .partition(|c| c.thread.is_finished());
        for c in done {
            let _ = c.thread.join();
        }
        *conns = busy;
        if conns.is_empty() || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A line on stderr (dropped if stderr is gone: logging never fails the server).
fn log(msg: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr(), "nbd: {msg}");
}

fn log_conn_error(e: &NbdError) {
    // Client disconnects are normal; anything else is worth a line on stderr.
    if let NbdError::Protocol(ProtoError::Io(io)) = e
        && matches!(
            io.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe
        )
    {
        return;
    }
    let mut line = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        line += &format!(": {cause}");
        source = cause.source();
    }
    log(format_args!("connection closed: {line}"));
}

fn reply_err<S: Write + ?Sized>(s: &mut S, option: u32, err: u32) -> Result<(), NbdError> {
    proto::write_option_reply(s, option, err, &[]).map_err(|e| ProtoError::Io(e).into())
}

fn transmission_flags(export: &dyn Disk) -> u16 {
    let mut f = proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH | proto::TFLAG_CAN_MULTI_CONN;
    if export.is_read_only() {
        f |= proto::TFLAG_READ_ONLY;
    } else {
        f |= proto::TFLAG_SEND_FUA | proto::TFLAG_SEND_TRIM | proto::TFLAG_SEND_WRITE_ZEROES;
    }
    f
}

/// Maps a disk error to an NBD error number.
fn errno_of(e: &BlockError) -> u32 {
    match e {
        BlockError::OutOfRange { .. } | BlockError::Unaligned { .. } => proto::EINVAL,
        BlockError::ReadOnly { .. } => proto::EPERM,
        _ => proto::EIO,
    }
}

/// Checks a request's range against the export; returns the NBD error to send, if any.
fn check_range(export: &dyn Disk, req: &Request) -> Option<u32> {
    let bs = u64::from(BLOCK_SIZE);
    let end = req.offset.checked_add(u64::from(req.length));
    match end {
        None => Some(proto::EINVAL),
        Some(end) if end > export.size() => Some(if req.command == Command::Write {
            proto::ENOSPC
        } else {
            proto::EINVAL
        }),
        Some(_) if !req.offset.is_multiple_of(bs) || !u64::from(req.length).is_multiple_of(bs) => {
            Some(proto::EINVAL)
        }
        Some(_) => None,
    }
}

fn transmission<S: Read + Write + ?Sized>(export: &dyn Disk, s: &mut S) -> Result<(), NbdError> {
    // READ data and WRITE payloads pass through this buffer (a reply header, then one chunk),
    // allocated at the first request that needs it and never grown.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let mut hdr = [0u8; 28];
        match s.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(ProtoError::Io(e).into()),
        }
        let req = proto::parse_request(&hdr)?;
        let error = match req.command {
            Command::Disconnect => return Ok(()),
            Command::Read => {
                if req.length > proto::MAX_REQUEST_LEN {
                    proto::EINVAL
                } else if let Some(err) = check_range(export, &req) {
                    err
                } else {
                    match read_reply(export, s, &req, chunk_buffer(&mut buf))? {
                        None => continue,
                        Some(err) => err,
                    }
                }
            }
            Command::Write => {
                if req.length > proto::MAX_REQUEST_LEN {
                    // The payload cannot be skipped safely: answer, then close the connection.
                    proto::write_simple_reply(s, proto::EINVAL, req.cookie)
                        .map_err(ProtoError::Io)?;
                    return Ok(());
                }
                let refused = if export.is_read_only() {
                    Some(proto::EPERM)
                } else {
                    check_range(export, &req)
                };
                write_request(export, s, &req, refused, chunk_buffer(&mut buf))?
            }
            Command::Flush => status(export.flush()),
            Command::Trim | Command::WriteZeroes => {
                if export.is_read_only() {
                    proto::EPERM
                } else if let Some(err) = check_range(export, &req) {
                    err
                } else {
                    let len64 = u64::from(req.length);
                    let r = if req.command == Command::Trim {
                        export.discard(req.offset, len64)
                    } else {
                        export.write_zeroes(req.offset, len64)
                    };
                    status(r.and_then(|()| fua(export, &req)))
                }
            }
            Command::Other(_) => proto::EINVAL,
        };
        proto::write_simple_reply(s, error, req.cookie).map_err(ProtoError::Io)?;
    }
}

/// The connection's I/O buffer: a 16-byte reply header, then [`IO_CHUNK`] bytes.
fn chunk_buffer(buf: &mut Vec<u8>) -> &mut [u8] {
    if buf.is_empty() {
        buf.resize(16 + IO_CHUNK, 0);
    }
    buf
}

/// Length of the chunk of a request at `offset` with `left` bytes to go: at most
/// [`IO_CHUNK`], ending on a 4 KiB boundary when it can (so that a delta does not
/// read-modify-write the blocks at chunk edges).
fn chunk_len(offset: u64, left: u64) -> usize {
    const ALIGN: u64 = 4096;
    let end = offset.saturating_add(IO_CHUNK as u64) / ALIGN * ALIGN;
    let n = if end > offset {
        end - offset
    } else {
        IO_CHUNK as u64
    };
    crate::sys::clamp_len(n.min(left), IO_CHUNK)
}

/// Answers a READ, streaming the data a chunk at a time behind the reply header. Returns the
/// error to answer with if the first chunk cannot be read (nothing sent yet); a later failure
/// cannot be told in a simple reply and ends the connection ([`NbdError::ReadFailed`]).
fn read_reply<S: Write + ?Sized>(
    export: &dyn Disk,
    s: &mut S,
    req: &Request,
    buf: &mut [u8],
) -> Result<Option<u32>, NbdError> {
    let len = u64::from(req.length);
    let mut pos = 0u64;
    loop {
        let n = chunk_len(req.offset + pos, len - pos);
        let (head, data) = buf.split_at_mut(16);
        if let Err(e) = export.read_at(&mut data[..n], req.offset + pos) {
            if pos == 0 {
                return Ok(Some(errno_of(&e)));
            }
            return Err(NbdError::ReadFailed {
                offset: req.offset + pos,
                source: e,
            });
        }
        let out = if pos == 0 {
            // The header leaves with the first chunk.
            let mut h = Vec::with_capacity(16);
            proto::write_simple_reply(&mut h, 0, req.cookie).map_err(ProtoError::Io)?;
            head.copy_from_slice(&h);
            &buf[..16 + n]
        } else {
            &buf[16..16 + n]
        };
        s.write_all(out).map_err(ProtoError::Io)?;
        pos += n as u64;
        if pos >= len {
            return Ok(None);
        }
    }
}

/// Takes a WRITE's payload a chunk at a time, writing each to the export unless the request is
/// `refused` (or an earlier chunk failed): the payload is always read whole, so the connection
/// stays in step. Returns the reply's error number.
fn write_request<S: Read + ?Sized>(
    export: &dyn Disk,
    s: &mut S,
    req: &Request,
    refused: Option<u32>,
    buf: &mut [u8],
) -> Result<u32, NbdError> {
    let len = u64::from(req.length);
    let mut error = refused;
    let mut pos = 0u64;
    while pos < len {
        let n = chunk_len(req.offset.saturating_add(pos), len - pos);
        let data = &mut buf[16..16 + n];
        s.read_exact(data).map_err(ProtoError::Io)?;
        if error.is_none()
            && let Err(e) = export.write_at(data, req.offset + pos)
        {
            error = Some(errno_of(&e));
        }
        pos += n as u64;
    }
    Ok(match error {
        Some(e) => e,
        None => status(fua(export, req)),
    })
}

/// Honours the FUA flag: the request is durable before it is acknowledged.
fn fua(export: &dyn Disk, req: &Request) -> Result<(), BlockError> {
    if req.flags & proto::CMD_FLAG_FUA != 0 {
        export.flush()
    } else {
        Ok(())
    }
}

fn status(r: Result<(), BlockError>) -> u32 {
    r.err().map_or(0, |e| errno_of(&e))
}
