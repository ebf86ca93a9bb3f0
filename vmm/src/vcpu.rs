//! vCPUs: one thread each, driven by messages ([`VcpuEvent`]), running an exit loop that
//! dispatches port I/O and MMIO to the device buses and turns every other exit into a clean stop
//! or a typed error. A running vCPU is interrupted by a signal that also sets `immediate_exit`
//! (so a signal that lands between two `KVM_RUN`s is not lost).

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::{Bus, PowerControl, PowerEvent};
use kvm_bindings::{
    CpuId, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_MP_STATE_RUNNABLE, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_mp_state,
    kvm_regs, kvm_run, kvm_sregs,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{Killable, SIGRTMIN};

use crate::memory::GuestMemoryMmap;
use crate::regs::{self, BootEntry, RegsError};

/// Port whose writes are an idle hint: the guest waits for work (the test-guest kit's guests
/// run at CPL3, where `hlt` faults, and would otherwise spin on a host CPU).
pub const IDLE_PORT: u16 = 0x518;
/// How long a vCPU thread sleeps on an idle hint (the timer slack adds ~50 us).
const IDLE_SLEEP: std::time::Duration = std::time::Duration::from_micros(20);

/// Errors of a vCPU: setup failures and the guest events that end a VM with an error.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {id}")]
    Create {
        /// vCPU id.
        id: u8,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A setup ioctl failed.
    #[error("vCPU {id}: {op} failed")]
    Setup {
        /// vCPU id.
        id: u8,
        /// The ioctl.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Boot register setup failed.
    #[error("vCPU {id}: boot register setup failed")]
    Regs {
        /// vCPU id.
        id: u8,
        /// The error.
        #[source]
        source: RegsError,
    },
    /// Installing the kick signal handler or spawning the thread failed.
    #[error("vCPU {id}: cannot start its thread: {reason}")]
    Thread {
        /// vCPU id.
        id: u8,
        /// What failed.
        reason: String,
    },
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    #[error("vCPU {id}: guest triple fault (KVM_EXIT_SHUTDOWN) at rip {:#x}", .state.regs.rip)]
    TripleFault {
        /// vCPU id.
        id: u8,
        /// Registers at the exit.
        state: Box<CpuState>,
    },
    /// KVM could not emulate an instruction.
    #[error(
        "vCPU {id}: KVM cannot emulate the instruction at rip {:#x} (cpl {}), bytes [{}]",
        .state.regs.rip, .state.cpl(), hex(.insn)
    )]
    EmulationFailure {
        /// vCPU id.
        id: u8,
        /// The instruction bytes (from KVM, or read from guest memory at rip).
        insn: Vec<u8>,
        /// Registers at the exit.
        state: Box<CpuState>,
    },
    /// Another KVM internal error.
    #[error("vCPU {id}: KVM internal error, suberror {suberror}, data {data:x?}")]
    InternalError {
        /// vCPU id.
        id: u8,
        /// KVM_INTERNAL_ERROR_* suberror.
        suberror: u32,
        /// Extra data words.
        data: Vec<u64>,
        /// Registers at the exit.
        state: Box<CpuState>,
    },
    /// VM entry failed.
    #[error("vCPU {id}: VM entry failed, hardware reason {reason:#x}")]
    FailEntry {
        /// vCPU id.
        id: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// The guest crashed (KVM_SYSTEM_EVENT_CRASH) or an exit the VMM does not handle.
    #[error("vCPU {id}: unhandled exit {exit}")]
    UnhandledExit {
        /// vCPU id.
        id: u8,
        /// Description of the exit.
        exit: String,
    },
    /// KVM_RUN failed.
    #[error("vCPU {id}: KVM_RUN failed")]
    Run {
        /// vCPU id.
        id: u8,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// General and special registers of a vCPU at an exit.
#[derive(Clone, Default)]
pub struct CpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
}

impl CpuState {
    /// Current privilege level (CS.DPL... the RPL of CS).
    pub fn cpl(&self) -> u16 {
        self.sregs.cs.selector & 3
    }
}

impl fmt::Debug for CpuState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.regs;
        let s = &self.sregs;
        write!(
            f,
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} \
             rsi={:#x} rdi={:#x} cs={:#x} ss={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            s.cs.selector,
            s.ss.selector,
            s.cr0,
            s.cr3,
            s.cr4,
            s.efer
        )
    }
}

