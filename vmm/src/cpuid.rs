//! CPUID for each vCPU: `KVM_GET_SUPPORTED_CPUID` normalized to this VM's topology (APIC IDs,
//! one thread per core, one package), with the hypervisor bit set, and with the features a
//! software-emulating host KVM cannot execute in guest kernel mode hidden; and the XCR0 a vCPU
//! boots with ([`set_boot_xcr0`]).

use std::fs;

use kvm_bindings::{
    CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2, kvm_xcrs,
};
use kvm_ioctls::{Kvm, VcpuFd};

/// Errors of CPUID setup.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    GetSupported(#[source] kvm_ioctls::Error),
    /// Rebuilding the entry list failed.
    #[error("cannot build the CPUID entry list")]
    Build(#[source] vmm_sys_util::fam::Error),
    /// The vCPU count does not fit the topology fields.
    #[error("invalid vCPU topology: id {id} of {count}")]
    Topology {
        /// vCPU id.
        id: u8,
        /// vCPU count.
        count: u8,
    },
}

/// How the host's KVM runs guest code, which decides which CPU features a guest may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKvm {
    /// Hardware virtualization (VT-x / AMD-V): guest code runs natively at every CPL.
    Hardware,
    /// No VT-x/AMD-V on the host (e.g. `kvm_pvm`): guest kernel code goes through KVM's
    /// instruction emulator, which lacks some instructions.
    Emulating,
}

impl HostKvm {
    /// Detects the host: hardware if /proc/cpuinfo lists `vmx` or `svm`.
    pub fn detect() -> Self {
        let has = fs::read_to_string("/proc/cpuinfo")
            .map(|s| Self::cpuinfo_has_virt(&s))
            .unwrap_or(false);
        if has { Self::Hardware } else { Self::Emulating }
    }

    /// Whether a /proc/cpuinfo text lists vmx or svm among its flags.
    pub fn cpuinfo_has_virt(cpuinfo: &str) -> bool {
        cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .flat_map(|l| l.split_whitespace())
            .any(|f| f == "vmx" || f == "svm")
    }
}

// Leaf 1 ECX bits.
const ECX_FMA: u32 = 1 << 12;
const ECX_CX16: u32 = 1 << 13;
const ECX_SSE42: u32 = 1 << 20;
const ECX_MOVBE: u32 = 1 << 22;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_F16C: u32 = 1 << 29;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX.
const EDX_HTT: u32 = 1 << 28;
// Leaf 7 subleaf 0 EBX: AVX2, SMAP (clac/stac), and the AVX-512 family.
const L7_EBX_HIDE: u32 = (1 << 5)
    | (1 << 16)
    | (1 << 17)
    | (1 << 20)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
// Leaf 7 subleaf 0 ECX: AVX-512 VBMI/VBMI2/VNNI/BITALG/VPOPCNTDQ, VAES, VPCLMULQDQ, GFNI.
const L7_ECX_HIDE: u32 =
    (1 << 1) | (1 << 6) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
/// Features hidden on an emulating host: ones seen to fail in KVM's emulator at CPL0
/// (cmpxchg16b, popcnt, crc32 of SSE4.2, movbe, xsave/xrstor, clac/stac, rdtscp; see the
/// `insn_probe` test guest) and the AVX family that depends on XSAVE.
const L1_ECX_HIDE_EMULATING: u32 = ECX_CX16
    | ECX_SSE42
    | ECX_MOVBE
    | ECX_POPCNT
    | ECX_XSAVE
    | ECX_OSXSAVE
    | ECX_AVX
    | ECX_F16C
    | ECX_FMA;
/// Leaf 0x8000_0001 EDX: RDTSCP.
const EXT_EDX_RDTSCP: u32 = 1 << 27;

/// The host's supported CPUID.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::GetSupported)
}

/// Number of bits needed to hold ids `0..count`.
fn id_bits(count: u8) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - u32::from(count - 1).leading_zeros()
    }
}

