//! Boot-time CPU state: GDT and page tables in guest memory, segment/control registers for the
//! 64-bit Linux and the 32-bit PVH entries, general registers, FPU, boot MSRs, LAPIC LINT0/LINT1.

use kvm_bindings::{Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestMemoryMmap;

/// Errors of boot register setup.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT or page tables into guest memory failed.
    #[error("cannot write boot {what} at {addr:#x} into guest memory")]
    WriteMemory {
        /// What was written.
        what: &'static str,
        /// Guest address.
        addr: u64,
        /// The error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A vCPU ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer boot MSRs than given.
    #[error("KVM set {set} of {wanted} boot MSRs")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
    /// Building the MSR list failed.
    #[error("cannot build the boot MSR list")]
    MsrList(#[source] vmm_sys_util::fam::Error),
}

/// How a vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// 64-bit Linux boot protocol: long mode, identity paging of the first 1 GiB, rsi = zero page.
    Linux64 {
        /// Entry point.
        entry: u64,
    },
    /// PVH: 32-bit protected mode, paging off, rbx = `hvm_start_info`.
    Pvh {
        /// Entry point.
        entry: u64,
    },
}

// GDT slots: null, null, 64-bit code (0x10), data (0x18), TSS (0x20), 32-bit code (0x28).
const GDT: [u64; 6] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
    gdt_entry(0xc09b, 0, 0xfffff),
];
const CODE64_SEL: u16 = 0x10;
const DATA_SEL: u16 = 0x18;
const TSS_SEL: u16 = 0x20;
const CODE32_SEL: u16 = 0x28;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// A GDT descriptor from flags (access byte in 7:0, flags nibble in 15:12), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The `kvm_segment` that a GDT descriptor at `index` describes.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    #[allow(clippy::cast_possible_truncation)] // masked to 20 bits
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    val: T,
) -> Result<(), RegsError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| RegsError::WriteMemory { what, addr, source })
}

/// Writes the boot GDT, an empty IDT and the identity page tables (first 1 GiB, 2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, e) in GDT.iter().enumerate() {
        write(mem, "GDT", layout::BOOT_GDT_START + 8 * i as u64, *e)?;
    }
    write(mem, "IDT", layout::BOOT_IDT_START, 0u64)?;
    write(mem, "PML4", layout::PML4_START, layout::PDPTE_START | 0x3)?;
    write(mem, "PDPT", layout::PDPTE_START, layout::PDE_START | 0x3)?;
    for i in 0..512u64 {
        write(mem, "PD", layout::PDE_START + i * 8, (i << 21) | 0x83)?;
    }
    Ok(())
}

/// Segment and control registers for `entry` (the tables must be written already).
pub fn boot_sregs(mut sregs: kvm_sregs, entry: BootEntry) -> kvm_sregs {
    let data = segment_from_gdt(GDT[usize::from(DATA_SEL / 8)], DATA_SEL / 8);
    let tss = segment_from_gdt(GDT[usize::from(TSS_SEL / 8)], TSS_SEL / 8);
    sregs.gdt.base = layout::BOOT_GDT_START;
    #[allow(clippy::cast_possible_truncation)] // a few 8-byte entries
    let gdt_limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.gdt.limit = gdt_limit;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match entry {
        BootEntry::Linux64 { .. } => {
            sregs.cs = segment_from_gdt(GDT[usize::from(CODE64_SEL / 8)], CODE64_SEL / 8);
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        BootEntry::Pvh { .. } => {
            sregs.cs = segment_from_gdt(GDT[usize::from(CODE32_SEL / 8)], CODE32_SEL / 8);
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.efer = 0;
        }
    }
    sregs
}

/// General registers for `entry`. `vcpu` and `count` go in rdi and rdx (the test-guest kit reads
/// them; Linux ignores them).
pub fn boot_regs(entry: BootEntry, vcpu: u8, count: u8) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rdi: u64::from(vcpu),
        rdx: u64::from(count),
        ..Default::default()
    };
    match entry {
        BootEntry::Linux64 { entry } => {
            regs.rip = entry;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
            regs.rsi = layout::ZERO_PAGE_START;
        }
        BootEntry::Pvh { entry } => {
            regs.rip = entry;
            regs.rbx = layout::PVH_INFO_START;
        }
    }
    regs
}

/// MSRs a booting kernel expects: SYSENTER/SYSCALL zeroed, TSC 0, fast strings, MTRRs on (WB).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const IA32_TSC: u32 = 0x10;
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
    [
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (CSTAR, 0),
        (KERNEL_GS_BASE, 0),
        (SYSCALL_MASK, 0),
        (LSTAR, 0),
        (IA32_TSC, 0),
        (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (IA32_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char], off: usize) -> u32 {
    let b = |i: usize| u8::from_ne_bytes(regs[off + i].to_ne_bytes());
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().into_iter().enumerate() {
        regs[off + i] = b as std::os::raw::c_char;
    }
}

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Programs the whole boot state of one vCPU: FPU, MSRs, LINT0=ExtINT/LINT1=NMI, sregs, regs.
pub fn setup_vcpu(vcpu: &VcpuFd, entry: BootEntry, id: u8, count: u8) -> Result<(), RegsError> {
    let ioctl = |op| move |source| RegsError::Ioctl { op, source };
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(RegsError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }

    let mut lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let lint0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        set_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        set_delivery_mode(lint1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;

    let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&boot_sregs(sregs, entry))
        .map_err(ioctl("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot_regs(entry, id, count))
        .map_err(ioctl("KVM_SET_REGS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode() {
        let code = segment_from_gdt(GDT[2], 2);
        assert_eq!(
            (code.selector, code.type_, code.l, code.db),
            (0x10, 0xb, 1, 0)
        );
        assert_eq!(
            (code.base, code.limit, code.g, code.present),
            (0, 0xffff_ffff, 1, 1)
        );
        let data = segment_from_gdt(GDT[3], 3);
        assert_eq!((data.type_, data.db, data.s), (3, 1, 1));
        let tss = segment_from_gdt(GDT[4], 4);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
        let code32 = segment_from_gdt(GDT[5], 5);
        assert_eq!((code32.l, code32.db, code32.selector), (0, 1, 0x28));
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn long_mode_and_pvh_sregs() {
        let s = boot_sregs(kvm_sregs::default(), BootEntry::Linux64 { entry: 0 });
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cr3, layout::PML4_START);
        let p = boot_sregs(kvm_sregs::default(), BootEntry::Pvh { entry: 0 });
        assert_eq!((p.efer, p.cr0 & X86_CR0_PG, p.cs.l), (0, 0, 0));
        let r = boot_regs(BootEntry::Pvh { entry: 0x1234 }, 1, 2);
        assert_eq!(
            (r.rip, r.rbx, r.rdi, r.rdx),
            (0x1234, layout::PVH_INFO_START, 1, 2)
        );
    }

    #[test]
    fn lint_delivery_modes() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT0, 0x0001_0700);
        let v = set_delivery_mode(lapic_reg(&regs, APIC_LVT0), APIC_MODE_NMI);
        assert_eq!(v, 0x0001_0400);
    }
}
