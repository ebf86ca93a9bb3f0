//! KVM virtual machine: memory, vCPUs, boot, lifecycle.
//!
//! [`machine::Machine`] puts the parts together: guest RAM in a memfd ([`memory`]), the KVM VM
//! with its in-kernel irqchip and PIT ([`vm`]), vCPU threads and their exit loop ([`vcpu`]),
//! CPUID ([`cpuid`]), boot state ([`regs`], [`boot`], [`acpi`]) and the legacy devices from the
//! `devices` crate. [`snapshot`] saves and restores the whole VM state ([`snapfile`] is its file
//! container); `Machine::clone_running` clones a running VM in-process. With the `test-guests` feature it
//! boots the guests of the `vmm-test-guests` kit by name.

pub mod acpi;
pub mod boot;
pub mod config;
pub mod cpuid;
pub mod handover;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod regs;
pub mod snapfile;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use machine::{Machine, MachineError, StopReason};
