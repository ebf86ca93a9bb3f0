//! virtio-net (device ID 1) on a TAP device: one receive and one transmit queue, the MAC
//! address in the configuration space, mergeable receive buffers, and checksum/TSO offloads
//! passed through to the TAP. Frame handling on untrusted chains is in [`queue_io`]; the worker
//! here does the TAP I/O.

pub mod queue_io;
pub mod tap;
#[cfg(test)]
mod tests;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net as vn;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use self::queue_io::{
    MAX_BUFFER, Negotiated, RingError, RxOutcome, RxScratch, TxBuffers, TxScratch,
};
use self::tap::{Tap, VNET_HDR_LEN};
use super::ring_view::AvailView;
use super::{
    ActivateError, Activation, DeviceCounters, GuestMemory, INT_CONFIG, INT_VRING, Interrupt,
    SharedQueue, VIRTIO_F_VERSION_1, VirtioDevice, WorkerThread,
};

/// Virtio device ID of a network device.
pub const DEVICE_TYPE_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
/// Frames handled per queue before the worker looks at the other one (fairness).
const BATCH: usize = 64;

/// An Ethernet MAC address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

/// A MAC address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?} (want six hex bytes like 06:00:ac:10:00:02, unicast)")]
pub struct BadMac(pub String);

impl MacAddr {
    /// A random locally administered unicast address.
    pub fn random_local() -> Self {
        let mut b = [0u8; 6];
        // A hash of time, pid and a counter is enough to keep the addresses of the VMs of one
        // host apart; nothing depends on their unpredictability.
        use std::hash::{BuildHasher, Hasher};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        let v = h.finish().to_le_bytes();
        b.copy_from_slice(&v[..6]);
        b[0] = (b[0] & 0xfe) | 0x02;
        Self(b)
    }
}

impl std::str::FromStr for MacAddr {
    type Err = BadMac;

