//! A Linux guest's lifecycle under microvmm with hardware KVM, each checked from inside the guest:
//! a shell loop prints `tick-N` every 0.2 s on the console, and the guest's own files are read back.
//!
//! - pause/resume: nothing is printed while paused, counting goes on after each resume, and no
//!   tick is lost or repeated;
//! - snapshot/restore in a new process: the guest resumes in another process where it stopped (the
//!   counter continues from its last value, a file in its RAM is there);
//! - live clone: both copies keep counting from the clone instant, both read a file written before
//!   the clone, and each writes to its own fork child of the disk.
//!
//! These SKIP on an emulating host; `nested_linux_lifecycle_hardware_tests` runs them for real on
//! hardware-style KVM one level down (the nested harness, `scripts/nested.sh`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use devices::legacy::{SerialOutput, SharedBuffer};
use microvmm_tests::linux_guest::{
    full_guest_vcpus, linux_cfg, minimal_linux_image, numbered_lines, text, type_at_shell,
    type_text, wait_text_from,
};
use microvmm_tests::{TestVm, hardware_kvm_or_skip};
use vmm::machine::CloneOptions;
use vmm::{Machine, StopReason};

/// Starts a background loop printing `tick-N` every 0.2 s.
const COUNTER: &str = "(i=0; while :; do i=$((i+1)); echo tick-$i; sleep 0.2; done) &\n";
const TICK: &str = "tick-";
const LIMIT: Duration = Duration::from_secs(60);
/// The restore half of the snapshot test, run in a new process.
const CHILD: &str = "linux_snapshot_child_restores_and_continues";
/// Where the child finds the snapshot, and the last tick the parent saw.
const ENV_SNAPSHOT: &str = "NESTED_LINUX_SNAPSHOT_DIR";
const ENV_LAST_TICK: &str = "NESTED_LINUX_SNAPSHOT_LAST_TICK";

/// The ticks printed in `buf` after byte `from`.
fn ticks(buf: &SharedBuffer, from: usize) -> Vec<u64> {
    numbered_lines(text(buf).get(from..).unwrap_or(""), TICK)
}

