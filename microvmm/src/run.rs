//! `microvmm run`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::SerialDevice;

use devices::virtio::net::MacAddr;
use vmm::config::{
    ConsoleTarget, DiskConfig, FileConfig, KernelSource, MachineConfig, NetConfig, VsockConfig,
};
use vmm::{Machine, MachineError, StopReason};
use vmm_test_guests as guests;

/// Arguments of `microvmm run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Kernel image: bzImage or ELF vmlinux (PVH entry used when present). Without it (and
    /// without --config), the embedded test guest `hello` boots.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: console=ttyS0 reboot=k panic=1 pci=off i8042.noaux
    /// i8042.nomux i8042.dumbkbd].
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Disk for a virtio-blk device (repeatable): a delta directory (writable; its writes go
    /// through the dirty-extent journal), or a raw base image with an identity (read-only; make a
    /// writable delta on it with `microvmm disk create -f delta -b BASE DIR`).
    #[arg(long)]
    disk: Vec<PathBuf>,
    /// Attach a disk read-only (repeatable).
    #[arg(long)]
    disk_ro: Vec<PathBuf>,
    /// Guest CID of a virtio-vsock device (3 or above; with --vsock-uds).
    #[arg(long, requires = "vsock_uds")]
    vsock_cid: Option<u64>,
    /// Host Unix socket of the vsock device: connect and send `CONNECT <port>` to reach a guest
    /// port; guest connections to port P reach `<path>_<P>`. A stale socket file there is
    /// replaced; any other file, or a socket in use, is an error.
    #[arg(long, requires = "vsock_cid")]
    vsock_uds: Option<PathBuf>,
    /// A virtio-net device on an existing TAP interface (repeatable):
    /// `tap=NAME[,mac=XX:XX:XX:XX:XX:XX][,id=IFACE]`. Without `mac`, a random locally
    /// administered address (a restored VM keeps its saved one).
    #[arg(long, value_name = "tap=NAME[,mac=MAC][,id=ID]")]
    net: Vec<String>,
    /// Serial console: `stdout`, `null`, or a file path.
    #[arg(long, default_value = "stdout")]
    console: String,
    /// Boot a guest of the test-guest kit by name (hello, counter, dirtier, smp, reset,
    /// chaos, triple_fault, emulation_failure, cpuid_dump, insn_probe, virtio_net, ...).
    #[arg(long, conflicts_with = "kernel")]
    test_guest: Option<String>,
    /// Also put `virtio_mmio.device=` entries on the command line.
    #[arg(long)]
    virtio_mmio_cmdline: bool,
    /// Firecracker-style JSON config file (replaces the machine options: giving one of them
    /// too is an error, not silently ignored).
    #[arg(long, conflicts_with_all = [
        "kernel", "initrd", "cmdline", "mem_mib", "vcpus", "disk", "disk_ro", "vsock_cid",
        "vsock_uds", "console", "test_guest", "virtio_mmio_cmdline", "net",
    ])]
    config: Option<PathBuf>,
    /// Print boot and exit timings to stderr.
    #[arg(long)]
    timings: bool,
    /// Serve the control API (HTTP/1.1, JSON) on this Unix socket: status, pause/resume,
    /// snapshots, live upgrades (`microvmm ctl`, `microvmm upgrade --api-socket`).
    #[arg(long, conflicts_with_all = ["snapshot_after", "snapshot_to"])]
    api_socket: Option<PathBuf>,
    /// Start from a snapshot directory (written by --snapshot-to) instead of booting; the other
    /// options give the devices (the same kinds as when it was saved) and the console.
    #[arg(long)]
    restore: Option<PathBuf>,
    /// After this many milliseconds of running, pause the VM, write a snapshot to
    /// --snapshot-to and end the VM.
    #[arg(long, requires = "snapshot_to")]
    snapshot_after: Option<u64>,
    /// Snapshot directory for --snapshot-after.
    #[arg(long, requires = "snapshot_after")]
    snapshot_to: Option<PathBuf>,
    /// Hand the vsock connections over with the snapshot through this Unix socket, so they go
    /// on in the restoring process. With --snapshot-to: listen here after writing the snapshot
    /// and send the connections' host sockets to the first client (waits up to 60 s). With
    /// --restore: connect here (retrying up to 60 s) and take them over.
    #[arg(long)]
    handover: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) sandbox: SandboxArgs,
}

/// The sandbox options of `run` and `disk serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SandboxArgs {
    /// Run without the seccomp filters (for debugging: by default every thread runs under
    /// its kind's filter, and a forbidden system call ends the process with SIGSYS).
    #[arg(long)]
    pub(crate) no_seccomp: bool,
    /// Switch to this user (numeric `UID:GID`, no supplementary groups) once /dev/kvm, the
    /// disks and the sockets are open, before the guest runs.
    #[arg(long, value_name = "UID:GID", value_parser = sandbox::parse_user)]
    pub(crate) user: Option<(u32, u32)>,
}

