//! Virtio 1.x devices over the MMIO transport.
//!
//! The transport ([`mmio::MmioTransport`]) owns the queues while the driver sets them up; on
//! DRIVER_OK it hands them to the device ([`VirtioDevice::activate`]), which processes them when
//! a queue's notification eventfd fires (an ioeventfd registered with KVM, or signalled by the
//! transport itself on a QueueNotify write) and raises its interrupt through an eventfd (an irqfd).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vm_memory::bitmap::AtomicBitmap;
use vmm_sys_util::eventfd::EventFd;

pub mod blk;
pub mod mmio;
pub mod net;
pub mod ring_view;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod vsock;

/// Feature bit: the device complies with virtio 1.x (modern only; this transport refuses legacy).
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: the driver may use `VIRTQ_DESC_F_INDIRECT`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 =
    virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

/// Device status: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
/// Device status: the guest has a driver.
pub const STATUS_DRIVER: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER;
/// Device status: the driver is ready.
pub const STATUS_DRIVER_OK: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
/// Device status: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
/// Device status: the device hit an error and needs a reset.
pub const STATUS_NEEDS_RESET: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
/// Device status: the driver gave up on the device.
pub const STATUS_FAILED: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FAILED;

/// Interrupt status bit: a used buffer was added to a queue.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration changed (or NEEDS_RESET was set).
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// A queue shared between the transport (setup, snapshot) and the device worker (processing).
pub type SharedQueue = Arc<Mutex<Queue>>;

/// Guest memory as the devices see it: with a dirty bitmap, so that device writes into guest
/// memory are tracked for live copy just like vCPU writes (which KVM logs).
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Reader over the device-readable buffers of a chain in [`GuestMemory`].
pub type GuestReader<'a> = virtio_queue::Reader<'a, vm_memory::bitmap::BS<'a, AtomicBitmap>>;
/// Writer over the device-writable buffers of a chain in [`GuestMemory`].
pub type GuestWriter<'a> = virtio_queue::Writer<'a, vm_memory::bitmap::BS<'a, AtomicBitmap>>;

/// The device side of an interrupt line: an interrupt-status word shared with the transport and
/// an eventfd (an irqfd on the in-kernel irqchip) that raises the line.
#[derive(Debug, Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    event: Arc<EventFd>,
    broken: Arc<AtomicBool>,
}

impl Interrupt {
    /// Wraps the eventfd that raises the guest interrupt.
    pub fn new(event: EventFd) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            event: Arc::new(event),
            broken: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Called by a device whose queue is unusable: the transport then reports NEEDS_RESET.
    pub fn set_needs_reset(&self) {
        self.broken.store(true, Ordering::SeqCst);
        self.trigger(INT_CONFIG);
    }

    /// Whether a device asked for a reset since the last [`Interrupt::clear_needs_reset`].
    pub fn needs_reset(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Forgets a reset request (the driver reset the device).
    pub fn clear_needs_reset(&self) {
        self.broken.store(false, Ordering::SeqCst);
    }

    /// Raises the interrupt with `bits` (`INT_VRING` / `INT_CONFIG`) set in the status.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        // A full eventfd counter (2^64-2) is the only failure; the line is then already raised.
        let _ = self.event.write(1);
    }

    /// The interrupt status bits the driver has not acknowledged yet.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears `bits` (the driver's InterruptACK write).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd raising the line (for registering as an irqfd, or reading in tests).
    pub fn eventfd(&self) -> &EventFd {
        &self.event
    }
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The queues, configured and validated by the transport (shared so it can snapshot them).
    pub queues: Vec<SharedQueue>,
    /// One notification eventfd per queue (clones of the transport's).
    pub queue_events: Vec<EventFd>,
    /// The interrupt line.
    pub interrupt: Interrupt,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// Errors a device reports when it cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("device expects {expected} queues, got {got}")]
    QueueCount {
        /// Expected.
        expected: usize,
        /// Received.
        got: usize,
    },
    /// Cloning an eventfd or spawning the worker failed.
    #[error("cannot start the device worker")]
    Worker(#[source] std::io::Error),
}

/// Request counters of one device, shared between the device and its worker (metrics).
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Requests (blk) or packets from the guest (vsock TX) completed.
    pub requests: std::sync::atomic::AtomicU64,
    /// Payload bytes from the guest (blk writes, vsock TX).
    pub bytes_in: std::sync::atomic::AtomicU64,
    /// Packets to the guest (vsock RX).
    pub deliveries: std::sync::atomic::AtomicU64,
    /// Payload bytes to the guest (blk reads, vsock RX).
    pub bytes_out: std::sync::atomic::AtomicU64,
    /// Frames dropped (net: malformed, oversized, or no link/buffers for them).
    pub dropped: std::sync::atomic::AtomicU64,
}