/// Why a vCPU stopped on its own without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked to power off or reset.
    Power(PowerEvent),
    /// The guest halted with no in-kernel LAPIC to wake it (KVM_EXIT_HLT).
    Halted,
}

/// What one `KVM_RUN` round produced.
#[derive(Debug)]
pub enum RunOutcome {
    /// Keep running.
    Continue,
    /// Interrupted by a kick; look at the message queue.
    Interrupted,
    /// Stopped cleanly.
    Stop(VcpuStop),
}

/// The buses and power control a vCPU dispatches to.
#[derive(Debug, Clone)]
pub struct VcpuIo {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Guest power requests.
    pub power: Arc<PowerControl>,
    /// Guest memory (to read instruction bytes for error reports).
    pub memory: GuestMemoryMmap,
    /// Exit counters shared by the machine's vCPUs.
    pub exits: Arc<ExitCounters>,
    /// The MSRs a saved vCPU state holds ([`crate::vm::Vm::msr_indices`]).
    pub msr_indices: Arc<[u32]>,
    /// Raised when a vCPU stops on its own (shared by the machine's vCPUs).
    pub stops: Arc<StopNotice>,
}

/// Raised by the first vCPU of a machine that stops on its own (the guest powered off or
/// reset, or the vCPU failed), for whoever must not wait on a guest that is gone: a thread
/// blocked on a guest agent can be woken by a watcher of this notice.
#[derive(Debug, Default)]
pub struct StopNotice {
    what: std::sync::Mutex<Option<String>>,
    raised: std::sync::Condvar,
}

impl StopNotice {
    /// Records the first stop (`what` happened) and wakes every waiter.
    pub fn raise(&self, what: String) {
        let mut w = self.what.lock().unwrap_or_else(|p| p.into_inner());
        if w.is_none() {
            *w = Some(what);
        }
        self.raised.notify_all();
    }

    /// What stopped, once a vCPU has.
    pub fn get(&self) -> Option<String> {
        self.what.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits up to `timeout` for a stop; what stopped, or `None` if nothing did meanwhile.
    pub fn wait(&self, timeout: Duration) -> Option<String> {
        let w = self.what.lock().unwrap_or_else(|p| p.into_inner());
        let (w, _) = self
            .raised
            .wait_timeout_while(w, timeout, |w| w.is_none())
            .unwrap_or_else(|p| p.into_inner());
        w.clone()
    }
}

/// How many times the machine's vCPUs left `KVM_RUN`, by kind (for metrics).
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port reads.
    pub io_in: std::sync::atomic::AtomicU64,
    /// Port writes (idle hints excluded).
    pub io_out: std::sync::atomic::AtomicU64,
    /// MMIO reads.
    pub mmio_read: std::sync::atomic::AtomicU64,
    /// MMIO writes.
    pub mmio_write: std::sync::atomic::AtomicU64,
    /// Idle hints (port [`IDLE_PORT`]).
    pub idle: std::sync::atomic::AtomicU64,
    /// Signals (pause, tasks) and everything else.
    pub other: std::sync::atomic::AtomicU64,
}

impl ExitCounters {
    /// `(kind, count)` pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        vec![
            ("io_in", self.io_in.load(Relaxed)),
            ("io_out", self.io_out.load(Relaxed)),
            ("mmio_read", self.mmio_read.load(Relaxed)),
            ("mmio_write", self.mmio_write.load(Relaxed)),
            ("idle", self.idle.load(Relaxed)),
            ("other", self.other.load(Relaxed)),
        ]
    }
}

/// One vCPU.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    io: VcpuIo,
}

