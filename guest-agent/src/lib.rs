//! The guest agent: runs inside the guest and moves the application with CRIU.
//!
//! - [`protocol`]: versioned, length-prefixed frames and the request/response messages.
//! - [`transport`]: TCP and AF_VSOCK behind one [`transport::Transport`] trait.
//! - [`agent`]: the in-guest server (exec, freeze/thaw, workload supervision, checkpoint, restore,
//!   release, rollback).
//! - [`host`]: the host-side client and the relay that moves the application between two agents.
//! - [`power`]: as init, powering the guest off when its ACPI power button is pressed.

pub mod agent;
pub mod criu;
mod exec;
pub mod host;
pub mod net;
pub mod power;
pub mod protocol;
mod stream;
pub mod sys;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod transport;