impl DeviceCounters {
    /// Adds `n` to a counter.
    pub fn add(c: &std::sync::atomic::AtomicU64, n: u64) {
        c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// `(name, value)` pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        vec![
            ("requests", self.requests.load(Relaxed)),
            ("bytes_in", self.bytes_in.load(Relaxed)),
            ("deliveries", self.deliveries.load(Relaxed)),
            ("bytes_out", self.bytes_out.load(Relaxed)),
            ("dropped", self.dropped.load(Relaxed)),
        ]
    }
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (1 = net, 2 = block, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (must include `VIRTIO_F_VERSION_1`).
    fn device_features(&self) -> u64;
    /// Reads the device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space (most devices ignore writes).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device on the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device's worker (the driver wrote 0 to Status, or the VM is torn down).
    fn reset(&mut self);
    /// The device's request counters, if it keeps any (metrics).
    fn counters(&self) -> Option<Arc<DeviceCounters>> {
        None
    }
}

/// A device's worker thread and the eventfd that stops it.
#[derive(Debug)]
pub struct WorkerThread {
    kill: EventFd,
    handle: std::thread::JoinHandle<()>,
}

impl WorkerThread {
    /// Spawns `body` on a thread named `name`; `body` must return once its eventfd is readable.
    /// The thread runs under the device-worker seccomp filter when the sandbox is on (every
    /// device starts its workers here, so a new device gets the filter with no more code; what
    /// that filter allows is `sandbox`'s `ThreadKind::DeviceWorker`).
    pub fn spawn(
        name: &str,
        body: impl FnOnce(&EventFd) + Send + 'static,
    ) -> Result<Self, ActivateError> {
        let kill =
            EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let kill_worker = kill.try_clone().map_err(ActivateError::Worker)?;
        let handle = sandbox::spawn(
            sandbox::ThreadKind::DeviceWorker,
            std::thread::Builder::new().name(name.to_owned()),
            move || body(&kill_worker),
        )
        .map_err(ActivateError::Worker)?;
        Ok(Self { kill, handle })
    }

    /// Signals the worker to stop and waits for it.
    pub fn stop(self) {
        let _ = self.kill.write(1);
        let _ = self.handle.join();
    }
}

/// Publishes `(head, len)` used entries in one step: the elements go out in runs of
/// consecutive ring slots (one guest-memory write each, up to where the ring wraps), then the
/// used index moves once, so a driver never sees part of the batch (a mergeable frame's chains,
/// say). With `VIRTIO_F_EVENT_IDX` in use the entries go through `Queue::add_used` one by one
/// instead, which keeps the queue's count for `needs_notification` right.
pub fn publish_used(
    queue: &mut Queue,
    mem: &GuestMemory,
    entries: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    use virtio_queue::{Error, QueueT};
    use vm_memory::{Bytes, GuestAddress};
    if entries.is_empty() {
        return Ok(());
    }
    if queue.event_idx_enabled() {
        for &(head, len) in entries {
            queue.add_used(mem, head, len)?;
        }
        return Ok(());
    }
    let size = queue.size();
    if size == 0 {
        return Err(Error::InvalidSize);
    }
    let ring = queue.used_ring();
    let write_run = |slot: u16, elems: &[u8]| -> Result<(), Error> {
        let at = ring
            .checked_add(4 + u64::from(slot) * 8)
            .ok_or(Error::AddressOverflow)?;
        mem.write_slice(elems, GuestAddress(at))
            .map_err(Error::GuestMemory)
    };
    let mut idx = queue.next_used();
    let mut run = [0u8; 8 * 16];
    let mut k = 0usize;
    let mut run_start = idx;
    for &(head, len) in entries {
        if head >= size {
            return Err(Error::InvalidDescriptorIndex);
        }
        if k == run.len() / 8 || (k > 0 && idx.is_multiple_of(size)) {
            write_run(run_start % size, &run[..k * 8])?;
            k = 0;
            run_start = idx;
        }
        let elem = u64::from(head) | (u64::from(len) << 32);
        run[k * 8..k * 8 + 8].copy_from_slice(&elem.to_le_bytes());
        k += 1;
        idx = idx.wrapping_add(1);
    }
    if k > 0 {
        write_run(run_start % size, &run[..k * 8])?;
    }
    let at = ring.checked_add(2).ok_or(Error::AddressOverflow)?;
    mem.store(idx.to_le(), GuestAddress(at), Ordering::Release)
        .map_err(Error::GuestMemory)?;
    queue.set_next_used(idx);
    Ok(())
}
