//! The embedded demo: boots the `service` test guest on a disk in a temporary directory, keeps
//! a client sending requests for the whole upgrade, upgrades the guest's "OS" live, then checks
//! the disk and the client's view. `microvmm upgrade` with no arguments runs it; the tests and
//! the benchmark run it too.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::legacy::{SerialOutput, SharedBuffer};
use vmm::Machine;

use crate::plan::{Command, DiskPlan, MergePolicy, OwnedRange, Owner, Size, UpgradePlan, Workload};
use crate::service_agent::ServiceConnector;
use crate::service_guest::{self, ServiceAgent, ServiceClient};
use crate::{UpgradeError, UpgradeOptions, UpgradeReport};

/// Errors of the demo (besides the upgrade's own).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Setting the VM up failed.
    #[error("demo setup: {0}")]
    Setup(String),
    /// The upgrade failed.
    #[error(transparent)]
    Upgrade(#[from] Box<UpgradeError>),
    /// The client saw an error.
    #[error("client: {0}")]
    Client(String),
    /// The disk check failed.
    #[error("disk check: {0}")]
    Disk(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DemoError + use<'_, E> {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

/// Size of the demo VM's disk.
pub const DISK_SIZE: u64 = 64 << 20;
/// The demo VM's RAM, MiB.
pub const MEM_MIB: u64 = 64;
/// The demo VM's vsock CID.
pub const CID: u64 = 3;

/// The client's view of the service over the whole run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ClientStats {
    /// Requests answered.
    pub requests: u64,
    /// Longest time between two replies.
    #[serde(serialize_with = "ser_ms")]
    pub gap: Duration,
    /// Errors (bad checksum, connection lost, ...).
    pub errors: u64,
    /// Replies out of order.
    pub out_of_order: u64,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// The upgrade phase during which the longest gap ended (`before`/`after` the upgrade).
    pub gap_phase: Option<String>,
    /// When the longest gap ended.
    #[serde(skip)]
    pub gap_end: Option<Instant>,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

impl ClientStats {
    /// The line the demo prints.
    pub fn line(&self) -> String {
        format!(
            "client gap: {:.2} ms (longest time between two replies{}), {} requests, {} errors, {} out of order",
            self.gap.as_secs_f64() * 1e3,
            self.gap_phase
                .as_ref()
                .map_or(String::new(), |p| format!(", ending in phase {p}")),
            self.requests,
            self.errors,
            self.out_of_order
        )
    }
}

/// A host client that sends requests without pause until stopped.
#[derive(Debug)]
pub struct Client {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(u64, u64)>>>,
    thread: Option<JoinHandle<ClientStats>>,
}

impl Client {
    /// Connects to the service at `uds` and starts sending.
    pub fn start(uds: &Path, port: u32) -> Result<Self, DemoError> {
        let mut c = ServiceClient::connect(uds, port, Duration::from_secs(10))
            .map_err(setup("client connect"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (stop2, acked2) = (stop.clone(), acked.clone());
        let thread = std::thread::Builder::new()
            .name("demo-client".into())
            .spawn(move || {
                let mut st = ClientStats::default();
                let mut last = Instant::now();
                let mut value = 0x5eed_u64;
                let mut expect_seq = 1;
                while !stop2.load(Ordering::Relaxed) {
                    value = value
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    match c.request(value) {
                        Ok(r) => {
                            let now = Instant::now();
                            if now - last > st.gap {
                                st.gap = now - last;
                                st.gap_end = Some(now);
                            }
                            last = now;
                            st.requests += 1;
                            if r.seq != expect_seq {
                                st.out_of_order += 1;
                            }
                            expect_seq = r.seq + 1;
                            acked2
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push((r.seq, value));
                        }
                        Err(e) => {
                            st.errors += 1;
                            st.first_error.get_or_insert_with(|| e.to_string());
                            break;
                        }
                    }
                }
                st
            })
            .map_err(setup("client thread"))?;
        Ok(Self {
            stop,
            acked,
            thread: Some(thread),
        })
    }

    /// Requests answered so far.
    pub fn answered(&self) -> usize {
        self.acked.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether the client is still sending (it stops at its first error).
    pub fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Waits until at least `n` requests were answered (or `limit` passes).
    pub fn wait_for(&self, n: usize, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while self.answered() < n {
            if Instant::now() > end || self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Stops the client; its statistics and every acknowledged `(seq, value)`.
    pub fn finish(mut self) -> (ClientStats, Vec<(u64, u64)>) {
        self.stop.store(true, Ordering::Relaxed);
        let st = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_else(|| ClientStats {
                errors: 1,
                first_error: Some("the client thread panicked".into()),
                ..ClientStats::default()
            });
        let acked = std::mem::take(&mut *self.acked.lock().unwrap_or_else(|p| p.into_inner()));
        (st, acked)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A running demo VM.
#[derive(Debug)]
pub struct DemoVm {
    /// The machine.
    pub machine: Machine,
    /// Its serial output.
    pub serial: SharedBuffer,
    /// The vsock host socket.
    pub uds: PathBuf,
    /// Its disk (a delta directory).
    pub disk: PathBuf,
}

/// Boots the `service` guest on a fresh disk in `dir` and waits for its agent.
pub fn boot(dir: &Path) -> Result<DemoVm, DemoError> {
    boot_with(dir, Vec::new())
}

/// Like [`boot`], with network devices `net` as well (the guest does not drive them; they sit
/// between its disk and its vsock device, whose address it is told).
pub fn boot_with(dir: &Path, net: Vec<vmm::config::NetConfig>) -> Result<DemoVm, DemoError> {
    let disk =
        service_guest::ServiceVmConfig::create_disk(dir, DISK_SIZE).map_err(setup("disk"))?;
    let uds = dir.join("service.vsock");
    let mut cfg = service_guest::ServiceVmConfig::config(&disk, &uds, CID, MEM_MIB);
    let slots = 1 + net.len() as u64;
    cfg.net = net;
    let serial = SharedBuffer::default();
    let mut machine =
        Machine::new(cfg, Some(SerialOutput::Buffer(serial.clone()))).map_err(setup("machine"))?;
    machine.boot().map_err(setup("boot"))?;
    // The vsock device comes after the disk and the NICs, one MMIO window each.
    let base = vmm::layout::VIRTIO_MMIO_START + slots * vmm::layout::VIRTIO_MMIO_SIZE;
    let sym = vmm_test_guests::TestGuest::by_name(service_guest::GUEST_NAME)
        .and_then(|g| g.symbol("shared_vsock_base"))
        .map_err(setup("guest symbols"))?;
    vm_memory::Bytes::write_obj(machine.memory(), base, vm_memory::GuestAddress(sym))
        .map_err(setup("guest memory"))?;
    machine.start().map_err(setup("start"))?;
    // The agent answers once the guest has brought its devices up.
    let mut agent = ServiceAgent::connect(
        &uds,
        service_guest::DEFAULT_AGENT_PORT,
        Duration::from_secs(10),
    )
    .map_err(setup("agent"))?;
    agent.status().map_err(setup("agent status"))?;
    Ok(DemoVm {
        machine,
        serial,
        uds,
        disk,
    })
}

/// The demo's plan: the guest's "OS upgrade" command, the OS region owned by the upgrade and
/// the log region by the active VM, the service's vsock port moved.
pub fn plan(work_dir: &Path) -> UpgradePlan {
    UpgradePlan {
        prepare_commands: Vec::new(),
        cutover_commands: Vec::new(),
        commands: vec![Command {
            argv: vec!["upgrade".into()],
            timeout_ms: 30_000,
        }],
        restart: None,
        disks: vec![DiskPlan {
            ownership: vec![
                OwnedRange {
                    offset: Size(0),
                    len: Some(Size(service_guest::OS_REGION_LEN)),
                    owner: Owner::Upgrade,
                },
                OwnedRange {
                    offset: Size(service_guest::LOG_START),
                    len: None,
                    owner: Owner::Active,
                },
            ],
            policy: MergePolicy::OwnerWins,
        }],
        workload: Workload {
            agent_port: service_guest::DEFAULT_AGENT_PORT,
            vsock_ports: vec![service_guest::DEFAULT_SERVICE_PORT],
            service: Some(format!("vsock:{}", service_guest::DEFAULT_SERVICE_PORT)),
            spec: None,
        },
        limits: Default::default(),
        backup: Default::default(),
        work_dir: Some(work_dir.to_owned()),
    }
}

/// What one demo run saw.
#[derive(Debug, serde::Serialize)]
pub struct DemoOutcome {
    /// The upgrade's report.
    pub report: UpgradeReport,
    /// The client's view.
    pub client: ClientStats,
    /// OS version on the disk after the upgrade.
    pub os_version: u64,
    /// Log records on the disk.
    pub log_records: usize,
}

/// Runs the whole demo in `dir`; `tune` may change the plan and options first.
pub fn run(
    dir: &Path,
    tune: impl FnOnce(&mut UpgradePlan, &mut UpgradeOptions),
) -> Result<DemoOutcome, DemoError> {
    let mut vm = boot(dir)?;
    let client = Client::start(&vm.uds, service_guest::DEFAULT_SERVICE_PORT)?;
    if !client.wait_for(50, Duration::from_secs(10)) {
        return Err(DemoError::Client("the service does not answer".into()));
    }
    let mut plan = plan(&dir.join("upgrade"));
    let mut opts = UpgradeOptions::new(Arc::new(ServiceConnector));
    tune(&mut plan, &mut opts);
    // Note when each phase starts, to tell where the client's longest gap was.
    let phases: Arc<Mutex<Vec<(Instant, crate::Phase)>>> = Arc::default();
    let (user, seen) = (opts.on_event.clone(), phases.clone());
    opts.on_event = Some(Arc::new(move |e: &crate::Event| {
        if let crate::Event::Phase(p) = e {
            seen.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((Instant::now(), *p));
        }
        if let Some(f) = &user {
            f(e);
        }
    }));
    let upgraded = crate::run(&mut vm.machine, &plan, &opts);
    // Keep serving a little after the upgrade (or the rollback).
    let n = client.answered();
    client.wait_for(n + 50, Duration::from_secs(10));
    let (mut stats, acked) = client.finish();
    if let Some(end) = stats.gap_end {
        let phases = phases.lock().unwrap_or_else(|p| p.into_inner());
        stats.gap_phase = Some(
            phases
                .iter()
                .rev()
                .find(|(t, _)| *t <= end)
                .map_or("before the upgrade".to_string(), |(_, p)| {
                    p.name().to_string()
                }),
        );
    }
    let report = upgraded.map_err(Box::new)?;
    let state = finish(&mut vm.machine)?;
    if stats.errors > 0 || stats.out_of_order > 0 {
        return Err(DemoError::Client(format!(
            "{} ({})",
            stats.line(),
            stats.first_error.clone().unwrap_or_default()
        )));
    }
    service_guest::check_log(&state.records, &acked).map_err(|e| DemoError::Disk(e.to_string()))?;
    if state.os_version != 2 {
        return Err(DemoError::Disk(format!(
            "OS version {} after the upgrade, expected 2",
            state.os_version
        )));
    }
    Ok(DemoOutcome {
        report,
        client: stats,
        os_version: state.os_version,
        log_records: state.records.len(),
    })
}

/// Stops the machine and reads its disk.
pub fn finish(m: &mut Machine) -> Result<service_guest::DiskState, DemoError> {
    m.stop().map_err(setup("stop"))?;
    let layer = m
        .disks()
        .first()
        .map(|d| d.layer.clone())
        .ok_or_else(|| DemoError::Disk("no disk".into()))?;
    service_guest::read_disk_state(layer.as_ref()).map_err(|e| DemoError::Disk(e.to_string()))
}

/// The baseline a user has without the live upgrade: a stop-and-copy cutover of the same VM
/// (pause, snapshot with the vsock connections handed over, the old VM stopped, a new VM
/// restored from the snapshot, started), with the same client running. Returns the client's
/// view (its gap is the stop-and-copy's) and the cutover's own duration.
pub fn stop_and_copy(dir: &Path) -> Result<(ClientStats, Duration), DemoError> {
    let mut vm = boot(dir)?;
    let client = Client::start(&vm.uds, service_guest::DEFAULT_SERVICE_PORT)?;
    if !client.wait_for(50, Duration::from_secs(10)) {
        return Err(DemoError::Client("the service does not answer".into()));
    }
    let snap = dir.join("snapshot");
    let cfg = vm.machine.config().clone();
    let t = Instant::now();
    vm.machine.pause().map_err(setup("pause"))?;
    let (_, handover) = vm
        .machine
        .save_snapshot_handover(&snap)
        .map_err(setup("snapshot"))?;
    vm.machine.stop().map_err(setup("stop"))?;
    // The disk is the same delta: the old VM lets go of it first.
    let DemoVm { machine, .. } = vm;
    drop(machine);
    let serial = SharedBuffer::default();
    let mut m = Machine::restore_snapshot_handover(
        cfg,
        Some(SerialOutput::Buffer(serial)),
        &snap,
        handover,
    )
    .map_err(setup("restore"))?;
    m.start().map_err(setup("start"))?;
    let cutover = t.elapsed();
    let n = client.answered();
    client.wait_for(n + 50, Duration::from_secs(10));
    let (stats, _) = client.finish();
    m.stop().map_err(setup("stop"))?;
    if stats.errors > 0 || stats.out_of_order > 0 {
        return Err(DemoError::Client(stats.line()));
    }
    Ok((stats, cutover))
}
