//! NBD server tests: a raw protocol client in the test, malformed input, shutdown, and qemu-io interop.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

mod nbd_common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use block::nbd::Listener;
use block::nbd::proto::*;
use nbd_common::*;

#[test]
fn write_read_flush_trim_zeroes_round_trip() {
    let disk = MemExport::new(1 << 20, false);
    let srv = server(vec![("disk", Arc::clone(&disk))]);
    let (mut c, h) = connect(&srv);
    greet(&mut c);
    let (size, flags) = go(&mut c, "disk");
    assert_eq!(size, 1 << 20);
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    assert_ne!(flags & TFLAG_SEND_FLUSH, 0);

    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    request(&mut c, 0, WRITE, 1, 4096, 8192, &pattern);
    assert_eq!(reply(&mut c), (0, 1));
    assert_eq!(
        disk.flushes.load(Ordering::SeqCst),
        0,
        "no flush before FLUSH"
    );
    request(&mut c, 0, READ, 2, 4096, 8192, &[]);
    assert_eq!(reply(&mut c), (0, 2));
    let mut back = vec![0; 8192];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, pattern);

    request(&mut c, 0, FLUSH, 3, 0, 0, &[]);
    assert_eq!(reply(&mut c), (0, 3));
    assert_eq!(disk.durable.lock().unwrap()[4096..12288], pattern[..]);

    request(&mut c, 0, TRIM, 4, 4096, 512, &[]);
    assert_eq!(reply(&mut c), (0, 4));
    request(&mut c, 0, ZEROES, 5, 8192, 512, &[]);
    assert_eq!(reply(&mut c), (0, 5));
    let d = disk.data.lock().unwrap().clone();
    assert!(d[4096..4608].iter().all(|&b| b == 0));
    assert!(d[8192..8704].iter().all(|&b| b == 0));
    assert_eq!(d[4608..8192], pattern[512..4096]);

    // FUA write is durable when acknowledged.
    request(&mut c, CMD_FLAG_FUA, WRITE, 6, 0, 512, &[0x5a; 512]);
    assert_eq!(reply(&mut c), (0, 6));
    assert_eq!(disk.durable.lock().unwrap()[..512], [0x5a; 512]);

    request(&mut c, 0, DISC, 7, 0, 0, &[]);
    assert_eq!(h.join().unwrap(), "ok");
}

#[test]
fn bad_requests_get_errors_and_the_connection_survives() {
    let disk = MemExport::new(1 << 20, false);
    let srv = server(vec![("disk", Arc::clone(&disk))]);
    let (mut c, h) = connect(&srv);
    greet(&mut c);
    go(&mut c, "");
    // Read past the end, offset overflow, unaligned, unknown command, write past the end.
    request(&mut c, 0, READ, 1, (1 << 20) - 512, 1024, &[]);
    assert_eq!(reply(&mut c), (EINVAL, 1));
    request(&mut c, 0, READ, 2, u64::MAX - 100, 512, &[]);
    assert_eq!(reply(&mut c), (EINVAL, 2));
    request(&mut c, 0, READ, 3, 100, 512, &[]);
    assert_eq!(reply(&mut c), (EINVAL, 3));
    request(&mut c, 0, 77, 4, 0, 0, &[]);
    assert_eq!(reply(&mut c), (EINVAL, 4));
    request(&mut c, 0, WRITE, 5, 1 << 20, 512, &[1; 512]);
    assert_eq!(reply(&mut c), (ENOSPC, 5));
    request(&mut c, 0, READ, 6, 0, MAX_REQUEST_LEN + 1, &[]);
    assert_eq!(reply(&mut c), (EINVAL, 6));
    // Still in sync: a good request works.
    request(&mut c, 0, WRITE, 7, 0, 512, &[9; 512]);
    assert_eq!(reply(&mut c), (0, 7));
    assert!(disk.data.lock().unwrap()[1 << 19..].iter().all(|&b| b == 0));
    // An oversized write is refused and the connection closed (payload cannot be skipped).
    request(&mut c, 0, WRITE, 8, 0, MAX_REQUEST_LEN + 512, &[]);
    assert_eq!(reply(&mut c), (EINVAL, 8));
    assert_eq!(h.join().unwrap(), "ok");
}

