//! `microvmm`: run a VM, and work with copy-on-write disks.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod api;
mod ctl;
mod disk;
mod handover;
mod run;
mod upgrade;

/// A KVM hypervisor with live guest-OS upgrade.
#[derive(Debug, Parser)]
#[command(name = "microvmm", version, about)]
struct Cli {
    /// Write the log (API requests, upgrade phases, state changes) to this file instead of
    /// stderr, at the level `RUST_LOG` gives (default `info`; on stderr the default is errors).
    #[arg(long, global = true, value_name = "FILE")]
    log: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a VM (with no kernel given, the embedded test guest).
    Run(Box<run::RunArgs>),
    /// Create, fork, inspect and merge copy-on-write disks.
    #[command(subcommand)]
    Disk(disk::DiskCommand),
    /// Upgrade a running guest's OS live (without arguments: the embedded demo).
    Upgrade(upgrade::UpgradeArgs),
    /// Control a running `microvmm run --api-socket`.
    Ctl(ctl::CtlArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    match &cli.log {
        Some(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(f))
                .init(),
            Err(e) => {
                eprintln!(
                    "microvmm: error: cannot open the log file {}: {e}",
                    path.display()
                );
                return ExitCode::from(1);
            }
        },
        // On stderr only what RUST_LOG asks for (errors by default).
        None => tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init(),
    }
    let result: Result<ExitCode, Box<dyn std::error::Error>> = match cli.command {
        Command::Run(args) => run::main(*args),
        Command::Disk(cmd) => disk::main(cmd),
        Command::Upgrade(args) => upgrade::main(args),
        Command::Ctl(args) => ctl::main(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("microvmm: error: {err}");
            let mut source = err.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::from(1)
        }
    }
}