impl SandboxArgs {
    /// Turns the sandbox on (unless `--no-seccomp`); call before any thread starts.
    /// `MICROVMM_SECCOMP=log` makes the filters log what they would forbid (to the kernel's
    /// audit log) instead of enforcing it: for finding what a new thread needs.
    pub fn init(&self) -> Result<(), sandbox::SandboxError> {
        if self.no_seccomp {
            return Ok(());
        }
        let mode = match std::env::var("MICROVMM_SECCOMP").as_deref() {
            Ok("log") => sandbox::Mode::Log,
            _ => sandbox::Mode::Enforce,
        };
        sandbox::init(sandbox::Config {
            mode,
            drop_to: self.user,
        })
    }

    /// Switches to `--user`, if given (once everything privileged is open).
    pub fn drop_privileges(&self) -> Result<(), sandbox::SandboxError> {
        match self.user {
            Some((uid, gid)) => sandbox::drop_privileges(uid, gid),
            None => Ok(()),
        }
    }
}

fn console_target(s: &str) -> ConsoleTarget {
    match s {
        "stdout" | "-" => ConsoleTarget::Stdout,
        "null" | "none" => ConsoleTarget::Null,
        path => ConsoleTarget::File(path.into()),
    }
}

/// Parses one `--net` value: `tap=NAME[,mac=MAC][,id=ID]`; the id defaults to `eth<index>`.
pub fn parse_net(value: &str, index: usize) -> Result<NetConfig, String> {
    let mut tap = None;
    let mut mac = None;
    let mut id = None;
    for part in value.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("--net {value}: `{part}` is not KEY=VALUE"))?;
        let slot = match k {
            "tap" => &mut tap,
            "mac" => &mut mac,
            "id" => &mut id,
            _ => return Err(format!("--net {value}: unknown key `{k}` (tap, mac, id)")),
        };
        if slot.replace(v.to_owned()).is_some() {
            return Err(format!("--net {value}: `{k}` given twice"));
        }
    }
    let host_dev_name = tap.ok_or_else(|| format!("--net {value}: tap=NAME is required"))?;
    let guest_mac = mac
        .map(|m| m.parse::<MacAddr>())
        .transpose()
        .map_err(|e| format!("--net {value}: {e}"))?;
    Ok(NetConfig {
        iface_id: id.unwrap_or_else(|| format!("eth{index}")),
        host_dev_name,
        guest_mac,
    })
}

fn machine_config(args: &RunArgs) -> Result<MachineConfig, Box<dyn std::error::Error>> {
    if let Some(path) = &args.config {
        return Ok(FileConfig::load(path)?);
    }
    let kernel = match (&args.kernel, &args.test_guest) {
        (Some(k), _) => KernelSource::File(k.clone()),
        (None, Some(g)) => KernelSource::TestGuest(g.clone()),
        (None, None) => KernelSource::TestGuest(guests::DEFAULT.name.to_string()),
    };
    Ok(MachineConfig {
        vcpus: args.vcpus,
        mem_mib: args.mem_mib,
        kernel,
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        console: console_target(&args.console),
        disks: args
            .disk
            .iter()
            .map(|p| (p, false))
            .chain(args.disk_ro.iter().map(|p| (p, true)))
            .map(|(p, read_only)| DiskConfig {
                path: p.clone(),
                read_only,
            })
            .collect(),
        virtio_mmio_cmdline: args.virtio_mmio_cmdline,
        vsock: match (args.vsock_cid, &args.vsock_uds) {
            (Some(guest_cid), Some(uds_path)) => Some(VsockConfig {
                guest_cid,
                uds_path: uds_path.clone(),
            }),
            (None, None) => None,
            _ => return Err("--vsock-cid and --vsock-uds go together".into()),
        },
        net: args
            .net
            .iter()
            .enumerate()
            .map(|(i, v)| parse_net(v, i))
            .collect::<Result<_, _>>()?,
    })
}

/// Refuses, before any VM is built, a vsock socket path the device could not listen on (it
/// binds it only when the guest activates it, where a failure would go unnoticed): an
/// existing file that is not a stale socket, a socket in use, a directory that does not exist.
fn check_vsock_socket(cfg: &MachineConfig) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(v) = &cfg.vsock {
        devices::virtio::vsock::muxer::check_host_socket(&v.uds_path)?;
    }
    Ok(())
}

/// Feeds the VMM's stdin to the guest's COM1 from a background thread (ends at EOF), under the
/// device-worker filter (it is the console's input side).
fn forward_stdin(serial: Arc<Mutex<SerialDevice>>) {
    let _ = sandbox::spawn(
        sandbox::ThreadKind::DeviceWorker,
        std::thread::Builder::new().name("stdin".into()),
        move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    return;
                }
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let took = serial
                        .lock()
                        .map(|mut s| s.enqueue_input(rest).unwrap_or(0))
                        .unwrap_or(0);
                    rest = &rest[took..];
                    if took == 0 {
                        // The UART's receive FIFO is full: let the guest drain it.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        },
    );
}

