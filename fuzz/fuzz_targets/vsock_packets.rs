//! The vsock device's handling of guest packets: headers decoded and validated as the TX queue
//! does, valid ones fed to a muxer (with a host service listening on port 1234), replies to the
//! guest drained after each packet.
#![no_main]

use std::os::unix::net::UnixListener;
use std::sync::OnceLock;

use devices::virtio::vsock::muxer::Muxer;
use devices::virtio::vsock::packet::{HDR_LEN, HOST_CID, Header, MAX_PAYLOAD, TYPE_STREAM};
use libfuzzer_sys::fuzz_target;

const GUEST_CID: u64 = 3;

fn uds() -> &'static std::path::Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = microvmm_fuzz::scratch().join("v.sock");
        // A host service on port 1234 that takes connections and keeps the last few open
        // without reading them (one thread: threads started per input would be reported as
        // leaks by LeakSanitizer while they run).
        let listener = UnixListener::bind(path.with_file_name("v.sock_1234")).unwrap();
        std::thread::spawn(move || {
            let mut open = std::collections::VecDeque::new();
            for s in listener.incoming().flatten() {
                open.push_back(s);
                if open.len() > 16 {
                    open.pop_front();
                }
            }
        });
        path
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut m) = Muxer::new(GUEST_CID, uds()) else {
        return;
    };
    let mut rest = data;
    while rest.len() > HDR_LEN {
        let ctl = rest[0];
        let mut hb = [0u8; HDR_LEN];
        hb.copy_from_slice(&rest[1..=HDR_LEN]);
        rest = &rest[HDR_LEN + 1..];
        let mut h = Header::decode(&hb);
        // Bit 0 makes the addressing valid (the fuzzer would seldom guess it), bit 1 points
        // the packet at the listening host service.
        if ctl & 1 != 0 {
            h.src_cid = GUEST_CID;
            h.dst_cid = HOST_CID;
            h.type_ = TYPE_STREAM;
            h.len %= 512;
        }
        if ctl & 2 != 0 {
            h.dst_port = 1234;
        }
        let take = (h.len as usize).min(rest.len()).min(MAX_PAYLOAD);
        let (payload, r) = rest.split_at(take);
        rest = r;
        if h.validate(GUEST_CID, payload.len()).is_ok() {
            m.handle_guest_packet(&h, payload);
        }
        m.service_host();
        for _ in 0..8 {
            if m.next_rx(usize::from(ctl) * 64).is_none() {
                break;
            }
        }
    }
});
