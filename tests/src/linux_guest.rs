//! Linux guests for the tests that need hardware KVM (they SKIP on an emulating host and run for
//! real in the nested harness): the Debian images, a machine configuration, and typing at the
//! guest's serial console.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use devices::legacy::SharedBuffer;
use vmm::Machine;
use vmm::config::{ConsoleTarget, KernelSource, MachineConfig};

use crate::TestVm;

/// Banner the minimal image's init prints before it starts the shell.
pub const MINIMAL_BANNER: &str = "microvmm minimal guest:";

/// The guest images the nested harness attaches in level 1 (`MICROVMM_GUEST_IMAGES`, see
/// `scripts/nested.sh --images`), where the image builders cannot run.
pub fn nested_images() -> Option<PathBuf> {
    std::env::var_os("MICROVMM_GUEST_IMAGES").map(PathBuf::from)
}

/// Runs a guest image builder of `guest/` and returns its last `n` output lines (paths).
fn build_image(script: &str, n: usize) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(root.join("guest").join(script))
        .output()
        .unwrap_or_else(|e| panic!("run guest/{script}: {e}"));
    assert!(
        out.status.success(),
        "guest/{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() >= n,
        "guest/{script} printed fewer than {n} lines: {text}"
    );
    lines[lines.len() - n..].iter().map(PathBuf::from).collect()
}

/// The minimal Linux image (kernel, busybox initramfs with a shell on the console): the nested
/// harness's copies in level 1, or built by `guest/build-linux-image.sh`.
pub fn minimal_linux_image() -> (PathBuf, PathBuf) {
    if let Some(dir) = nested_images() {
        return (dir.join("vmlinuz"), dir.join("minimal.cpio.gz"));
    }
    let p = build_image("build-linux-image.sh", 2);
    (p[0].clone(), p[1].clone())
}

/// The full guest image (kernel, initramfs with the agent, ext4 root): the nested harness's
/// copies in level 1, or built by `guest/build-guest-image.sh`.
pub fn full_guest_image() -> (PathBuf, PathBuf, PathBuf) {
    if let Some(dir) = nested_images() {
        return (
            dir.join("vmlinuz"),
            dir.join("guest-initrd.cpio.gz"),
            dir.join("guest-root.ext4"),
        );
    }
    let p = build_image("build-guest-image.sh", 3);
    (p[0].clone(), p[1].clone(), p[2].clone())
}

