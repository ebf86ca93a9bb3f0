//! The KVM VM: capability checks, in-kernel irqchip and PIT, memory slots with optional dirty
//! logging, irqfd wiring.

use std::sync::Arc;

use kvm_bindings::{
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::cpuid::CpuidError;
use crate::layout;
use crate::memory::GuestRam;

/// Capabilities the VMM cannot work without, with their names for the error message.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Errors of VM creation and setup.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device is missing or cannot be opened.
    #[error("cannot open {path} (is KVM available and are you allowed to use it?)")]
    OpenKvm {
        /// The device path.
        path: String,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The KVM API version is not 12.
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    /// A required capability is missing.
    #[error("KVM lacks required capability {0}")]
    MissingCapability(&'static str),
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// A VM-level setup ioctl failed.
    #[error("{op} failed")]
    Setup {
        /// The ioctl.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Too many memory regions for the host's memslot limit.
    #[error("{needed} memory slots needed, KVM offers {max}")]
    TooManySlots {
        /// Needed.
        needed: usize,
        /// Available.
        max: usize,
    },
    /// Reading the supported CPUID failed.
    #[error("cannot read supported CPUID")]
    Cpuid(#[source] CpuidError),
}

/// One registered memory slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSlot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest physical address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the mapping.
    pub host_addr: u64,
}

/// A KVM VM with its irqchip, PIT and guest memory.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    ram: GuestRam,
    slots: Vec<MemSlot>,
    dirty_logging: bool,
    /// The MSRs KVM lets the host save for a vCPU (`KVM_GET_MSR_INDEX_LIST`, read once).
    msr_indices: Arc<[u32]>,
}

/// Opens /dev/kvm and checks the API version and the required capabilities.
pub fn open_kvm() -> Result<Kvm, VmError> {
    open_kvm_at("/dev/kvm")
}

/// Opens the KVM device at `path` and checks the API version and the required capabilities.
pub fn open_kvm_at(path: &str) -> Result<Kvm, VmError> {
    let kvm = Kvm::new_with_path(std::ffi::CString::new(path).map_err(|_| VmError::OpenKvm {
        path: path.to_string(),
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?)
    .map_err(|source| VmError::OpenKvm {
        path: path.to_string(),
        source,
    })?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(VmError::ApiVersion(v));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

impl Vm {
    /// Creates the VM (irqchip, PIT2, TSS) and registers `ram` as its memory.
    pub fn new(kvm: Kvm, ram: GuestRam) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let setup = |op| move |source| VmError::Setup { op, source };
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
            .map_err(setup("KVM_SET_IDENTITY_MAP_ADDR"))?;
        #[allow(clippy::cast_possible_truncation)] // a constant below 4 GiB
        fd.set_tss_address(layout::KVM_TSS_START as usize)
            .map_err(setup("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(setup("KVM_CREATE_PIT2"))?;

        let regions = ram.regions();
        let max = kvm.get_nr_memslots();
        if regions.len() > max {
            return Err(VmError::TooManySlots {
                needed: regions.len(),
                max,
            });
        }
        let slots = regions
            .into_iter()
            .enumerate()
            .map(|(i, (guest_addr, size, host_addr))| MemSlot {
                #[allow(clippy::cast_possible_truncation)] // a few RAM ranges
                slot: i as u32,
                guest_addr,
                size,
                host_addr,
            })
            .collect();
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(setup("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .into();
        let vm = Self {
            kvm,
            fd: Arc::new(fd),
            ram,
            slots,
            dirty_logging: false,
            msr_indices,
        };
        vm.register_slots(false)?;
        Ok(vm)
    }

    fn register_slots(&self, dirty_log: bool) -> Result<(), VmError> {
        for s in &self.slots {
            let region = kvm_userspace_memory_region {
                slot: s.slot,
                flags: if dirty_log {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: s.guest_addr,
                memory_size: s.size,
                userspace_addr: s.host_addr,
            };
            // SAFETY: the region maps `s.size` bytes at `s.host_addr` owned by `self.ram`,
            // which lives as long as the VM (the VM fd is dropped with `self`).
            unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| VmError::Setup {
                op: "KVM_SET_USER_MEMORY_REGION",
                source,
            })?;
        }
        Ok(())
    }

    /// Turns KVM dirty-page logging of all RAM slots on or off.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), VmError> {
        self.register_slots(on)?;
        self.dirty_logging = on;
        Ok(())
    }

    /// Whether dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging
    }

    /// Fetches and clears the dirty bitmap of every slot (one bit per 4 KiB page).
    pub fn dirty_log(&self) -> Result<Vec<(MemSlot, Vec<u64>)>, VmError> {
        self.slots
            .iter()
            .map(|s| {
                // u64 to usize is lossless on x86_64, the only target.
                #[allow(clippy::cast_possible_truncation)]
                let len = s.size as usize;
                self.fd
                    .get_dirty_log(s.slot, len)
                    .map(|b| (*s, b))
                    .map_err(|source| VmError::Setup {
                        op: "KVM_GET_DIRTY_LOG",
                        source,
                    })
            })
            .collect()
    }

    /// Raises `gsi` on the irqchip whenever `evt` is written.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Setup {
                op: "KVM_IRQFD",
                source,
            })
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The MSRs a vCPU state saves (those KVM lets the host read and write).
    pub fn msr_indices(&self) -> &Arc<[u32]> {
        &self.msr_indices
    }

    /// The VM fd (shared with the vCPU threads and devices that register ioeventfds).
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The memory slots.
    pub fn slots(&self) -> &[MemSlot] {
        &self.slots
    }
}

impl devices::persist::Persist for Vm {
    type State = crate::snapshot::VmKvmState;
    type Error = crate::snapshot::SnapshotError;

    /// The PIT, kvmclock and irqchip state (the VM's vCPUs paused).
    fn save(&self) -> Result<Self::State, Self::Error> {
        crate::snapshot::save_vm(&self.fd)
    }

    /// Writes saved PIT, kvmclock and irqchip state into this fresh VM.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error> {
        crate::snapshot::restore_vm(&self.fd, state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_kvm_device_is_a_clear_error() {
        let err = open_kvm_at("/nonexistent/kvm").unwrap_err();
        assert!(matches!(err, VmError::OpenKvm { .. }));
        assert!(err.to_string().contains("/nonexistent/kvm"), "{err}");
        let src = std::error::Error::source(&err).unwrap().to_string();
        assert!(src.contains("No such file"), "{src}");
    }
}
