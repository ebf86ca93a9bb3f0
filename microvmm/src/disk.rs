//! `microvmm disk ...`: create, fork, inspect and merge copy-on-write disks (shaped like
//! `qemu-img`).

use std::io::{self, IsTerminal, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use block::merge::{self, MergeError, MergeOptions, MergeReport, OwnershipMap, Policy, ProgressFn};
use block::nbd::{Listener, NbdLimits, NbdServer};
use block::{Base, BlockError, Delta, Layer};

/// Exit code when a merge stops on unresolved conflicts.
const EXIT_CONFLICTS: u8 = 2;
/// Exit code when the reader of standard output went away (`... | head`): the status a shell
/// shows for a process killed by SIGPIPE, which is how other Unix tools end there.
const EXIT_BROKEN_PIPE: u8 = 128 + 13;

/// Errors of `microvmm disk` itself (a layer's own errors come from `block`).
#[derive(Debug, thiserror::Error)]
pub enum DiskCliError {
    /// Writing to standard output failed (a full disk, a closed pipe).
    #[error("cannot write to standard output")]
    Stdout(#[source] io::Error),
    /// A `--export` layer cannot be opened.
    #[error("cannot serve export {name}={path}", path = .path.display())]
    Export {
        /// Export name.
        name: String,
        /// The layer.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<BlockError>,
    },
    /// A file named by an option cannot be read.
    #[error("cannot read {option} {path}", path = .path.display())]
    Read {
        /// The option.
        option: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The listening socket cannot be set up.
    #[error("cannot listen on {place}")]
    Listen {
        /// `unix:PATH` or `tcp:ADDR`.
        place: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// `writeln!` to the command's output; a failure is [`DiskCliError::Stdout`].
macro_rules! out {
    ($w:expr, $($arg:tt)*) => {
        writeln!($w, $($arg)*).map_err(DiskCliError::Stdout)
    };
}

/// A line on stderr; a failure to write it is not an error of the command.
macro_rules! note {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Subcommands of `microvmm disk`.
#[derive(Debug, clap::Subcommand)]
pub enum DiskCommand {
    /// Create a raw base image (`-f raw FILE SIZE`) or a delta over a parent (`-f delta -b PARENT DIR`).
    Create(CreateArgs),
    /// Freeze a layer and create two children on it (O(1)).
    Fork {
        /// Base image or delta directory to freeze.
        parent: PathBuf,
        /// First child delta (e.g. the active VM's).
        child_a: PathBuf,
        /// Second child delta (e.g. the upgrade's).
        child_b: PathBuf,
    },
    /// Show a layer: identity, sequence numbers, extents, parent chain.
    Inspect(InspectArgs),
    /// Merge two deltas three ways over their common parent.
    Merge(MergeArgs),
    /// Apply the active delta's writes since a merge point to a merge output.
    CatchUp(CatchUpArgs),
    /// Serve layers over NBD (a delta read-write, any layer read-only) until SIGTERM/SIGINT.
    Serve(ServeArgs),
}

/// Layer formats of `disk create`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// A raw image used as a read-only base.
    Raw,
    /// A copy-on-write delta directory.
    Delta,
}

/// Arguments of `disk create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Format to create.
    #[arg(short = 'f', long, value_enum, default_value = "raw")]
    format: Format,
    /// Parent (backing) layer of a delta.
    #[arg(short = 'b', long)]
    backing: Option<PathBuf>,
    /// Give an existing raw image an identity instead of creating one.
    #[arg(long)]
    adopt: bool,
    /// Path to create.
    file: PathBuf,
    /// Size of a new raw image (e.g. 2G, 512M).
    size: Option<String>,
}

/// Arguments of `disk inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Base image or delta directory.
    file: PathBuf,
    /// List the extents changed after this sequence number.
    #[arg(long)]
    since: Option<u64>,
}

/// Conflict policies on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PolicyArg {
    /// Fail on any conflict and write nothing.
    Fail,
    /// Take the active VM's content.
    PreferActive,
    /// Take the upgrade's content.
    PreferUpgrade,
}

/// Policy options shared by `merge` and `catch-up`.
#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    /// Conflict policy.
    #[arg(long, value_enum, default_value = "fail")]
    policy: PolicyArg,
    /// Ownership map: lines `active|upgrade OFFSET LENGTH`; a non-owner write is a conflict.
    #[arg(long, value_name = "FILE", conflicts_with = "policy")]
    ownership: Option<PathBuf>,
    /// With --ownership: resolve each non-owner conflict to the owner's side (still reported)
    /// instead of failing; conflicts in unowned ranges still fail.
    #[arg(long, requires = "ownership")]
    owner_wins: bool,
    /// Plan and report only; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Progress on stderr: always, never, or (default) when stderr is a terminal or the
    /// merge writes more than 64 MiB.
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    progress: String,
}

/// Arguments of `disk merge`.
#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// The active VM's delta ("A").
    active: PathBuf,
    /// The upgrade's delta ("B").
    upgrade: PathBuf,
    /// Output: a new delta directory (or, with --flatten, a raw image).
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Write a raw image (parent + merged changes) instead of a delta.
    #[arg(long)]
    flatten: bool,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// Arguments of `disk catch-up`.
#[derive(Debug, clap::Args)]
pub struct CatchUpArgs {
    /// The merge output delta to update.
    output: PathBuf,
    /// The active VM's delta.
    active: PathBuf,
    /// The upgrade's delta.
    upgrade: PathBuf,
    /// The merge point: the active delta's sequence number the previous pass read.
    #[arg(long)]
    since: u64,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// Arguments of `disk serve`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("listen").required(true).args(["socket", "port"])))]
pub struct ServeArgs {
    /// Listen on this Unix socket path (created; removed on exit).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Listen on this TCP port of 127.0.0.1.
    #[arg(long, value_name = "N")]
    port: Option<u16>,
    /// Serve at most this many clients at once (more are refused).
    #[arg(long, value_name = "N", default_value_t = block::nbd::DEFAULT_MAX_CONNECTIONS as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// An export: `NAME=LAYER` (a delta is served read-write, a base read-only) or
    /// `NAME=LAYER,ro`. Repeatable; the first one is also the default export.
    #[arg(long = "export", value_name = "NAME=LAYER[,ro]", required = true)]
    exports: Vec<String>,
    #[command(flatten)]
    sandbox: crate::run::SandboxArgs,
}

/// Runs one `microvmm disk` subcommand. Its output goes to stdout: an error writing it is
/// an error of the command (exit status 1), except that a reader gone away (`| head`) ends it
/// quietly with status 141, as SIGPIPE ends other Unix tools.
pub fn main(cmd: DiskCommand) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let result = run(cmd, &mut out).and_then(|code| {
        out.flush().map_err(DiskCliError::Stdout)?;
        Ok(code)
    });
    match result {
        Err(e)
            if matches!(
                e.downcast_ref::<DiskCliError>(),
                Some(DiskCliError::Stdout(io)) if io.kind() == io::ErrorKind::BrokenPipe
            ) =>
        {
            Ok(ExitCode::from(EXIT_BROKEN_PIPE))
        }
        r => r,
    }
}

fn run(cmd: DiskCommand, out: &mut dyn Write) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match cmd {
        DiskCommand::Create(a) => create(a, out),
        DiskCommand::Fork {
            parent,
            child_a,
            child_b,
        } => {
            let p = Arc::new(Layer::open_writable(&parent)?);
            let (a, b) = block::fork(p, &child_a, &child_b)?;
            out!(
                out,
                "forked {}: {} and {}",
                parent.display(),
                a.path().display(),
                b.path().display()
            )?;
            Ok(ExitCode::SUCCESS)
        }
        DiskCommand::Inspect(a) => inspect(&a, out),
        DiskCommand::Merge(a) => run_merge(&a, out),
        DiskCommand::CatchUp(a) => run_catch_up(&a, out),
        DiskCommand::Serve(a) => serve(&a),
    }
}

