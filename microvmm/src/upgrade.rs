//! `microvmm upgrade`: the live guest-OS upgrade. Without arguments, the embedded demo (the
//! `service` test guest upgraded while a client keeps sending requests); with `--recover DIR`,
//! the recovery of an upgrade whose process ended.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use ::upgrade::{Event, UpgradeOptions};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

/// Options of `microvmm upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Print the report as JSON instead of the timeline table.
    #[arg(long)]
    json: bool,
    /// Keep the demo's files in this directory (default: a temporary directory, removed).
    #[arg(long, conflicts_with = "recover")]
    dir: Option<PathBuf>,
    /// Upgrade the demo VM with this plan (JSON, or TOML when the name ends in `.toml`; see
    /// `microvmm upgrade --print-plan`) instead of the built-in one. Its `work_dir`, if absent,
    /// is `<dir>/upgrade`.
    #[arg(long, conflicts_with = "recover")]
    plan: Option<PathBuf>,
    /// Print the demo's built-in plan as JSON (a starting point for --plan) and exit.
    #[arg(long, conflicts_with_all = ["recover", "plan"])]
    print_plan: bool,
    /// Boot this VM (a Firecracker-style JSON config: a Linux guest with `guest-agent` on
    /// vsock) instead of the demo VM, start the plan's `workload.spec` through its agent, and
    /// upgrade it with --plan (required), the workload moved with CRIU. Needs hardware KVM.
    #[arg(long, requires = "plan", conflicts_with_all = ["recover", "dir"])]
    config: Option<PathBuf>,
    /// With --config: how long the guest may take to boot until its agent answers, seconds.
    #[arg(long, default_value_t = 180, requires = "config")]
    boot_timeout: u64,
    /// Upgrade the VM of a running `microvmm run --api-socket PATH` with --plan (required):
    /// start it through the API, follow it, print its timeline. Ctrl-C asks whether to cancel.
    #[arg(long, requires = "plan", conflicts_with_all = ["recover", "dir", "config"])]
    api_socket: Option<PathBuf>,
    /// Recover the upgrade whose work directory is DIR after its process ended: print the disk
    /// chain the VM boots from, remove the other side's layers.
    #[arg(long, value_name = "DIR")]
    recover: Option<PathBuf>,
    /// Run the VMs' threads without the seccomp filters (for debugging: by default each vCPU
    /// and device worker of the demo or --config VM, and of its backup, runs under its kind's
    /// filter, as under `microvmm run`).
    #[arg(long, conflicts_with_all = ["recover", "api_socket", "print_plan"])]
    no_seccomp: bool,
}

/// Turns the sandbox on for the VMs this process runs (unless `--no-seccomp`).
fn sandbox_on(no_seccomp: bool) -> Result<(), sandbox::SandboxError> {
    crate::run::SandboxArgs {
        no_seccomp,
        user: None,
    }
    .init()
}

/// A progress bar on stderr when it is a terminal.
fn progress() -> Option<(ProgressBar, ::upgrade::EventFn)> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:<16} [{bar:30}] {bytes}/{total_bytes}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    let b = bar.clone();
    let f: ::upgrade::EventFn = Arc::new(move |e: &Event| match *e {
        Event::Phase(p) => {
            b.set_message(p.name());
            b.set_length(0);
            b.set_position(0);
        }
        Event::MergeProgress { done, total, .. } => {
            b.set_length(total);
            b.set_position(done);
        }
    });
    Some((bar, f))
}

