//! Loading a guest: kernel images (bzImage with the 64-bit boot protocol, ELF with or without a
//! PVH note, and the test-guest kit's ELF images), initrd, command line, e820 map, and the boot
//! parameters (Linux zero page or PVH `hvm_start_info`).

use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability, load_cmdline};
use vm_memory::{ByteValued, Bytes, GuestAddress, ReadVolatile};

use crate::layout;
use crate::memory::{GuestMemoryMmap, GuestRam};
use crate::regs::BootEntry;

/// Errors of loading and configuring a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Reading the image failed.
    #[error("cannot read the {what}")]
    Read {
        /// Which image.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither an ELF nor a bzImage.
    #[error("the kernel image is neither an ELF file nor a bzImage (no ELF magic, no \"HdrS\")")]
    UnknownKernelFormat,
    /// The bzImage is too old for the 64-bit boot protocol.
    #[error(
        "the bzImage uses boot protocol {version:#x} without a 64-bit entry (need 2.12+ with XLF_KERNEL_64)"
    )]
    No64BitEntry {
        /// Its boot protocol version.
        version: u16,
    },
    /// linux-loader rejected the kernel.
    #[error("cannot load the kernel")]
    Load(#[source] linux_loader::loader::Error),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The initrd does not fit in guest memory.
    #[error(
        "the initrd ({size} bytes) does not fit between the kernel end {kernel_end:#x} and {limit:#x}"
    )]
    InitrdTooBig {
        /// Its size.
        size: u64,
        /// Kernel end.
        kernel_end: u64,
        /// Highest address usable.
        limit: u64,
    },
    /// Writing into guest memory failed.
    #[error("cannot write the {what} into guest memory")]
    Memory {
        /// What.
        what: &'static str,
        /// The error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Writing the zero page failed.
    #[error("cannot write the boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// e820 entry type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 entry type: reserved.
pub const E820_RESERVED: u32 = 2;

/// One e820 map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The e820 map for `mem_size` bytes of RAM: low RAM below the EBDA, the EBDA/BIOS/ACPI area
/// reserved, then RAM from 1 MiB, split around the MMIO gap.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: layout::EBDA_START,
            size: layout::HIMEM_START - layout::EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in layout::ram_ranges(mem_size) {
        let (start, end) = (start.max(layout::HIMEM_START), start + len);
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// A loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// How the vCPUs enter it.
    pub entry: BootEntry,
    /// The bzImage setup header, if it was one.
    pub setup_header: Option<setup_header>,
    /// First byte after the kernel.
    pub end: u64,
}

const XLF_KERNEL_64: u16 = 1;

/// Loads an ELF or bzImage kernel. ELF kernels with a PVH note boot through PVH, other ELF files
/// (vmlinux without the note, test guests) through the 64-bit entry at `e_entry`.
pub fn load_kernel<F>(mem: &GuestMemoryMmap, image: &mut F) -> Result<LoadedKernel, BootError>
where
    F: Read + ReadVolatile + Seek,
{
    let read = |source| BootError::Read {
        what: "kernel image",
        source,
    };
    let mut head = [0u8; 0x208];
    image.seek(SeekFrom::Start(0)).map_err(read)?;
    let n = read_up_to(image, &mut head).map_err(read)?;
    let head = &head[..n];
    let himem = Some(GuestAddress(layout::HIMEM_START));
    if head.starts_with(b"\x7fELF") {
        let r = Elf::load(mem, None, image, himem).map_err(BootError::Load)?;
        let entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => BootEntry::Pvh { entry: addr.0 },
            _ => BootEntry::Linux64 {
                entry: r.kernel_load.0,
            },
        };
        Ok(LoadedKernel {
            entry,
            setup_header: None,
            end: r.kernel_end,
        })
    } else if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        let r = BzImage::load(mem, None, image, himem).map_err(BootError::Load)?;
        let hdr = r.setup_header.unwrap_or_default();
        if hdr.version < 0x20c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::No64BitEntry {
                version: hdr.version,
            });
        }
        Ok(LoadedKernel {
            // The 64-bit entry is 0x200 past the 32-bit protected-mode entry.
            entry: BootEntry::Linux64 {
                entry: r.kernel_load.0 + 0x200,
            },
            setup_header: Some(hdr),
            end: r.kernel_end,
        })
    } else {
        Err(BootError::UnknownKernelFormat)
    }
}

fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Where an initrd was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdInfo {
    /// Guest address.
    pub addr: u64,
    /// Size.
    pub size: u64,
}

