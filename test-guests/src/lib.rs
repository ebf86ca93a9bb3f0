//! The test-guest kit: tiny guests assembled from `test-guests/guests/*.S` and `*.c` by this
//! crate's `build.rs` (the only place `gcc` runs), and host-side helpers to drive them. The VMM
//! boots them by name when built with its `test-guests` feature
//! (`vmm::config::KernelSource::TestGuest`); the `microvmm` binary embeds them for its demo and for
//! `run` without a kernel.
//!
//! Each guest is an ELF image loaded at 1 MiB like a kernel. Unless it brings its own `_start`,
//! it is linked with `guests/stub.S`, a short CPL0 stub that sets up its own GDT, one TSS per
//! vCPU, identity paging of the first 1 GiB (user-accessible), an empty IDT, and `iretq`s to
//! `guest_main(cpu, ncpus)` at CPL3 with IOPL=3. On a software-emulating host KVM the CPL3 work
//! runs natively; port I/O and MMIO still exit to the VMM. Helpers from `guests/lib.S`:
//! `serial_putc`, `serial_puts`, `serial_put_dec`, `report` (u64 to [`REPORT_PORT`]),
//! `poweroff` (ACPI S5 write, as Linux does). To add a guest, drop a `guests/<name>.S` defining
//! `guest_main`; put host-visible variables in section `.shared` as globals.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::BusDevice;
use vm_memory::{Bytes, GuestAddress};

/// Guest memory as the VMM maps it (dirty-page tracking on).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// A test guest image.
#[derive(Debug, Clone, Copy)]
pub struct TestGuest {
    /// Name (file stem in `test-guests/guests/`).
    pub name: &'static str,
    /// ELF image.
    pub elf: &'static [u8],
    /// Its global symbols and their guest-physical addresses.
    pub symbols: &'static [(&'static str, u64)],
}

include!(concat!(env!("OUT_DIR"), "/guests_gen.rs"));

/// The guest `microvmm run` boots when no kernel is given.
pub const DEFAULT: TestGuest = HELLO;

/// Port of the test report device: a 32-bit write at +0 (low half) then +4 (high half) reports
/// one u64.
pub const REPORT_PORT: u64 = 0x510;
/// Length of the report device's port window.
pub const REPORT_PORT_LEN: u64 = 8;
/// Most vCPUs the CPL0 stub supports.
pub const MAX_CPUS: u8 = 8;

/// Errors of the kit's host-side helpers.
#[derive(Debug, thiserror::Error)]
pub enum GuestKitError {
    /// No guest by that name.
    #[error("no test guest named `{0}`")]
    UnknownGuest(String),
    /// The guest image lacks a symbol the helper needs.
    #[error("test guest `{guest}` has no symbol `{symbol}`")]
    MissingSymbol {
        /// Guest name.
        guest: &'static str,
        /// Symbol.
        symbol: &'static str,
    },
    /// Guest memory access failed.
    #[error("cannot access guest memory at {0:#x}")]
    Memory(u64, #[source] vm_memory::GuestMemoryError),
    /// The guest did not report in time.
    #[error("no report from the guest within {0:?}")]
    Timeout(Duration),
    /// The report device is gone.
    #[error("the report device was dropped")]
    Disconnected,
}

/// Whether /dev/kvm can be used; prints `SKIP: <test>: <reason>` when it cannot (for tests that
/// boot guests).
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            println!("SKIP: {test}: /dev/kvm is not usable ({e})");
            false
        }
    }
}

impl TestGuest {
    /// Address of global `name`.
    pub fn symbol(&self, name: &'static str) -> Result<u64, GuestKitError> {
        self.symbols
            .iter()
            .find(|(s, _)| *s == name)
            .map(|(_, a)| *a)
            .ok_or(GuestKitError::MissingSymbol {
                guest: self.name,
                symbol: name,
            })
    }

    /// The guest called `name`.
    pub fn by_name(name: &str) -> Result<TestGuest, GuestKitError> {
        ALL.iter()
            .find(|g| g.name == name)
            .copied()
            .ok_or_else(|| GuestKitError::UnknownGuest(name.to_string()))
    }
}