impl fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl devices::persist::Persist for Vcpu {
    type State = crate::snapshot::VcpuState;
    type Error = crate::snapshot::SnapshotError;

    /// Reads the whole vCPU state (call it on the vCPU's thread while the machine is paused, or
    /// on a vCPU without a thread).
    fn save(&self) -> Result<Self::State, Self::Error> {
        crate::snapshot::save_vcpu(&self.fd, self.id, &self.io.msr_indices)
    }

    /// Writes a saved state into this fresh vCPU, in the order the KVM API requires. A state
    /// saved from another vCPU id is refused.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error> {
        if state.id != self.id {
            return Err(crate::snapshot::SnapshotError::Mismatch(format!(
                "vCPU {} given the state of vCPU {}",
                self.id, state.id
            )));
        }
        crate::snapshot::restore_vcpu(&self.fd, state)
    }
}

thread_local! {
    /// The `kvm_run` page of the vCPU running on this thread (null when none).
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(Cell::get);
    if !p.is_null() {
        // SAFETY: the pointer is this thread's vCPU `kvm_run` mapping, set while the vCPU (and
        // its mapping) is alive on this thread and cleared before it is dropped or moved away.
        unsafe { std::ptr::write_volatile(&raw mut (*p).immediate_exit, 1) };
    }
}