/// Default `initrd_addr_max` of the boot protocol.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Puts the initrd at the top of low RAM (page-aligned, below the kernel's `initrd_addr_max`).
pub fn load_initrd<F>(
    ram: &GuestRam,
    kernel: &LoadedKernel,
    image: &mut F,
) -> Result<InitrdInfo, BootError>
where
    F: Read + ReadVolatile + Seek,
{
    let read = |source| BootError::Read {
        what: "initrd",
        source,
    };
    let size = image.seek(SeekFrom::End(0)).map_err(read)?;
    image.seek(SeekFrom::Start(0)).map_err(read)?;
    let addr_max = match kernel.setup_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        _ => DEFAULT_INITRD_ADDR_MAX,
    };
    let limit = ram.low_end().min(addr_max + 1);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel.end.max(layout::HIMEM_START))
        .ok_or(BootError::InitrdTooBig {
            size,
            kernel_end: kernel.end,
            limit,
        })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooBig {
        size,
        kernel_end: kernel.end,
        limit,
    })?;
    ram.memory()
        .read_exact_volatile_from(GuestAddress(addr), image, len)
        .map_err(|source| BootError::Memory {
            what: "initrd",
            source,
        })?;
    Ok(InitrdInfo { addr, size })
}

/// Writes the command line at [`layout::CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<(), BootError> {
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline).map_err(BootError::Load)
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

/// The Linux zero page for a kernel: its own setup header (bzImage) or a synthesized one (ELF),
/// with loader type, command line, initrd, RSDP address and the e820 map.
pub fn linux_boot_params(
    kernel: &LoadedKernel,
    cmdline_size: usize,
    initrd: Option<InitrdInfo>,
    rsdp: Option<u64>,
    e820: &[E820Entry],
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(h) = kernel.setup_header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    #[allow(clippy::cast_possible_truncation)] // a constant below 4 GiB
    let cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmd_line_ptr = cmd_line_ptr;
    #[allow(clippy::cast_possible_truncation)] // at most CMDLINE_MAX_SIZE (64 KiB)
    let cmdline_size = cmdline_size as u32;
    params.hdr.cmdline_size = cmdline_size;
    if let Some(i) = initrd {
        // The initrd is placed below low RAM's end (under 4 GiB) by `load_initrd`.
        #[allow(clippy::cast_possible_truncation)]
        let (image, size) = (i.addr as u32, i.size as u32);
        params.hdr.ramdisk_image = image;
        params.hdr.ramdisk_size = size;
    }
    if let Some(r) = rsdp {
        params.acpi_rsdp_addr = r;
    }
    let n = e820.len().min(params.e820_table.len());
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    #[allow(clippy::cast_possible_truncation)] // at most the table's 128 entries
    let entries = n as u8;
    params.e820_entries = entries;
    params
}

