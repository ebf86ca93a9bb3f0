//! Thin wrappers over the `criu` command line (Debian's criu 3.17).

use std::fs;
use std::io;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::sys::tail;

/// Errors running CRIU.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// The criu binary could not be started.
    #[error("cannot run criu {action}")]
    Spawn {
        /// The CRIU action.
        action: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// CRIU exited unsuccessfully.
    #[error("criu {action} failed ({status}); log: {log}")]
    Failed {
        /// The CRIU action.
        action: &'static str,
        /// Exit status text.
        status: String,
        /// The error lines (or the tail) of CRIU's log.
        log: String,
    },
    /// The restored root PID could not be read back.
    #[error("criu restore wrote no usable pidfile {0}")]
    Pidfile(String),
}

/// Error lines of a CRIU log (or its tail when none are marked): the lines that led to the last
/// error (the one CRIU gave up on; earlier ones are often probes it survives, such as its kernel
/// feature checks), then every error line.
fn log_summary(dir: &Path, log: &str) -> String {
    let text = fs::read_to_string(dir.join(log)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let errors: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("Error ("))
        .collect();
    match errors.last() {
        None => tail(&text, 1500),
        Some(&last) => {
            let mut out: Vec<&str> = lines[last.saturating_sub(8)..last].to_vec();
            out.push("-- error lines:");
            out.extend(errors.iter().map(|&i| lines[i]));
            tail(&out.join("\n"), 3000)
        }
    }
}

fn criu(action: &'static str, dir: &Path, args: &[String]) -> Result<Duration, CriuError> {
    let log = format!("{action}.log");
    let t0 = Instant::now();
    let status = Command::new("criu")
        .arg(action)
        .arg("-D")
        .arg(dir)
        .args(["-o", &log, "-v4"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|source| CriuError::Spawn { action, source })?;
    let took = t0.elapsed();
    if !status.success() {
        return Err(CriuError::Failed {
            action,
            status: status.to_string(),
            log: log_summary(dir, &log),
        });
    }
    Ok(took)
}

/// `criu pre-dump --track-mem` of the tree at `pid` into `dir`, with `prev` (relative to `dir`) as parent.
pub fn pre_dump(pid: u32, dir: &Path, prev: Option<&str>) -> Result<Duration, CriuError> {
    let mut args = vec!["-t".into(), pid.to_string(), "--track-mem".into()];
    if let Some(p) = prev {
        args.extend(["--prev-images-dir".into(), p.into()]);
    }
    criu("pre-dump", dir, &args)
}

/// Final `criu dump --tcp-established` of the tree at `pid` (killed afterwards); `prev` is the last
/// pre-dump (relative to `dir`); `page_server` sends pages to a CRIU page server at `(ip, port)`.
pub fn dump(
    pid: u32,
    dir: &Path,
    prev: Option<&str>,
    page_server: Option<(&str, u16)>,
) -> Result<Duration, CriuError> {
    let mut args = vec![
        "-t".into(),
        pid.to_string(),
        "--tcp-established".into(),
        "--skip-in-flight".into(),
    ];
    if let Some(p) = prev {
        args.extend(["--track-mem".into(), "--prev-images-dir".into(), p.into()]);
    }
    if let Some((ip, port)) = page_server {
        args.extend([
            "--page-server".into(),
            "--address".into(),
            ip.into(),
            "--port".into(),
            port.to_string(),
        ]);
    }
    criu("dump", dir, &args)
}

/// `criu restore -d --tcp-established` from `dir`; returns the restored root PID and the wall time.
pub fn restore(dir: &Path) -> Result<(u32, Duration), CriuError> {
    let pidfile = dir.join("restore.pid");
    let _ = fs::remove_file(&pidfile);
    let args = vec![
        "-d".into(),
        "--tcp-established".into(),
        "--pidfile".into(),
        pidfile.to_string_lossy().into_owned(),
    ];
    let took = criu("restore", dir, &args)?;
    let pid = fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| CriuError::Pidfile(pidfile.display().to_string()))?;
    Ok((pid, took))
}

/// How long a page server may take to listen (a CRIU start in a slow guest takes seconds).
const PAGE_SERVER_START: Duration = Duration::from_secs(60);

/// Starts `criu page-server` writing pages into `dir`, listening on `port`, and returns once it
/// listens: a dump started before that would find the port closed. It exits when the dump ends.
pub fn page_server(dir: &Path, port: u16) -> Result<Child, CriuError> {
    let mut child = Command::new("criu")
        .arg("page-server")
        .arg("-D")
        .arg(dir)
        .args(["-o", "page-server.log", "-v4", "--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| CriuError::Spawn {
            action: "page-server",
            source,
        })?;
    let t0 = Instant::now();
    loop {
        if listening(port) {
            return Ok(child);
        }
        let status = match child.try_wait() {
            Ok(Some(st)) => st.to_string(),
            _ if t0.elapsed() > PAGE_SERVER_START => {
                let _ = child.kill();
                let _ = child.wait();
                format!(
                    "not listening on port {port} after {} s",
                    PAGE_SERVER_START.as_secs()
                )
            }
            _ => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        return Err(CriuError::Failed {
            action: "page-server",
            status,
            log: log_summary(dir, "page-server.log"),
        });
    }
}

/// Whether a TCP socket of this network namespace listens on `port` (any address).
fn listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        fs::read_to_string(f)
            .map(|t| table_listens(&t, port))
            .unwrap_or(false)
    })
}

/// Whether a `/proc/net/tcp{,6}` table has a socket in state LISTEN (0A) on local `port`.
fn table_listens(table: &str, port: u16) -> bool {
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1);
        let state = fields.nth(1);
        let local_port = local
            .and_then(|l| l.rsplit_once(':'))
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        local_port == Some(port) && state == Some("0A")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_found_by_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:6978 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 03004D0A:1B58 02004D0A:D3C4 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n";
        assert!(table_listens(table, 27000));
        // Port 7000 only has an established connection, not a listener.
        assert!(!table_listens(table, 7000));
        assert!(!table_listens(table, 27001));
        assert!(!table_listens("garbage\nline without fields\n", 27000));
    }

    #[test]
    fn summary_shows_what_led_to_the_last_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = String::from(
            "(00.01) Restoring netdev veth idx 10\n\
                   (00.01) Error (criu/net.c:1): Unable to create a veth pair: -95\n\
                   (00.02) kerndat done\n",
        );
        for i in 0..20 {
            log.push_str(&format!("(00.3{i}) restoring task {i}\n"));
        }
        log.push_str(
            "(00.50) Restoring file 7\n\
                   (00.51) Error (criu/files-reg.c:2): Can't open file x\n\
                   (00.52) Error (criu/cr-restore.c:3): Restoring FAILED.\n",
        );
        fs::write(dir.path().join("restore.log"), log).unwrap();
        let s = log_summary(dir.path(), "restore.log");
        assert!(s.contains("Restoring file 7"), "{s}");
        assert!(s.contains("Unable to create a veth pair"), "{s}");
        assert!(s.contains("Restoring FAILED"), "{s}");
        assert!(!s.contains("Restoring netdev"), "{s}");
    }
}
