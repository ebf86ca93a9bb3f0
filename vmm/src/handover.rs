//! Handing a VM's vsock host connections to another process along with a snapshot.
//!
//! A vsock connection's host end is a Unix socket of the VMM process, so a snapshot file alone
//! cannot carry it: [`crate::Machine::save_snapshot_handover`] takes the connections out of the
//! paused VM (their states go into the snapshot), and [`VsockHandover::send`] passes their
//! sockets over a Unix socket (`SCM_RIGHTS`) to the process that restores the snapshot with
//! [`crate::Machine::restore_snapshot_handover`]. The host peers keep their sockets and see no
//! reset; the guest sees no transport reset.
//!
//! Wire format on the Unix stream: a 12-byte header, magic `MVMMHOV1` then the socket count
//! (u32 LE), then messages of one byte `F` each carrying at most [`FDS_PER_MESSAGE`] sockets.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MAGIC: &[u8; 8] = b"MVMMHOV1";
/// Sockets per message (below the kernel's `SCM_MAX_FD` of 253).
pub const FDS_PER_MESSAGE: usize = 200;
/// At most this many sockets are accepted (the vsock device's connection limit).
pub const MAX_FDS: usize = devices::virtio::vsock::muxer::MAX_CONNECTIONS;

/// Errors of a vsock handover.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The Unix socket failed.
    #[error("vsock handover socket I/O failed")]
    Io(#[from] std::io::Error),
    /// The peer did not speak the handover format.
    #[error("vsock handover: {0}")]
    Protocol(String),
    /// The snapshot and the handed-over sockets do not match.
    #[error("vsock handover does not match the snapshot: {0}")]
    Mismatch(String),
}

/// The host sockets of a VM's vsock connections, in the order of the snapshot's connection
/// list.
#[derive(Debug, Default)]
pub struct VsockHandover {
    pub(crate) fds: Vec<OwnedFd>,
}

impl VsockHandover {
    /// Number of sockets.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// True if there is none.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Sends the sockets over `sock`; this process's copies are closed when `self` is dropped.
    pub fn send(&self, sock: &mut UnixStream) -> Result<(), HandoverError> {
        let mut header = [0u8; 12];
        header[..8].copy_from_slice(MAGIC);
        #[allow(clippy::cast_possible_truncation)] // a few descriptors per device
        let count = self.fds.len() as u32;
        header[8..].copy_from_slice(&count.to_le_bytes());
        sock.write_all(&header)?;
        for chunk in self.fds.chunks(FDS_PER_MESSAGE) {
            let raw: Vec<RawFd> = chunk.iter().map(AsRawFd::as_raw_fd).collect();
            let byte: &[u8] = b"F";
            let sent = sock
                .send_with_fds(&[byte], &raw)
                .map_err(std::io::Error::from)?;
            if sent != 1 {
                return Err(HandoverError::Protocol("short send".into()));
            }
        }
        Ok(())
    }

    /// Receives sockets sent by [`VsockHandover::send`].
    pub fn receive(sock: &mut UnixStream) -> Result<Self, HandoverError> {
        let mut header = [0u8; 12];
        sock.read_exact(&mut header)?;
        if &header[..8] != MAGIC {
            return Err(HandoverError::Protocol("bad magic".into()));
        }
        let count = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        if count > MAX_FDS {
            return Err(HandoverError::Protocol(format!(
                "{count} sockets (at most {MAX_FDS})"
            )));
        }
        let mut fds = Vec::with_capacity(count);
        while fds.len() < count {
            let want = (count - fds.len()).min(FDS_PER_MESSAGE);
            let mut byte = [0u8; 1];
            let mut raw = vec![-1 as RawFd; want];
            let (n, got) = recv_fds(sock, &mut byte, &mut raw)?;
            // Own whatever arrived before checking, so nothing leaks on an error.
            for &fd in &raw[..got] {
                // SAFETY: `recvmsg` just installed `fd` in this process and nothing else
                // owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            if n != 1 || byte[0] != b'F' || got == 0 {
                return Err(HandoverError::Protocol(format!(
                    "expected a message with sockets, got {n} bytes and {got} sockets"
                )));
            }
        }
        Ok(Self { fds })
    }
}