/// Runs `microvmm run`: exit status 0 when the guest powers off or resets, 1 on an error.
pub fn main(args: RunArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let cfg = machine_config(&args)?;
    args.sandbox.init()?;
    let interactive = cfg.console == ConsoleTarget::Stdout;
    if args.handover.is_some() && args.restore.is_none() && args.snapshot_to.is_none() {
        return Err("--handover goes with --restore or --snapshot-to".into());
    }
    let mut m = match &args.restore {
        Some(dir) => match &args.handover {
            Some(path) => {
                let h = crate::handover::receive(path)?;
                eprintln!("microvmm: took over {} vsock connection(s)", h.len());
                // Only now: the saving process may have used the same socket path until it
                // handed its connections over.
                check_vsock_socket(&cfg)?;
                Machine::restore_snapshot_handover(cfg, None, dir, h)?
            }
            None => {
                check_vsock_socket(&cfg)?;
                Machine::restore_snapshot(cfg, None, dir)?
            }
        },
        None => {
            check_vsock_socket(&cfg)?;
            let mut m = Machine::new(cfg, None)?;
            m.boot()?;
            m
        }
    };
    let api = match &args.api_socket {
        Some(path) => Some(crate::api::Api::bind(path)?),
        None => None,
    };
    // Everything privileged is open: /dev/kvm, the VM, its memory, disks and sockets.
    args.sandbox.drop_privileges()?;
    if interactive {
        forward_stdin(m.serial().clone());
    }
    // This thread is filtered before the guest runs (its filter has no rt_sigaction, so the
    // vCPU kick handler goes in first).
    vmm::vcpu::install_kick_handler()?;
    sandbox::apply(sandbox::ThreadKind::Main)?;
    m.start()?;
    if let Some(api) = api {
        return crate::api::run_until_stopped(m, api);
    }
    let reason = match (args.snapshot_after, &args.snapshot_to) {
        (Some(ms), Some(dir)) => match m.wait(Some(Duration::from_millis(ms))) {
            Err(MachineError::Timeout(_)) => {
                m.pause()?;
                let (meta, handover) = match &args.handover {
                    Some(_) => {
                        let (meta, h) = m.save_snapshot_handover(dir)?;
                        (meta, Some(h))
                    }
                    None => (m.save_snapshot(dir)?, None),
                };
                m.stop()?;
                eprintln!(
                    "microvmm: snapshot of {} vCPU(s) and {} MiB written to {}",
                    meta.vcpus,
                    meta.mem_size >> 20,
                    dir.display()
                );
                if let (Some(path), Some(h)) = (&args.handover, handover) {
                    crate::handover::send(path, &h)?;
                    eprintln!("microvmm: handed {} vsock connection(s) over", h.len());
                }
                Ok(StopReason::Stopped)
            }
            other => other,
        },
        _ => m.wait(None),
    };
    let done = Instant::now();
    if args.timings {
        let t = m.timeline();
        if let Some(first) = m.serial_stats().first_byte_at() {
            eprintln!(
                "microvmm: KVM_CREATE_VM to first serial byte: {:?}",
                first.duration_since(t.created)
            );
        }
        if let Some(at) = m.power().requested_at() {
            eprintln!(
                "microvmm: guest power-off request to VM torn down: {:?}",
                done.duration_since(at)
            );
        }
        eprintln!("microvmm: total: {:?}", done.duration_since(t.created));
    }
    match reason? {
        StopReason::PowerOff | StopReason::Reset | StopReason::Stopped => Ok(ExitCode::SUCCESS),
        StopReason::Halted => Err("the guest halted with nothing to wake it".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_net;

    #[test]
    fn net_options_parse_and_name_what_is_wrong() {
        let n = parse_net("tap=tap0", 0).unwrap();
        assert_eq!(
            (n.iface_id.as_str(), n.host_dev_name.as_str()),
            ("eth0", "tap0")
        );
        assert_eq!(n.guest_mac, None);
        let n = parse_net("id=uplink,mac=06:00:ac:10:00:02,tap=t1", 3).unwrap();
        assert_eq!(n.iface_id, "uplink");
        assert_eq!(n.host_dev_name, "t1");
        assert_eq!(n.guest_mac.unwrap().to_string(), "06:00:ac:10:00:02");
        for (bad, says) in [
            ("mac=06:00:ac:10:00:02", "tap=NAME is required"),
            ("tap=t0,mac=06:00:zz:10:00:02", "06:00:zz:10:00:02"),
            ("tap=t0,mac=01:00:5e:00:00:01", "01:00:5e:00:00:01"),
            ("tap=t0,speed=10", "unknown key `speed`"),
            ("tap=t0,tap=t1", "`tap` given twice"),
            ("t0", "not KEY=VALUE"),
        ] {
            let e = parse_net(bad, 0).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
