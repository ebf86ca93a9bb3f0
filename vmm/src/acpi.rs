//! ACPI tables for a hardware-reduced platform: RSDP, XSDT, FADT, DSDT (the legacy devices as PNP
//! devices with their ports and interrupts, virtio-mmio devices as `LNRO0005`, the `_S5_` sleep
//! type), MADT (one local APIC per vCPU, the IOAPIC, IRQ0 -> GSI 2).
//! Placed at [`layout::ACPI_START`] (reserved in the e820 map); the RSDP address goes in the zero
//! page (`acpi_rsdp_addr`) or the PVH start info.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, aml};
use devices::legacy::{
    ACPI_PM_PORT, CMOS_LEN, CMOS_PORT, COM1_IRQ, COM1_LEN, COM1_PORT, I8042_PORT, RESET_OFFSET,
    RESET_VALUE, SLEEP_CONTROL_OFFSET,
};
use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"MCRVMM";
const OEM_TABLE_ID: [u8; 8] = *b"MICROVMM";
const OEM_REVISION: u32 = 1;
/// FADT IAPC_BOOT_ARCH: an 8042 is present (so Linux probes the i8042 and can reset through it).
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// Offset of the sleep status register in the ACPI power block.
const SLEEP_STATUS_OFFSET: u64 = 1;

/// Errors of ACPI table setup.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit below 1 MiB.
    #[error("ACPI tables need {size} bytes, only {avail} available")]
    TooBig {
        /// Needed.
        size: u64,
        /// Available.
        avail: u64,
    },
    /// Writing them failed.
    #[error("cannot write ACPI tables into guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// Too many vCPUs for 8-bit APIC ids.
    #[error("{0} vCPUs do not fit in MADT local APIC entries")]
    TooManyVcpus(usize),
}

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDesc {
    /// MMIO base.
    pub addr: u64,
    /// Window length.
    pub len: u64,
    /// GSI.
    pub irq: u32,
}

/// Built tables: `(guest address, bytes)` of each, RSDP first.
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// Address of the RSDP.
    pub rsdp_addr: u64,
    /// Every table with its address.
    pub tables: Vec<(u64, Vec<u8>)>,
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

use crate::layout::{I8042_KBD_IRQ, RTC_IRQ};

