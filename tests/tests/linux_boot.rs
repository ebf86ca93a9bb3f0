//! Linux guests under `Machine`.
//!
//! - With hardware KVM: the minimal Debian guest from `guest/build-linux-image.sh` (cloud kernel
//!   bzImage + busybox initramfs) boots to its shell, answers a command on the serial console,
//!   and powers off (exit status 0).
//! - On any KVM: the same Debian kernel, as the uncompressed ELF vmlinux inside its bzImage,
//!   boots through the PVH entry far enough to print the e820 map, the ACPI tables and the MADT
//!   contents this VMM built. (Its full boot takes minutes on an emulating KVM, so the test stops
//!   the VM once those lines are out.)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use microvmm_tests::{TestVm, hardware_kvm_or_skip, kvm_or_skip};
use vmm::StopReason;
use vmm::config::{ConsoleTarget, KernelSource, MachineConfig};

/// The Debian cloud kernel `guest/build-linux-image.sh` caches, if it has run.
fn cached_debian_kernel() -> Option<PathBuf> {
    let dir = std::fs::read_dir("/var/cache/microvmm/kernel").ok()?;
    let mut k: Vec<PathBuf> = dir
        .filter_map(|e| Some(e.ok()?.path().join("vmlinuz")))
        .filter(|p| p.is_file())
        .collect();
    k.sort();
    k.pop()
}