/// Waits until `buf` shows a tick above `above` after byte `from`; returns the highest.
fn wait_tick(buf: &SharedBuffer, from: usize, above: u64, what: &str) -> u64 {
    let end = Instant::now() + LIMIT;
    loop {
        if let Some(&t) = ticks(buf, from).iter().max()
            && t > above
        {
            return t;
        }
        assert!(
            Instant::now() < end,
            "{what}: no tick above {above}:\n{}",
            text(buf)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts the ticks are consecutive (none lost, none repeated).
fn assert_consecutive(ticks: &[u64], what: &str) {
    for w in ticks.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{what}: ticks {ticks:?}");
    }
}

/// The minimal guest with the counter running; returns it once `n` ticks are out.
fn counting_guest(cfg: vmm::config::MachineConfig, setup: &str, n: u64) -> TestVm {
    let mut vm = TestVm::boot(cfg).unwrap();
    vm.machine.start().unwrap();
    type_at_shell(&vm.machine, &vm.serial, setup);
    type_text(&vm.machine, &vm.serial, COUNTER);
    wait_tick(&vm.serial, 0, n - 1, "counter start");
    vm
}

/// Types `cmd` (which ends by printing `done-42` via `$((6*7))`, so the echoed command line does
/// not match) and waits for it.
fn run_in_guest(m: &Machine, out: &SharedBuffer, cmd: &str, what: &str) -> String {
    let from = text(out).len();
    type_text(m, out, &format!("{cmd}; echo done-$((6*7))\n"));
    assert!(
        wait_text_from(out, from, "done-42", LIMIT),
        "{what}: no answer:\n{}",
        text(out)
    );
    text(out)[from..].to_string()
}

fn power_off(m: &mut Machine, out: &SharedBuffer, what: &str) {
    type_text(m, out, "poweroff -f\n");
    assert_eq!(
        m.wait(Some(LIMIT)).unwrap(),
        StopReason::PowerOff,
        "{what}:\n{}",
        text(out)
    );
}

#[test]
fn linux_pause_resume_keeps_counting_on_hardware_kvm() {
    let test = "linux_pause_resume_keeps_counting_on_hardware_kvm";
    if !hardware_kvm_or_skip(test) {
        return;
    }
    let (kernel, initrd) = minimal_linux_image();
    let mut vm = counting_guest(
        linux_cfg(full_guest_vcpus(), 256, kernel, Some(initrd), None),
        "\n",
        5,
    );
    let mut last = wait_tick(&vm.serial, 0, 0, "before the pauses");
    let mut paused_total = Duration::ZERO;
    for cycle in 0..5 {
        let t = Instant::now();
        vm.machine.pause().unwrap();
        paused_total += t.elapsed();
        let frozen = text(&vm.serial).len();
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(
            text(&vm.serial).len(),
            frozen,
            "cycle {cycle}: console output while paused"
        );
        vm.machine.resume().unwrap();
        last = wait_tick(&vm.serial, 0, last, &format!("cycle {cycle}: after resume"));
    }
    let all = ticks(&vm.serial, 0);
    assert_consecutive(&all, "across 5 pause/resume cycles");
    println!(
        "{test}: {} ticks, consecutive; mean pause call {:?}",
        all.len(),
        paused_total / 5
    );
    let out = run_in_guest(&vm.machine, &vm.serial, "cat /proc/uptime", "uptime");
    let uptime = out
        .lines()
        .find(|l| l.split_whitespace().count() == 2)
        .unwrap_or("?");
    println!("{test}: guest uptime after the pauses: {uptime}");
    power_off(&mut vm.machine, &vm.serial, test);
}

#[test]
fn linux_snapshot_restores_in_a_new_process_on_hardware_kvm() {
    let test = "linux_snapshot_restores_in_a_new_process_on_hardware_kvm";
    if !hardware_kvm_or_skip(test) {
        return;
    }
    let (kernel, initrd) = minimal_linux_image();
    let mut vm = counting_guest(
        linux_cfg(full_guest_vcpus(), 256, kernel, Some(initrd), None),
        "echo saved-in-ram > /tmp/mark\n",
        5,
    );
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    vm.machine.pause().unwrap();
    let last = *ticks(&vm.serial, 0).last().unwrap();
    let t = Instant::now();
    let meta = vm.machine.save_snapshot(&snap).unwrap();
    let saved_in = t.elapsed();
    vm.machine.stop().unwrap();
    drop(vm);
    println!(
        "{test}: snapshot of {} MiB in {saved_in:?}",
        meta.mem_size >> 20
    );
    let exe = std::env::current_exe().unwrap();
    let t = Instant::now();
    let child = Command::new(exe)
        .args([
            "--exact",
            CHILD,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_SNAPSHOT, &snap)
        .env(ENV_LAST_TICK, last.to_string())
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    let child_took = t.elapsed();
    for l in out.lines().filter(|l| l.contains("restored guest checked")) {
        println!("{test}: {l}");
    }
    println!("{test}: restoring process took {child_took:?}; its output:\n{out}");
    assert!(
        child.status.success() && out.contains("test result: ok. 1 passed"),
        "the restoring process failed"
    );
    assert!(
        out.contains("restored guest checked"),
        "the child did not run"
    );
}

/// The restore half of `linux_snapshot_restores_in_a_new_process_on_hardware_kvm`, run by it in a
/// new process (ignored otherwise).
#[test]
#[ignore = "run by linux_snapshot_restores_in_a_new_process_on_hardware_kvm in a new process"]
fn linux_snapshot_child_restores_and_continues() {
    let (Some(snap), Some(last)) = (
        std::env::var_os(ENV_SNAPSHOT),
        std::env::var_os(ENV_LAST_TICK),
    ) else {
        println!("{CHILD}: not run by the snapshot test; nothing to do");
        return;
    };
    let last: u64 = last.to_string_lossy().parse().unwrap();
    let (kernel, initrd) = minimal_linux_image();
    let buf = SharedBuffer::default();
    let t = Instant::now();
    let mut m = Machine::restore_snapshot(
        linux_cfg(full_guest_vcpus(), 256, kernel, Some(initrd), None),
        Some(SerialOutput::Buffer(buf.clone())),
        Path::new(&snap),
    )
    .unwrap();
    m.start().unwrap();
    let restored_in = t.elapsed();
    wait_tick(&buf, 0, last + 3, "after the restore");
    let after = ticks(&buf, 0);
    // The counter goes on from where it was (a line cut by the snapshot is not complete here).
    assert!(
        after[0] > last && after[0] <= last + 2,
        "ticks before {last}, after {after:?}"
    );
    assert_consecutive(&after, "after the restore");
    let out = run_in_guest(&m, &buf, "cat /tmp/mark", "file in RAM");
    assert!(out.contains("saved-in-ram"), "{out}");
    power_off(&mut m, &buf, CHILD);
    println!(
        "restored guest checked: restore+start {restored_in:?}, ticks {}..={} after {last}",
        after[0],
        after.last().unwrap()
    );
}

#[test]
fn linux_live_clone_both_keep_running_on_hardware_kvm() {
    let test = "linux_live_clone_both_keep_running_on_hardware_kvm";
    if !hardware_kvm_or_skip(test) {
        return;
    }
    let (kernel, initrd) = minimal_linux_image();
    let dir = tempfile::tempdir().unwrap();
    // An empty ext4 (4 KiB blocks: our virtio-blk's logical block size) under a delta.
    let img = dir.path().join("disk.img");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096"])
        .arg(&img)
        .arg("64M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(st.success());
    let base = block::Base::adopt(&img).unwrap();
    let delta = dir.path().join("delta");
    drop(block::Delta::create(&delta, std::sync::Arc::new(block::Layer::Base(base))).unwrap());
    let cfg = vmm::config::MachineConfig {
        disks: vec![vmm::config::DiskConfig {
            path: delta.clone(),
            read_only: false,
        }],
        ..linux_cfg(full_guest_vcpus(), 256, kernel, Some(initrd), None)
    };
    let mut vm = counting_guest(
        cfg.clone(),
        "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo before-$((6*7)) > /mnt/before.txt \
         && sync\n",
        5,
    );
    let at_clone = text(&vm.serial).len();
    let last_before = *ticks(&vm.serial, 0).last().unwrap();
    let clone_buf = SharedBuffer::default();
    let mut opts = CloneOptions::new(cfg);
    opts.console = Some(SerialOutput::Buffer(clone_buf.clone()));
    let (src_child, clone_child) = (dir.path().join("src-child"), dir.path().join("clone-child"));
    opts.disk_dirs = vec![(src_child.clone(), clone_child.clone())];
    let (mut clone, timeline) = vm.machine.clone_running(opts).unwrap();
    // The clone instant is the final pause, at the end of the pre-copy.
    let src_at_return = *ticks(&vm.serial, 0).last().unwrap();
    clone.start().unwrap();
    println!(
        "{test}: clone pause {:?} (final copy {:?}, capture {:?}, disk cut {:?}), {} pre-copy \
         rounds {:?} pages, final {} pages, total {:?}",
        timeline.pause,
        timeline.final_copy,
        timeline.capture,
        timeline.disk_fork,
        timeline.rounds.len(),
        timeline.rounds.iter().map(|r| r.pages).collect::<Vec<_>>(),
        timeline.final_pages,
        timeline.total
    );
    // Both keep counting, the clone from where the source was at the clone instant.
    let src_after = wait_tick(
        &vm.serial,
        at_clone,
        src_at_return + 3,
        "source after the clone",
    );
    let clone_ticks_at = wait_tick(&clone_buf, 0, src_at_return + 3, "clone");
    let first_clone = ticks(&clone_buf, 0)[0];
    assert!(
        first_clone > last_before && first_clone <= src_at_return + 1,
        "the clone's counter starts at {first_clone}; the source was at {last_before} when the \
         clone started and at {src_at_return} when it returned"
    );
    println!("{test}: source at tick {src_after}, clone at {clone_ticks_at}");
    // (Checked before anything is typed: the console echo can split a tick line.)
    assert_consecutive(&ticks(&clone_buf, 0), "clone");
    // Both read the file written before the clone; each writes its own disk.
    for (name, m, out) in [
        ("source", &vm.machine, &vm.serial),
        ("clone", &clone, &clone_buf),
    ] {
        let o = run_in_guest(
            m,
            out,
            &format!("cat /mnt/before.txt; echo {name} > /mnt/who.txt; sync; cat /mnt/who.txt"),
            name,
        );
        assert!(o.contains("before-42"), "{name} lost the file: {o}");
        assert!(o.contains(&format!("\n{name}")), "{name}'s own write: {o}");
    }
    let o = run_in_guest(&clone, &clone_buf, "cat /mnt/who.txt", "clone again");
    assert!(
        o.contains("\nclone") && !o.contains("\nsource"),
        "the clone sees the source's write: {o}"
    );
    power_off(&mut clone, &clone_buf, "clone");
    power_off(&mut vm.machine, &vm.serial, "source");
    drop(clone);
    drop(vm);
    // The clone's disk is the fork child; both children hold their guest's writes.
    for d in [&src_child, &clone_child] {
        let delta = block::Delta::open(d).unwrap();
        assert!(
            !delta.changed_since(0).is_empty(),
            "{} holds no writes",
            d.display()
        );
    }
}

/// The hardware-only tests above, run for real in one level-1 boot of the nested harness; a test
/// that printed `SKIP:` there fails here.
#[test]
fn nested_linux_lifecycle_hardware_tests() {
    use microvmm_tests::nested::{self, Nested, NestedOptions};
    let test = "nested_linux_lifecycle_hardware_tests";
    let opts = NestedOptions {
        tools: vec!["mkfs.ext4".into()],
        images: true,
        test_name: Some(test.into()),
        ..Default::default()
    };
    let inner = [
        "linux_pause_resume_keeps_counting_on_hardware_kvm",
        "linux_snapshot_restores_in_a_new_process_on_hardware_kvm",
        "linux_live_clone_both_keep_running_on_hardware_kvm",
    ];
    let exe: PathBuf = std::env::current_exe().unwrap();
    let run = match nested::run_tests(&exe, &inner, Duration::from_secs(300), &opts) {
        Ok(Nested::Ran(r)) => r,
        Ok(Nested::Skipped(_)) => return,
        Err(e) => panic!("{test}: {e}"),
    };
    println!("{test}: {}", run.summary());
    run.assert_all_passed();
}
