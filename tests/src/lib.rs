//! Shared helpers for the cross-crate integration tests in `tests/tests/`: KVM availability
//! checks that print a `SKIP:` line, and booting test guests with their serial output captured.

pub mod linux_guest;
pub mod nested;
pub mod probes;

use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use devices::legacy::{SerialOutput, SharedBuffer};
use vmm::config::MachineConfig;
use vmm::cpuid::HostKvm;
use vmm::{Machine, MachineError};
use vmm_test_guests::{REPORT_PORT, REPORT_PORT_LEN, ReportDevice};

/// Test guest `guest` with one writable virtio-blk disk: a fresh delta (`dir/delta`) over an
/// empty raw base of `size` bytes (`dir/base.img`).
pub fn guest_with_fresh_delta(guest: &str, dir: &std::path::Path, size: u64) -> MachineConfig {
    let base = block::Base::create(&dir.join("base.img"), size).expect("create base");
    let parent = std::sync::Arc::new(block::Layer::Base(base));
    drop(block::Delta::create(&dir.join("delta"), parent).expect("create delta"));
    let mut cfg = MachineConfig::test_guest(guest);
    cfg.disks = vec![vmm::config::DiskConfig {
        path: dir.join("delta"),
        read_only: false,
    }];
    cfg
}

/// Whether /dev/kvm is usable (else prints `SKIP: <test>: <reason>`). First turns the sandbox
/// on for this test process (once), as `microvmm run` does: the VMM threads these tests start
/// (vCPUs, device workers) run under their seccomp filters, so the suite checks them too.
pub fn kvm_or_skip(test: &str) -> bool {
    static SANDBOX: std::sync::Once = std::sync::Once::new();
    SANDBOX.call_once(|| {
        // Called from a test thread, which has no filter, before any VMM thread exists.
        sandbox::init(sandbox::Config {
            mode: sandbox::Mode::Enforce,
            drop_to: None,
        })
        .expect("cannot turn the sandbox on");
    });
    vmm_test_guests::kvm_or_skip(test)
}

/// Whether the host has hardware virtualization; prints `SKIP: <test>: <reason>` when not.
pub fn hardware_kvm_or_skip(test: &str) -> bool {
    if !kvm_or_skip(test) {
        return false;
    }
    match HostKvm::detect() {
        HostKvm::Hardware => true,
        HostKvm::Emulating => {
            println!(
                "SKIP: {test}: the host has no VT-x/AMD-V (no vmx/svm in /proc/cpuinfo); its KVM \
                 emulates guest kernel code ~4000x slower, too slow to boot Linux"
            );
            false
        }
    }
}

/// A booted test VM whose serial output is captured.
#[derive(Debug)]
pub struct TestVm {
    /// The machine.
    pub machine: Machine,
    /// Everything the guest wrote to COM1.
    pub serial: SharedBuffer,
    /// Values the guest sent to the report port.
    pub reports: Receiver<u64>,
}

impl TestVm {
    /// Builds and boots `cfg` with the serial captured and the report device attached; does not
    /// start the vCPUs.
    pub fn boot(cfg: MachineConfig) -> Result<Self, MachineError> {
        let serial = SharedBuffer::default();
        let mut machine = Machine::new(cfg, Some(SerialOutput::Buffer(serial.clone())))?;
        let (dev, reports) = ReportDevice::new();
        machine
            .pio_bus()
            .insert(REPORT_PORT, REPORT_PORT_LEN, dev)?;
        machine.boot()?;
        Ok(Self {
            machine,
            serial,
            reports,
        })
    }

    /// Boots and starts test guest `name` with `vcpus` vCPUs and 64 MiB.
    pub fn start_guest(name: &str, vcpus: u8) -> Result<Self, MachineError> {
        let mut cfg = MachineConfig::test_guest(name);
        cfg.vcpus = vcpus;
        let mut vm = Self::boot(cfg)?;
        vm.machine.start()?;
        Ok(vm)
    }

    /// The serial output so far, as text.
    pub fn serial_text(&self) -> String {
        String::from_utf8_lossy(&self.serial.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Waits until the serial output contains `needle`; false on timeout.
    pub fn wait_serial(&self, needle: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.serial_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.serial_text().contains(needle)
    }
}

/// Sends the libraries' logs (`tracing`) to stderr, at `RUST_LOG`'s level (default `warn`): a
/// vCPU that stops on its own, a device that gives up, say so in a test's output. Once per
/// process; later calls do nothing.
pub fn log_to_stderr() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        // Fails only if another subscriber is already installed, which then logs instead.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    });
}

/// The entries of `after` that `before` did not have, counted as a multiset (an fd list before
/// and after some work: what it left open).
pub fn added(before: &[String], after: &[String]) -> Vec<String> {
    let mut left = before.to_vec();
    after
        .iter()
        .filter(|f| match left.iter().position(|b| b == *f) {
            Some(i) => {
                left.swap_remove(i);
                false
            }
            None => true,
        })
        .cloned()
        .collect()
}
