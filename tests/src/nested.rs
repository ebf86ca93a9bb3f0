//! Running commands and test binaries on hardware-style KVM one level down, through
//! `scripts/nested.sh`: a QEMU TCG VM with `-cpu max` (AMD-V exposed) whose kernel loads `kvm-amd`
//! (see docs/ARCHITECTURE.md, "Nested hardware-KVM harness").
//!
//! [`run`] runs a shell command there and returns its output, or [`Nested::Skipped`] (after printing
//! `SKIP: <reason>`) when the harness cannot run on this machine. [`run_tests`] runs tests of a test
//! binary one after another in a single level-1 boot and says of each whether it really ran: a test
//! that printed `SKIP:` or did not report `test result: ok. 1 passed` is not a pass.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Exit status of `scripts/nested.sh` when it cannot run here (no QEMU, no cached images).
const EXIT_SKIP: i32 = 77;
/// Exit status of `scripts/nested.sh` when the command or level 1 timed out.
const EXIT_TIMEOUT: i32 = 124;
/// Exit status of `scripts/nested.sh` on a harness error.
const EXIT_HARNESS: i32 = 125;
/// Exit status of `scripts/nested.sh` when level 1 ended without the command's status.
const EXIT_L1_DIED: i32 = 123;
/// Line that separates the inner tests' outputs in [`run_tests`].
const TEST_MARK: &str = "=== nested test:";

/// Errors of the nested harness (a skip is not an error: see [`Nested::Skipped`]).
#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    /// `scripts/nested.sh` could not be started.
    #[error("cannot run {script}")]
    Spawn {
        /// The script.
        script: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file to copy into level 1 does not exist.
    #[error("file for level 1 not found: {0}")]
    MissingFile(PathBuf),
    /// The harness cannot run here, and `MICROVMM_NESTED=require` says it must (CI).
    #[error("the nested harness cannot run here, and MICROVMM_NESTED=require: {0}")]
    Unavailable(String),
    /// The work directory for the results could not be made or read.
    #[error("nested harness work directory {path}")]
    WorkDir {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The command (or level 1) did not finish in time.
    #[error(
        "nested command timed out after {limit:?}; harness said:\n{stderr}\n--- command output so far (tail):\n{stdout}"
    )]
    TimedOut {
        /// The limit given.
        limit: Duration,
        /// The harness's stderr (with the command's own stderr and a console tail).
        stderr: String,
        /// The tail of the command's stdout (level 1 syncs it every 5 s).
        stdout: String,
    },
    /// Level 1 crashed or reset before the command ended (QEMU's emulation of nested SVM is not
    /// flawless: seen twice in about fifteen boots here).
    #[error(
        "level 1 ended without the command's status (it crashed or reset):\n{stderr}\n--- command \
         output so far (tail):\n{}",
        tail(.stdout, 60)
    )]
    L1Died {
        /// The harness's stderr (console tail, QEMU's fault log).
        stderr: String,
        /// What the command wrote to stdout up to level 1's last sync (every 5 s).
        stdout: String,
    },
    /// The harness itself failed (bad option, unreadable results, ...).
    #[error(
        "nested harness failed (exit {status:?}):\n{stderr}\n--- command output so far (tail):\n{stdout}"
    )]
    Harness {
        /// Its exit status, if it exited.
        status: Option<i32>,
        /// Its stderr.
        stderr: String,
        /// The tail of what the command wrote to stdout before the failure (level 1 syncs it
        /// every 5 s).
        stdout: String,
    },
}

/// A file or directory to put into level 1, at `/nested/<dest>`.
#[derive(Debug, Clone)]
pub struct NestedFile {
    /// Path on the host.
    pub src: PathBuf,
    /// Path relative to `/nested` in level 1.
    pub dest: String,
}

impl NestedFile {
    /// `src`, placed at `/nested/<dest>` in level 1.
    pub fn new(src: impl Into<PathBuf>, dest: impl Into<String>) -> Self {
        Self {
            src: src.into(),
            dest: dest.into(),
        }
    }
}

