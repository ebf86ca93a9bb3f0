//! Transports the agent listens on and the host connects with: TCP and AF_VSOCK, behind one trait.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::str::FromStr;
use std::time::Duration;

/// Errors creating, accepting or connecting transports.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The endpoint string is not `tcp:HOST:PORT`, `vsock:PORT` or `vsock:CID:PORT`.
    #[error("invalid endpoint {0:?} (want tcp:HOST:PORT, vsock:PORT or vsock:CID:PORT)")]
    BadEndpoint(String),
    /// Listening failed.
    #[error("cannot listen on {endpoint}")]
    Listen {
        /// The endpoint.
        endpoint: Endpoint,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Accepting a connection failed.
    #[error("accept failed")]
    Accept(#[source] io::Error),
    /// Connecting failed.
    #[error("cannot connect to {endpoint}")]
    Connect {
        /// The endpoint.
        endpoint: Endpoint,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Where an agent listens or a host connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP socket address.
    Tcp(SocketAddr),
    /// AF_VSOCK context id and port.
    Vsock {
        /// Context id (`u32::MAX` = any, 2 = host, 1 = local).
        cid: u32,
        /// Port.
        port: u32,
    },
    /// A guest port behind a VMM's vsock host socket (microvmm, Firecracker): connect to the
    /// Unix socket, send `CONNECT <port>`, read `OK <host port>`. Host side only.
    VsockUds {
        /// The vsock device's host-side Unix socket.
        path: std::path::PathBuf,
        /// The guest port.
        port: u32,
    },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp:{a}"),
            Self::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Self::VsockUds { path, port } => write!(f, "vsock-uds:{}:{port}", path.display()),
        }
    }
}

impl FromStr for Endpoint {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TransportError::BadEndpoint(s.to_string());
        if let Some(rest) = s.strip_prefix("tcp:") {
            let addr = rest
                .to_socket_addrs()
                .map_err(|_| bad())?
                .next()
                .ok_or_else(bad)?;
            return Ok(Self::Tcp(addr));
        }
        if let Some(rest) = s.strip_prefix("vsock-uds:") {
            let (path, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Self::VsockUds {
                path: path.into(),
                port: port.parse().map_err(|_| bad())?,
            });
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let parts: Vec<&str> = rest.split(':').collect();
            let num = |p: &str| p.parse::<u32>().map_err(|_| bad());
            return match parts.as_slice() {
                [port] => Ok(Self::Vsock {
                    cid: libc::VMADDR_CID_ANY,
                    port: num(port)?,
                }),
                [cid, port] => Ok(Self::Vsock {
                    cid: num(cid)?,
                    port: num(port)?,
                }),
                _ => Err(bad()),
            };
        }
        Err(bad())
    }
}

/// A bidirectional byte stream between host and agent.
pub trait Connection: Read + Write + Send + fmt::Debug {
    /// A second handle to the same stream (for a concurrent writer).
    fn try_clone_conn(&self) -> io::Result<Box<dyn Connection>>;
    /// Shuts both directions down (wakes a blocked reader).
    fn shutdown(&self) -> io::Result<()>;
    /// Sets the read timeout (`None` = block).
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Sets the write timeout (`None` = block).
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

/// A listening transport.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Waits for the next connection.
    fn accept(&self) -> Result<Box<dyn Connection>, TransportError>;
    /// Where it listens.
    fn endpoint(&self) -> Endpoint;
}

impl Connection for TcpStream {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Connection>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown(&self) -> io::Result<()> {
        TcpStream::shutdown(self, std::net::Shutdown::Both)
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, t)
    }
}

/// A Unix stream, e.g. a host-side connection that a VMM's virtio-vsock device hands out.
impl Connection for UnixStream {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Connection>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown(&self) -> io::Result<()> {
        UnixStream::shutdown(self, std::net::Shutdown::Both)
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, t)
    }
}

/// TCP listener.
#[derive(Debug)]
pub struct TcpTransport(TcpListener);

impl Transport for TcpTransport {
    fn accept(&self) -> Result<Box<dyn Connection>, TransportError> {
        let (s, _) = self.0.accept().map_err(TransportError::Accept)?;
        s.set_nodelay(true).map_err(TransportError::Accept)?;
        Ok(Box::new(s))
    }
    fn endpoint(&self) -> Endpoint {
        self.0
            .local_addr()
            .map_or(Endpoint::Vsock { cid: 0, port: 0 }, Endpoint::Tcp)
    }
}

