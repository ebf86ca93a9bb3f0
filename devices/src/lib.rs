//! Device models: legacy (serial, i8042, CMOS, ACPI power control), virtio-mmio, virtio-blk,
//! virtio-vsock.
//!
//! Every device plugs into a [`bus::Bus`] (one for port I/O, one for MMIO) that the vCPU exit loop
//! dispatches to.

pub mod bus;
pub mod legacy;
pub mod persist;
pub mod power;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use power::{PowerControl, PowerEvent};
