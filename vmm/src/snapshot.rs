//! Full VM state: every vCPU, the VM's in-kernel devices (PIT, kvmclock, PIC/IOAPIC), the VMM's
//! devices, and guest RAM; saved to a snapshot directory and restored into a new [`Machine`].
//!
//! A snapshot directory holds two files:
//! - `state`: a [`snapfile`](crate::snapfile) container (magic `MVMMSNAP`, format version, one
//!   CRC32C per section and one over the file) with JSON sections `meta` ([`SnapshotMeta`]),
//!   `vcpus` (one [`SavedState`] per vCPU, `vcpu/<id>`), `vm` (the [`SavedState`] `vm`) and
//!   `devices` (the list of [`SavedState`]s of the VMM's devices, named as in [`names`]). Every
//!   entry carries its kind and layout version ([`devices::persist`]). Version 1 files (one
//!   fixed structure per section) are still read, converted to the list on the way in;
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
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use devices::legacy::{CmosState, I8042State, SerialDeviceState};
use devices::persist::{PersistError, SavedState, StateList, Versioned};
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
    /// A saved state is of another kind or layout version, does not decode, or was refused.
    #[error(transparent)]
    State(#[from] PersistError),
}

/// Names of the entries in a snapshot's state lists.
pub mod names {
    /// COM1.
    pub const SERIAL: &str = "serial";
    /// The i8042.
    pub const I8042: &str = "i8042";
    /// CMOS/RTC.
    pub const CMOS: &str = "cmos";
    /// The vsock connections handed over with the snapshot (absent when they were not).
    pub const VSOCK_CONNECTIONS: &str = "vsock-connections";
    /// The VM's in-kernel devices.
    pub const VM: &str = "vm";
    /// Prefix of the virtio-mmio transports' entries.
    pub const VIRTIO_PREFIX: &str = "virtio-mmio/";
    /// Virtio-mmio transport `index` (attach order).
    pub fn virtio(index: usize) -> String {
        format!("{VIRTIO_PREFIX}{index}")
    }
    /// Network device `index` (configuration order): its MAC and TAP.
    pub fn net(index: usize) -> String {
        format!("virtio-net/{index}")
    }
    /// vCPU `id`.
    pub fn vcpu(id: u8) -> String {
        format!("vcpu/{id}")
    }
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

impl Versioned for VcpuState {
    const KIND: &'static str = "vcpu";
    const VERSION: u32 = 1;
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

impl Versioned for VmKvmState {
    const KIND: &'static str = "kvm-vm";
    const VERSION: u32 = 1;
}

/// The `devices` section of a version 1 snapshot: one field per device.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeviceStatesV1 {
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
    /// The network devices' addresses and TAP names, in configuration order.
    #[serde(default)]
    pub net: Vec<devices::virtio::net::NetState>,
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
    /// The VMM's devices, one named, versioned entry each (see [`names`]).
    pub devices: Vec<SavedState>,
    /// Device types of the virtio transports, in order.
    pub virtio_types: Vec<u32>,
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
pub(crate) fn save_vcpu(
    fd: &VcpuFd,
    id: u8,
    msr_indices: &[u32],
) -> Result<VcpuState, SnapshotError> {
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
pub(crate) fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), SnapshotError> {
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
pub(crate) fn save_vm(fd: &VmFd) -> Result<VmKvmState, SnapshotError> {
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
pub(crate) fn restore_vm(fd: &VmFd, s: &VmKvmState) -> Result<(), SnapshotError> {
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
        let n = usize::try_from(ram.size() - off).map_or(buf.len(), |n| n.min(buf.len()));
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
///
/// Nothing is allocated before the file is known good: the size the state claims must be a
/// valid RAM size (at most [`layout::MAX_MEM_SIZE`](crate::layout::MAX_MEM_SIZE)) and the
/// memory file's length, and the file's checksum is verified in a first pass that reads only
/// its data (holes count as zeros without being read). Then the RAM is created and only the
/// file's non-zero pages are copied in (zero pages stay unallocated), the checksum being
/// computed again in case the file changed in between.
pub fn read_memory(path: &Path, meta: &SnapshotMeta) -> Result<GuestRam, SnapshotError> {
    let io_err = |source| SnapshotError::Memory {
        path: path.to_owned(),
        source,
    };
    let mismatch = |what: String| SnapshotError::MemoryMismatch {
        path: path.to_owned(),
        what,
    };
    let size = meta.mem_size;
    if !(crate::layout::MIN_MEM_SIZE..=crate::layout::MAX_MEM_SIZE).contains(&size)
        || !size.is_multiple_of(PAGE as u64)
    {
        return Err(SnapshotError::Mismatch(format!(
            "the state's memory size {size} is not a valid RAM size"
        )));
    }
    let f = open_regular(path).map_err(io_err)?;
    let len = f.metadata().map_err(io_err)?.len();
    if len != size {
        return Err(mismatch(format!("{len} bytes, the state says {size}")));
    }
    let mut buf = vec![0u8; 1 << 20];
    let crc = walk_memory(&f, len, &mut buf, |_, _| Ok(())).map_err(io_err)?;
    if crc != meta.mem_crc {
        return Err(mismatch(format!(
            "CRC32C {crc:#010x}, the state says {:#010x}",
            meta.mem_crc
        )));
    }
    let ram = GuestRam::new(size).map_err(|e| SnapshotError::Mismatch(e.to_string()))?;
    let dst = ram.memfd();
    let crc = walk_memory(&f, len, &mut buf, |off, data| {
        for (i, page) in data.chunks(PAGE).enumerate() {
            if page.iter().any(|&b| b != 0) {
                dst.write_all_at(page, off + (i * PAGE) as u64)?;
            }
        }
        Ok(())
    })
    .map_err(io_err)?;
    if crc != meta.mem_crc {
        return Err(mismatch("changed while it was read".to_owned()));
    }
    Ok(ram)
}

/// Opens a file read-only, refusing (without blocking on a FIFO) anything but a regular file.
fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// Passes the data of the first `len` bytes of `f` to `each` (offset, bytes) a buffer at a
/// time and returns the CRC32C of those bytes, holes counted as zeros without being read.
fn walk_memory(
    f: &File,
    len: u64,
    buf: &mut [u8],
    mut each: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<u32> {
    let mut crc = 0u32;
    let mut pos = 0u64;
    while pos < len {
        let (data, hole) = match next_data(f, pos)? {
            None => (len, len),
            Some(d) if d >= len => (len, len),
            Some(d) => (d, next_hole(f, d)?.min(len)),
        };
        crc = crc32c_append_zeros(crc, data - pos);
        let mut off = data;
        while off < hole {
            let n = usize::try_from(hole - off).map_or(buf.len(), |n| n.min(buf.len()));
            f.read_exact_at(&mut buf[..n], off)?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            each(off, &buf[..n])?;
            off += n as u64;
        }
        pos = hole;
    }
    Ok(crc)
}

/// `crc` extended by `n` zero bytes, in O(log n) (zero runs of a sparse file are not read).
fn crc32c_append_zeros(crc: u32, n: u64) -> u32 {
    const PIECE: usize = PAGE;
    let zeros = [0u8; PIECE];
    #[allow(clippy::cast_possible_truncation)] // below PIECE
    let rem = (n % PIECE as u64) as usize;
    let mut out = crc32c::crc32c_append(crc, &zeros[..rem]);
    let mut pieces = n / PIECE as u64;
    let (mut run_crc, mut run_len) = (crc32c::crc32c(&zeros), PIECE);
    while pieces > 0 {
        if pieces & 1 == 1 {
            out = crc32c::crc32c_combine(out, run_crc, run_len);
        }
        pieces >>= 1;
        if pieces > 0 {
            run_crc = crc32c::crc32c_combine(run_crc, run_crc, run_len);
            run_len *= 2;
        }
    }
    out
}

/// The next offset at or after `from` holding data, `None` past the last data. A file system
/// without `SEEK_DATA` reports everything as data.
fn next_data(f: &File, from: u64) -> std::io::Result<Option<u64>> {
    match lseek(f, from, libc::SEEK_DATA) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Some(from)),
        r => r,
    }
}

/// The next hole at or after `from` (the end of the file counts as one).
fn next_hole(f: &File, from: u64) -> std::io::Result<u64> {
    match lseek(f, from, libc::SEEK_HOLE) {
        Ok(Some(h)) => Ok(h),
        Err(e) if e.raw_os_error() != Some(libc::EINVAL) => Err(e),
        _ => Ok(u64::MAX),
    }
}

/// `lseek(2)`; `Ok(None)` for ENXIO (no data or hole at or after `from`).
fn lseek(f: &File, from: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let off = libc::off_t::try_from(from)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek takes an fd owned by `f` (open for the call) and integers. The file
    // position it moves is not used here (all reads are positional).
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r.unsigned_abs())) // r >= 0 here
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
        #[allow(clippy::cast_possible_truncation)] // the vCPU count is configured as a u8
        vcpus: state.vcpus.len() as u8,
        virtio_types: state.virtio_types.clone(),
    };
    let vcpus = state
        .vcpus
        .iter()
        .map(|v| SavedState::encode(names::vcpu(v.id), v))
        .collect::<Result<Vec<_>, _>>()?;
    let vm = SavedState::encode(names::VM, &state.vm)?;
    let mut w = SnapshotWriter::new();
    w.section("meta", to_json("meta", &meta)?)
        .section("vcpus", to_json("vcpus", &vcpus)?)
        .section("vm", to_json("vm", &vm)?)
        .section("devices", to_json("devices", &state.devices)?);
    w.write(&dir.join(STATE_FILE))?;
    Ok(meta)
}

/// The state of a version 1 file (fixed structures), its devices converted to the list.
fn read_state_v1(r: &SnapshotReader, meta: &SnapshotMeta) -> Result<MachineState, SnapshotError> {
    let d: DeviceStatesV1 = from_json(r, "devices")?;
    let mut devices = vec![
        SavedState::encode(names::SERIAL, &d.serial)?,
        SavedState::encode(names::I8042, &d.i8042)?,
        SavedState::encode(names::CMOS, &d.cmos)?,
    ];
    for (i, t) in d.virtio.iter().enumerate() {
        devices.push(SavedState::encode(names::virtio(i), t)?);
    }
    for (i, n) in d.net.iter().enumerate() {
        devices.push(SavedState::encode(names::net(i), n)?);
    }
    if let Some(v) = &d.vsock {
        devices.push(SavedState::encode(names::VSOCK_CONNECTIONS, v)?);
    }
    Ok(MachineState {
        vcpus: from_json(r, "vcpus")?,
        vm: from_json(r, "vm")?,
        devices,
        virtio_types: meta.virtio_types.clone(),
    })
}

/// Reads and verifies a snapshot directory: the state and a fresh memfd with its RAM.
pub fn read_snapshot(dir: &Path) -> Result<(SnapshotMeta, MachineState, GuestRam), SnapshotError> {
    let r = SnapshotReader::open(&dir.join(STATE_FILE))?;
    let meta: SnapshotMeta = from_json(&r, "meta")?;
    let state = if r.version() == 1 {
        read_state_v1(&r, &meta)?
    } else {
        let vcpus: Vec<SavedState> = from_json(&r, "vcpus")?;
        let vm: SavedState = from_json(&r, "vm")?;
        let devices: Vec<SavedState> = from_json(&r, "devices")?;
        devices.check_names()?;
        MachineState {
            vcpus: vcpus
                .iter()
                .map(SavedState::decode)
                .collect::<Result<_, _>>()?,
            vm: vm.decode()?,
            devices,
            virtio_types: meta.virtio_types.clone(),
        }
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

#[cfg(test)]
mod tests {
    // test code: values are small and fixed
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

    use super::*;

    fn meta(size: u64, crc: u32) -> SnapshotMeta {
        SnapshotMeta {
            mem_size: size,
            mem_crc: crc,
            vcpus: 1,
            virtio_types: Vec::new(),
        }
    }

    /// A crafted memory file: as long as the state claims (1 TiB), all holes (so it costs no
    /// disk), with a checksum that does not match. Refused at once, before any guest RAM
    /// exists (before the fix, the whole claimed size was filled before the check).
    #[test]
    fn a_crafted_memory_file_is_refused_before_guest_ram_is_filled() {
        const CLAIM: u64 = crate::layout::MAX_MEM_SIZE;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MEMORY_FILE);
        File::create(&path).unwrap().set_len(CLAIM).unwrap();
        let start = std::time::Instant::now();
        let err = read_memory(&path, &meta(CLAIM, 0x1234_5678)).unwrap_err();
        assert!(matches!(err, SnapshotError::MemoryMismatch { .. }), "{err}");
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        // Sizes the state cannot mean are refused before the file is looked at.
        for bad in [0, 4096, (2 << 20) + 1, CLAIM + 4096] {
            let err = read_memory(&path, &meta(bad, 0)).unwrap_err();
            assert!(matches!(err, SnapshotError::Mismatch(_)), "{bad}: {err}");
        }
        // So is a memory "file" that is a FIFO (it would block the open).
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path, which lives across the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_memory(&fifo, &meta(4 << 20, 0)).unwrap_err();
        assert!(matches!(err, SnapshotError::Memory { .. }), "{err}");
    }

    /// Data, holes, and data blocks of zeros come back as they were; a changed byte is caught.
    #[test]
    fn memory_files_round_trip_and_corruption_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MEMORY_FILE);
        let size = 8u64 << 20;
        let ram = GuestRam::new(size).unwrap();
        let src = ram.memfd();
        src.write_all_at(&[0xab; 4096], 0).unwrap();
        src.write_all_at(&[0x01; 100], 3 << 20).unwrap();
        src.write_all_at(&[0x7f; 8192], size - 8192).unwrap();
        let crc = write_memory(&ram, &path).unwrap();
        // A block of zeros stored as data (not a hole) reads the same.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0; 4096], 5 << 20).unwrap();
        drop(f);
        let back = read_memory(&path, &meta(size, crc)).unwrap();
        let (mut a, mut b) = (vec![0u8; size as usize], vec![0u8; size as usize]);
        ram.memfd().read_exact_at(&mut a, 0).unwrap();
        back.memfd().read_exact_at(&mut b, 0).unwrap();
        assert!(a == b);
        assert_eq!(crc, crc32c::crc32c(&a));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0x02], (3 << 20) + 50).unwrap();
        drop(f);
        assert!(matches!(
            read_memory(&path, &meta(size, crc)),
            Err(SnapshotError::MemoryMismatch { .. })
        ));
    }

    #[test]
    fn zero_runs_extend_a_crc_like_zero_bytes() {
        for n in [
            0u64,
            1,
            511,
            4096,
            4097,
            3 * 4096 + 5,
            1 << 20,
            (1 << 20) + 4095,
        ] {
            let direct = crc32c::crc32c_append(0x1234, &vec![0u8; n as usize]);
            assert_eq!(crc32c_append_zeros(0x1234, n), direct, "{n}");
        }
    }
}
