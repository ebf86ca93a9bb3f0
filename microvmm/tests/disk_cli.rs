//! `microvmm disk create | fork | inspect | merge | catch-up`, run as the built binary.

use std::path::Path;
use std::process::{Command, Output};

use block::Delta;

const BS: usize = 4096;

fn microvmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_microvmm"))
        .arg("disk")
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = microvmm(args);
    assert!(
        o.status.success(),
        "microvmm disk {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn write(dir: &Path, block: u64, fill: u8) {
    let d = Delta::open(dir).unwrap();
    d.write_at(&[fill; BS], block * BS as u64).unwrap();
    d.flush().unwrap();
}

fn block_of(d: &Delta, block: u64) -> u8 {
    let mut b = vec![0u8; BS];
    d.read_at(&mut b, block * BS as u64).unwrap();
    assert!(b.iter().all(|&x| x == b[0]));
    b[0]
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn create_fork_merge_inspect() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.img");
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    assert!(ok(&["create", "-f", "raw", s(&base), "4M"]).contains("created raw"));
    assert_eq!(std::fs::metadata(&base).unwrap().len(), 4 << 20);
    ok(&["fork", s(&base), s(&a), s(&b)]);
    write(&a, 1, 0xa1);
    write(&a, 2, 0xa2);
    write(&b, 2, 0xb2);
    write(&b, 3, 0xb3);

    // Conflict on block 2: exit code 2, report with both checksums, nothing written.
    let out = t.path().join("m");
    let o = microvmm(&["merge", s(&a), s(&b), "-o", s(&out)]);
    assert_eq!(o.status.code(), Some(2));
    let text = String::from_utf8_lossy(&o.stdout);
    let crc_a = format!("{:08x}", block::merge::checksum(&[0xa2; BS]));
    let crc_b = format!("{:08x}", block::merge::checksum(&[0xb2; BS]));
    assert!(
        text.contains("conflict offset 8192 len 4096")
            && text.contains(&crc_a)
            && text.contains(&crc_b),
        "{text}"
    );
    assert!(!out.exists());

    // Dry run with a policy: a plan, no output.
    let text = ok(&[
        "merge",
        s(&a),
        s(&b),
        "-o",
        s(&out),
        "--policy",
        "prefer-upgrade",
        "--dry-run",
    ]);
    assert!(text.contains("dry run"), "{text}");
    assert!(!out.exists());

    // JSON report and progress on stderr.
    let o = microvmm(&[
        "merge",
        s(&a),
        s(&b),
        "-o",
        s(&out),
        "--policy",
        "prefer-active",
        "--json",
        "--progress",
        "always",
    ]);
    assert!(o.status.success());
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["conflicting"], 4096);
    assert_eq!(report["conflicts"][0]["resolution"], "active");
    assert!(String::from_utf8_lossy(&o.stderr).contains("100/100%"));
    let m = Delta::open_read_only(&out).unwrap();
    assert_eq!([1, 2, 3, 4].map(|i| block_of(&m, i)), [0xa1, 0xa2, 0xb3, 0]);
    drop(m);

    let text = ok(&["inspect", s(&out), "--since", "0"]);
    assert!(
        text.contains("format: delta")
            && text.contains("merge output")
            && text.contains("format: raw"),
        "{text}"
    );
    assert!(text.contains("changed since seq 0"), "{text}");

    // Flatten to a raw image.
    let flat = t.path().join("flat.img");
    ok(&[
        "merge",
        s(&a),
        s(&b),
        "-o",
        s(&flat),
        "--policy",
        "prefer-upgrade",
        "--flatten",
    ]);
    let img = std::fs::read(&flat).unwrap();
    assert_eq!([1, 2, 3].map(|i| img[i * BS]), [0xa1, 0xb2, 0xb3]);
    assert!(ok(&["inspect", s(&flat)]).contains("format: raw"));

    // Ownership: B owns blocks 2..4, so only A's write to block 2 conflicts... as a non-owner.
    let own = t.path().join("owners");
    std::fs::write(&own, "active 0 8K\nupgrade 8K 8K\n").unwrap();
    let o = microvmm(&[
        "merge",
        s(&a),
        s(&b),
        "-o",
        s(&t.path().join("o2")),
        "--ownership",
        s(&own),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stdout).contains("NonOwnerWrite"));
    // --owner-wins resolves it to the owner (B) and merges.
    let flat2 = t.path().join("flat2.img");
    ok(&[
        "merge",
        s(&a),
        s(&b),
        "-o",
        s(&flat2),
        "--ownership",
        s(&own),
        "--owner-wins",
        "--flatten",
    ]);
    let img = std::fs::read(&flat2).unwrap();
    assert_eq!([1, 2, 3].map(|i| img[i * BS]), [0xa1, 0xb2, 0xb3]);

    // Catch-up: a write A makes after the merge point lands in the output.
    let since = report["active_seq"].as_u64().unwrap();
    write(&a, 7, 0xa7);
    ok(&[
        "catch-up",
        s(&out),
        s(&a),
        s(&b),
        "--since",
        &since.to_string(),
        "--policy",
        "prefer-active",
    ]);
    let m = Delta::open_read_only(&out).unwrap();
    assert_eq!(block_of(&m, 7), 0xa7);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("missing");
    for args in [
        vec!["inspect", s(&missing)],
        vec![
            "merge",
            s(&missing),
            s(&missing),
            "-o",
            s(&t.path().join("o")),
        ],
        vec!["create", "-f", "delta", s(&t.path().join("d"))],
        vec!["create", "-f", "raw", s(&t.path().join("r")), "12345"],
        vec!["create", "-f", "raw", s(&t.path().join("r")), "lots"],
    ] {
        let o = microvmm(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("microvmm: error:") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    // A garbage journal.
    let base = t.path().join("base.img");
    ok(&["create", s(&base), "1M"]);
    let d = t.path().join("d");
    ok(&["create", "-f", "delta", "-b", s(&base), s(&d)]);
    std::fs::write(d.join("journal"), b"not a journal").unwrap();
    let o = microvmm(&["inspect", s(&d)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no valid header"));
}

/// Rewrites a delta's `meta` (JSON line + CRC32C line) with `edit` applied to its JSON.
fn edit_meta(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("meta");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    edit(&mut v);
    let json = serde_json::to_string(&v).unwrap();
    let crc = block::merge::checksum(json.as_bytes());
    std::fs::write(&path, format!("{json}\ncrc32c:{crc:08x}\n")).unwrap();
}

/// Waits for `child` up to `secs` seconds; kills it and fails if it is still running.
fn wait_bounded(mut child: std::process::Child, secs: u64, what: &str) -> Output {
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed().as_secs() >= secs {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_looping_parent_chain_is_an_error_not_a_crash() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.img");
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    ok(&["create", s(&base), "1M"]);
    ok(&["fork", s(&base), s(&a), s(&b)]);
    // a's parent is b and b's parent is a.
    for (d, p) in [(&a, &b), (&b, &a)] {
        edit_meta(d, |v| v["parent"]["path"] = s(p).into());
    }
    for args in [
        vec!["inspect", s(&a)],
        vec!["merge", s(&a), s(&b), "-o", s(&t.path().join("o"))],
        vec![
            "serve",
            "--socket",
            s(&t.path().join("sock")),
            "--export",
            &format!("x={}", s(&a)),
        ],
    ] {
        let o = microvmm(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("loop"), "{args:?}: {err}");
    }
}

#[test]
fn inspect_into_a_closed_pipe_or_a_full_disk_is_not_a_panic() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.img");
    let d = t.path().join("d");
    ok(&["create", s(&base), "64M"]);
    ok(&["create", "-f", "delta", "-b", s(&base), s(&d)]);
    {
        // Every other block written: 4096 extents, a few hundred KiB of `--since 0` output.
        let delta = Delta::open(&d).unwrap();
        for i in 0..4096u64 {
            delta.write_at(&[1; BS], i * 2 * BS as u64).unwrap();
        }
        delta.flush().unwrap();
    }
    // `inspect | head -c 100`: the reader goes away early.
    let mut child = Command::new(env!("CARGO_BIN_EXE_microvmm"))
        .args(["disk", "inspect", s(&d), "--since", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 100];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(child.stdout.take());
    let o = wait_bounded(child, 60, "inspect into a closed pipe");
    let err = String::from_utf8_lossy(&o.stderr);
    // Quietly, with the status of a process ended by SIGPIPE (128 + 13), like `cat`.
    assert!(err.is_empty(), "{err}");
    assert_eq!(o.status.code(), Some(141), "{err}");
    // Output to a full disk: an error with a message, not a panic.
    let o = Command::new(env!("CARGO_BIN_EXE_microvmm"))
        .args(["disk", "inspect", s(&d), "--since", "0"])
        .stdout(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("No space left") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn catch_up_refuses_a_delta_that_is_not_the_merge_output() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.img");
    let (a, b, out, other) = (
        t.path().join("a"),
        t.path().join("b"),
        t.path().join("out"),
        t.path().join("other"),
    );
    ok(&["create", s(&base), "1M"]);
    ok(&["fork", s(&base), s(&a), s(&b)]);
    write(&a, 1, 0xa1);
    ok(&["merge", s(&a), s(&b), "-o", s(&out)]);
    write(&a, 2, 0xa2);
    // A writable delta over the same parent, but no merge output.
    ok(&["create", "-f", "delta", "-b", s(&base), s(&other)]);
    let o = microvmm(&["catch-up", s(&other), s(&a), s(&b), "--since", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("merge output"), "{err}");
    assert!(
        Delta::open_read_only(&other)
            .unwrap()
            .changed_since(0)
            .is_empty()
    );
}

#[test]
fn a_failed_create_leaves_nothing_behind() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("big.img");
    // 2^63 bytes: a valid size that no file system can hold.
    let o = microvmm(&["create", "-f", "raw", s(&img), "8589934592G"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        !img.exists(),
        "a failed create left {} behind",
        img.display()
    );
}

#[test]
fn adopt_refuses_a_fifo() {
    let t = tempfile::tempdir().unwrap();
    let fifo = t.path().join("fifo");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path, which lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let child = Command::new(env!("CARGO_BIN_EXE_microvmm"))
        .args(["disk", "create", "--adopt", s(&fifo)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_bounded(child, 20, "create --adopt on a FIFO");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn errors_keep_their_cause_and_name_the_cli_option() {
    let t = tempfile::tempdir().unwrap();
    let nope = t.path().join("nope");
    let o = microvmm(&[
        "serve",
        "--socket",
        s(&t.path().join("sock")),
        "--export",
        &format!("x={}", s(&nope)),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("No such file or directory"), "{err}");
    let raw = t.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    let o = microvmm(&[
        "create",
        "-f",
        "delta",
        "-b",
        s(&raw),
        s(&t.path().join("d")),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--adopt") && !err.contains("Base::"), "{err}");
}
