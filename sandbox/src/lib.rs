//! The VMM's sandbox: a seccomp filter (built with `seccompiler`) for every kind of thread, each
//! allowing only the system calls that kind makes ([`ThreadKind`]; the lists are in
//! `filters.rs`, summarized in docs/ARCHITECTURE.md), and dropping root for another user.
//!
//! A process turns it on once, early, from a thread without a filter: [`init`]. From then on,
//! threads started with [`spawn`] run under their kind's filter from their first instruction
//! of their body. They are started by a spawner thread (started by [`init`]) rather than by
//! the thread asking: a filter is inherited by the threads its thread creates, so a device
//! worker started by a vCPU thread (the guest activating the device) would otherwise also be
//! bound by the vCPU's filter. Without [`init`] (library users, unit tests) [`spawn`] is a plain
//! thread spawn and [`apply`] does nothing.
//!
//! A forbidden system call ends the process with SIGSYS, after a log line on stderr naming the
//! thread kind and the call (see `sigsys.rs`).

use std::cell::Cell;
use std::sync::mpsc::{Receiver, Sender, channel, sync_channel};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

mod filters;
mod sigsys;

/// Errors of the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A filter could not be built (a bug in the tables).
    #[error("cannot build a seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    /// The kernel refused a filter.
    #[error("cannot install the seccomp filter of a {kind} thread")]
    Install {
        /// The thread kind.
        kind: ThreadKind,
        /// The error.
        #[source]
        source: seccompiler::Error,
    },
    /// [`init`] was called twice.
    #[error("the sandbox is already set up")]
    AlreadyInitialized,
    /// Installing the SIGSYS handler or starting the spawner failed.
    #[error("cannot set the sandbox up: {0}")]
    Setup(#[source] std::io::Error),
    /// A step of switching users failed.
    #[error("cannot switch to uid {uid} gid {gid}: {step} failed")]
    Drop {
        /// Target uid.
        uid: u32,
        /// Target gid.
        gid: u32,
        /// The call that failed.
        step: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The switch seemed to work but the process still has other ids (or could regain root).
    #[error("switching to uid {uid} gid {gid} did not take: {found}")]
    DropDidNotTake {
        /// Target uid.
        uid: u32,
        /// Target gid.
        gid: u32,
        /// What the process has.
        found: String,
    },
}

/// The kinds of VMM threads, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// Runs a vCPU (`KVM_RUN`) and emulates the devices its exits reach.
    Vcpu,
    /// A virtio device's worker (virtio-blk, virtio-vsock, any device started through
    /// `devices::virtio::WorkerThread::spawn`).
    DeviceWorker,
    /// The NBD server's accept loop.
    NbdServer,
    /// One NBD client connection.
    NbdConnection,
    /// The control API thread (and the upgrade and HTTP threads it starts).
    Api,
    /// The thread that runs `microvmm upgrade`'s orchestrator (the demo or `--config` VM's upgrade:
    /// agent connections, clones, merges, the backup's restart) once its sandbox is on.
    Upgrade,
    /// The main thread of `microvmm run` from just before it starts the vCPUs (through the spawner; it starts no threads itself).
    Main,
    /// The thread that starts the others (see the module documentation).
    Spawner,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 8] = [
        Self::Vcpu,
        Self::DeviceWorker,
        Self::NbdServer,
        Self::NbdConnection,
        Self::Api,
        Self::Upgrade,
        Self::Main,
        Self::Spawner,
    ];

    /// A short name (log lines, docs).
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::DeviceWorker => "device-worker",
            Self::NbdServer => "nbd-server",
            Self::NbdConnection => "nbd-connection",
            Self::Api => "api",
            Self::Upgrade => "upgrade",
            Self::Main => "main",
            Self::Spawner => "spawner",
        }
    }

    /// The system calls this kind may make, by name (sorted, for docs and tests).
    pub fn allowed_syscalls(self) -> Vec<&'static str> {
        let mut v: Vec<&str> = filters::allowed(self).into_iter().map(|(_, n)| n).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Whether threads of this kind start threads themselves.
    fn starts_threads(self) -> bool {
        matches!(self, Self::Api | Self::Upgrade | Self::Spawner)
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a filter does with a system call not on its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// SIGSYS: a log line, then the process ends.
    Enforce,
    /// Allowed, and logged by the kernel (audit, `dmesg`): for finding what a thread kind
    /// needs while developing (e.g. a new device's worker). Never for production.
    Log,
}

/// The sandbox's settings, fixed by [`init`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Enforce or log.
    pub mode: Mode,
    /// The uid and gid [`drop_privileges`] will switch to, if it will be called.
    pub drop_to: Option<(u32, u32)>,
}

type Job = Box<dyn FnOnce() + Send>;