/// Connects to the Unix socket at `path`, retrying for up to `wait` while it is missing or not
/// yet listening (its file appears at `bind`, a moment before `listen`).
pub fn connect_retrying(
    path: &std::path::Path,
    wait: std::time::Duration,
) -> std::io::Result<UnixStream> {
    let end = std::time::Instant::now() + wait;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if std::time::Instant::now() >= end => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{}: {e}", path.display()),
                ));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    }
}

/// The host side of a vsock connection to guest port `port` through the device's Unix socket
/// `uds` (Firecracker's convention): waits up to `wait` for the socket to appear (the device
/// binds it when the guest driver activates it), sends `CONNECT <port>`, reads the `OK` line.
/// The stream gets `wait` as its read timeout.
pub fn vsock_connect(
    uds: &std::path::Path,
    port: u32,
    wait: std::time::Duration,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = connect_retrying(uds, wait)?;
    s.set_read_timeout(Some(wait))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: nothing after the line may be consumed.
    let mut line = Vec::new();
    let mut r = BufReader::with_capacity(1, s.try_clone()?);
    r.read_until(b'\n', &mut line)?;
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::other(format!(
            "vsock connect to port {port} answered {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    Ok(s)
}

/// One `recvmsg` of a byte and up to `fds.len()` descriptors: (bytes, descriptors).
fn recv_fds(
    sock: &UnixStream,
    byte: &mut [u8; 1],
    fds: &mut [RawFd],
) -> std::io::Result<(usize, usize)> {
    let mut iov = [libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    }];
    // SAFETY: the iovec points at `byte`, writable for its 1 byte for the whole call.
    unsafe { sock.recv_with_fds(&mut iov, fds) }.map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    // test code: values are small and fixed
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

    use super::*;

    #[test]
    fn sockets_cross_a_unix_socket_and_garbage_is_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        // More sockets than one message carries.
        let pairs: Vec<(UnixStream, UnixStream)> = (0..FDS_PER_MESSAGE + 3)
            .map(|_| UnixStream::pair().unwrap())
            .collect();
        let h = VsockHandover {
            fds: pairs
                .iter()
                .map(|(x, _)| OwnedFd::from(x.try_clone().unwrap()))
                .collect(),
        };
        h.send(&mut a).unwrap();
        let got = VsockHandover::receive(&mut b).unwrap();
        assert_eq!(got.len(), pairs.len());
        // Each received socket is the same connection: what is written comes out at its peer.
        for (i, (fd, (_, peer))) in got.fds.into_iter().zip(&pairs).enumerate() {
            let mut s = UnixStream::from(fd);
            s.write_all(&(i as u32).to_le_bytes()).unwrap();
            let mut back = [0u8; 4];
            (&*peer).read_exact(&mut back).unwrap();
            assert_eq!(u32::from_le_bytes(back), i as u32);
        }
        // Garbage, or a count past the limit, is a typed error.
        a.write_all(b"not a handover header").unwrap();
        assert!(matches!(
            VsockHandover::receive(&mut b),
            Err(HandoverError::Protocol(_))
        ));
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&100_000u32.to_le_bytes());
        a.write_all(&header).unwrap();
        assert!(matches!(
            VsockHandover::receive(&mut b),
            Err(HandoverError::Protocol(_))
        ));
        // A header promising sockets, then a message without any.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&2u32.to_le_bytes());
        a.write_all(&header).unwrap();
        a.write_all(b"F").unwrap();
        assert!(matches!(
            VsockHandover::receive(&mut b),
            Err(HandoverError::Protocol(_))
        ));
    }
}
