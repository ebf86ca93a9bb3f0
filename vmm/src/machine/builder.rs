//! Building a [`Machine`]: from its configuration (a new machine), from a snapshot's states (a
//! restore, possibly with the vsock connections handed over), or from a running machine's
//! captured state (a clone). [`Origin`] says which; the configuration's TAPs and disks are
//! opened first, so that a bad path is an error before any VM exists.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use block::{Base, Delta, Layer};
use devices::legacy::SerialOutput;
use devices::persist::{SavedState, StateList};
use devices::virtio::blk::Block;
use devices::virtio::net::{MacAddr, Net, NetState, tap::Tap};
use devices::virtio::vsock::Vsock;
use devices::virtio::vsock::muxer::MuxerState;

use super::device_manager::{AttachedDisk, AttachedNet, DeviceManager};
use super::vcpus::VcpuManager;
use super::{Machine, MachineError, Timeline, VmState};
use crate::config::{ConsoleTarget, DiskConfig, KernelSource, MachineConfig};
use crate::cpuid::HostKvm;
use crate::handover::{HandoverError, VsockHandover};
use crate::memory::GuestRam;
use crate::snapshot::{SnapshotError, names};
use crate::vm::{self, Vm};
#[cfg(feature = "test-guests")]
use vmm_test_guests::TestGuest;

/// Where a machine being built comes from.
pub(crate) enum Origin<'a> {
    /// A new machine on fresh RAM (or on `ram`, e.g. shared with another VM), its disks opened
    /// from the configuration.
    New {
        /// Existing guest RAM to run on.
        ram: Option<GuestRam>,
    },
    /// A restored snapshot: its RAM and device states, and the sockets of its vsock
    /// connections when they were handed over with it (else the guest gets a transport reset).
    Restore {
        /// The snapshot's RAM.
        ram: GuestRam,
        /// Its device states.
        devices: &'a [SavedState],
        /// The handed-over vsock sockets.
        handover: Option<VsockHandover>,
    },
    /// A clone of a running machine: the copied RAM, the captured device states and the fork
    /// children of the source's disks (the host's vsock connections stay with the source).
    Clone {
        /// The copied RAM.
        ram: GuestRam,
        /// The captured device states.
        devices: &'a [SavedState],
        /// The clone's disk layers.
        layers: Vec<Arc<Layer>>,
    },
}

impl<'a> Origin<'a> {
    fn saved(&self) -> Option<&'a [SavedState]> {
        match self {
            Origin::New { .. } => None,
            Origin::Restore { devices, .. } | Origin::Clone { devices, .. } => Some(*devices),
        }
    }
}

impl Machine {
    /// Creates the VM, its memory and legacy devices. The serial console goes to the config's
    /// target, or to `console` if given (tests pass a buffer).
    pub fn new(cfg: MachineConfig, console: Option<SerialOutput>) -> Result<Self, MachineError> {
        Self::build(cfg, console, Origin::New { ram: None })
    }

    /// Like [`Machine::new`], but on existing guest RAM (e.g. a memfd shared with or copied from
    /// another VM) instead of fresh zeroed memory; its size replaces `cfg.mem_mib`.
    pub fn with_ram(
        cfg: MachineConfig,
        console: Option<SerialOutput>,
        ram: Option<GuestRam>,
    ) -> Result<Self, MachineError> {
        Self::build(cfg, console, Origin::New { ram })
    }

