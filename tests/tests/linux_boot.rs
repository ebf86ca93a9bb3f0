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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_agent::testing::echo_log_argv;
use microvmm_tests::linux_guest::{
    MINIMAL_BANNER, agent_stream, connect_service, full_guest_vcpus, full_guest_vm, linux_cfg,
    minimal_linux_image,
};
use microvmm_tests::{TestVm, hardware_kvm_or_skip, kvm_or_skip};
use vmm::StopReason;
use vmm::config::MachineConfig;

/// Waits for the minimal image's init banner, then types `s` at the guest's shell.
fn type_at_shell(vm: &TestVm, s: &str) {
    microvmm_tests::linux_guest::type_at_shell(&vm.machine, &vm.serial, s);
}

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
    let cfg = linux_cfg(full_guest_vcpus(), 512, kernel, Some(initrd), None);
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

/// With hardware KVM: the Debian kernel's boot log under microvmm has no warning and no failed
/// probe. Its legacy devices bind through the DSDT's PNP devices with mapped interrupts (the 8250
/// at its IRQ, so that userspace writes to the console go out: the shell answers), the i8042 and
/// rtc_cmos probe, and the FPU init finds CPUID leaf 0xD consistent with XCR0 (no `XSAVE
/// consistency problem` warning).
#[test]
fn linux_boot_log_is_clean_on_hardware_kvm() {
    let test = "linux_boot_log_is_clean_on_hardware_kvm";
    if !hardware_kvm_or_skip(test) {
        return;
    }
    let (kernel, initrd) = minimal_linux_image();
    let cfg = linux_cfg(full_guest_vcpus(), 512, kernel, Some(initrd), None);
    let mut vm = TestVm::boot(cfg).unwrap();
    vm.machine.start().unwrap();
    // Userspace output through the interrupt-driven 8250 path.
    type_at_shell(&vm, "echo userspace-$((6*7)) >/dev/ttyS0\n");
    assert!(
        vm.wait_serial("userspace-42", Duration::from_secs(30)),
        "no userspace output:\n{}",
        vm.serial_text()
    );
    // XCR0 as KVM holds it for each vCPU (what leaf 0xD.0 EBX is computed from, and what a
    // snapshot saves), against the features the guest kernel enabled.
    let xcr0s = Arc::new(Mutex::new(Vec::new()));
    let x = Arc::clone(&xcr0s);
    vm.machine
        .on_each_vcpu(Arc::new(move |v| {
            let xcrs = v.fd().get_xcrs().unwrap();
            let xcr0 = xcrs.xcrs[..xcrs.nr_xcrs as usize]
                .iter()
                .find(|x| x.xcr == 0)
                .map_or(0, |x| x.value);
            x.lock().unwrap().push(xcr0);
        }))
        .unwrap();
    let xcr0s = xcr0s.lock().unwrap().clone();
    println!("{test}: XCR0 per vCPU as KVM holds it: {xcr0s:#x?}");
    type_at_shell(&vm, "poweroff -f\n");
    let reason = vm.machine.wait(Some(Duration::from_secs(60))).unwrap();
    let log = vm.serial_text();
    println!("{test}: guest console:\n{log}");
    assert_eq!(reason, StopReason::PowerOff);
    assert!(log.contains("userspace-42"), "no userspace output");
    for bad in [
        "XSAVE consistency problem",
        "WARNING:",
        "Call Trace",
        "probe of i8042 failed",
        "probe of rtc_cmos failed",
        "failed with error",
        "Keylock active",
    ] {
        assert!(!log.contains(bad), "`{bad}` in the boot log");
    }
    for good in [
        "serio: i8042 KBD port at 0x60,0x64 irq ",
        "rtc_cmos 00:02: registered as rtc0",
        "00:00: ttyS0 at I/O 0x3f8 (irq = ",
    ] {
        assert!(log.contains(good), "no `{good}` in the boot log");
    }
    // The RTC gives the guest today's date (x86 Linux reads the CMOS clock as BCD).
    let today = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .unwrap();
    let today = String::from_utf8_lossy(&today.stdout).trim().to_string();
    assert!(
        log.contains(&format!("setting system clock to {today}T")),
        "the guest's clock is not today ({today})"
    );
    // KVM's XCR0 is the one the guest enabled (XSAVE in use, not disabled by the check).
    let enabled = log
        .lines()
        .find_map(|l| l.split("x86/fpu: Enabled xstate features 0x").nth(1))
        .and_then(|r| u64::from_str_radix(r.split(',').next()?, 16).ok())
        .expect("the guest enables XSAVE");
    assert!(
        xcr0s.iter().all(|&x| x == enabled),
        "KVM's XCR0 {xcr0s:#x?} != the guest's {enabled:#x}"
    );
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
    // 4 KiB blocks: our virtio-blk advertises blk_size 4096, which Linux takes as the logical
    // block size, and ext4 refuses a smaller file-system block ("bad block size 1024", mke2fs's
    // default for a 64 MiB image).
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
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
        ..linux_cfg(full_guest_vcpus(), 512, kernel, Some(initrd), None)
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
        "test -c /dev/vsock && cat /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio*/device && echo vsock-$((6*7))\n",
    );
    assert!(
        // Not the literal text typed (the console echoes the command line).
        vm.wait_serial("vsock-42", Duration::from_secs(30)),
        "virtio-vsock in Linux failed:\n{}",
        vm.serial_text()
    );
    assert!(
        vm.serial_text().contains("0x0013"),
        "no virtio-vsock device id:\n{}",
        vm.serial_text()
    );
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
/// that shows the root file system is our virtio-blk disk. Then the guest powers itself off when
/// the VMM presses its ACPI power button (`Machine::press_power_button`, the API's `Shutdown`):
/// the Generic Event Device's `_EVT` notifies the `PNP0C0C` button, Linux reports KEY_POWER, the
/// agent (init) powers off.
#[test]
fn linux_agent_answers_over_vsock_on_hardware_kvm() {
    let test = "linux_agent_answers_over_vsock_on_hardware_kvm";
    if !hardware_kvm_or_skip(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, uds) = full_guest_vm(dir.path(), Vec::new());
    let stream = agent_stream(&vm, &uds);
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
    let out = agent
        .exec(
            &["sh", "-c", "cat /sys/class/input/event*/device/name"],
            Some(Duration::from_secs(30)),
        )
        .unwrap();
    assert!(out.stdout.contains("Power Button"), "{out:?}");
    assert!(vm.serial_text().contains("watching 1 power button"));
    vm.machine.press_power_button().unwrap();
    let reason = vm.machine.wait(Some(Duration::from_secs(120))).unwrap();
    let console = vm.serial_text();
    assert_eq!(reason, StopReason::PowerOff, "{console}");
    assert!(console.contains("power button pressed"), "{console}");
}

