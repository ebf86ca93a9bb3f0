//! i8042 keyboard controller: enough for a guest to probe it and to reset the machine through it
//! (command 0xFE, pulse the reset line), which ends the VM with [`PowerEvent::Reset`].

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::power::{PowerControl, PowerEvent};

const STATUS_OFFSET: u64 = 4;
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_IFACE_TEST: u8 = 0xab;
const CMD_RESET_CPU: u8 = 0xfe;
const SELF_TEST_OK: u8 = 0x55;
/// Status: output buffer full.
const SB_OUT_FULL: u8 = 0x01;
/// Status: system flag (POST passed).
const SB_SYSTEM: u8 = 0x04;
/// Status: last write was a command.
const SB_CMD: u8 = 0x08;
/// Status: keyboard not inhibited (the keylock switch is off).
const SB_UNLOCKED: u8 = 0x10;

/// Saved state of the i8042.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// Controller command byte.
    pub ctr: u8,
    /// Status bits (without output-full, which follows `out`).
    pub status: u8,
    /// Byte waiting in the output buffer.
    pub out: Option<u8>,
    /// The next data-port write is a command byte.
    pub expect_ctr: bool,
}

/// The i8042 controller on ports 0x60 and 0x64.
#[derive(Debug)]
pub struct I8042 {
    power: Arc<PowerControl>,
    ctr: u8,
    status: u8,
    out: Option<u8>,
    expect_ctr: bool,
}

impl I8042 {
    /// A controller that reports resets to `power`.
    pub fn new(power: Arc<PowerControl>) -> Self {
        Self {
            power,
            ctr: 0,
            status: SB_SYSTEM | SB_UNLOCKED,
            out: None,
            expect_ctr: false,
        }
    }

    fn status(&self) -> u8 {
        self.status | if self.out.is_some() { SB_OUT_FULL } else { 0 }
    }
}

impl crate::persist::Versioned for I8042State {
    const KIND: &'static str = "i8042";
    const VERSION: u32 = 1;
}

impl crate::persist::Persist for I8042 {
    type State = I8042State;
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<I8042State, Self::Error> {
        Ok(I8042State {
            ctr: self.ctr,
            status: self.status,
            out: self.out,
            expect_ctr: self.expect_ctr,
        })
    }

    fn restore(&mut self, state: &I8042State) -> Result<(), Self::Error> {
        self.ctr = state.ctr;
        self.status = state.status;
        self.out = state.out;
        self.expect_ctr = state.expect_ctr;
        Ok(())
    }
}

impl BusDevice for I8042 {
    fn name(&self) -> &str {
        "i8042"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.out.take().unwrap_or(0),
            STATUS_OFFSET => self.status(),
            _ => 0xff,
        };
        super::read_byte(data, v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            STATUS_OFFSET => {
                self.status |= SB_CMD;
                self.expect_ctr = false;
                match v {
                    CMD_READ_CTR => self.out = Some(self.ctr),
                    CMD_WRITE_CTR => self.expect_ctr = true,
                    CMD_SELF_TEST => self.out = Some(SELF_TEST_OK),
                    CMD_IFACE_TEST => self.out = Some(0),
                    CMD_RESET_CPU => self.power.request(PowerEvent::Reset),
                    _ => {}
                }
            }
            0 => {
                self.status &= !SB_CMD;
                if std::mem::take(&mut self.expect_ctr) {
                    self.ctr = v;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Persist;

    #[test]
    fn self_test_ctr_and_reset() {
        let power = Arc::new(PowerControl::new());
        let mut k = I8042::new(Arc::clone(&power));
        k.write(4, &[CMD_SELF_TEST]);
        let mut b = [0u8];
        k.read(4, &mut b);
        assert_ne!(b[0] & SB_OUT_FULL, 0);
        k.read(0, &mut b);
        assert_eq!(b[0], SELF_TEST_OK);
        k.write(4, &[CMD_WRITE_CTR]);
        k.write(0, &[0x47]);
        k.write(4, &[CMD_READ_CTR]);
        k.read(0, &mut b);
        assert_eq!(b[0], 0x47);
        assert_eq!(power.requested(), None);
        k.write(4, &[CMD_RESET_CPU]);
        assert_eq!(power.requested(), Some(PowerEvent::Reset));
    }

    #[test]
    fn keyboard_is_not_inhibited() {
        // Linux warns "i8042: Warning: Keylock active" when status bit 4 is clear.
        let mut k = I8042::new(Arc::new(PowerControl::new()));
        let mut b = [0u8];
        k.read(4, &mut b);
        assert_ne!(b[0] & SB_UNLOCKED, 0);
    }

    #[test]
    fn save_and_restore() {
        let power = Arc::new(PowerControl::new());
        let mut k = I8042::new(Arc::clone(&power));
        k.write(4, &[CMD_WRITE_CTR]);
        k.write(0, &[0x61]);
        k.write(4, &[CMD_READ_CTR]);
        let state = k.save().unwrap();
        let mut r = I8042::new(power);
        r.restore(&state).unwrap();
        assert_eq!(r.save().unwrap(), state);
        let mut b = [0u8];
        r.read(0, &mut b);
        assert_eq!(b[0], 0x61, "pending output byte survives");
    }
}
