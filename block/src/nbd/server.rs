//! An NBD server: fixed newstyle handshake, several named exports, one thread per connection.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::proto::{self, Command, ProtoError, Request};
use crate::{BlockError, Disk};

/// Every I/O is a multiple of this (the `block` crate's sector alignment).
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
}

/// The set of exports and the shutdown flag shared by all connections.
pub struct NbdServer {
    exports: BTreeMap<String, Arc<dyn Disk>>,
    default_export: String,
    shutdown: Arc<AtomicBool>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("exports", &self.exports.keys().collect::<Vec<_>>())
            .field("default_export", &self.default_export)
            .finish_non_exhaustive()
    }
}

/// A connected stream the server can serve and later shut down from another thread.
trait Conn: Read + Write + Send + 'static {
    fn shutdown_read(&self);
    fn clone_handle(&self) -> io::Result<Box<dyn Fn() + Send>>;
}

impl Conn for UnixStream {
    fn shutdown_read(&self) {
        let _ = self.shutdown(Shutdown::Read);
    }
    fn clone_handle(&self) -> io::Result<Box<dyn Fn() + Send>> {
        let s = self.try_clone()?;
        Ok(Box::new(move || s.shutdown_read()))
    }
}

impl Conn for TcpStream {
    fn shutdown_read(&self) {
        let _ = self.shutdown(Shutdown::Read);
    }
    fn clone_handle(&self) -> io::Result<Box<dyn Fn() + Send>> {
        let s = self.try_clone()?;
        Ok(Box::new(move || s.shutdown_read()))
    }
}

/// Replies held back at most (larger writes go straight to the socket).
const REPLY_BUFFER: usize = 64 * 1024;
/// Bytes read from the socket at once.
const READ_BUFFER: usize = 256 * 1024;

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

/// A connection thread and the way to stop its reads.
struct ConnHandle {
    thread: JoinHandle<()>,
    stop: Box<dyn Fn() + Send>,
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
    /// Builds a server over `exports` (name, export); the first one is also served under the empty name.
    pub fn new(exports: Vec<(String, Arc<dyn Disk>)>) -> Result<Self, NbdError> {
        let default_export = exports.first().ok_or(NbdError::NoExports)?.0.clone();
        Ok(Self {
            exports: exports.into_iter().collect(),
            default_export,
            shutdown: Arc::new(AtomicBool::new(false)),
        })
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
    /// lets in-flight requests finish, and flushes every export so that nothing written is lost.
    pub fn serve(self: &Arc<Self>, listener: Listener) -> Result<(), NbdError> {
        match &listener {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
        .map_err(NbdError::Listen)?;
        let mut conns: Vec<ConnHandle> = Vec::new();
        while !self.shutdown.load(Ordering::SeqCst) {
            let accepted: io::Result<Box<dyn Conn>> = match &listener {
                Listener::Unix(l) => l.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    Box::new(s) as Box<dyn Conn>
                }),
            };
            match accepted {
                Ok(stream) => conns.extend(self.spawn_conn(stream)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(NbdError::Listen(e)),
            }
            conns.retain(|c| !c.thread.is_finished());
        }
        for c in &conns {
            (c.stop)();
        }
        for c in conns {
            let _ = c.thread.join();
        }
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

    fn spawn_conn(self: &Arc<Self>, stream: Box<dyn Conn>) -> Option<ConnHandle> {
        let stop = stream.clone_handle().ok()?;
        let server = Arc::clone(self);
        let thread = std::thread::spawn(move || {
            let mut stream = stream;
            if let Err(e) = server.handle(&mut stream) {
                log_conn_error(&e);
            }
        });
        Some(ConnHandle { thread, stop })
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

fn log_conn_error(e: &NbdError) {
    // Client disconnects are normal; anything else is worth a line on stderr.
    if let NbdError::Protocol(ProtoError::Io(io)) = e
        && io.kind() == io::ErrorKind::UnexpectedEof
    {
        return;
    }
    eprintln!("nbd: connection closed: {e}");
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
    // One buffer holds a READ reply (16-byte header, then the data) or a WRITE payload.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let mut hdr = [0u8; 28];
        match s.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(ProtoError::Io(e).into()),
        }
        let req = proto::parse_request(&hdr)?;
        let len = req.length as usize;
        let error = match req.command {
            Command::Disconnect => return Ok(()),
            Command::Read => {
                if req.length > proto::MAX_REQUEST_LEN {
                    proto::EINVAL
                } else if let Some(err) = check_range(export, &req) {
                    err
                } else {
                    buf.resize(16 + len, 0);
                    match export.read_at(&mut buf[16..], req.offset) {
                        Ok(()) => {
                            let mut head = Vec::with_capacity(16);
                            proto::write_simple_reply(&mut head, 0, req.cookie)
                                .map_err(ProtoError::Io)?;
                            buf[..16].copy_from_slice(&head);
                            s.write_all(&buf).map_err(ProtoError::Io)?;
                            continue;
                        }
                        Err(e) => errno_of(&e),
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
                buf.resize(len, 0);
                s.read_exact(&mut buf).map_err(ProtoError::Io)?;
                if export.is_read_only() {
                    proto::EPERM
                } else if let Some(err) = check_range(export, &req) {
                    err
                } else {
                    status(
                        export
                            .write_at(&buf, req.offset)
                            .and_then(|()| fua(export, &req)),
                    )
                }
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
