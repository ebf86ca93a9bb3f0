//! The machine's devices: the two buses, the legacy devices, and the virtio-mmio slots, each
//! with its transport and device in one list, plus the host-side handles the VMM keeps on some
//! of them (disks, NICs, vsock). Building them from the configuration (or from saved states),
//! holding them quiet, saving their states.

use std::sync::{Arc, Mutex, MutexGuard};

use block::Layer;
use devices::legacy::{
    ACPI_PM_LEN, ACPI_PM_PORT, AcpiPowerDevice, CMOS_LEN, CMOS_PORT, COM1_IRQ, COM1_LEN, COM1_PORT,
    Cmos, I8042, I8042_LEN, I8042_PORT, IrqTrigger, SerialDevice, SerialOutput, SerialSinkStats,
};
use devices::persist::{Persist, PersistError, SavedState, StateList};
use devices::virtio::blk::DiskSlot;
use devices::virtio::mmio::{self, MmioTransport};
use devices::virtio::net::NetHandle;
use devices::virtio::vsock::VsockHandle;
use devices::virtio::{Interrupt, VirtioDevice};
use devices::{Bus, PowerControl, bus::SharedDevice};
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::MachineError;
use crate::acpi::VirtioMmioDesc;
use crate::layout;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::{SnapshotError, names};
use crate::vm::{Vm, VmError};

/// A disk attached through virtio-blk: its layer (to fork it) and the device's disk slot (to
/// swap the running device onto a fork child).
#[derive(Debug, Clone)]
pub struct AttachedDisk {
    /// The layer the device serves now.
    pub layer: Arc<Layer>,
    /// The running device's disk slot.
    pub slot: DiskSlot,
}

/// A network device: its configured name and the handle on its TAP and address.
#[derive(Debug, Clone)]
pub struct AttachedNet {
    /// The configured `iface_id`.
    pub iface_id: String,
    /// The device's TAP and MAC.
    pub handle: NetHandle,
}

/// One virtio-mmio window: where it is, and the transport behind it (none for a raw MMIO
/// device placed with `Machine::add_virtio_mmio`).
struct VirtioSlot {
    desc: VirtioMmioDesc,
    transport: Option<Arc<Mutex<MmioTransport>>>,
}

/// Every transport's queues, locked (see [`DeviceManager::held`]).
pub(super) type QueueGuards<'a> = Vec<MutexGuard<'a, virtio_queue::Queue>>;

/// The devices of one machine.
pub(super) struct DeviceManager {
    pub(super) pio: Arc<Bus>,
    pub(super) mmio: Arc<Bus>,
    pub(super) power: Arc<PowerControl>,
    pub(super) serial: Arc<Mutex<SerialDevice>>,
    pub(super) serial_stats: Arc<SerialSinkStats>,
    pub(super) i8042: Arc<Mutex<I8042>>,
    pub(super) cmos: Arc<Mutex<Cmos>>,
    /// Raises the power button's GSI (the ACPI Generic Event Device's interrupt).
    pub(super) power_button: EventFd,
    slots: Vec<VirtioSlot>,
    pub(super) disks: Vec<AttachedDisk>,
    /// The vsock device's connections, if there is one.
    pub(super) vsock: Option<VsockHandle>,
    pub(super) nets: Vec<AttachedNet>,
}

/// Writes the saved state `name` (if `saved` is given) into `dev`, freshly built.
fn restore_named<P: Persist>(
    saved: Option<&[SavedState]>,
    name: &str,
    dev: &mut P,
) -> Result<(), SnapshotError> {
    let Some(list) = saved else {
        return Ok(());
    };
    let entry = list
        .entry(name)
        .ok_or_else(|| PersistError::Missing(name.to_owned()))?;
    Ok(entry.restore_into(dev)?)
}

/// The state of the device behind `dev` as the entry `name`.
fn save_device<P: Persist>(name: &str, dev: &Mutex<P>) -> Result<SavedState, SnapshotError> {
    let dev = dev.lock().unwrap_or_else(|p| p.into_inner());
    Ok(SavedState::save(name, &*dev)?)
}

impl DeviceManager {
    /// The buses and the legacy devices (serial to `out`), their interrupts wired into `vm`,
    /// each written with its saved state when `saved` is given.
    pub(super) fn new(
        vm: &Vm,
        out: SerialOutput,
        saved: Option<&[SavedState]>,
    ) -> Result<Self, MachineError> {
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let power = Arc::new(PowerControl::new());
        let mut serial = SerialDevice::new(IrqTrigger::new()?, out);
        restore_named(saved, names::SERIAL, &mut serial)?;
        vm.register_irqfd(serial.irq_evt(), COM1_IRQ)?;
        let serial_stats = serial.stats();
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(COM1_PORT, COM1_LEN, serial.clone())?;
        let mut i8042 = I8042::new(power.clone());
        restore_named(saved, names::I8042, &mut i8042)?;
        let i8042 = Arc::new(Mutex::new(i8042));
        pio.insert(I8042_PORT, I8042_LEN, i8042.clone())?;
        let mut cmos = Cmos::new();
        restore_named(saved, names::CMOS, &mut cmos)?;
        let cmos = Arc::new(Mutex::new(cmos));
        pio.insert(CMOS_PORT, CMOS_LEN, cmos.clone())?;
        pio.insert(
            ACPI_PM_PORT,
            ACPI_PM_LEN,
            Arc::new(Mutex::new(AcpiPowerDevice::new(power.clone()))),
        )?;
        let power_button = EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?;
        vm.register_irqfd(&power_button, layout::POWER_BUTTON_GSI)?;
        Ok(Self {
            pio,
            mmio,
            power,
            serial,
            serial_stats,
            i8042,
            cmos,
            power_button,
            slots: Vec::new(),
            disks: Vec::new(),
            vsock: None,
            nets: Vec::new(),
        })
    }