#[test]
fn garbage_and_bad_magic_close_the_connection_without_panic() {
    let srv = server(vec![("disk", MemExport::new(4096, false))]);
    // Garbage instead of the option magic.
    let (mut c, h) = connect(&srv);
    greet(&mut c);
    c.write_all(&[0xff; 64]).unwrap();
    assert!(h.join().unwrap().starts_with("err: NBD protocol error"));
    // Bad request magic after GO.
    let (mut c, h) = connect(&srv);
    greet(&mut c);
    go(&mut c, "disk");
    c.write_all(&[0u8; 28]).unwrap();
    assert!(h.join().unwrap().starts_with("err:"));
    // Oversized option payload.
    let (mut c, h) = connect(&srv);
    greet(&mut c);
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.write_all(&b).unwrap();
    assert!(h.join().unwrap().starts_with("err:"));
    // Client that is not fixed-newstyle.
    let (mut c, h) = connect(&srv);
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    c.write_all(&0u32.to_be_bytes()).unwrap();
    assert!(h.join().unwrap().starts_with("err:"));
    // Client hangs up mid-handshake.
    let (c, h) = connect(&srv);
    drop(c);
    assert!(h.join().unwrap().starts_with("err:"));
}

#[test]
fn options_list_info_unknown_export_and_read_only() {
    let ro = MemExport::new(8192, true);
    let srv = server(vec![
        ("a", MemExport::new(4096, false)),
        ("ro", Arc::clone(&ro)),
    ]);
    let (mut c, h) = connect(&srv);
    greet(&mut c);
    send_option(&mut c, OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (_, ty, d) = option_reply(&mut c);
        if ty == REP_ACK {
            break;
        }
        assert_eq!(ty, REP_SERVER);
        names.push(String::from_utf8(d[4..].to_vec()).unwrap());
    }
    assert_eq!(names, ["a", "ro"]);
    send_option(&mut c, OPT_GO, &go_payload("nope", &[]));
    assert_eq!(option_reply(&mut c).1, REP_ERR_UNKNOWN);
    send_option(&mut c, OPT_GO, &[0, 0, 0, 9, b'x']);
    assert_eq!(option_reply(&mut c).1, REP_ERR_INVALID);
    send_option(&mut c, 5, &[]); // STARTTLS
    assert_eq!(option_reply(&mut c).1, REP_ERR_UNSUP);
    let (size, flags) = go(&mut c, "ro");
    assert_eq!(size, 8192);
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    request(&mut c, 0, WRITE, 1, 0, 512, &[1; 512]);
    assert_eq!(reply(&mut c), (EPERM, 1));
    request(&mut c, 0, TRIM, 2, 0, 512, &[]);
    assert_eq!(reply(&mut c), (EPERM, 2));
    assert!(ro.data.lock().unwrap().iter().all(|&b| b == 0));
    drop(c);
    assert_eq!(h.join().unwrap(), "ok");
}

#[test]
fn shutdown_flushes_acknowledged_writes_and_stops_connections() {
    let disk = MemExport::new(1 << 16, false);
    let srv = server(vec![("disk", Arc::clone(&disk))]);
    let dir = std::env::temp_dir().join(format!("nbd-shutdown-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let listener = std::os::unix::net::UnixListener::bind(&dir).unwrap();
    let s2 = Arc::clone(&srv);
    let serving = std::thread::spawn(move || {
        s2.serve(Listener::Unix(listener))
            .map_err(|e| e.to_string())
    });
    let mut c = UnixStream::connect(&dir).unwrap();
    greet(&mut c);
    go(&mut c, "disk");
    request(&mut c, 0, WRITE, 1, 512, 512, &[0x77; 512]);
    assert_eq!(reply(&mut c), (0, 1));
    assert_eq!(disk.durable.lock().unwrap()[512], 0);
    srv.shutdown_flag().store(true, Ordering::SeqCst);
    assert_eq!(serving.join().unwrap(), Ok(()));
    assert_eq!(disk.durable.lock().unwrap()[512..1024], [0x77; 512]);
    // The client sees EOF: the server closed its side.
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).unwrap_or(0), 0);
    let _ = std::fs::remove_file(&dir);
}

