//! virtio-vsock (device ID 19): guest stream sockets bridged to Unix sockets on the host.

pub mod muxer;
pub mod packet;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use self::muxer::{HostListener, Muxer, MuxerError, MuxerState};
use self::packet::{HDR_LEN, Header, MAX_PAYLOAD, PacketError};
use super::{
    ActivateError, Activation, GuestMemory, INT_VRING, Interrupt, SharedQueue, VIRTIO_F_VERSION_1,
    VirtioDevice, WorkerThread,
};

/// Virtio device ID of a socket device.
pub const DEVICE_TYPE_VSOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
/// Queue size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the guest drops its connections and re-reads its CID.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// The host side of an active device, shared by its worker and [`VsockHandle`]s. The worker
/// takes this lock after any queue lock it needs and never waits for a queue while holding it.
type SharedMuxer = Arc<Mutex<Option<Muxer>>>;

fn lock_muxer(m: &SharedMuxer) -> MutexGuard<'_, Option<Muxer>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A virtio-vsock device whose host side listens at a Unix socket path.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    /// Send a transport-reset event when next activated (a restored or cloned device).
    reset_event: bool,
    /// Connections to take over at the next activation (a handover from another process).
    imported: Option<(MuxerState, Vec<OwnedFd>)>,
    muxer: SharedMuxer,
    wake: Arc<EventFd>,
    worker: Option<WorkerThread>,
    counters: Arc<super::DeviceCounters>,
}

/// A handle on a vsock device's host connections that the VMM keeps after handing the device
/// to its transport: to move the connections to another process (a snapshot handover).
#[derive(Debug, Clone)]
pub struct VsockHandle {
    muxer: SharedMuxer,
    /// Wakes the device's worker so that it polls moved connections and listeners at once.
    wake: Arc<EventFd>,
}

impl VsockHandle {
    /// Takes every connection out of the active device, without resetting them (they are to
    /// continue elsewhere): their states and host sockets. Hold the device's queues (pause
    /// the VM and lock its transport) so that no packet is half-way. `None` if inactive.
    pub fn export(&self) -> Option<(MuxerState, Vec<OwnedFd>)> {
        lock_muxer(&self.muxer).as_mut().map(Muxer::export)
    }

    /// Like [`VsockHandle::export`], only the connections whose guest port is in
    /// `guest_ports` (see [`Muxer::export_ports`]).
    pub fn export_ports(&self, guest_ports: &[u32]) -> Option<(MuxerState, Vec<OwnedFd>)> {
        lock_muxer(&self.muxer)
            .as_mut()
            .map(|m| m.export_ports(guest_ports))
    }

    /// Stops the active device's host listener (after a completed handover).
    pub fn stop_listening(&self) {
        if let Some(m) = lock_muxer(&self.muxer).as_mut() {
            m.stop_listening();
        }
    }

    /// Gives connections to the active device (e.g. back, after a handover that failed).
    pub fn import(&self, state: MuxerState, fds: Vec<OwnedFd>) -> Result<(), MuxerError> {
        let r = match lock_muxer(&self.muxer).as_mut() {
            Some(m) => m.import(state, fds),
            None => Err(MuxerError::BadHandover("the device is not active".into())),
        };
        self.wake();
        r
    }

    /// Takes the active device's host listener out (see [`Muxer::take_listener`]); `None` if
    /// the device is inactive or has none.
    pub fn take_listener(&self) -> Option<HostListener> {
        lock_muxer(&self.muxer)
            .as_mut()
            .and_then(Muxer::take_listener)
    }

    /// Makes the active device answer on `listener` (see [`Muxer::adopt_listener`]). Gives it
    /// back if the device is inactive.
    pub fn adopt_listener(&self, listener: HostListener) -> Result<(), HostListener> {
        let r = match lock_muxer(&self.muxer).as_mut() {
            Some(m) => {
                m.adopt_listener(listener);
                Ok(())
            }
            None => Err(listener),
        };
        self.wake();
        r
    }