/// Installs `kick_handler` for [`kick_signal`] with `SA_RESTART`, so that device code running on
/// a vCPU thread (file, socket, pipe I/O) is restarted rather than failing with EINTR when a kick
/// arrives; `KVM_RUN` itself is never restarted (it returns EINTR, and `immediate_exit` is set).
fn register_kick_handler() -> std::io::Result<()> {
    // SAFETY: `sigaction` is plain data; zeroed is a valid initial value.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = kick_handler as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: `act.sa_mask` is a valid sigset to fill; `act` is fully initialized and the
    // handler only touches this thread's kvm_run page (async-signal-safe); return values checked.
    let rc = unsafe {
        libc::sigfillset(&mut act.sa_mask);
        libc::sigaction(kick_signal(), &act, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sends a vCPU thread's answer. A failure means the handle (the machine) was dropped: there is
/// nobody left to answer, and the thread ends at its next receive.
fn answer(resp: &Sender<(u64, VcpuResponse)>, msg: (u64, VcpuResponse)) {
    if resp.send(msg).is_err() {
        tracing::debug!("vCPU answer dropped: the machine is gone");
    }
}

/// Installs the kick handler once per process; a failure is remembered and reported to every
/// later caller (not only the first). [`Vcpu::start`] calls it; a thread about to give up
/// `rt_sigaction` (its seccomp filter) before starting vCPUs calls it first.
pub fn install_kick_handler() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| register_kick_handler().map_err(|e| e.to_string()))
        .clone()
}

impl Vcpu {
    /// Creates vCPU `id`.
    pub fn new(vm: &VmFd, id: u8, io: VcpuIo) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        Ok(Self { id, fd, io })
    }

    /// This vCPU's id (= APIC id).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The KVM vCPU fd (for state save/restore).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Sets CPUID and the boot state. With `runnable`, an application processor starts at the
    /// entry point at once instead of waiting for INIT/SIPI (used by the test-guest kit).
    pub fn configure(
        &self,
        cpuid: &CpuId,
        entry: BootEntry,
        count: u8,
        runnable: bool,
    ) -> Result<(), VcpuError> {
        let id = self.id;
        self.fd
            .set_cpuid2(cpuid)
            .map_err(|source| VcpuError::Setup {
                id,
                op: "KVM_SET_CPUID2",
                source,
            })?;
        crate::cpuid::set_boot_xcr0(&self.fd, cpuid);
        regs::setup_vcpu(&self.fd, entry, id, count)
            .map_err(|source| VcpuError::Regs { id, source })?;
        if runnable {
            self.fd
                .set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_RUNNABLE,
                })
                .map_err(|source| VcpuError::Setup {
                    id,
                    op: "KVM_SET_MP_STATE",
                    source,
                })?;
        }
        Ok(())
    }

    fn cpu_state(&self) -> Box<CpuState> {
        Box::new(CpuState {
            regs: self.fd.get_regs().unwrap_or_default(),
            sregs: self.fd.get_sregs().unwrap_or_default(),
        })
    }

    fn insn_from_memory(&self, rip: u64) -> Vec<u8> {
        let Ok(t) = self.fd.translate_gva(rip) else {
            return Vec::new();
        };
        if t.valid == 0 {
            return Vec::new();
        }
        let mut buf = [0u8; 15];
        match self
            .io
            .memory
            .read_slice(&mut buf, GuestAddress(t.physical_address))
        {
            Ok(()) => buf.to_vec(),
            Err(_) => Vec::new(),
        }
    }

    fn internal_error(&mut self) -> VcpuError {
        let id = self.id;
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member
        // of the union; `emulation_failure` overlays it for the emulation suberror.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        // SAFETY: as above.
        let emu = unsafe { run.__bindgen_anon_1.emulation_failure };
        let state = self.cpu_state();
        let ndata = (internal.ndata as usize).min(internal.data.len());
        if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
            let flags = emu.flags;
            // SAFETY: plain bytes in a union of byte arrays.
            let bytes = unsafe { emu.__bindgen_anon_1.__bindgen_anon_1 };
            let insn = if ndata >= 3
                && flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
                && bytes.insn_size > 0
            {
                bytes.insn_bytes[..usize::from(bytes.insn_size).min(15)].to_vec()
            } else {
                self.insn_from_memory(state.regs.rip)
            };
            return VcpuError::EmulationFailure { id, insn, state };
        }
        VcpuError::InternalError {
            id,
            suberror: internal.suberror,
            data: internal.data[..ndata].to_vec(),
            state,
        }
    }

    /// Runs the guest until the next exit and handles it.
    pub fn run_once(&mut self) -> Result<RunOutcome, VcpuError> {
        enum After {
            Done(RunOutcome),
            CheckPower,
            Shutdown,
            Internal,
            FailEntry(u64),
            Unhandled(String),
        }
        let id = self.id;
        let counters = Arc::clone(&self.io.exits);
        let count = |c: &std::sync::atomic::AtomicU64| {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        let after = match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    count(&counters.io_in);
                    if !self.io.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    After::Done(RunOutcome::Continue)
                }
                VcpuExit::IoOut(IDLE_PORT, _) => {
                    count(&counters.idle);
                    // The guest has nothing to do (a CPL3 test guest cannot `hlt`): give the
                    // host CPU to other threads for a moment, as a halted vCPU would.
                    std::thread::sleep(IDLE_SLEEP);
                    After::CheckPower
                }
                VcpuExit::IoOut(port, data) => {
                    count(&counters.io_out);
                    if !self.io.pio.write(u64::from(port), data) {
                        tracing::trace!(port, ?data, "write to unclaimed port");
                    }
                    After::CheckPower
                }
                VcpuExit::MmioRead(addr, data) => {
                    count(&counters.mmio_read);
                    if !self.io.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                    After::Done(RunOutcome::Continue)
                }
                VcpuExit::MmioWrite(addr, data) => {
                    count(&counters.mmio_write);
                    if !self.io.mmio.write(addr, data) {
                        tracing::trace!(addr, ?data, "write to unclaimed MMIO");
                    }
                    After::CheckPower
                }
                VcpuExit::Hlt => After::Done(RunOutcome::Stop(VcpuStop::Halted)),
                VcpuExit::Shutdown => After::Shutdown,
                VcpuExit::InternalError => After::Internal,
                VcpuExit::FailEntry(reason, _) => After::FailEntry(reason),
                VcpuExit::Intr => {
                    count(&counters.other);
                    After::Done(RunOutcome::Interrupted)
                }
                VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_SHUTDOWN => {
                    After::Done(RunOutcome::Stop(VcpuStop::Power(PowerEvent::PowerOff)))
                }
                VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_RESET => {
                    After::Done(RunOutcome::Stop(VcpuStop::Power(PowerEvent::Reset)))
                }
                other => After::Unhandled(format!("{other:?}")),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                After::Done(RunOutcome::Interrupted)
            }
            Err(source) => return Err(VcpuError::Run { id, source }),
        };
        match after {
            After::Done(o) => Ok(o),
            After::CheckPower => Ok(match self.io.power.requested() {
                Some(ev) => RunOutcome::Stop(VcpuStop::Power(ev)),
                None => RunOutcome::Continue,
            }),
            After::Shutdown => Err(VcpuError::TripleFault {
                id,
                state: self.cpu_state(),
            }),
            After::Internal => Err(self.internal_error()),
            After::FailEntry(reason) => Err(VcpuError::FailEntry { id, reason }),
            After::Unhandled(exit) => Err(VcpuError::UnhandledExit { id, exit }),
        }
    }

    /// Starts the vCPU's thread. It runs the guest at once if `start_running`, else waits for
    /// [`VcpuEvent::Resume`]. When the vCPU stops on its own it sends a [`VcpuExitReport`] on
    /// `exits` and waits for [`VcpuEvent::Finish`]; the thread then returns the `Vcpu`.
    pub fn start(
        self,
        exits: Sender<VcpuExitReport>,
        start_running: bool,
    ) -> Result<VcpuHandle, VcpuError> {
        let id = self.id;
        install_kick_handler().map_err(|reason| VcpuError::Thread { id, reason })?;
        let (tx, rx) = channel();
        let (resp_tx, resp_rx) = channel();
        // Under the vCPU filter (when the sandbox is on) before its first guest instruction.
        let thread = sandbox::spawn(
            sandbox::ThreadKind::Vcpu,
            std::thread::Builder::new().name(format!("vcpu{id}")),
            move || self.thread_main(rx, resp_tx, exits, start_running),
        )
        .map_err(|e| VcpuError::Thread {
            id,
            reason: e.to_string(),
        })?;
        Ok(VcpuHandle {
            id,
            tx,
            rx: resp_rx,
            seq: std::sync::atomic::AtomicU64::new(0),
            thread: Some(thread),
        })
    }

    fn thread_main(
        mut self,
        rx: Receiver<(u64, VcpuEvent)>,
        resp: Sender<(u64, VcpuResponse)>,
        exits: Sender<VcpuExitReport>,
        start_running: bool,
    ) -> Vcpu {
        if self.id == 0 {
            crate::test_hook_forbidden_syscall("vcpu");
        }
        KVM_RUN_PTR.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        // A kick that arrived before the pointer was set found nothing to flag; make the first
        // KVM_RUN return at once so the message queue is looked at before the guest runs.
        self.fd.set_kvm_immediate_exit(1);
        let mut running = start_running;
        let mut finished = false;
        // The sequence number of the event being answered (answers carry it back).
        let mut seq = 0u64;
        'outer: loop {
            if !running {
                match rx.recv().map(|(s, e)| {
                    seq = s;
                    e
                }) {
                    Ok(VcpuEvent::Resume) if !finished => {
                        // Not 0: a message sent after this Resume may have had its kick land
                        // before now (and be overwritten by a clear). Leaving immediate_exit set
                        // makes the first KVM_RUN return at once, into the drain below, which
                        // clears it first and then looks at every pending message.
                        self.fd.set_kvm_immediate_exit(1);
                        running = true;
                        answer(&resp, (seq, VcpuResponse::Resumed));
                    }
                    Ok(VcpuEvent::Resume) => {
                        answer(&resp, (seq, VcpuResponse::Finished));
                    }
                    Ok(VcpuEvent::Pause) => {
                        answer(
                            &resp,
                            (
                                seq,
                                if finished {
                                    VcpuResponse::Finished
                                } else {
                                    VcpuResponse::Paused
                                },
                            ),
                        );
                    }
                    Ok(VcpuEvent::Run(task)) => {
                        task(&self);
                        answer(&resp, (seq, VcpuResponse::Ran));
                    }
                    Ok(VcpuEvent::Finish) | Err(_) => break,
                }
                continue;
            }
            match self.run_once() {
                Ok(RunOutcome::Continue) => {}
                Ok(RunOutcome::Interrupted) => {
                    // Clear before draining: a kick after this point makes the next KVM_RUN
                    // return at once, so its message is seen on the next round.
                    self.fd.set_kvm_immediate_exit(0);
                    loop {
                        match rx.try_recv().map(|(s, e)| {
                            seq = s;
                            e
                        }) {
                            Ok(VcpuEvent::Pause) => {
                                running = false;
                                // Tell a kvmclock guest it was stopped (no soft-lockup
                                // reports); EINVAL when the guest has no kvmclock.
                                let _ = self.fd.kvmclock_ctrl();
                                answer(&resp, (seq, VcpuResponse::Paused));
                                break;
                            }
                            Ok(VcpuEvent::Resume) => {
                                answer(&resp, (seq, VcpuResponse::Resumed));
                            }
                            Ok(VcpuEvent::Run(task)) => {
                                task(&self);
                                answer(&resp, (seq, VcpuResponse::Ran));
                            }
                            Ok(VcpuEvent::Finish) | Err(TryRecvError::Disconnected) => {
                                break 'outer;
                            }
                            Err(TryRecvError::Empty) => break,
                        }
                    }
                }
                Ok(RunOutcome::Stop(stop)) => {
                    running = false;
                    finished = true;
                    match stop {
                        VcpuStop::Power(ev) => tracing::info!(vcpu = self.id, ?ev, "vCPU stopped"),
                        other => tracing::warn!(vcpu = self.id, stop = ?other, "vCPU stopped"),
                    }
                    let what = format!("vCPU {} stopped: {stop:?}", self.id);
                    // The machine dropped its receiver only when it is gone: nobody to tell.
                    let _ = exits.send(VcpuExitReport {
                        id: self.id,
                        result: Ok(stop),
                    });
                    // After the report: whoever the notice wakes finds it queued.
                    self.io.stops.raise(what);
                }
                Err(e) => {
                    running = false;
                    finished = true;
                    tracing::error!(vcpu = self.id, error = %e, "vCPU failed; it runs no more");
                    let what = format!("vCPU {} failed: {e}", self.id);
                    // The machine dropped its receiver only when it is gone: nobody to tell.
                    let _ = exits.send(VcpuExitReport {
                        id: self.id,
                        result: Err(e),
                    });
                    // After the report: whoever the notice wakes finds it queued.
                    self.io.stops.raise(what);
                }
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        self
    }
}