struct State {
    config: Config,
    spawner: Mutex<Sender<Job>>,
}

static STATE: OnceLock<State> = OnceLock::new();

thread_local! {
    /// The kind of the current thread's filter (read by the SIGSYS handler).
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Turns the sandbox on for this process: installs the SIGSYS handler and starts the spawner
/// thread (under its own filter). Call once, from a thread without a filter (e.g. `main`), before
/// starting any thread that should be filtered.
pub fn init(config: Config) -> Result<(), SandboxError> {
    if STATE.get().is_some() {
        return Err(SandboxError::AlreadyInitialized);
    }
    // Build every program now: a broken table fails here, not in a new thread.
    for kind in ThreadKind::ALL {
        filters::program(kind, config.mode, config.drop_to)?;
    }
    sigsys::install().map_err(SandboxError::Setup)?;
    let (tx, rx) = channel::<Job>();
    let (ready_tx, ready_rx) = sync_channel(1);
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || {
            let r = install(ThreadKind::Spawner, config);
            let ok = r.is_ok();
            let _ = ready_tx.send(r);
            if ok {
                serve_spawns(&rx);
            }
        })
        .map_err(SandboxError::Setup)?;
    ready_rx
        .recv()
        .map_err(|_| SandboxError::Setup(std::io::Error::other("the spawner thread died")))??;
    STATE
        .set(State {
            config,
            spawner: Mutex::new(tx),
        })
        .map_err(|_| SandboxError::AlreadyInitialized)
}

fn serve_spawns(rx: &Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        job();
    }
}

/// Whether [`init`] turned the sandbox on.
pub fn enabled() -> bool {
    STATE.get().is_some()
}

/// Installs `kind`'s filter on the calling thread (nothing when the sandbox is off).
pub fn apply(kind: ThreadKind) -> Result<(), SandboxError> {
    match STATE.get() {
        Some(s) => install(kind, s.config),
        None => Ok(()),
    }
}

fn install(kind: ThreadKind, config: Config) -> Result<(), SandboxError> {
    let install_err = |source| SandboxError::Install { kind, source };
    let prog = filters::program(kind, config.mode, config.drop_to)?;
    KIND.with(|k| k.set(Some(kind)));
    // The allow-list last: installing a filter is a system call the lists do not allow.
    if kind.starts_threads() {
        seccompiler::apply_filter(&filters::no_clone3()?).map_err(install_err)?;
    }
    seccompiler::apply_filter(&prog).map_err(install_err)?;
    Ok(())
}

/// Starts a thread from `builder` that runs `f` under `kind`'s filter (a plain spawn when the
/// sandbox is off). Fails if the thread cannot be started or its filter not installed (then
/// `f` does not run).
pub fn spawn<F, T>(
    kind: ThreadKind,
    builder: std::thread::Builder,
    f: F,
) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let Some(state) = STATE.get() else {
        return builder.spawn(f);
    };
    let config = state.config;
    let (handle_tx, handle_rx) = sync_channel(1);
    let (filter_tx, filter_rx) = sync_channel(1);
    let job: Job = Box::new(move || {
        let spawned = builder.spawn(move || {
            let r = install(kind, config).map_err(|e| e.to_string());
            let ok = r.is_ok();
            let _ = filter_tx.send(r);
            if !ok {
                // Never run `f` unfiltered; the caller gets the error (without a panic message).
                std::panic::resume_unwind(Box::new("seccomp filter not installed"));
            }
            f()
        });
        let _ = handle_tx.send(spawned);
    });
    let gone = || std::io::Error::other("the sandbox's spawner thread is gone");
    state
        .spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| gone())?;
    let handle = handle_rx.recv().map_err(|_| gone())??;
    match filter_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(std::io::Error::other(e)),
        Err(_) => Err(gone()),
    }
}

/// Switches the whole process to `uid`:`gid` with no supplementary groups (setgroups, setgid,
/// setuid, in that order), then checks that real, effective and saved ids all changed and that
/// root cannot be regained. With the sandbox on, [`Config::drop_to`] must name the same ids.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), SandboxError> {
    let fail = |step| {
        let source = std::io::Error::last_os_error();
        SandboxError::Drop {
            uid,
            gid,
            step,
            source,
        }
    };
    // SAFETY: plain syscalls (glibc runs them on every thread) with integer arguments and a
    // null list of length 0.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(fail("setgroups"));
        }
        if libc::setgid(gid) != 0 {
            return Err(fail("setgid"));
        }
        if libc::setuid(uid) != 0 {
            return Err(fail("setuid"));
        }
    }
    let (ruid, euid, suid) = ids(libc::getresuid);
    let (rgid, egid, sgid) = ids(libc::getresgid);
    // SAFETY: asks only for the count of supplementary groups (null buffer, size 0).
    let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    // The raw call, on this thread only: glibc's setuid would make every thread try it, and
    // the other threads' filters allow only the switch to `uid`.
    let regained = uid != 0 && {
        // SAFETY: a syscall with an integer argument; if it succeeded the check below reports it.
        unsafe { libc::syscall(libc::SYS_setuid, 0) == 0 }
    };
    let (uid64, gid64) = (u64::from(uid), u64::from(gid));
    if [ruid, euid, suid] != [uid64; 3]
        || [rgid, egid, sgid] != [gid64; 3]
        || groups != 0
        || regained
    {
        return Err(SandboxError::DropDidNotTake {
            uid,
            gid,
            found: format!(
                "uids {ruid}/{euid}/{suid}, gids {rgid}/{egid}/{sgid}, {groups} groups, \
                 root regained: {regained}"
            ),
        });
    }
    Ok(())
}