/// Runs `microvmm upgrade`.
pub fn main(args: UpgradeArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if let Some(dir) = args.recover {
        return match ::upgrade::recover(&dir)? {
            None => {
                println!("{}: no unfinished upgrade", dir.display());
                Ok(ExitCode::SUCCESS)
            }
            Some(r) => {
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    println!(
                        "upgrade {} (last phase: {}); the VM's disks:",
                        if r.committed {
                            "committed"
                        } else {
                            "not committed: rolled back"
                        },
                        r.last_phase.map_or("none", ::upgrade::Phase::name)
                    );
                    for d in &r.disks {
                        println!("  {}", d.display());
                    }
                    for d in &r.removed {
                        println!("removed {}", d.display());
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
        };
    }
    if args.print_plan {
        let plan = ::upgrade::demo::plan(std::path::Path::new("upgrade"));
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(ExitCode::SUCCESS);
    }
    if let (Some(sock), Some(plan)) = (&args.api_socket, &args.plan) {
        return through_api(sock, plan, args.json);
    }
    sandbox_on(args.no_seccomp)?;
    if let (Some(config), Some(plan)) = (&args.config, &args.plan) {
        return linux(config, plan, args.boot_timeout, args.json);
    }
    // This thread runs the orchestrator from here on: the demo VM, its backup, the client. The
    // vCPU kick handler first (its `rt_sigaction` is not on the list).
    vmm::vcpu::install_kick_handler()?;
    sandbox::apply(sandbox::ThreadKind::Upgrade)?;
    vmm::test_hook_forbidden_syscall("upgrade");
    let file_plan = match &args.plan {
        Some(p) => Some(::upgrade::UpgradePlan::load(p)?),
        None => None,
    };
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("microvmm-demo").tempdir()?;
            tmp.path().to_owned()
        }
    };
    let bar = progress();
    let work = dir.join("upgrade");
    let outcome = ::upgrade::demo::run(&dir, |plan, opts: &mut UpgradeOptions| {
        if let Some(mut p) = file_plan {
            p.work_dir.get_or_insert(work);
            *plan = p;
        }
        opts.on_event = bar.as_ref().map(|(_, f)| f.clone());
    });
    if let Some((b, _)) = &bar {
        b.finish_and_clear();
    }
    let outcome = outcome?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        print!("{}", outcome.report.table());
        println!("{}", outcome.client.line());
        println!(
            "disk: OS version {}, {} log records, every acknowledged request once and in order",
            outcome.os_version, outcome.log_records
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `--config VM --plan PLAN`: a Linux guest upgraded with its workload moved by CRIU.
fn linux(
    config: &std::path::Path,
    plan_path: &std::path::Path,
    boot_timeout: u64,
    json: bool,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use guest_agent::host::AgentClient;
    use guest_agent::protocol::WorkloadSpec;
    use guest_agent::transport::Endpoint;

    let cfg = vmm::config::FileConfig::load(config)?;
    let plan = ::upgrade::UpgradePlan::load(plan_path)?;
    let vsock = cfg
        .vsock
        .clone()
        .ok_or("the VM config has no vsock device: the guest agent is reached over vsock")?;
    let spec: Option<WorkloadSpec> = match &plan.workload.spec {
        Some(v) => Some(
            serde_json::from_value(v.clone())
                .map_err(|e| format!("plan field `workload.spec`: {e}"))?,
        ),
        None => None,
    };
    if vmm::cpuid::HostKvm::detect() == vmm::cpuid::HostKvm::Emulating {
        eprintln!(
            "microvmm: warning: this host's KVM emulates guest kernel code (no VT-x/AMD-V): a Linux \
             guest boots far too slowly here"
        );
    }
    let mut machine = vmm::Machine::new(cfg, None)?;
    machine.boot()?;
    machine.start()?;
    // This thread runs the orchestrator from here on (the backup's restart included).
    sandbox::apply(sandbox::ThreadKind::Upgrade)?;
    vmm::test_hook_forbidden_syscall("upgrade");
    let ep = Endpoint::VsockUds {
        path: vsock.uds_path.clone(),
        port: plan.workload.agent_port,
    };
    let mut agent = AgentClient::connect_retry(&ep, std::time::Duration::from_secs(boot_timeout))?;
    if let Some(spec) = &spec {
        let pid = agent.start(spec)?;
        eprintln!("microvmm: workload started in the guest, pid {pid}");
    }
    drop(agent);
    let bar = progress();
    let mut opts = UpgradeOptions::new(Arc::new(::upgrade::criu_agent::CriuConnector::default()));
    opts.on_event = bar.as_ref().map(|(_, f)| f.clone());
    let report = ::upgrade::run(&mut machine, &plan, &opts);
    if let Some((b, _)) = &bar {
        b.finish_and_clear();
    }
    let report = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    // The upgraded VM serves on; this process is its VMM until the guest stops.
    let stop = machine.wait(None)?;
    eprintln!("microvmm: guest stopped: {stop:?}");
    Ok(ExitCode::SUCCESS)
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigint(_sig: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Makes Ctrl-C set [`INTERRUPTED`] instead of ending the process.
fn catch_sigint() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a handler that only stores to an atomic (async-signal
    // safe) and an emptied mask is a valid argument; the old action is not needed.
    let r = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigint as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGINT, &act, std::ptr::null_mut())
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `--api-socket S --plan P`: the upgrade runs in the `microvmm run` process that owns the VM.
fn through_api(
    sock: &std::path::Path,
    plan_path: &std::path::Path,
    json: bool,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use crate::ctl::request;
    // Checked here first, so that a bad plan names its field before anything is sent.
    let plan = ::upgrade::UpgradePlan::load(plan_path)?;
    let body = serde_json::to_value(&plan)?;
    // Before the upgrade starts: a Ctrl-C from then on asks, it never leaves the upgrade
    // running unwatched.
    catch_sigint()?;
    request(sock, "PUT", "/upgrade", Some(&body))?;
    let bar = progress();
    let mut asked = false;
    let status = loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (_, st) = request(sock, "GET", "/upgrade", None)?;
        if let Some((b, f)) = &bar {
            if let Ok(p) = serde_json::from_value::<::upgrade::Phase>(st["phase"].clone()) {
                f(&Event::Phase(p));
            }
            if let (Some(done), Some(total)) = (
                st["progress"]["done"].as_u64(),
                st["progress"]["total"].as_u64(),
            ) {
                b.set_length(total);
                b.set_position(done);
            }
        }
        if st["state"] != "running" {
            break st;
        }
        if INTERRUPTED.swap(false, std::sync::atomic::Ordering::SeqCst) && !asked {
            asked = true;
            eprint!("\ncancel the upgrade (rolls back unless past its commit point)? [y/N] ");
            let mut answer = String::new();
            std::io::stdin().read_line(&mut answer)?;
            if answer.trim().eq_ignore_ascii_case("y") {
                match request(sock, "DELETE", "/upgrade", None) {
                    Ok(_) => eprintln!("microvmm: cancelling"),
                    Err(e) => eprintln!("microvmm: {e}"),
                }
            }
        }
    };
    if let Some((b, _)) = &bar {
        b.finish_and_clear();
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    }
    match status["state"].as_str() {
        Some("succeeded") => {
            if !json {
                let report: ::upgrade::UpgradeReport =
                    serde_json::from_value(status["report"].clone())?;
                print!("{}", report.table());
            }
            Ok(ExitCode::SUCCESS)
        }
        other => Err(format!(
            "the upgrade {}: {}",
            other.unwrap_or("ended"),
            status["error"].as_str().unwrap_or("(no message)")
        )
        .into()),
    }
}