/// What a command printed and returned in level 1.
#[derive(Debug, Clone)]
pub struct NestedOutput {
    /// Its exit status.
    pub status: i32,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// Level 1's serial console (its kernel log and the harness's lines).
    pub console: String,
    /// Level 1's uptime when the command started (its boot time), if reported.
    pub l1_ready: Option<Duration>,
    /// How long the command ran in level 1, if reported.
    pub command: Option<Duration>,
    /// Wall time of the whole run on the host, images and teardown included.
    pub wall: Duration,
}

/// The outcome of a nested run.
#[derive(Debug, Clone)]
pub enum Nested<T> {
    /// It ran.
    Ran(T),
    /// The harness cannot run here; the reason (already printed as a `SKIP:` line).
    Skipped(String),
}

/// Options of a nested run beyond the command, files and limit.
#[derive(Debug, Clone, Default)]
pub struct NestedOptions {
    /// Host programs to put on level 1's PATH (with their libraries), e.g. `mkfs.ext4`.
    pub tools: Vec<String>,
    /// Attach the guest-image disk at `/images` (`MICROVMM_GUEST_IMAGES=/images`).
    pub images: bool,
    /// Level 1's RAM in MiB (default of the script: 3072).
    pub mem_mib: Option<u32>,
    /// Extra environment for the command.
    pub env: Vec<(String, String)>,
    /// Name printed in the `SKIP:` line (default: `nested`).
    pub test_name: Option<String>,
    /// More files for [`run_tests`] (besides the test binary).
    pub files: Vec<NestedFile>,
}

/// `scripts/nested.sh` of this checkout.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/nested.sh")
}

/// Runs `cmd` (a `sh -c` command line) in level 1 with `files` under `/nested`, limited to
/// `timeout`; prints `SKIP: nested: <reason>` and returns [`Nested::Skipped`] when the harness
/// cannot run here.
pub fn run(
    cmd: &str,
    files: &[NestedFile],
    timeout: Duration,
) -> Result<Nested<NestedOutput>, NestedError> {
    run_with(cmd, files, timeout, &NestedOptions::default())
}

