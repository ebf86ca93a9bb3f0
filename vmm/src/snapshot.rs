//! Full VM state: every vCPU, the VM's in-kernel devices (PIT, kvmclock, PIC/IOAPIC), the VMM's
//! devices, and guest RAM; saved to a snapshot directory and restored into a new [`Machine`].
//!
//! A snapshot directory holds two files:
//! - `state`: a [`snapfile`](crate::snapfile) container (magic `MVMMSNAP`, format version, one
//!   CRC32C per section and one over the file) with JSON sections `meta` ([`SnapshotMeta`]),
//!   `vcpus` (`Vec<VcpuState>`), `vm` ([`VmKvmState`]) and `devices` ([`DeviceStates`]);
//! - `memory`: guest RAM as the memfd lays it out (region after region), `meta.mem_size` bytes,
//!   written sparse (all-zero pages are holes); its CRC32C is in `meta.mem_crc`.
//!
//! vCPU state is read in the order Firecracker uses (MP state first, so KVM settles pending
//! events, then registers, xsave, XCRs, debug registers, LAPIC, MSRs, vCPU events) and written
//! back in the order the KVM API needs: CPUID, MP state, regs, sregs, xsave, XCRs, debug
//! registers, LAPIC, MSRs (`IA32_TSC` before `TSC_DEADLINE`, by index), vCPU events last.
//!
//! [`Machine`]: crate::Machine

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use devices::legacy::{CmosState, I8042State, SerialDeviceState};
use devices::virtio::mmio::MmioState;
use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::memory::GuestRam;
use crate::snapfile::{SnapshotFileError, SnapshotReader, SnapshotWriter};

/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// Name of the memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Most CPUID entries read from a vCPU.
const MAX_CPUID_ENTRIES: usize = 256;
/// Size of the legacy `kvm_xsave` area.
const XSAVE_LEGACY_SIZE: i32 = 4096;

/// Errors of saving or restoring VM state.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A vCPU state ioctl failed.
    #[error("vCPU {id}: {op} failed")]
    Vcpu {
        /// vCPU id.
        id: u8,
        /// The ioctl.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A VM state ioctl failed.
    #[error("{op} failed")]
    Vm {
        /// The ioctl.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused to restore an MSR.
    #[error("vCPU {id}: KVM refused MSR {index:#x}")]
    Msr {
        /// vCPU id.
        id: u8,
        /// The MSR.
        index: u32,
    },
    /// The host's xsave area is bigger than the legacy 4 KiB one this format stores.
    #[error("the host's xsave area is {0} bytes; only 4096 is supported")]
    XsaveSize(i32),
    /// A FAM structure (CPUID, MSRs) could not be built.
    #[error("cannot build {0}")]
    Fam(&'static str),
    /// The snapshot container is unreadable (I/O, magic, version, checksum).
    #[error(transparent)]
    File(#[from] SnapshotFileError),
    /// A section does not decode.
    #[error("snapshot section {section:?} does not decode")]
    Decode {
        /// The section.
        section: &'static str,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
    /// The memory file could not be read or written.
    #[error("snapshot memory file {path}")]
    Memory {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The memory file does not match the state (size or checksum).
    #[error("snapshot memory file {path} is corrupt: {what}")]
    MemoryMismatch {
        /// The file.
        path: PathBuf,
        /// What differs.
        what: String,
    },
    /// The snapshot does not fit the machine it is restored into.
    #[error("snapshot does not fit this machine: {0}")]
    Mismatch(String),
}

/// Everything KVM keeps for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU id.
    pub id: u8,
    /// CPUID as set on the vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MP state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (legacy 4 KiB xsave area).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lets the host read (TSC, kvmclock, TSC deadline, syscall MSRs, ...).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
}

/// State of the VM's in-kernel devices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmKvmState {
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
}

/// State of the VMM's devices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialDeviceState,
    /// The i8042.
    pub i8042: I8042State,
    /// CMOS/RTC.
    pub cmos: CmosState,
    /// Virtio-mmio transports in attach order.
    pub virtio: Vec<MmioState>,
    /// The vsock connections handed over with this snapshot (their sockets travel separately,
    /// see [`crate::handover`]); `None` when they were not, and a restore resets the transport.
    #[serde(default)]
    pub vsock: Option<devices::virtio::vsock::muxer::MuxerState>,
}

/// What a snapshot is of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// CRC32C of the memory file.
    pub mem_crc: u32,
    /// vCPU count.
    pub vcpus: u8,
    /// Device types of the virtio transports, in order.
    pub virtio_types: Vec<u32>,
}

/// A whole VM's state except memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// Per vCPU, by id.
    pub vcpus: Vec<VcpuState>,
    /// In-kernel devices.
    pub vm: VmKvmState,
    /// VMM devices.
    pub devices: DeviceStates,
    /// Device types of the virtio transports, in order.
    pub virtio_types: Vec<u32>,
}

