//! Test helpers: a minimal virtio driver that lays out a split queue in test memory and talks to
//! a transport through its registers, as a guest driver would.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use block::{BlockError, Disk};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::mmio::MmioTransport;
use super::{GuestMemory, Interrupt, VirtioDevice};

/// Descriptor flag: the chain continues.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;

/// Size of the test guest memory.
pub const MEM_SIZE: usize = 32 << 20;
/// Guest address of queue 0's descriptor table.
pub const DESC: u64 = 0x1000;
/// Guest address of queue 0's available ring.
pub const AVAIL: u64 = 0x2000;
/// Guest address of queue 0's used ring.
pub const USED: u64 = 0x3000;
/// Guest address where test buffers start.
pub const DATA: u64 = 0x10000;
/// Queue size used by the test driver.
pub const QSIZE: u16 = 16;

/// Test guest memory of `MEM_SIZE` bytes at address 0.
pub fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Writes descriptor `i` of the table at `base`: `addr`, `len`, `flags`, `next`.
pub fn write_desc(
    mem: &GuestMemory,
    base: u64,
    i: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(base + u64::from(i) * 16))
        .expect("descriptor table in guest memory");
}

/// Makes `heads` the available ring at [`AVAIL`] (from slot 0), and its index their count.
pub fn publish(mem: &GuestMemory, heads: &[u16]) {
    for (i, h) in heads.iter().enumerate() {
        mem.write_obj(*h, GuestAddress(AVAIL + 4 + i as u64 * 2))
            .expect("available ring in guest memory");
    }
    let n = u16::try_from(heads.len()).expect("at most 65535 heads");
    mem.write_obj(n, GuestAddress(AVAIL + 2))
        .expect("available ring in guest memory");
}

/// A ready queue 0 at the driver's ring addresses, for calling a device's queue processing
/// directly (without a transport or worker thread).
pub fn queue() -> virtio_queue::Queue {
    use virtio_queue::QueueT;
    let mut q = virtio_queue::Queue::new(QSIZE).expect("QSIZE is a valid queue size");
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    q
}

/// A test driver: plays the guest side of one transport, with up to three queues.
#[derive(Debug)]
pub struct Driver {
    /// The guest memory the queues live in.
    pub mem: GuestMemory,
    /// The transport under test.
    pub transport: MmioTransport,
    /// Per queue: next free descriptor slot.
    next_desc: [u16; 3],
    /// Per queue: next available ring index.
    avail_idx: [u16; 3],
    /// Per queue: next used ring index to read.
    used_seen: [u16; 3],
}