/// A legacy device under `\_SB_` as a PNP device: `_HID` (EISA id), `_UID`, and a `_CRS` with its
/// I/O ranges `(base, len)` and one edge-triggered, active-high ISA interrupt.
///
/// On a hardware-reduced ACPI platform Linux has no legacy PIC (`nr_legacy_irqs() == 0`), so ISA
/// IRQ numbers are not mapped to IOAPIC pins by default: a driver that requests its fixed IRQ (the
/// 8250 at IRQ 4, the i8042 at 1, rtc_cmos at 8) gets -EINVAL. Described here, the PNP layer maps
/// each interrupt through ACPI (`acpi_register_gsi`) and the drivers bind to these devices.
fn legacy_device(name: &str, hid: &str, uid: u32, io: &[(u64, u64)], irq: u32) -> Vec<u8> {
    // Legacy port ranges from constant tables: 16-bit ports, a few bytes each.
    #[allow(clippy::cast_possible_truncation)]
    let ios: Vec<aml::IO> = io
        .iter()
        .map(|&(base, len)| aml::IO::new(base as u16, base as u16, 1, len as u8))
        .collect();
    let int = aml::Interrupt::new(true, true, false, false, irq);
    let mut res: Vec<&dyn Aml> = ios.iter().map(|i| i as &dyn Aml).collect();
    res.push(&int);
    let crs = aml::ResourceTemplate::new(res);
    let hid = aml::EISAName::new(hid);
    bytes(&aml::Device::new(
        name.into(),
        vec![
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// The legacy devices the VMM has on its port I/O bus: COM1 (8250), the i8042 keyboard
/// controller (data and command ports), the CMOS RTC.
fn legacy_devices() -> Vec<u8> {
    let mut v = legacy_device("COM1", "PNP0501", 1, &[(COM1_PORT, COM1_LEN)], COM1_IRQ);
    v.extend(legacy_device(
        "PS2K",
        "PNP0303",
        0,
        &[(I8042_PORT, 1), (I8042_PORT + 4, 1)],
        I8042_KBD_IRQ,
    ));
    v.extend(legacy_device(
        "RTC_",
        "PNP0B00",
        0,
        &[(CMOS_PORT, CMOS_LEN)],
        RTC_IRQ,
    ));
    v
}

/// The power button: `\_SB_.PWRB` (`PNP0C0C`, which Linux's ACPI button driver turns into
/// KEY_POWER), and a Generic Event Device (`ACPI0013`) on [`layout::POWER_BUTTON_GSI`] whose
/// `_EVT` notifies the button (0x80: pressed). A hardware-reduced platform has no fixed power
/// button; this is how it signals one.
fn power_button() -> Vec<u8> {
    let mut v = bytes(&aml::Device::new(
        "PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    ));
    let gsi = layout::POWER_BUTTON_GSI;
    let int = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = aml::ResourceTemplate::new(vec![&int]);
    let pressed = 0x80u8;
    let button = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&button, &pressed);
    let arg0 = aml::Arg(0);
    let is_button = aml::Equal::new(&arg0, &gsi);
    let on_button = aml::If::new(&is_button, vec![&notify]);
    v.extend(bytes(&aml::Device::new(
        "GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Method::new("_EVT".into(), 1, true, vec![&on_button]),
        ],
    )));
    v
}

/// An already-encoded AML object.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn dsdt(virtio: &[VirtioMmioDesc]) -> Vec<u8> {
    let mut body = Vec::new();
    let mut legacy = legacy_devices();
    legacy.extend(power_button());
    let legacy = RawAml(legacy);
    // Devices under \_SB_: one per virtio-mmio transport.
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    #[allow(clippy::cast_possible_truncation)] // a few transports
    let uids: Vec<u32> = (0..virtio.len() as u32).collect();
    // The virtio-mmio window lies below 4 GiB.
    #[allow(clippy::cast_possible_truncation)]
    let mems: Vec<aml::Memory32Fixed> = virtio
        .iter()
        .map(|d| aml::Memory32Fixed::new(true, d.addr as u32, d.len as u32))
        .collect();
    let irqs: Vec<aml::Interrupt> = virtio
        .iter()
        .map(|d| aml::Interrupt::new(true, true, false, false, d.irq))
        .collect();
    let crs: Vec<aml::ResourceTemplate> = mems
        .iter()
        .zip(&irqs)
        .map(|(m, i)| aml::ResourceTemplate::new(vec![m, i]))
        .collect();
    let crs_names: Vec<aml::Name> = crs
        .iter()
        .map(|c| aml::Name::new("_CRS".into(), c))
        .collect();
    let uid_names: Vec<aml::Name> = uids
        .iter()
        .map(|u| aml::Name::new("_UID".into(), u))
        .collect();
    let devs: Vec<aml::Device> = (0..virtio.len())
        .map(|i| {
            aml::Device::new(
                format!("VR{i:02X}").as_str().into(),
                vec![&hid, &uid_names[i], &crs_names[i]],
            )
        })
        .collect();
    let mut dev_refs: Vec<&dyn Aml> = vec![&legacy];
    dev_refs.extend(devs.iter().map(|d| d as &dyn Aml));
    aml::Scope::new("\\_SB_".into(), dev_refs).to_aml_bytes(&mut body);
    // Sleep type 5 for S5 (power off), matching the ACPI power device.
    let five = 5u8;
    let zero = 0u8;
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&five, &zero])).to_aml_bytes(&mut body);

    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(&body);
    t.as_slice().to_vec()
}

fn madt(vcpus: u8) -> Vec<u8> {
    // Header + local APIC address + flags (PCAT_COMPAT: the in-kernel 8259s exist).
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    #[allow(clippy::cast_possible_truncation)] // 0xfee0_0000
    t.write_u32(36, layout::LAPIC_START as u32);
    t.write_u32(40, 1);
    for i in 0..vcpus {
        t.append_slice(&bytes(&ProcessorLocalApic::new(
            i,
            i,
            EnabledStatus::Enabled,
        )));
    }
    #[allow(clippy::cast_possible_truncation)] // 0xfec0_0000
    t.append_slice(&bytes(&IoApic::new(0, layout::IOAPIC_START as u32, 0)));
    // Interrupt source override: ISA IRQ 0 (PIT) is GSI 2, as KVM routes it.
    t.append_slice(&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
    // Local APIC NMI: all processors, LINT1.
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io = |off: u64| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            ACPI_PM_PORT + off,
        )
    };
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    f.iapc_boot_arch = IAPC_BOOT_ARCH_8042.into();
    f.sleep_control_reg = io(SLEEP_CONTROL_OFFSET);
    f.sleep_status_reg = io(SLEEP_STATUS_OFFSET);
    f.reset_reg = io(RESET_OFFSET);
    f.reset_value = RESET_VALUE;
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"MICROVMM").into();
    bytes(&f.finalize())
}