/// The MSRs KVM lets the host save for a vCPU (`KVM_GET_MSR_INDEX_LIST`).
pub fn msr_index_list(kvm: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    kvm.get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .map_err(|source| SnapshotError::Vm {
            op: "KVM_GET_MSR_INDEX_LIST",
            source,
        })
}

/// Checks that the legacy 4 KiB xsave area holds this host's whole xsave state.
pub fn check_xsave_size(kvm: &Kvm) -> Result<(), SnapshotError> {
    let size = kvm.check_extension_int(Cap::Xsave2);
    if size > XSAVE_LEGACY_SIZE {
        return Err(SnapshotError::XsaveSize(size));
    }
    Ok(())
}

fn msrs_of(entries: &[kvm_msr_entry]) -> Result<Msrs, SnapshotError> {
    Msrs::from_entries(entries).map_err(|_| SnapshotError::Fam("the MSR list"))
}

/// Reads the MSRs in `indices` that KVM can read (KVM_GET_MSRS stops at the first one it cannot
/// read; that one is skipped and the rest read on).
pub fn read_msrs(
    fd: &VcpuFd,
    id: u8,
    indices: &[u32],
) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(200)];
        let entries: Vec<_> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msrs_of(&entries)?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|source| SnapshotError::Vcpu {
                id,
                op: "KVM_GET_MSRS",
                source,
            })?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Skip the unreadable MSR at position n (if the chunk was not read in full).
        let used = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[used..];
    }
    Ok(out)
}

