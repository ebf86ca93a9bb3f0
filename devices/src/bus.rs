//! Address buses for port I/O and MMIO: a sorted map from address ranges to devices.
//!
//! The vCPU exit loop looks up the device covering an access and calls it with the offset of the
//! access inside the device's range. Devices are shared (`Arc<Mutex<_>>`) so the same device can
//! also be reached from other threads (e.g. a virtio device's worker, a snapshot).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through a [`Bus`].
pub trait BusDevice: Send {
    /// Short name for logs and errors.
    fn name(&self) -> &str;
    /// Guest read of `data.len()` bytes at `offset` from the device's base. Fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors of bus registration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range base {base:#x} len {len:#x}")]
    InvalidRange {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps device `{other}` at {other_base:#x}")]
    Overlap {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
        /// Name of the device already there.
        other: String,
        /// Its base address.
        other_base: u64,
    },
    /// No device starts at this base address.
    #[error("no device at bus address {0:#x}")]
    NotFound(u64),
}

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A bus: non-overlapping `[base, base+len)` ranges, each owned by one device.
#[derive(Default)]
pub struct Bus {
    entries: RwLock<BTreeMap<u64, Entry>>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut list = f.debug_list();
        for (base, e) in entries.iter() {
            list.entry(&format_args!("{:#x}+{:#x}", base, e.len));
        }
        list.finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base+len)`.
    pub fn insert(&self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let end = base + (len - 1);
        // The first device starting at or below `end` is the only candidate for an overlap with
        // a device starting below us; devices starting inside our range overlap too.
        if let Some((&ob, oe)) = entries.range(..=end).next_back()
            && ob + (oe.len - 1) >= base
        {
            let other = oe
                .device
                .lock()
                .map(|d| d.name().to_string())
                .unwrap_or_default();
            return Err(BusError::Overlap {
                base,
                len,
                other,
                other_base: ob,
            });
        }
        entries.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes and returns the device whose range starts at `base`.
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    /// The device covering `addr` and the offset of `addr` inside it.
    pub fn resolve(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let (&base, e) = entries.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < e.len).then(|| (Arc::clone(&e.device), offset))
    }

    /// Dispatches a read; returns false (and leaves `data` alone) if no device covers `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device covers `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }

    /// `(base, len, name)` of every device, in address order.
    pub fn ranges(&self) -> Vec<(u64, u64, String)> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .map(|(&b, e)| {
                let name = e
                    .device
                    .lock()
                    .map(|d| d.name().to_string())
                    .unwrap_or_default();
                (b, e.len, name)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    // test code: values are small and fixed
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

    use super::*;

    struct Mem {
        bytes: Vec<u8>,
    }

    impl BusDevice for Mem {
        fn name(&self) -> &str {
            "mem"
        }
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.bytes[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.bytes[o..o + data.len()].copy_from_slice(data);
        }
    }

    fn mem(len: usize) -> SharedDevice {
        Arc::new(Mutex::new(Mem {
            bytes: vec![0; len],
        }))
    }

    #[test]
    fn dispatches_with_offset() {
        let bus = Bus::new();
        bus.insert(0x100, 0x10, mem(0x10)).unwrap();
        assert!(bus.write(0x104, &[1, 2]));
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [1, 2]);
        assert!(!bus.read(0x110, &mut b));
        assert!(!bus.read(0xff, &mut b));
    }

    #[test]
    fn rejects_overlap_and_bad_ranges() {
        let bus = Bus::new();
        bus.insert(0x100, 0x10, mem(0x10)).unwrap();
        for (base, len) in [(0xf8, 0x9), (0x10f, 1), (0x100, 1), (0x0, 0x1000)] {
            assert!(
                matches!(bus.insert(base, len, mem(1)), Err(BusError::Overlap { .. })),
                "{base:#x}+{len:#x}"
            );
        }
        bus.insert(0xf0, 0x10, mem(0x10)).unwrap();
        bus.insert(0x110, 1, mem(1)).unwrap();
        assert_eq!(
            bus.insert(5, 0, mem(1)).unwrap_err(),
            BusError::InvalidRange { base: 5, len: 0 }
        );
        assert!(matches!(
            bus.insert(u64::MAX, 2, mem(1)),
            Err(BusError::InvalidRange { .. })
        ));
        assert_eq!(bus.ranges().len(), 3);
        bus.remove(0x100).unwrap();
        assert!(matches!(bus.remove(0x100), Err(BusError::NotFound(0x100))));
    }
}