/// Builds all tables for `vcpus` vCPUs and the given virtio-mmio devices, laid out from `base`.
pub fn build_tables(vcpus: u8, virtio: &[VirtioMmioDesc], base: u64) -> AcpiTables {
    let rsdp_addr = base;
    let dsdt_addr = align8(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt(virtio);
    let fadt_addr = align8(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align8(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let xsdt_addr = align8(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    AcpiTables {
        rsdp_addr,
        tables: vec![
            (rsdp_addr, rsdp),
            (dsdt_addr, dsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (xsdt_addr, bytes(&xsdt)),
        ],
    }
}

/// Builds the tables and writes them into guest memory; returns the RSDP address.
pub fn write_acpi_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    virtio: &[VirtioMmioDesc],
) -> Result<u64, AcpiError> {
    let t = build_tables(vcpus, virtio, layout::ACPI_START);
    let end = t
        .tables
        .iter()
        .map(|(a, b)| a + b.len() as u64)
        .max()
        .unwrap_or(layout::ACPI_START);
    if end > layout::ACPI_END {
        return Err(AcpiError::TooBig {
            size: end - layout::ACPI_START,
            avail: layout::ACPI_END - layout::ACPI_START,
        });
    }
    for (addr, data) in &t.tables {
        mem.write_slice(data, GuestAddress(*addr))
            .map_err(AcpiError::Memory)?;
    }
    Ok(t.rsdp_addr)
}

#[cfg(test)]
mod tests {
    // test code: values are small and fixed
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn find<'a>(t: &'a AcpiTables, sig: &[u8]) -> &'a (u64, Vec<u8>) {
        t.tables.iter().find(|(_, b)| b.starts_with(sig)).unwrap()
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn devices() -> Vec<VirtioMmioDesc> {
        vec![
            VirtioMmioDesc {
                addr: 0xd000_0000,
                len: 0x1000,
                irq: 5,
            },
            VirtioMmioDesc {
                addr: 0xd000_1000,
                len: 0x1000,
                irq: 6,
            },
        ]
    }

    #[test]
    fn checksums_and_lengths() {
        let t = build_tables(4, &devices(), layout::ACPI_START);
        let (rsdp_addr, rsdp) = &t.tables[0];
        assert_eq!(*rsdp_addr, layout::ACPI_START);
        assert!(rsdp.starts_with(b"RSD PTR "));
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        for (addr, b) in &t.tables[1..] {
            assert_eq!(
                sum(b),
                0,
                "checksum of {}",
                String::from_utf8_lossy(&b[..4])
            );
            assert_eq!(u32_at(b, 4) as usize, b.len(), "length field");
            assert_eq!(addr % 8, 0);
        }
    }

    #[test]
    fn tables_point_at_each_other() {
        let t = build_tables(2, &devices(), layout::ACPI_START);
        let rsdp = &t.tables[0].1;
        let (xsdt_addr, xsdt) = find(&t, b"XSDT");
        assert_eq!(u64_at(rsdp, 24), *xsdt_addr);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        let (fadt_addr, fadt) = find(&t, b"FACP");
        let (madt_addr, _) = find(&t, b"APIC");
        assert_eq!(entries, vec![*fadt_addr, *madt_addr]);
        let (dsdt_addr, _) = find(&t, b"DSDT");
        assert_eq!(u64_at(fadt, 140), *dsdt_addr, "X_DSDT");
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(fadt[116], 1, "reset register in system I/O");
        assert_eq!(u64_at(fadt, 120), ACPI_PM_PORT + RESET_OFFSET);
        assert_eq!(
            u64_at(fadt, 244 + 4),
            ACPI_PM_PORT + SLEEP_CONTROL_OFFSET,
            "sleep control"
        );
    }

    #[test]
    fn madt_lists_every_cpu() {
        let t = build_tables(3, &[], layout::ACPI_START);
        let (_, madt) = find(&t, b"APIC");
        assert_eq!(u32_at(madt, 36), layout::LAPIC_START as u32);
        let mut off = 44;
        let mut apic_ids = Vec::new();
        let mut types = Vec::new();
        while off < madt.len() {
            let (ty, len) = (madt[off], madt[off + 1] as usize);
            types.push(ty);
            if ty == 0 {
                apic_ids.push(madt[off + 3]);
                assert_eq!(u32_at(madt, off + 4), 1, "enabled");
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(apic_ids, vec![0, 1, 2]);
        assert_eq!(types, vec![0, 0, 0, 1, 2, 4]);
    }

    #[test]
    fn dsdt_names_virtio_devices() {
        let t = build_tables(1, &devices(), layout::ACPI_START);
        let (_, dsdt) = find(&t, b"DSDT");
        let text = String::from_utf8_lossy(dsdt);
        assert_eq!(text.matches("LNRO0005").count(), 2);
        assert!(text.contains("VR00") && text.contains("VR01") && text.contains("_S5_"));
        // The second device's MMIO base appears in its Memory32Fixed descriptor.
        let needle = 0xd000_1000u32.to_le_bytes();
        assert!(dsdt.windows(4).any(|w| w == needle));
    }

    /// The `_CRS` buffer of the device whose `_HID` is EISA id `hid` (4 bytes), as
    /// (I/O descriptors (min, len), extended interrupts).
    fn legacy_crs(dsdt: &[u8], hid: [u8; 4]) -> (Vec<(u16, u8)>, Vec<u32>) {
        // Name(_HID, EISAID): 0x08 "_HID" 0x0c <u32>.
        let mut pat = vec![0x08, b'_', b'H', b'I', b'D', 0x0c];
        pat.extend_from_slice(&hid);
        let at = dsdt
            .windows(pat.len())
            .position(|w| w == pat.as_slice())
            .expect("device with this _HID");
        let crs = at + dsdt[at..].windows(4).position(|w| w == b"_CRS").unwrap();
        let (mut ios, mut irqs) = (Vec::new(), Vec::new());
        // _CRS 0x11 (buffer) PkgLength BufferSize(0x0a n) then the descriptors, until the end tag.
        let mut o = crs + 4 + 1 + 1 + 2;
        loop {
            match dsdt[o] {
                0x47 => {
                    ios.push((u16::from_le_bytes([dsdt[o + 2], dsdt[o + 3]]), dsdt[o + 7]));
                    o += 8;
                }
                0x89 => {
                    assert_eq!(dsdt[o + 3] & 0x0f, 0x03, "consumer, edge, active high");
                    irqs.push(u32_at(dsdt, o + 5));
                    o += 9;
                }
                0x79 => break,
                b => panic!("unexpected descriptor {b:#x} at {o}"),
            }
        }
        (ios, irqs)
    }

    #[test]
    fn dsdt_describes_legacy_devices_with_their_interrupts() {
        let t = build_tables(1, &devices(), layout::ACPI_START);
        let (_, dsdt) = find(&t, b"DSDT");
        // EISA ids: PNP0501 = 41 d0 05 01, PNP0303 = 41 d0 03 03, PNP0B00 = 41 d0 0b 00.
        assert_eq!(
            legacy_crs(dsdt, [0x41, 0xd0, 0x05, 0x01]),
            (vec![(0x3f8, 8)], vec![4]),
            "COM1"
        );
        assert_eq!(
            legacy_crs(dsdt, [0x41, 0xd0, 0x03, 0x03]),
            (vec![(0x60, 1), (0x64, 1)], vec![1]),
            "i8042 keyboard"
        );
        assert_eq!(
            legacy_crs(dsdt, [0x41, 0xd0, 0x0b, 0x00]),
            (vec![(0x70, 2)], vec![8]),
            "RTC"
        );
    }

    /// The power button: a `PNP0C0C` device, and a Generic Event Device on the power button's
    /// GSI whose `_EVT` notifies it with 0x80.
    #[test]
    fn dsdt_has_a_power_button_behind_a_generic_event_device() {
        let t = build_tables(1, &devices(), layout::ACPI_START);
        let (_, dsdt) = find(&t, b"DSDT");
        let at = |needle: &[u8]| dsdt.windows(needle.len()).position(|w| w == needle);
        // PNP0C0C = 41 d0 0c 0c.
        assert!(at(&[0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0c, 0x0c]).is_some());
        let ged = at(b"ACPI0013").expect("a GED");
        // Its interrupt: an extended interrupt descriptor (consumer, edge, active high).
        let gsi = layout::POWER_BUTTON_GSI.to_le_bytes();
        let int = dsdt[ged..]
            .windows(9)
            .position(|w| w[0] == 0x89 && w[3] & 0x0f == 0x03 && w[5..9] == gsi)
            .expect("the GED's interrupt on the power button's GSI");
        // _EVT: Method with one argument, If (LEqual (Arg0, GSI)) Notify (\_SB_.PWRB, 0x80).
        let evt = ged
            + int
            + dsdt[ged + int..]
                .windows(4)
                .position(|w| w == b"_EVT")
                .unwrap();
        let mut notify = vec![0x86, b'\\', 0x2e];
        notify.extend_from_slice(b"_SB_PWRB");
        notify.extend_from_slice(&[0x0a, 0x80]);
        assert!(
            dsdt[evt..]
                .windows(notify.len())
                .any(|w| w == notify.as_slice()),
            "Notify(\\_SB_.PWRB, 0x80) in _EVT"
        );
        assert!(
            dsdt[evt..].windows(2).any(|w| w == [0x93, 0x68]),
            "LEqual(Arg0, ..)"
        );
    }

    #[test]
    fn writes_into_guest_memory() {
        let ram = crate::memory::GuestRam::new(4 << 20).unwrap();
        let rsdp = write_acpi_tables(ram.memory(), 2, &devices()).unwrap();
        let mut sig = [0u8; 8];
        ram.memory()
            .read_slice(&mut sig, GuestAddress(rsdp))
            .unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }
}
