//! CMOS RAM with a read-only real-time clock (the host's UTC time, BCD, 24-hour), on ports
//! 0x70 (index) and 0x71 (data). Linux reads the time from it at boot (rtc_cmos sets the system
//! clock from it). The clock is BCD because x86 Linux always decodes it as BCD
//! (`RTC_ALWAYS_BCD`), whatever register B says: binary values gave the guest a wrong date.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

const RTC_SECONDS: u8 = 0x00;
const RTC_MINUTES: u8 = 0x02;
const RTC_HOURS: u8 = 0x04;
const RTC_WEEKDAY: u8 = 0x06;
const RTC_DAY: u8 = 0x07;
const RTC_MONTH: u8 = 0x08;
const RTC_YEAR: u8 = 0x09;
const RTC_REG_A: u8 = 0x0a;
const RTC_REG_B: u8 = 0x0b;
const RTC_REG_C: u8 = 0x0c;
const RTC_REG_D: u8 = 0x0d;
const RTC_CENTURY: u8 = 0x32;
/// Register B: 24-hour mode, BCD values (DM bit 0x04 clear).
const REG_B_24H_BCD: u8 = 0x02;
/// Register D: valid RAM and time.
const REG_D_VRT: u8 = 0x80;

/// Saved state of the CMOS (the clock is the host's and is not saved).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CmosState {
    /// Selected register.
    pub index: u8,
    /// The 128 bytes of CMOS RAM.
    pub ram: Vec<u8>,
}

impl crate::persist::Versioned for CmosState {
    const KIND: &'static str = "cmos";
    const VERSION: u32 = 1;
}

/// The CMOS/RTC device.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    now: fn() -> u64,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

fn host_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    // The algorithm gives a day in 1..=31 and a month in 1..=12.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `v` (0..=99) in binary-coded decimal.
fn bcd(v: u64) -> u8 {
    let v = (v % 100) as u8;
    ((v / 10) << 4) | (v % 10)
}

impl Cmos {
    /// A CMOS reading the host clock.
    pub fn new() -> Self {
        Self::with_clock(host_now)
    }

    /// A CMOS reading time from `now` (seconds since the Unix epoch).
    pub fn with_clock(now: fn() -> u64) -> Self {
        Self {
            index: 0,
            ram: [0; 128],
            now,
        }
    }

    fn read_register(&self, index: u8) -> u8 {
        let secs = (self.now)();
        let days = (secs / 86_400) as i64;
        let tod = secs % 86_400;
        let (year, month, day) = civil_from_days(days);
        match index {
            RTC_SECONDS => bcd(tod % 60),
            RTC_MINUTES => bcd((tod / 60) % 60),
            RTC_HOURS => bcd(tod / 3600),
            RTC_WEEKDAY => bcd((days + 4).rem_euclid(7) as u64 + 1),
            RTC_DAY => bcd(u64::from(day)),
            RTC_MONTH => bcd(u64::from(month)),
            RTC_YEAR => bcd(year.rem_euclid(100) as u64),
            RTC_CENTURY => bcd(year.div_euclid(100).rem_euclid(100) as u64),
            RTC_REG_A => 0x26, // 32.768 kHz base, 1024 Hz rate; update not in progress
            RTC_REG_B => REG_B_24H_BCD,
            RTC_REG_C => 0,
            RTC_REG_D => REG_D_VRT,
            i => self.ram[usize::from(i & 0x7f)],
        }
    }
}

impl crate::persist::Persist for Cmos {
    type State = CmosState;
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<CmosState, Self::Error> {
        Ok(CmosState {
            index: self.index,
            ram: self.ram.to_vec(),
        })
    }

    /// RAM beyond 128 bytes is ignored, missing bytes are zero; the clock stays the host's.
    fn restore(&mut self, state: &CmosState) -> Result<(), Self::Error> {
        self.index = state.index & 0x7f;
        self.ram = [0; 128];
        for (d, s) in self.ram.iter_mut().zip(&state.ram) {
            *d = *s;
        }
        Ok(())
    }
}

impl BusDevice for Cmos {
    fn name(&self) -> &str {
        "cmos"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.index,
            1 => self.read_register(self.index),
            _ => 0xff,
        };
        super::read_byte(data, v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask on real hardware.
            0 => self.index = v & 0x7f,
            1 if self.index > RTC_REG_D && self.index != RTC_CENTURY => {
                self.ram[usize::from(self.index)] = v;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Persist;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn clock_fields() {
        // 2024-02-29 13:45:56 UTC was a Thursday.
        let mut c = Cmos::with_clock(|| 1_709_214_356);
        // BCD: x86 Linux decodes the clock as BCD whatever register B says.
        assert_eq!(read(&mut c, RTC_SECONDS), 0x56);
        assert_eq!(read(&mut c, RTC_MINUTES), 0x45);
        assert_eq!(read(&mut c, RTC_HOURS), 0x13);
        assert_eq!(read(&mut c, RTC_DAY), 0x29);
        assert_eq!(read(&mut c, RTC_MONTH), 0x02);
        assert_eq!(read(&mut c, RTC_YEAR), 0x24);
        assert_eq!(read(&mut c, RTC_CENTURY), 0x20);
        assert_eq!(read(&mut c, RTC_WEEKDAY), 0x05);
        assert_eq!(read(&mut c, RTC_REG_B) & 0x04, 0, "BCD mode");
        assert_ne!(read(&mut c, RTC_REG_B) & 0x02, 0, "24-hour mode");
    }

    #[test]
    fn nvram_is_writable_clock_is_not() {
        let mut c = Cmos::with_clock(|| 0);
        c.write(0, &[0x40]);
        c.write(1, &[0xab]);
        assert_eq!(read(&mut c, 0x40), 0xab);
        c.write(0, &[RTC_SECONDS]);
        c.write(1, &[0x33]);
        assert_eq!(read(&mut c, RTC_SECONDS), 0);
        c.write(0, &[0x40]);
        let mut r = Cmos::with_clock(|| 0);
        r.restore(&c.save().unwrap()).unwrap();
        let mut b = [0u8];
        r.read(1, &mut b);
        assert_eq!(b[0], 0xab, "NVRAM and index survive save/restore");
    }
}