/// Normalizes `entries` for vCPU `id` of `count` (one package, one thread per core).
pub fn normalize_entries(
    entries: &mut Vec<kvm_cpuid_entry2>,
    id: u8,
    count: u8,
    host: HostKvm,
) -> Result<(), CpuidError> {
    if count == 0 || id >= count {
        return Err(CpuidError::Topology { id, count });
    }
    let emulating = host == HostKvm::Emulating;
    if emulating {
        // No XSAVE: drop the XSAVE state enumeration leaf.
        entries.retain(|e| e.function != 0xd);
    }
    // Extended topology: KVM may list leaf 0xb (and 0x1f) with only subleaf 0; give the guest
    // both levels (SMT, core) and the terminating invalid level, filled in below.
    for leaf in [0xb, 0x1f] {
        if entries.iter().any(|e| e.function == leaf) {
            entries.retain(|e| e.function != leaf);
            for index in 0..3 {
                entries.push(kvm_cpuid_entry2 {
                    function: leaf,
                    index,
                    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..Default::default()
                });
            }
        }
    }
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(count) << 16) | (u32::from(id) << 24);
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
                e.ecx |= ECX_HYPERVISOR;
                if emulating {
                    e.ecx &= !L1_ECX_HIDE_EMULATING;
                }
            }
            // Only real cache descriptors (type != 0); AMD lists leaf 4 as all zeros.
            0x4 if e.eax & 0x1f != 0 => {
                // Cores per package - 1 in 31:26; threads sharing the cache - 1 in 25:14.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { u32::from(count) - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((u32::from(count) - 1) << 26) | (sharing << 14);
            }
            0x7 if e.index == 0 && emulating => {
                e.ebx &= !L7_EBX_HIDE;
                e.ecx &= !L7_ECX_HIDE;
            }
            0xb | 0x1f => {
                // Level 0 = SMT (1 thread per core), level 1 = core (all vCPUs), then invalid.
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = id_bits(count);
                        e.ebx = u32::from(count);
                        e.ecx = 1 | (2 << 8);
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
                e.edx = u32::from(id);
            }
            0x8000_0001 if emulating => e.edx &= !EXT_EDX_RDTSCP,
            0x8000_0008 => {
                // AMD: ApicIdSize in 15:12, cores - 1 in 7:0.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | (u32::from(count) - 1);
            }
            0x8000_001e => {
                e.eax = u32::from(id);
                e.ebx = u32::from(id) & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The XCR0 a vCPU with CPUID `entries` boots with: every user state component leaf 0xD.0
/// enumerates (EAX, EDX; x87 always), if leaf 1 has XSAVE; `None` without XSAVE.
pub fn boot_xcr0(entries: &[kvm_cpuid_entry2]) -> Option<u64> {
    let l1 = entries.iter().find(|e| e.function == 0x1)?;
    if l1.ecx & ECX_XSAVE == 0 {
        return None;
    }
    let d = entries.iter().find(|e| e.function == 0xd && e.index == 0)?;
    Some(u64::from(d.eax) | (u64::from(d.edx) << 32) | 1)
}

/// Presets the vCPU's XCR0 (as KVM holds it) to [`boot_xcr0`] of its CPUID; returns the value
/// set, or `None` without XSAVE or if KVM refused it (logged; the guest then starts with the
/// architectural XCR0 = 1).
///
/// A guest kernel writes XCR0 itself (XSETBV) before it sizes its XSAVE area, and KVM intercepts
/// that write, updates its copy and recomputes CPUID leaf 0xD.0 EBX (the XSAVE size for the enabled
/// features) from it. QEMU's software emulator does not implement the XSETBV intercept for a nested
/// SVM guest: under KVM in a QEMU TCG VM (the nested harness) the guest's write goes to the virtual
/// CPU unseen, KVM keeps XCR0 = 1 and answers EBX = 576, and Linux then warns `XSAVE consistency
/// problem: size 2696 != kernel_size 576` and runs without XSAVE; a snapshot would also save
/// XCR0 = 1. Starting with the XCR0 Linux sets (all enumerated states) keeps KVM's copy, leaf
/// 0xD.0 EBX and the CPU in agreement there. On hardware the intercept makes this a no-op for
/// Linux; the architectural reset value is not observable before the guest sets CR4.OSXSAVE, and
/// only leaf 0xD.0 EBX, read before the guest's own XSETBV, differs.
pub fn set_boot_xcr0(fd: &VcpuFd, cpuid: &CpuId) -> Option<u64> {
    let xcr0 = boot_xcr0(cpuid.as_slice())?;
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = xcr0;
    match fd.set_xcrs(&xcrs) {
        Ok(()) => Some(xcr0),
        Err(e) => {
            tracing::warn!(
                "KVM_SET_XCRS(XCR0 = {xcr0:#x}) refused ({e}); the guest starts with XCR0 = 1"
            );
            None
        }
    }
}

/// The CPUID for vCPU `id` of `count`, built from the host's supported CPUID.
pub fn vcpu_cpuid(
    supported: &CpuId,
    id: u8,
    count: u8,
    host: HostKvm,
) -> Result<CpuId, CpuidError> {
    let mut entries = supported.as_slice().to_vec();
    normalize_entries(&mut entries, id, count, host)?;
    CpuId::from_entries(&entries).map_err(CpuidError::Build)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn find(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *e.iter().find(|x| x.function == f && x.index == i).unwrap()
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        let mut l4 = entry(0x4, 2);
        l4.eax = (3 << 5) | 0x3; // L3 unified
        let mut l4_null = entry(0x4, 3);
        l4_null.eax = 0; // no more caches
        vec![
            entry(0x1, 0),
            l4,
            l4_null,
            entry(0x7, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0xd, 0),
            entry(0xd, 1),
            entry(0x8000_0001, 0),
            entry(0x8000_0008, 0),
        ]
    }

    #[test]
    fn apic_ids_and_topology() {
        let mut e = sample();
        normalize_entries(&mut e, 2, 4, HostKvm::Hardware).unwrap();
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "initial APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processor count");
        assert_eq!(l1.ebx & 0xffff, 0xffff, "brand/clflush kept");
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & ECX_CX16, 0, "hardware host keeps CX16");
        assert_ne!(find(&e, 0x8000_0001, 0).edx & EXT_EDX_RDTSCP, 0);
        let smt = find(&e, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 1 << 8, 2));
        let core = find(&e, 0xb, 1);
        assert_eq!(
            (core.eax, core.ebx, core.ecx, core.edx),
            (2, 4, 1 | (2 << 8), 2)
        );
        let inval = find(&e, 0xb, 2);
        assert_eq!((inval.ebx, inval.ecx & 0xff00), (0, 0));
        let l3 = find(&e, 4, 2);
        assert_eq!(l3.eax >> 26, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(find(&e, 4, 3).eax, 0, "null cache descriptor untouched");
        assert_eq!(find(&e, 0x8000_0008, 0).ecx & 0xf0ff, (2 << 12) | 3);
        assert_eq!(e.iter().filter(|x| x.function == 0xd).count(), 2);
    }

    #[test]
    fn extended_topology_subleaves_are_added() {
        let mut e = vec![entry(0x1, 0), entry(0xb, 0)];
        normalize_entries(&mut e, 1, 2, HostKvm::Hardware).unwrap();
        let subleaves: Vec<u32> = e
            .iter()
            .filter(|x| x.function == 0xb)
            .map(|x| x.index)
            .collect();
        assert_eq!(subleaves, vec![0, 1, 2]);
        let core = find(&e, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (1, 2, 0x201, 1));
        assert_eq!(core.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        assert!(
            e.iter().all(|x| x.function != 0x1f),
            "0x1f only where the host has it"
        );
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut e = sample();
        normalize_entries(&mut e, 0, 1, HostKvm::Hardware).unwrap();
        assert_eq!(find(&e, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(find(&e, 0xb, 1).eax, 0);
    }

    #[test]
    fn emulating_host_hides_unrunnable_features() {
        let mut e = sample();
        normalize_entries(&mut e, 0, 1, HostKvm::Emulating).unwrap();
        let l1 = find(&e, 1, 0);
        for bit in [
            ECX_CX16,
            ECX_SSE42,
            ECX_MOVBE,
            ECX_POPCNT,
            ECX_XSAVE,
            ECX_OSXSAVE,
            ECX_AVX,
        ] {
            assert_eq!(l1.ecx & bit, 0, "bit {bit:#x}");
        }
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        let l7 = find(&e, 7, 0);
        assert_eq!(l7.ebx & (1 << 20), 0, "SMAP hidden");
        assert_eq!(l7.ebx & (1 << 5), 0, "AVX2 hidden");
        assert_ne!(l7.ebx & 1, 0, "unrelated bits kept");
        assert!(e.iter().all(|x| x.function != 0xd), "XSAVE leaf dropped");
        assert_eq!(
            find(&e, 0x8000_0001, 0).edx & EXT_EDX_RDTSCP,
            0,
            "RDTSCP hidden"
        );
    }

    #[test]
    fn boot_xcr0_is_the_enumerated_user_states() {
        let mut l1 = entry(0x1, 0);
        let mut d0 = entry(0xd, 0);
        d0.eax = 0x207; // x87, SSE, AVX, PKRU
        d0.edx = 0;
        assert_eq!(boot_xcr0(&[l1, d0]), Some(0x207));
        d0.eax = 0x6; // x87 always set
        assert_eq!(boot_xcr0(&[l1, d0]), Some(0x7));
        assert_eq!(boot_xcr0(&[l1]), None, "no leaf 0xD");
        l1.ecx &= !ECX_XSAVE;
        assert_eq!(boot_xcr0(&[l1, d0]), None, "no XSAVE");
        let mut e = sample();
        normalize_entries(&mut e, 0, 1, HostKvm::Emulating).unwrap();
        assert_eq!(boot_xcr0(&e), None, "emulating host: XSAVE hidden");
    }

    #[test]
    fn bad_topology_is_an_error() {
        let mut e = sample();
        assert!(matches!(
            normalize_entries(&mut e, 4, 4, HostKvm::Hardware),
            Err(CpuidError::Topology { id: 4, count: 4 })
        ));
        assert!(normalize_entries(&mut e, 0, 0, HostKvm::Hardware).is_err());
    }

    #[test]
    fn cpuinfo_detection() {
        assert!(HostKvm::cpuinfo_has_virt("flags\t\t: fpu vme vmx sse\n"));
        assert!(HostKvm::cpuinfo_has_virt("flags\t\t: fpu svm\n"));
        assert!(!HostKvm::cpuinfo_has_virt(
            "flags\t\t: fpu vmxx sse\nmodel name : svm\n"
        ));
    }
}
