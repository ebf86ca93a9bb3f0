//! A whole VM: config -> [`Machine::new`] (VM, memory, legacy devices) -> optional extra devices
//! ([`Machine::add_virtio_mmio`], [`Machine::pio_bus`]) -> [`Machine::boot`] (kernel, ACPI, boot
//! state) -> [`Machine::start`] (vCPU threads) -> [`Machine::wait`] / [`Machine::pause`] /
//! [`Machine::resume`] / [`Machine::stop`].

use std::fs::File;
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block::{Base, Delta, Layer};
use devices::legacy::{
    ACPI_PM_LEN, ACPI_PM_PORT, AcpiPowerDevice, CMOS_LEN, CMOS_PORT, COM1_IRQ, COM1_LEN, COM1_PORT,
    Cmos, I8042, I8042_LEN, I8042_PORT, IrqTrigger, SerialDevice, SerialError, SerialOutput,
    SerialSinkStats,
};
use devices::virtio::blk::{Block, DiskSlot};
use devices::virtio::mmio::{self, MmioTransport};
use devices::virtio::net::{MacAddr, Net, NetHandle, tap::Tap};
use devices::virtio::vsock::Vsock;
use devices::virtio::{Interrupt, VirtioDevice};
use devices::{Bus, BusError, PowerControl, PowerEvent, bus::SharedDevice};
use kvm_ioctls::IoEventAddress;
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::acpi::{self, AcpiError, VirtioMmioDesc};
use crate::boot::{self, BootError};
use crate::config::{ConsoleTarget, DEFAULT_CMDLINE, DiskConfig, KernelSource, MachineConfig};
use crate::cpuid::{self, CpuidError, HostKvm};
use crate::guests::{self, GuestKitError, TestGuest};
use crate::layout;
use crate::memory::{GuestMemoryMmap, GuestRam, MemoryError};
use crate::regs::{self, BootEntry, RegsError};
use crate::snapshot::{DeviceStates, SnapshotError};
use crate::vcpu::{
    Vcpu, VcpuError, VcpuEvent, VcpuExitReport, VcpuHandle, VcpuHandleError, VcpuIo, VcpuResponse,
    VcpuStop, VcpuTask,
};
use crate::vm::{self, Vm, VmError};

#[path = "lifecycle.rs"]
mod lifecycle;
pub use lifecycle::{CloneError, CloneOptions, CloneRound, CloneTimeline};