/// Test hook: a system call no vCPU filter allows (opening a file), as a device model taken
/// over by the guest might make. Under the sandbox it ends the process with SIGSYS; without it
/// the file is opened and closed, and the vCPU runs on.
#[cfg(feature = "test-hooks")]
pub(crate) fn forbidden_syscall() {
    // SAFETY: a NUL-terminated path and flags; the fd, if any, is closed at once.
    unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::close(fd);
        }
    }
}

/// Work to run on a vCPU's own thread, outside `KVM_RUN` (e.g. reading or writing its state).
pub type VcpuTask = Arc<dyn Fn(&Vcpu) + Send + Sync>;

/// A message to a vCPU thread.
#[derive(Clone)]
pub enum VcpuEvent {
    /// Run the guest.
    Resume,
    /// Stop running the guest (pending I/O is completed first) and wait.
    Pause,
    /// Run a task on the vCPU thread between two `KVM_RUN`s (pending I/O completed), then carry
    /// on as before; answered with [`VcpuResponse::Ran`].
    Run(VcpuTask),
    /// End the thread.
    Finish,
}

impl fmt::Debug for VcpuEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Resume => "Resume",
            Self::Pause => "Pause",
            Self::Run(_) => "Run",
            Self::Finish => "Finish",
        })
    }
}

