//! KVM virtual machine: memory, vCPUs, boot, lifecycle.
