//! A whole VM: config -> [`Machine::new`] (VM, memory, legacy devices) -> optional extra devices
//! ([`Machine::add_virtio_mmio`], [`Machine::pio_bus`]) -> [`Machine::boot`] (kernel, ACPI, boot
//! state) -> [`Machine::start`] (vCPU threads) -> [`Machine::wait`] / [`Machine::pause`] /
//! [`Machine::resume`] / [`Machine::stop`].

//!
//! The parts live in sibling modules, each with one job: [`builder`] (new, restored and cloned
//! machines, as an [`builder::Origin`]), [`device_manager`] (buses, legacy devices, virtio-mmio slots
//! with their transports, disks, NICs, vsock), [`vcpus`] (vCPU threads and their handshake),
//! [`state`] (capture, snapshot files, restore, disk and network moves between machines) and
//! [`clone`] (the live in-process clone).

use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::{Cmos, I8042, SerialDevice, SerialError, SerialSinkStats};
use devices::virtio::VirtioDevice;
use devices::virtio::mmio::MmioTransport;
use devices::{Bus, BusError, PowerControl, PowerEvent, bus::SharedDevice};
use linux_loader::cmdline::Cmdline;
use std::path::PathBuf;
use vm_memory::GuestAddress;

use crate::acpi::{self, AcpiError, VirtioMmioDesc};
use crate::boot::{self, BootError};
use crate::config::{DEFAULT_CMDLINE, KernelSource, MachineConfig};
use crate::cpuid::{self, CpuidError, HostKvm};
use crate::layout;
use crate::memory::{GuestMemoryMmap, MemoryError};
use crate::regs::{self, BootEntry, RegsError};
use crate::snapshot::SnapshotError;
use crate::vcpu::{
    Vcpu, VcpuError, VcpuEvent, VcpuHandleError, VcpuIo, VcpuResponse, VcpuStop, VcpuTask,
};
use crate::vm::{Vm, VmError};
#[cfg(feature = "test-guests")]
use vmm_test_guests::GuestKitError;

pub mod builder;
pub mod clone;
pub mod device_manager;
pub mod state;
mod vcpus;