    /// Places `device` on the MMIO bus at the next virtio-mmio window with the next IRQ.
    pub(super) fn add_mmio(
        &mut self,
        device: SharedDevice,
        transport: Option<Arc<Mutex<MmioTransport>>>,
    ) -> Result<VirtioMmioDesc, MachineError> {
        let i = self.slots.len() as u64;
        let addr = layout::VIRTIO_MMIO_START + i * layout::VIRTIO_MMIO_SIZE;
        // GSIs 5..=23 on the IOAPIC but the legacy devices' lines; the window must stay below
        // the IOAPIC.
        let irq = match layout::virtio_mmio_irq(i) {
            Some(irq) if addr + layout::VIRTIO_MMIO_SIZE <= layout::IOAPIC_START => irq,
            _ => return Err(MachineError::VirtioSlots(self.slots.len())),
        };
        self.mmio.insert(addr, layout::VIRTIO_MMIO_SIZE, device)?;
        let desc = VirtioMmioDesc {
            addr,
            len: layout::VIRTIO_MMIO_SIZE,
            irq,
        };
        self.slots.push(VirtioSlot { desc, transport });
        Ok(desc)
    }

    /// Attaches `device` behind a new virtio-mmio transport: on the MMIO bus, its interrupt an
    /// irqfd, each queue's notification an ioeventfd.
    pub(super) fn add_virtio(
        &mut self,
        vm: &Vm,
        memory: &GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
    ) -> Result<VirtioMmioDesc, MachineError> {
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?;
        let interrupt = Interrupt::new(irq_evt.try_clone().map_err(MachineError::EventFd)?);
        let transport = MmioTransport::new(device, memory.clone(), interrupt)?;
        let queue_evts = transport
            .queue_events()
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(MachineError::EventFd)?;
        let transport = Arc::new(Mutex::new(transport));
        let desc = self.add_mmio(transport.clone(), Some(transport))?;
        vm.register_irqfd(&irq_evt, desc.irq)?;
        for (i, evt) in queue_evts.iter().enumerate() {
            let addr = IoEventAddress::Mmio(desc.addr + mmio::QUEUE_NOTIFY);
            #[allow(clippy::cast_possible_truncation)] // a few queues
            vm.fd()
                .register_ioevent(evt, &addr, i as u32)
                .map_err(|source| VmError::Setup {
                    op: "KVM_IOEVENTFD",
                    source,
                })?;
        }
        Ok(desc)
    }

    /// The virtio-mmio windows, in placement order.
    pub(super) fn descs(&self) -> Vec<VirtioMmioDesc> {
        self.slots.iter().map(|s| s.desc).collect()
    }

    /// The virtio-mmio transports, in the order their devices were added.
    pub(super) fn transports(&self) -> impl Iterator<Item = &Arc<Mutex<MmioTransport>>> {
        self.slots.iter().filter_map(|s| s.transport.as_ref())
    }

    /// Device types of the transports, in order.
    pub(super) fn virtio_types(&self) -> Vec<u32> {
        self.transports()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).device_type())
            .collect()
    }

    /// Runs `f` with every transport and every device queue locked: no MMIO register access
    /// and no device worker touching guest memory meanwhile.
    pub(super) fn held<R>(
        &self,
        f: impl FnOnce(&[MutexGuard<'_, MmioTransport>], &[QueueGuards<'_>]) -> R,
    ) -> R {
        let transports: Vec<_> = self
            .transports()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let guards: Vec<_> = transports.iter().map(|t| t.lock_queues()).collect();
        f(&transports, &guards)
    }

    /// Every device's state as a named entry, with the transports held by the caller
    /// (`transports` and `guards` from [`DeviceManager::held`]).
    pub(super) fn save_locked(
        &self,
        transports: &[MutexGuard<'_, MmioTransport>],
        guards: &[QueueGuards<'_>],
    ) -> Result<Vec<SavedState>, SnapshotError> {
        let mut out = vec![
            save_device(names::SERIAL, &self.serial)?,
            save_device(names::I8042, &self.i8042)?,
            save_device(names::CMOS, &self.cmos)?,
        ];
        for (i, (t, g)) in transports.iter().zip(guards).enumerate() {
            out.push(SavedState::encode(names::virtio(i), &t.state_locked(g))?);
        }
        for (i, n) in self.nets.iter().enumerate() {
            out.push(SavedState::save(names::net(i), &n.handle)?);
        }
        Ok(out)
    }

    /// Writes the saved transport states into the transports, freshly built in the same order.
    pub(super) fn restore_transports(&self, saved: &[SavedState]) -> Result<(), MachineError> {
        let count = saved
            .iter()
            .filter(|d| d.name.starts_with(names::VIRTIO_PREFIX))
            .count();
        let types = self.virtio_types();
        if types.len() != count {
            return Err(SnapshotError::Mismatch(format!(
                "{} virtio transports, the snapshot has {count}",
                types.len()
            ))
            .into());
        }
        for (index, t) in self.transports().enumerate() {
            let name = names::virtio(index);
            saved
                .entry(&name)
                .ok_or(PersistError::Missing(name))
                .and_then(|s| s.restore_into(&mut *t.lock().unwrap_or_else(|p| p.into_inner())))
                .map_err(|source| MachineError::VirtioRestore { index, source })?;
        }
        Ok(())
    }
}
