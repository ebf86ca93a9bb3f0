//! The control API of a running `microvmm`: HTTP/1.1 with JSON bodies on a Unix socket
//! (`microvmm run --api-socket PATH`), in the style of Firecracker's API, served by `tiny_http`
//! on its own thread. The VM stays in the run loop's hands; requests take it briefly (an
//! upgrade, on its own thread, for the upgrade's length).
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | the instance: state, vCPUs, memory, devices, disks with their layer chains |
//! | `PATCH /vm` `{"state": "Paused"｜"Resumed"}` | 204 |
//! | `PUT /snapshot/create` `{"snapshot_path": DIR}` | 204 (the VM must be paused) |
//! | `PUT /snapshot/create` `{"snapshot_path": DIR, "vsock_handover": PATH}` | 200 `{"vsock_connections": N, ...}` once the restoring process (`run --restore DIR --handover PATH`) took the connections; the VM stops and `run` ends |
//! | `PUT /upgrade` (an upgrade plan) | 202; `GET /upgrade` follows it; `DELETE /upgrade` cancels (409 past the commit point) |
//! | `PUT /actions` `{"action_type": "Stop"}` | 204, the VM stops and `run` ends |
//! | `GET /metrics` | counters: API requests and errors, upgrades with their last duration, cutover and clone pause, vCPU exits by kind, virtio requests/packets and bytes per device, journal flushes per disk |
//!
//! Errors are `{"fault_message": "..."}` with 400 (malformed body, the field named), 404, 405,
//! 409 (the state forbids it) or 413 (body over 64 KiB).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use tiny_http::{Header, Method, Request, Response, Server};
use vmm::Machine;
use vmm::machine::VmState;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 << 10;

/// Errors setting the API up.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Something other than a stale socket is at the path.
    #[error("{0} exists and is not a stale socket: refusing to replace it")]
    PathTaken(PathBuf),
    /// Another process serves on the socket.
    #[error("{0} is in use by another process")]
    InUse(PathBuf),
    /// Creating the socket failed.
    #[error("cannot serve the API on {path}: {reason}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// How an upgrade started through the API is going.
#[derive(Debug, Default)]
struct UpgradeState {
    /// `running`, `succeeded`, `failed`, or `rolled-back`.
    state: Option<&'static str>,
    phase: Option<upgrade::Phase>,
    /// (phase, ms since the upgrade started).
    timeline: Vec<(upgrade::Phase, f64)>,
    progress: Option<(u64, u64)>,
    report: Option<Value>,
    error: Option<String>,
    cancel: Option<Arc<AtomicBool>>,
    thread: Option<JoinHandle<()>>,
}

/// What the run loop and the API share.
#[derive(Debug)]
pub struct Shared {
    machine: Mutex<Machine>,
    upgrade: Mutex<UpgradeState>,
    /// Set when a `Stop` action was taken: the run loop ends.
    stopped: AtomicBool,
    requests: AtomicU64,
    errors: AtomicU64,
    upgrades: AtomicU64,
    last_upgrade_ms: AtomicU64,
    last_cutover_us: AtomicU64,
    last_clone_pause_us: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Wraps a started machine.
    pub fn new(machine: Machine) -> Arc<Self> {
        Arc::new(Self {
            machine: Mutex::new(machine),
            upgrade: Mutex::default(),
            stopped: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            upgrades: AtomicU64::new(0),
            last_upgrade_ms: AtomicU64::new(0),
            last_cutover_us: AtomicU64::new(0),
            last_clone_pause_us: AtomicU64::new(0),
        })
    }

    /// The machine (the run loop waits on it in short slices).
    pub fn machine(&self) -> MutexGuard<'_, Machine> {
        lock(&self.machine)
    }

    /// Whether a `Stop` action ended the VM.
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Waits for a running upgrade's thread (before the process exits).
    pub fn join_upgrade(&self) {
        let t = lock(&self.upgrade).thread.take();
        if let Some(t) = t
            && t.join().is_err()
        {
            tracing::error!("the upgrade thread panicked");
        }
    }
}

