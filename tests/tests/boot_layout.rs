//! What `Machine::boot` leaves in guest memory: command line (with the `virtio_mmio.device=`
//! form), zero page, ACPI tables describing the virtio-mmio devices, and the MMIO bus.

use std::sync::{Arc, Mutex};

use devices::BusDevice;
use microvmm_tests::kvm_or_skip;
use vm_memory::{Bytes, GuestAddress};
use vmm::Machine;
use vmm::config::MachineConfig;
use vmm::layout;

struct Dummy;

impl BusDevice for Dummy {
    fn name(&self) -> &str {
        "dummy-virtio"
    }
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

fn read_cstr(m: &Machine, addr: u64) -> String {
    let mut buf = vec![0u8; 512];
    m.memory().read_slice(&mut buf, GuestAddress(addr)).unwrap();
    let end = buf.iter().position(|&b| b == 0).unwrap();
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[test]
fn boot_writes_cmdline_zero_page_and_acpi_for_virtio_devices() {
    if !kvm_or_skip("boot_writes_cmdline_zero_page_and_acpi_for_virtio_devices") {
        return;
    }
    let mut cfg = MachineConfig::test_guest("hello");
    cfg.vcpus = 2;
    cfg.cmdline = Some("console=ttyS0".into());
    cfg.virtio_mmio_cmdline = true;
    let mut m = Machine::new(cfg, None).unwrap();
    let a = m.add_virtio_mmio(Arc::new(Mutex::new(Dummy))).unwrap();
    let b = m.add_virtio_mmio(Arc::new(Mutex::new(Dummy))).unwrap();
    assert_eq!((a.addr, a.irq), (layout::VIRTIO_MMIO_START, 5));
    assert_eq!((b.addr, b.irq), (layout::VIRTIO_MMIO_START + 0x1000, 6));
    m.boot().unwrap();
    assert!(
        m.add_virtio_mmio(Arc::new(Mutex::new(Dummy))).is_err(),
        "only before boot"
    );

    assert_eq!(
        read_cstr(&m, layout::CMDLINE_START),
        "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
    );
    let zp = layout::ZERO_PAGE_START;
    let rsdp: u64 = m.memory().read_obj(GuestAddress(zp + 0x70)).unwrap();
    assert_eq!(rsdp, layout::ACPI_START);
    let e820_entries: u8 = m.memory().read_obj(GuestAddress(zp + 0x1e8)).unwrap();
    assert_eq!(e820_entries, 3);
    let cmd_ptr: u32 = m.memory().read_obj(GuestAddress(zp + 0x228)).unwrap();
    assert_eq!(u64::from(cmd_ptr), layout::CMDLINE_START);

    let mut acpi = vec![0u8; 0x1000];
    m.memory()
        .read_slice(&mut acpi, GuestAddress(layout::ACPI_START))
        .unwrap();
    assert!(acpi.starts_with(b"RSD PTR "));
    let text = String::from_utf8_lossy(&acpi);
    assert_eq!(text.matches("LNRO0005").count(), 2);

    let mut v = [0u8; 4];
    assert!(m.mmio_bus().read(b.addr + 0x10, &mut v));
    assert_eq!(v, [0x5a; 4]);
    assert_eq!(m.vcpus().len(), 2);
}

#[test]
fn a_machine_can_run_on_memory_shared_with_another() {
    use std::time::Duration;
    use vmm::memory::GuestRam;
    if !kvm_or_skip("a_machine_can_run_on_memory_shared_with_another") {
        return;
    }
    let ram = GuestRam::new(32 << 20).unwrap();
    let mut first =
        Machine::with_ram(MachineConfig::test_guest("hello"), None, Some(ram.clone())).unwrap();
    assert_eq!(first.config().mem_mib, 32);
    first.boot().unwrap();
    // The second machine maps the same memfd and sees what the first one loaded.
    let shared = GuestRam::from_memfd(ram.memfd().clone(), ram.size()).unwrap();
    let second = Machine::with_ram(MachineConfig::test_guest("hello"), None, Some(shared)).unwrap();
    let mut sig = [0u8; 8];
    second
        .memory()
        .read_slice(&mut sig, GuestAddress(layout::ACPI_START))
        .unwrap();
    assert_eq!(&sig, b"RSD PTR ");
    first.start().unwrap();
    assert_eq!(
        first.wait(Some(Duration::from_secs(30))).unwrap(),
        vmm::StopReason::PowerOff
    );
}