/// Calls `getresuid`/`getresgid`.
fn ids<T: Copy + Default + Into<u64>>(
    f: unsafe extern "C" fn(*mut T, *mut T, *mut T) -> libc::c_int,
) -> (u64, u64, u64) {
    let (mut r, mut e, mut s) = (T::default(), T::default(), T::default());
    // SAFETY: the three pointers are to live locals of the type the call fills.
    unsafe { f(&mut r, &mut e, &mut s) };
    (r.into(), e.into(), s.into())
}

/// The table of allowed system calls per thread kind that docs/ARCHITECTURE.md shows.
#[doc(hidden)]
pub fn doc_table() -> String {
    filters::doc_table()
}

/// Parses `UID:GID` (numbers).
pub fn parse_user(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not UID:GID"))?;
    let num = |x: &str, what: &str| {
        x.parse::<u32>()
            .ok()
            .filter(|&n| n != u32::MAX)
            .ok_or_else(|| format!("{what} {x:?} in {s:?} is not a number"))
    };
    Ok((num(u, "uid")?, num(g, "gid")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_builds_in_both_modes_with_and_without_a_user() {
        for kind in ThreadKind::ALL {
            for mode in [Mode::Enforce, Mode::Log] {
                for drop_to in [None, Some((65534, 65534))] {
                    let p = filters::program(kind, mode, drop_to).unwrap();
                    assert!(!p.is_empty(), "{kind}");
                }
            }
        }
        assert!(!filters::no_clone3().unwrap().is_empty());
    }

    #[test]
    fn no_kind_may_execute_programs_fork_or_trace() {
        for kind in ThreadKind::ALL {
            let allowed = kind.allowed_syscalls();
            for bad in [
                "execve", "execveat", "fork", "vfork", "ptrace", "mount", "kill",
            ] {
                assert!(!allowed.contains(&bad), "{kind} allows {bad}");
            }
        }
        // The guest-facing kinds cannot open files or create threads.
        for kind in [ThreadKind::Vcpu] {
            for bad in ["openat", "clone", "clone3", "accept4"] {
                assert!(
                    !kind.allowed_syscalls().contains(&bad),
                    "{kind} allows {bad}"
                );
            }
        }
        for kind in [ThreadKind::DeviceWorker, ThreadKind::NbdConnection] {
            for bad in ["clone", "clone3", "bind", "listen", "memfd_create"] {
                assert!(
                    !kind.allowed_syscalls().contains(&bad),
                    "{kind} allows {bad}"
                );
            }
        }
    }

    #[test]
    fn the_spawner_allows_what_its_threads_do() {
        let spawner = ThreadKind::Spawner.allowed_syscalls();
        for kind in ThreadKind::ALL {
            for s in kind.allowed_syscalls() {
                assert!(spawner.contains(&s), "{kind}: {s}");
            }
        }
    }

    #[test]
    fn the_architecture_document_shows_the_filters_as_they_are() {
        let doc = include_str!("../../docs/ARCHITECTURE.md");
        let table = doc_table();
        assert!(
            doc.contains(&table),
            "docs/ARCHITECTURE.md must hold this table:\n{table}"
        );
    }

    #[test]
    fn users_parse() {
        assert_eq!(parse_user("65534:65534"), Ok((65534, 65534)));
        assert_eq!(parse_user("0:5"), Ok((0, 5)));
        for bad in [
            "",
            "65534",
            "a:b",
            "1:",
            ":1",
            "-1:2",
            "4294967295:1",
            "1:2:3",
        ] {
            assert!(parse_user(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn without_init_spawn_is_a_plain_thread_and_apply_does_nothing() {
        assert!(!enabled());
        apply(ThreadKind::Vcpu).unwrap();
        let h = spawn(ThreadKind::Vcpu, std::thread::Builder::new(), || 7).unwrap();
        assert_eq!(h.join().unwrap(), 7);
    }
}
