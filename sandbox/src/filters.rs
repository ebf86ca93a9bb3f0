//! The allow-lists: which system calls each kind of thread may make (x86_64). Everything else
//! traps (SIGSYS, see [`crate::sigsys`]). The table in docs/ARCHITECTURE.md summarizes them;
//! the lists were found by running the test suite with the filters in log mode
//! (`MICROVMM_SECCOMP=log`, see [`crate::Mode::Log`]) and by reading the code.

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use crate::{Mode, SandboxError, ThreadKind};

/// `(number, name)` pairs from syscall names (the `libc::SYS_*` constants re-exported in
/// [`sys`] under their bare names).
macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        &[$((sys::$name, stringify!($name))),*]
    };
}

/// `libc::SYS_*` under their bare names, for the macros above.
#[allow(non_upper_case_globals)]
mod sys {
    pub use libc::{
        SYS_accept4 as accept4, SYS_bind as bind, SYS_brk as brk,
        SYS_clock_gettime as clock_gettime, SYS_clock_nanosleep as clock_nanosleep,
        SYS_clone as clone, SYS_clone3 as clone3, SYS_close as close, SYS_connect as connect,
        SYS_copy_file_range as copy_file_range, SYS_eventfd2 as eventfd2, SYS_exit as exit,
        SYS_exit_group as exit_group, SYS_fallocate as fallocate, SYS_fcntl as fcntl,
        SYS_fdatasync as fdatasync, SYS_flock as flock, SYS_fsync as fsync,
        SYS_ftruncate as ftruncate, SYS_futex as futex, SYS_getcwd as getcwd,
        SYS_getdents64 as getdents64, SYS_getpid as getpid, SYS_getrandom as getrandom,
        SYS_getsockname as getsockname, SYS_gettid as gettid, SYS_ioctl as ioctl,
        SYS_listen as listen, SYS_lseek as lseek, SYS_madvise as madvise,
        SYS_memfd_create as memfd_create, SYS_mkdir as mkdir, SYS_mmap as mmap,
        SYS_mprotect as mprotect, SYS_mremap as mremap, SYS_munmap as munmap,
        SYS_nanosleep as nanosleep, SYS_newfstatat as newfstatat, SYS_openat as openat,
        SYS_poll as poll, SYS_ppoll as ppoll, SYS_prctl as prctl, SYS_pread64 as pread64,
        SYS_pwrite64 as pwrite64, SYS_pwritev as pwritev, SYS_read as read,
        SYS_readlink as readlink, SYS_readv as readv, SYS_recvfrom as recvfrom,
        SYS_rename as rename, SYS_restart_syscall as restart_syscall, SYS_rseq as rseq,
        SYS_rt_sigprocmask as rt_sigprocmask, SYS_rt_sigreturn as rt_sigreturn,
        SYS_sched_getaffinity as sched_getaffinity, SYS_sched_yield as sched_yield,
        SYS_seccomp as seccomp, SYS_sendmsg as sendmsg, SYS_sendto as sendto,
        SYS_set_robust_list as set_robust_list, SYS_setsockopt as setsockopt,
        SYS_shutdown as shutdown, SYS_sigaltstack as sigaltstack, SYS_socket as socket,
        SYS_statx as statx, SYS_sync_file_range as sync_file_range, SYS_tgkill as tgkill,
        SYS_unlink as unlink, SYS_unlinkat as unlinkat, SYS_write as write, SYS_writev as writev,
    };
}

type List = &'static [(i64, &'static str)];

/// Every thread: memory, locks, sleeping, signal return, reads and writes on fds it holds,
/// and ending.
const COMMON: List = syscalls![
    read,
    write,
    close,
    brk,
    mmap,
    munmap,
    mremap,
    mprotect,
    madvise,
    futex,
    sched_yield,
    nanosleep,
    clock_nanosleep,
    clock_gettime,
    gettid,
    getpid,
    getrandom,
    rt_sigreturn,
    rt_sigprocmask,
    sigaltstack,
    restart_syscall,
    exit,
    exit_group,
];

/// I/O on a disk layer: positional reads and writes (a journal append is one `pwritev` of
/// its records and the data they carry), flushes, hole punching (discard), and the journal's
/// compaction (a new file written and renamed over the old one, the directory synced, a
/// leftover temporary file removed).
const DISK_IO: List = syscalls![
    pread64,
    pwrite64,
    pwritev,
    lseek,
    fsync,
    fdatasync,
    fallocate,
    ftruncate,
    sync_file_range,
    statx,
    openat,
    rename,
    unlink,
    flock,
    fcntl,
];

/// A vCPU thread: `KVM_RUN` and the other vCPU ioctls (KVM's only, see `IoctlRule`), device
/// emulation on its exits (eventfds, the serial console), and what a device does when the
/// guest activates or resets it with an MMIO write: eventfds cloned for its worker, the vsock
/// device's listening socket bound (a stale one checked and removed) and at reset removed.
const VCPU: List = syscalls![
    ioctl, eventfd2, fcntl, socket, bind, listen, connect, unlink, statx
];

