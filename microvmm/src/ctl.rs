//! `microvmm ctl`: requests to a running `microvmm`'s API socket (see [`crate::api`]), and the
//! small HTTP/1.1 client `microvmm upgrade --api-socket` shares (requests written out, responses
//! parsed with `httparse`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};

/// Errors of an API request.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The socket could not be reached or the exchange broke.
    #[error("API socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not HTTP, or its body not JSON.
    #[error("API socket {0}: malformed answer: {1}")]
    Malformed(PathBuf, String),
    /// The API refused the request.
    #[error("{status}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Its `fault_message`.
        message: String,
    },
}

/// Sends one request; the status and JSON body (`Null` when empty). A status of 400 or more
/// is `CtlError::Refused` with the API's `fault_message`.
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), CtlError> {
    let io = |source| CtlError::Io {
        path: sock.to_owned(),
        source,
    };
    let mut s = UnixStream::connect(sock).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(io)?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(io)?;
    s.write_all(body.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io)?;
    let malformed = |why: String| CtlError::Malformed(sock.to_owned(), why);
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(malformed("truncated".into())),
        Err(e) => return Err(malformed(e.to_string())),
    };
    let status = resp.code.unwrap_or(0);
    let body = &raw[n..];
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body).map_err(|e| malformed(e.to_string()))?
    };
    if status >= 400 {
        return Err(CtlError::Refused {
            status,
            message: value["fault_message"]
                .as_str()
                .unwrap_or("(no message)")
                .to_string(),
        });
    }
    Ok((status, value))
}

/// `microvmm ctl` arguments.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The API socket of the running `microvmm run --api-socket`.
    #[arg(long)]
    api_socket: PathBuf,
    #[command(subcommand)]
    what: CtlCommand,
}

/// What to ask.
#[derive(Debug, clap::Subcommand)]
enum CtlCommand {
    /// The instance: state, devices, disks with their layer chains (JSON).
    Status,
    /// Pause the VM.
    Pause,
    /// Resume the VM.
    Resume,
    /// Write a snapshot of the paused VM into DIR.
    Snapshot {
        /// The snapshot directory.
        dir: PathBuf,
        /// Also hand the VM's vsock connections to the process that restores it
        /// (`microvmm run --restore DIR --handover PATH`, which connects here); the VM then
        /// stops and its `microvmm run` ends.
        #[arg(long, value_name = "PATH")]
        vsock_handover: Option<PathBuf>,
    },
    /// Stop the VM at once (`microvmm run` ends).
    Stop,
    /// Press the VM's ACPI power button: the guest shuts itself down (a Linux guest whose init
    /// handles the power button, e.g. microvmm's guest agent); `microvmm run` ends when it has.
    Shutdown,
    /// Counters (JSON).
    Metrics,
}

/// Runs `microvmm ctl`.
pub fn main(args: CtlArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let s = &args.api_socket;
    let out = match args.what {
        CtlCommand::Status => request(s, "GET", "/", None)?.1,
        CtlCommand::Metrics => request(s, "GET", "/metrics", None)?.1,
        CtlCommand::Pause => request(s, "PATCH", "/vm", Some(&json!({"state": "Paused"})))?.1,
        CtlCommand::Resume => request(s, "PATCH", "/vm", Some(&json!({"state": "Resumed"})))?.1,
        CtlCommand::Snapshot {
            dir,
            vsock_handover,
        } => {
            let mut body = json!({ "snapshot_path": std::path::absolute(&dir)? });
            if let Some(p) = vsock_handover {
                body["vsock_handover"] = json!(std::path::absolute(&p)?);
            }
            request(s, "PUT", "/snapshot/create", Some(&body))?.1
        }
        CtlCommand::Stop => request(s, "PUT", "/actions", Some(&json!({"action_type": "Stop"})))?.1,
        CtlCommand::Shutdown => {
            request(
                s,
                "PUT",
                "/actions",
                Some(&json!({"action_type": "Shutdown"})),
            )?
            .1
        }
    };
    if !out.is_null() {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(ExitCode::SUCCESS)
}