/// An AF_VSOCK stream socket.
#[derive(Debug)]
pub struct VsockStream(File);

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Connection for VsockStream {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Connection>> {
        Ok(Box::new(VsockStream(self.0.try_clone()?)))
    }
    fn shutdown(&self) -> io::Result<()> {
        // SAFETY: shutdown(2) on an fd this object owns; no memory is passed.
        let r = unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        socket_timeout(&self.0, libc::SO_RCVTIMEO, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        socket_timeout(&self.0, libc::SO_SNDTIMEO, t)
    }
}

/// Sets SO_RCVTIMEO or SO_SNDTIMEO (`None` = block).
fn socket_timeout(fd: &impl AsRawFd, opt: libc::c_int, t: Option<Duration>) -> io::Result<()> {
    let tv = t.map_or(
        libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        |d| libc::timeval {
            tv_sec: d.as_secs() as libc::time_t,
            // A zero timeout would mean "block": round it up to 1 us.
            tv_usec: libc::suseconds_t::from(d.subsec_micros().max(u32::from(d.is_zero()))),
        },
    );
    // SAFETY: `tv` is a valid timeval that outlives the call; the length passed is its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw const tv).cast(),
            SOCKLEN_TIMEVAL,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// AF_VSOCK listener.
#[derive(Debug)]
pub struct VsockTransport {
    fd: OwnedFd,
    cid: u32,
    port: u32,
}

/// `sizeof(struct timeval)` for setsockopt(2).
#[allow(clippy::cast_possible_truncation)] // 16 bytes
const SOCKLEN_TIMEVAL: libc::socklen_t = mem::size_of::<libc::timeval>() as libc::socklen_t;

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { mem::zeroed() };
    #[allow(clippy::cast_possible_truncation)] // AF_VSOCK is 40
    let family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_family = family;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// bind(2)+listen(2) or connect(2) on a vsock socket.
fn vsock_addr_call(fd: &OwnedFd, cid: u32, port: u32, connect: bool) -> io::Result<()> {
    let a = vsock_addr(cid, port);
    #[allow(clippy::cast_possible_truncation)] // 16 bytes
    let len = mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    let p = (&raw const a).cast::<libc::sockaddr>();
    // SAFETY: `p` points to a valid sockaddr_vm of `len` bytes that outlives the calls; `fd` is open.
    let r = unsafe {
        if connect {
            libc::connect(fd.as_raw_fd(), p, len)
        } else if libc::bind(fd.as_raw_fd(), p, len) < 0 {
            -1
        } else {
            libc::listen(fd.as_raw_fd(), 16)
        }
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl VsockTransport {
    /// Binds and listens on `cid:port`.
    pub fn bind(cid: u32, port: u32) -> io::Result<Self> {
        let fd = vsock_socket()?;
        vsock_addr_call(&fd, cid, port, false)?;
        Ok(Self { fd, cid, port })
    }
}

impl Transport for VsockTransport {
    fn accept(&self) -> Result<Box<dyn Connection>, TransportError> {
        // SAFETY: accept4 on our listening fd; NULL address pointers are allowed.
        let fd = unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TransportError::Accept(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor returned by accept4 that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Box::new(VsockStream(File::from(owned))))
    }
    fn endpoint(&self) -> Endpoint {
        Endpoint::Vsock {
            cid: self.cid,
            port: self.port,
        }
    }
}

/// Listens on `ep`.
pub fn listen(ep: &Endpoint) -> Result<Box<dyn Transport>, TransportError> {
    let err = |source| TransportError::Listen {
        endpoint: ep.clone(),
        source,
    };
    match *ep {
        Endpoint::Tcp(a) => Ok(Box::new(TcpTransport(TcpListener::bind(a).map_err(err)?))),
        Endpoint::Vsock { cid, port } => {
            Ok(Box::new(VsockTransport::bind(cid, port).map_err(err)?))
        }
        Endpoint::VsockUds { .. } => Err(err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a vsock-uds endpoint is the host side of a VMM's vsock device; agents listen on vsock:PORT",
        ))),
    }
}

/// Connects to `ep` (TCP with `timeout`).
pub fn connect(ep: &Endpoint, timeout: Duration) -> Result<Box<dyn Connection>, TransportError> {
    let err = |source| TransportError::Connect {
        endpoint: ep.clone(),
        source,
    };
    match *ep {
        Endpoint::VsockUds { ref path, port } => {
            Ok(Box::new(connect_uds(path, port, timeout).map_err(err)?))
        }
        Endpoint::Tcp(a) => {
            let s = TcpStream::connect_timeout(&a, timeout).map_err(err)?;
            s.set_nodelay(true).map_err(err)?;
            Ok(Box::new(s))
        }
        Endpoint::Vsock { cid, port } => {
            let fd = vsock_socket().map_err(err)?;
            vsock_addr_call(&fd, cid, port, true).map_err(err)?;
            Ok(Box::new(VsockStream(File::from(fd))))
        }
    }
}

/// The host side of Firecracker's vsock convention: connect to `path`, send `CONNECT <port>`,
/// read the `OK <host port>` line (byte by byte: nothing after it may be consumed), within
/// `timeout`.
fn connect_uds(path: &std::path::Path, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        if line.len() > 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "over-long CONNECT answer",
            ));
        }
        s.read_exact(&mut b)?;
        line.push(b[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "vsock CONNECT {port} answered {:?}",
                String::from_utf8_lossy(&line).trim_end()
            ),
        ));
    }
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_endpoints() {
        assert_eq!(
            "tcp:127.0.0.1:7".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:7".parse().unwrap())
        );
        assert_eq!(
            "vsock:1024".parse::<Endpoint>().unwrap(),
            Endpoint::Vsock {
                cid: u32::MAX,
                port: 1024
            }
        );
        assert_eq!(
            "vsock:3:5".parse::<Endpoint>().unwrap(),
            Endpoint::Vsock { cid: 3, port: 5 }
        );
        assert_eq!(
            "vsock-uds:/run/v:m.sock:1024".parse::<Endpoint>().unwrap(),
            Endpoint::VsockUds {
                path: "/run/v:m.sock".into(),
                port: 1024
            }
        );
        for bad in [
            "",
            "udp:1",
            "tcp:nope",
            "vsock:",
            "vsock:a",
            "vsock:1:2:3",
            "vsock-uds:/x",
            "vsock-uds::5",
            "vsock-uds:/x:p",
        ] {
            assert!(
                matches!(bad.parse::<Endpoint>(), Err(TransportError::BadEndpoint(_))),
                "{bad}"
            );
        }
    }

    fn echo_once(t: &dyn Transport, ep: &Endpoint) {
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut c = t.accept().unwrap();
                let mut b = [0u8; 5];
                c.read_exact(&mut b).unwrap();
                c.write_all(&b).unwrap();
            });
            let mut c = connect(ep, Duration::from_secs(5)).unwrap();
            c.write_all(b"hello").unwrap();
            let mut b = [0u8; 5];
            c.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"hello");
        });
    }

    #[test]
    fn unix_stream_is_a_connection() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut a: Box<dyn Connection> = Box::new(a);
        let mut b: Box<dyn Connection> = Box::new(b);
        crate::protocol::write_message(&mut *a, &crate::protocol::Request::Ping).unwrap();
        let r: crate::protocol::Request = crate::protocol::read_message(&mut *b).unwrap();
        assert_eq!(r, crate::protocol::Request::Ping);
        b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        a.shutdown().unwrap();
        assert!(matches!(
            crate::protocol::read_frame(&mut *b),
            Err(crate::protocol::ProtocolError::Closed)
        ));
    }

    #[test]
    fn tcp_roundtrip() {
        let t = listen(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let ep = t.endpoint();
        echo_once(t.as_ref(), &ep);
    }

    #[test]
    fn vsock_loopback_roundtrip() {
        let port = 40000 + (std::process::id() % 20000);
        let t = match VsockTransport::bind(libc::VMADDR_CID_ANY, port) {
            Ok(t) => t,
            Err(e) => {
                println!("SKIP: AF_VSOCK not available on this host ({e})");
                return;
            }
        };
        // Local loopback needs the vsock_loopback transport; without it connect fails with ENODEV etc.
        let ep = Endpoint::Vsock {
            cid: libc::VMADDR_CID_LOCAL,
            port,
        };
        match connect(&ep, Duration::from_secs(1)) {
            Ok(_probe) => {
                drop(t.accept().unwrap());
            }
            Err(e) => {
                println!("SKIP: vsock loopback (CID 1) not available on this host ({e})");
                return;
            }
        }
        echo_once(&t, &ep);
    }
}
