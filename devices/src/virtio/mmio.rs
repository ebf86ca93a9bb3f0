//! The virtio-mmio transport, version 2 (virtio 1.x "modern" register layout only).

use std::sync::{Arc, Mutex};
use virtio_bindings::virtio_mmio as vm;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    Activation, GuestMemory, INT_CONFIG, Interrupt, STATUS_ACKNOWLEDGE, STATUS_DRIVER,
    STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET, SharedQueue,
    VIRTIO_F_VERSION_1, VirtioDevice,
};

/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// `MagicValue` register: "virt".
pub const MAGIC: u32 = 0x7472_6976;
/// Vendor ID this VMM reports ("MVMM").
pub const VENDOR_ID: u32 = 0x4d4d_564d;

const REG_MAGIC: u64 = vm::VIRTIO_MMIO_MAGIC_VALUE as u64;
const REG_VERSION: u64 = vm::VIRTIO_MMIO_VERSION as u64;
const REG_DEVICE_ID: u64 = vm::VIRTIO_MMIO_DEVICE_ID as u64;
const REG_VENDOR_ID: u64 = vm::VIRTIO_MMIO_VENDOR_ID as u64;
const REG_DEVICE_FEATURES: u64 = vm::VIRTIO_MMIO_DEVICE_FEATURES as u64;
const REG_DEVICE_FEATURES_SEL: u64 = vm::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const REG_DRIVER_FEATURES: u64 = vm::VIRTIO_MMIO_DRIVER_FEATURES as u64;
const REG_DRIVER_FEATURES_SEL: u64 = vm::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const REG_QUEUE_SEL: u64 = vm::VIRTIO_MMIO_QUEUE_SEL as u64;
const REG_QUEUE_NUM_MAX: u64 = vm::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const REG_QUEUE_NUM: u64 = vm::VIRTIO_MMIO_QUEUE_NUM as u64;
const REG_QUEUE_READY: u64 = vm::VIRTIO_MMIO_QUEUE_READY as u64;
/// Offset of the QueueNotify register (where the VMM registers ioeventfds).
pub const QUEUE_NOTIFY: u64 = vm::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const REG_QUEUE_NOTIFY: u64 = QUEUE_NOTIFY;
const REG_INTERRUPT_STATUS: u64 = vm::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const REG_INTERRUPT_ACK: u64 = vm::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const REG_STATUS: u64 = vm::VIRTIO_MMIO_STATUS as u64;
const REG_QUEUE_DESC_LOW: u64 = vm::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const REG_QUEUE_DESC_HIGH: u64 = vm::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const REG_QUEUE_DRIVER_LOW: u64 = vm::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const REG_QUEUE_DRIVER_HIGH: u64 = vm::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const REG_QUEUE_DEVICE_LOW: u64 = vm::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const REG_QUEUE_DEVICE_HIGH: u64 = vm::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const REG_SHM_LEN_LOW: u64 = vm::VIRTIO_MMIO_SHM_LEN_LOW as u64;
const REG_SHM_LEN_HIGH: u64 = vm::VIRTIO_MMIO_SHM_LEN_HIGH as u64;
const REG_CONFIG_GENERATION: u64 = vm::VIRTIO_MMIO_CONFIG_GENERATION as u64;
const REG_CONFIG: u64 = vm::VIRTIO_MMIO_CONFIG as u64;

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// Creating a queue or eventfd failed.
    #[error("cannot create queue {index} of max size {max_size}")]
    Queue {
        /// Queue index.
        index: usize,
        /// Requested maximum size.
        max_size: u16,
    },
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A saved state does not fit this device.
    #[error("saved transport state does not fit the device: {0}")]
    BadState(&'static str),
}

/// Saved queue registers (the parts of `virtio_queue::QueueState` a restore needs).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// Size chosen by the driver.
    pub size: u16,
    /// Ready flag.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available index the device will read.
    pub next_avail: u16,
    /// Next used index the device will write.
    pub next_used: u16,
    /// Whether VIRTIO_F_EVENT_IDX is in use.
    pub event_idx: bool,
}

impl QueueSnapshot {
    fn of(q: &Queue) -> Self {
        Self {
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
        }
    }

    fn apply(&self, q: &mut Queue) {
        q.set_size(self.size);
        set_addr(self.desc_table, |l, h| q.set_desc_table_address(l, h));
        set_addr(self.avail_ring, |l, h| q.set_avail_ring_address(l, h));
        set_addr(self.used_ring, |l, h| q.set_used_ring_address(l, h));
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        q.set_event_idx(self.event_idx);
        q.set_ready(self.ready);
    }
}

