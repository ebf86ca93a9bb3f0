//! The `insn_probe` guest's host side: which CPL0 instructions this host's KVM runs.

use std::time::Duration;

use vmm::config::MachineConfig;
use vmm::{Machine, MachineError};
use vmm_test_guests::{REPORT_PORT, REPORT_PORT_LEN, ReportDevice};

/// How one instruction of the `insn_probe` guest fared at CPL0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// KVM executed it.
    Ran,
    /// KVM could not emulate it (`KVM_EXIT_INTERNAL_ERROR`, emulation failure); the bytes KVM
    /// reported.
    EmulationFailure(Vec<u8>),
    /// It faulted architecturally and, with no IDT, the guest triple-faulted.
    Fault,
    /// Something else ended the VM.
    Other(String),
}

/// Runs every probe of the [`INSN_PROBE`] guest, one VM per failure, and returns each probe's
/// name and outcome.
pub fn run_insn_probes() -> Result<Vec<(String, ProbeOutcome)>, MachineError> {
    use vm_memory::{Bytes, GuestAddress};
    use vmm::config::ConsoleTarget;
    use vmm::vcpu::VcpuError;
    use vmm_test_guests::{GuestKitError, INSN_PROBE};

    let mut results: Vec<(String, ProbeOutcome)> = Vec::new();
    let mut start = 0u64;
    loop {
        let mut cfg = MachineConfig::test_guest(INSN_PROBE.name);
        cfg.mem_mib = 16;
        cfg.console = ConsoleTarget::Null;
        let mut m = Machine::new(cfg, None)?;
        let (dev, reports) = ReportDevice::new();
        m.pio_bus().insert(REPORT_PORT, REPORT_PORT_LEN, dev)?;
        m.boot()?;
        let mem = m.memory().clone();
        let read = |addr: u64| -> Result<u64, MachineError> {
            mem.read_obj(GuestAddress(addr))
                .map_err(|e| GuestKitError::Memory(addr, e).into())
        };
        let count = read(INSN_PROBE.symbol("probe_count")?)?;
        let table = INSN_PROBE.symbol("probe_table")?;
        let start_at = INSN_PROBE.symbol("shared_probe_start")?;
        mem.write_obj(start, GuestAddress(start_at))
            .map_err(|e| GuestKitError::Memory(start_at, e))?;
        m.start()?;
        let end = m.wait(Some(Duration::from_secs(30)));
        let ran: Vec<u64> = reports.try_iter().collect();
        let name = |i: u64| -> Result<String, MachineError> {
            let mut p = read(table + 16 * i + 8)?;
            let mut s = Vec::new();
            loop {
                let b: u8 = mem
                    .read_obj(GuestAddress(p))
                    .map_err(|e| GuestKitError::Memory(p, e))?;
                if b == 0 || s.len() > 64 {
                    break;
                }
                s.push(b);
                p += 1;
            }
            Ok(String::from_utf8_lossy(&s).into_owned())
        };
        let last = ran.last().copied();
        for &i in &ran {
            if Some(i) != last || end.is_ok() {
                results.push((name(i)?, ProbeOutcome::Ran));
            }
        }
        match (end, last) {
            (Ok(_), _) => return Ok(results),
            (Err(e), Some(i)) => {
                let outcome = match e {
                    MachineError::Vcpu(VcpuError::EmulationFailure { insn, .. }) => {
                        ProbeOutcome::EmulationFailure(insn)
                    }
                    MachineError::Vcpu(VcpuError::TripleFault { .. }) => ProbeOutcome::Fault,
                    other => ProbeOutcome::Other(other.to_string()),
                };
                results.push((name(i)?, outcome));
                start = i + 1;
                if start >= count {
                    return Ok(results);
                }
            }
            (Err(e), None) => return Err(e),
        }
    }
}