impl Driver {
    /// A driver for `device` behind a fresh MMIO transport on test memory.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = memory();
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let transport = MmioTransport::new(device, mem.clone(), irq).unwrap();
        Self {
            mem,
            transport,
            next_desc: [0; 3],
            avail_idx: [0; 3],
            used_seen: [0; 3],
        }
    }

    /// Reads the 32-bit transport register at `off`.
    pub fn rd(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes `v` to the 32-bit transport register at `off`.
    pub fn wr(&mut self, off: u64, v: u32) {
        self.transport.write(off, &v.to_le_bytes());
    }

    /// Runs the virtio 1.x initialisation of section 3.1.1, accepting `features`,
    /// with every queue of the device at DESC/AVAIL/USED + queue * 0x100 offsets... (one queue per
    /// 0x4000 bytes); returns the final status.
    pub fn init(&mut self, features: u64, queues: u32) -> u32 {
        self.wr(0x70, 0);
        self.wr(0x70, 1);
        self.wr(0x70, 1 | 2);
        self.wr(0x24, 0);
        self.wr(0x20, features as u32);
        self.wr(0x24, 1);
        self.wr(0x20, (features >> 32) as u32);
        self.wr(0x70, 1 | 2 | 8);
        if self.rd(0x70) & 8 == 0 {
            return self.rd(0x70);
        }
        for q in 0..queues {
            let base = u64::from(q) * 0x4000;
            self.wr(0x30, q);
            assert!(self.rd(0x34) >= u32::from(QSIZE));
            self.wr(0x38, u32::from(QSIZE));
            self.set_addr(0x80, DESC + base);
            self.set_addr(0x90, AVAIL + base);
            self.set_addr(0xa0, USED + base);
            self.wr(0x44, 1);
        }
        self.wr(0x70, 1 | 2 | 8 | 4);
        self.rd(0x70)
    }

    /// Writes the 64-bit `addr` to the register pair at `reg` (low, then high).
    pub fn set_addr(&mut self, reg: u64, addr: u64) {
        self.wr(reg, addr as u32);
        self.wr(reg + 4, (addr >> 32) as u32);
    }

    /// Writes a raw descriptor at slot `i` of queue 0.
    pub fn put_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.put_desc_q(0, i, addr, len, flags, next);
    }

    fn put_desc_q(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(qbase(q) + DESC + u64::from(i) * 16);
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, at).unwrap();
    }

    /// Adds a chain of (addr, len, writable) buffers to queue 0; returns the head index.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        self.add_chain_q(0, bufs)
    }

    /// Adds a chain of (addr, len, writable) buffers to queue `q` and makes it available.
    pub fn add_chain_q(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc[q];
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % QSIZE;
            let last = k + 1 == bufs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.put_desc_q(q, i, addr, len, flags, (i + 1) % QSIZE);
        }
        self.next_desc[q] = (head + bufs.len() as u16) % QSIZE;
        self.publish_q(q, head);
        head
    }

    /// Puts `head` in queue 0's available ring and bumps its index.
    pub fn publish(&mut self, head: u16) {
        self.publish_q(0, head);
    }

    fn publish_q(&mut self, q: usize, head: u16) {
        let avail = qbase(q) + AVAIL;
        let slot = GuestAddress(avail + 4 + u64::from(self.avail_idx[q] % QSIZE) * 2);
        self.mem.write_obj(head.to_le(), slot).unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q].to_le(), GuestAddress(avail + 2))
            .unwrap();
    }

    /// Notifies queue 0 and waits for `n` more used buffers.
    pub fn kick_and_wait(&mut self, n: u16) -> Vec<(u32, u32)> {
        self.kick_and_wait_q(0, n)
    }

    /// Notifies queue `q` and waits (bounded) for the device to use `n` more buffers;
    /// returns their (id, len) pairs.
    pub fn kick_and_wait_q(&mut self, q: usize, n: u16) -> Vec<(u32, u32)> {
        self.wr(0x50, q as u32);
        self.wait_used(q, n)
    }

    /// Like [`Driver::wait_used`], but `None` if they do not come within `limit`.
    pub fn wait_used_timeout(
        &mut self,
        q: usize,
        n: u16,
        limit: Duration,
    ) -> Option<Vec<(u32, u32)>> {
        let used = qbase(q) + USED;
        let deadline = Instant::now() + limit;
        loop {
            let used_idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            if used_idx.wrapping_sub(self.used_seen[q]) >= n {
                return Some(self.wait_used(q, n));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits (bounded) for `n` more used buffers on queue `q` without notifying.
    pub fn wait_used(&mut self, q: usize, n: u16) -> Vec<(u32, u32)> {
        let used = qbase(q) + USED;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let used_idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            if used_idx.wrapping_sub(self.used_seen[q]) >= n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "device did not complete requests"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut out = Vec::new();
        for _ in 0..n {
            let at = used + 4 + u64::from(self.used_seen[q] % QSIZE) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }
}

/// Offset of queue `q`'s rings from the queue-0 addresses.
pub fn qbase(q: usize) -> u64 {
    q as u64 * 0x4000
}

/// A RAM disk implementing [`block::Disk`], for device tests and benches.
#[derive(Debug)]
pub struct RamDisk {
    /// Contents.
    pub data: Mutex<Vec<u8>>,
    /// Number of flushes.
    pub flushes: Mutex<usize>,
    /// Refuse writes.
    pub read_only: bool,
    /// Changes in order: ('w' write | 'z' zeroes | 'd' discard, offset, len).
    pub log: Mutex<Vec<(char, u64, u64)>>,
}

impl RamDisk {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: usize, read_only: bool) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![0; size]),
            flushes: Mutex::new(0),
            read_only,
            log: Mutex::new(Vec::new()),
        })
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, BlockError> {
        let size = self.data.lock().unwrap().len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(BlockError::OutOfRange { offset, len, size }),
        }
    }
}

impl Disk for RamDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let r = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), BlockError> {
        let r = self.range(offset, data.len() as u64)?;
        self.data.lock().unwrap()[r].copy_from_slice(data);
        self.log
            .lock()
            .unwrap()
            .push(('w', offset, data.len() as u64));
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let r = self.range(offset, len)?;
        self.data.lock().unwrap()[r].fill(0);
        self.log.lock().unwrap().push(('z', offset, len));
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let r = self.range(offset, len)?;
        self.data.lock().unwrap()[r].fill(0);
        self.log.lock().unwrap().push(('d', offset, len));
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
}

/// A private network namespace for network tests, so the host's own network is never touched:
/// created with `ip netns add`, holding TAP interfaces the tests make, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    /// Its name (under `/run/netns`).
    pub name: String,
}

/// Why network tests cannot run here (printed as their SKIP reason), or `None`.
pub fn net_skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (TAP devices and network namespaces need CAP_NET_ADMIN)".into());
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        return Some(format!("/dev/net/tun is not usable ({e})"));
    }
    match std::process::Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("the `ip` command (iproute2) is missing".into()),
    }
}

