//! `microvmm run`.

use std::process::ExitCode;

/// Arguments of `microvmm run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {}

/// Runs `microvmm run`.
pub fn main(_args: RunArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    Err("`microvmm run` is not implemented yet".into())
}
