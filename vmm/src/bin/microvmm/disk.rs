//! `microvmm disk ...`.

use std::process::ExitCode;

/// Subcommands of `microvmm disk`.
#[derive(Debug, clap::Subcommand)]
pub enum DiskCommand {}

/// Runs one `microvmm disk` subcommand.
pub fn main(cmd: DiskCommand) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match cmd {}
}