/// A vCPU thread's answer to [`VcpuEvent::Pause`] / [`VcpuEvent::Resume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuResponse {
    /// Now paused.
    Paused,
    /// Now running.
    Resumed,
    /// The vCPU has stopped for good (power event or error) and cannot run again.
    Finished,
    /// A [`VcpuEvent::Run`] task ran.
    Ran,
}

/// Sent by a vCPU thread when its vCPU stops on its own.
#[derive(Debug)]
pub struct VcpuExitReport {
    /// vCPU id.
    pub id: u8,
    /// A clean stop or the error that ended it.
    pub result: Result<VcpuStop, VcpuError>,
}

/// Errors of driving a vCPU thread.
#[derive(Debug, thiserror::Error)]
pub enum VcpuHandleError {
    /// The thread is gone.
    #[error("vCPU {0} thread is gone")]
    Gone(u8),
    /// The thread did not answer in time.
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(u8, Duration),
    /// Signalling the thread failed.
    #[error("cannot kick vCPU {0}: {1}")]
    Kick(u8, String),
    /// The thread panicked.
    #[error("vCPU {0} thread panicked")]
    Panicked(u8),
}

/// The controller's side of a vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u8,
    tx: Sender<(u64, VcpuEvent)>,
    rx: Receiver<(u64, VcpuResponse)>,
    /// Sequence number of the last event sent (answers to older ones are stale).
    seq: std::sync::atomic::AtomicU64,
    thread: Option<JoinHandle<Vcpu>>,
}