/// Extracts the ELF vmlinux from a bzImage (payload located by the setup header, decompressed
/// with the matching command-line tool).
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<(), String> {
    let d = std::fs::read(bzimage).map_err(|e| e.to_string())?;
    if d.len() < 0x250 || &d[0x202..0x206] != b"HdrS" {
        return Err("not a bzImage".into());
    }
    let setup_sects = match d[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let u32_at = |o: usize| u32::from_le_bytes([d[o], d[o + 1], d[o + 2], d[o + 3]]) as usize;
    let start = (setup_sects + 1) * 512 + u32_at(0x248);
    let payload = d
        .get(start..start + u32_at(0x24c))
        .ok_or("payload out of range")?;
    let tool: &[&str] = match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => &["lz4", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dc"],
        [0xfd, b'7', b'z', b'X', b'Z', ..] => &["xz", "-dc"],
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        _ => return Err("unknown payload compression".into()),
    };
    let packed = out.with_extension("packed");
    std::fs::write(&packed, payload).map_err(|e| e.to_string())?;
    let o = Command::new(tool[0])
        .args(&tool[1..])
        .arg(&packed)
        .output()
        .map_err(|e| format!("{}: {e}", tool[0]))?;
    // lz4 legacy frames may be followed by padding it complains about; keep what it produced.
    if o.stdout.len() < 4 || &o.stdout[..4] != b"\x7fELF" {
        return Err(format!(
            "{} produced no ELF: {}",
            tool[0],
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    std::fs::write(out, &o.stdout).map_err(|e| e.to_string())
}

/// Waits for the minimal image's init banner, then types `s` on the guest's serial console.
fn type_at_shell(vm: &TestVm, s: &str) {
    assert!(
        vm.wait_serial("microvmm minimal guest:", Duration::from_secs(120)),
        "no init banner:\n{}",
        vm.serial_text()
    );
    vm.machine
        .serial()
        .lock()
        .unwrap()
        .enqueue_input(s.as_bytes())
        .unwrap();
}

/// A Linux guest with the console captured by the test, no disks, no vsock.
fn linux_cfg(
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
        vsock: None,
    }
}

#[test]
fn linux_pvh_early_boot_sees_our_e820_and_acpi() {
    let test = "linux_pvh_early_boot_sees_our_e820_and_acpi";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(bz) = cached_debian_kernel() else {
        println!(
            "SKIP: {test}: no Debian kernel in /var/cache/microvmm/kernel (scripts/setup.d runs \
             guest/build-linux-image.sh, which fetches it)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let vmlinux = dir.path().join("vmlinux");
    if let Err(e) = extract_vmlinux(&bz, &vmlinux) {
        println!(
            "SKIP: {test}: cannot extract vmlinux from {}: {e}",
            bz.display()
        );
        return;
    }
    let cfg = linux_cfg(
        2,
        64,
        vmlinux,
        None,
        Some("console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr panic=1"),
    );
    let mut vm = TestVm::boot(cfg).unwrap();
    vm.machine.start().unwrap();
    let last = "smpboot: Allowing 2 CPUs";
    let seen = vm.wait_serial(last, Duration::from_secs(180));
    vm.machine.stop().unwrap();
    let out = vm.serial_text();
    assert!(seen, "no `{last}` within 180 s; console:\n{out}");
    for want in [
        "Command line: console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr panic=1",
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x0000000003ffffff] usable",
        "Hypervisor detected: KVM",
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 MCRVMM)",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
        "ACPI: LAPIC_NMI (acpi_id[0xff] dfl dfl lint[0x1])",
    ] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
}

#[test]
fn linux_bzimage_decompressor_reads_our_zero_page() {
    let test = "linux_bzimage_decompressor_reads_our_zero_page";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(bz) = cached_debian_kernel() else {
        println!("SKIP: {test}: no Debian kernel in /var/cache/microvmm/kernel");
        return;
    };
    let cfg = linux_cfg(
        1,
        128,
        bz,
        None,
        Some("console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr"),
    );
    let mut vm = TestVm::boot(cfg).unwrap();
    let started = std::time::Instant::now();
    vm.machine.start().unwrap();
    // The decompressor (64-bit entry of the bzImage) parses the command line from the zero page
    // and reports on the early console; decompressing itself takes far longer here.
    let want = "KASLR disabled: 'nokaslr' on cmdline.";
    let seen = vm.wait_serial(want, Duration::from_secs(120));
    vm.machine.stop().unwrap();
    assert!(seen, "no `{want}` within 120 s:\n{}", vm.serial_text());
    println!("{test}: decompressor message after {:?}", started.elapsed());
}

#[test]
fn linux_boots_to_a_shell_on_hardware_kvm() {
    let test = "linux_boots_to_a_shell_on_hardware_kvm";
    if !hardware_kvm_or_skip(test) {
        return;
    }
    let (kernel, initrd) = minimal_linux_image();
    let cfg = linux_cfg(2, 512, kernel, Some(initrd), None);
    let mut vm = TestVm::boot(cfg).unwrap();
    vm.machine.start().unwrap();
    let type_line = |s: &str| type_at_shell(&vm, s);
    type_line("echo shell-$((40+2))\n");
    assert!(
        vm.wait_serial("shell-42", Duration::from_secs(30)),
        "no shell answer:\n{}",
        vm.serial_text()
    );
    type_line("poweroff -f\n");
    assert_eq!(
        vm.machine.wait(Some(Duration::from_secs(60))).unwrap(),
        StopReason::PowerOff
    );
}

/// Builds the minimal Linux image; returns (kernel, initrd).
fn minimal_linux_image() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(root.join("guest/build-linux-image.sh"))
        .output()
        .expect("run guest/build-linux-image.sh");
    assert!(
        out.status.success(),
        "guest/build-linux-image.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let [.., kernel, initrd] = lines.as_slice() else {
        panic!("guest/build-linux-image.sh printed fewer than two lines: {text}");
    };
    (kernel.into(), initrd.into())
}

/// With hardware KVM: the Debian guest finds our virtio-mmio devices through ACPI, mounts the
/// ext4 virtio-blk disk (a delta over a raw base), reads a file the host put there, writes one,
/// and binds the virtio-vsock driver; the guest's writes are in the delta's journal.
/// (Host<->guest vsock traffic under Linux is not exercised here: the minimal image has no vsock
/// client; the device itself is tested with the CPL3 guest in tests/virtio.rs.)
#[test]
fn linux_mounts_virtio_blk_and_binds_vsock_on_hardware_kvm() {
    let test = "linux_mounts_virtio_blk_and_binds_vsock_on_hardware_kvm";
    if !hardware_kvm_or_skip(test) {
        return;
    }
    let (kernel, initrd) = minimal_linux_image();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("hello.txt"), "hello from the host\n").unwrap();
    let img = dir.path().join("disk.img");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("64M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(st.success());
    let base = block::Base::adopt(&img).unwrap();
    let delta_dir = dir.path().join("delta");
    drop(block::Delta::create(&delta_dir, std::sync::Arc::new(block::Layer::Base(base))).unwrap());
    let cfg = MachineConfig {
        disks: vec![vmm::config::DiskConfig {
            path: delta_dir.clone(),
            read_only: false,
        }],
        vsock: Some(vmm::config::VsockConfig {
            guest_cid: 3,
            uds_path: dir.path().join("v.sock"),
        }),
        ..linux_cfg(2, 512, kernel, Some(initrd), None)
    };
    let mut vm = TestVm::boot(cfg).unwrap();
    vm.machine.start().unwrap();
    let type_line = |s: &str| type_at_shell(&vm, s);
    type_line(
        "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && cat /mnt/hello.txt && \
         echo from-guest > /mnt/guest.txt && sync && echo blk-$((6*7))\n",
    );
    assert!(
        vm.wait_serial("blk-42", Duration::from_secs(60)),
        "virtio-blk in Linux failed:\n{}",
        vm.serial_text()
    );
    assert!(vm.serial_text().contains("hello from the host"));
    type_line(
        "test -c /dev/vsock && cat /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio*/device && echo vsock-ok\n",
    );
    assert!(
        vm.wait_serial("vsock-ok", Duration::from_secs(30)),
        "virtio-vsock in Linux failed:\n{}",
        vm.serial_text()
    );
    assert!(vm.serial_text().contains("0x0013"));
    type_line("umount /mnt; poweroff -f\n");
    assert_eq!(
        vm.machine.wait(Some(Duration::from_secs(60))).unwrap(),
        StopReason::PowerOff
    );
    drop(vm);
    let delta = block::Delta::open(&delta_dir).unwrap();
    assert!(
        !delta.changed_since(0).is_empty(),
        "the guest's ext4 writes are in the delta"
    );
}

/// With hardware KVM: the full guest image (Debian kernel, initramfs with the guest agent, ext4
/// root on a virtio-blk delta) boots under microvmm, and the host reaches the agent over our
/// virtio-vsock device (`CONNECT 1024` on the device's Unix socket), pings it and runs a command
/// that shows the root file system is our virtio-blk disk.
#[test]
fn linux_agent_answers_over_vsock_on_hardware_kvm() {
    let test = "linux_agent_answers_over_vsock_on_hardware_kvm";
    if !hardware_kvm_or_skip(test) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(root.join("guest/build-guest-image.sh"))
        .output()
        .expect("run guest/build-guest-image.sh");
    assert!(out.status.success(), "guest/build-guest-image.sh failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let [.., kernel, initrd, rootimg] = lines.as_slice() else {
        panic!("guest/build-guest-image.sh printed fewer than three lines: {text}");
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("root.ext4");
    std::fs::copy(rootimg, &img).unwrap();
    let base = block::Base::adopt(&img).unwrap();
    let delta_dir = dir.path().join("root-delta");
    drop(block::Delta::create(&delta_dir, std::sync::Arc::new(block::Layer::Base(base))).unwrap());
    let uds = dir.path().join("v.sock");
    let cfg = MachineConfig {
        disks: vec![vmm::config::DiskConfig {
            path: delta_dir,
            read_only: false,
        }],
        vsock: Some(vmm::config::VsockConfig {
            guest_cid: 3,
            uds_path: uds.clone(),
        }),
        ..linux_cfg(
            2,
            1024,
            kernel.into(),
            Some(initrd.into()),
            Some("console=ttyS0 panic=-1 microvmm.hostname=g1"),
        )
    };
    let mut vm = TestVm::boot(cfg).unwrap();
    vm.machine.start().unwrap();
    // Until the agent listens, the guest refuses the connection and the host side closes it.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let stream = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "agent never answered on vsock port 1024:\n{}",
            vm.serial_text()
        );
        std::thread::sleep(Duration::from_millis(500));
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&uds) else {
            continue;
        };
        use std::io::{BufRead, Write};
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if s.write_all(b"CONNECT 1024\n").is_err() {
            continue;
        }
        let mut line = String::new();
        let mut r = std::io::BufReader::new(s.try_clone().unwrap());
        if r.read_line(&mut line).is_ok() && line.starts_with("OK ") {
            break s;
        }
    };
    let mut agent = guest_agent::host::AgentClient::from_connection(Box::new(stream));
    assert!(!agent.ping().unwrap().is_empty());
    let mounts = agent
        .exec(&["cat", "/proc/mounts"], Some(Duration::from_secs(30)))
        .unwrap();
    assert!(
        mounts.stdout.contains("/dev/vda / ext4"),
        "{}",
        mounts.stdout
    );
    vm.machine.stop().unwrap();
}
