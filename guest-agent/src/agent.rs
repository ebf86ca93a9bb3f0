//! The agent side: serves requests on a transport, supervises the application, drives CRIU.

use std::error::Error as StdError;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::criu::{self, CriuError};
use crate::exec::exec;
use crate::net::{self, NetError};
use crate::protocol::{
    CheckpointOpts, CheckpointStats, ErrorKind, FileKind, ProtocolError, Request, Response,
    WorkloadSpec, read_message, write_message,
};
use crate::stream::{receive_files, stream_dir, stream_file};
use crate::sys::{self, SysError};
use crate::transport::{Connection, Transport};

/// Errors handling one request.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The connection failed or the peer broke the protocol.
    #[error("protocol error")]
    Protocol(#[from] ProtocolError),
    /// The request is invalid in the current state.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A system command or call failed.
    #[error("system operation failed")]
    Sys(#[from] SysError),
    /// Changing the network configuration failed.
    #[error("network change failed")]
    Net(#[from] NetError),
    /// The checkpoint failed; the application keeps running.
    #[error("checkpoint failed")]
    Dump(#[source] CriuError),
    /// The restore failed; the target was cleaned up.
    #[error("restore failed")]
    Restore(#[source] CriuError),
    /// PIDs of the tree to restore are used by other processes here.
    #[error("PIDs {0:?} of the process tree are taken on this guest")]
    PidsTaken(Vec<u32>),
    /// Resuming the application on the source failed.
    #[error("rollback failed")]
    Rollback(#[source] CriuError),
    /// A file operation failed.
    #[error("I/O on {path} failed")]
    Io {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

impl AgentError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Protocol(_) => ErrorKind::Protocol,
            Self::BadRequest(_) => ErrorKind::BadRequest,
            Self::Sys(_) | Self::Net(_) => ErrorKind::Command,
            Self::Dump(_) => ErrorKind::Dump,
            Self::Restore(_) | Self::PidsTaken(_) => ErrorKind::Restore,
            Self::Rollback(_) => ErrorKind::Rollback,
            Self::Io { .. } => ErrorKind::Io,
        }
    }
}

/// An error and its causes, joined with ": ".
pub fn error_chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AgentError + '_ {
    move |source| AgentError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub(crate) fn bad(msg: impl Into<String>) -> AgentError {
    AgentError::BadRequest(msg.into())
}

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where checkpoint and restore images are kept (a tmpfs in the guest).
    pub work_dir: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            work_dir: PathBuf::from("/run/microvmm-agent"),
        }
    }
}

/// File in the work directory holding the workload state.
const STATE_FILE: &str = "state.json";

#[derive(Debug, Serialize, Deserialize)]
enum Phase {
    Running {
        pid: u32,
    },
    /// Dumped and stopped here; images kept for a rollback.
    Dumped {
        images: PathBuf,
        rules_before: Vec<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Workload {
    spec: WorkloadSpec,
    phase: Phase,
}

#[derive(Debug, Default)]
struct State {
    workload: Option<Workload>,
    page_server: Option<Child>,
}

/// The agent: one per guest.
#[derive(Debug)]
pub struct Agent {
    cfg: AgentConfig,
    state: Mutex<State>,
}

impl Agent {
    /// Creates an agent.
    /// Creates an agent; it takes over the workload state a previous agent process saved in the
    /// work directory (so a restarted agent can still release or roll back).
    pub fn new(cfg: AgentConfig) -> Arc<Self> {
        let workload = fs::read(cfg.work_dir.join(STATE_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<Option<Workload>>(&b).ok())
            .flatten();
        Arc::new(Self {
            cfg,
            state: Mutex::new(State {
                workload,
                page_server: None,
            }),
        })
    }

    /// Saves the workload state; a failure only loses restart-survival, so it is logged.
    fn persist(&self, st: &State) {
        if let Err(e) = self.save(st) {
            eprintln!("guest-agent: cannot save state: {}", error_chain(&e));
        }
    }

    /// Saves the workload state (atomically) to the work directory.
    fn save(&self, st: &State) -> Result<(), AgentError> {
        let dir = &self.cfg.work_dir;
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let bytes = serde_json::to_vec(&st.workload).map_err(|e| AgentError::Io {
            path: tmp.display().to_string(),
            source: io::Error::other(e),
        })?;
        fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        let path = dir.join(STATE_FILE);
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Accepts connections forever, one thread per connection.
    pub fn serve(self: &Arc<Self>, t: &dyn Transport) -> io::Result<()> {
        loop {
            match t.accept() {
                Ok(conn) => {
                    let me = Arc::clone(self);
                    thread::spawn(move || me.handle_connection(conn));
                }
                Err(e) => {
                    eprintln!("guest-agent: {}", error_chain(&e));
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Serves requests on one connection until it closes or breaks the protocol.
    pub fn handle_connection(&self, mut conn: Box<dyn Connection>) {
        loop {
            let req: Request = match read_message(&mut *conn) {
                Ok(r) => r,
                Err(ProtocolError::Closed) => return,
                Err(e) => {
                    let framing_ok = matches!(e, ProtocolError::BadMessage(_));
                    let resp = Response::Error {
                        kind: ErrorKind::Protocol,
                        message: error_chain(&e),
                    };
                    if write_message(&mut *conn, &resp).is_err() || !framing_ok {
                        return;
                    }
                    continue;
                }
            };
            if let Err(e) = self.handle(&mut *conn, req) {
                eprintln!("guest-agent: {}", error_chain(&e));
                if matches!(e, AgentError::Protocol(_)) {
                    return;
                }
                let resp = Response::Error {
                    kind: e.kind(),
                    message: error_chain(&e),
                };
                if write_message(&mut *conn, &resp).is_err() {
                    return;
                }
            }
        }
    }

    /// Handles one request, writing its response(s).
    pub fn handle(&self, conn: &mut dyn Connection, req: Request) -> Result<(), AgentError> {
        let resp = match req {
            Request::Ping => Response::Pong {
                version: env!("CARGO_PKG_VERSION").into(),
            },
            Request::Exec { argv, timeout_ms } => {
                return exec(conn, &argv, timeout_ms.map(Duration::from_millis));
            }
            Request::Freeze { path } => {
                sys::freeze(&path)?;
                Response::Ok
            }
            Request::Thaw { path } => {
                sys::thaw(&path)?;
                Response::Ok
            }
            Request::Start { spec } => Response::Started {
                pid: self.start(spec)?,
            },
            Request::Status => self.status(),
            Request::Checkpoint { opts } => {
                return with_stream_timeouts(conn, |c| self.checkpoint(c, &opts));
            }
            Request::Restore {
                spec,
                tree,
                #[cfg(feature = "fault-injection")]
                fault,
            } => {
                #[cfg(feature = "fault-injection")]
                let drop_data_file = fault == Some(crate::protocol::Fault::MissingDataFile);
                #[cfg(not(feature = "fault-injection"))]
                let drop_data_file = false;
                return with_stream_timeouts(conn, |c| {
                    self.restore(c, spec, &tree, drop_data_file)
                });
            }
            Request::PageServer { port } => {
                self.start_page_server(port)?;
                Response::Ok
            }
            Request::Release => {
                self.release()?;
                Response::Ok
            }
            Request::Discard => {
                self.discard()?;
                Response::Ok
            }
            Request::Rollback => {
                let mut st = self.lock();
                Response::RolledBack {
                    pid: self.rollback_locked(&mut st)?,
                }
            }
            Request::Fetch => {
                let dir = self.restore_dir().join("final");
                if !dir.is_dir() {
                    return Err(bad("no restore images to fetch"));
                }
                let mut stats = CheckpointStats::default();
                with_stream_timeouts(conn, |c| stream_dir(c, &dir, "final", &mut stats))?;
                Response::FetchDone { files: stats.files }
            }
            Request::AddImages => {
                with_stream_timeouts(conn, |c| self.add_images(c))?;
                Response::Ok
            }
            Request::File(_) | Request::EndOfImages => {
                return Err(bad("file stream outside a restore"));
            }
        };
        write_message(conn, &resp)?;
        Ok(())
    }

    fn status(&self) -> Response {
        let st = self.lock();
        match &st.workload {
            None => Response::Status {
                spec: None,
                pid: None,
                tree: vec![],
            },
            Some(w) => {
                let pid = match w.phase {
                    Phase::Running { pid } if sys::alive(pid) => Some(pid),
                    _ => None,
                };
                Response::Status {
                    spec: Some(w.spec.clone()),
                    pid,
                    tree: pid.map(sys::process_tree).unwrap_or_default(),
                }
            }
        }
    }

    /// Kills the supervised application's process tree (on a clone of the VM), destroys the
    /// connections it left on the service address, drops the address and forgets it.
    fn discard(&self) -> Result<(), AgentError> {
        let mut st = self.lock();
        let Some(w) = st.workload.take() else {
            return Ok(());
        };
        if let Phase::Running { pid } = w.phase {
            let tree = sys::process_tree(pid);
            for &p in &tree {
                sys::kill(p);
            }
            let end = std::time::Instant::now() + Duration::from_secs(60);
            while tree.iter().any(|&p| sys::alive(p)) {
                if std::time::Instant::now() > end {
                    st.workload = Some(w);
                    return Err(bad(format!("the tree of pid {pid} outlived SIGKILL")));
                }
                thread::sleep(Duration::from_millis(5));
            }
        }
        self.persist(&st);
        if let Some(svc) = &w.spec.service {
            net::destroy_sockets(svc)?;
            net::addr_del(svc)?;
        }
        Ok(())
    }

    fn start(&self, spec: WorkloadSpec) -> Result<u32, AgentError> {
        let mut st = self.lock();
        if let Some(Workload {
            phase: Phase::Running { pid },
            ..
        }) = &st.workload
            && sys::alive(*pid)
        {
            return Err(bad(format!("already supervising pid {pid}")));
        }
        if matches!(
            &st.workload,
            Some(Workload {
                phase: Phase::Dumped { .. },
                ..
            })
        ) {
            return Err(bad("a checkpointed workload awaits release or rollback"));
        }
        let Some(prog) = spec.argv.first() else {
            return Err(bad("empty argv"));
        };
        if let Some(base) = spec.pid_base {
            sys::set_next_pid(base)?;
        }
        let mut cmd = Command::new(prog);
        cmd.args(&spec.argv[1..])
            .current_dir(spec.cwd.as_deref().unwrap_or("/"))
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        new_session(&mut cmd);
        let mut child = cmd.spawn().map_err(io_err(Path::new(prog)))?;
        let pid = child.id();
        // Reap it when it exits (e.g. killed by criu dump) so its PID is free for a rollback.
        thread::spawn(move || child.wait());
        st.workload = Some(Workload {
            spec,
            phase: Phase::Running { pid },
        });
        self.persist(&st);
        Ok(pid)
    }

    fn checkpoint(
        &self,
        conn: &mut dyn Connection,
        opts: &CheckpointOpts,
    ) -> Result<(), AgentError> {
        let mut st = self.lock();
        let (spec, pid) = match &st.workload {
            Some(Workload {
                spec,
                phase: Phase::Running { pid },
            }) if sys::alive(*pid) => (spec.clone(), *pid),
            _ => return Err(bad("no running workload to checkpoint")),
        };
        let page_server = match &opts.page_server {
            None => None,
            Some(_) if opts.pre_dump_rounds > 0 => {
                return Err(bad("page server with pre-dump rounds is not supported"));
            }
            Some(a) => {
                let (ip, port) = a
                    .rsplit_once(':')
                    .ok_or_else(|| bad(format!("page server address {a:?}")))?;
                let port: u16 = port
                    .parse()
                    .map_err(|_| bad(format!("page server port in {a:?}")))?;
                Some((ip.to_string(), port))
            }
        };
        let tree = sys::process_tree(pid);
        write_message(
            conn,
            &Response::CheckpointBegin {
                spec: spec.clone(),
                tree,
            },
        )?;
        let root = self.cfg.work_dir.join("checkpoint");
        let _ = fs::remove_dir_all(&root);
        let mut stats = CheckpointStats::default();
        let mut prev: Option<String> = None;
        for i in 0..opts.pre_dump_rounds {
            let name = format!("pre{i}");
            let dir = root.join(&name);
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            let took = criu::pre_dump(pid, &dir, prev.as_deref()).map_err(AgentError::Dump)?;
            stats.pre_dump_ms += u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
            stream_dir(conn, &dir, &name, &mut stats)?;
            prev = Some(format!("../{name}"));
        }
        let rules_before = if let Some(svc) = &spec.service {
            let r = net::rules_snapshot()?;
            net::guard_add(svc, &r)?;
            r
        } else {
            vec![]
        };
        let fin = root.join("final");
        let ps = page_server.as_ref().map(|(ip, port)| (ip.as_str(), *port));
        // A failed dump leaves the tree running (CRIU resumes it), so one retry is safe; seen here:
        // a rare ESRCH from PTRACE_INTERRUPT right after PTRACE_SEIZE. Not with a page server, which
        // serves a single dump.
        let attempts = if ps.is_some() { 1 } else { 2 };
        for attempt in 1..=attempts {
            let _ = fs::remove_dir_all(&fin);
            fs::create_dir_all(&fin).map_err(io_err(&fin))?;
            match criu::dump(pid, &fin, prev.as_deref(), ps) {
                Ok(took) => {
                    stats.freeze_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
                    break;
                }
                Err(e) if attempt < attempts && sys::alive(pid) => {
                    eprintln!("guest-agent: {}; retrying", error_chain(&e));
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    // CRIU resumed the tree; drop our guard and whatever CRIU left.
                    if let Some(svc) = &spec.service {
                        net::reset_rules(svc, &rules_before)?;
                    }
                    return Err(AgentError::Dump(e));
                }
            }
        }
        if let Some(w) = st.workload.as_mut() {
            w.phase = Phase::Dumped {
                images: fin.clone(),
                rules_before,
            };
        }
        self.persist(&st);
        let streamed = (|| {
            stream_dir(conn, &fin, "final", &mut stats)?;
            for f in &spec.data_files {
                let meta = fs::metadata(f).map_err(io_err(Path::new(f)))?;
                stats.data_bytes += meta.len();
                stream_file(conn, FileKind::Data, f, Path::new(f), &mut stats)?;
            }
            write_message(
                conn,
                &Response::CheckpointDone {
                    stats: stats.clone(),
                },
            )?;
            Ok::<(), AgentError>(())
        })();
        if let Err(e) = streamed {
            // The host is gone or the stream failed after the dump: resume the application here.
            match self.rollback_locked(&mut st) {
                Ok(pid) => {
                    eprintln!("guest-agent: checkpoint stream failed; rolled back (pid {pid})");
                }
                Err(r) => eprintln!(
                    "guest-agent: checkpoint stream failed and rollback failed: {}",
                    error_chain(&r)
                ),
            }
            return Err(e);
        }
        Ok(())
    }

    fn rollback_locked(&self, st: &mut State) -> Result<u32, AgentError> {
        let w = st
            .workload
            .as_mut()
            .ok_or_else(|| bad("no workload to roll back"))?;
        let pid = match &w.phase {
            Phase::Running { pid } => {
                // The dump never completed: CRIU already resumed the tree; only our guard may remain.
                if let Some(svc) = &w.spec.service {
                    net::guard_remove(svc)?;
                }
                *pid
            }
            Phase::Dumped {
                images,
                rules_before,
            } => {
                let (pid, _) = criu::restore(images).map_err(AgentError::Rollback)?;
                if let Some(svc) = &w.spec.service {
                    net::reset_rules(svc, rules_before)?;
                    net::announce(svc)?;
                }
                pid
            }
        };
        w.phase = Phase::Running { pid };
        self.persist(st);
        Ok(pid)
    }

    /// Completes the checkpoint kept for a rollback with streamed image files (page-server case).
    fn add_images(&self, conn: &mut dyn Connection) -> Result<(), AgentError> {
        let st = self.lock();
        let Some(Workload {
            spec,
            phase: Phase::Dumped { images, .. },
        }) = &st.workload
        else {
            return Err(bad("no checkpoint kept here to add images to"));
        };
        let root = images.parent().unwrap_or(images).to_path_buf();
        // Images only: a spec without data files makes any data file in the stream a bad request.
        let images_only = WorkloadSpec {
            data_files: vec![],
            ..spec.clone()
        };
        let mut none = Vec::new();
        receive_files(conn, &root, &images_only, &mut none)
    }

    fn release(&self) -> Result<(), AgentError> {
        let mut st = self.lock();
        let Some(Workload {
            spec,
            phase:
                Phase::Dumped {
                    images,
                    rules_before,
                },
        }) = &st.workload
        else {
            return Err(bad("nothing to release: no checkpointed workload"));
        };
        if let Some(svc) = &spec.service {
            net::addr_del(svc)?;
            net::reset_rules(svc, rules_before)?;
        }
        if let Some(root) = images.parent() {
            let _ = fs::remove_dir_all(root);
        }
        st.workload = None;
        self.persist(&st);
        Ok(())
    }

    fn restore_dir(&self) -> PathBuf {
        self.cfg.work_dir.join("restore")
    }

    fn start_page_server(&self, port: u16) -> Result<(), AgentError> {
        let mut st = self.lock();
        if let Some(mut c) = st.page_server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let root = self.restore_dir();
        let _ = fs::remove_dir_all(&root);
        let fin = root.join("final");
        fs::create_dir_all(&fin).map_err(io_err(&fin))?;
        st.page_server = Some(criu::page_server(&fin, port).map_err(AgentError::Restore)?);
        Ok(())
    }

    fn restore(
        &self,
        conn: &mut dyn Connection,
        spec: WorkloadSpec,
        tree: &[u32],
        drop_data_file: bool,
    ) -> Result<(), AgentError> {
        let mut st = self.lock();
        if let Some(Workload {
            phase: Phase::Running { pid },
            ..
        }) = &st.workload
            && sys::alive(*pid)
        {
            return Err(bad(format!("a workload already runs here (pid {pid})")));
        }
        let root = self.restore_dir();
        let page_server = st.page_server.take();
        if page_server.is_none() {
            let _ = fs::remove_dir_all(&root);
        }
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        let mut incoming: Vec<(PathBuf, PathBuf)> = Vec::new();
        if let Err(e) = receive_files(conn, &root, &spec, &mut incoming) {
            for (tmp, _) in &incoming {
                let _ = fs::remove_file(tmp);
            }
            match page_server {
                // Keep what the page server received: the source needs it back for a rollback.
                Some(mut c) => wait_child(&mut c, Duration::from_secs(10)),
                None => {
                    let _ = fs::remove_dir_all(&root);
                }
            }
            return Err(e);
        }
        if let Some(mut c) = page_server {
            wait_child(&mut c, Duration::from_secs(60));
        }
        // CRIU restores every task under its old PID: refuse up front, with the PIDs named, if
        // one is taken here (CRIU would fail later with "Can't fork for N: File exists").
        let taken: Vec<u32> = tree
            .iter()
            .copied()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists())
            .collect();
        if !taken.is_empty() {
            for (tmp, _) in &incoming {
                let _ = fs::remove_file(tmp);
            }
            return Err(AgentError::PidsTaken(taken));
        }
        // Helpers spawned from here on (iptables, ip, criu) must not take PIDs of the tree.
        if let (Some(lo), Some(hi), Some(last)) =
            (tree.iter().min(), tree.iter().max(), sys::last_pid())
            && (lo.saturating_sub(1)..*hi).contains(&last)
        {
            sys::set_next_pid(hi + 1)?;
        }
        // On failure the images stay for inspection (the next restore replaces them).
        let (pid, took) = self.restore_received(&root, &spec, &incoming, drop_data_file)?;
        let _ = fs::remove_dir_all(&root);
        st.workload = Some(Workload {
            spec,
            phase: Phase::Running { pid },
        });
        self.persist(&st);
        write_message(
            conn,
            &Response::Restored {
                pid,
                restore_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            },
        )?;
        Ok(())
    }

    fn restore_received(
        &self,
        root: &Path,
        spec: &WorkloadSpec,
        incoming: &[(PathBuf, PathBuf)],
        drop_data_file: bool,
    ) -> Result<(u32, Duration), AgentError> {
        let rules_before = match &spec.service {
            Some(svc) => {
                let r = net::rules_snapshot()?;
                // Guard first: no packet for the service address may reach a socket-less stack (RST).
                net::guard_add(svc, &r)?;
                net::addr_add(svc)?;
                r
            }
            None => vec![],
        };
        let undo_net = || -> Result<(), AgentError> {
            if let Some(svc) = &spec.service {
                net::addr_del(svc)?;
                net::reset_rules(svc, &rules_before)?;
            }
            Ok(())
        };
        for (tmp, dst) in incoming {
            if let Err(e) = fs::rename(tmp, dst) {
                undo_net()?;
                return Err(io_err(dst)(e));
            }
        }
        // Fault injection (tests): the restore finds a data file missing.
        if drop_data_file && let Some(f) = spec.data_files.first() {
            let _ = fs::remove_file(f);
        }
        match criu::restore(&root.join("final")) {
            Ok((pid, took)) => {
                if let Some(svc) = &spec.service {
                    net::reset_rules(svc, &rules_before)?;
                    net::announce(svc)?;
                }
                Ok((pid, took))
            }
            Err(e) => {
                undo_net()?;
                Err(AgentError::Restore(e))
            }
        }
    }
}

/// Longest a peer may stall an image stream before the agent gives up on it (and cleans up or
/// rolls back).
const STREAM_IDLE: Duration = Duration::from_secs(120);

/// Runs `f` with read and write timeouts of [`STREAM_IDLE`] on the connection, so a stalled host
/// cannot hold the agent (and its workload state) forever.
fn with_stream_timeouts(
    conn: &mut dyn Connection,
    f: impl FnOnce(&mut dyn Connection) -> Result<(), AgentError>,
) -> Result<(), AgentError> {
    let set = |c: &dyn Connection, t| c.set_read_timeout(t).and_then(|()| c.set_write_timeout(t));
    set(conn, Some(STREAM_IDLE)).map_err(|e| AgentError::Protocol(ProtocolError::Io(e)))?;
    let r = f(conn);
    // Back to blocking for the next request on this connection; a failure here breaks it anyway.
    let _ = set(conn, None);
    r
}

/// Makes the child a session leader (no controlling terminal), as CRIU needs for a non-shell job.
fn new_session(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls setsid(2), which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
}

fn wait_child(c: &mut Child, limit: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}