    /// The host socket path the active device answers on (another device's, after
    /// [`VsockHandle::adopt_listener`]); `None` if inactive.
    pub fn uds_path(&self) -> Option<PathBuf> {
        lock_muxer(&self.muxer)
            .as_ref()
            .map(|m| m.uds_path().to_owned())
    }

    /// Number of live connections of the active device (0 if inactive).
    pub fn connection_count(&self) -> usize {
        lock_muxer(&self.muxer)
            .as_ref()
            .map_or(0, Muxer::connection_count)
    }

    fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            tracing::warn!("cannot wake the vsock worker: {e}");
        }
    }
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.cid)
            .field("uds_path", &self.uds_path)
            .finish_non_exhaustive()
    }
}

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0..=2 are reserved (hypervisor, local, host).
    #[error("guest CID {0} is reserved; use 3 or above")]
    ReservedCid(u64),
    /// The worker's wake-up eventfd could not be created.
    #[error("cannot create the vsock worker's eventfd")]
    Wake(#[source] std::io::Error),
}

impl Vsock {
    /// A device for a guest with context ID `cid`; host connections go through `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if cid <= 2 || cid > u64::from(u32::MAX) {
            return Err(VsockError::ReservedCid(cid));
        }
        Ok(Self {
            cid,
            uds_path: uds_path.to_owned(),
            reset_event: false,
            imported: None,
            muxer: Arc::default(),
            wake: Arc::new(
                EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).map_err(VsockError::Wake)?,
            ),
            worker: None,
            counters: Arc::default(),
        })
    }

    /// A handle on this device's connections.
    pub fn handle(&self) -> VsockHandle {
        VsockHandle {
            muxer: Arc::clone(&self.muxer),
            wake: Arc::clone(&self.wake),
        }
    }

    /// Makes the next activation take over these connections (exported by another device,
    /// with their host sockets in the same order) instead of posting a transport reset: for a
    /// device restored from a snapshot whose connections were handed over.
    pub fn with_connections(mut self, state: MuxerState, fds: Vec<OwnedFd>) -> Self {
        self.reset_event = false;
        self.imported = Some((state, fds));
        self
    }

    /// Makes the next activation post a transport-reset event (as soon as the guest has an
    /// event buffer): for a device restored from a snapshot or clone, whose host connections
    /// are gone and whose CID may differ from the one the guest driver read.
    pub fn with_transport_reset(mut self) -> Self {
        self.reset_event = true;
        self
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let cfg = self.cid.to_le_bytes();
        let start = offset.min(8) as usize;
        let end = offset.saturating_add(data.len() as u64).min(8) as usize;
        data[..end - start].copy_from_slice(&cfg[start..end]);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if a.queues.len() != 3 || a.queue_events.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: a.queues.len(),
            });
        }
        let mut muxer = Muxer::new(self.cid, &self.uds_path).map_err(|e| match e {
            MuxerError::Bind { source, .. } | MuxerError::HandoverSocket(source) => {
                ActivateError::Worker(source)
            }
            e @ MuxerError::BadHandover(_) => ActivateError::Worker(std::io::Error::other(e)),
        })?;
        let imported = self.imported.take();
        let kick = imported.is_some();
        if let Some((state, fds)) = imported {
            muxer
                .import(state, fds)
                .map_err(|e| ActivateError::Worker(std::io::Error::other(e)))?;
        }
        *lock_muxer(&self.muxer) = Some(muxer);
        let mut w = Worker {
            cid: self.cid,
            mem: a.mem,
            queues: a.queues,
            events: a.queue_events,
            interrupt: a.interrupt,
            muxer: Arc::clone(&self.muxer),
            wake: Arc::clone(&self.wake),
            counters: Arc::clone(&self.counters),
            rx_starved: false,
            reset_pending: std::mem::take(&mut self.reset_event),
            kick,
        };
        // Packets may already wait in the rings (a restored or cloned device): one pass at
        // start.
        if let Err(e) = self.wake.write(1) {
            tracing::warn!("cannot wake the vsock worker: {e}");
        }
        self.worker = Some(WorkerThread::spawn("virtio-vsock", move |kill| {
            w.run(kill);
        })?);
        Ok(())
    }

    fn counters(&self) -> Option<Arc<super::DeviceCounters>> {
        Some(Arc::clone(&self.counters))
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        // Closes the host sockets still held and removes the listening socket.
        lock_muxer(&self.muxer).take();
    }
}

