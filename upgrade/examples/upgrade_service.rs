//! Upgrade a running VM through the library: boot the `service` test guest, keep a client
//! busy, run the seven steps with [`upgrade::run`], print the report.
//! `cargo run --release -p upgrade --example upgrade_service`

use std::sync::Arc;
use std::time::Duration;

use upgrade::UpgradeOptions;
use upgrade::demo::{self, Client};
use upgrade::service_agent::ServiceConnector;
use upgrade::service_guest::DEFAULT_SERVICE_PORT;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    // An active VM: the service guest on a fresh disk, and a client.
    let mut vm = demo::boot(dir.path())?;
    let client = Client::start(&vm.uds, DEFAULT_SERVICE_PORT)?;
    client.wait_for(20, Duration::from_secs(10));
    // The plan: run `upgrade` in the backup; the OS region is the upgrade's, the log the
    // active VM's; move the service's vsock connections (see `demo::plan`).
    let plan = demo::plan(&dir.path().join("upgrade"));
    let opts = UpgradeOptions::new(Arc::new(ServiceConnector));
    let report = upgrade::run(&mut vm.machine, &plan, &opts)?;
    // `vm.machine` is the upgraded VM now.
    let (stats, _) = client.finish();
    print!("{}", report.table());
    println!("{}", stats.line());
    vm.machine.stop()?;
    Ok(())
}