    /// Builds a machine from `origin`: the VM on its RAM, the legacy devices, then the disks,
    /// NICs and vsock behind virtio-mmio transports (each written with its saved state for a
    /// restore or clone; the transports' registers are restored by the caller).
    pub(crate) fn build(
        mut cfg: MachineConfig,
        console: Option<SerialOutput>,
        origin: Origin<'_>,
    ) -> Result<Self, MachineError> {
        let saved = origin.saved();
        let created = Instant::now();
        // The TAPs first: a missing or forbidden one is a configuration error.
        let taps = open_nets(&cfg, saved)?;
        let kvm = vm::open_kvm()?;
        let max = kvm.get_max_vcpus().min(254);
        let limit = match &cfg.kernel {
            KernelSource::TestGuest(name) => max.min(usize::from(test_guest_max_cpus(name)?)),
            KernelSource::File(_) => max,
        };
        if cfg.vcpus == 0 || usize::from(cfg.vcpus) > limit {
            return Err(MachineError::VcpuCount {
                count: cfg.vcpus,
                max: limit,
            });
        }
        let (ram, layers, handover) = match origin {
            Origin::New { ram } => (ram, None, None),
            Origin::Restore { ram, handover, .. } => (Some(ram), None, handover),
            Origin::Clone { ram, layers, .. } => (Some(ram), Some(layers), None),
        };
        let disks = match layers {
            Some(l) => l,
            None => cfg
                .disks
                .iter()
                .map(open_disk)
                .collect::<Result<Vec<_>, _>>()?,
        };
        let ram = match ram {
            Some(r) => {
                cfg.mem_mib = r.size() >> 20;
                r
            }
            None => GuestRam::new(cfg.mem_mib.saturating_mul(1 << 20))?,
        };
        let vm = Vm::new(kvm, ram)?;
        let out = match console {
            Some(o) => o,
            None => console_output(&cfg.console)?,
        };
        let devices = DeviceManager::new(&vm, out, saved)?;
        let mut machine = Self {
            cpus: VcpuManager::new(),
            cfg,
            host: HostKvm::detect(),
            vm,
            devices,
            state: VmState::Created,
            timeline: Timeline {
                created,
                started: None,
                stopped: None,
            },
        };
        for (i, layer) in disks.into_iter().enumerate() {
            let dev = Block::new(layer.clone(), &format!("microvmm-disk{i}"));
            let slot = dev.disk_slot();
            machine.add_virtio(Box::new(dev))?;
            // A clone's disks are its own layers: its configuration says so.
            machine.sync_disk_config(i, &layer);
            machine.devices.disks.push(AttachedDisk { layer, slot });
        }
        for (iface_id, tap, mac) in taps {
            let dev = Net::new(tap, mac)?;
            let handle = dev.handle();
            machine.add_virtio(Box::new(dev))?;
            machine.devices.nets.push(AttachedNet { iface_id, handle });
        }
        if let Some(v) = machine.cfg.vsock.clone() {
            let mut dev = Vsock::new(v.guest_cid, &v.uds_path).map_err(MachineError::Vsock)?;
            let conns = match saved {
                Some(d) => d
                    .state_of::<MuxerState>(names::VSOCK_CONNECTIONS)
                    .map_err(SnapshotError::from)?,
                None => None,
            };
            match (conns, handover) {
                (Some(conns), Some(h)) => {
                    // Restored with its connections handed over: they go on.
                    if conns.conns.len() != h.fds.len() {
                        return Err(HandoverError::Mismatch(format!(
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
            machine.devices.vsock = Some(dev.handle());
            machine.add_virtio(Box::new(dev))?;
        }
        Ok(machine)
    }
}

/// Where the serial console goes.
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

/// Opens the TAPs of `cfg.net` (before anything else is built, so that a missing or forbidden
/// TAP is an error before the VM exists) with each device's address: the configured one, else
/// the saved one, else a random one.
fn open_nets(
    cfg: &MachineConfig,
    saved: Option<&[SavedState]>,
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
        let saved_mac = match saved {
            Some(d) => d
                .state_of::<NetState>(&names::net(i))
                .map_err(SnapshotError::from)?
                .map(|s| s.mac),
            None => None,
        };
        let mac = n
            .guest_mac
            .or(saved_mac)
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

pub(super) fn open(what: &'static str, path: &PathBuf) -> Result<File, MachineError> {
    File::open(path).map_err(|source| MachineError::Open {
        what,
        path: path.clone(),
        source,
    })
}

/// The ELF image of the kit's guest `name` (an unknown name fails at boot).
#[cfg(feature = "test-guests")]
pub(super) fn test_guest_image(name: &str) -> Result<&'static [u8], MachineError> {
    Ok(TestGuest::by_name(name)?.elf)
}

/// The most vCPUs a test guest supports (its CPL0 stub's limit).
#[cfg(feature = "test-guests")]
fn test_guest_max_cpus(_name: &str) -> Result<u8, MachineError> {
    Ok(vmm_test_guests::MAX_CPUS)
}

/// Without the kit there is no test guest to boot: refused when the machine is built.
#[cfg(not(feature = "test-guests"))]
fn test_guest_max_cpus(name: &str) -> Result<u8, MachineError> {
    Err(MachineError::NoTestGuests(name.to_string()))
}

/// Without the kit there is no test guest to boot.
#[cfg(not(feature = "test-guests"))]
pub(super) fn test_guest_image(name: &str) -> Result<&'static [u8], MachineError> {
    Err(MachineError::NoTestGuests(name.to_string()))
}