/// With hardware KVM: the full guest image with a virtio-net device on a TAP (in a network
/// namespace this test creates) takes an address, runs the Java demo service, and a client on
/// the host side gets its answers over TCP through the TAP.
#[test]
fn linux_java_service_answers_over_virtio_net_on_hardware_kvm() {
    java_service_over_virtio_net(
        "linux_java_service_answers_over_virtio_net_on_hardware_kvm",
        false,
    );
}

/// The Java service checkpointed by CRIU inside a microvmm guest (its open log, its client's
/// established TCP connection) and restored in place (the agent's rollback path): the client
/// goes on on the same connection.
#[test]
fn linux_criu_checkpoints_and_restores_the_java_service_on_hardware_kvm() {
    java_service_over_virtio_net(
        "linux_criu_checkpoints_and_restores_the_java_service_on_hardware_kvm",
        true,
    );
}

/// The Java demo service in the full guest, on virtio-net, answering a client on the host side
/// of the TAP; with `criu`, checkpointed and restored in place half-way through.
fn java_service_over_virtio_net(test: &str, criu: bool) {
    use devices::virtio::testing::{NetNs, net_or_skip};
    if !hardware_kvm_or_skip(test) || !net_or_skip(test) {
        return;
    }
    let ns = NetNs::new(if criu { "javacriu" } else { "javanet" }).unwrap();
    ns.add_tap("tap0", Some("10.0.0.1/24")).unwrap();
    let _in_ns = ns.enter().unwrap();
    let mac = "06:00:0a:00:00:02";
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, uds) = full_guest_vm(
        dir.path(),
        vec![vmm::config::NetConfig {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some(mac.parse().unwrap()),
        }],
    );
    let stream = agent_stream(&vm, &uds);
    let mut agent = guest_agent::host::AgentClient::from_connection(Box::new(stream));
    let exec = |agent: &mut guest_agent::host::AgentClient, cmd: &str| {
        let out = agent
            .exec(&["sh", "-c", cmd], Some(Duration::from_secs(60)))
            .unwrap();
        format!("{}{}", out.stdout, out.stderr)
    };
    // The device is a virtio-net (id 1) with our MAC; give it the service address.
    let link = exec(
        &mut agent,
        "ip link set eth0 up && ip addr add 10.0.0.2/24 dev eth0 && cat /sys/class/net/eth0/address",
    );
    assert!(link.contains(mac), "{link}");
    let spec = guest_agent::protocol::WorkloadSpec {
        argv: echo_log_argv(7000, "/tmp/requests.log"),
        cwd: None,
        env: vec![],
        data_files: vec![],
        pid_base: None,
        service: None,
    };
    let pid = agent.start(&spec).expect("start the Java service");
    // The client is on the host side of the TAP (this thread is in the namespace).
    let stream = connect_service("10.0.0.2:7000");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = std::io::BufReader::new(stream);
    let mut offset = 0usize;
    let mut requests = |range: std::ops::Range<usize>, offset: &mut usize| {
        for i in range {
            use std::io::{BufRead, Write};
            let line = format!("request-{i}");
            w.write_all(format!("{line}\n").as_bytes()).unwrap();
            let mut reply = String::new();
            r.read_line(&mut reply).unwrap();
            *offset += line.len() + 1;
            assert_eq!(reply, format!("{line} g1 {offset}\n"), "reply {i}");
        }
    };
    requests(0..20, &mut offset);
    let mut total = 20;
    if criu {
        let t = std::time::Instant::now();
        let img = agent
            .checkpoint_image(&guest_agent::protocol::CheckpointOpts::default())
            .expect("CRIU checkpoint in the guest");
        let dumped = t.elapsed();
        assert!(!img.files.is_empty(), "the checkpoint has images");
        let gone = exec(&mut agent, &format!("kill -0 {pid} 2>&1 || echo gone"));
        assert!(
            gone.contains("gone"),
            "the service still runs after the dump: {gone}"
        );
        let restored = agent.rollback().expect("CRIU restore in the guest");
        println!(
            "{test}: checkpoint {dumped:?} ({} image files), restored as pid {restored} after {:?}",
            img.files.len(),
            t.elapsed()
        );
        // The same connection and the same open log go on.
        requests(20..40, &mut offset);
        total = 40;
    }
    let logged = exec(&mut agent, "wc -l < /tmp/requests.log");
    assert_eq!(
        logged.trim(),
        total.to_string(),
        "every request logged once"
    );
    assert_eq!(
        vm.machine.nets()[0].handle.tap_name().as_deref(),
        Some("tap0")
    );
    vm.machine.stop().unwrap();
}