#[test]
fn pipelined_requests_are_answered_in_order_and_none_is_held_back() {
    let disk = MemExport::new(4 << 20, false);
    let srv = server(vec![("disk", Arc::clone(&disk))]);
    let (mut c, h) = connect(&srv);
    // A reply the server held back would hang the test: fail instead.
    c.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    greet(&mut c);
    go(&mut c, "disk");
    // Writes of mixed sizes (some larger than the server's read and reply buffers), then reads
    // of every one, all sent before any reply is read.
    let sizes = [512u32, 4096, 65536, 131_072, 512, 300 * 1024, 8192];
    let mut writes = Vec::new();
    let mut off = 0u64;
    for (i, &len) in sizes.iter().enumerate() {
        let data: Vec<u8> = (0..len).map(|b| (b as usize * 31 + i) as u8).collect();
        writes.push((off, data));
        off += u64::from(len);
    }
    let sender = {
        let mut c2 = c.try_clone().unwrap();
        let writes = writes.clone();
        std::thread::spawn(move || {
            for (i, (off, data)) in writes.iter().enumerate() {
                request(&mut c2, 0, WRITE, i as u64, *off, data.len() as u32, data);
            }
            for (i, (off, data)) in writes.iter().enumerate() {
                request(
                    &mut c2,
                    0,
                    READ,
                    100 + i as u64,
                    *off,
                    data.len() as u32,
                    &[],
                );
            }
            request(&mut c2, 0, FLUSH, 200, 0, 0, &[]);
        })
    };
    for i in 0..writes.len() {
        assert_eq!(reply(&mut c), (0, i as u64));
    }
    for (i, (_, data)) in writes.iter().enumerate() {
        assert_eq!(reply(&mut c), (0, 100 + i as u64));
        let mut back = vec![0; data.len()];
        c.read_exact(&mut back).unwrap();
        assert!(back == *data, "read {i} differs");
    }
    assert_eq!(reply(&mut c), (0, 200));
    sender.join().unwrap();
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
    request(&mut c, 0, DISC, 300, 0, 0, &[]);
    assert_eq!(h.join().unwrap(), "ok");
}