/// Prints `SKIP: <test>: <reason>` and returns false when network tests cannot run here.
pub fn net_or_skip(test: &str) -> bool {
    match net_skip_reason() {
        None => true,
        Some(r) => {
            println!("SKIP: {test}: {r}");
            false
        }
    }
}

/// The `icmp_seq` numbers of the echo replies in ping's output (not quiet), in order.
pub fn ping_replies(output: &str) -> Vec<u32> {
    output
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    /// Creates a namespace named after `tag`, this process and a counter, with loopback up.
    pub fn new(tag: &str) -> Result<Self, String> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("mvmm-{tag}-{}-{n}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Adds a persistent TAP interface `name`, with address `cidr` (e.g. `10.0.0.1/24`) if
    /// given, and brings it up.
    pub fn add_tap(&self, name: &str, cidr: Option<&str>) -> Result<(), String> {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        // No IPv6 on it: the kernel would send its own frames (router solicitations, MLD) into
        // the TAP, in the way of the tests' frames. Without IPv6 in the kernel there are none.
        let _ = self
            .command("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.{name}.disable_ipv6=1")])
            .output();
        if let Some(c) = cidr {
            self.ip(&["addr", "add", c, "dev", name])?;
        }
        self.ip(&["link", "set", name, "up"])
    }

    /// Waits (up to 5 s) until interface `name` is operationally up: a TAP becomes so only
    /// once a process attached to it and the kernel's link watch ran; until then the kernel
    /// drops what is sent to it.
    pub fn wait_up(&self, name: &str) -> Result<(), String> {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let out = std::process::Command::new("ip")
                .args(["-n", &self.name, "-o", "link", "show", name])
                .output()
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("state UP") {
                return Ok(());
            }
            if Instant::now() > end {
                return Err(format!("{name} did not come up: {text}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A command run inside the namespace (`ip netns exec <ns> PROGRAM`).
    pub fn command(&self, program: &str) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// `ping -c count -i interval ip` from the namespace: how many of the first `count` echo
    /// requests were answered. A 30 s deadline makes ping wait for late replies instead of
    /// counting one lost when it comes after twice the slowest round trip; a request really
    /// dropped leaves its sequence number out.
    pub fn ping(&self, ip: &str, count: u32, interval: &str) -> u32 {
        let n = count.to_string();
        let out = self
            .command("ping")
            .args(["-n", "-c", &n, "-i", interval, "-w", "30", ip])
            .output()
            .expect("run ping");
        let mut seqs = ping_replies(&String::from_utf8_lossy(&out.stdout));
        seqs.retain(|s| (1..=count).contains(s));
        seqs.sort_unstable();
        seqs.dedup();
        u32::try_from(seqs.len()).unwrap_or(u32::MAX)
    }

    /// Moves the calling thread into the namespace until the guard drops (sockets and TAPs
    /// opened meanwhile belong to it).
    pub fn enter(&self) -> std::io::Result<NetNsGuard> {
        let back = std::fs::File::open("/proc/thread-self/ns/net")?;
        let ns = std::fs::File::open(format!("/run/netns/{}", self.name))?;
        setns(&ns)?;
        Ok(NetNsGuard { back })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn setns(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `f` is an open namespace file; setns only changes the calling thread's
    // namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Returns the thread to its previous network namespace on drop.
#[derive(Debug)]
pub struct NetNsGuard {
    back: std::fs::File,
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        let _ = setns(&self.back);
    }
}

/// An `AF_PACKET` socket on one interface: sends raw Ethernet frames out of it and receives
/// every frame it sees (the host end of a TAP, for device tests).
#[derive(Debug)]
pub struct PacketSocket {
    fd: std::os::fd::OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Binds to interface `name` (in the calling thread's namespace).
    pub fn bind(name: &str) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        let cname = std::ffi::CString::new(name)?;
        // SAFETY: `cname` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new socket this function owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let s = Self {
            fd,
            ifindex: ifindex as i32,
        };
        let addr = s.addr();
        // SAFETY: `addr` is a valid sockaddr_ll of the given size.
        let r = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&s.fd),
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }

    fn addr(&self) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain old data; zero is valid.
        let mut a: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        a.sll_family = libc::AF_PACKET as u16;
        a.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        a.sll_ifindex = self.ifindex;
        a
    }

    /// Sends one Ethernet frame out of the interface.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: `frame` is valid for its length.
        let n = unsafe {
            libc::send(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                frame.as_ptr().cast(),
                frame.len(),
                0,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives the next frame seen on the interface that `keep` accepts, waiting up to
    /// `timeout`; `None` on timeout.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        keep: impl Fn(&[u8]) -> bool,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let end = Instant::now() + timeout;
        let mut buf = vec![0u8; 65_536];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
                continue;
            }
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    continue;
                }
                return Err(e);
            }
            let frame = &buf[..n as usize];
            if keep(frame) {
                return Ok(Some(frame.to_vec()));
            }
        }
    }
}