/// The API server thread.
pub struct Api {
    server: Arc<Server>,
    thread: Option<JoinHandle<()>>,
    /// Hands the machine to the thread ([`Api::serve`]); dropped, it ends the thread.
    shared_tx: Option<std::sync::mpsc::SyncSender<Arc<Shared>>>,
    path: PathBuf,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.server.unblock();
        self.shared_tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Makes `path` free for a new socket: nothing there, or a stale socket (removed). A live
/// socket or any other file is refused.
fn claim(path: &Path) -> Result<(), ApiError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(|e| ApiError::Bind {
                path: path.to_owned(),
                reason: format!("cannot remove the stale socket: {e}"),
            })
        }
        Ok(_) => Err(ApiError::PathTaken(path.to_owned())),
    }
}

impl Api {
    /// Binds the API socket at `path` (mode 0600) and starts the API thread (under the API
    /// seccomp filter when the sandbox is on), which answers once [`Api::serve`] gives it the
    /// machine.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        use std::os::unix::fs::PermissionsExt;
        claim(path)?;
        let bind = |reason: String| ApiError::Bind {
            path: path.to_owned(),
            reason,
        };
        // Bound in a private directory, made 0600, then renamed into place: the socket is never
        // reachable at `path` with looser permissions.
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        let staging = parent
            .unwrap_or(Path::new("."))
            .join(format!(".microvmm-api-{}", std::process::id()));
        std::fs::create_dir(&staging)
            .map_err(|e| bind(format!("cannot create {}: {e}", staging.display())))?;
        let made = (|| {
            std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| e.to_string())?;
            let tmp = staging.join("api.sock");
            let (server, thread, shared_tx) = spawn_server(tmp.clone())?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("cannot make it private: {e}"))?;
            std::fs::rename(&tmp, path).map_err(|e| format!("cannot move it into place: {e}"))?;
            Ok::<_, String>((server, thread, shared_tx))
        })();
        if let Err(e) = std::fs::remove_dir_all(&staging) {
            tracing::warn!("cannot remove {}: {e}", staging.display());
        }
        let (server, thread, shared_tx) = made.map_err(bind)?;
        tracing::info!(path = %path.display(), "API listening");
        Ok(Self {
            server,
            thread: Some(thread),
            shared_tx: Some(shared_tx),
            path: path.to_owned(),
        })
    }

    /// Starts answering requests about `shared`'s machine.
    pub fn serve(&mut self, shared: Arc<Shared>) {
        if let Some(tx) = self.shared_tx.take() {
            // Fails only if the thread ended, when nobody is left to answer anyway.
            let _ = tx.send(shared);
        }
    }
}

type ServerThread = (
    Arc<Server>,
    JoinHandle<()>,
    std::sync::mpsc::SyncSender<Arc<Shared>>,
);

/// Starts the API thread, which listens on `tmp` (tiny_http starts its own threads from there,
/// so they run under the API filter too), then waits for the machine and answers requests.
fn spawn_server(tmp: PathBuf) -> Result<ServerThread, String> {
    let (server_tx, server_rx) = std::sync::mpsc::sync_channel(1);
    let (shared_tx, shared_rx) = std::sync::mpsc::sync_channel::<Arc<Shared>>(1);
    let thread = sandbox::spawn(
        sandbox::ThreadKind::Api,
        std::thread::Builder::new().name("api".into()),
        move || {
            let server = match Server::http_unix(&tmp) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    let _ = server_tx.send(Err(e.to_string()));
                    return;
                }
            };
            if server_tx.send(Ok(Arc::clone(&server))).is_err() {
                return;
            }
            let Ok(shared) = shared_rx.recv() else {
                return;
            };
            for req in server.incoming_requests() {
                handle(&shared, req);
            }
        },
    )
    .map_err(|e| format!("cannot start the API thread: {e}"))?;
    let server = server_rx
        .recv()
        .map_err(|_| "the API thread ended at start".to_string())??;
    Ok((server, thread, shared_tx))
}

/// One answer: status and JSON body (`None`: no body).
struct Answer(u16, Option<Value>);

fn fault(status: u16, msg: impl std::fmt::Display) -> Answer {
    Answer(status, Some(json!({ "fault_message": msg.to_string() })))
}