/// The newer kernel the real-Linux upgrade installs and restarts into
/// (`guest/build-upgrade-kernel.sh`): the volume holding its Debian packages, its vmlinuz and a
/// guest initramfs for it; `None` where it could not be built (no `bookworm-backports`).
pub fn upgrade_kernel_image() -> Option<(PathBuf, PathBuf, PathBuf)> {
    if let Some(dir) = nested_images() {
        let staging = dir.join("upgrade-staging.ext4");
        return staging.is_file().then(|| {
            (
                staging,
                dir.join("upgrade-vmlinuz"),
                dir.join("upgrade-initrd.cpio.gz"),
            )
        });
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(root.join("guest/build-upgrade-kernel.sh"))
        .output()
        .ok()?;
    if !out.status.success() {
        println!(
            "guest/build-upgrade-kernel.sh failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let p: Vec<PathBuf> = text.lines().map(PathBuf::from).collect();
    (p.len() >= 3).then(|| {
        let n = p.len();
        (p[n - 3].clone(), p[n - 2].clone(), p[n - 1].clone())
    })
}

/// A Linux guest with the console captured by the test, no disks, no vsock.
pub fn linux_cfg(
    vcpus: u8,
    mem_mib: u64,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: Option<&str>,
) -> MachineConfig {
    MachineConfig {
        vcpus,
        mem_mib,
        kernel: KernelSource::File(kernel),
        initrd,
        cmdline: cmdline.map(str::to_string),
        console: ConsoleTarget::Null,
        disks: Vec::new(),
        virtio_mmio_cmdline: false,
        net: Vec::new(),
        vsock: None,
    }
}

/// `buf` as text.
pub fn text(buf: &SharedBuffer) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

/// Waits until `buf` holds `needle` after byte `from`; false on timeout.
pub fn wait_text_from(buf: &SharedBuffer, from: usize, needle: &str, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if text(buf).get(from..).is_some_and(|t| t.contains(needle)) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Types `s` on `machine`'s serial console (whose output is `out`, shown if the guest stops
/// reading), feeding the 64-byte receive FIFO as the guest drains it.
pub fn type_text(machine: &Machine, out: &SharedBuffer, s: &str) {
    let mut rest = s.as_bytes();
    let end = Instant::now() + Duration::from_secs(30);
    while !rest.is_empty() {
        let took = machine
            .serial()
            .lock()
            .unwrap()
            .enqueue_input(rest)
            .unwrap();
        rest = &rest[took..];
        if took == 0 {
            assert!(
                Instant::now() < end,
                "the guest stopped reading the console:\n{}",
                text(out)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Where each vCPU of a running `machine` is (MP state, RIP, RFLAGS, CR3), to diagnose a guest
/// that stopped making progress.
pub fn vcpu_report(machine: &Machine) -> String {
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = std::sync::Arc::clone(&lines);
    let done = machine.on_each_vcpu(std::sync::Arc::new(move |v| {
        let fd = v.fd();
        let regs = fd.get_regs();
        let sregs = fd.get_sregs();
        let mp = fd.get_mp_state();
        let line = match (regs, sregs, mp) {
            (Ok(r), Ok(s), Ok(mp)) => format!(
                "vCPU {}: mp_state {} rip {:#x} rflags {:#x} rsp {:#x} cr3 {:#x}",
                v.id(),
                mp.mp_state,
                r.rip,
                r.rflags,
                r.rsp,
                s.cr3
            ),
            (r, s, mp) => format!(
                "vCPU {}: {:?} {:?} {:?}",
                v.id(),
                r.err(),
                s.err(),
                mp.err()
            ),
        };
        l.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }));
    let mut v = lines.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Err(e) = done {
        v.push(format!("(vCPU report: {e})"));
    }
    v.sort();
    v.join("\n")
}

/// Waits for the minimal image's init banner in `out`, then types `s` at the shell.
pub fn type_at_shell(machine: &Machine, out: &SharedBuffer, s: &str) {
    if !wait_text_from(out, 0, MINIMAL_BANNER, Duration::from_secs(120)) {
        // Twice, a second apart: a stuck vCPU shows the same place.
        let first = vcpu_report(machine);
        std::thread::sleep(Duration::from_secs(1));
        panic!(
            "no init banner:\n{}\n--- vCPUs:\n{first}\n--- a second later:\n{}",
            text(out),
            vcpu_report(machine)
        );
    }
    type_text(machine, out, s);
}

/// The numbers `N` of the complete `<prefix>N` lines in `s`, in order.
pub fn numbered_lines(s: &str, prefix: &str) -> Vec<u64> {
    s.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix(prefix)?.parse().ok())
        .collect()
}

/// The full guest image (Debian kernel, initramfs with the agent, ext4 root on a virtio-blk
/// delta over a copy of the root image in `dir`), vsock CID 3, network devices `net`, started;
/// returns it with its vsock host socket.
pub fn full_guest_vm(dir: &Path, net: Vec<vmm::config::NetConfig>) -> (TestVm, PathBuf) {
    full_guest_vm_with(dir, net, &[])
}

/// Environment variable that sets the vCPU count of the Linux guests of the hardware-KVM tests
/// (default 2). The nested tests forward it into level 1; CI sets 1 there (with one level-1
/// vCPU, a two-vCPU guest once spun forever waiting for its other vCPU: see docs/ARCHITECTURE.md).
pub const VCPUS_ENV: &str = "MICROVMM_TEST_LINUX_VCPUS";

/// The Linux test guests' vCPUs: [`VCPUS_ENV`] if it holds 1 to 8, else 2.
pub fn full_guest_vcpus() -> u8 {
    std::env::var(VCPUS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=8).contains(n))
        .unwrap_or(2)
}

/// [`full_guest_vm`] with more disks after the root (`/dev/vdb`, ...): each raw image in
/// `extra` becomes the read-only base of a fresh delta in `dir`.
pub fn full_guest_vm_with(
    dir: &Path,
    net: Vec<vmm::config::NetConfig>,
    extra: &[PathBuf],
) -> (TestVm, PathBuf) {
    crate::log_to_stderr();
    let (kernel, initrd, rootimg) = full_guest_image();
    let img = dir.join("root.ext4");
    std::fs::copy(rootimg, &img).unwrap();
    let base = block::Base::adopt(&img).unwrap();
    let delta_dir = dir.join("root-delta");
    drop(block::Delta::create(&delta_dir, std::sync::Arc::new(block::Layer::Base(base))).unwrap());
    let mut disks = vec![vmm::config::DiskConfig {
        path: delta_dir,
        read_only: false,
    }];
    for (i, img) in extra.iter().enumerate() {
        let base = block::Base::adopt(img).unwrap();
        let d = dir.join(format!("disk{}-delta", i + 1));
        drop(block::Delta::create(&d, std::sync::Arc::new(block::Layer::Base(base))).unwrap());
        disks.push(vmm::config::DiskConfig {
            path: d,
            read_only: false,
        });
    }
    let uds = dir.join("v.sock");
    let cfg = MachineConfig {
        disks,
        vsock: Some(vmm::config::VsockConfig {
            guest_cid: 3,
            uds_path: uds.clone(),
        }),
        net,
        ..linux_cfg(
            full_guest_vcpus(),
            1024,
            kernel,
            Some(initrd),
            Some("console=ttyS0 panic=-1 microvmm.hostname=g1"),
        )
    };
    let mut vm = TestVm::boot(cfg).unwrap();
    vm.machine.start().unwrap();
    (vm, uds)
}

/// Connects to the guest's service at `addr`, retrying (up to 120 s) until it listens.
pub fn connect_service(addr: &str) -> std::net::TcpStream {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        match std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)) {
            Ok(s) => return s,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the service at {addr} never answered: {e}"
                );
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// Connects to the guest agent on vsock port 1024 through the device's Unix socket `uds`,
/// retrying (up to 180 s) until it listens; panics if it never does. Reads on the stream time
/// out after 300 s.
pub fn agent_stream(vm: &TestVm, uds: &Path) -> std::os::unix::net::UnixStream {
    try_agent_stream(vm, uds).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`agent_stream`], but an error instead of a panic, and at once when a vCPU of the VM
/// has stopped (the guest died while booting: it will never answer).
pub fn try_agent_stream(vm: &TestVm, uds: &Path) -> Result<std::os::unix::net::UnixStream, String> {
    use std::io::{BufRead, Write};
    // Until the agent listens, the guest refuses the connection and the host side closes it.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(why) = vm.machine.stopped_vcpu() {
            return Err(format!(
                "the guest died before its agent answered: {why}\n{}",
                vm.serial_text()
            ));
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "agent never answered on vsock port 1024:\n{}",
                vm.serial_text()
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(uds) else {
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if s.write_all(b"CONNECT 1024\n").is_err() {
            continue;
        }
        let mut line = String::new();
        let mut r = std::io::BufReader::new(s.try_clone().unwrap());
        if r.read_line(&mut line).is_ok() && line.starts_with("OK ") {
            // 10 s was for the handshake; an agent answer (a CRIU dump in level 1 of the
            // nested harness, say) may take much longer. Callers may set their own.
            s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
            return Ok(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_lines_takes_complete_lines_only() {
        let s = "tick-1\r\ntick-2\nk-3\ntick-4x\n# tick-5\ntick-6\n";
        assert_eq!(numbered_lines(s, "tick-"), vec![1, 2, 6]);
    }
}
