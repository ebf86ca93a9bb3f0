//! Handing a VM's vsock connections from one `microvmm` process to another: the saving side
//! (`run --snapshot-to DIR --handover PATH`, or `PUT /snapshot/create` with `vsock_handover`)
//! listens at PATH and sends the connections to the first client; the restoring side
//! (`run --restore DIR --handover PATH`) connects and takes them.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm::handover::VsockHandover;

/// How long either side waits for the other process.
pub const WAIT: Duration = Duration::from_secs(60);

/// Connects to the saving process's handover socket, retrying until it listens.
pub fn receive(path: &Path) -> Result<VsockHandover, Box<dyn std::error::Error>> {
    let mut s = vmm::handover::connect_retrying(path, WAIT)
        .map_err(|e| format!("no handover at {}: {e}", path.display()))?;
    s.set_read_timeout(Some(WAIT))?;
    Ok(VsockHandover::receive(&mut s)?)
}

/// Whether [`send`] may listen at `path`: nothing there, or a socket (stale, replaced).
pub fn check_path(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => Err(format!(
            "{} exists and is not a socket: refusing to replace it",
            path.display()
        )),
        _ => Ok(()),
    }
}

/// Listens at `path` (a stale socket there is replaced; any other file is refused) and sends
/// `h` to the first client that connects within [`WAIT`].
pub fn send(path: &Path, h: &VsockHandover) -> Result<(), Box<dyn std::error::Error>> {
    check_path(path)?;
    // A stale socket from an earlier run goes; nothing there is fine.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen at {}: {e}", path.display()))?;
    listener.set_nonblocking(true)?;
    let end = Instant::now() + WAIT;
    let accepted = loop {
        match listener.accept() {
            Ok((s, _)) => break Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => break Err(e),
        }
    };
    let sent = accepted
        .map_err(|e| format!("nobody took the handover at {}: {e}", path.display()).into())
        .and_then(|mut s| {
            s.set_nonblocking(false)?;
            h.send(&mut s).map_err(Into::into)
        });
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!("cannot remove {}: {e}", path.display());
    }
    sent
}