/// Reads the whole state of a vCPU that is not in `KVM_RUN` (call it on the vCPU's thread
/// while the machine is paused, or on a vCPU without a thread).
pub fn save_vcpu(fd: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<VcpuState, SnapshotError> {
    let op = |op| move |source| SnapshotError::Vcpu { id, op, source };
    let mp_state = fd.get_mp_state().map_err(op("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(op("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(op("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(op("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(op("KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(op("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(op("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, id, msr_indices)?;
    let events = fd.get_vcpu_events().map_err(op("KVM_GET_VCPU_EVENTS"))?;
    let cpuid = fd
        .get_cpuid2(MAX_CPUID_ENTRIES)
        .map_err(op("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    Ok(VcpuState {
        id,
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
    })
}

/// Writes a saved state into a fresh vCPU, in the order the KVM API requires.
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), SnapshotError> {
    let id = s.id;
    let op = |op| move |source| SnapshotError::Vcpu { id, op, source };
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| SnapshotError::Fam("CPUID"))?;
    fd.set_cpuid2(&cpuid).map_err(op("KVM_SET_CPUID2"))?;
    fd.set_mp_state(s.mp_state)
        .map_err(op("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(op("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(op("KVM_SET_SREGS"))?;
    // SAFETY: `check_xsave_size` ran before any state was saved or restored on this host, so
    // KVM's xsave area fits the 4 KiB `kvm_xsave` passed here.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(op("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(op("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(op("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(op("KVM_SET_LAPIC"))?;
    let msrs = msrs_of(&s.msrs)?;
    let n = fd.set_msrs(&msrs).map_err(op("KVM_SET_MSRS"))?;
    if n < s.msrs.len() {
        return Err(SnapshotError::Msr {
            id,
            index: s.msrs[n].index,
        });
    }
    fd.set_vcpu_events(&s.events)
        .map_err(op("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Reads the PIT, kvmclock and irqchip state of a paused VM.
pub fn save_vm(fd: &VmFd) -> Result<VmKvmState, SnapshotError> {
    let op = |op| move |source| SnapshotError::Vm { op, source };
    let pit = fd.get_pit2().map_err(op("KVM_GET_PIT2"))?;
    let clock = fd.get_clock().map_err(op("KVM_GET_CLOCK"))?;
    let mut irqchips = Vec::new();
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut c = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        fd.get_irqchip(&mut c).map_err(op("KVM_GET_IRQCHIP"))?;
        irqchips.push(c);
    }
    Ok(VmKvmState {
        pit,
        clock,
        irqchips,
    })
}

/// Writes saved PIT, kvmclock and irqchip state into a fresh VM.
pub fn restore_vm(fd: &VmFd, s: &VmKvmState) -> Result<(), SnapshotError> {
    let op = |op| move |source| SnapshotError::Vm { op, source };
    fd.set_pit2(&s.pit).map_err(op("KVM_SET_PIT2"))?;
    // Only the clock value carries over; the flags describe the old host's clock source.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(op("KVM_SET_CLOCK"))?;
    for c in &s.irqchips {
        fd.set_irqchip(c).map_err(op("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

fn to_json<T: Serialize>(section: &'static str, v: &T) -> Result<Vec<u8>, SnapshotError> {
    serde_json::to_vec(v).map_err(|source| SnapshotError::Decode { section, source })
}

fn from_json<T: for<'a> Deserialize<'a>>(
    r: &SnapshotReader,
    section: &'static str,
) -> Result<T, SnapshotError> {
    serde_json::from_slice(r.section(section)?)
        .map_err(|source| SnapshotError::Decode { section, source })
}

const PAGE: usize = 4096;

/// Writes guest RAM to `path` (sparse: zero pages are left as holes); returns its CRC32C.
pub fn write_memory(ram: &GuestRam, path: &Path) -> Result<u32, SnapshotError> {
    let io_err = |source| SnapshotError::Memory {
        path: path.to_owned(),
        source,
    };
    let mut src = ram.memfd().as_ref();
    src.seek(SeekFrom::Start(0)).map_err(io_err)?;
    let mut out = File::create(path).map_err(io_err)?;
    out.set_len(ram.size()).map_err(io_err)?;
    let mut crc = 0u32;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < ram.size() {
        let n = (ram.size() - off).min(buf.len() as u64) as usize;
        // Read through the memfd (not the mapping): plain file I/O on the same pages.
        src.read_exact(&mut buf[..n]).map_err(io_err)?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        for (i, page) in buf[..n].chunks(PAGE).enumerate() {
            if page.iter().any(|&b| b != 0) {
                out.seek(SeekFrom::Start(off + (i * PAGE) as u64))
                    .map_err(io_err)?;
                out.write_all(page).map_err(io_err)?;
            }
        }
        off += n as u64;
    }
    out.sync_all().map_err(io_err)?;
    Ok(crc)
}

/// Reads a memory file into fresh guest RAM, checking its size and CRC32C.
pub fn read_memory(path: &Path, meta: &SnapshotMeta) -> Result<GuestRam, SnapshotError> {
    let io_err = |source| SnapshotError::Memory {
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(io_err)?;
    let len = f.metadata().map_err(io_err)?.len();
    if len != meta.mem_size {
        return Err(SnapshotError::MemoryMismatch {
            path: path.to_owned(),
            what: format!("{len} bytes, the state says {}", meta.mem_size),
        });
    }
    let ram = GuestRam::new(meta.mem_size).map_err(|e| SnapshotError::Mismatch(e.to_string()))?;
    let mut dst = ram.memfd().as_ref();
    let mut crc = 0u32;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        f.read_exact(&mut buf[..n]).map_err(io_err)?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        dst.write_all(&buf[..n]).map_err(io_err)?;
        off += n as u64;
    }
    if crc != meta.mem_crc {
        return Err(SnapshotError::MemoryMismatch {
            path: path.to_owned(),
            what: format!("CRC32C {crc:#010x}, the state says {:#010x}", meta.mem_crc),
        });
    }
    Ok(ram)
}

/// Writes a snapshot directory: `state` and `memory`.
pub fn write_snapshot(
    dir: &Path,
    state: &MachineState,
    ram: &GuestRam,
) -> Result<SnapshotMeta, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Memory {
        path: dir.to_owned(),
        source,
    })?;
    let mem_crc = write_memory(ram, &dir.join(MEMORY_FILE))?;
    let meta = SnapshotMeta {
        mem_size: ram.size(),
        mem_crc,
        vcpus: state.vcpus.len() as u8,
        virtio_types: state.virtio_types.clone(),
    };
    let mut w = SnapshotWriter::new();
    w.section("meta", to_json("meta", &meta)?)
        .section("vcpus", to_json("vcpus", &state.vcpus)?)
        .section("vm", to_json("vm", &state.vm)?)
        .section("devices", to_json("devices", &state.devices)?);
    w.write(&dir.join(STATE_FILE))?;
    Ok(meta)
}

/// Reads and verifies a snapshot directory: the state and a fresh memfd with its RAM.
pub fn read_snapshot(dir: &Path) -> Result<(SnapshotMeta, MachineState, GuestRam), SnapshotError> {
    let r = SnapshotReader::open(&dir.join(STATE_FILE))?;
    let meta: SnapshotMeta = from_json(&r, "meta")?;
    let state = MachineState {
        vcpus: from_json(&r, "vcpus")?,
        vm: from_json(&r, "vm")?,
        devices: from_json(&r, "devices")?,
        virtio_types: meta.virtio_types.clone(),
    };
    if state.vcpus.len() != usize::from(meta.vcpus) {
        return Err(SnapshotError::Mismatch(format!(
            "{} vCPU states, meta says {}",
            state.vcpus.len(),
            meta.vcpus
        )));
    }
    let ram = read_memory(&dir.join(MEMORY_FILE), &meta)?;
    Ok((meta, state, ram))
}
