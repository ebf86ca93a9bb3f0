//! Memory held by NBD connections: each one's buffers stay bounded (and small) whatever the
//! size of its requests. Measured as the process's RSS, so alone in its binary.

mod nbd_common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};

use block::Disk;
use block::nbd::NbdServer;
use block::nbd::proto::*;
use nbd_common::*;

/// `VmRSS` and `VmHWM` (peak) of this process, in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib << 10
    };
    (field("VmRSS:"), field("VmHWM:"))
}

const CONNS: usize = 8;
const CHUNK: usize = 1 << 20;

/// WRITE then READ of `MAX_REQUEST_LEN` bytes, sent and received a MiB at a time (so the
/// client side holds little).
fn big_requests(c: &mut UnixStream, chunk: &mut [u8]) {
    let len = MAX_REQUEST_LEN;
    request(c, 0, WRITE, 1, 0, len, &[]);
    for _ in 0..len as usize / CHUNK {
        c.write_all(chunk).unwrap();
    }
    assert_eq!(reply(c), (0, 1));
    request(c, 0, READ, 2, 0, len, &[]);
    assert_eq!(reply(c), (0, 2));
    for _ in 0..len as usize / CHUNK {
        c.read_exact(chunk).unwrap();
    }
}

#[test]
fn memory_per_connection_is_bounded() {
    let export: Arc<dyn Disk> = Arc::new(NullExport(u64::from(MAX_REQUEST_LEN) * 2));
    let srv = Arc::new(NbdServer::new(vec![("null".to_owned(), export)]).unwrap());
    let (sock, serving) = serve_unix(&srv, "memory");
    // Warm up (first connection, thread and allocator set-up), then measure.
    let mut warm = UnixStream::connect(&sock).unwrap();
    greet(&mut warm);
    go(&mut warm, "null");
    request(&mut warm, 0, READ, 1, 0, 4096, &[]);
    assert_eq!(reply(&mut warm), (0, 1));
    let mut b = [0u8; 4096];
    warm.read_exact(&mut b).unwrap();
    let (base, _) = rss();

    let done = Arc::new(Barrier::new(CONNS + 1));
    let release = Arc::new(Barrier::new(CONNS + 1));
    let clients: Vec<_> = (0..CONNS)
        .map(|_| {
            let (sock, done, release) = (sock.clone(), done.clone(), release.clone());
            std::thread::spawn(move || {
                let mut c = UnixStream::connect(&sock).unwrap();
                greet(&mut c);
                go(&mut c, "null");
                let mut chunk = vec![0x5au8; CHUNK];
                big_requests(&mut c, &mut chunk);
                drop(chunk);
                done.wait();
                // Connections stay open (idle) while memory is measured.
                release.wait();
                request(&mut c, 0, DISC, 3, 0, 0, &[]);
            })
        })
        .collect();
    done.wait();
    let (now, peak) = rss();
    release.wait();
    for c in clients {
        c.join().unwrap();
    }
    let per_conn_now = now.saturating_sub(base) / CONNS as u64;
    let per_conn_peak = peak.saturating_sub(base) / CONNS as u64;
    println!(
        "{CONNS} connections, each a {} MiB WRITE and READ: RSS per connection {} KiB idle after, \
         {} KiB at the peak (client threads and their 1 MiB buffers included)",
        MAX_REQUEST_LEN >> 20,
        per_conn_now >> 10,
        per_conn_peak >> 10
    );
    // The server's buffers per connection are bounded well below one large request (32 MiB).
    assert!(
        per_conn_now < 4 << 20,
        "{per_conn_now} bytes per idle connection"
    );
    assert!(
        per_conn_peak < 6 << 20,
        "{per_conn_peak} bytes per connection at the peak"
    );

    srv.shutdown_flag().store(true, Ordering::SeqCst);
    drop(warm);
    assert_eq!(
        serving
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap(),
        Ok(())
    );
    let _ = std::fs::remove_file(&sock);
}