impl VcpuHandle {
    /// vCPU id.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Interrupts `KVM_RUN` on the vCPU thread (a no-op for a thread not in the guest).
    pub fn kick(&self) -> Result<(), VcpuHandleError> {
        match &self.thread {
            Some(t) if !t.is_finished() => t
                .kill(kick_signal())
                .map_err(|e| VcpuHandleError::Kick(self.id, e.to_string())),
            _ => Ok(()),
        }
    }

    /// Sends `event` and kicks the thread so it sees it.
    pub fn send(&self, event: VcpuEvent) -> Result<(), VcpuHandleError> {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        self.tx
            .send((seq, event))
            .map_err(|_| VcpuHandleError::Gone(self.id))?;
        self.kick()
    }

    /// Waits for the thread's answer to the last event sent. Answers to earlier events that
    /// came too late (after their waiter gave up) are skipped.
    pub fn response(&self, timeout: Duration) -> Result<VcpuResponse, VcpuHandleError> {
        let want = self.seq.load(std::sync::atomic::Ordering::SeqCst);
        let end = std::time::Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((seq, r)) if seq == want => return Ok(r),
                Ok((seq, r)) => {
                    tracing::debug!(vcpu = self.id, seq, ?r, "late answer skipped");
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VcpuHandleError::Timeout(self.id, timeout));
                }
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuHandleError::Gone(self.id)),
            }
        }
    }

    /// Ends the thread and returns the vCPU.
    pub fn finish(mut self) -> Result<Vcpu, VcpuHandleError> {
        // A thread that already ended (its receiver gone) needs no Finish; the join says how.
        let _ = self.send(VcpuEvent::Finish);
        let thread = self.thread.take().ok_or(VcpuHandleError::Gone(self.id))?;
        thread
            .join()
            .map_err(|_| VcpuHandleError::Panicked(self.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_notice_wakes_its_waiter_and_keeps_the_first_stop() {
        let n = Arc::new(StopNotice::default());
        assert_eq!(n.wait(Duration::from_millis(10)), None);
        let waiter = {
            let n = Arc::clone(&n);
            std::thread::spawn(move || n.wait(Duration::from_secs(30)))
        };
        std::thread::sleep(Duration::from_millis(20));
        n.raise("vCPU 1 stopped".into());
        n.raise("vCPU 0 stopped".into());
        assert_eq!(waiter.join().unwrap().as_deref(), Some("vCPU 1 stopped"));
        assert_eq!(n.get().as_deref(), Some("vCPU 1 stopped"));
    }
}