/// A device worker (virtio-blk, virtio-vsock, the console's stdin pump, and any device
/// started with `devices::virtio::WorkerThread::spawn`): waiting on its eventfds, disk I/O,
/// vectored reads and writes (a TAP) and its offloads (TUN's ioctls), and the vsock device's
/// host sockets (accepting, connecting to host services, stream I/O; `FIONBIO`).
const DEVICE_WORKER: List = syscalls![
    poll, ppoll, readv, writev, accept4, socket, connect, recvfrom, sendto, shutdown, ioctl,
];

/// An NBD connection: socket I/O and the export's disk I/O.
const NBD_CONNECTION: List = syscalls![recvfrom, sendto, shutdown];

/// The NBD server's accept loop (the main thread of `disk serve` once it listens) and its stop
/// watcher: accepting, setting up and refusing connections (`FIONBIO` its only ioctl), and at
/// the end flushing the exports and removing the socket file.
const NBD_SERVER: List = syscalls![accept4, ioctl, setsockopt, shutdown, unlink];

/// The main thread of `run` from just before the vCPUs start: starting them (through the
/// spawner), waiting, kicking vCPUs, writing a snapshot (KVM's ioctls only), handing the vsock
/// connections over, tearing down. It starts no threads itself.
const MAIN: List = syscalls![
    ioctl, tgkill, mkdir, socket, bind, listen, accept4, connect, sendto, sendmsg,
];

/// The API thread and the threads it starts (tiny_http's, an upgrade's, a merge's): HTTP on
/// its socket, snapshots (with the vsock connections sent to the restoring process), and the
/// upgrade: a clone of the VM (a new KVM VM, its memory and
/// devices, KVM's ioctls only), disk forks and merges, the agent's connection. They start
/// threads (`clone` with `CLONE_THREAD` only) but no processes, and never execute programs.
const API: List = syscalls![
    ioctl,
    tgkill,
    eventfd2,
    memfd_create,
    copy_file_range,
    socket,
    bind,
    listen,
    accept4,
    connect,
    recvfrom,
    sendto,
    sendmsg,
    shutdown,
    setsockopt,
    getsockname,
    mkdir,
    getdents64,
    readlink,
    getcwd,
    newfstatat,
    unlinkat,
    clone,
    clone3,
    set_robust_list,
    rseq,
    prctl,
    sched_getaffinity,
];

/// What a new thread does before its own filter is in place (glibc's and std's thread start),
/// and installing that filter.
const THREAD_START: List = syscalls![
    clone,
    clone3,
    set_robust_list,
    rseq,
    prctl,
    seccomp,
    sched_getaffinity,
];

/// The allow-list of `kind`, as `(number, name)` pairs (with duplicates).
pub(crate) fn allowed(kind: ThreadKind) -> Vec<(i64, &'static str)> {
    let lists = match kind {
        // Its threads start under its filter and then add their own: it allows what any of
        // them does, and starting threads.
        ThreadKind::Spawner => ThreadKind::ALL.iter().flat_map(|&k| lists_of(k)).collect(),
        k => lists_of(k),
    };
    lists.into_iter().flatten().copied().collect()
}

fn lists_of(kind: ThreadKind) -> Vec<List> {
    match kind {
        ThreadKind::Vcpu => vec![COMMON, VCPU],
        ThreadKind::DeviceWorker => vec![COMMON, DISK_IO, DEVICE_WORKER],
        ThreadKind::NbdConnection => vec![COMMON, DISK_IO, NBD_CONNECTION],
        ThreadKind::NbdServer => vec![COMMON, DISK_IO, NBD_SERVER],
        ThreadKind::Main => vec![COMMON, DISK_IO, MAIN],
        // An upgrade does on its own thread what the API's upgrade thread does.
        ThreadKind::Api | ThreadKind::Upgrade => vec![COMMON, DISK_IO, API],
        ThreadKind::Spawner => vec![COMMON, THREAD_START],
    }
}

/// The name of syscall `nr`, if any allow-list names it (for the SIGSYS log line).
pub(crate) fn name_of(nr: i64) -> Option<&'static str> {
    [
        COMMON,
        DISK_IO,
        VCPU,
        DEVICE_WORKER,
        NBD_CONNECTION,
        NBD_SERVER,
        MAIN,
        API,
        THREAD_START,
        NOTABLE,
    ]
    .iter()
    .copied()
    .flatten()
    .find(|(n, _)| *n == nr)
    .map(|(_, name)| *name)
}

