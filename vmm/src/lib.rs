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

/// Test hook, compiled only with the `test-hooks` feature (which only the microvmm package's
/// tests enable; release builds have no hook): when the environment variable
/// `MICROVMM_TEST_FORBIDDEN_SYSCALL` names `point` (`1` means `vcpu`), the calling thread makes a
/// system call its seccomp filter forbids: opening a file on vCPU 0 (`vcpu`), `syslog` on the
/// thread running `microvmm upgrade`'s orchestrator (`upgrade`, whose filter may open files).
/// Under the sandbox the process then ends with SIGSYS. Otherwise a no-op.
pub fn test_hook_forbidden_syscall(point: &str) {
    #[cfg(feature = "test-hooks")]
    {
        let want = std::env::var("MICROVMM_TEST_FORBIDDEN_SYSCALL").ok();
        match (want.as_deref(), point) {
            (Some("1" | "vcpu"), "vcpu") => vcpu::forbidden_syscall(),
            (Some("upgrade"), "upgrade") => {
                // SAFETY: SYSLOG_ACTION_SIZE_BUFFER (10) reads no buffer (null, length 0) and
                // changes nothing: it only returns the kernel log's size.
                unsafe { libc::syscall(libc::SYS_syslog, 10, std::ptr::null_mut::<u8>(), 0) };
            }
            _ => {}
        }
    }
    #[cfg(not(feature = "test-hooks"))]
    let _ = point;
}