fn create(a: CreateArgs, out: &mut dyn Write) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match a.format {
        Format::Raw => {
            let base = if a.adopt {
                Base::adopt(&a.file)?
            } else {
                let size = a.size.as_deref().ok_or("a raw image needs a SIZE")?;
                let size = merge::parse_size(size).ok_or_else(|| format!("bad size {size:?}"))?;
                Base::create(&a.file, size)?
            };
            out!(
                out,
                "created raw {} size {} uuid {}",
                a.file.display(),
                base.size(),
                base.identity().uuid
            )?;
        }
        Format::Delta => {
            let parent = a.backing.ok_or("a delta needs a parent: -b PARENT")?;
            let d = Delta::create(&a.file, Arc::new(Layer::open(&parent)?))?;
            out!(
                out,
                "created delta {} over {} uuid {}",
                a.file.display(),
                parent.display(),
                d.meta().uuid
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {} ({n} B)", UNITS[u])
    }
}

fn inspect(a: &InspectArgs, out: &mut dyn Write) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let layer = Layer::open(&a.file)?;
    print_layer(out, &layer, 0)?;
    if let (Some(since), Layer::Delta(d)) = (a.since, &layer) {
        out!(out, "changed since seq {since}:")?;
        for e in d.changed_since(since) {
            out!(
                out,
                "  offset {:>14} len {:>12} {:?} seq {}",
                e.offset,
                e.len,
                e.kind,
                e.seq
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_layer(out: &mut dyn Write, layer: &Layer, depth: usize) -> Result<(), DiskCliError> {
    let pad = "  ".repeat(depth);
    match layer {
        Layer::Base(b) => {
            out!(out, "{pad}image: {}", b.path().display())?;
            out!(out, "{pad}format: raw (read-only base)")?;
            out!(out, "{pad}virtual size: {}", human(b.size()))?;
            out!(out, "{pad}uuid: {}", b.identity().uuid)?;
            out!(out, "{pad}fingerprint: {:#010x}", b.identity().check)?;
        }
        Layer::Delta(d) => {
            let (seq, index) = d.snapshot();
            let data: u64 = index
                .iter()
                .filter(|e| e.kind == block::ExtentKind::Data)
                .map(|e| e.len)
                .sum();
            out!(out, "{pad}image: {}", d.path().display())?;
            out!(out, "{pad}format: delta")?;
            out!(out, "{pad}virtual size: {}", human(d.size()))?;
            out!(out, "{pad}uuid: {}", d.meta().uuid)?;
            match d.frozen_seq() {
                Some(s) => out!(out, "{pad}state: frozen at seq {s}")?,
                None => out!(out, "{pad}state: writable")?,
            }
            out!(out, "{pad}last seq: {seq}")?;
            out!(out, "{pad}journal: {} bytes", d.journal_len())?;
            if d.recovered_discarded_bytes() > 0 {
                out!(
                    out,
                    "{pad}uncommitted journal tail ignored: {} bytes",
                    d.recovered_discarded_bytes()
                )?;
            }
            out!(
                out,
                "{pad}extents: {} (data {}, zero {})",
                index.len(),
                human(data),
                human(index.bytes() - data)
            )?;
            if let Some(m) = &d.meta().merged_from {
                out!(out, "{pad}merge output: digest {m}")?;
            }
            out!(out, "{pad}backing file:")?;
            print_layer(out, d.parent(), depth + 1)?;
        }
    }
    Ok(())
}

fn policy_of(p: &PolicyArgs) -> Result<Policy, Box<dyn std::error::Error>> {
    if let Some(f) = &p.ownership {
        let text = std::fs::read_to_string(f).map_err(|source| DiskCliError::Read {
            option: "--ownership",
            path: f.clone(),
            source,
        })?;
        let map = OwnershipMap::parse(&text)?;
        return Ok(if p.owner_wins {
            Policy::OwnerWins(map)
        } else {
            Policy::Ownership(map)
        });
    }
    Ok(match p.policy {
        PolicyArg::Fail => Policy::Fail,
        PolicyArg::PreferActive => Policy::PreferActive,
        PolicyArg::PreferUpgrade => Policy::PreferUpgrade,
    })
}

/// The merge's progress bar on stderr (indicatif): on a terminal, or for outputs over 64 MiB
/// (`auto`), or always; `never` draws nothing.
fn progress_fn(when: &str) -> Result<Option<ProgressFn>, Box<dyn std::error::Error>> {
    let tty = std::io::stderr().is_terminal();
    let force = match when {
        "always" => true,
        "never" => return Ok(None),
        "auto" => false,
        other => {
            return Err(format!("--progress must be always, never or auto, not {other:?}").into());
        }
    };
    let target = if tty {
        indicatif::ProgressDrawTarget::stderr()
    } else {
        // indicatif hides bars on a non-terminal; a plain line writer keeps them when asked.
        indicatif::ProgressDrawTarget::term_like(Box::new(StderrLines))
    };
    let bar = indicatif::ProgressBar::with_draw_target(None, target);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "    ({percent:>3}/100%) [{bar:25}] {bytes} / {total_bytes} ({bytes_per_sec})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("#>-"),
    );
    Ok(Some(ProgressFn(Arc::new(move |done, total| {
        if total == 0 || !(force || tty || total > 64 << 20) {
            return;
        }
        bar.set_length(total);
        bar.set_position(done);
        if done >= total && !bar.is_finished() {
            bar.finish();
        }
    }))))
}

/// Draws a progress bar as plain lines on stderr (for a stderr that is not a terminal).
#[derive(Debug)]
struct StderrLines;

impl indicatif::TermLike for StderrLines {
    fn width(&self) -> u16 {
        100
    }
    fn move_cursor_up(&self, _n: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _n: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _n: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _n: usize) -> io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> io::Result<()> {
        writeln!(io::stderr(), "{s}")
    }
    fn write_str(&self, s: &str) -> io::Result<()> {
        write!(io::stderr(), "{s}")
    }
    fn clear_line(&self) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        io::stderr().flush()
    }
}

fn print_report(out: &mut dyn Write, r: &MergeReport, json: bool) -> Result<(), DiskCliError> {
    if json {
        out!(
            out,
            "{}",
            serde_json::to_string_pretty(r).unwrap_or_default()
        )?;
        return Ok(());
    }
    out!(
        out,
        "active seq {} upgrade seq {}",
        r.active_seq,
        r.upgrade_seq
    )?;
    out!(
        out,
        "only active {} | only upgrade {} | identical {} | conflicting {}",
        r.only_active,
        r.only_upgrade,
        r.identical,
        r.conflicting
    )?;
    for c in &r.conflicts {
        out!(
            out,
            "conflict offset {} len {} {:?}: active {:?} crc32c {:08x}, upgrade {:?} crc32c {:08x} -> {:?}",
            c.offset,
            c.len,
            c.reason,
            c.active.state,
            c.active.crc32c,
            c.upgrade.state,
            c.upgrade.crc32c,
            c.resolution
        )?;
    }
    out!(
        out,
        "plan: {} steps, {} to write",
        r.plan.len(),
        human(r.bytes_to_write)
    )?;
    if let Some((phase, step)) = r.resumed_from {
        out!(
            out,
            "resumed an interrupted merge at phase {phase} step {step}"
        )?;
    }
    match &r.output {
        Some(o) => out!(out, "output: {} (digest {})", o.display(), r.digest),
        None => out!(out, "dry run: nothing written"),
    }
}

fn finish(
    out: &mut dyn Write,
    result: Result<MergeReport, MergeError>,
    json: bool,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match result {
        Ok(r) => {
            print_report(out, &r, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(MergeError::Conflicts(r)) => {
            print_report(out, &r, json)?;
            note!(
                "microvmm: {} unresolved conflict(s); nothing written",
                r.unresolved()
            );
            Ok(ExitCode::from(EXIT_CONFLICTS))
        }
        Err(e) => Err(e.into()),
    }
}

fn open_input(p: &Path) -> Result<Delta, Box<dyn std::error::Error>> {
    Ok(Delta::open_read_only(p)?)
}

fn run_merge(a: &MergeArgs, out: &mut dyn Write) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let active = open_input(&a.active)?;
    let upgrade = open_input(&a.upgrade)?;
    let opts = MergeOptions {
        policy: policy_of(&a.policy)?,
        dry_run: a.policy.dry_run,
        flatten: a.flatten,
        progress: progress_fn(&a.policy.progress)?,
        ..MergeOptions::default()
    };
    finish(
        out,
        merge::merge(&active, &upgrade, &a.output, &opts),
        a.policy.json,
    )
}

fn run_catch_up(
    a: &CatchUpArgs,
    w: &mut dyn Write,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let out = Delta::open(&a.output)?;
    let active = open_input(&a.active)?;
    let upgrade = open_input(&a.upgrade)?;
    let opts = MergeOptions {
        policy: policy_of(&a.policy)?,
        dry_run: a.policy.dry_run,
        progress: progress_fn(&a.policy.progress)?,
        ..MergeOptions::default()
    };
    finish(
        w,
        merge::catch_up(&out, &active, a.since, &upgrade, &opts),
        a.policy.json,
    )
}

/// Set by the SIGTERM/SIGINT handler of `disk serve`.
static STOP_SERVING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_sig: libc::c_int) {
    STOP_SERVING.store(true, Ordering::SeqCst);
}

/// Installs [`on_stop_signal`] for SIGTERM and SIGINT.
fn install_stop_handler() -> std::io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler only
        // stores to an atomic (async-signal-safe); the pointers passed are valid for the call.
        let rc = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_stop_signal as *const () as libc::sighandler_t;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Parses `NAME=LAYER[,ro]`.
fn parse_export(spec: &str) -> Result<(String, PathBuf, bool), String> {
    let (name, rest) = spec
        .split_once('=')
        .ok_or_else(|| format!("export {spec:?} is not NAME=LAYER[,ro]"))?;
    let (path, ro) = match rest.strip_suffix(",ro") {
        Some(p) => (p, true),
        None => (rest, false),
    };
    if name.is_empty() || path.is_empty() {
        return Err(format!("export {spec:?} is not NAME=LAYER[,ro]"));
    }
    Ok((name.to_owned(), PathBuf::from(path), ro))
}

/// `disk serve`: NBD until SIGTERM/SIGINT; then in-flight requests finish and every writable
/// export is flushed, so every acknowledged write is durable when the process exits.
fn serve(a: &ServeArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    a.sandbox.init()?;
    let mut exports: Vec<(String, Arc<dyn block::Disk>)> = Vec::new();
    for spec in &a.exports {
        let (name, path, ro) = parse_export(spec)?;
        if exports.iter().any(|(n, _)| *n == name) {
            return Err(format!("export name {name:?} given twice").into());
        }
        let layer = if ro {
            Layer::open(&path)
        } else {
            Layer::open_writable(&path)
        }
        .map_err(|source| DiskCliError::Export {
            name: name.clone(),
            path: path.clone(),
            source: Box::new(source),
        })?;
        exports.push((name, Arc::new(layer)));
    }
    let summary: Vec<String> = exports
        .iter()
        .map(|(n, d)| format!("{n}{}", if d.is_read_only() { " (ro)" } else { "" }))
        .collect();
    let limits = NbdLimits {
        max_connections: usize::try_from(a.max_connections).unwrap_or(usize::MAX),
        ..NbdLimits::default()
    };
    let server = Arc::new(NbdServer::with_limits(exports, limits)?);
    install_stop_handler()?;
    let listen_err = |place: String| move |source| DiskCliError::Listen { place, source };
    let (listener, place) = match (&a.socket, a.port) {
        (Some(p), _) => {
            let place = format!("unix:{}", p.display());
            let l = UnixListener::bind(p).map_err(listen_err(place.clone()))?;
            (Listener::Unix(l), place)
        }
        (None, Some(port)) => {
            let l = TcpListener::bind(("127.0.0.1", port))
                .map_err(listen_err(format!("tcp:127.0.0.1:{port}")))?;
            let place = format!("tcp:{}", l.local_addr()?);
            (Listener::Tcp(l), place)
        }
        (None, None) => return Err("give --socket or --port".into()),
    };
    // The exports and the listening socket are open.
    a.sandbox.drop_privileges()?;
    note!("serving {} on {place}", summary.join(", "));
    let flag = server.shutdown_flag();
    let watcher = sandbox::spawn(
        sandbox::ThreadKind::NbdServer,
        std::thread::Builder::new().name("nbd-stop".into()),
        move || {
            while !STOP_SERVING.load(Ordering::SeqCst) && !flag.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            flag.store(true, Ordering::SeqCst);
        },
    )?;
    // This thread becomes the accept loop.
    sandbox::apply(sandbox::ThreadKind::NbdServer)?;
    let result = server.serve(listener);
    server.shutdown_flag().store(true, Ordering::SeqCst);
    let _ = watcher.join();
    if let Some(p) = &a.socket {
        let _ = std::fs::remove_file(p);
    }
    result?;
    note!("stopped; every export flushed");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod serve_tests {
    use super::*;

    fn qemu_io(uri: &str, cmds: &[&str]) -> Option<String> {
        let mut c = std::process::Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let out = c.arg(uri).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "qemu-io failed: {text}");
        Some(text)
    }

    #[test]
    fn export_specs_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_export("os=/x/d,ro"),
            Ok(("os".into(), PathBuf::from("/x/d"), true))
        );
        assert_eq!(
            parse_export("d=/x/d"),
            Ok(("d".into(), PathBuf::from("/x/d"), false))
        );
        for bad in ["", "noequals", "=/x", "n=", "n=,ro"] {
            assert!(parse_export(bad).is_err(), "{bad:?}");
        }
    }

    /// qemu-io writes through `disk serve` into a delta; SIGTERM stops the server, and the
    /// reopened delta holds every write (the flush-on-shutdown path included: the last write
    /// is not flushed by the client).
    #[test]
    fn serve_writes_a_delta_and_stops_on_sigterm() {
        if std::process::Command::new("qemu-io")
            .arg("--version")
            .output()
            .is_err()
        {
            println!("SKIP: qemu-io (qemu-utils) not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = Base::create(&dir.path().join("base"), 8 << 20).unwrap();
        drop(Delta::create(&dir.path().join("d"), Arc::new(Layer::Base(base))).unwrap());
        let sock = dir.path().join("nbd.sock");
        let args = ServeArgs {
            socket: Some(sock.clone()),
            port: None,
            max_connections: 4,
            exports: vec![
                format!("disk={}", dir.path().join("d").display()),
                format!("base={},ro", dir.path().join("base").display()),
            ],
            // In-process: the test harness's threads are not the VMM's to filter.
            sandbox: crate::run::SandboxArgs {
                no_seccomp: true,
                ..Default::default()
            },
        };
        let server = std::thread::spawn(move || serve(&args).map_err(|e| e.to_string()));
        let start = std::time::Instant::now();
        while !sock.exists() {
            assert!(start.elapsed().as_secs() < 20, "server did not listen");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let uri = format!("nbd+unix:///disk?socket={}", sock.display());
        qemu_io(
            &uri,
            &["write -P 0x5a 64k 128k", "flush", "write -P 0x33 1M 4k"],
        )
        .unwrap();
        let text = qemu_io(&uri, &["read -P 0x5a 64k 128k", "read -P 0x33 1M 4k"]).unwrap();
        assert!(!text.contains("verification failed"), "{text}");
        // The handler is installed before the socket is bound, so this only sets the flag.
        // SAFETY: raising a signal whose handler is installed has no memory-safety effect.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        assert_eq!(server.join().unwrap(), Ok(ExitCode::SUCCESS));
        assert!(!sock.exists(), "socket left behind");
        let d = Delta::open(&dir.path().join("d")).unwrap();
        let mut b = vec![0u8; 4096];
        d.read_at(&mut b, 1 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0x33));
        let mut ext: Vec<(u64, u64)> = d
            .changed_since(0)
            .iter()
            .map(|e| (e.offset, e.len))
            .collect();
        ext.sort_unstable();
        assert_eq!(ext, vec![(64 << 10, 128 << 10), (1 << 20, 4 << 10)]);
    }
}
