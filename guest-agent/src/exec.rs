//! `exec`: run a command in the guest and stream its output.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::agent::{AgentError, bad};
use crate::protocol::{OutputStream, Response, write_message};
use crate::sys::SysError;
use crate::transport::Connection;

/// Runs a command, streaming its output as [`Response::Output`] and ending with [`Response::Exited`].
pub(crate) fn exec(
    conn: &mut dyn Connection,
    argv: &[String],
    timeout: Option<Duration>,
) -> Result<(), AgentError> {
    let Some(prog) = argv.first() else {
        return Err(bad("empty argv"));
    };
    let mut child = Command::new(prog)
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| SysError::Spawn {
            cmd: argv.join(" "),
            source,
        })?;
    let (tx, rx) = mpsc::channel::<(OutputStream, Vec<u8>)>();
    let pipes: [(OutputStream, Option<Box<dyn Read + Send>>); 2] = [
        (
            OutputStream::Stdout,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
        (
            OutputStream::Stderr,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
    ];
    for (stream, pipe) in pipes {
        let Some(mut pipe) = pipe else { continue };
        let tx = tx.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 || tx.send((stream, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut deadline = timeout.map(|t| Instant::now() + t);
    let mut timed_out = false;
    loop {
        let next = match deadline {
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match next {
            Ok((stream, data)) => {
                let msg = Response::Output {
                    stream,
                    data: String::from_utf8_lossy(&data).into_owned(),
                };
                if let Err(e) = write_message(conn, &msg) {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e.into());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) if !timed_out => {
                let _ = child.kill();
                timed_out = true;
                // Give the pipes a moment to drain; a grandchild holding them must not hang us.
                deadline = Some(Instant::now() + Duration::from_secs(2));
            }
            Err(_) => break,
        }
    }
    let status = child.wait().map_err(|source| SysError::Spawn {
        cmd: argv.join(" "),
        source,
    })?;
    write_message(
        conn,
        &Response::Exited {
            code: status.code(),
            timed_out,
        },
    )?;
    Ok(())
}
