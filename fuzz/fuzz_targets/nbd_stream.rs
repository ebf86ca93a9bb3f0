//! The NBD server's request stream: the input is what a client sends (after an optional valid
//! handshake prefix, so that transmission requests are reached), served against a RAM disk.
#![no_main]

use std::io::{self, Read, Write};
use std::sync::{Arc, OnceLock};

use block::nbd::{NbdServer, proto};
use devices::virtio::testing::RamDisk;
use libfuzzer_sys::fuzz_target;

/// A client connection: reads the input, collects the replies.
struct Stream<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Stream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Stream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Bounded, as a client that stops reading would be (the server must not care).
        if self.output.len() > 8 << 20 {
            self.output.clear();
        }
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn server() -> &'static NbdServer {
    static SERVER: OnceLock<NbdServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let rw: Arc<dyn block::Disk> = RamDisk::new(1 << 20, false);
        let ro: Arc<dyn block::Disk> = RamDisk::new(64 << 10, true);
        NbdServer::new(vec![("disk".into(), rw), ("ro".into(), ro)]).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let mut input = Vec::new();
    if ctl & 1 != 0 {
        // Fixed newstyle, no zeroes, then NBD_OPT_EXPORT_NAME for one of the exports.
        let name: &[u8] = if ctl & 2 != 0 { b"ro" } else { b"disk" };
        input.extend_from_slice(
            &(proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES).to_be_bytes(),
        );
        input.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&proto::OPT_EXPORT_NAME.to_be_bytes());
        input.extend_from_slice(&(name.len() as u32).to_be_bytes());
        input.extend_from_slice(name);
    }
    input.extend_from_slice(rest);
    let mut s = Stream {
        input: &input,
        output: Vec::new(),
    };
    let _ = server().handle(&mut s);
});