pub use clone::{CloneError, CloneOptions, CloneRound, CloneTimeline};
pub use device_manager::{AttachedDisk, AttachedNet};

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
    #[cfg(feature = "test-guests")]
    #[error(transparent)]
    Guest(#[from] GuestKitError),
    /// The configuration names a test guest, but this build has no test-guest kit (the `vmm`
    /// crate's `test-guests` feature is off).
    #[cfg(not(feature = "test-guests"))]
    #[error("test guest `{0}`: this build has no test-guest kit (vmm's `test-guests` feature)")]
    NoTestGuests(String),
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
        source: devices::persist::PersistError,
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
    // Declared first, so dropped first: the vCPU threads end before the devices and the VM.
    cpus: vcpus::VcpuManager,
    cfg: MachineConfig,
    host: HostKvm,
    vm: Vm,
    devices: device_manager::DeviceManager,
    state: VmState,
    timeline: Timeline,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("cfg", &self.cfg)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Machine {
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

    /// Puts a device on the MMIO bus at the next virtio-mmio window with the next IRQ; it is
    /// described in the DSDT (and on the command line if configured). Only before boot.
    pub fn add_virtio_mmio(
        &mut self,
        device: SharedDevice,
    ) -> Result<VirtioMmioDesc, MachineError> {
        self.check_created()?;
        self.devices.add_mmio(device, None)
    }

    /// Attaches a virtio device behind a new virtio-mmio transport: on the MMIO bus, its
    /// interrupt an irqfd, each queue's notification an ioeventfd (so a guest kick reaches the
    /// device's worker without a VM exit to user space). Only before boot.
    pub fn add_virtio(
        &mut self,
        device: Box<dyn VirtioDevice>,
    ) -> Result<VirtioMmioDesc, MachineError> {
        self.check_created()?;
        let memory = self.memory().clone();
        self.devices.add_virtio(&self.vm, &memory, device)
    }

    fn check_created(&self) -> Result<(), MachineError> {
        if self.state != VmState::Created {
            return Err(MachineError::InvalidTransition {
                from: self.state,
                to: VmState::Booted,
            });
        }
        Ok(())
    }

    /// The disks attached through virtio-blk, in attach order.
    pub fn disks(&self) -> &[AttachedDisk] {
        &self.devices.disks
    }

    /// The network devices, in configuration order.
    pub fn nets(&self) -> &[AttachedNet] {
        &self.devices.nets
    }

    /// The virtio-mmio transports, in the order their devices were added.
    pub fn virtio_transports(&self) -> Vec<Arc<Mutex<MmioTransport>>> {
        self.devices.transports().cloned().collect()
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
        let virtio = self.devices.descs();
        let mem = ram.memory();
        let mem_mib = self.cfg.mem_mib;
        let initrd_len = match &self.cfg.initrd {
            Some(p) => builder::open("initrd", p)?
                .metadata()
                .map(|m| m.len())
                .unwrap_or(0),
            None => 0,
        };
        let (kernel, aps_at_entry) = match self.cfg.kernel.clone() {
            KernelSource::TestGuest(name) => (
                boot::load_kernel(mem, &mut Cursor::new(builder::test_guest_image(&name)?))?,
                true,
            ),
            KernelSource::File(path) => {
                let mut f = builder::open("kernel image", &path)?;
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
            Some(p) => Some(boot::load_initrd(
                &ram,
                &kernel,
                &mut builder::open("initrd", p)?,
            )?),
            None => None,
        };

        let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(MachineError::Cmdline)?;
        cmdline
            .insert_str(self.cfg.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE))
            .map_err(MachineError::Cmdline)?;
        if self.cfg.virtio_mmio_cmdline {
            for d in &virtio {
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

        let rsdp = acpi::write_acpi_tables(mem, self.cfg.vcpus, &virtio)?;
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
            self.cpus.push(vcpu);
        }
        self.transition(VmState::Booted)
    }

    fn vcpu_io(&self) -> VcpuIo {
        VcpuIo {
            pio: self.devices.pio.clone(),
            mmio: self.devices.mmio.clone(),
            power: self.devices.power.clone(),
            memory: self.memory().clone(),
            exits: Arc::clone(self.cpus.exits()),
            msr_indices: Arc::clone(self.vm.msr_indices()),
            stops: Arc::clone(self.cpus.stops()),
        }
    }

    /// Raised when one of this machine's vCPUs stops on its own (the guest powered off or
    /// reset, or the vCPU failed): a thread waiting on something in the guest (an agent's
    /// answer) can watch it instead of waiting out its timeout.
    pub fn stop_notice(&self) -> Arc<crate::vcpu::StopNotice> {
        Arc::clone(self.cpus.stops())
    }

    /// How often the vCPUs exited, by kind.
    pub fn exit_counters(&self) -> &crate::vcpu::ExitCounters {
        self.cpus.exits()
    }

    /// Starts every vCPU thread running the guest.
    pub fn start(&mut self) -> Result<(), MachineError> {
        self.transition(VmState::Running)?;
        self.timeline.started = Some(Instant::now());
        self.cpus.start()
    }

    /// Whether a vCPU has stopped on its own (the guest powered off or reset, or the vCPU failed)
    /// while the machine runs or is paused: what the first one reported (its [`Machine::stop_notice`]),
    /// or `None`. A caller driving a long operation on a running machine (an upgrade) checks
    /// this instead of going on with a guest that lost a vCPU.
    pub fn stopped_vcpu(&self) -> Option<String> {
        self.cpus.stops().get()
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
        self.cpus.pause()?;
        self.transition(VmState::Paused)
    }

    /// Lets every vCPU run again: `Running` once every vCPU acknowledged; if one does not,
    /// the others are parked again and the machine stays `Paused`.
    pub fn resume(&mut self) -> Result<(), MachineError> {
        if self.state == VmState::Running {
            return Ok(());
        }
        self.check_transition(VmState::Running)?;
        self.cpus.resume()?;
        self.transition(VmState::Running)
    }

    /// How long [`Machine::pause`] and [`Machine::resume`] wait for each vCPU's answer
    /// (default 5 s).
    pub fn set_vcpu_ack_timeout(&mut self, t: Duration) {
        self.cpus.set_ack_timeout(t);
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
        self.cpus.on_each(task)
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
        let report = self.cpus.next_exit(timeout)?;
        self.transition(VmState::Stopped)?;
        let joined = self.cpus.join();
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
        self.cpus.join()?;
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
        self.devices
            .power_button
            .write(1)
            .map_err(MachineError::EventFd)
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
        &self.devices.pio
    }

    /// MMIO bus.
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.devices.mmio
    }

    /// The COM1 device (console input, state).
    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.devices.serial
    }

    /// The i8042 (state save/restore).
    pub fn i8042(&self) -> &Arc<Mutex<I8042>> {
        &self.devices.i8042
    }

    /// The CMOS/RTC (state save/restore).
    pub fn cmos(&self) -> &Arc<Mutex<Cmos>> {
        &self.devices.cmos
    }

    /// Serial output statistics (time of the first byte).
    pub fn serial_stats(&self) -> &Arc<SerialSinkStats> {
        &self.devices.serial_stats
    }

    /// Power requests of the guest.
    pub fn power(&self) -> &Arc<PowerControl> {
        &self.devices.power
    }

    /// Virtio-mmio devices placed so far.
    pub fn virtio_devices(&self) -> Vec<VirtioMmioDesc> {
        self.devices.descs()
    }

    /// The vCPUs (after [`Machine::boot`] and before [`Machine::start`], or after a stop).
    pub fn vcpus(&self) -> &[Vcpu] {
        self.cpus.idle()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<Machine>();
        assert_send::<crate::vcpu::VcpuHandle>();
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