/// [`run`] with options.
pub fn run_with(
    cmd: &str,
    files: &[NestedFile],
    timeout: Duration,
    opts: &NestedOptions,
) -> Result<Nested<NestedOutput>, NestedError> {
    let name = opts.test_name.as_deref().unwrap_or("nested");
    let mode = std::env::var("MICROVMM_NESTED").unwrap_or_default();
    if mode != "1" && mode != "require" {
        // Opt-in: each test boots a QEMU TCG level 1 (minutes of CPU). The project's CI sets
        // MICROVMM_NESTED=require (scripts/test.sh).
        let reason = "the nested hardware-KVM tests run only with MICROVMM_NESTED=1 (or \
                      =require, as CI sets it: then a harness that cannot run is a failure)"
            .to_string();
        println!("SKIP: {name}: {reason}");
        return Ok(Nested::Skipped(reason));
    }
    let skip = |reason: String| {
        if mode == "require" {
            return Err(NestedError::Unavailable(reason));
        }
        println!("SKIP: {name}: {reason}");
        Ok(Nested::Skipped(reason))
    };
    let script = script();
    if !script.is_file() {
        return skip(format!("{} not found", script.display()));
    }
    if let Some(f) = files.iter().find(|f| !f.src.exists()) {
        return Err(NestedError::MissingFile(f.src.clone()));
    }
    let out_dir = WorkDir::new()?;
    let mut c = Command::new("bash");
    c.arg(&script)
        .arg("--timeout")
        .arg(timeout.as_secs().max(1).to_string())
        .arg("--out")
        .arg(out_dir.path());
    if let Some(m) = opts.mem_mib {
        c.arg("--mem").arg(m.to_string());
    }
    if opts.images {
        c.arg("--images");
    }
    for t in &opts.tools {
        c.arg("--tool").arg(t);
    }
    for (k, v) in &opts.env {
        c.arg("--env").arg(format!("{k}={v}"));
    }
    // The Linux test guests' vCPU count, if chosen, applies in level 1 too.
    let vcpus = crate::linux_guest::VCPUS_ENV;
    if let Ok(v) = std::env::var(vcpus)
        && !opts.env.iter().any(|(k, _)| k == vcpus)
    {
        c.arg("--env").arg(format!("{vcpus}={v}"));
    }
    for f in files {
        let mut spec = f.src.clone().into_os_string();
        spec.push(":");
        spec.push(&f.dest);
        c.arg("--file").arg(spec);
    }
    c.arg("--").arg("sh").arg("-c").arg(cmd);
    let started = Instant::now();
    let o = c.output().map_err(|source| NestedError::Spawn {
        script: script.clone(),
        source,
    })?;
    let wall = started.elapsed();
    let harness_err = String::from_utf8_lossy(&o.stderr).into_owned();
    match o.status.code() {
        Some(EXIT_SKIP) => {
            let reason = harness_err
                .lines()
                .find_map(|l| l.strip_prefix("nested: SKIP: "))
                .unwrap_or("the nested harness cannot run here")
                .to_string();
            return skip(reason);
        }
        Some(EXIT_TIMEOUT) => {
            return Err(NestedError::TimedOut {
                limit: timeout,
                stderr: harness_err,
                stdout: tail(&String::from_utf8_lossy(&o.stdout), 60),
            });
        }
        Some(EXIT_L1_DIED) => {
            return Err(NestedError::L1Died {
                stderr: harness_err,
                stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            });
        }
        Some(EXIT_HARNESS) | None => {
            return Err(NestedError::Harness {
                status: o.status.code(),
                stderr: harness_err,
                stdout: tail(&String::from_utf8_lossy(&o.stdout), 60),
            });
        }
        Some(_) => {}
    }
    let read = |f: &str| -> Result<String, NestedError> {
        let p = out_dir.path().join(f);
        match std::fs::read(&p) {
            Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
            Err(source) => Err(NestedError::WorkDir { path: p, source }),
        }
    };
    let status_text = read("status")?;
    let Ok(status) = status_text.trim().parse::<i32>() else {
        return Err(NestedError::Harness {
            status: o.status.code(),
            stderr: harness_err,
            stdout: tail(&String::from_utf8_lossy(&o.stdout), 60),
        });
    };
    let timing = read("timing")?;
    let secs = |key: &str| {
        timing
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(Duration::from_secs_f64)
    };
    Ok(Nested::Ran(NestedOutput {
        status,
        stdout: read("stdout")?,
        stderr: read("stderr")?,
        console: read("console.log")?,
        l1_ready: secs("l1_ready_s"),
        command: secs("command_s"),
        wall,
    }))
}

/// One test of a test binary, as it ran in level 1.
#[derive(Debug, Clone)]
pub struct InnerTest {
    /// The test's name.
    pub name: String,
    /// Its exit status in level 1.
    pub status: i32,
    /// Its output (stdout and stderr, `--nocapture`).
    pub output: String,
    /// How long it took in level 1.
    pub duration: Option<Duration>,
}

impl InnerTest {
    /// Whether it printed a `SKIP:` line.
    pub fn skipped(&self) -> bool {
        self.output.lines().any(|l| l.contains("SKIP:"))
    }

    /// Whether it ran and passed: exit 0, `test result: ok. 1 passed`, and no `SKIP:` line.
    pub fn passed(&self) -> bool {
        self.status == 0 && self.output.contains("test result: ok. 1 passed") && !self.skipped()
    }
}

/// The outcome of [`run_tests`].
#[derive(Debug, Clone)]
pub struct InnerTests {
    /// Each test requested, in order (a test that never started has status -1).
    pub tests: Vec<InnerTest>,
    /// The whole run (the second boot's, after a retry).
    pub run: NestedOutput,
    /// Why the tests were run again in a second boot, if they were.
    pub retried: Option<String>,
}