/// QEMU's boot of the minimal image: time from starting `qemu` with `accel` (`kvm` or `tcg`) to
/// the init banner on its serial console, or `None` after `limit`. The same kernel, initramfs,
/// command line, RAM and vCPUs as ours; QEMU's default PC machine (SeaBIOS, then the kernel).
/// `MICROVMM_QEMU_DATA` gives its firmware directory (`-L`) where it is not installed.
fn qemu_boot(
    qemu: &Path,
    accel: &str,
    (kernel, initrd): (&Path, &Path),
    cmdline: &str,
    limit: Duration,
) -> Option<Duration> {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-accel",
        accel,
        "-cpu",
        if accel == "kvm" { "host" } else { "max" },
    ])
    .args(["-m", "256", "-smp", "2", "-nodefaults", "-no-user-config"])
    .args(["-display", "none", "-monitor", "none", "-no-reboot"])
    .arg("-serial")
    .arg(format!("file:{}", log.display()))
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", cmdline])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    if let Some(d) = std::env::var_os("MICROVMM_QEMU_DATA") {
        cmd.arg("-L").arg(d);
    }
    let started = std::time::Instant::now();
    let mut child = cmd.spawn().expect("start qemu-system-x86_64");
    let seen = loop {
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        if out.contains(MINIMAL_BANNER) {
            break Some(started.elapsed());
        }
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("QEMU ({accel}) exited ({st}) before the banner: {err}\n{out}");
        }
        if started.elapsed() > limit {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    seen
}