fn handle(shared: &Arc<Shared>, mut req: Request) {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    let url = req.url().split('?').next().unwrap_or("").to_string();
    let body = read_body(&mut req);
    let answer = match body {
        Err(a) => a,
        Ok(body) => route(shared, &method, &url, &body),
    };
    if answer.0 >= 400 {
        shared.errors.fetch_add(1, Ordering::Relaxed);
    }
    tracing::info!(%method, url, status = answer.0, "API request");
    let resp = match answer.1 {
        Some(v) => Response::from_string(v.to_string())
            .with_status_code(answer.0)
            .with_header(
                Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
                    .unwrap_or_else(|()| unreachable_header()),
            )
            .boxed(),
        None => Response::empty(answer.0).boxed(),
    };
    if let Err(e) = req.respond(resp) {
        tracing::debug!("API client went away: {e}");
    }
}

fn unreachable_header() -> Header {
    // A constant, valid header: from_bytes cannot fail on it.
    Header {
        field: "Content-Type".parse().unwrap_or_else(|_| unreachable!()),
        value: "application/json"
            .parse()
            .unwrap_or_else(|_| unreachable!()),
    }
}

fn read_body(req: &mut Request) -> Result<Vec<u8>, Answer> {
    if req.body_length().is_some_and(|n| n > MAX_BODY) {
        return Err(fault(413, format!("request body over {MAX_BODY} bytes")));
    }
    let mut body = Vec::new();
    let r = req
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body);
    if let Err(e) = r {
        return Err(fault(400, format!("cannot read the request body: {e}")));
    }
    if body.len() > MAX_BODY {
        return Err(fault(413, format!("request body over {MAX_BODY} bytes")));
    }
    Ok(body)
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Answer> {
    serde_json::from_slice(body).map_err(|e| fault(400, format!("malformed body: {e}")))
}

fn route(shared: &Arc<Shared>, method: &Method, url: &str, body: &[u8]) -> Answer {
    let allowed: &[Method] = match url {
        "/" | "/metrics" => &[Method::Get],
        "/vm" => &[Method::Patch],
        "/snapshot/create" | "/actions" => &[Method::Put],
        "/upgrade" => &[Method::Put, Method::Get, Method::Delete],
        _ => return fault(404, format!("no such resource: {url}")),
    };
    if !allowed.contains(method) {
        return fault(405, format!("{method} is not allowed on {url}"));
    }
    let r = match (method, url) {
        (Method::Get, "/") => Ok(Answer(200, Some(instance(shared)))),
        (Method::Get, "/metrics") => Ok(Answer(200, Some(metrics(shared)))),
        (Method::Patch, "/vm") => patch_vm(shared, body),
        (Method::Put, "/snapshot/create") => snapshot(shared, body),
        (Method::Put, "/actions") => action(shared, body),
        (Method::Put, "/upgrade") => start_upgrade(shared, body),
        (Method::Get, "/upgrade") => Ok(Answer(200, Some(upgrade_status(shared)))),
        (Method::Delete, "/upgrade") => cancel_upgrade(shared),
        _ => Err(fault(405, format!("{method} is not allowed on {url}"))),
    };
    r.unwrap_or_else(|a| a)
}