impl InnerTests {
    /// Panics naming every test that did not really run and pass, with its output.
    pub fn assert_all_passed(&self) {
        let bad: Vec<String> = self
            .tests
            .iter()
            .filter(|t| !t.passed())
            .map(|t| {
                let why = if t.skipped() {
                    "SKIPPED inside level 1 (not a pass)"
                } else {
                    "failed"
                };
                format!(
                    "--- {} {why} (exit {}):\n{}",
                    t.name,
                    t.status,
                    tail(&t.output, 200)
                )
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{} of {} nested tests did not pass:\n{}\n--- level-1 console (tail):\n{}",
            bad.len(),
            self.tests.len(),
            bad.join("\n"),
            tail(&self.run.console, 40)
        );
    }

    /// A summary: per test its result, duration and its own report lines (`<name>: ...`).
    pub fn summary(&self) -> String {
        let mut s = format!(
            "level 1 ready after {:.1} s, all tests {:.1} s, wall {:.1} s\n",
            self.run.l1_ready.unwrap_or_default().as_secs_f64(),
            self.run.command.unwrap_or_default().as_secs_f64(),
            self.run.wall.as_secs_f64()
        );
        if let Some(why) = &self.retried {
            s.push_str(&format!("  (second level-1 boot: {})\n", tail(why, 1)));
        }
        for t in &self.tests {
            s.push_str(&format!(
                "  {}: {} in {:.1} s\n",
                t.name,
                if t.passed() {
                    "passed"
                } else if t.skipped() {
                    "SKIPPED"
                } else {
                    "FAILED"
                },
                t.duration.unwrap_or_default().as_secs_f64()
            ));
            // The test's own report lines (`<name>: ...`), e.g. its figures.
            let own = format!("{}: ", t.name);
            // (The first may follow libtest's `test <name> ... ` on the same line.)
            for l in t.output.lines() {
                if let Some(i) = l.find(&own) {
                    s.push_str(&format!("    {}\n", &l[i + own.len()..]));
                }
            }
        }
        s
    }
}

/// The last `n` lines of `s`.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs the tests `names` of test binary `exe` (e.g. `std::env::current_exe()`) one at a time
/// (`--exact NAME --nocapture --test-threads=1`) in one level-1 boot, each limited to `each`.
///
/// If level 1 crashes or resets on the way ([`NestedError::L1Died`]), the tests that had not
/// finished run once more in a new boot (said on stdout, and in [`InnerTests::retried`]); a second
/// crash is the error.
pub fn run_tests(
    exe: &Path,
    names: &[&str],
    each: Duration,
    opts: &NestedOptions,
) -> Result<Nested<InnerTests>, NestedError> {
    match run_tests_once(exe, names, each, opts) {
        Err(NestedError::L1Died { stderr, stdout }) => {
            let finished: Vec<InnerTest> = parse_tests(&stdout, names)
                .into_iter()
                .filter(|t| t.status != -1)
                .collect();
            let rest: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| !finished.iter().any(|t| t.name == *n))
                .collect();
            let note = format!(
                "level 1 crashed or reset; {} of {} tests had finished, the other {} run again in \
                 a new boot. The harness said:\n{stderr}",
                finished.len(),
                names.len(),
                rest.len()
            );
            println!("nested: {note}");
            let mut again = match run_tests_once(exe, &rest, each, opts)? {
                Nested::Ran(r) => r,
                Nested::Skipped(r) => return Ok(Nested::Skipped(r)),
            };
            let mut tests = finished;
            tests.append(&mut again.tests);
            tests.sort_by_key(|t| names.iter().position(|n| *n == t.name));
            again.tests = tests;
            again.retried = Some(note);
            Ok(Nested::Ran(again))
        }
        other => other,
    }
}

