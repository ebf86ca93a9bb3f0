//! Small system helpers: running commands, FIFREEZE/FITHAW, process trees, ns_last_pid.

use std::fs::{self, File};
use std::io;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

/// Errors of the system helpers.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// A command could not be started.
    #[error("cannot run {cmd}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Exit status text.
        status: String,
        /// Tail of its standard error.
        stderr: String,
    },
    /// Opening the mount point failed.
    #[error("cannot open {path}")]
    Open {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The FIFREEZE/FITHAW ioctl failed.
    #[error("{op} on {path} failed")]
    Ioctl {
        /// FIFREEZE or FITHAW.
        op: &'static str,
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing /proc/sys/kernel/ns_last_pid failed.
    #[error("cannot set ns_last_pid to {0}")]
    NsLastPid(u32, #[source] io::Error),
}

/// Last `max` bytes of `s`, on a char boundary.
pub fn tail(s: &str, max: usize) -> String {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].trim().to_string()
}

/// Runs `argv`, returning its standard output; a non-zero exit is [`SysError::Failed`].
pub fn run(argv: &[&str]) -> Result<String, SysError> {
    run_with_input(argv, "")
}

/// Runs `argv` with `input` on its standard input, returning its standard output.
pub fn run_with_input(argv: &[&str], input: &str) -> Result<String, SysError> {
    let cmd = argv.join(" ");
    let spawn_err = |source| SysError::Spawn {
        cmd: cmd.clone(),
        source,
    };
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that exits without reading its input is judged by its exit status below.
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(SysError::Failed {
            cmd,
            status: out.status.to_string(),
            stderr: tail(&String::from_utf8_lossy(&out.stderr), 2000),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const FIFREEZE: libc::c_ulong = 0xC004_5877; // _IOWR('X', 119, int)
const FITHAW: libc::c_ulong = 0xC004_5878; // _IOWR('X', 120, int)

fn fs_ioctl(path: &str, op: &'static str, req: libc::c_ulong) -> Result<(), SysError> {
    let f = File::open(path).map_err(|source| SysError::Open {
        path: path.into(),
        source,
    })?;
    // SAFETY: FIFREEZE/FITHAW take an int argument that the kernel ignores; the fd is open for the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, 0) };
    if r < 0 {
        return Err(SysError::Ioctl {
            op,
            path: path.into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Freezes the file system mounted at `path` (FIFREEZE).
pub fn freeze(path: &str) -> Result<(), SysError> {
    fs_ioctl(path, "FIFREEZE", FIFREEZE)
}

/// Thaws the file system mounted at `path` (FITHAW).
pub fn thaw(path: &str) -> Result<(), SysError> {
    fs_ioctl(path, "FITHAW", FITHAW)
}

/// Raises the PID counter so the next process gets `next` (or the next free PID after it).
pub fn set_next_pid(next: u32) -> Result<(), SysError> {
    let last = next.saturating_sub(1);
    fs::write("/proc/sys/kernel/ns_last_pid", last.to_string())
        .map_err(|e| SysError::NsLastPid(last, e))
}

/// The last PID handed out in this PID namespace.
pub fn last_pid() -> Option<u32> {
    fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether a process with this PID exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Sends SIGKILL to process (or thread) `pid`; one already gone is fine.
pub fn kill(pid: u32) {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill has no memory arguments; a PID that no longer exists gives ESRCH.
    unsafe {
        libc::kill(p, libc::SIGKILL);
    }
}

/// All PIDs and TIDs of the process tree rooted at `root` (from /proc/*/task/*/children).
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            out.push(tid);
            let children =
                fs::read_to_string(Path::new(&t.path()).join("children")).unwrap_or_default();
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_reports_failure_with_stderr() {
        assert_eq!(run(&["sh", "-c", "echo out"]).unwrap(), "out\n");
        let e = run(&["sh", "-c", "echo oops >&2; exit 3"]).unwrap_err();
        assert!(
            matches!(&e, SysError::Failed { stderr, .. } if stderr == "oops"),
            "{e}"
        );
        assert!(matches!(
            run(&["/nonexistent/x"]),
            Err(SysError::Spawn { .. })
        ));
    }

    #[test]
    fn tree_of_self_contains_self_and_child() {
        let mut c = Command::new("sleep").arg("5").spawn().unwrap();
        let me = std::process::id();
        let tree = process_tree(me);
        assert!(tree.contains(&me));
        assert!(tree.contains(&c.id()), "{tree:?} lacks {}", c.id());
        assert!(alive(c.id()));
        c.kill().unwrap();
        c.wait().unwrap();
        assert!(!alive(c.id()));
    }

    #[test]
    fn freeze_bad_path_is_typed_error() {
        assert!(matches!(
            freeze("/nonexistent-mount"),
            Err(SysError::Open { .. })
        ));
    }

    #[test]
    fn tail_respects_char_boundaries() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("ab", 10), "ab");
    }
}