/// The machine, unless an upgrade holds it (then 409).
fn machine(shared: &Shared) -> Result<MutexGuard<'_, Machine>, Answer> {
    let end = Instant::now() + Duration::from_millis(200);
    loop {
        if let Ok(m) = shared.machine.try_lock() {
            return Ok(m);
        }
        if Instant::now() > end {
            return Err(fault(409, "the VM is busy (an upgrade is running)"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn chain(layer: &block::Layer) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cur = Some(layer);
    // Chains are short; the bound only guards against a malformed one.
    for _ in 0..64 {
        let Some(l) = cur else { break };
        match l.as_delta() {
            Some(d) => {
                out.push(json!({
                    "kind": "delta",
                    "path": d.path(),
                    "read_only": d.is_read_only(),
                    "last_seq": d.last_seq(),
                    "durable_seq": d.durable_seq(),
                    "frozen_seq": d.frozen_seq(),
                }));
                cur = Some(d.parent().as_ref());
            }
            None => {
                out.push(json!({ "kind": "base", "path": l.path() }));
                cur = None;
            }
        }
    }
    out
}

fn instance(shared: &Shared) -> Value {
    let up = lock(&shared.upgrade).state;
    let Ok(m) = machine(shared) else {
        return json!({ "state": "Upgrading", "upgrade": up });
    };
    let cfg = m.config();
    json!({
        "state": format!("{:?}", m.state()),
        "vcpus": cfg.vcpus,
        "mem_mib": cfg.mem_mib,
        "kernel": cfg.kernel,
        "devices": m.virtio_devices().iter().map(|d| json!({
            "mmio_base": d.addr, "len": d.len, "irq": d.irq,
        })).collect::<Vec<_>>(),
        "vsock": cfg.vsock.as_ref().map(|v| json!({
            "guest_cid": v.guest_cid,
            // The socket the device answers on now (an upgraded VM answers on its
            // predecessor's).
            "uds_path": m.vsock_uds_path().unwrap_or_else(|| v.uds_path.clone()),
        })),
        "disks": m.disks().iter().map(|d| json!({
            "path": d.layer.path(),
            "size": d.layer.size(),
            "chain": chain(&d.layer),
        })).collect::<Vec<_>>(),
        // The TAP each NIC is on now (an upgraded VM is on its predecessor's).
        "net": m.nets().iter().map(|n| json!({
            "iface_id": n.iface_id,
            "host_dev_name": n.handle.tap_name(),
            "guest_mac": n.handle.mac(),
        })).collect::<Vec<_>>(),
        "upgrade": up,
    })
}

fn metrics(shared: &Shared) -> Value {
    let vm = machine(shared).ok().map(|m| {
        let exits: serde_json::Map<String, Value> = m
            .exit_counters()
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let devices: Vec<Value> = m
            .virtio_transports()
            .iter()
            .map(|t| {
                let t = lock(t);
                let counters: serde_json::Map<String, Value> = t
                    .counters()
                    .map(|c| c.snapshot())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), json!(v)))
                    .collect();
                json!({ "device_type": t.device_type(), "counters": counters })
            })
            .collect();
        let disks: Vec<Value> = m
            .disks()
            .iter()
            .map(|d| {
                json!({
                    "path": d.layer.path(),
                    "journal_flushes": d.layer.as_delta().map(block::Delta::flush_count),
                })
            })
            .collect();
        json!({ "vcpu_exits": exits, "virtio": devices, "disks": disks })
    });
    json!({
        "api_requests": shared.requests.load(Ordering::Relaxed),
        "api_errors": shared.errors.load(Ordering::Relaxed),
        "upgrades": shared.upgrades.load(Ordering::Relaxed),
        "last_upgrade_ms": shared.last_upgrade_ms.load(Ordering::Relaxed),
        "last_cutover_us": shared.last_cutover_us.load(Ordering::Relaxed),
        "last_clone_pause_us": shared.last_clone_pause_us.load(Ordering::Relaxed),
        // Absent while an upgrade holds the VM.
        "vm": vm,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmPatch {
    state: VmTarget,
}

#[derive(Deserialize)]
enum VmTarget {
    Paused,
    Resumed,
}

fn conflict(e: vmm::MachineError) -> Answer {
    match e {
        e @ (vmm::MachineError::InvalidTransition { .. } | vmm::MachineError::NotRunning(_)) => {
            fault(409, e)
        }
        e => fault(500, error_chain(&e)),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

fn patch_vm(shared: &Shared, body: &[u8]) -> Result<Answer, Answer> {
    let p: VmPatch = parse(body)?;
    let mut m = machine(shared)?;
    match p.state {
        VmTarget::Paused => m.pause().map_err(conflict)?,
        VmTarget::Resumed => m.resume().map_err(conflict)?,
    }
    Ok(Answer(204, None))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotCreate {
    snapshot_path: PathBuf,
    /// Hand the vsock connections to the process that restores the snapshot
    /// (`microvmm run --restore DIR --handover PATH`), which connects to this socket.
    #[serde(default)]
    vsock_handover: Option<PathBuf>,
}

fn snapshot(shared: &Shared, body: &[u8]) -> Result<Answer, Answer> {
    let p: SnapshotCreate = parse(body)?;
    let mut m = machine(shared)?;
    if m.state() != VmState::Paused {
        return Err(fault(
            409,
            format!("the VM is {:?}: pause it first (PATCH /vm)", m.state()),
        ));
    }
    let Some(path) = p.vsock_handover else {
        m.save_snapshot(&p.snapshot_path)
            .map_err(|e| fault(500, error_chain(&e)))?;
        return Ok(Answer(204, None));
    };
    if m.vsock().is_none() {
        return Err(fault(
            400,
            "vsock_handover: the VM has no vsock device, nothing to hand over",
        ));
    }
    crate::handover::check_path(&path).map_err(|e| fault(400, format!("vsock_handover: {e}")))?;
    let (meta, h) = m
        .save_snapshot_handover(&p.snapshot_path)
        .map_err(|e| fault(500, error_chain(&e)))?;
    // The connections belong to the snapshot now: this VM must not run on with them.
    m.stop().map_err(|e| fault(500, error_chain(&e)))?;
    shared.stopped.store(true, Ordering::SeqCst);
    drop(m);
    tracing::info!(
        snapshot = %p.snapshot_path.display(),
        handover = %path.display(),
        connections = h.len(),
        "snapshot written, VM stopped; waiting for the restoring process (API)"
    );
    crate::handover::send(&path, &h).map_err(|e| {
        fault(
            500,
            format!(
                "the snapshot is in {} and the VM stopped, but the handover failed: {e}",
                p.snapshot_path.display()
            ),
        )
    })?;
    Ok(Answer(
        200,
        Some(json!({
            "snapshot_path": p.snapshot_path,
            "vcpus": meta.vcpus,
            "mem_size": meta.mem_size,
            "vsock_connections": h.len(),
        })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Action {
    action_type: ActionType,
}

#[derive(Deserialize)]
enum ActionType {
    Stop,
    Shutdown,
}

fn action(shared: &Shared, body: &[u8]) -> Result<Answer, Answer> {
    let a: Action = parse(body)?;
    match a.action_type {
        // The ACPI power button: the guest decides (and `run` ends when it has powered off).
        ActionType::Shutdown => {
            let m = machine(shared)?;
            m.press_power_button().map_err(conflict)?;
            tracing::info!("power button pressed (API)");
            Ok(Answer(204, None))
        }
        ActionType::Stop => {
            let mut m = machine(shared)?;
            m.stop().map_err(conflict)?;
            shared.stopped.store(true, Ordering::SeqCst);
            Ok(Answer(204, None))
        }
    }
}

fn start_upgrade(shared: &Arc<Shared>, body: &[u8]) -> Result<Answer, Answer> {
    let text = std::str::from_utf8(body).map_err(|_| fault(400, "the body is not UTF-8"))?;
    let plan = upgrade::UpgradePlan::from_json(text, Path::new("request body"))
        .map_err(|e| fault(400, e))?;
    let mut up = lock(&shared.upgrade);
    if up.state == Some("running") {
        return Err(fault(409, "an upgrade is already running"));
    }
    // Check the plan against the machine before answering.
    let connector: Arc<dyn upgrade::AgentConnector> = {
        let m = machine(shared)?;
        plan.validate(&m).map_err(|e| fault(400, e))?;
        if m.state() != VmState::Running {
            return Err(fault(
                409,
                format!("the VM is {:?}, not running", m.state()),
            ));
        }
        connector_for(&m)
    };
    if let Some(t) = up.thread.take() {
        let _ = t.join();
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut opts = upgrade::UpgradeOptions::new(connector);
    opts.cancel = Some(cancel.clone());
    let events = Arc::clone(shared);
    opts.on_event = Some(Arc::new(move |e: &upgrade::Event| {
        let mut up = lock(&events.upgrade);
        match *e {
            upgrade::Event::Phase(p) => {
                tracing::info!(phase = p.name(), "upgrade phase (API)");
                up.phase = Some(p);
                up.progress = None;
                up.timeline.push((p, start.elapsed().as_secs_f64() * 1e3));
            }
            upgrade::Event::MergeProgress { done, total, .. } => up.progress = Some((done, total)),
        }
    }));
    let worker = Arc::clone(shared);
    let thread = std::thread::Builder::new()
        .name("upgrade".into())
        .spawn(move || {
            let result = {
                let mut m = lock(&worker.machine);
                upgrade::run(&mut m, &plan, &opts)
            };
            let mut up = lock(&worker.upgrade);
            match result {
                Ok(report) => {
                    worker.upgrades.fetch_add(1, Ordering::Relaxed);
                    worker
                        .last_upgrade_ms
                        .store(saturating_u64(report.total.as_millis()), Ordering::Relaxed);
                    worker.last_cutover_us.store(
                        saturating_u64(report.cutover.as_micros()),
                        Ordering::Relaxed,
                    );
                    worker.last_clone_pause_us.store(
                        saturating_u64(report.clone_pause.as_micros()),
                        Ordering::Relaxed,
                    );
                    up.state = Some("succeeded");
                    up.report = serde_json::to_value(&report).ok();
                }
                Err(e) => {
                    up.state = Some(if e.rolled_back() {
                        "rolled-back"
                    } else {
                        "failed"
                    });
                    up.error = Some(error_chain(&e));
                }
            }
        })
        .map_err(|e| fault(500, format!("cannot start the upgrade thread: {e}")))?;
    *up = UpgradeState {
        state: Some("running"),
        cancel: Some(cancel),
        thread: Some(thread),
        ..UpgradeState::default()
    };
    Ok(Answer(202, Some(json!({ "state": "running" }))))
}

/// The test guest `service` has its own agent; every other guest runs `guest-agent`.
fn connector_for(m: &Machine) -> Arc<dyn upgrade::AgentConnector> {
    match &m.config().kernel {
        vmm::config::KernelSource::TestGuest(name)
            if name == upgrade::service_guest::GUEST_NAME =>
        {
            Arc::new(upgrade::service_agent::ServiceConnector)
        }
        _ => Arc::new(upgrade::criu_agent::CriuConnector::default()),
    }
}

/// A duration count for the metrics, saturating at `u64::MAX`.
fn saturating_u64(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

fn upgrade_status(shared: &Shared) -> Value {
    let up = lock(&shared.upgrade);
    json!({
        "state": up.state.unwrap_or("none"),
        "phase": up.phase,
        "progress": up.progress.map(|(d, t)| json!({"done": d, "total": t})),
        "timeline": up.timeline.iter().map(|(p, ms)| json!({"phase": p, "at_ms": ms})).collect::<Vec<_>>(),
        "report": up.report,
        "error": up.error,
    })
}

fn cancel_upgrade(shared: &Shared) -> Result<Answer, Answer> {
    let up = lock(&shared.upgrade);
    if up.state != Some("running") {
        return Err(fault(409, "no upgrade is running"));
    }
    if up.phase.is_some_and(|p| p >= upgrade::Phase::Resume) {
        return Err(fault(
            409,
            "the upgrade is past its commit point: it cannot be cancelled",
        ));
    }
    if let Some(c) = &up.cancel {
        c.store(true, Ordering::SeqCst);
    }
    Ok(Answer(202, Some(json!({ "state": "cancelling" }))))
}

/// Runs a started machine with the bound `api` until the guest stops or a `Stop` action
/// ends it (the `run` loop with `--api-socket`).
pub fn run_until_stopped(
    machine: Machine,
    mut api: Api,
) -> Result<std::process::ExitCode, Box<dyn std::error::Error>> {
    let shared = Shared::new(machine);
    api.serve(Arc::clone(&shared));
    eprintln!("microvmm: API on {}", api.path.display());
    let reason = loop {
        if shared.stopped() {
            break Ok(vmm::StopReason::Stopped);
        }
        // Short slices, so the API gets the machine between them.
        let r = shared.machine().wait(Some(Duration::from_millis(20)));
        match r {
            Err(vmm::MachineError::Timeout(_)) => std::thread::sleep(Duration::from_millis(5)),
            Err(vmm::MachineError::InvalidTransition { .. }) if shared.stopped() => {
                break Ok(vmm::StopReason::Stopped);
            }
            other => break other,
        }
    };
    drop(api);
    shared.join_upgrade();
    match reason? {
        vmm::StopReason::Halted => Err("the guest halted with nothing to wake it".into()),
        _ => Ok(std::process::ExitCode::SUCCESS),
    }
}
