//! Host side: a client for one agent, and the relay that moves the application between two agents
//! (checkpoint on the source, images relayed frame by frame, restore on the target, then release or
//! rollback). The VMM and the `upgrade` orchestrator use this; the QEMU harness does too.

use std::time::{Duration, Instant};

use crate::agent::error_chain;
use crate::protocol::{
    CheckpointOpts, CheckpointStats, ErrorKind, FileHeader, FrameKind, OutputStream, ProtocolError,
    Request, Response, WorkloadSpec, read_frame, read_message, write_frame, write_message,
};
use crate::transport::{self, Connection, Endpoint, TransportError};

/// Errors talking to one agent.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Connecting failed.
    #[error("cannot reach the agent")]
    Transport(#[from] TransportError),
    /// The connection failed or the agent broke the protocol.
    #[error("agent protocol error")]
    Protocol(#[from] ProtocolError),
    /// The agent reported a failure.
    #[error("agent error ({kind:?}): {message}")]
    Agent {
        /// Class of failure.
        kind: ErrorKind,
        /// Agent's description.
        message: String,
    },
    /// The agent answered with a response that does not fit the request.
    #[error("unexpected agent response {0}")]
    Unexpected(String),
    /// The relay dropped the target connection on purpose (fault injection).
    #[error("target connection dropped after {0} relayed bytes (injected)")]
    InjectedDrop(u64),
}

/// Output of a command run with [`AgentClient::exec`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code (None: killed by a signal).
    pub code: Option<i32>,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// A connection to one agent.
#[derive(Debug)]
pub struct AgentClient {
    conn: Box<dyn Connection>,
    endpoint: Option<Endpoint>,
    read_timeout: Option<Duration>,
}

fn unexpected(r: &Response) -> HostError {
    match r {
        Response::Error { kind, message } => HostError::Agent {
            kind: *kind,
            message: message.clone(),
        },
        other => HostError::Unexpected(format!("{other:?}")),
    }
}

impl AgentClient {
    /// Connects to the agent at `ep`.
    pub fn connect(ep: &Endpoint, timeout: Duration) -> Result<Self, HostError> {
        Ok(Self {
            conn: transport::connect(ep, timeout)?,
            endpoint: Some(ep.clone()),
            read_timeout: None,
        })
    }

    /// Connects, retrying until `limit` passes (for an agent that is still booting).
    pub fn connect_retry(ep: &Endpoint, limit: Duration) -> Result<Self, HostError> {
        let t0 = Instant::now();
        loop {
            match Self::connect(ep, Duration::from_secs(2)).and_then(|mut c| c.ping().map(|_| c)) {
                Ok(c) => return Ok(c),
                Err(e) if t0.elapsed() >= limit => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Wraps an established connection (e.g. a vsock stream the VMM opened).
    pub fn from_connection(conn: Box<dyn Connection>) -> Self {
        Self {
            conn,
            endpoint: None,
            read_timeout: None,
        }
    }

    /// Replaces the connection with a fresh one to the same endpoint.
    pub fn reconnect(&mut self, timeout: Duration) -> Result<(), HostError> {
        let ep = self
            .endpoint
            .clone()
            .ok_or_else(|| HostError::Unexpected("no endpoint to reconnect to".into()))?;
        let conn = transport::connect(&ep, timeout)?;
        conn.set_read_timeout(self.read_timeout)
            .map_err(|e| HostError::Protocol(ProtocolError::Io(e)))?;
        self.conn = conn;
        Ok(())
    }

    /// Sends a request.
    pub fn send(&mut self, req: &Request) -> Result<(), HostError> {
        Ok(write_message(&mut *self.conn, req)?)
    }

    /// Reads the next response.
    pub fn recv(&mut self) -> Result<Response, HostError> {
        Ok(read_message(&mut *self.conn)?)
    }

    fn call(&mut self, req: &Request) -> Result<Response, HostError> {
        self.send(req)?;
        match self.recv()? {
            Response::Error { kind, message } => Err(HostError::Agent { kind, message }),
            r => Ok(r),
        }
    }

    fn call_ok(&mut self, req: &Request) -> Result<(), HostError> {
        match self.call(req)? {
            Response::Ok => Ok(()),
            r => Err(unexpected(&r)),
        }
    }

    /// A second handle on the connection: its `shutdown` (from any thread) ends a call blocked
    /// on the agent at once, with an error.
    pub fn interrupter(&self) -> std::io::Result<Box<dyn Connection>> {
        self.conn.try_clone_conn()
    }

    /// Sets how long any wait for the agent may take (`None` = no limit); kept across reconnects.
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> Result<(), HostError> {
        self.read_timeout = t;
        self.conn
            .set_read_timeout(t)
            .map_err(|e| HostError::Protocol(ProtocolError::Io(e)))
    }

    /// Pings; returns the agent version.
    pub fn ping(&mut self) -> Result<String, HostError> {
        match self.call(&Request::Ping)? {
            Response::Pong { version } => Ok(version),
            r => Err(unexpected(&r)),
        }
    }

    /// Runs a command in the guest and collects its output.
    pub fn exec(
        &mut self,
        argv: &[&str],
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, HostError> {
        self.send(&Request::Exec {
            argv: argv.iter().map(|s| (*s).to_string()).collect(),
            timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        })?;
        let mut out = ExecOutput::default();
        loop {
            match self.recv()? {
                Response::Output {
                    stream: OutputStream::Stdout,
                    data,
                } => out.stdout.push_str(&data),
                Response::Output {
                    stream: OutputStream::Stderr,
                    data,
                } => out.stderr.push_str(&data),
                Response::Exited { code, timed_out } => {
                    out.code = code;
                    out.timed_out = timed_out;
                    return Ok(out);
                }
                r => return Err(unexpected(&r)),
            }
        }
    }

    /// Freezes the file system at `path`.
    pub fn freeze(&mut self, path: &str) -> Result<(), HostError> {
        self.call_ok(&Request::Freeze { path: path.into() })
    }

    /// Thaws the file system at `path`.
    pub fn thaw(&mut self, path: &str) -> Result<(), HostError> {
        self.call_ok(&Request::Thaw { path: path.into() })
    }

    /// Starts the application; returns its PID.
    pub fn start(&mut self, spec: &WorkloadSpec) -> Result<u32, HostError> {
        match self.call(&Request::Start { spec: spec.clone() })? {
            Response::Started { pid } => Ok(pid),
            r => Err(unexpected(&r)),
        }
    }

    /// The supervised application's root PID (if running) and its process tree.
    pub fn status(&mut self) -> Result<(Option<u32>, Vec<u32>), HostError> {
        match self.call(&Request::Status)? {
            Response::Status { pid, tree, .. } => Ok((pid, tree)),
            r => Err(unexpected(&r)),
        }
    }

    /// Starts a CRIU page server in the guest for the next restore.
    pub fn page_server(&mut self, port: u16) -> Result<(), HostError> {
        self.call_ok(&Request::PageServer { port })
    }

    /// Gives up the service address and images after a successful handoff.
    pub fn release(&mut self) -> Result<(), HostError> {
        self.call_ok(&Request::Release)
    }

    /// On a clone of the VM: kills this agent's copy of the application and forgets it (see
    /// [`Request::Discard`]).
    pub fn discard(&mut self) -> Result<(), HostError> {
        self.call_ok(&Request::Discard)
    }

    /// Resumes the application here after a failed handoff; returns its PID.
    pub fn rollback(&mut self) -> Result<u32, HostError> {
        match self.call(&Request::Rollback)? {
            Response::RolledBack { pid } => Ok(pid),
            r => Err(unexpected(&r)),
        }
    }
}

/// Options of one handoff.
#[derive(Debug, Clone, Default)]
pub struct HandoffOpts {
    /// Checkpoint options (pre-dump rounds, page server).
    pub checkpoint: CheckpointOpts,
    /// Fault the target injects (tests; the `fault-injection` feature).
    #[cfg(feature = "fault-injection")]
    pub fault: Option<crate::protocol::Fault>,
    /// Drop the target connection after relaying this many bytes of file data (tests).
    #[cfg(feature = "fault-injection")]
    pub drop_target_after: Option<u64>,
    /// Drop the target connection right after the last image, before its answer (tests): the
    /// handoff must find out from the target whether the restore happened.
    #[cfg(feature = "fault-injection")]
    pub drop_target_before_reply: bool,
}

impl HandoffOpts {
    /// After how many relayed bytes the target connection is dropped on purpose (tests).
    fn drop_after(&self) -> Option<u64> {
        #[cfg(feature = "fault-injection")]
        return self.drop_target_after;
        #[cfg(not(feature = "fault-injection"))]
        None
    }

    /// Whether the target's answer is dropped on purpose (tests).
    fn drop_reply(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.drop_target_before_reply;
        #[cfg(not(feature = "fault-injection"))]
        false
    }
}

/// What one successful handoff measured.
#[derive(Debug, Clone, Default)]
pub struct HandoffReport {
    /// Source-side checkpoint statistics.
    pub stats: CheckpointStats,
    /// PID of the application on the target.
    pub pid: u32,
    /// Wall time of `criu restore` on the target, ms (0 when the target's answer was lost and the
    /// restore was confirmed by asking for its status).
    pub restore_ms: u64,
    /// Bytes of file data relayed.
    pub relayed_bytes: u64,
    /// From the checkpoint request until the source finished streaming, ms.
    pub checkpoint_ms: u64,
    /// From the checkpoint request until the target reported the application restored, ms.
    pub restored_ms: u64,
    /// Wall time of the whole handoff (release of the source included), ms.
    pub total_ms: u64,
}

/// Errors of a handoff.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The handoff failed and the application runs on the source again.
    #[error("handoff failed; the application runs on the source (pid {pid})")]
    RolledBack {
        /// PID on the source after the rollback.
        pid: u32,
        /// Why the handoff failed.
        #[source]
        cause: HostError,
    },
    /// The handoff failed and so did the rollback.
    #[error("handoff failed ({cause}) and the rollback failed")]
    RollbackFailed {
        /// Why the handoff failed (flattened).
        cause: String,
        /// Why the rollback failed.
        #[source]
        rollback: HostError,
    },
    /// The application moved, but the source did not release the service address.
    #[error("handoff done but releasing the source failed")]
    Release(#[source] HostError),
}

/// Relays the checkpoint stream from `src` to `dst` (the restore request is sent once the source
/// names the workload); returns the checkpoint statistics and the bytes relayed.
fn relay(
    src: &mut AgentClient,
    dst: &mut AgentClient,
    opts: &HandoffOpts,
) -> Result<(CheckpointStats, u64), HostError> {
    src.send(&Request::Checkpoint {
        opts: opts.checkpoint.clone(),
    })?;
    let (spec, tree) = match src.recv()? {
        Response::CheckpointBegin { spec, tree } => (spec, tree),
        r => return Err(unexpected(&r)),
    };
    dst.send(&Request::Restore {
        spec,
        tree,
        #[cfg(feature = "fault-injection")]
        fault: opts.fault,
    })?;
    let mut relayed = 0u64;
    loop {
        match src.recv()? {
            Response::File(h) => {
                dst.send(&Request::File(h))?;
                copy_stream(src, dst, &mut relayed, opts.drop_after())?;
            }
            Response::CheckpointDone { stats } => {
                dst.send(&Request::EndOfImages)?;
                return Ok((stats, relayed));
            }
            r => return Err(unexpected(&r)),
        }
    }
}

/// Moves the application from the agent `src` to the agent `dst`: checkpoint on the source, images
/// relayed through this process, restore on the target, then release on the source. On any failure
/// the target connection is dropped (the target agent cleans up) and the source rolls back.
pub fn handoff(
    src: &mut AgentClient,
    dst: &mut AgentClient,
    opts: &HandoffOpts,
) -> Result<HandoffReport, HandoffError> {
    let t0 = Instant::now();
    let ms = |t: Instant| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
    let relayed = relay(src, dst, opts);
    let checkpoint_ms = ms(t0);
    let result = match relayed {
        Err(cause) => Err(cause),
        Ok((stats, relayed_bytes)) => {
            let answer = if opts.drop_reply() {
                let _ = dst.conn.shutdown();
                Err(HostError::InjectedDrop(relayed_bytes))
            } else {
                dst.recv()
            };
            let report = |pid, restore_ms| HandoffReport {
                stats,
                pid,
                restore_ms,
                relayed_bytes,
                checkpoint_ms,
                restored_ms: ms(t0),
                total_ms: 0,
            };
            match answer {
                Ok(Response::Restored { pid, restore_ms }) => Ok(report(pid, restore_ms)),
                Ok(r) => Err(unexpected(&r)),
                // All images went over but the answer was lost: the target may have restored. Ask
                // it (its status waits for a restore in progress) before deciding, or the
                // application would run twice.
                Err(lost) => match target_workload(dst) {
                    Some(pid) => Ok(report(pid, 0)),
                    None => Err(lost),
                },
            }
        }
    };
    match result {
        Ok(mut report) => {
            src.release().map_err(HandoffError::Release)?;
            report.total_ms = ms(t0);
            Ok(report)
        }
        Err(cause) => {
            // The target connection may be mid-stream: drop it (the target agent cleans up on the
            // broken stream) and open a fresh one for the caller when we can.
            let _ = dst.conn.shutdown();
            if dst.endpoint.is_some() {
                let _ = dst.reconnect(Duration::from_secs(10));
            }
            // The source connection may be mid-stream (or gone): use a fresh one when we can.
            // Dropping the old one breaks a checkpoint stream still in flight, and the source agent
            // then rolls back by itself; the rollback below waits for that and confirms it.
            let fresh = src.endpoint.is_some() && src.reconnect(Duration::from_secs(10)).is_ok();
            if !fresh && matches!(cause, HostError::Protocol(_)) {
                return Err(HandoffError::RollbackFailed {
                    cause: error_chain(&cause),
                    rollback: HostError::Unexpected(
                        "source connection unusable and no endpoint to reconnect".into(),
                    ),
                });
            }
            // After a page-server dump the pages are on the target only: bring them back first.
            let fetched = match (&opts.checkpoint.page_server, dst.endpoint.is_some()) {
                (Some(_), true) => {
                    let r = fetch_back(dst, src).err();
                    if r.is_some() && src.endpoint.is_some() {
                        let _ = src.reconnect(Duration::from_secs(10));
                    }
                    r
                }
                _ => None,
            };
            match src.rollback() {
                Ok(pid) => Err(HandoffError::RolledBack { pid, cause }),
                Err(rollback) => Err(HandoffError::RollbackFailed {
                    cause: match fetched {
                        None => error_chain(&cause),
                        Some(f) => format!(
                            "{}; fetching the pages back failed: {}",
                            error_chain(&cause),
                            error_chain(&f)
                        ),
                    },
                    rollback,
                }),
            }
        }
    }
}

/// The root PID of the workload running on the target, asked on a fresh connection (`None` if
/// none runs or the target cannot be asked).
fn target_workload(dst: &mut AgentClient) -> Option<u32> {
    let _ = dst.conn.shutdown();
    dst.endpoint.as_ref()?;
    dst.reconnect(Duration::from_secs(10)).ok()?;
    dst.status().ok()?.0
}

/// Streams the images of the target's last restore back into the source's kept checkpoint (the
/// pages a page-server dump left only on the target).
fn fetch_back(dst: &mut AgentClient, src: &mut AgentClient) -> Result<(), HostError> {
    dst.send(&Request::Fetch)?;
    src.send(&Request::AddImages)?;
    loop {
        match dst.recv()? {
            Response::File(h) => {
                src.send(&Request::File(h))?;
                copy_stream(dst, src, &mut 0, None)?;
            }
            Response::FetchDone { .. } => break,
            r => {
                // Close the source's half-open stream; it then reports a protocol error.
                let _ = src.conn.shutdown();
                return Err(unexpected(&r));
            }
        }
    }
    src.send(&Request::EndOfImages)?;
    match src.recv()? {
        Response::Ok => Ok(()),
        r => Err(unexpected(&r)),
    }
}

/// Copies data frames from `from` to `to` up to and including the end frame, counting the bytes
/// in `copied`; past `drop_after` bytes it shuts `to` down instead (fault injection).
fn copy_stream(
    from: &mut AgentClient,
    to: &mut AgentClient,
    copied: &mut u64,
    drop_after: Option<u64>,
) -> Result<(), HostError> {
    loop {
        let fr = read_frame(&mut *from.conn)?;
        match fr.kind {
            FrameKind::Data => {
                *copied += fr.payload.len() as u64;
                if drop_after.is_some_and(|n| *copied >= n) {
                    let _ = to.conn.shutdown();
                    return Err(HostError::InjectedDrop(*copied));
                }
                write_frame(&mut *to.conn, FrameKind::Data, &fr.payload)?;
            }
            FrameKind::End => {
                write_frame(&mut *to.conn, FrameKind::End, &[])?;
                return Ok(());
            }
            FrameKind::Message => {
                return Err(ProtocolError::Unexpected {
                    expected: "data or end",
                    got: fr.kind,
                }
                .into());
            }
        }
    }
}

/// A checkpoint held by the host between the source's dump and the target's restore (for an
/// orchestrator that does other work in between, e.g. switching the target's disks): the
/// workload's spec and task list and every streamed file with its contents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckpointImage {
    /// The workload as the source ran it.
    pub spec: Option<WorkloadSpec>,
    /// PIDs and TIDs of the dumped tree.
    pub tree: Vec<u32>,
    /// Files in stream order: header and contents.
    pub files: Vec<(FileHeader, Vec<u8>)>,
    /// The checkpoint's measurements.
    pub stats: CheckpointStats,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ImageIndex {
    spec: Option<WorkloadSpec>,
    tree: Vec<u32>,
    files: Vec<FileHeader>,
    stats: CheckpointStats,
}

/// Magic of an encoded [`CheckpointImage`].
const IMAGE_MAGIC: &[u8; 8] = b"MVGAIMG1";

impl CheckpointImage {
    /// Encodes the image: magic, u32 LE index length, JSON index (spec, tree, file headers,
    /// stats), then each file's contents in order.
    pub fn encode(&self) -> Vec<u8> {
        let index = ImageIndex {
            spec: self.spec.clone(),
            tree: self.tree.clone(),
            files: self.files.iter().map(|(h, _)| h.clone()).collect(),
            stats: self.stats.clone(),
        };
        let json = serde_json::to_vec(&index).unwrap_or_default();
        let mut out = Vec::with_capacity(
            12 + json.len() + self.files.iter().map(|(_, d)| d.len()).sum::<usize>(),
        );
        out.extend_from_slice(IMAGE_MAGIC);
        out.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&json);
        for (_, d) in &self.files {
            out.extend_from_slice(d);
        }
        out
    }

    /// Decodes [`CheckpointImage::encode`]'s format; anything malformed (magic, lengths,
    /// sizes that do not add up) is `HostError::Unexpected`.
    pub fn decode(b: &[u8]) -> Result<Self, HostError> {
        let bad = |why: &str| HostError::Unexpected(format!("bad checkpoint image: {why}"));
        if b.len() < 12 || &b[..8] != IMAGE_MAGIC {
            return Err(bad("magic"));
        }
        let n = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
        let json = b.get(12..12 + n).ok_or_else(|| bad("index length"))?;
        let index: ImageIndex = serde_json::from_slice(json).map_err(|e| bad(&e.to_string()))?;
        let mut pos = 12 + n;
        let mut files = Vec::with_capacity(index.files.len());
        for h in index.files {
            let len = usize::try_from(h.size).map_err(|_| bad("file size"))?;
            let end = pos.checked_add(len).ok_or_else(|| bad("file size"))?;
            let data = b.get(pos..end).ok_or_else(|| bad("file size"))?.to_vec();
            pos = end;
            files.push((h, data));
        }
        if pos != b.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(Self {
            spec: index.spec,
            tree: index.tree,
            files,
            stats: index.stats,
        })
    }
}

impl AgentClient {
    /// Checkpoints the workload and receives every image into host memory (the workload stays
    /// stopped on the source until [`AgentClient::release`] or [`AgentClient::rollback`]).
    pub fn checkpoint_image(
        &mut self,
        opts: &CheckpointOpts,
    ) -> Result<CheckpointImage, HostError> {
        self.send(&Request::Checkpoint { opts: opts.clone() })?;
        let (spec, tree) = match self.recv()? {
            Response::CheckpointBegin { spec, tree } => (spec, tree),
            r => return Err(unexpected(&r)),
        };
        let mut files = Vec::new();
        loop {
            match self.recv()? {
                Response::File(h) => {
                    let mut data = Vec::new();
                    loop {
                        let fr = read_frame(&mut *self.conn)?;
                        match fr.kind {
                            FrameKind::Data => data.extend_from_slice(&fr.payload),
                            FrameKind::End => break,
                            FrameKind::Message => {
                                return Err(ProtocolError::Unexpected {
                                    expected: "data or end",
                                    got: fr.kind,
                                }
                                .into());
                            }
                        }
                    }
                    files.push((h, data));
                }
                Response::CheckpointDone { stats } => {
                    return Ok(CheckpointImage {
                        spec: Some(spec),
                        tree,
                        files,
                        stats,
                    });
                }
                r => return Err(unexpected(&r)),
            }
        }
    }

    /// Restores a held checkpoint on this (target) agent; the restored root PID. On failure the
    /// target has undone its part (service address, guard, partial files).
    pub fn restore_image(&mut self, img: &CheckpointImage) -> Result<u32, HostError> {
        let spec = img
            .spec
            .clone()
            .ok_or_else(|| HostError::Unexpected("checkpoint image without a spec".into()))?;
        self.send(&Request::Restore {
            spec,
            tree: img.tree.clone(),
            #[cfg(feature = "fault-injection")]
            fault: None,
        })?;
        for (h, data) in &img.files {
            self.send(&Request::File(h.clone()))?;
            for chunk in data.chunks(256 << 10) {
                write_frame(&mut *self.conn, FrameKind::Data, chunk)?;
            }
            write_frame(&mut *self.conn, FrameKind::End, &[])?;
        }
        self.send(&Request::EndOfImages)?;
        match self.recv()? {
            Response::Restored { pid, .. } => Ok(pid),
            r => Err(unexpected(&r)),
        }
    }
}

#[cfg(test)]
mod image_tests {
    use super::*;
    use crate::protocol::FileKind;

    #[test]
    fn checkpoint_images_round_trip_and_malformed_ones_are_refused() {
        let img = CheckpointImage {
            spec: None,
            tree: vec![20000, 20001],
            files: vec![
                (
                    FileHeader {
                        kind: FileKind::Image,
                        name: "final/core-20000.img".into(),
                        size: 5,
                        mode: 0o600,
                        link: None,
                    },
                    b"hello".to_vec(),
                ),
                (
                    FileHeader {
                        kind: FileKind::Data,
                        name: "/data/x".into(),
                        size: 0,
                        mode: 0o644,
                        link: None,
                    },
                    Vec::new(),
                ),
            ],
            stats: CheckpointStats::default(),
        };
        let b = img.encode();
        assert_eq!(CheckpointImage::decode(&b).unwrap(), img);
        assert!(CheckpointImage::decode(&b[..b.len() - 1]).is_err(), "short");
        let mut long = b.clone();
        long.push(0);
        assert!(CheckpointImage::decode(&long).is_err(), "trailing");
        let mut magic = b.clone();
        magic[0] ^= 1;
        assert!(CheckpointImage::decode(&magic).is_err());
        let mut index_len = b;
        index_len[8] = 0xff;
        assert!(CheckpointImage::decode(&index_len).is_err());
    }
}