/// Writes the zero page at [`layout::ZERO_PAGE_START`].
pub fn write_linux_boot_params(
    mem: &GuestMemoryMmap,
    params: &boot_params,
) -> Result<(), BootError> {
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(params, GuestAddress(layout::ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::BootParams)
}

/// `hvm_start_info` with `ByteValued`.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: `hvm_start_info` is a repr(C) struct of integers with no padding-sensitive invariants;
// any byte pattern is a valid value.
unsafe impl ByteValued for StartInfo {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: repr(C) integers only; any byte pattern is valid.
unsafe impl ByteValued for MemmapEntry {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: repr(C) integers only; any byte pattern is valid.
unsafe impl ByteValued for ModlistEntry {}

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Writes the PVH start info, module list (initrd) and memory map.
pub fn write_pvh_boot_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdInfo>,
    rsdp: Option<u64>,
    e820: &[E820Entry],
) -> Result<(), BootError> {
    let w = |what, r: Result<(), vm_memory::GuestMemoryError>| {
        r.map_err(|source| BootError::Memory { what, source })
    };
    for (i, e) in e820.iter().enumerate() {
        let entry = MemmapEntry(hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        });
        let at = layout::PVH_MEMMAP_START + (i * std::mem::size_of::<MemmapEntry>()) as u64;
        w("PVH memory map", mem.write_obj(entry, GuestAddress(at)))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: rsdp.unwrap_or(0),
        memmap_paddr: layout::PVH_MEMMAP_START,
        #[allow(clippy::cast_possible_truncation)] // a few entries
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some(i) = initrd {
        let m = ModlistEntry(hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            ..Default::default()
        });
        w(
            "PVH module list",
            mem.write_obj(m, GuestAddress(layout::PVH_MODLIST_START)),
        )?;
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST_START;
    }
    w(
        "PVH start info",
        mem.write_obj(StartInfo(info), GuestAddress(layout::PVH_INFO_START)),
    )
}

#[cfg(test)]
mod tests {
    // test code: values are small and fixed
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

    use super::*;

    #[test]
    fn e820_small_and_large() {
        let m = e820_map(64 << 20);
        assert_eq!(
            m,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x100000,
                    size: (64 << 20) - 0x100000,
                    kind: E820_RAM
                },
            ]
        );
        let big = e820_map(5 << 30);
        assert_eq!(big.len(), 4);
        assert_eq!(big[2].addr + big[2].size, layout::MMIO_GAP_START);
        assert_eq!(
            big[3],
            E820Entry {
                addr: 1 << 32,
                size: 2 << 30,
                kind: E820_RAM
            }
        );
        // RAM totals the configured size minus the reserved EBDA..1 MiB hole.
        let ram: u64 = big
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (5 << 30) - (0x100000 - 0x9fc00));
    }

    #[test]
    fn zero_page_layout() {
        let k = LoadedKernel {
            entry: BootEntry::Linux64 { entry: 0x100000 },
            setup_header: None,
            end: 0x200000,
        };
        let e820 = e820_map(128 << 20);
        let initrd = InitrdInfo {
            addr: 0x700_0000,
            size: 0x1234,
        };
        let p = linux_boot_params(&k, 42, Some(initrd), Some(layout::ACPI_START), &e820);
        let bytes = p.as_slice();
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        // Offsets from Documentation/arch/x86/zero-page.rst and boot.rst.
        assert_eq!(u64_at(0x070), layout::ACPI_START, "acpi_rsdp_addr");
        assert_eq!(bytes[0x1e8], 3, "e820_entries");
        assert_eq!(
            u16::from_le_bytes([bytes[0x1fe], bytes[0x1ff]]),
            0xaa55,
            "boot_flag"
        );
        assert_eq!(u32_at(0x202), 0x5372_6448, "HdrS");
        assert_eq!(bytes[0x210], 0xff, "type_of_loader");
        assert_eq!(u32_at(0x218), 0x700_0000, "ramdisk_image");
        assert_eq!(u32_at(0x21c), 0x1234, "ramdisk_size");
        assert_eq!(u32_at(0x228), layout::CMDLINE_START as u32, "cmd_line_ptr");
        assert_eq!(u32_at(0x238), 42, "cmdline_size");
        // e820_table at 0x2d0, 20 bytes per entry.
        assert_eq!(u64_at(0x2d0 + 20 * 2), 0x100000);
        assert_eq!(u64_at(0x2d0 + 20 * 2 + 8), (128 << 20) - 0x100000);
        assert_eq!(u32_at(0x2d0 + 20 * 2 + 16), E820_RAM);
        assert_eq!(u32_at(0x2d0 + 20 + 16), E820_RESERVED);
    }

    #[test]
    fn rejects_garbage_kernel() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mut img = std::io::Cursor::new(vec![0x55u8; 4096]);
        assert!(matches!(
            load_kernel(ram.memory(), &mut img),
            Err(BootError::UnknownKernelFormat)
        ));
        let mut empty = std::io::Cursor::new(Vec::<u8>::new());
        assert!(matches!(
            load_kernel(ram.memory(), &mut empty),
            Err(BootError::UnknownKernelFormat)
        ));
        // A truncated ELF header is an ELF load error, not a panic.
        let mut elf = std::io::Cursor::new(b"\x7fELF\x02\x01".to_vec());
        assert!(matches!(
            load_kernel(ram.memory(), &mut elf),
            Err(BootError::Load(_))
        ));
    }

    #[test]
    fn loads_a_test_guest_elf_and_places_initrd() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mut img = std::io::Cursor::new(vmm_test_guests::HELLO.elf);
        let k = load_kernel(ram.memory(), &mut img).unwrap();
        assert_eq!(k.entry, BootEntry::Linux64 { entry: 0x100000 });
        let mut initrd = std::io::Cursor::new(vec![7u8; 10_000]);
        let i = load_initrd(&ram, &k, &mut initrd).unwrap();
        assert_eq!(i.addr % 4096, 0);
        assert!(i.addr + i.size <= 16 << 20);
        let b: u8 = ram.memory().read_obj(GuestAddress(i.addr + 9_999)).unwrap();
        assert_eq!(b, 7);
        let mut huge = std::io::Cursor::new(vec![0u8; 16 << 20]);
        assert!(matches!(
            load_initrd(&ram, &k, &mut huge),
            Err(BootError::InitrdTooBig { .. })
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Garbage shaped like a bzImage or an ELF file is a typed error, never a panic.
        #[test]
        fn random_kernel_images_never_panic(
            mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..0x3000),
            kind in 0u8..3,
        ) {
            match kind {
                0 if bytes.len() >= 0x206 => bytes[0x202..0x206].copy_from_slice(b"HdrS"),
                1 if bytes.len() >= 4 => bytes[..4].copy_from_slice(b"\x7fELF"),
                _ => {}
            }
            let ram = GuestRam::new(4 << 20).unwrap();
            let _ = load_kernel(ram.memory(), &mut std::io::Cursor::new(bytes));
        }

        /// A real ELF image with corrupted header bytes loads or fails with a typed error.
        #[test]
        fn corrupted_elf_headers_never_panic(
            edits in proptest::collection::vec((0usize..0x200, proptest::prelude::any::<u8>()), 1..8),
        ) {
            let mut img = vmm_test_guests::HELLO.elf.to_vec();
            for (at, v) in edits {
                if at < img.len() {
                    img[at] = v;
                }
            }
            let ram = GuestRam::new(4 << 20).unwrap();
            let _ = load_kernel(ram.memory(), &mut std::io::Cursor::new(img));
        }
    }
}