/// Locks a queue; a worker that panicked while holding it leaves a usable queue behind.
fn lock(q: &SharedQueue) -> std::sync::MutexGuard<'_, Queue> {
    q.lock().unwrap_or_else(|p| p.into_inner())
}

fn set_addr(addr: u64, mut f: impl FnMut(Option<u32>, Option<u32>)) {
    #[allow(clippy::cast_possible_truncation)] // the low half, on purpose
    let low = addr as u32;
    #[allow(clippy::cast_possible_truncation)] // fits after the shift
    f(Some(low), Some((addr >> 32) as u32));
}

/// The transport registers, serializable for snapshot and clone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioState {
    /// Device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// Features accepted by the driver.
    pub driver_features: u64,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Unacknowledged interrupt status bits.
    pub interrupt_status: u32,
    /// Queue registers and ring positions.
    pub queues: Vec<QueueSnapshot>,
}

/// A virtio device behind the MMIO register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Interrupt,
    queues: Vec<SharedQueue>,
    queue_events: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    config_generation: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Puts `device` behind a transport; `interrupt` raises its line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        interrupt: Interrupt,
    ) -> Result<Self, MmioError> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for (index, &max_size) in device.queue_max_sizes().iter().enumerate() {
            queues.push(Arc::new(Mutex::new(
                Queue::new(max_size).map_err(|_| MmioError::Queue { index, max_size })?,
            )));
            queue_events.push(EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_events,
            status: 0,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The per-queue notification eventfds (register them as ioeventfds at
    /// `base + 0x50` with datamatch = queue index).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The interrupt line of this device.
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// The virtio device type of the device behind this transport.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The device's request counters, if it keeps any.
    pub fn counters(&self) -> Option<std::sync::Arc<super::DeviceCounters>> {
        self.device.counters()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device is running (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The register state (queues included) for a snapshot.
    pub fn state(&self) -> MmioState {
        let guards = self.lock_queues();
        self.state_locked(&guards)
    }

    /// Locks every queue. A device worker touches guest memory only while it holds its queue's
    /// lock, so while the guards live the device neither reads nor writes guest RAM (used with
    /// the vCPUs paused to take a consistent copy of memory and device state).
    pub fn lock_queues(&self) -> Vec<std::sync::MutexGuard<'_, Queue>> {
        self.queues.iter().map(lock).collect()
    }

    /// Like [`MmioTransport::state`], with the queues already locked by
    /// [`MmioTransport::lock_queues`].
    pub fn state_locked(&self, queues: &[std::sync::MutexGuard<'_, Queue>]) -> MmioState {
        MmioState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: queues.iter().map(|q| QueueSnapshot::of(q)).collect(),
        }
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK, on a queue not ready.
    fn queue_config_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }
}

impl crate::persist::Versioned for MmioState {
    const KIND: &'static str = "virtio-mmio";
    const VERSION: u32 = 1;
}

impl crate::persist::Persist for MmioTransport {
    type State = MmioState;
    type Error = MmioError;

    /// [`MmioTransport::state`].
    fn save(&self) -> Result<MmioState, MmioError> {
        Ok(self.state())
    }

    /// Restores registers saved by [`MmioTransport::state`] into a fresh transport; a device that
    /// was running is activated again on the restored queues.
    fn restore(&mut self, state: &MmioState) -> Result<(), MmioError> {
        if self.activated {
            return Err(MmioError::BadState("transport already active"));
        }
        if state.queues.len() != self.queues.len() {
            return Err(MmioError::BadState("queue count differs"));
        }
        for (q, s) in self.queues.iter().zip(&state.queues) {
            let mut q = lock(q);
            if s.size > q.max_size() {
                return Err(MmioError::BadState("queue size above maximum"));
            }
            s.apply(&mut q);
        }
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features = state.driver_features;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.interrupt.ack(u32::MAX);
        if state.interrupt_status != 0 {
            self.interrupt.trigger(state.interrupt_status);
        }
        if self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0 {
            self.activate();
        }
        Ok(())
    }
}

impl MmioTransport {
    fn with_config_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if !self.queue_config_allowed() {
            return;
        }
        if let Some(q) = self.queues.get(self.queue_sel as usize) {
            let mut q = lock(q);
            if !q.ready() {
                f(&mut q);
            }
        }
    }

    /// Marks the device broken: the driver sees NEEDS_RESET and a config interrupt.
    fn needs_reset(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        self.interrupt.trigger(INT_CONFIG);
    }

    fn activate(&mut self) {
        let all_ready_and_valid = self.queues.iter().all(|q| {
            let q = lock(q);
            q.ready() && q.is_valid(&self.mem)
        });
        if !all_ready_and_valid {
            self.needs_reset();
            return;
        }
        let queue_events: Result<Vec<EventFd>, _> =
            self.queue_events.iter().map(EventFd::try_clone).collect();
        let Ok(queue_events) = queue_events else {
            self.needs_reset();
            return;
        };
        let activation = Activation {
            mem: self.mem.clone(),
            queues: self.queues.iter().map(Arc::clone).collect(),
            queue_events,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        };
        match self.device.activate(activation) {
            Ok(()) => self.activated = true,
            Err(_) => self.needs_reset(),
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &self.queues {
            lock(q).reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
        self.interrupt.clear_needs_reset();
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only adds bits; anything else (clearing bits) is ignored.
        if value & self.status != self.status {
            return;
        }
        let added = value & !self.status;
        if added & STATUS_FEATURES_OK != 0 {
            let offered = self.device.device_features();
            let ok = self.status & STATUS_DRIVER != 0
                && self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                // Not setting FEATURES_OK tells the driver the subset is unacceptable.
                self.status = value & !(STATUS_FEATURES_OK | STATUS_DRIVER_OK);
                return;
            }
        }
        if added & STATUS_DRIVER_OK != 0 && (value & STATUS_FEATURES_OK == 0 || self.activated) {
            return;
        }
        self.status = value;
        if added & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize).map(|q| lock(q));
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => 2,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                // The low and high halves of the feature word, on purpose.
                #[allow(clippy::cast_possible_truncation)]
                0 => self.device.device_features() as u32,
                #[allow(clippy::cast_possible_truncation)]
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => {
                if self.interrupt.needs_reset() {
                    self.status | STATUS_NEEDS_RESET
                } else {
                    self.status
                }
            }
            // No shared memory regions: length -1 means "does not exist".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES
                if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) == STATUS_DRIVER =>
            {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v);
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32);
                    }
                    _ => {}
                }
            }
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                // A size above u16::MAX is invalid: ignored, like other invalid sizes.
                if let Ok(n) = u16::try_from(v) {
                    self.with_config_queue(|q| q.set_size(n));
                }
            }
            REG_QUEUE_READY => self.with_config_queue(|q| q.set_ready(v == 1)),
            REG_QUEUE_NOTIFY => {
                if self.activated
                    && let Some(ev) = self.queue_events.get(v as usize)
                {
                    let _ = ev.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.write_status(v),
            REG_QUEUE_DESC_LOW => {
                self.with_config_queue(|q| q.set_desc_table_address(Some(v), None));
            }
            REG_QUEUE_DESC_HIGH => {
                self.with_config_queue(|q| q.set_desc_table_address(None, Some(v)));
            }
            REG_QUEUE_DRIVER_LOW => {
                self.with_config_queue(|q| q.set_avail_ring_address(Some(v), None));
            }
            REG_QUEUE_DRIVER_HIGH => {
                self.with_config_queue(|q| q.set_avail_ring_address(None, Some(v)));
            }
            REG_QUEUE_DEVICE_LOW => {
                self.with_config_queue(|q| q.set_used_ring_address(Some(v), None));
            }
            REG_QUEUE_DEVICE_HIGH => {
                self.with_config_queue(|q| q.set_used_ring_address(None, Some(v)));
            }
            _ => {}
        }
    }

    /// A guest read in the window (`offset` from its base).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        // Registers are 32 bits wide and must be read whole and aligned.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    /// A guest write in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            if self.status & STATUS_DRIVER != 0 && self.status & STATUS_FAILED == 0 {
                self.device.write_config(offset - REG_CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }

    /// True when the device has been acknowledged by a driver (for logs).
    pub fn driver_present(&self) -> bool {
        self.status & STATUS_ACKNOWLEDGE != 0
    }
}

impl crate::bus::BusDevice for MmioTransport {
    fn name(&self) -> &str {
        match self.device.device_type() {
            2 => "virtio-blk",
            19 => "virtio-vsock",
            _ => "virtio-mmio",
        }
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}