/// The report device: collects the u64 values guests send to [`REPORT_PORT`].
#[derive(Debug)]
pub struct ReportDevice {
    low: u32,
    tx: Sender<u64>,
}

impl ReportDevice {
    /// The device (to put on the PIO bus at [`REPORT_PORT`]) and the receiving end.
    pub fn new() -> (Arc<Mutex<ReportDevice>>, Receiver<u64>) {
        let (tx, rx) = channel();
        (Arc::new(Mutex::new(ReportDevice { low: 0, tx })), rx)
    }
}

impl BusDevice for ReportDevice {
    fn name(&self) -> &str {
        "test-report"
    }

    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            0 => self.low = v,
            4 => {
                let _ = self.tx.send(u64::from(v) << 32 | u64::from(self.low));
            }
            _ => {}
        }
    }
}

/// Host side of the `counter` guest.
#[derive(Debug)]
pub struct CounterProbe {
    memory: GuestMemoryMmap,
    counter: u64,
    request: u64,
    stop: u64,
    reports: Receiver<u64>,
}

impl CounterProbe {
    /// A probe on `memory` of a VM running [`COUNTER`], reading reports from `reports` (the
    /// receiver of the VM's [`ReportDevice`]).
    pub fn new(memory: GuestMemoryMmap, reports: Receiver<u64>) -> Result<Self, GuestKitError> {
        Ok(Self {
            memory,
            counter: COUNTER.symbol("shared_counter")?,
            request: COUNTER.symbol("shared_request")?,
            stop: COUNTER.symbol("shared_stop")?,
            reports,
        })
    }

    fn read(&self, addr: u64) -> Result<u64, GuestKitError> {
        self.memory
            .read_obj(GuestAddress(addr))
            .map_err(|e| GuestKitError::Memory(addr, e))
    }

    fn write(&self, addr: u64, v: u64) -> Result<(), GuestKitError> {
        self.memory
            .write_obj(v, GuestAddress(addr))
            .map_err(|e| GuestKitError::Memory(addr, e))
    }

    /// The counter, read directly from guest memory.
    pub fn peek(&self) -> Result<u64, GuestKitError> {
        self.read(self.counter)
    }

    /// Asks the guest for its counter and waits for the report on the port.
    pub fn request(&self, timeout: Duration) -> Result<u64, GuestKitError> {
        let seq = self.read(self.request)?;
        self.write(self.request, seq.wrapping_add(1))?;
        self.reports.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => GuestKitError::Timeout(timeout),
            RecvTimeoutError::Disconnected => GuestKitError::Disconnected,
        })
    }

    /// Drains and counts reports that arrived without a request (a correct guest sends none).
    pub fn unrequested_reports(&self) -> usize {
        self.reports.try_iter().count()
    }

    /// Makes the guest report once more and then power off; returns the last report.
    pub fn stop(&self, timeout: Duration) -> Result<u64, GuestKitError> {
        self.write(self.stop, 1)?;
        self.request(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kit_has_the_guests_and_symbols() {
        for name in [
            "hello",
            "counter",
            "smp",
            "triple_fault",
            "emulation_failure",
        ] {
            let g = TestGuest::by_name(name).unwrap();
            assert_eq!(&g.elf[..4], b"\x7fELF", "{name}");
        }
        assert!(COUNTER.symbol("shared_counter").unwrap() >= 0x10_0000);
        assert!(COUNTER.symbol("nope").is_err());
        assert!(TestGuest::by_name("nope").is_err());
        assert_eq!(DEFAULT.name, "hello");
    }

    #[test]
    fn report_device_joins_halves() {
        let (dev, rx) = ReportDevice::new();
        let mut d = dev.lock().unwrap();
        d.write(0, &0x89ab_cdefu32.to_le_bytes());
        d.write(4, &0x0123_4567u32.to_le_bytes());
        assert_eq!(rx.try_recv().unwrap(), 0x0123_4567_89ab_cdef);
    }
}
