//! Legacy PC devices a guest probes at boot: COM1 serial, i8042, CMOS/RTC, and the ACPI
//! power-control registers (sleep control / reset) the FADT points at.

mod acpi_pm;
mod cmos;
mod i8042;
mod serial;

pub use acpi_pm::{
    AcpiPowerDevice, RESET_OFFSET, RESET_VALUE, SLEEP_CONTROL_OFFSET, SLEEP_POWEROFF_VALUE,
};
pub use cmos::{Cmos, CmosState};
pub use i8042::{I8042, I8042State};
pub use serial::{
    IrqTrigger, SerialDevice, SerialDeviceState, SerialError, SerialOutput, SerialSinkStats,
    SharedBuffer,
};

/// COM1 base port.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1 register window length.
pub const COM1_LEN: u64 = 8;
/// COM1 interrupt line (GSI).
pub const COM1_IRQ: u32 = 4;
/// i8042 base port (data at +0, status/command at +4).
pub const I8042_PORT: u64 = 0x60;
/// i8042 window length (0x60..=0x64).
pub const I8042_LEN: u64 = 5;
/// CMOS/RTC index port (data at +1).
pub const CMOS_PORT: u64 = 0x70;
/// CMOS window length.
pub const CMOS_LEN: u64 = 2;
/// ACPI power-control register block (sleep control/status, reset).
pub const ACPI_PM_PORT: u64 = 0x600;
/// ACPI power-control window length.
pub const ACPI_PM_LEN: u64 = 8;

/// Answers a byte-wide register read: `value` in the first byte, zeros after it.
pub(crate) fn read_byte(data: &mut [u8], value: u8) {
    data.fill(0);
    if let Some(b) = data.first_mut() {
        *b = value;
    }
}