/// Reads one packet from a TX chain: header, then `len` payload bytes, validated.
pub fn parse_tx(
    reader: &mut impl Read,
    available: usize,
    guest_cid: u64,
) -> Result<(Header, Vec<u8>), PacketError> {
    if available < HDR_LEN {
        return Err(PacketError::Truncated(available));
    }
    let mut hb = [0u8; HDR_LEN];
    reader
        .read_exact(&mut hb)
        .map_err(|_| PacketError::BadChain)?;
    let h = Header::decode(&hb);
    h.validate(guest_cid, available - HDR_LEN)?;
    let mut payload = vec![0u8; h.len as usize];
    reader
        .read_exact(&mut payload)
        .map_err(|_| PacketError::BadChain)?;
    Ok((h, payload))
}

struct Worker {
    cid: u64,
    mem: GuestMemory,
    queues: Vec<SharedQueue>,
    events: Vec<EventFd>,
    interrupt: Interrupt,
    muxer: SharedMuxer,
    /// Written when connections or a listener were moved in from elsewhere.
    wake: Arc<EventFd>,
    counters: Arc<super::DeviceCounters>,
    /// The guest gave no RX buffers last time we had something for it.
    rx_starved: bool,
    /// A transport-reset event is still to be posted.
    reset_pending: bool,
    /// Interrupt the guest once at start: a snapshot may have been taken between the device's
    /// last used-ring update and its interrupt (harmless if spurious).
    kick: bool,
}

impl Worker {
    fn run(&mut self, kill: &EventFd) {
        if std::mem::take(&mut self.kick) {
            self.interrupt.trigger(INT_VRING);
        }
        loop {
            match self.post_reset_event() {
                Ok(true) => self.interrupt.trigger(INT_VRING),
                Ok(false) => {}
                Err(()) => return self.interrupt.set_needs_reset(),
            }
            let mut fds: Vec<libc::pollfd> = [kill.as_raw_fd(), self.wake.as_raw_fd()]
                .into_iter()
                .chain(self.events.iter().map(AsRawFd::as_raw_fd))
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let host_fds = lock_muxer(&self.muxer)
                .as_ref()
                .map(|m| m.poll_fds(!self.rx_starved))
                .unwrap_or_default();
            fds.extend(host_fds.into_iter().map(|(fd, events)| libc::pollfd {
                fd,
                events,
                revents: 0,
            }));
            // SAFETY: `fds` is a valid, initialised array of pollfd for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
            if n < 0 {
                continue;
            }
            if fds[0].revents != 0 {
                return;
            }
            // Reading a non-blocking eventfd only fails when it was not written (EAGAIN):
            // nothing to clear then.
            for ev in self.events.iter().chain(std::iter::once(&*self.wake)) {
                let _ = ev.read();
            }
            let mut notify = false;
            match self.process_tx() {
                Ok(used) => notify |= used,
                Err(()) => return self.interrupt.set_needs_reset(),
            }
            if let Some(m) = lock_muxer(&self.muxer).as_mut() {
                m.service_host();
            }
            match self.fill_rx() {
                Ok(used) => notify |= used,
                Err(()) => return self.interrupt.set_needs_reset(),
            }
            if notify {
                self.interrupt.trigger(INT_VRING);
            }
        }
    }

    /// Posts the pending transport-reset event into an event-queue buffer, if the guest gave
    /// one; true when it was posted.
    fn post_reset_event(&mut self) -> Result<bool, ()> {
        if !self.reset_pending {
            return Ok(false);
        }
        let mut q = self.queues[EVQ].lock().unwrap_or_else(|p| p.into_inner());
        let Some(chain) = q.pop_descriptor_chain(&self.mem) else {
            return Ok(false);
        };
        let head = chain.head_index();
        let len = match chain.writer(&self.mem) {
            Ok(mut w) if w.available_bytes() >= 4 => {
                w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
                    .map_err(|_| ())?;
                4
            }
            _ => 0,
        };
        q.add_used(&self.mem, head, len).map_err(|_| ())?;
        self.reset_pending = len == 0;
        Ok(true)
    }

