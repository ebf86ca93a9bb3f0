//! Guest-physical memory layout of an x86_64 microvm.
//!
//! ```text
//! 0x0000_0500  boot GDT (4 entries), boot IDT at 0x520
//! 0x0000_6000  PVH hvm_start_info, module list at 0x6040, memory map at 0x6100
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  boot page tables: PML4, PDPT at 0xa000, PD at 0xb000 (1 GiB identity, 2 MiB pages)
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x0009_fc00  EBDA .. 1 MiB: reserved; ACPI tables from 0xe0000 (RSDP first)
//! 0x0010_0000  kernel / test guest image (HIMEM_START)
//! ...          RAM up to min(size, 3 GiB); initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO gap: virtio-mmio devices from 0xd000_0000, IOAPIC 0xfec0_0000,
//!              LAPIC 0xfee0_0000, KVM TSS/identity map at 0xfffb_c000
//! 0x1_0000_0000 RAM above 3 GiB continues here
//! ```

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot PML4.
pub const PML4_START: u64 = 0x9000;
/// Boot PDPT.
pub const PDPTE_START: u64 = 0xa000;
/// Boot page directory.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line (bytes, with the NUL).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the EBDA (end of usable low RAM).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables region (RSDP at its start).
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI tables region.
pub const ACPI_END: u64 = 0x10_0000;
/// Where kernels and test guests are loaded; start of high memory.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio-mmio devices (legacy ISA lines stay below).
pub const VIRTIO_MMIO_FIRST_IRQ: u32 = 5;
/// Last GSI of the IOAPIC.
pub const LAST_GSI: u32 = 23;
/// ISA interrupt of the i8042's keyboard port.
pub const I8042_KBD_IRQ: u32 = 1;
/// ISA interrupt of the RTC.
pub const RTC_IRQ: u32 = 8;
/// GSI of the ACPI Generic Event Device's power button event.
pub const POWER_BUTTON_GSI: u32 = LAST_GSI;
/// Lines at or above [`VIRTIO_MMIO_FIRST_IRQ`] that other devices hold, which virtio-mmio
/// devices must not share: the RTC's (Linux's `rtc_cmos` holds its line exclusively, and a
/// virtio device given it fails to probe) and the power button's.
pub const RESERVED_GSIS: [u32; 2] = [RTC_IRQ, POWER_BUTTON_GSI];

/// The GSI of the `i`-th virtio-mmio device: the `i`-th line from [`VIRTIO_MMIO_FIRST_IRQ`]
/// that no other device uses; `None` past the IOAPIC's last line.
pub fn virtio_mmio_irq(i: u64) -> Option<u32> {
    (VIRTIO_MMIO_FIRST_IRQ..=LAST_GSI)
        .filter(|g| !RESERVED_GSIS.contains(g))
        .nth(usize::try_from(i).ok()?)
}
/// IOAPIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's identity map page (for real-mode emulation on Intel).
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// KVM's TSS (three pages).
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// Largest RAM we accept (1 TiB: within every x86-64 CPU's physical address width).
pub const MAX_MEM_SIZE: u64 = 1 << 40;
/// Smallest RAM we boot with: room for the boot structures and a 1 MiB image.
pub const MIN_MEM_SIZE: u64 = 2 << 20;

/// RAM ranges `(guest address, size)` for `mem_size` bytes, split around the MMIO gap.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn virtio_irqs_skip_the_legacy_lines() {
        let irqs: Vec<u32> = (0..6).filter_map(super::virtio_mmio_irq).collect();
        assert_eq!(irqs, [5, 6, 7, 9, 10, 11]);
        let all: Vec<u32> = (0..32).filter_map(super::virtio_mmio_irq).collect();
        assert_eq!(all.len(), 17);
        assert!(all.iter().all(|&g| g <= super::LAST_GSI
            && g != super::RTC_IRQ
            && g != super::POWER_BUTTON_GSI
            && g != super::I8042_KBD_IRQ
            && g != devices::legacy::COM1_IRQ));
    }

    use super::*;

    #[test]
    fn ranges_skip_the_mmio_gap() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]
        );
    }
}
