//! Test support for hosts of guests (feature `test-utils`): the Java demo service's command
//! line, and a packet watch that counts a service's TCP segments on a network device and
//! records those that carried RST.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// Counts TCP segments of the service port seen on a network device (AF_PACKET capture) and
/// records the ports of those that carried RST.
/// The command line of the Java demo service (`/opt/demo/EchoLog` in the full guest image)
/// on `port`, appending each request to `log`.
pub fn echo_log_argv(port: u16, log: &str) -> Vec<String> {
    let port = port.to_string();
    [
        "java",
        "-XX:-UsePerfData",
        "-Xmx64m",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-cp",
        "/opt/demo",
        "EchoLog",
        &port,
        log,
    ]
    .map(String::from)
    .to_vec()
}

/// A packet watch that counts TCP segments and records RSTs.
#[derive(Debug)]
pub struct RstWatch {
    segments: Arc<AtomicU64>,
    resets: Arc<Mutex<Vec<(u16, u16)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Opens an AF_PACKET socket on `ifname` with a 200 ms receive timeout.
fn packet_socket(ifname: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index > 0, "no interface {ifname}");
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: the pointers refer to live locals of the stated sizes; `fd` is open.
    let ok = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        ) == 0
            && libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            ) == 0
    };
    assert!(
        ok,
        "bind/setsockopt AF_PACKET: {}",
        std::io::Error::last_os_error()
    );
    fd
}

/// (source port, destination port, TCP flags) of an Ethernet/IPv4/TCP frame touching `port`.
fn tcp_flags_for_port(f: &[u8], port: u16) -> Option<(u16, u16, u8)> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[23] != 6 {
        return None;
    }
    let t = 14 + usize::from(f[14] & 0x0f) * 4;
    let tcp = f.get(t..t + 14)?;
    let (sport, dport) = (
        u16::from_be_bytes([tcp[0], tcp[1]]),
        u16::from_be_bytes([tcp[2], tcp[3]]),
    );
    (sport == port || dport == port).then_some((sport, dport, tcp[13]))
}

impl RstWatch {
    /// Starts capturing on `ifname` (in the calling thread's network namespace) for TCP port `port`.
    pub fn start(ifname: &str, port: u16) -> Self {
        let fd = packet_socket(ifname);
        let (segments, resets, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicBool::new(false)),
        );
        let (sg, rs, st) = (
            Arc::clone(&segments),
            Arc::clone(&resets),
            Arc::clone(&stop),
        );
        let thread = thread::spawn(move || {
            let mut f = File::from(fd);
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::SeqCst) {
                let Ok(n) = f.read(&mut buf) else { continue };
                if let Some((sport, dport, flags)) = tcp_flags_for_port(&buf[..n], port) {
                    sg.fetch_add(1, Ordering::SeqCst);
                    if flags & 0x04 != 0 {
                        rs.lock().unwrap().push((sport, dport));
                    }
                }
            }
        });
        Self {
            segments,
            resets,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops; returns the segment count and the (source, destination) ports of RST segments.
    pub fn stop(mut self) -> (u64, Vec<(u16, u16)>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        (
            self.segments.load(Ordering::SeqCst),
            self.resets.lock().unwrap().clone(),
        )
    }
}