/// How long a vCPU thread may take to acknowledge a pause or resume.
const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Lifecycle of a [`Machine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// VM and devices exist; nothing loaded.
    Created,
    /// Kernel loaded, vCPUs configured.
    Booted,
    /// vCPU threads running the guest.
    Running,
    /// vCPU threads parked.
    Paused,
    /// The guest stopped (or the machine was stopped); vCPU threads are gone.
    Stopped,
}

impl VmState {
    fn can_go(self, to: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, to),
            (Created, Booted)
                | (Booted, Running)
                | (Running, Paused)
                | (Paused, Running)
                | (Created | Booted | Running | Paused, Stopped)
        )
    }
}

/// How the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The guest powered off.
    PowerOff,
    /// The guest reset the machine (i8042 or ACPI reset); the VMM ends the VM.
    Reset,
    /// A vCPU halted with nothing to wake it.
    Halted,
    /// [`Machine::stop`] was called.
    Stopped,
}

/// Errors of building and running a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Bad vCPU count.
    #[error("invalid vCPU count {count} (1..={max})")]
    VcpuCount {
        /// Requested.
        count: u8,
        /// Maximum.
        max: usize,
    },
    /// Not enough memory for the image.
    #[error(
        "{mem_mib} MiB of guest memory is too little: the kernel and initrd need at least {need_mib} MiB"
    )]
    MemoryTooSmall {
        /// Configured.
        mem_mib: u64,
        /// Needed.
        need_mib: u64,
    },
    /// A file could not be opened.
    #[error("cannot open {what} {path}")]
    Open {
        /// What file.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// KVM or VM setup failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory setup failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// CPUID setup failed.
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    /// Boot table setup failed.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// Kernel, initrd or boot parameter loading failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// ACPI table setup failed.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// Device bus registration failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Serial device setup failed.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// Test-guest lookup failed.
    #[error(transparent)]
    Guest(#[from] GuestKitError),
    /// Too many virtio-mmio devices.
    #[error("no room for another virtio-mmio device ({0} already)")]
    VirtioSlots(usize),
    /// The guest ended with an error, or a vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Handing vsock connections over failed.
    #[error("vsock connection handover failed")]
    Handover(#[from] crate::handover::HandoverError),
    /// Driving a vCPU thread failed.
    #[error(transparent)]
    VcpuHandle(#[from] VcpuHandleError),
    /// A vCPU answered a pause/resume with something else.
    #[error("vCPU {id} answered {got:?} to {sent:?}{}", why.as_deref().map(|w| format!(" ({w})")).unwrap_or_default())]
    VcpuAnswer {
        /// vCPU.
        id: u8,
        /// Request.
        sent: VcpuEvent,
        /// Answer.
        got: VcpuResponse,
        /// Why its thread finished, when it did (the stop or error it reported).
        why: Option<String>,
    },
    /// An operation in the wrong lifecycle state.
    #[error("cannot go from {from:?} to {to:?}")]
    InvalidTransition {
        /// Current.
        from: VmState,
        /// Requested.
        to: VmState,
    },
    /// The guest did not stop in time.
    #[error("the guest is still running after {0:?}")]
    Timeout(Duration),
    /// A live clone was refused.
    #[error("cannot clone the machine")]
    Clone(#[from] CloneError),
    /// No attached disk has this index.
    #[error("no disk {index} (the machine has {count})")]
    NoSuchDisk {
        /// Requested index.
        index: usize,
        /// Attached disks.
        count: usize,
    },
    /// A replacement disk differs from the attached one in size or writability.
    #[error("disk {index} cannot be replaced by {path}: it differs in size or writability")]
    DiskReplace {
        /// Disk index.
        index: usize,
        /// The replacement's path.
        path: PathBuf,
    },
    /// The command line is invalid.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// A disk could not be opened as a block layer.
    #[error("cannot attach disk {path}")]
    Disk {
        /// Path.
        path: PathBuf,
        /// The error.
        #[source]
        source: block::BlockError,
    },
    /// A raw image can only be attached read-only.
    #[error(
        "raw image {0} can only be attached read-only; attach a delta on it \
         (`microvmm disk create -f delta -b IMAGE DIR`) to write"
    )]
    RawWritable(PathBuf),
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A virtio transport could not be set up.
    #[error(transparent)]
    Virtio(#[from] devices::virtio::mmio::MmioError),
    /// The vsock device configuration is invalid.
    #[error(transparent)]
    Vsock(devices::virtio::vsock::VsockError),
    /// Saving or restoring VM state failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A network interface's TAP could not be attached.
    #[error("network interface {iface}")]
    Net {
        /// The `iface_id`.
        iface: String,
        /// The error.
        #[source]
        source: devices::virtio::net::tap::TapError,
    },
    /// Two network interfaces have the same `iface_id`, or the same TAP.
    #[error("network interface {0} is configured twice (each iface_id and TAP once)")]
    NetDuplicate(String),
    /// A network device could not be created or its TAP moved.
    #[error("network device")]
    NetDevice(#[from] devices::virtio::net::NetError),
    /// [`Machine::take_over_net`] needs two paused machines with the same number of NICs.
    #[error("TAP takeover: {0}")]
    NetTakeover(String),
    /// The request needs a running guest (the power button).
    #[error("the VM is {0:?}, not running")]
    NotRunning(VmState),
    /// A virtio transport's saved state could not be restored.
    #[error("cannot restore virtio transport {index}")]
    VirtioRestore {
        /// Transport index.
        index: usize,
        /// The error.
        #[source]
        source: devices::virtio::mmio::MmioError,
    },
}

/// Times of a machine's life, for boot and exit latency figures.
#[derive(Debug, Clone, Copy)]
pub struct Timeline {
    /// Just before KVM_CREATE_VM.
    pub created: Instant,
    /// When the vCPU threads were started.
    pub started: Option<Instant>,
    /// When [`Machine::wait`] saw the guest stop and had joined the vCPU threads.
    pub stopped: Option<Instant>,
}

/// A VM with its devices and vCPUs.
pub struct Machine {
    cfg: MachineConfig,
    host: HostKvm,
    vm: Vm,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    power: Arc<PowerControl>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_stats: Arc<SerialSinkStats>,
    i8042: Arc<Mutex<I8042>>,
    cmos: Arc<Mutex<Cmos>>,
    /// Raises the power button's GSI (the ACPI Generic Event Device's interrupt).
    power_button: EventFd,
    virtio: Vec<VirtioMmioDesc>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    disks: Vec<AttachedDisk>,
    /// The vsock device's connections, if there is one.
    vsock: Option<devices::virtio::vsock::VsockHandle>,
    nets: Vec<AttachedNet>,
    vcpus: Vec<Vcpu>,
    handles: Vec<VcpuHandle>,
    exit_tx: Sender<VcpuExitReport>,
    exit_rx: Receiver<VcpuExitReport>,
    state: VmState,
    timeline: Timeline,
    exits: Arc<crate::vcpu::ExitCounters>,
    ack_timeout: Duration,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("cfg", &self.cfg)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

fn console_output(target: &ConsoleTarget) -> Result<SerialOutput, MachineError> {
    Ok(match target {
        ConsoleTarget::Stdout => SerialOutput::Stdout,
        ConsoleTarget::Null => SerialOutput::Sink,
        ConsoleTarget::File(p) => {
            SerialOutput::File(File::create(p).map_err(|source| MachineError::Open {
                what: "console file",
                path: p.clone(),
                source,
            })?)
        }
    })
}

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

/// Opens the TAPs of `cfg.net` (before anything else is built, so that a missing or forbidden
/// TAP is an error before the VM exists) with each device's address: the configured one, else
/// the saved one, else a random one.
fn open_nets(
    cfg: &MachineConfig,
    saved: Option<&DeviceStates>,
) -> Result<Vec<(String, Tap, MacAddr)>, MachineError> {
    let mut out: Vec<(String, Tap, MacAddr)> = Vec::with_capacity(cfg.net.len());
    for (i, n) in cfg.net.iter().enumerate() {
        if cfg.net[..i].iter().any(|o| {
            o.iface_id == n.iface_id
                || (!n.host_dev_name.is_empty() && o.host_dev_name == n.host_dev_name)
        }) {
            return Err(MachineError::NetDuplicate(n.iface_id.clone()));
        }
        let tap = if n.host_dev_name.is_empty() {
            Tap::open_detached()
        } else {
            Tap::open(&n.host_dev_name)
        }
        .map_err(|source| MachineError::Net {
            iface: n.iface_id.clone(),
            source,
        })?;
        let mac = n
            .guest_mac
            .or_else(|| saved.and_then(|d| d.net.get(i)).map(|s| s.mac))
            .unwrap_or_else(MacAddr::random_local);
        out.push((n.iface_id.clone(), tap, mac));
    }
    Ok(out)
}

/// Opens a disk as a block layer: a directory is a delta, a file a raw base (read-only).
fn open_disk(d: &DiskConfig) -> Result<Arc<Layer>, MachineError> {
    let err = |source| MachineError::Disk {
        path: d.path.clone(),
        source,
    };
    let meta = std::fs::metadata(&d.path).map_err(|source| MachineError::Open {
        what: "disk",
        path: d.path.clone(),
        source,
    })?;
    if meta.is_dir() {
        let delta = if d.read_only {
            Delta::open_read_only(&d.path)
        } else {
            Delta::open(&d.path)
        };
        return Ok(Arc::new(Layer::Delta(delta.map_err(err)?)));
    }
    if !d.read_only {
        return Err(MachineError::RawWritable(d.path.clone()));
    }
    Ok(Arc::new(Layer::Base(Base::open(&d.path).map_err(err)?)))
}

fn open(what: &'static str, path: &PathBuf) -> Result<File, MachineError> {
    File::open(path).map_err(|source| MachineError::Open {
        what,
        path: path.clone(),
        source,
    })
}

impl Machine {
    /// Creates the VM, its memory and legacy devices. The serial console goes to the config's
    /// target, or to `console` if given (tests pass a buffer).
    pub fn new(cfg: MachineConfig, console: Option<SerialOutput>) -> Result<Self, MachineError> {
        Self::with_ram(cfg, console, None)
    }

    /// Like [`Machine::new`], but on existing guest RAM (e.g. a memfd shared with or copied from
    /// another VM) instead of fresh zeroed memory; its size replaces `cfg.mem_mib`.
    pub fn with_ram(
        cfg: MachineConfig,
        console: Option<SerialOutput>,
        ram: Option<GuestRam>,
    ) -> Result<Self, MachineError> {
        Self::build(cfg, console, ram, None, None, None)
    }

    /// Builds a machine on optional existing RAM, optional already opened disks (instead of
    /// `cfg.disks`), optional saved device state and the vsock sockets handed over with it.
    pub(crate) fn build(
        mut cfg: MachineConfig,
        console: Option<SerialOutput>,
        ram: Option<GuestRam>,
        layers: Option<Vec<Arc<Layer>>>,
        saved: Option<&DeviceStates>,
        handover: Option<crate::handover::VsockHandover>,
    ) -> Result<Self, MachineError> {
        if let Some(r) = &ram {
            cfg.mem_mib = r.size() >> 20;
        }
        let created = Instant::now();
        // The TAPs first: a missing or forbidden one is a configuration error.
        let taps = open_nets(&cfg, saved)?;
        let kvm = vm::open_kvm()?;
        let max = kvm.get_max_vcpus().min(254);
        let limit = match cfg.kernel {
            KernelSource::TestGuest(_) => max.min(usize::from(guests::MAX_CPUS)),
            KernelSource::File(_) => max,
        };
        if cfg.vcpus == 0 || usize::from(cfg.vcpus) > limit {
            return Err(MachineError::VcpuCount {
                count: cfg.vcpus,
                max: limit,
            });
        }
        let disks = match layers {
            Some(l) => l,
            None => cfg
                .disks
                .iter()
                .map(open_disk)
                .collect::<Result<Vec<_>, _>>()?,
        };
        let ram = match ram {
            Some(r) => r,
            None => GuestRam::new(cfg.mem_mib.saturating_mul(1 << 20))?,
        };
        let vm = Vm::new(kvm, ram)?;

        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let power = Arc::new(PowerControl::new());
        let out = match console {
            Some(o) => o,
            None => console_output(&cfg.console)?,
        };
        let serial_dev = match saved {
            Some(d) => SerialDevice::restore(&d.serial, IrqTrigger::new()?, out)?,
            None => SerialDevice::new(IrqTrigger::new()?, out),
        };
        vm.register_irqfd(serial_dev.irq_evt(), COM1_IRQ)?;
        let serial_stats = serial_dev.stats();
        let serial = Arc::new(Mutex::new(serial_dev));
        pio.insert(COM1_PORT, COM1_LEN, serial.clone())?;
        let i8042 = Arc::new(Mutex::new(match saved {
            Some(d) => I8042::restore(power.clone(), &d.i8042),
            None => I8042::new(power.clone()),
        }));
        pio.insert(I8042_PORT, I8042_LEN, i8042.clone())?;
        let cmos = Arc::new(Mutex::new(match saved {
            Some(d) => Cmos::restore(&d.cmos),
            None => Cmos::new(),
        }));
        pio.insert(CMOS_PORT, CMOS_LEN, cmos.clone())?;
        pio.insert(
            ACPI_PM_PORT,
            ACPI_PM_LEN,
            Arc::new(Mutex::new(AcpiPowerDevice::new(power.clone()))),
        )?;
        let power_button = EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?;
        vm.register_irqfd(&power_button, layout::POWER_BUTTON_GSI)?;

        let (exit_tx, exit_rx) = channel();
        let mut machine = Self {
            cfg,
            host: HostKvm::detect(),
            vm,
            pio,
            mmio,
            power,
            serial,
            serial_stats,
            i8042,
            cmos,
            power_button,
            virtio: Vec::new(),
            vcpus: Vec::new(),
            handles: Vec::new(),
            exit_tx,
            exit_rx,
            state: VmState::Created,
            timeline: Timeline {
                created,
                started: None,
                stopped: None,
            },
            exits: Arc::default(),
            ack_timeout: VCPU_ACK_TIMEOUT,
            transports: Vec::new(),
            disks: Vec::new(),
            vsock: None,
            nets: Vec::new(),
        };
        for (i, layer) in disks.into_iter().enumerate() {
            let dev = Block::new(layer.clone(), &format!("microvmm-disk{i}"));
            let slot = dev.disk_slot();
            machine.add_virtio(Box::new(dev))?;
            machine.disks.push(AttachedDisk { layer, slot });
        }
        for (iface_id, tap, mac) in taps {
            let dev = Net::new(tap, mac)?;
            let handle = dev.handle();
            machine.add_virtio(Box::new(dev))?;
            machine.nets.push(AttachedNet { iface_id, handle });
        }
        if let Some(v) = machine.cfg.vsock.clone() {
            let mut dev = Vsock::new(v.guest_cid, &v.uds_path).map_err(MachineError::Vsock)?;
            match (saved.and_then(|d| d.vsock.clone()), handover) {
                (Some(conns), Some(h)) => {
                    // Restored with its connections handed over: they go on.
                    if conns.conns.len() != h.fds.len() {
                        return Err(crate::handover::HandoverError::Mismatch(format!(
                            "{} connections in the snapshot, {} sockets handed over",
                            conns.conns.len(),
                            h.fds.len()
                        ))
                        .into());
                    }
                    dev = dev.with_connections(conns, h.fds);
                }
                // Restored or cloned: the host connections are gone and the CID may differ.
                _ if saved.is_some() => dev = dev.with_transport_reset(),
                _ => {}
            }
            machine.vsock = Some(dev.handle());
            machine.add_virtio(Box::new(dev))?;
        }
        Ok(machine)
    }

    fn transition(&mut self, to: VmState) -> Result<(), MachineError> {
        if !self.state.can_go(to) {
            return Err(MachineError::InvalidTransition {
                from: self.state,
                to,
            });
        }
        self.state = to;
        Ok(())
    }

    /// Puts a virtio-mmio transport on the MMIO bus at the next window with the next IRQ; it is
    /// described in the DSDT (and on the command line if configured). Only before boot.
    pub fn add_virtio_mmio(
        &mut self,
        device: SharedDevice,
    ) -> Result<VirtioMmioDesc, MachineError> {
        if self.state != VmState::Created {
            return Err(MachineError::InvalidTransition {
                from: self.state,
                to: VmState::Booted,
            });
        }
        let i = self.virtio.len() as u64;
        let addr = layout::VIRTIO_MMIO_START + i * layout::VIRTIO_MMIO_SIZE;
        // GSIs 5..=23 on the IOAPIC but the legacy devices' lines; the window must stay below
        // the IOAPIC.
        let irq = match layout::virtio_mmio_irq(i) {
            Some(irq) if addr + layout::VIRTIO_MMIO_SIZE <= layout::IOAPIC_START => irq,
            _ => return Err(MachineError::VirtioSlots(self.virtio.len())),
        };
        self.mmio.insert(addr, layout::VIRTIO_MMIO_SIZE, device)?;
        let d = VirtioMmioDesc {
            addr,
            len: layout::VIRTIO_MMIO_SIZE,
            irq,
        };
        self.virtio.push(d);
        Ok(d)
    }

    /// Attaches a virtio device behind a new virtio-mmio transport: on the MMIO bus, its
    /// interrupt an irqfd, each queue's notification an ioeventfd (so a guest kick reaches the
    /// device's worker without a VM exit to user space). Only before boot.
    pub fn add_virtio(
        &mut self,
        device: Box<dyn VirtioDevice>,
    ) -> Result<VirtioMmioDesc, MachineError> {
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?;
        let interrupt = Interrupt::new(irq_evt.try_clone().map_err(MachineError::EventFd)?);
        let transport = MmioTransport::new(device, self.memory().clone(), interrupt)?;
        let queue_evts = transport
            .queue_events()
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(MachineError::EventFd)?;
        let transport = Arc::new(Mutex::new(transport));
        let desc = self.add_virtio_mmio(transport.clone())?;
        self.vm.register_irqfd(&irq_evt, desc.irq)?;
        for (i, evt) in queue_evts.iter().enumerate() {
            let addr = IoEventAddress::Mmio(desc.addr + mmio::QUEUE_NOTIFY);
            #[allow(clippy::cast_possible_truncation)] // a few queues
            self.vm
                .fd()
                .register_ioevent(evt, &addr, i as u32)
                .map_err(|source| VmError::Setup {
                    op: "KVM_IOEVENTFD",
                    source,
                })?;
        }
        self.transports.push(transport);
        Ok(desc)
    }

    /// The disks attached through virtio-blk, in attach order.
    pub fn disks(&self) -> &[AttachedDisk] {
        &self.disks
    }

    /// The network devices, in configuration order.
    pub fn nets(&self) -> &[AttachedNet] {
        &self.nets
    }

    /// The virtio-mmio transports, in the order their devices were added.
    pub fn virtio_transports(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }

    /// Loads the kernel (or test guest), initrd, command line, ACPI tables and boot parameters,
    /// creates the vCPUs and sets their CPUID and boot state.
    pub fn boot(&mut self) -> Result<(), MachineError> {
        if self.state != VmState::Created {
            return Err(MachineError::InvalidTransition {
                from: self.state,
                to: VmState::Booted,
            });
        }
        let ram = self.vm.ram().clone();
        let mem = ram.memory();
        let mem_mib = self.cfg.mem_mib;
        let initrd_len = match &self.cfg.initrd {
            Some(p) => open("initrd", p)?.metadata().map(|m| m.len()).unwrap_or(0),
            None => 0,
        };
        let (kernel, aps_at_entry) = match self.cfg.kernel.clone() {
            KernelSource::TestGuest(name) => {
                let g = TestGuest::by_name(&name)?;
                (boot::load_kernel(mem, &mut Cursor::new(g.elf))?, true)
            }
            KernelSource::File(path) => {
                let mut f = open("kernel image", &path)?;
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                let need = layout::HIMEM_START + len + initrd_len;
                if need > ram.low_end() {
                    return Err(MachineError::MemoryTooSmall {
                        mem_mib,
                        need_mib: need.div_ceil(1 << 20),
                    });
                }
                (boot::load_kernel(mem, &mut f)?, false)
            }
        };
        if let Some(h) = kernel.setup_header {
            let need = layout::HIMEM_START + u64::from(h.init_size) + initrd_len;
            if need > ram.low_end() {
                return Err(MachineError::MemoryTooSmall {
                    mem_mib,
                    need_mib: need.div_ceil(1 << 20),
                });
            }
        }
        let initrd = match &self.cfg.initrd {
            Some(p) => Some(boot::load_initrd(&ram, &kernel, &mut open("initrd", p)?)?),
            None => None,
        };

        let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(MachineError::Cmdline)?;
        cmdline
            .insert_str(self.cfg.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE))
            .map_err(MachineError::Cmdline)?;
        if self.cfg.virtio_mmio_cmdline {
            for d in &self.virtio {
                cmdline
                    .add_virtio_mmio_device(d.len, GuestAddress(d.addr), d.irq, None)
                    .map_err(MachineError::Cmdline)?;
            }
        }
        boot::write_cmdline(mem, &cmdline)?;
        let cmdline_len = cmdline
            .as_cstring()
            .map(|c| c.as_bytes().len())
            .map_err(MachineError::Cmdline)?;

        let rsdp = acpi::write_acpi_tables(mem, self.cfg.vcpus, &self.virtio)?;
        let e820 = boot::e820_map(ram.size());
        match kernel.entry {
            BootEntry::Linux64 { .. } => {
                let params =
                    boot::linux_boot_params(&kernel, cmdline_len, initrd, Some(rsdp), &e820);
                boot::write_linux_boot_params(mem, &params)?;
            }
            BootEntry::Pvh { .. } => boot::write_pvh_boot_info(mem, initrd, Some(rsdp), &e820)?,
        }
        regs::write_boot_tables(mem)?;

        let supported = cpuid::supported_cpuid(self.vm.kvm())?;
        let io = self.vcpu_io();
        let count = self.cfg.vcpus;
        for id in 0..count {
            let vcpu = Vcpu::new(self.vm.fd(), id, io.clone())?;
            let cpuid = cpuid::vcpu_cpuid(&supported, id, count, self.host)?;
            vcpu.configure(&cpuid, kernel.entry, count, id == 0 || aps_at_entry)?;
            self.vcpus.push(vcpu);
        }
        self.transition(VmState::Booted)
    }

    fn vcpu_io(&self) -> VcpuIo {
        VcpuIo {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            power: self.power.clone(),
            memory: self.memory().clone(),
            exits: Arc::clone(&self.exits),
        }
    }

    /// How often the vCPUs exited, by kind.
    pub fn exit_counters(&self) -> &crate::vcpu::ExitCounters {
        &self.exits
    }

    /// Starts every vCPU thread running the guest.
    pub fn start(&mut self) -> Result<(), MachineError> {
        self.transition(VmState::Running)?;
        self.timeline.started = Some(Instant::now());
        for vcpu in self.vcpus.drain(..) {
            let h = vcpu.start(self.exit_tx.clone(), true)?;
            self.handles.push(h);
        }
        Ok(())
    }

    fn broadcast(&self, event: VcpuEvent, want: VcpuResponse) -> Result<(), MachineError> {
        for h in &self.handles {
            h.send(event.clone())?;
        }
        for h in &self.handles {
            let got = h.response(self.ack_timeout)?;
            if got != want {
                let why = (got == VcpuResponse::Finished)
                    .then(|| self.finish_reason(h.id()))
                    .flatten();
                return Err(MachineError::VcpuAnswer {
                    id: h.id(),
                    sent: event.clone(),
                    got,
                    why,
                });
            }
        }
        Ok(())
    }

    /// The first queued exit report `pick` accepts: its vCPU and `stopped: ...` or
    /// `failed: ...`. Every report stays queued for [`Machine::wait`].
    fn peek_report(&self, pick: impl Fn(&VcpuExitReport) -> bool) -> Option<(u8, String)> {
        let reports: Vec<VcpuExitReport> = self.exit_rx.try_iter().collect();
        let found = reports.iter().find(|r| pick(r)).map(|r| {
            let what = match &r.result {
                Ok(stop) => format!("stopped: {stop:?}"),
                Err(e) => format!("failed: {e}"),
            };
            (r.id, what)
        });
        for r in reports {
            // Our own channel: the receiver lives in `self`, so the send cannot fail.
            let _ = self.exit_tx.send(r);
        }
        found
    }

    /// What vCPU `id` reported when its thread finished, if it did; the reports stay queued
    /// for [`Machine::wait`].
    fn finish_reason(&self, id: u8) -> Option<String> {
        self.peek_report(|r| r.id == id)
            .map(|(_, what)| format!("it {what}"))
    }

    /// Whether a vCPU has stopped on its own (the guest powered off or reset, or the vCPU failed)
    /// while the machine runs or is paused: what it reported, or `None`. The report stays
    /// queued for [`Machine::wait`]. A caller driving a long operation on a running machine
    /// (an upgrade) checks this instead of going on with a guest that lost a vCPU.
    pub fn stopped_vcpu(&self) -> Option<String> {
        self.peek_report(|_| true)
            .map(|(id, what)| format!("vCPU {id} {what}"))
    }

    /// Parks every vCPU (each completes its pending I/O exit first). The machine is `Paused`
    /// only once every vCPU acknowledged; if one does not within the ack timeout, the others
    /// are let run again (and so is the late one, once it answers), the machine stays
    /// `Running` and the error says which vCPU; the next pause tries again.
    pub fn pause(&mut self) -> Result<(), MachineError> {
        if self.state == VmState::Paused {
            return Ok(());
        }
        self.check_transition(VmState::Paused)?;
        match self.broadcast(VcpuEvent::Pause, VcpuResponse::Paused) {
            Ok(()) => self.transition(VmState::Paused),
            Err(e) => {
                if let Err(undo) = self.broadcast(VcpuEvent::Resume, VcpuResponse::Resumed) {
                    tracing::warn!("a failed pause could not resume every vCPU: {undo}");
                }
                Err(e)
            }
        }
    }

    /// Lets every vCPU run again: `Running` once every vCPU acknowledged; if one does not,
    /// the others are parked again and the machine stays `Paused`.
    pub fn resume(&mut self) -> Result<(), MachineError> {
        if self.state == VmState::Running {
            return Ok(());
        }
        self.check_transition(VmState::Running)?;
        match self.broadcast(VcpuEvent::Resume, VcpuResponse::Resumed) {
            Ok(()) => self.transition(VmState::Running),
            Err(e) => {
                if let Err(undo) = self.broadcast(VcpuEvent::Pause, VcpuResponse::Paused) {
                    tracing::warn!("a failed resume could not park every vCPU again: {undo}");
                }
                Err(e)
            }
        }
    }

    /// How long [`Machine::pause`] and [`Machine::resume`] wait for each vCPU's answer
    /// (default 5 s).
    pub fn set_vcpu_ack_timeout(&mut self, t: Duration) {
        self.ack_timeout = t;
    }

    fn check_transition(&self, to: VmState) -> Result<(), MachineError> {
        if self.state.can_go(to) {
            Ok(())
        } else {
            Err(MachineError::InvalidTransition {
                from: self.state,
                to,
            })
        }
    }

    /// Runs `task` on every vCPU, on its own thread when the vCPUs are running or paused (outside
    /// `KVM_RUN`, pending I/O completed), directly otherwise. Pause first for a consistent view
    /// across vCPUs.
    pub fn on_each_vcpu(&self, task: VcpuTask) -> Result<(), MachineError> {
        if self.handles.is_empty() {
            self.vcpus.iter().for_each(|v| task(v));
            return Ok(());
        }
        self.broadcast(VcpuEvent::Run(task), VcpuResponse::Ran)
    }

    fn join_vcpus(&mut self) -> Result<(), MachineError> {
        let mut first_err = None;
        for h in self.handles.drain(..) {
            match h.finish() {
                Ok(v) => self.vcpus.push(v),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.vcpus.sort_by_key(Vcpu::id);
        match first_err {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Waits until the guest stops (power off, reset, error) or `timeout` passes, then ends the
    /// vCPU threads. On timeout the guest keeps running.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<StopReason, MachineError> {
        if self.state != VmState::Running && self.state != VmState::Paused {
            return Err(MachineError::InvalidTransition {
                from: self.state,
                to: VmState::Stopped,
            });
        }
        let report = match timeout {
            Some(t) => match self.exit_rx.recv_timeout(t) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => return Err(MachineError::Timeout(t)),
                Err(RecvTimeoutError::Disconnected) => unreachable_disconnect(),
            },
            None => match self.exit_rx.recv() {
                Ok(r) => r,
                Err(_) => unreachable_disconnect(),
            },
        };
        self.transition(VmState::Stopped)?;
        let joined = self.join_vcpus();
        self.timeline.stopped = Some(Instant::now());
        let reason = match report.result? {
            VcpuStop::Power(PowerEvent::PowerOff) => StopReason::PowerOff,
            VcpuStop::Power(PowerEvent::Reset) => StopReason::Reset,
            VcpuStop::Halted => StopReason::Halted,
        };
        joined?;
        Ok(reason)
    }

    /// Ends the vCPU threads now, whatever the guest is doing.
    pub fn stop(&mut self) -> Result<StopReason, MachineError> {
        if self.state == VmState::Stopped {
            return Ok(StopReason::Stopped);
        }
        self.transition(VmState::Stopped)?;
        self.join_vcpus()?;
        self.timeline.stopped = Some(Instant::now());
        Ok(StopReason::Stopped)
    }

    /// Builds, boots and runs a machine until the guest stops.
    pub fn run(cfg: MachineConfig) -> Result<StopReason, MachineError> {
        let mut m = Machine::new(cfg, None)?;
        m.boot()?;
        m.start()?;
        m.wait(None)
    }

    /// Lifecycle state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Presses the power button: the ACPI Generic Event Device raises its interrupt and its
    /// `_EVT` notifies the `PNP0C0C` button, which a Linux guest reports as KEY_POWER (its init
    /// then powers off; microvmm's guest agent does when it runs as init). The guest decides;
    /// nothing happens to a guest that does not listen.
    pub fn press_power_button(&self) -> Result<(), MachineError> {
        if self.state != VmState::Running {
            return Err(MachineError::NotRunning(self.state));
        }
        self.power_button.write(1).map_err(MachineError::EventFd)
    }

    /// The configuration.
    pub fn config(&self) -> &MachineConfig {
        &self.cfg
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The KVM VM, mutably (dirty logging).
    pub fn vm_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.vm.ram().memory()
    }

    /// Port I/O bus (add test devices before [`Machine::start`]).
    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio
    }

    /// MMIO bus.
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// The COM1 device (console input, state).
    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.serial
    }

    /// The i8042 (state save/restore).
    pub fn i8042(&self) -> &Arc<Mutex<I8042>> {
        &self.i8042
    }

    /// The CMOS/RTC (state save/restore).
    pub fn cmos(&self) -> &Arc<Mutex<Cmos>> {
        &self.cmos
    }

    /// Serial output statistics (time of the first byte).
    pub fn serial_stats(&self) -> &Arc<SerialSinkStats> {
        &self.serial_stats
    }

    /// Power requests of the guest.
    pub fn power(&self) -> &Arc<PowerControl> {
        &self.power
    }

    /// Virtio-mmio devices placed so far.
    pub fn virtio_devices(&self) -> &[VirtioMmioDesc] {
        &self.virtio
    }

    /// The vCPUs (after [`Machine::boot`] and before [`Machine::start`], or after a stop).
    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    /// How this host's KVM runs guests.
    pub fn host_kvm(&self) -> HostKvm {
        self.host
    }

    /// Creation/start/stop times.
    pub fn timeline(&self) -> Timeline {
        self.timeline
    }
}

fn unreachable_disconnect() -> ! {
    // `Machine` holds a sender of the exit channel, so the channel cannot disconnect.
    unreachable!("the machine holds a sender of its own exit channel")
}

impl Drop for Machine {
    fn drop(&mut self) {
        if !self.handles.is_empty() {
            let _ = self.join_vcpus();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<Machine>();
        assert_send::<VcpuHandle>();
    }

    #[test]
    fn lifecycle_table() {
        use VmState::*;
        assert!(Created.can_go(Booted));
        assert!(Running.can_go(Paused) && Paused.can_go(Running));
        assert!(!Created.can_go(Running));
        assert!(!Stopped.can_go(Running));
        assert!(!Stopped.can_go(Stopped));
        assert!(!Booted.can_go(Paused));
    }
}