/// One level-1 boot of [`run_tests`].
fn run_tests_once(
    exe: &Path,
    names: &[&str],
    each: Duration,
    opts: &NestedOptions,
) -> Result<Nested<InnerTests>, NestedError> {
    let bin = "bin/test-binary";
    let mut cmd = String::new();
    for name in names {
        // busybox's `timeout` and `date +%s` (whole seconds; uptime has hundredths).
        cmd.push_str(&format!(
            "echo '{TEST_MARK} {name}'; s=$(cut -d' ' -f1 /proc/uptime); \
             timeout -s KILL {limit} ./{bin} --exact {name} --nocapture --test-threads=1 2>&1; \
             rc=$?; echo \"{TEST_MARK} end rc=$rc start=$s end=$(cut -d' ' -f1 /proc/uptime)\"; ",
            limit = each.as_secs().max(1),
        ));
    }
    cmd.push_str("true");
    let total = each * u32::try_from(names.len()).unwrap_or(u32::MAX) + Duration::from_secs(30);
    let mut files = vec![NestedFile::new(exe, bin)];
    files.extend(opts.files.iter().cloned());
    let run = match run_with(&cmd, &files, total, opts)? {
        Nested::Ran(o) => o,
        Nested::Skipped(r) => return Ok(Nested::Skipped(r)),
    };
    let tests = parse_tests(&run.stdout, names);
    Ok(Nested::Ran(InnerTests {
        tests,
        run,
        retried: None,
    }))
}

/// Splits the output of [`run_tests_once`]'s command into the tests `names` (a test whose end
/// marker is missing has status -1).
fn parse_tests(stdout: &str, names: &[&str]) -> Vec<InnerTest> {
    let mut tests: Vec<InnerTest> = names
        .iter()
        .map(|n| InnerTest {
            name: (*n).to_string(),
            status: -1,
            output: String::new(),
            duration: None,
        })
        .collect();
    let mut current: Option<usize> = None;
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix(TEST_MARK) {
            let rest = rest.trim();
            if let Some(end) = rest.strip_prefix("end ") {
                if let Some(t) = current.and_then(|i| tests.get_mut(i)) {
                    let field = |k: &str| {
                        end.split_whitespace()
                            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
                    };
                    t.status = field("rc").and_then(|v| v.parse().ok()).unwrap_or(-1);
                    let num = |k: &str| field(k).and_then(|v| v.parse::<f64>().ok());
                    if let (Some(a), Some(b)) = (num("start"), num("end")) {
                        t.duration = Some(Duration::from_secs_f64((b - a).max(0.0)));
                    }
                }
                current = None;
            } else {
                current = names.iter().position(|n| *n == rest);
            }
            continue;
        }
        if let Some(t) = current.and_then(|i| tests.get_mut(i)) {
            t.output.push_str(line);
            t.output.push('\n');
        }
    }
    tests
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<Self, NestedError> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "nested-out-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).map_err(|source| NestedError::WorkDir {
            path: p.clone(),
            source,
        })?;
        Ok(Self(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inner(status: i32, output: &str) -> InnerTest {
        InnerTest {
            name: "t".into(),
            status,
            output: output.into(),
            duration: None,
        }
    }

    #[test]
    fn inner_outputs_are_split_by_their_markers() {
        let out = format!(
            "{TEST_MARK} a\nrunning 1 test\ntest result: ok. 1 passed\n{TEST_MARK} end rc=0 \
             start=1.50 end=4.00\n{TEST_MARK} b\npartial\n"
        );
        let t = parse_tests(&out, &["a", "b", "c"]);
        assert!(t[0].passed());
        assert_eq!(t[0].duration, Some(Duration::from_secs_f64(2.5)));
        assert_eq!((t[1].status, t[1].output.as_str()), (-1, "partial\n"));
        assert_eq!((t[2].status, t[2].output.as_str()), (-1, ""));
    }

    #[test]
    fn a_skipped_inner_test_is_not_a_pass() {
        assert!(inner(0, "running 1 test\ntest result: ok. 1 passed; 0 failed").passed());
        let skipped = inner(0, "SKIP: t: no kvm\ntest result: ok. 1 passed; 0 failed");
        assert!(skipped.skipped());
        assert!(!skipped.passed());
        assert!(!inner(0, "test result: ok. 0 passed; 0 failed").passed());
        assert!(!inner(101, "test result: FAILED. 0 passed; 1 failed").passed());
    }
}