/// With hardware KVM: time from building the machine to the minimal image's init banner under
/// microvmm, against QEMU booting the same kernel, initramfs and command line with the same RAM
/// and vCPUs, with KVM (the same level) and with TCG (the emulator, same level); printed as
/// ratios, since absolute times in the nested harness are two emulation levels deep.
#[test]
fn linux_boot_time_vs_qemu_on_hardware_kvm() {
    let test = "linux_boot_time_vs_qemu_on_hardware_kvm";
    if !hardware_kvm_or_skip(test) {
        return;
    }
    let Some(qemu) = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|q| q.is_file())
    }) else {
        println!("SKIP: {test}: qemu-system-x86_64 not found");
        return;
    };
    let (kernel, initrd) = minimal_linux_image();
    let cmdline = vmm::config::DEFAULT_CMDLINE;
    let mut ours = Vec::new();
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let cfg = linux_cfg(
            full_guest_vcpus(),
            256,
            kernel.clone(),
            Some(initrd.clone()),
            Some(cmdline),
        );
        let mut vm = TestVm::boot(cfg).unwrap();
        let built = started.elapsed();
        let stats = vm.machine.serial().lock().unwrap().stats();
        vm.machine.start().unwrap();
        if !vm.wait_serial(MINIMAL_BANNER, Duration::from_secs(120)) {
            panic!(
                "no banner:\n{}\n--- vCPUs:\n{}",
                vm.serial_text(),
                microvmm_tests::linux_guest::vcpu_report(&vm.machine)
            );
        }
        let total = started.elapsed();
        let first = stats.first_byte_at().map(|t| t.duration_since(started));
        let init = vm
            .serial_text()
            .lines()
            .find_map(|l| {
                let r = l
                    .strip_prefix('[')?
                    .split(']')
                    .next()?
                    .trim()
                    .parse::<f64>();
                l.contains("Run /init").then_some(r.ok()?)
            })
            .unwrap_or(f64::NAN);
        println!(
            "{test}: microvmm run: built and loaded in {built:.2?}, first console byte at \
             {first:.2?}, the guest's clock says /init at {init:.2} s, banner at {total:.2?}"
        );
        ours.push(total);
        vm.machine.stop().unwrap();
    }
    let ours = *ours.iter().min().unwrap();
    println!("{test}: microvmm (KVM): {ours:.2?} to the init banner (best of 2)");
    let images = (kernel.as_path(), initrd.as_path());
    let kvm = qemu_boot(&qemu, "kvm", images, cmdline, Duration::from_secs(300))
        .expect("QEMU/KVM reached no banner in 300 s");
    println!(
        "{test}: QEMU (KVM, same level): {kvm:.2?}, {:.1}x ours",
        kvm.as_secs_f64() / ours.as_secs_f64()
    );
    let tcg_limit = Duration::from_secs(600);
    match qemu_boot(&qemu, "tcg", images, cmdline, tcg_limit) {
        Some(tcg) => println!(
            "{test}: QEMU (TCG, same level): {tcg:.2?}, {:.1}x ours",
            tcg.as_secs_f64() / ours.as_secs_f64()
        ),
        None => println!(
            "{test}: QEMU (TCG, same level): no banner in {tcg_limit:?}, over {:.0}x ours",
            tcg_limit.as_secs_f64() / ours.as_secs_f64()
        ),
    }
}

