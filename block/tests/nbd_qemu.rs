//! Interoperability: a real NBD client (qemu-io from qemu-utils) writes through our server into a
//! `block` delta; the delta's journal then holds exactly those extents, durable after FLUSH.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use block::nbd::{Listener, NbdServer};
use block::{Base, Delta, Disk, ExtentKind, Layer};

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c
        .arg(uri)
        .output()
        .expect("qemu-io is installed by scripts/setup.d");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-io failed: {text}");
    text
}

#[test]
fn qemu_io_writes_land_in_the_delta_journal() {
    let dir = std::env::temp_dir().join(format!("nbd-qemu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let base = Base::create(&dir.join("base.img"), 16 << 20).unwrap();
    let parent = Arc::new(Layer::Base(base));
    let delta = Arc::new(Delta::create(&dir.join("delta"), Arc::clone(&parent)).unwrap());
    let sock = dir.join("nbd.sock");
    let srv = Arc::new(
        NbdServer::new(vec![
            ("disk".to_owned(), Arc::clone(&delta) as Arc<dyn Disk>),
            ("base".to_owned(), Arc::clone(&parent) as Arc<dyn Disk>),
        ])
        .unwrap(),
    );
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let s2 = Arc::clone(&srv);
    let serving = std::thread::spawn(move || {
        s2.serve(Listener::Unix(listener))
            .map_err(|e| e.to_string())
    });

    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    qemu_io(
        &uri,
        &[
            "write -P 0xab 1M 64k",
            "write -z 4M 8k",
            "write -P 0x11 8M 4k",
            "flush",
        ],
    );
    let text = qemu_io(
        &uri,
        &[
            "read -P 0xab 1M 64k",
            "read -P 0 4M 8k",
            "read -P 0x11 8M 4k",
            "read -P 0 0 1M",
        ],
    );
    assert!(!text.contains("Pattern verification failed"), "{text}");
    // The base export is read-only: a write through it is refused.
    let base_uri = format!("nbd+unix:///base?socket={}", sock.display());
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k", &base_uri])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("failed") || text.contains("read-only") || !out.status.success(),
        "{text}"
    );

    srv.shutdown_flag().store(true, Ordering::SeqCst);
    assert_eq!(serving.join().unwrap(), Ok(()));
    let seq = delta.durable_seq();
    drop(srv);
    drop(delta);

    // Reopen: recovery from the journal sees exactly the written extents.
    let reopened = Delta::open(&dir.join("delta")).unwrap();
    assert_eq!(reopened.durable_seq(), seq);
    let mut ext: Vec<(u64, u64, ExtentKind)> = reopened
        .changed_since(0)
        .into_iter()
        .map(|e| (e.offset, e.len, e.kind))
        .collect();
    ext.sort_by_key(|e| e.0);
    assert_eq!(
        ext,
        vec![
            (1 << 20, 64 << 10, ExtentKind::Data),
            (4 << 20, 8 << 10, ExtentKind::Zero),
            (8 << 20, 4 << 10, ExtentKind::Data),
        ]
    );
    let mut b = vec![0u8; 64 << 10];
    reopened.read_at(&mut b, 1 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0xab));
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
