//! `guest-agent serve --listen tcp:ADDR:PORT|vsock:PORT [--work-dir DIR]`
//! `guest-agent init -- CMD ARGS...`  (PID 1: runs CMD, restarts it if it exits, reaps orphans,
//! powers off on the ACPI power button)
//! `guest-agent exec --connect ENDPOINT -- CMD ARGS...`  (host side: run a command through an agent)

use std::process::{Command, ExitCode};
use std::thread;
use std::time::Duration;

use guest_agent::agent::{Agent, AgentConfig, error_chain};
use guest_agent::host::AgentClient;
use guest_agent::transport::{self, Endpoint};

fn usage() -> ExitCode {
    eprintln!("usage: guest-agent serve --listen tcp:HOST:PORT|vsock:PORT [--work-dir DIR]");
    eprintln!("       guest-agent init -- CMD [ARGS...]");
    eprintln!("       guest-agent exec --connect ENDPOINT -- CMD [ARGS...]");
    ExitCode::from(2)
}

fn serve(args: &[String]) -> ExitCode {
    let mut listen = None;
    let mut cfg = AgentConfig::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--listen", Some(v)) => listen = Some(v.clone()),
            ("--work-dir", Some(v)) => cfg.work_dir = v.into(),
            _ => return usage(),
        }
    }
    let Some(listen) = listen else { return usage() };
    let ep: Endpoint = match listen.parse() {
        Ok(ep) => ep,
        Err(e) => {
            eprintln!("guest-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let t = match transport::listen(&ep) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("guest-agent: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    eprintln!("guest-agent: listening on {}", t.endpoint());
    let agent = Agent::new(cfg);
    match agent.serve(t.as_ref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reaps every child that has exited; returns whether `pid` was among them.
fn reap_all(pid: u32) -> bool {
    let mut hit = false;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer to a local int.
        let r = unsafe { libc::waitpid(-1, &raw mut status, libc::WNOHANG) };
        if r <= 0 {
            return hit;
        }
        hit |= r.unsigned_abs() == pid; // r > 0 here
    }
}

fn init(cmd: &[String]) -> ExitCode {
    let Some(prog) = cmd.first() else {
        return usage();
    };
    // microvmm's `Shutdown` presses the ACPI power button: power off when it is.
    let buttons = guest_agent::power::watch(guest_agent::power::power_off);
    eprintln!("guest-agent init: watching {buttons} power button(s)");
    loop {
        let child = match Command::new(prog).args(&cmd[1..]).spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("guest-agent init: cannot start {prog}: {e}");
                thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let pid = child.id();
        // Reap orphans (e.g. restored application trees whose criu parent exited) until the child exits.
        while !reap_all(pid) {
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("guest-agent init: {prog} exited; restarting");
        thread::sleep(Duration::from_secs(1));
    }
}

fn exec(ep: &str, cmd: &[String]) -> ExitCode {
    let run = || -> Result<_, Box<dyn std::error::Error>> {
        let ep: Endpoint = ep.parse()?;
        let mut c = AgentClient::connect(&ep, Duration::from_secs(5))?;
        let argv: Vec<&str> = cmd.iter().map(String::as_str).collect();
        Ok(c.exec(&argv, None)?)
    };
    match run() {
        Ok(out) => {
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            // The code comes from the agent: anything outside 0..=255 reports 255.
            ExitCode::from(out.code.and_then(|c| u8::try_from(c).ok()).unwrap_or(255))
        }
        Err(e) => {
            eprintln!("guest-agent: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("init") if args.get(1).map(String::as_str) == Some("--") => init(&args[2..]),
        Some("exec") if args.len() > 4 && args[1] == "--connect" && args[3] == "--" => {
            exec(&args[2], &args[4..])
        }
        _ => usage(),
    }
}