/// Syscalls no thread may make, named in the SIGSYS log line.
const NOTABLE: List = &[
    (libc::SYS_execve, "execve"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_fork, "fork"),
    (libc::SYS_vfork, "vfork"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_syslog, "syslog"),
    (libc::SYS_open, "open"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_getppid, "getppid"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_setresuid, "setresuid"),
    (libc::SYS_setresgid, "setresgid"),
    (libc::SYS_setuid, "setuid"),
    (libc::SYS_setgid, "setgid"),
    (libc::SYS_setgroups, "setgroups"),
];

/// Builds the BPF program of `kind`. With `drop_to`, the three calls that switch to that user
/// are allowed with exactly its ids, on every kind: glibc makes every thread of the process run
/// them when one thread calls `setgroups`/`setgid`/`setuid`.
pub(crate) fn program(
    kind: ThreadKind,
    mode: Mode,
    drop_to: Option<(u32, u32)>,
) -> Result<seccompiler::BpfProgram, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let eq = |arg: u8, value: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(SandboxError::Build)
    };
    for (nr, _) in allowed(kind) {
        let only = match nr {
            // Threads, not processes: CLONE_THREAD must be set (clone3, whose flags a filter
            // cannot see, fails with ENOSYS: see `NO_CLONE3`, and glibc falls back to clone).
            libc::SYS_clone => vec![
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
                    libc::CLONE_THREAD as u64,
                )
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(SandboxError::Build)?,
            ],
            libc::SYS_ioctl => ioctl_rules(kind)?,
            // Naming a thread and installing a filter.
            libc::SYS_prctl => vec![
                eq(0, libc::PR_SET_NAME as u64)?,
                eq(0, libc::PR_GET_NAME as u64)?,
                eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)?,
            ],
            _ => Vec::new(),
        };
        rules.insert(nr, only);
    }
    if let Some((uid, gid)) = drop_to {
        for (nr, value) in [
            (libc::SYS_setgroups, 0),
            (libc::SYS_setgid, u64::from(gid)),
            (libc::SYS_setuid, u64::from(uid)),
        ] {
            rules.insert(nr, vec![eq(0, value)?]);
        }
    }
    let mismatch = match mode {
        Mode::Enforce => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SandboxError::Build)?;
    filter.try_into().map_err(SandboxError::Build)
}

/// The ioctls `kind` may make: KVM's (type 0xAE) for the kinds that drive a VM, TUN's (type
/// 'T') for device workers and the API's threads, and
/// `FIONBIO` (std's `set_nonblocking`) for all.
fn ioctl_rules(kind: ThreadKind) -> Result<Vec<SeccompRule>, SandboxError> {
    let request = |op, value| {
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, op, value)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(SandboxError::Build)
    };
    let mut rules = vec![request(SeccompCmpOp::Eq, libc::FIONBIO)?];
    if matches!(
        kind,
        ThreadKind::Vcpu
            | ThreadKind::Main
            | ThreadKind::Api
            | ThreadKind::Upgrade
            | ThreadKind::Spawner
    ) {
        rules.push(request(SeccompCmpOp::MaskedEq(0xff00), 0xae00)?);
    }
    if matches!(
        kind,
        ThreadKind::DeviceWorker | ThreadKind::Api | ThreadKind::Upgrade | ThreadKind::Spawner
    ) {
        // TUN's (type 'T'): a virtio-net worker sets its TAP's offloads; an upgrade's clone
        // creates its backup's detached TAPs.
        rules.push(request(SeccompCmpOp::MaskedEq(0xff00), 0x5400)?);
    }
    Ok(rules)
}

/// A second filter for the kinds that start threads: `clone3` fails with ENOSYS (its flags are
/// behind a pointer, so the allow-list could not tell a thread from a process), which makes
/// glibc start threads with `clone`, whose flags the allow-list checks.
pub(crate) fn no_clone3() -> Result<seccompiler::BpfProgram, SandboxError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .and_then(TryInto::try_into)
    .map_err(SandboxError::Build)
}

/// The per-thread-kind table of docs/ARCHITECTURE.md, generated from the lists above (a test
/// checks the document holds exactly this).
pub(crate) fn doc_table() -> String {
    let names = |l: List| {
        l.iter()
            .map(|(_, n)| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut t = String::from("| thread kind | allowed system calls |\n|---|---|\n");
    t += &format!("| every kind (\"common\") | {} |\n", names(COMMON));
    t += &format!("| \"disk I/O\" | {} |\n", names(DISK_IO));
    for kind in ThreadKind::ALL {
        let mut cells = Vec::new();
        for l in lists_of(kind) {
            if std::ptr::eq(l, COMMON) {
                cells.push("common".to_string());
            } else if std::ptr::eq(l, DISK_IO) {
                cells.push("disk I/O".to_string());
            } else {
                cells.push(names(l));
            }
        }
        if kind == ThreadKind::Spawner {
            cells.push("everything any other kind may make".to_string());
        }
        t += &format!("| `{}` | {} |\n", kind.name(), cells.join("; "));
    }
    t
}