/// The hardware-only tests above, run for real on hardware-style KVM one level down (the nested
/// harness, `scripts/nested.sh`): this test binary goes into one level-1 boot and runs each of them
/// there. A test that printed `SKIP:` in level 1 fails here.
#[test]
fn nested_linux_boot_hardware_tests() {
    use microvmm_tests::nested::{self, Nested, NestedOptions};
    let test = "nested_linux_boot_hardware_tests";
    let exe = std::env::current_exe().unwrap();
    let opts = NestedOptions {
        // iproute2's `ip` for the network namespace and TAP of the virtio-net test.
        tools: vec!["mkfs.ext4".into(), "ip".into()],
        images: true,
        test_name: Some(test.into()),
        ..Default::default()
    };
    let inner = [
        "linux_boot_log_is_clean_on_hardware_kvm",
        "linux_boots_to_a_shell_on_hardware_kvm",
        "linux_mounts_virtio_blk_and_binds_vsock_on_hardware_kvm",
        "linux_agent_answers_over_vsock_on_hardware_kvm",
        "linux_java_service_answers_over_virtio_net_on_hardware_kvm",
        "linux_criu_checkpoints_and_restores_the_java_service_on_hardware_kvm",
    ];
    let run = match nested::run_tests(&exe, &inner, Duration::from_secs(300), &opts) {
        Ok(Nested::Ran(r)) => r,
        Ok(Nested::Skipped(_)) => return,
        Err(e) => panic!("{test}: {e}"),
    };
    println!("{test}: {}", run.summary());
    run.assert_all_passed();
}

/// Boot-time figures (`linux_boot_time_vs_qemu_on_hardware_kvm`) in the nested harness, with QEMU
/// and its firmware copied into level 1. Ignored by default (QEMU's TCG boot at that level alone
/// takes about 4 minutes); run with `cargo test nested_linux_boot_figures -- --ignored --nocapture`.
#[test]
#[ignore = "figures, not a check: about 6 minutes (cargo test nested_linux_boot_figures -- --ignored)"]
fn nested_linux_boot_figures() {
    use microvmm_tests::nested::{self, Nested, NestedFile, NestedOptions};
    let test = "nested_linux_boot_figures";
    // QEMU's firmware for a PC with -kernel, and its TCG accelerator module.
    let stage = tempfile::tempdir().unwrap();
    let (share, modules) = (stage.path().join("share"), stage.path().join("mod"));
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&modules).unwrap();
    let wanted = [
        (
            "bios-256k.bin",
            &["/usr/share/seabios", "/usr/share/qemu"][..],
        ),
        ("linuxboot_dma.bin", &["/usr/share/qemu"][..]),
        ("kvmvapic.bin", &["/usr/share/qemu"][..]),
        (
            "accel-tcg-x86_64.so",
            &["/usr/lib/x86_64-linux-gnu/qemu"][..],
        ),
    ];
    for (name, dirs) in wanted {
        let Some(src) = dirs
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.exists())
        else {
            println!("SKIP: {test}: QEMU's {name} not found");
            return;
        };
        let dest = if name.ends_with(".so") {
            &modules
        } else {
            &share
        };
        std::fs::copy(&src, dest.join(name)).unwrap();
    }
    let opts = NestedOptions {
        tools: vec!["qemu-system-x86_64".into()],
        images: true,
        env: vec![
            ("MICROVMM_QEMU_DATA".into(), "/nested/qemu/share".into()),
            ("QEMU_MODULE_DIR".into(), "/nested/qemu/mod".into()),
        ],
        files: vec![NestedFile::new(stage.path(), "qemu")],
        test_name: Some(test.into()),
        ..Default::default()
    };
    let exe = std::env::current_exe().unwrap();
    let inner = ["linux_boot_time_vs_qemu_on_hardware_kvm"];
    let run = match nested::run_tests(&exe, &inner, Duration::from_secs(1200), &opts) {
        Ok(Nested::Ran(r)) => r,
        Ok(Nested::Skipped(_)) => return,
        Err(e) => panic!("{test}: {e}"),
    };
    println!("{test}: {}", run.summary());
    run.assert_all_passed();
}