    fn from_str(s: &str) -> Result<Self, BadMac> {
        let bad = || BadMac(s.to_owned());
        let mut b = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut b {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        // A multicast address (low bit of the first byte) cannot be a NIC's address.
        if parts.next().is_some() || b[0] & 1 != 0 {
            return Err(bad());
        }
        Ok(Self(b))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a snapshot keeps of a network device besides its transport: the address the guest
/// was given (its driver read it at probe), and the TAP it was attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The device's MAC address.
    pub mac: MacAddr,
    /// The TAP interface it was attached to (a restore attaches to the one its config names).
    pub tap: String,
}

impl crate::persist::Versioned for NetState {
    const KIND: &'static str = "virtio-net";
    const VERSION: u32 = 1;
}

/// The virtio-net configuration space up to `mtu` (virtio 1.2 §5.1.4): 12 bytes, no padding.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
struct NetConfigSpace {
    mac: [u8; 6],
    status: u16,
    max_virtqueue_pairs: u16,
    mtu: u16,
}

// SAFETY: `NetConfigSpace` is packed plain old data (byte array and integers), so any bit
// pattern is valid and it may be viewed as bytes.
unsafe impl vm_memory::ByteValued for NetConfigSpace {}

const _: () = assert!(std::mem::size_of::<NetConfigSpace>() == 12);

/// State shared by the device, its worker and [`NetHandle`]s.
#[derive(Debug)]
struct Shared {
    /// The TAP; `None` after it was taken away (frames are then dropped, like a cut link).
    tap: Mutex<Option<Tap>>,
    mac: Mutex<MacAddr>,
    /// Wakes the worker to look at a new TAP.
    wake: EventFd,
    /// The interrupt line while the device is active (to signal a configuration change).
    interrupt: Mutex<Option<Interrupt>>,
    /// Features the driver accepted at the last activation.
    acked: AtomicU64,
    /// The TAP's offloads must be set again (a new TAP, or a new activation): done by the worker,
    /// so that no other thread (a vCPU's activating MMIO write, an upgrade's takeover) makes
    /// TAP ioctls.
    retune: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Errors of the network device's host side.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Creating the wake-up eventfd failed.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The host side of a network device that the VMM keeps after giving the device to its
/// transport: to move its TAP to another VM (the upgrade's cutover) or change its address.
#[derive(Debug, Clone)]
pub struct NetHandle {
    shared: Arc<Shared>,
}

impl NetHandle {
    /// The device's MAC address.
    pub fn mac(&self) -> MacAddr {
        *lock(&self.shared.mac)
    }

    /// Changes the MAC address in the configuration space and signals a configuration change
    /// to an active driver (Linux keeps the address it read at probe; the kit's driver
    /// re-reads it).
    pub fn set_mac(&self, mac: MacAddr) {
        *lock(&self.shared.mac) = mac;
        if let Some(i) = lock(&self.shared.interrupt).as_ref() {
            i.trigger(INT_CONFIG);
        }
    }

    /// The name of the TAP the device is attached to, if it has one.
    pub fn tap_name(&self) -> Option<String> {
        lock(&self.shared.tap).as_ref().map(|t| t.name().to_owned())
    }

    /// Detaches the TAP (frames to and from the guest are dropped until another is attached)
    /// and returns it. The fd is not closed: give it to another device with
    /// [`NetHandle::attach_tap`].
    pub fn take_tap(&self) -> Option<Tap> {
        let tap = lock(&self.shared.tap).take();
        // Wake the worker so it stops polling the fd.
        let _ = self.shared.wake.write(1);
        tap
    }

    /// Attaches `tap` and returns the previous one. The device's worker sets the offloads its
    /// driver negotiated on it (a TAP that refuses them stays attached without them: the guest
    /// then gets checksummed, segmented frames, which it always accepts).
    pub fn attach_tap(&self, tap: Tap) -> Option<Tap> {
        let old = lock(&self.shared.tap).replace(tap);
        self.shared.retune.store(true, Ordering::SeqCst);
        // A full eventfd counter is the only failure: the worker is then awake anyway.
        let _ = self.shared.wake.write(1);
        old
    }

    /// The device's state for a snapshot.
    pub fn state(&self) -> NetState {
        NetState {
            mac: self.mac(),
            tap: self.tap_name().unwrap_or_default(),
        }
    }
}

impl crate::persist::Persist for NetHandle {
    type State = NetState;
    type Error = std::convert::Infallible;

    /// [`NetHandle::state`].
    fn save(&self) -> Result<NetState, Self::Error> {
        Ok(self.state())
    }

    /// Gives the device the saved MAC address (the TAP is the configuration's: a restored VM
    /// attaches to the TAP its config names).
    fn restore(&mut self, state: &NetState) -> Result<(), Self::Error> {
        if self.mac() != state.mac {
            self.set_mac(state.mac);
        }
        Ok(())
    }
}

/// A virtio-net device on a TAP.
pub struct Net {
    shared: Arc<Shared>,
    features: u64,
    worker: Option<WorkerThread>,
    counters: Arc<DeviceCounters>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &*lock(&self.shared.mac))
            .field("tap", &lock(&self.shared.tap).as_ref().map(Tap::name))
            .field("running", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

/// Most passes [`Receiver::run`] makes after finding too few receive buffers.
const MAX_RX_PASSES: u32 = 64;

/// The feature bits the device offers. Not `VIRTIO_RING_F_EVENT_IDX`: with it, the driver's
/// event index would have to be honoured here (the receive path sets the available event to
/// where it rewound, behind the driver; and `publish_used` falls back to one index update per
/// entry, so a driver could see part of a mergeable frame).
fn offered_features() -> u64 {
    [
        vn::VIRTIO_NET_F_MAC,
        vn::VIRTIO_NET_F_MRG_RXBUF,
        vn::VIRTIO_NET_F_CSUM,
        vn::VIRTIO_NET_F_GUEST_CSUM,
        vn::VIRTIO_NET_F_GUEST_TSO4,
        vn::VIRTIO_NET_F_GUEST_TSO6,
        vn::VIRTIO_NET_F_GUEST_ECN,
        vn::VIRTIO_NET_F_HOST_TSO4,
        vn::VIRTIO_NET_F_HOST_TSO6,
        vn::VIRTIO_NET_F_HOST_ECN,
        VIRTIO_F_VERSION_1,
    ]
    .iter()
    .fold(0u64, |f, bit| f | (1u64 << bit))
}

impl Net {
    /// A network device on `tap` with address `mac`.
    pub fn new(tap: Tap, mac: MacAddr) -> Result<Self, NetError> {
        Ok(Self {
            shared: Arc::new(Shared {
                tap: Mutex::new(Some(tap)),
                mac: Mutex::new(mac),
                wake: EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd)?,
                interrupt: Mutex::new(None),
                acked: AtomicU64::new(0),
                retune: std::sync::atomic::AtomicBool::new(false),
            }),
            features: offered_features(),
            worker: None,
            counters: Arc::default(),
        })
    }

    /// A handle on the device's TAP and address, valid for the device's life.
    pub fn handle(&self) -> NetHandle {
        NetHandle {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let space = NetConfigSpace {
            mac: lock(&self.shared.mac).0,
            ..NetConfigSpace::default()
        };
        let config = vm_memory::ByteValued::as_slice(&space);
        let len = config.len() as u64;
        let start = offset.min(len);
        let end = offset.saturating_add(data.len() as u64).min(len);
        let n = usize::try_from(end - start).unwrap_or(0);
        let start = usize::try_from(start).unwrap_or(0);
        data[..n].copy_from_slice(&config[start..start + n]);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Writing the MAC is a legacy-only feature; the configuration space is read-only.
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            queue_events,
            interrupt,
            acked_features,
        } = a;
        if queues.len() != 2 || queue_events.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        self.shared.acked.store(acked_features, Ordering::SeqCst);
        self.shared.retune.store(true, Ordering::SeqCst);
        *lock(&self.shared.interrupt) = Some(interrupt.clone());
        let ctx = WorkerCtx {
            mem,
            rxq: Arc::clone(&queues[RXQ]),
            txq: Arc::clone(&queues[TXQ]),
            interrupt,
            shared: Arc::clone(&self.shared),
            counters: Arc::clone(&self.counters),
            neg: Negotiated::from_features(acked_features),
        };
        let mut events = queue_events.into_iter();
        let (Some(rx_evt), Some(tx_evt)) = (events.next(), events.next()) else {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: 0,
            });
        };
        // Frames may wait in the transmit ring (a restored or cloned device): look once.
        tx_evt.write(1).map_err(ActivateError::Worker)?;
        self.worker = Some(WorkerThread::spawn("virtio-net", move |kill| {
            worker(&ctx, &rx_evt, &tx_evt, kill);
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        *lock(&self.shared.interrupt) = None;
    }

    fn counters(&self) -> Option<Arc<DeviceCounters>> {
        Some(Arc::clone(&self.counters))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}

/// Everything the worker works with.
struct WorkerCtx {
    mem: GuestMemory,
    rxq: SharedQueue,
    txq: SharedQueue,
    interrupt: Interrupt,
    shared: Arc<Shared>,
    counters: Arc<DeviceCounters>,
    neg: Negotiated,
}

fn worker(ctx: &WorkerCtx, rx_evt: &EventFd, tx_evt: &EventFd, kill: &EventFd) {
    let mut rx = Receiver::new();
    let mut tx = Transmitter::new(ctx.neg);
    let mut fds = [libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    }; 5];
    loop {
        if ctx.shared.retune.swap(false, Ordering::SeqCst)
            && let Some(t) = lock(&ctx.shared.tap).as_ref()
        {
            let acked = ctx.shared.acked.load(Ordering::SeqCst);
            // An offload the TAP refuses (an old kernel) is only a slower path: the guest then
            // gets checksummed, segmented frames, which it accepts whatever it negotiated.
            if let Err(e) = t.set_offload(tap::offload_for_features(acked)) {
                tracing::warn!(error = %e, "virtio-net: offloads not set");
            }
        }
        let tap_fd = lock(&ctx.shared.tap).as_ref().map(AsRawFd::as_raw_fd);
        for (slot, fd) in fds.iter_mut().zip([
            kill.as_raw_fd(),
            ctx.shared.wake.as_raw_fd(),
            tx_evt.as_raw_fd(),
            rx_evt.as_raw_fd(),
            // While a frame waits for buffers, the TAP is not read: the kernel's queue (bounded,
            // dropping) holds the rest.
            match tap_fd {
                Some(fd) if !rx.is_waiting() => fd,
                _ => -1,
            },
        ]) {
            slot.fd = fd;
            slot.revents = 0;
        }
        // SAFETY: `fds` is a valid array of pollfd structs that outlives the call; negative
        // fds are ignored by poll.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("virtio-net: poll failed; the device stops");
            ctx.interrupt.set_needs_reset();
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        if fds[1].revents != 0 {
            let _ = ctx.shared.wake.read();
        }
        let mut result = Ok(());
        if fds[2].revents != 0 {
            let _ = tx_evt.read();
            let mut q = lock(&ctx.txq);
            result = tx.run(
                &mut q,
                &ctx.mem,
                &ctx.shared.tap,
                &ctx.counters,
                &ctx.interrupt,
            );
        }
        if fds[3].revents != 0 {
            let _ = rx_evt.read();
        }
        // Receive whenever something may have changed: new buffers, a readable TAP, a new TAP.
        if result.is_ok() && (fds[1].revents != 0 || fds[3].revents != 0 || fds[4].revents != 0) {
            result = rx.run(
                &ctx.rxq,
                &ctx.mem,
                &ctx.shared.tap,
                ctx.neg.mergeable,
                &ctx.counters,
                &ctx.interrupt,
            );
        }
        if let Err(e) = result {
            tracing::error!(error = %e, "virtio-net: the queues are unusable; the device needs a reset");
            ctx.interrupt.set_needs_reset();
            return;
        }
    }
}

fn notify(q: &mut Queue, mem: &GuestMemory, interrupt: &Interrupt) -> Result<(), RingError> {
    if q.needs_notification(mem)? {
        interrupt.trigger(INT_VRING);
    }
    Ok(())
}

/// The transmit path: guest chains to the TAP, written from guest memory without a copy.
pub struct Transmitter {
    neg: Negotiated,
    scratch: TxScratch,
    /// Used entries not yet published (one publication per batch).
    used: Vec<(u16, u32)>,
}

impl std::fmt::Debug for Transmitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transmitter")
            .field("neg", &self.neg)
            .finish_non_exhaustive()
    }
}

impl Transmitter {
    /// A transmit path for a driver that negotiated `neg`.
    pub fn new(neg: Negotiated) -> Self {
        Self {
            neg,
            scratch: TxScratch::default(),
            used: Vec::with_capacity(BATCH),
        }
    }

    /// Sends every available chain of `q` to the TAP (in batches, notifying the driver after
    /// each); frames that fail validation, or that find no TAP or a TAP that refuses them, are
    /// dropped and counted, their chains returned. Errors only when the ring is unusable.
    pub fn run(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemory,
        tap: &Mutex<Option<Tap>>,
        counters: &DeviceCounters,
        interrupt: &Interrupt,
    ) -> Result<(), RingError> {
        // One lock for the whole run: a takeover waits for the batch in progress.
        let tap = lock(tap);
        let (mut sent, mut bytes, mut dropped) = (0u64, 0u64, 0u64);
        let result = self.run_batches(q, mem, tap.as_ref(), interrupt, |len| match len {
            Some(len) => {
                sent += 1;
                bytes += (len - VNET_HDR_LEN) as u64;
            }
            None => dropped += 1,
        });
        DeviceCounters::add(&counters.requests, sent);
        DeviceCounters::add(&counters.bytes_in, bytes);
        DeviceCounters::add(&counters.dropped, dropped);
        result
    }

    /// [`Transmitter::run`] without the counters: `count` hears of each chain.
    fn run_batches(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemory,
        tap: Option<&Tap>,
        interrupt: &Interrupt,
        mut count: impl FnMut(Option<usize>),
    ) -> Result<(), RingError> {
        loop {
            q.disable_notification(mem)?;
            loop {
                // One look at the driver's index per batch. An index more than a ring ahead
                // is an error here (looking again would never find a chain to take).
                let mut chains = AvailView::new(q, mem)?;
                let mut took = 0;
                while took < BATCH {
                    let Some(chain) = chains.next_chain() else {
                        break;
                    };
                    let head = chain.head_index();
                    count(self.send(chain, mem, tap));
                    self.used.push((head, 0));
                    took += 1;
                }
                q.set_next_avail(chains.next_avail());
                if !self.used.is_empty() {
                    queue_io::publish_used(q, mem, &self.used)?;
                    self.used.clear();
                    notify(q, mem, interrupt)?;
                }
                if took < BATCH {
                    break;
                }
            }
            if !q.enable_notification(mem)? {
                return Ok(());
            }
        }
    }

    /// Validates one chain and writes its frame to `tap`; its length if it went out. A frame that
    /// fails validation, finds no TAP (taken away) or one that refuses it (interface down,
    /// queue full) is lost, as on a wire.
    fn send(
        &mut self,
        chain: super::ring_view::Chain<'_>,
        mem: &GuestMemory,
        tap: Option<&Tap>,
    ) -> Option<usize> {
        let mut bufs = TxBuffers::new(&mut self.scratch, mem);
        let len = match queue_io::parse_tx_chain(chain, mem, &self.neg, &mut bufs) {
            Ok(len) => len,
            Err(e) => {
                tracing::debug!(error = %e, "virtio-net: transmit chain dropped");
                return None;
            }
        };
        match tap?.write_buffers(&bufs) {
            Ok(n) if n == len => Some(len),
            _ => None,
        }
    }
}

/// The receive path: TAP frames into the guest's buffers. Holds at most one frame that found
/// no buffers yet.
#[derive(Debug)]
pub struct Receiver {
    buf: Vec<u8>,
    pending: Option<usize>,
    scratch: RxScratch,
}

impl Default for Receiver {
    fn default() -> Self {
        Self::new()
    }
}

impl Receiver {
    /// An idle receive path (one frame buffer of [`MAX_BUFFER`] bytes).
    pub fn new() -> Self {
        Self {
            buf: vec![0; MAX_BUFFER],
            pending: None,
            scratch: RxScratch::default(),
        }
    }

    /// Makes a `len`-byte frame (zeros) wait for receive buffers, as after a TAP read.
    #[cfg(test)]
    pub(crate) fn hold_for_test(&mut self, len: usize) {
        self.buf[..len].fill(0);
        self.pending = Some(len);
    }

    /// Whether a frame waits for receive buffers (then the TAP need not be watched).
    pub fn is_waiting(&self) -> bool {
        self.pending.is_some()
    }

    /// Moves frames from the TAP into the receive queue until the TAP is empty, the driver has
    /// no buffers (one frame then waits for the driver's next notification), or a batch is
    /// done (the TAP stays readable). Errors only when the ring is unusable.
    pub fn run(
        &mut self,
        queue: &Mutex<Queue>,
        mem: &GuestMemory,
        tap: &Mutex<Option<Tap>>,
        mergeable: bool,
        counters: &DeviceCounters,
        interrupt: &Interrupt,
    ) -> Result<(), RingError> {
        let (mut delivered, mut bytes, mut dropped) = (0u64, 0u64, 0u64);
        let mut budget = BATCH * 4;
        // The queue before the TAP, as everywhere (the transmit path, and a VMM that captures
        // the device's state with its queues held and then asks for the TAP's name): the other
        // order deadlocked a live clone when a frame arrived during its pause.
        let mut q = lock(queue);
        let tap = lock(tap);
        let size = q.size();
        // Passes after a wait for buffers found the driver's index moved; bounded, so that a
        // driver moving its index back and forth cannot keep this thread (and the queue's
        // lock) here. The frame then waits for the driver's notification, which comes: receive
        // notifications are never turned off.
        let mut passes = 0u32;
        let result = 'run: loop {
            // One look at the driver's index per pass. An index more than a ring ahead is an
            // error here (looking again would never find a chain to take).
            let mut chains = match AvailView::new(&q, mem) {
                Ok(c) => c,
                Err(e) => break Err(e.into()),
            };
            let seen = chains.avail_idx();
            let pass = loop {
                let Some(len) = self.pending else {
                    if budget == 0 {
                        break Ok(false);
                    }
                    budget -= 1;
                    match tap.as_ref().map(|t| t.read_frame(&mut self.buf)) {
                        Some(Ok(n)) if n >= VNET_HDR_LEN + 14 => self.pending = Some(n),
                        // A runt from the host: nothing to deliver.
                        Some(Ok(_)) => dropped += 1,
                        Some(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        // Empty (WouldBlock), gone, or failing: nothing to deliver now.
                        _ => break Ok(false),
                    }
                    continue;
                };
                let frame = &mut self.buf[..len];
                // The used index moves once for the frames of this run (before a wait for
                // buffers, and at the end), not once per frame.
                match queue_io::place_rx(
                    &mut chains,
                    size,
                    mem,
                    frame,
                    mergeable,
                    &mut self.scratch,
                ) {
                    Ok(RxOutcome::Delivered(_)) => {
                        self.pending = None;
                        delivered += 1;
                        bytes += (len - VNET_HDR_LEN) as u64;
                    }
                    Ok(RxOutcome::Dropped) => {
                        self.pending = None;
                        dropped += 1;
                    }
                    Ok(RxOutcome::NoBuffers) => break Ok(true),
                    Err(e) => break Err(e),
                }
            };
            // The chains taken (and not given back) are the device's now.
            q.set_next_avail(chains.next_avail());
            match pass {
                Ok(false) => break Ok(()),
                Err(e) => break Err(e),
                Ok(true) => {
                    // Not enough buffers: publish what was placed, ask for a notification when
                    // buffers come, and go on only if the driver added some since this pass
                    // looked (the chains it has are not enough, however often they are seen).
                    if let Err(e) = self.scratch.publish(&mut q, mem) {
                        break Err(e);
                    }
                    if let Err(e) = q.enable_notification(mem) {
                        break Err(e.into());
                    }
                    passes += 1;
                    match q.avail_idx(mem, Ordering::Acquire) {
                        Ok(i) if i.0 != seen && passes < MAX_RX_PASSES => continue 'run,
                        Ok(_) => break Ok(()),
                        Err(e) => break Err(e.into()),
                    }
                }
            }
        };
        // Frames placed before an error are published too: their chains are consumed.
        let published = self.scratch.publish(&mut q, mem);
        if delivered > 0 {
            DeviceCounters::add(&counters.deliveries, delivered);
            DeviceCounters::add(&counters.bytes_out, bytes);
        }
        if dropped > 0 {
            DeviceCounters::add(&counters.dropped, dropped);
        }
        if delivered > 0 && published.is_ok() {
            notify(&mut q, mem, interrupt)?;
        }
        result.and(published)
    }
}
