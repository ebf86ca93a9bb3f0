//! An in-memory export and a raw NBD protocol client, shared by the NBD server tests.
#![allow(dead_code)] // each test binary uses its own subset
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use block::nbd::NbdServer;
use block::nbd::proto::*;
use block::{BlockError, Disk};

/// In-memory export that keeps a "durable" copy updated only by flush.
pub struct MemExport {
    pub data: Mutex<Vec<u8>>,
    pub durable: Mutex<Vec<u8>>,
    pub flushes: AtomicUsize,
    pub read_only: bool,
}

impl MemExport {
    pub fn new(size: usize, read_only: bool) -> Arc<Self> {
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

pub fn server(exports: Vec<(&str, Arc<MemExport>)>) -> Arc<NbdServer> {
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
pub fn connect(srv: &Arc<NbdServer>) -> (UnixStream, std::thread::JoinHandle<String>) {
    let (client, mut conn) = UnixStream::pair().unwrap();
    let srv = Arc::clone(srv);
    let h = std::thread::spawn(move || match srv.handle(&mut conn) {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("err: {e}"),
    });
    (client, h)
}

pub fn read_u32s(c: &mut UnixStream) -> u32 {
    read_u32(c).unwrap()
}

/// Reads the server greeting and sends client flags.
pub fn greet(c: &mut UnixStream) {
    assert_eq!(read_u64(c).unwrap(), NBD_MAGIC);
    assert_eq!(read_u64(c).unwrap(), IHAVEOPT);
    let flags = read_u16(c).unwrap();
    assert_eq!(flags & FLAG_FIXED_NEWSTYLE, FLAG_FIXED_NEWSTYLE);
    c.write_all(&(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes())
        .unwrap();
}

pub fn send_option(c: &mut UnixStream, code: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    c.write_all(&b).unwrap();
}

/// Reads one option reply: (option, type, data).
pub fn option_reply(c: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    assert_eq!(read_u64(c).unwrap(), OPT_REPLY_MAGIC);
    let opt = read_u32s(c);
    let ty = read_u32s(c);
    let len = read_u32s(c);
    let mut d = vec![0; len as usize];
    c.read_exact(&mut d).unwrap();
    (opt, ty, d)
}

pub fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
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
pub fn go(c: &mut UnixStream, name: &str) -> (u64, u16) {
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

pub fn request(
    c: &mut UnixStream,
    flags: u16,
    cmd: u16,
    cookie: u64,
    off: u64,
    len: u32,
    data: &[u8],
) {
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
pub fn reply(c: &mut UnixStream) -> (u32, u64) {
    assert_eq!(read_u32(c).unwrap(), SIMPLE_REPLY_MAGIC);
    let err = read_u32(c).unwrap();
    let cookie = read_u64(c).unwrap();
    (err, cookie)
}

pub const READ: u16 = 0;
pub const WRITE: u16 = 1;
pub const DISC: u16 = 2;
pub const FLUSH: u16 = 3;
pub const TRIM: u16 = 4;
pub const ZEROES: u16 = 6;

/// Serves `srv` on a new Unix socket; returns its path and a receiver of `serve`'s result.
pub fn serve_unix(
    srv: &Arc<NbdServer>,
    name: &str,
) -> (
    std::path::PathBuf,
    std::sync::mpsc::Receiver<Result<(), String>>,
) {
    let path = std::env::temp_dir().join(format!("nbd-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let s2 = Arc::clone(srv);
    std::thread::spawn(move || {
        let r = s2
            .serve(block::nbd::Listener::Unix(listener))
            .map_err(|e| e.to_string());
        let _ = tx.send(r);
    });
    (path, rx)
}

/// An export of `size` bytes that reads zeros and drops writes: no memory of its own.
#[derive(Debug)]
pub struct NullExport(pub u64);

impl Disk for NullExport {
    fn size(&self) -> u64 {
        self.0
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_at(&self, b: &mut [u8], _: u64) -> Result<(), BlockError> {
        b.fill(0);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<(), BlockError> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), BlockError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
}
