//! `microvmm disk ...`: create, fork, inspect and merge copy-on-write disks (shaped like
//! `qemu-img`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use block::merge::{self, MergeError, MergeOptions, MergeReport, OwnershipMap, Policy, ProgressFn};
use block::{Base, Delta, Layer};

/// Exit code when a merge stops on unresolved conflicts.
const EXIT_CONFLICTS: u8 = 2;

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

/// Runs one `microvmm disk` subcommand.
pub fn main(cmd: DiskCommand) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match cmd {
        DiskCommand::Create(a) => create(a),
        DiskCommand::Fork {
            parent,
            child_a,
            child_b,
        } => {
            let p = Arc::new(Layer::open_writable(&parent)?);
            let (a, b) = block::fork(p, &child_a, &child_b)?;
            println!(
                "forked {}: {} and {}",
                parent.display(),
                a.path().display(),
                b.path().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        DiskCommand::Inspect(a) => inspect(&a),
        DiskCommand::Merge(a) => run_merge(&a),
        DiskCommand::CatchUp(a) => run_catch_up(&a),
    }
}

fn create(a: CreateArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match a.format {
        Format::Raw => {
            let base = if a.adopt {
                Base::adopt(&a.file)?
            } else {
                let size = a.size.as_deref().ok_or("a raw image needs a SIZE")?;
                let size = merge::parse_size(size).ok_or_else(|| format!("bad size {size:?}"))?;
                Base::create(&a.file, size)?
            };
            println!(
                "created raw {} size {} uuid {}",
                a.file.display(),
                base.size(),
                base.identity().uuid
            );
        }
        Format::Delta => {
            let parent = a.backing.ok_or("a delta needs a parent: -b PARENT")?;
            let d = Delta::create(&a.file, Arc::new(Layer::open(&parent)?))?;
            println!(
                "created delta {} over {} uuid {}",
                a.file.display(),
                parent.display(),
                d.meta().uuid
            );
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

fn inspect(a: &InspectArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let layer = Layer::open(&a.file)?;
    print_layer(&layer, 0);
    if let (Some(since), Layer::Delta(d)) = (a.since, &layer) {
        println!("changed since seq {since}:");
        for e in d.changed_since(since) {
            println!(
                "  offset {:>14} len {:>12} {:?} seq {}",
                e.offset, e.len, e.kind, e.seq
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_layer(layer: &Layer, depth: usize) {
    let pad = "  ".repeat(depth);
    match layer {
        Layer::Base(b) => {
            println!("{pad}image: {}", b.path().display());
            println!("{pad}format: raw (read-only base)");
            println!("{pad}virtual size: {}", human(b.size()));
            println!("{pad}uuid: {}", b.identity().uuid);
            println!("{pad}fingerprint: {:#010x}", b.identity().check);
        }
        Layer::Delta(d) => {
            let (seq, index) = d.snapshot();
            let data: u64 = index
                .iter()
                .filter(|e| e.kind == block::ExtentKind::Data)
                .map(|e| e.len)
                .sum();
            println!("{pad}image: {}", d.path().display());
            println!("{pad}format: delta");
            println!("{pad}virtual size: {}", human(d.size()));
            println!("{pad}uuid: {}", d.meta().uuid);
            match d.frozen_seq() {
                Some(s) => println!("{pad}state: frozen at seq {s}"),
                None => println!("{pad}state: writable"),
            }
            println!("{pad}last seq: {seq}");
            println!("{pad}journal: {} bytes", d.journal_len());
            if d.recovered_discarded_bytes() > 0 {
                println!(
                    "{pad}uncommitted journal tail ignored: {} bytes",
                    d.recovered_discarded_bytes()
                );
            }
            println!(
                "{pad}extents: {} (data {}, zero {})",
                index.len(),
                human(data),
                human(index.bytes() - data)
            );
            if let Some(m) = &d.meta().merged_from {
                println!("{pad}merge output: digest {m}");
            }
            println!("{pad}backing file:");
            print_layer(d.parent(), depth + 1);
        }
    }
}

fn policy_of(p: &PolicyArgs) -> Result<Policy, Box<dyn std::error::Error>> {
    if let Some(f) = &p.ownership {
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        return Ok(Policy::Ownership(OwnershipMap::parse(&text)?));
    }
    Ok(match p.policy {
        PolicyArg::Fail => Policy::Fail,
        PolicyArg::PreferActive => Policy::PreferActive,
        PolicyArg::PreferUpgrade => Policy::PreferUpgrade,
    })
}

/// A progress line on stderr, redrawn at most once per percent.
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
    let last = Arc::new(AtomicU64::new(u64::MAX));
    Ok(Some(ProgressFn(Arc::new(move |done, total| {
        if total == 0 || !(force || tty || total > 64 << 20) {
            return;
        }
        let pct = done * 100 / total;
        if last.swap(pct, Ordering::Relaxed) == pct {
            return;
        }
        let bar = "#".repeat((pct / 4) as usize);
        let mut e = std::io::stderr();
        let _ = write!(
            e,
            "\r    ({pct:>3}/100%) [{bar:<25}] {} / {} MiB",
            done >> 20,
            total >> 20
        );
        if done >= total {
            let _ = writeln!(e);
        }
        let _ = e.flush();
    }))))
}

fn print_report(r: &MergeReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
        return;
    }
    println!("active seq {} upgrade seq {}", r.active_seq, r.upgrade_seq);
    println!(
        "only active {} | only upgrade {} | identical {} | conflicting {}",
        r.only_active, r.only_upgrade, r.identical, r.conflicting
    );
    for c in &r.conflicts {
        println!(
            "conflict offset {} len {} {:?}: active {:?} crc32c {:08x}, upgrade {:?} crc32c {:08x} -> {:?}",
            c.offset,
            c.len,
            c.reason,
            c.active.state,
            c.active.crc32c,
            c.upgrade.state,
            c.upgrade.crc32c,
            c.resolution
        );
    }
    println!(
        "plan: {} steps, {} to write",
        r.plan.len(),
        human(r.bytes_to_write)
    );
    if let Some((phase, step)) = r.resumed_from {
        println!("resumed an interrupted merge at phase {phase} step {step}");
    }
    match &r.output {
        Some(o) => println!("output: {} (digest {})", o.display(), r.digest),
        None => println!("dry run: nothing written"),
    }
}

fn finish(
    result: Result<MergeReport, MergeError>,
    json: bool,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match result {
        Ok(r) => {
            print_report(&r, json);
            Ok(ExitCode::SUCCESS)
        }
        Err(MergeError::Conflicts(r)) => {
            print_report(&r, json);
            eprintln!(
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

fn run_merge(a: &MergeArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
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
        merge::merge(&active, &upgrade, &a.output, &opts),
        a.policy.json,
    )
}

fn run_catch_up(a: &CatchUpArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
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
        merge::catch_up(&out, &active, a.since, &upgrade, &opts),
        a.policy.json,
    )
}
