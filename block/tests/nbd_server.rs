//! NBD server tests: a raw protocol client in the test, malformed input, shutdown, and qemu-io interop.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use block::nbd::proto::*;
use block::nbd::{Listener, NbdServer};
use block::{BlockError, Disk};

/// In-memory export that keeps a "durable" copy updated only by flush.
struct MemExport {
    data: Mutex<Vec<u8>>,
    durable: Mutex<Vec<u8>>,
    flushes: AtomicUsize,
    read_only: bool,
}

impl MemExport {
    fn new(size: usize, read_only: bool) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![0; size]),
            durable: Mutex::new(vec![0; size]),
            flushes: AtomicUsize::new(0),
            read_only,
        })
    }
}

impl Disk for MemExport {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, b: &mut [u8], o: u64) -> Result<(), BlockError> {
        let v = self.data.lock().unwrap();
        b.copy_from_slice(&v[o as usize..o as usize + b.len()]);
        Ok(())
    }
    fn write_at(&self, d: &[u8], o: u64) -> Result<(), BlockError> {
        let mut v = self.data.lock().unwrap();
        v[o as usize..o as usize + d.len()].copy_from_slice(d);
        Ok(())
    }
    fn write_zeroes(&self, o: u64, l: u64) -> Result<(), BlockError> {
        let mut v = self.data.lock().unwrap();
        v[o as usize..(o + l) as usize].fill(0);
        Ok(())
    }
    fn discard(&self, o: u64, l: u64) -> Result<(), BlockError> {
        self.write_zeroes(o, l)
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        let d = self.data.lock().unwrap().clone();
        *self.durable.lock().unwrap() = d;
        Ok(())
    }
}

fn server(exports: Vec<(&str, Arc<MemExport>)>) -> Arc<NbdServer> {
    Arc::new(
        NbdServer::new(
            exports
                .into_iter()
                .map(|(n, e)| (n.to_owned(), e as Arc<dyn Disk>))
                .collect(),
        )
        .unwrap(),
    )
}

/// Connects an in-process client to `srv.handle` over a socket pair.
fn connect(srv: &Arc<NbdServer>) -> (UnixStream, std::thread::JoinHandle<String>) {
    let (client, mut conn) = UnixStream::pair().unwrap();
    let srv = Arc::clone(srv);
    let h = std::thread::spawn(move || match srv.handle(&mut conn) {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("err: {e}"),
    });
    (client, h)
}

fn read_u32s(c: &mut UnixStream) -> u32 {
    read_u32(c).unwrap()
}

/// Reads the server greeting and sends client flags.
fn greet(c: &mut UnixStream) {
    assert_eq!(read_u64(c).unwrap(), NBD_MAGIC);
    assert_eq!(read_u64(c).unwrap(), IHAVEOPT);
    let flags = read_u16(c).unwrap();
    assert_eq!(flags & FLAG_FIXED_NEWSTYLE, FLAG_FIXED_NEWSTYLE);
    c.write_all(&(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes())
        .unwrap();
}

fn send_option(c: &mut UnixStream, code: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    c.write_all(&b).unwrap();
}

/// Reads one option reply: (option, type, data).
fn option_reply(c: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    assert_eq!(read_u64(c).unwrap(), OPT_REPLY_MAGIC);
    let opt = read_u32s(c);
    let ty = read_u32s(c);
    let len = read_u32s(c);
    let mut d = vec![0; len as usize];
    c.read_exact(&mut d).unwrap();
    (opt, ty, d)
}

fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Performs NBD_OPT_GO and returns (size, transmission flags).
fn go(c: &mut UnixStream, name: &str) -> (u64, u16) {
    send_option(c, OPT_GO, &go_payload(name, &[INFO_BLOCK_SIZE]));
    let mut export = None;
    loop {
        let (opt, ty, d) = option_reply(c);
        assert_eq!(opt, OPT_GO);
        match ty {
            REP_INFO if u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT => {
                let size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                let flags = u16::from_be_bytes([d[10], d[11]]);
                export = Some((size, flags));
            }
            REP_INFO => {}
            REP_ACK => return export.expect("INFO_EXPORT before ACK"),
            other => panic!("unexpected reply {other:#x}"),
        }
    }
}

fn request(c: &mut UnixStream, flags: u16, cmd: u16, cookie: u64, off: u64, len: u32, data: &[u8]) {
    let mut h = Vec::with_capacity(28 + data.len());
    h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&cmd.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(&off.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(data);
    c.write_all(&h).unwrap();
}

/// Reads a simple reply: (error, cookie).
fn reply(c: &mut UnixStream) -> (u32, u64) {
    assert_eq!(read_u32(c).unwrap(), SIMPLE_REPLY_MAGIC);
    let err = read_u32(c).unwrap();
    let cookie = read_u64(c).unwrap();
    (err, cookie)
}

const READ: u16 = 0;
const WRITE: u16 = 1;
const DISC: u16 = 2;
const FLUSH: u16 = 3;
const TRIM: u16 = 4;
const ZEROES: u16 = 6;

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