    /// Consumes every TX chain; malformed packets are dropped (and counted as used).
    fn process_tx(&mut self) -> Result<bool, ()> {
        let mut q = self.queues[TXQ].lock().unwrap_or_else(|p| p.into_inner());
        let mut muxer = lock_muxer(&self.muxer);
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            if let Ok(mut reader) = chain.reader(&self.mem) {
                let avail = reader.available_bytes();
                if let (Ok((h, payload)), Some(m)) =
                    (parse_tx(&mut reader, avail, self.cid), muxer.as_mut())
                {
                    super::DeviceCounters::add(&self.counters.requests, 1);
                    super::DeviceCounters::add(&self.counters.bytes_in, payload.len() as u64);
                    m.handle_guest_packet(&h, &payload);
                }
            }
            q.add_used(&self.mem, head, 0).map_err(|_| ())?;
            used = true;
        }
        Ok(used)
    }

    /// Delivers pending packets into RX buffers.
    fn fill_rx(&mut self) -> Result<bool, ()> {
        let mut q = self.queues[RXQ].lock().unwrap_or_else(|p| p.into_inner());
        let mut guard = lock_muxer(&self.muxer);
        let Some(muxer) = guard.as_mut() else {
            return Ok(false);
        };
        let mut used = false;
        self.rx_starved = false;
        loop {
            let Some(chain) = q.pop_descriptor_chain(&self.mem) else {
                self.rx_starved = muxer.has_control() || muxer.connection_count() > 0;
                break;
            };
            let head = chain.head_index();
            let Ok(mut writer) = chain.writer(&self.mem) else {
                q.add_used(&self.mem, head, 0).map_err(|_| ())?;
                used = true;
                continue;
            };
            let cap = writer.available_bytes();
            if cap < HDR_LEN {
                q.add_used(&self.mem, head, 0).map_err(|_| ())?;
                used = true;
                continue;
            }
            let Some((h, payload)) = muxer.next_rx((cap - HDR_LEN).min(MAX_PAYLOAD)) else {
                q.go_to_previous_position();
                break;
            };
            let ok = writer.write_all(&h.encode()).is_ok() && writer.write_all(&payload).is_ok();
            // `payload` is at most MAX_PAYLOAD (asked of `next_rx` above).
            #[allow(clippy::cast_possible_truncation)]
            let len = if ok {
                super::DeviceCounters::add(&self.counters.deliveries, 1);
                super::DeviceCounters::add(&self.counters.bytes_out, payload.len() as u64);
                (HDR_LEN + payload.len()) as u32
            } else {
                0
            };
            q.add_used(&self.mem, head, len).map_err(|_| ())?;
            used = true;
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    // test code: values are small and fixed
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress};

    use super::packet::*;
    use super::*;
    use crate::virtio::testing::{DATA, Driver};

    const CID: u64 = 3;
    const RX_BUF: u32 = 4096 + HDR_LEN as u32;
    /// TX packets are built here; RX buffers start at DATA + 0x10000.
    const TX_AT: u64 = DATA;

    struct Guest {
        d: Driver,
        rx_next: u64,
    }

    impl Guest {
        fn new(path: &Path) -> Self {
            let mut d = Driver::new(Box::new(Vsock::new(CID, path).unwrap()));
            assert_ne!(d.init(1 << 32, 3) & 4, 0, "DRIVER_OK accepted");
            let mut g = Self { d, rx_next: 0 };
            for _ in 0..8 {
                g.give_rx();
            }
            g.d.wr(0x50, 0);
            g
        }

        fn give_rx(&mut self) {
            let addr = DATA + 0x10000 + (self.rx_next % 16) * 0x2000;
            self.rx_next += 1;
            self.d.add_chain_q(0, &[(addr, RX_BUF, true)]);
        }

        /// Waits for the next RX packet; returns it and re-posts a buffer.
        fn recv(&mut self) -> (Header, Vec<u8>) {
            let (id, len) = self.d.wait_used(0, 1)[0];
            let _ = id;
            let addr = DATA + 0x10000 + ((self.rx_next - 8) % 16) * 0x2000;
            let mut hb = [0u8; HDR_LEN];
            self.d.mem.read_slice(&mut hb, GuestAddress(addr)).unwrap();
            let h = Header::decode(&hb);
            assert_eq!(len as usize, HDR_LEN + h.len as usize);
            let mut p = vec![0u8; h.len as usize];
            self.d
                .mem
                .read_slice(&mut p, GuestAddress(addr + HDR_LEN as u64))
                .unwrap();
            self.give_rx();
            self.d.wr(0x50, 0);
            (h, p)
        }

        fn send(&mut self, h: Header, payload: &[u8]) {
            let mut b = h.encode().to_vec();
            b.extend_from_slice(payload);
            self.d.mem.write_slice(&b, GuestAddress(TX_AT)).unwrap();
            self.d.add_chain_q(1, &[(TX_AT, b.len() as u32, false)]);
            self.d.kick_and_wait_q(1, 1);
        }

        fn hdr(&self, src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
            Header {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len,
                type_: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: 65536,
                fwd_cnt: 0,
            }
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vsock-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("v.sock")
    }

    #[test]
    fn restored_device_posts_one_transport_reset_event() {
        let path = tmp("reset");
        let dev = Vsock::new(CID, &path).unwrap().with_transport_reset();
        let mut d = Driver::new(Box::new(dev));
        assert_ne!(d.init(1 << 32, 3) & 4, 0, "DRIVER_OK accepted");
        // The event buffer comes after activation: the device posts the event once it has one.
        let ev = DATA + 0x8000;
        d.mem.write_obj(0xffff_ffffu32, GuestAddress(ev)).unwrap();
        d.add_chain_q(2, &[(ev, 8, true)]);
        d.wr(0x50, 2);
        let used = d.wait_used(2, 1);
        assert_eq!(used[0].1, 4);
        let id: u32 = d.mem.read_obj(GuestAddress(ev)).unwrap();
        assert_eq!(id, EVENT_TRANSPORT_RESET);
        // Only one: a further buffer stays available while other traffic is handled.
        d.add_chain_q(2, &[(ev + 8, 8, true)]);
        d.wr(0x50, 2);
        let mut g = Guest { d, rx_next: 0 };
        for _ in 0..8 {
            g.give_rx();
        }
        g.d.wr(0x50, 0);
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 7\n").unwrap();
        let (req, _) = g.recv();
        assert_eq!(req.op, OP_REQUEST);
        let used_idx: u16 =
            g.d.mem
                .read_obj(GuestAddress(
                    crate::virtio::testing::qbase(2) + crate::virtio::testing::USED + 2,
                ))
                .unwrap();
        assert_eq!(used_idx, 1, "a second reset event was posted");
    }

    #[test]
    fn host_initiated_connection_echo_and_shutdown() {
        let path = tmp("host");
        let mut g = Guest::new(&path);
        let mut host = UnixStream::connect(&path).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        let (req, _) = g.recv();
        assert_eq!(
            (req.op, req.src_cid, req.dst_cid, req.dst_port),
            (OP_REQUEST, HOST_CID, CID, 52)
        );
        let host_port = req.src_port;
        g.send(g.hdr(52, host_port, OP_RESPONSE, 0), &[]);
        let mut line = String::new();
        BufReader::new(host.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, format!("OK {host_port}\n"));

        host.write_all(b"hello").unwrap();
        let (rw, data) = g.recv();
        assert_eq!((rw.op, rw.dst_port, rw.src_port), (OP_RW, 52, host_port));
        assert_eq!(data, b"hello");

        g.send(g.hdr(52, host_port, OP_RW, 5), b"world");
        let mut back = [0u8; 5];
        host.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"world");

        // Guest closes both directions: host sees EOF, guest gets RST.
        let mut sd = g.hdr(52, host_port, OP_SHUTDOWN, 0);
        sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        g.send(sd, &[]);
        let (rst, _) = g.recv();
        assert_eq!(rst.op, OP_RST);
        let mut b = [0u8; 1];
        assert_eq!(host.read(&mut b).unwrap(), 0);
    }

    #[test]
    fn guest_initiated_connection_reaches_port_socket() {
        let path = tmp("guest");
        let listener = UnixListener::bind(format!("{}_1234", path.display())).unwrap();
        let mut g = Guest::new(&path);
        g.send(g.hdr(5000, 1234, OP_REQUEST, 0), &[]);
        let (resp, _) = g.recv();
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port),
            (OP_RESPONSE, 1234, 5000)
        );
        let (mut host, _) = listener.accept().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        g.send(g.hdr(5000, 1234, OP_RW, 4), b"ping");
        let mut b = [0u8; 4];
        host.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        host.write_all(b"pong").unwrap();
        let (rw, data) = g.recv();
        assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"pong"[..]));
        // Host closes: guest is told SHUTDOWN.
        drop(host);
        let (sd, _) = g.recv();
        assert_eq!(sd.op, OP_SHUTDOWN);
        assert_eq!(sd.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    }

    #[test]
    fn refused_and_malformed_packets() {
        let path = tmp("bad");
        let mut g = Guest::new(&path);
        // Nobody listens on port 9: RST.
        g.send(g.hdr(5000, 9, OP_REQUEST, 0), &[]);
        assert_eq!(g.recv().0.op, OP_RST);
        // Data for a connection that does not exist: RST.
        g.send(g.hdr(5001, 9, OP_RW, 3), b"abc");
        assert_eq!(g.recv().0.op, OP_RST);
        // Spoofed source CID, bad length, truncated header, unknown op: dropped silently, and the
        // device keeps working.
        let mut spoof = g.hdr(5002, 9, OP_REQUEST, 0);
        spoof.src_cid = 77;
        g.send(spoof, &[]);
        g.send(g.hdr(5003, 9, OP_RW, 60000), b"short");
        g.d.mem
            .write_slice(&[1u8; 10], GuestAddress(TX_AT))
            .unwrap();
        g.d.add_chain_q(1, &[(TX_AT, 10, false)]);
        g.d.kick_and_wait_q(1, 1);
        g.send(g.hdr(5004, 9, 42, 0), &[]);
        g.send(g.hdr(5005, 9, OP_REQUEST, 0), &[]);
        let (h, _) = g.recv();
        assert_eq!(
            (h.op, h.dst_port),
            (OP_RST, 5005),
            "only the valid request was answered"
        );
    }

    #[test]
    fn host_data_respects_guest_credit() {
        let path = tmp("credit");
        let listener = UnixListener::bind(format!("{}_77", path.display())).unwrap();
        let mut g = Guest::new(&path);
        let mut req = g.hdr(6000, 77, OP_REQUEST, 0);
        req.buf_alloc = 8;
        g.send(req, &[]);
        assert_eq!(g.recv().0.op, OP_RESPONSE);
        let (mut host, _) = listener.accept().unwrap();
        host.write_all(&[5u8; 20]).unwrap();
        let (rw, data) = g.recv();
        assert_eq!(rw.op, OP_RW);
        assert_eq!(data.len(), 8, "no more than the guest's buf_alloc");
        // Nothing more arrives until the guest reports it consumed the data.
        let rx_used = |g: &Guest| -> u16 {
            g.d.mem
                .read_obj(GuestAddress(crate::virtio::testing::USED + 2))
                .unwrap()
        };
        let before = rx_used(&g);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(rx_used(&g), before, "no data beyond the credit");
        let mut upd = g.hdr(6000, 77, OP_CREDIT_UPDATE, 0);
        upd.buf_alloc = 8;
        upd.fwd_cnt = 8;
        g.send(upd, &[]);
        let (rw, data) = g.recv();
        assert_eq!((rw.op, data.len()), (OP_RW, 8));
    }
}