/// A client that asks for replies and stops reading them blocks its connection thread in a
/// send; stopping the server still returns in bounded time, with the exports flushed.
#[test]
fn stop_returns_in_bounded_time_when_a_client_stopped_reading() {
    let (disk, srv) = limited(block::nbd::NbdLimits {
        shutdown_grace: std::time::Duration::from_secs(1),
        ..Default::default()
    });
    let (sock, serving) = serve_unix(&srv, "stuck");
    let mut c = UnixStream::connect(&sock).unwrap();
    greet(&mut c);
    go(&mut c, "disk");
    request(&mut c, 0, WRITE, 1, 0, 4096, &[0x42; 4096]);
    assert_eq!(reply(&mut c), (0, 1));
    // 64 MiB of READ replies asked for, none read.
    for i in 0..64 {
        request(&mut c, 0, READ, 10 + i, 0, 1 << 20, &[]);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let start = std::time::Instant::now();
    srv.shutdown_flag().store(true, Ordering::SeqCst);
    let r = serving
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("stopping the server hung on a client that does not read");
    assert_eq!(r, Ok(()));
    // The grace (1 s), then the sockets are shut down and the threads end at once.
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(disk.durable.lock().unwrap()[..4096], [0x42; 4096]);
    drop(c);
    let _ = std::fs::remove_file(&sock);
}

fn limited(limits: block::nbd::NbdLimits) -> (Arc<MemExport>, Arc<block::nbd::NbdServer>) {
    let disk = MemExport::new(1 << 20, false);
    let export: Arc<dyn block::Disk> = Arc::clone(&disk) as Arc<dyn block::Disk>;
    let srv = block::nbd::NbdServer::with_limits(vec![("disk".to_owned(), export)], limits);
    (disk, Arc::new(srv.unwrap()))
}

/// True if the server closes `c` without a greeting (the client was refused).
fn refused(c: &mut UnixStream) -> bool {
    c.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut b = [0u8; 1];
    matches!(c.read(&mut b), Ok(0))
}

#[test]
fn clients_over_the_connection_limit_are_refused() {
    let limits = block::nbd::NbdLimits {
        max_connections: 2,
        ..Default::default()
    };
    assert_eq!(
        block::nbd::NbdLimits::default().max_connections,
        block::nbd::DEFAULT_MAX_CONNECTIONS
    );
    let (_, srv) = limited(limits);
    let (sock, serving) = serve_unix(&srv, "limit");
    let mut a = UnixStream::connect(&sock).unwrap();
    greet(&mut a);
    go(&mut a, "disk");
    let mut b = UnixStream::connect(&sock).unwrap();
    greet(&mut b);
    go(&mut b, "disk");
    let mut c = UnixStream::connect(&sock).unwrap();
    assert!(
        refused(&mut c),
        "a third client was served over a limit of 2"
    );
    // The two served clients work on.
    request(&mut b, 0, WRITE, 1, 0, 512, &[5; 512]);
    assert_eq!(reply(&mut b), (0, 1));
    // Once one leaves, a new client is served.
    request(&mut a, 0, DISC, 2, 0, 0, &[]);
    drop(a);
    let start = std::time::Instant::now();
    let mut d = loop {
        let mut d = UnixStream::connect(&sock).unwrap();
        d.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let mut magic = [0u8; 8];
        if d.read_exact(&mut magic).is_ok() {
            assert_eq!(u64::from_be_bytes(magic), NBD_MAGIC);
            break d;
        }
        assert!(start.elapsed().as_secs() < 20, "no slot freed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut rest = [0u8; 10];
    d.read_exact(&mut rest).unwrap();
    d.write_all(&(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes())
        .unwrap();
    go(&mut d, "disk");
    srv.shutdown_flag().store(true, Ordering::SeqCst);
    assert_eq!(
        serving
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap(),
        Ok(())
    );
    let _ = std::fs::remove_file(&sock);
}

/// A connection thread that cannot be started (here: a stack no address space can hold)
/// refuses that client; the server goes on and stops cleanly.
#[test]
fn a_connection_thread_that_cannot_start_refuses_the_client() {
    let limits = block::nbd::NbdLimits {
        thread_stack: 1 << 50,
        ..Default::default()
    };
    let (disk, srv) = limited(limits);
    let (sock, serving) = serve_unix(&srv, "spawn");
    for _ in 0..3 {
        let mut c = UnixStream::connect(&sock).unwrap();
        assert!(refused(&mut c));
    }
    assert!(serving.try_recv().is_err(), "the server ended");
    srv.shutdown_flag().store(true, Ordering::SeqCst);
    assert_eq!(
        serving
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap(),
        Ok(())
    );
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
    let _ = std::fs::remove_file(&sock);
}

/// READ replies and WRITE payloads larger than the I/O chunk, at offsets that are not chunk
/// (or 4 KiB) aligned, arrive whole; an error in a WRITE past the end still consumes the
/// payload so the connection stays in step.
#[test]
fn large_requests_are_streamed_intact() {
    let disk = MemExport::new(8 << 20, false);
    let srv = server(vec![("disk", Arc::clone(&disk))]);
    let (mut c, h) = connect(&srv);
    greet(&mut c);
    go(&mut c, "disk");
    let chunk = block::nbd::IO_CHUNK;
    let len = 3 * chunk + 1536;
    let data: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
    let off = 4096 * 3 + 512;
    request(&mut c, 0, WRITE, 1, off as u64, len as u32, &data);
    assert_eq!(reply(&mut c), (0, 1));
    assert_eq!(disk.data.lock().unwrap()[off..off + len], data[..]);
    request(&mut c, 0, READ, 2, off as u64, len as u32, &[]);
    assert_eq!(reply(&mut c), (0, 2));
    let mut back = vec![0u8; len];
    c.read_exact(&mut back).unwrap();
    assert!(back == data);
    // Past the end: refused, payload skipped, next request fine.
    request(&mut c, 0, WRITE, 3, (8 << 20) - 4096, len as u32, &data);
    assert_eq!(reply(&mut c), (ENOSPC, 3));
    request(&mut c, 0, READ, 4, 0, 512, &[]);
    assert_eq!(reply(&mut c), (0, 4));
    let mut b = [0u8; 512];
    c.read_exact(&mut b).unwrap();
    request(&mut c, 0, DISC, 5, 0, 0, &[]);
    assert_eq!(h.join().unwrap(), "ok");
}
