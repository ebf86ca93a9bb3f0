//! The fixed hardware registers of a hardware-reduced ACPI platform that the FADT points at:
//! sleep control (S5 = power off), sleep status, and the reset register.
//!
//! Test guests power off with the same write Linux uses: `out 0x600, 0x34`.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::power::{PowerControl, PowerEvent};

/// Offset of the sleep control register in the block.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register.
pub const RESET_OFFSET: u64 = 4;
/// Value the reset register takes to reset.
pub const RESET_VALUE: u8 = 1;
/// The S5 sleep type the DSDT's `_S5_` object announces.
pub const S5_SLEEP_TYPE: u8 = 5;
/// `SLP_TYPx = 5 | SLP_EN`: the sleep-control write that powers off.
pub const SLEEP_POWEROFF_VALUE: u8 = (S5_SLEEP_TYPE << 2) | (1 << 5);

/// ACPI sleep control/status and reset registers.
#[derive(Debug)]
pub struct AcpiPowerDevice {
    power: Arc<PowerControl>,
}

impl AcpiPowerDevice {
    /// A device that reports to `power`.
    pub fn new(power: Arc<PowerControl>) -> Self {
        Self { power }
    }
}

impl BusDevice for AcpiPowerDevice {
    fn name(&self) -> &str {
        "acpi-pm"
    }

    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status reads back "not waking"; the other registers read as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            SLEEP_CONTROL_OFFSET => {
                let sleep_enable = v & (1 << 5) != 0;
                let sleep_type = (v >> 2) & 0x7;
                if sleep_enable && sleep_type == S5_SLEEP_TYPE {
                    self.power.request(PowerEvent::PowerOff);
                } else if sleep_enable {
                    tracing::warn!(sleep_type, "unsupported ACPI sleep state ignored");
                }
            }
            RESET_OFFSET if v == RESET_VALUE => self.power.request(PowerEvent::Reset),
            SLEEP_STATUS_OFFSET | RESET_OFFSET => {}
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_other_states_do_not() {
        let power = Arc::new(PowerControl::new());
        let mut d = AcpiPowerDevice::new(Arc::clone(&power));
        d.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | (1 << 5)]);
        d.write(SLEEP_CONTROL_OFFSET, &[S5_SLEEP_TYPE << 2]);
        assert_eq!(power.requested(), None);
        d.write(SLEEP_CONTROL_OFFSET, &[SLEEP_POWEROFF_VALUE]);
        assert_eq!(power.requested(), Some(PowerEvent::PowerOff));
        assert_eq!(SLEEP_POWEROFF_VALUE, 0x34);
    }

    #[test]
    fn reset_register() {
        let power = Arc::new(PowerControl::new());
        let mut d = AcpiPowerDevice::new(Arc::clone(&power));
        d.write(RESET_OFFSET, &[0]);
        assert_eq!(power.requested(), None);
        d.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(power.requested(), Some(PowerEvent::Reset));
    }
}
