//! virtio-net tests: frame handling on crafted and random rings (no host network needed), and
//! the device end to end on a TAP in a private network namespace (as root; SKIP otherwise).
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::time::Duration;

use proptest::prelude::*;
use virtio_bindings::virtio_net as vn;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::queue_io::{Negotiated, RxOutcome, RxScratch, TxError, deliver_rx, read_tx_chain};
use super::*;
use crate::virtio::testing::{
    AVAIL, DATA, DESC, Driver, NetNs, PacketSocket, USED, memory, net_or_skip, publish, queue,
    write_desc,
};

/// Ethertype of the test frames (IEEE local experimental), so the tests see only their own.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[12..14].copy_from_slice(&ETHERTYPE);
    for (i, b) in f.iter_mut().enumerate().skip(14) {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    f
}

fn ours(f: &[u8]) -> bool {
    f.len() >= 14 && f[12..14] == ETHERTYPE
}

fn features(bits: &[u32]) -> u64 {
    bits.iter()
        .fold(1u64 << VIRTIO_F_VERSION_1, |f, b| f | (1u64 << b))
}

fn used_entries(mem: &GuestMemory) -> Vec<(u32, u32)> {
    let n: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    (0..u64::from(n))
        .map(|i| {
            let at = USED + 4 + i * 8;
            (
                mem.read_obj(GuestAddress(at)).unwrap(),
                mem.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        })
        .collect()
}

#[test]
fn mac_addresses_parse_print_and_refuse_garbage() {
    let m: MacAddr = "06:00:AC:10:00:02".parse().unwrap();
    assert_eq!(m.0, [6, 0, 0xac, 0x10, 0, 2]);
    assert_eq!(m.to_string(), "06:00:ac:10:00:02");
    for bad in [
        "",
        "06:00:ac:10:00",
        "06:00:ac:10:00:02:03",
        "06:00:ac:10:00:2",
        "06-00-ac-10-00-02",
        "zz:00:ac:10:00:02",
        "01:00:5e:00:00:01", // multicast
    ] {
        assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} accepted");
    }
    let r = MacAddr::random_local();
    assert_eq!(r.0[0] & 3, 2, "locally administered unicast: {r}");
    assert_ne!(r, MacAddr::random_local());
    let json = serde_json::to_string(&m).unwrap();
    assert_eq!(json, "\"06:00:ac:10:00:02\"");
    assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), m);
    assert!(serde_json::from_str::<MacAddr>("\"nope\"").is_err());
}

#[test]
fn tx_chains_are_validated_before_any_byte_goes_out() {
    let mem = memory();
    let neg = Negotiated::default();
    let hdr_and = |len: usize| {
        let mut b = vec![0u8; 12];
        b.extend(frame(len, 1));
        b
    };
    // (descriptors, expected)
    let good = hdr_and(60);
    mem.write_slice(&good, GuestAddress(DATA)).unwrap();
    type Case = (Vec<(u64, u32, u16)>, Result<usize, TxError>);
    let cases: Vec<Case> = vec![
        (vec![(DATA, 72, 0)], Ok(72)),
        // Header and frame in two descriptors.
        (vec![(DATA, 12, 1), (DATA + 12, 60, 0)], Ok(72)),
        (vec![(DATA, 0, 0)], Err(TxError::ShortHeader(0))),
        (vec![(DATA, 11, 0)], Err(TxError::ShortHeader(11))),
        (vec![(DATA, 12, 0)], Err(TxError::Runt(0))),
        (vec![(DATA, 20, 0)], Err(TxError::Runt(8))),
        (
            vec![(DATA, 12 + 1519, 0)],
            Err(TxError::TooLarge {
                len: 1519,
                max: 1518,
            }),
        ),
        (vec![(DATA, 72, 2)], Err(TxError::WritableBuffer)),
        (
            vec![(DATA, 12, 1), (DATA, 60, 3)],
            Err(TxError::WritableBuffer),
        ),
        (vec![(1 << 40, 72, 0)], Err(TxError::InvalidChain)),
        // A looping chain ends at the queue size (16 descriptors): 3200 bytes, too large.
        (
            vec![(DATA, 200, 1), (DATA, 200, 1)],
            Err(TxError::TooLarge {
                len: 3188,
                max: 1518,
            }),
        ),
    ];
    for (descs, want) in cases {
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let i = i as u16;
            // A chain whose second descriptor points back at the first loops forever.
            let next = if descs.len() == 2 && flags & 1 != 0 && i == 1 {
                0
            } else {
                i + 1
            };
            write_desc(&mem, DESC, i, *addr, *len, *flags, next);
        }
        let mut q = queue();
        publish(&mem, &[0]);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let mut buf = Vec::new();
        assert_eq!(
            read_tx_chain(chain, &mem, &neg, &mut buf),
            want,
            "{descs:?}"
        );
        if let Ok(n) = want {
            assert_eq!(&buf[..n], &good[..]);
        }
    }
}

#[test]
fn tx_offloads_must_have_been_negotiated() {
    let mem = memory();
    let mut f = vec![0u8; 12];
    f.extend(frame(1000, 2));
    let check = |neg: &Negotiated, flags: u8, gso: u8, len: usize| {
        let mut g = f.clone();
        g.resize(len, 7);
        g[0] = flags;
        g[1] = gso;
        mem.write_slice(&g, GuestAddress(DATA)).unwrap();
        write_desc(&mem, DESC, 0, DATA, len as u32, 0, 0);
        let mut q = queue();
        publish(&mem, &[0]);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        read_tx_chain(chain, &mem, neg, &mut Vec::new())
    };
    let plain = Negotiated::default();
    let csum = vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    let tso4 = vn::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    assert!(check(&plain, 0, 0, 1012).is_ok());
    assert!(matches!(
        check(&plain, csum, 0, 1012),
        Err(TxError::Offload { .. })
    ));
    assert!(matches!(
        check(&plain, 0, tso4, 1012),
        Err(TxError::Offload { .. })
    ));
    assert!(matches!(
        check(&plain, 0x80, 0, 1012),
        Err(TxError::Offload { .. })
    ));
    let tso = Negotiated::from_features(features(&[
        vn::VIRTIO_NET_F_CSUM,
        vn::VIRTIO_NET_F_HOST_TSO4,
    ]));
    assert!(check(&tso, csum, tso4, 12 + 9000).is_ok());
    assert!(matches!(
        check(&tso, csum, vn::VIRTIO_NET_HDR_GSO_TCPV6 as u8, 1012),
        Err(TxError::Offload { .. })
    ));
    assert!(matches!(
        check(&tso, csum, tso4 | 0x80, 1012),
        Err(TxError::Offload { .. })
    ));
    assert!(matches!(
        check(&tso, csum, tso4, 12 + 65_554),
        Err(TxError::TooLarge { .. })
    ));
}

/// Lays out `n` receive chains of `size` bytes each at DATA + i * 0x10000.
fn rx_buffers(mem: &GuestMemory, n: u16, size: u32) {
    for i in 0..n {
        write_desc(mem, DESC, i, DATA + u64::from(i) * 0x10000, size, 2, 0);
    }
    publish(mem, &(0..n).collect::<Vec<_>>());
}

#[test]
fn a_received_frame_spans_mergeable_buffers_published_at_once() {
    let mem = memory();
    rx_buffers(&mem, 4, 1024);
    let mut q = queue();
    let f = frame(1500, 3);
    let mut buf = vec![0u8; 12];
    buf.extend(&f);
    let out = deliver_rx(&mut q, &mem, &mut buf, true, &mut RxScratch::default()).unwrap();
    assert_eq!(out, RxOutcome::Delivered(2));
    assert_eq!(used_entries(&mem), vec![(0, 1024), (1, 1512 - 1024)]);
    let mut got = vec![0u8; 1512];
    mem.read_slice(&mut got[..1024], GuestAddress(DATA))
        .unwrap();
    mem.read_slice(&mut got[1024..], GuestAddress(DATA + 0x10000))
        .unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    assert_eq!(&got[12..], &f[..]);
    // The next frame starts at the third buffer.
    let mut small = vec![0u8; 12];
    small.extend(frame(60, 4));
    let out = deliver_rx(&mut q, &mem, &mut small, true, &mut RxScratch::default()).unwrap();
    assert_eq!(out, RxOutcome::Delivered(1));
    assert_eq!(used_entries(&mem)[2], (2, 72));
}

#[test]
fn a_frame_after_a_half_written_broken_chain_starts_afresh_and_num_buffers_may_straddle() {
    let mem = memory();
    // Chain 0: a writable buffer, then a read-only one (broken, found after the first got
    // written). Chain 1: an 8-byte buffer and a 1000-byte one, so `num_buffers` (header bytes
    // 10..12) lies in its second buffer. Chain 2: 1024 bytes for the rest of the frame.
    write_desc(&mem, DESC, 0, DATA, 512, 3, 1);
    write_desc(&mem, DESC, 1, DATA + 0x1000, 512, 0, 0);
    write_desc(&mem, DESC, 2, DATA + 0x10000, 8, 3, 3);
    write_desc(&mem, DESC, 3, DATA + 0x20000, 1000, 2, 0);
    write_desc(&mem, DESC, 4, DATA + 0x30000, 1024, 2, 0);
    publish(&mem, &[0, 2, 4]);
    let mut q = queue();
    let f = frame(1500, 6);
    let mut buf = vec![0u8; 12];
    buf.extend(&f);
    let out = deliver_rx(&mut q, &mem, &mut buf, true, &mut RxScratch::default()).unwrap();
    assert_eq!(out, RxOutcome::Delivered(2));
    assert_eq!(
        used_entries(&mem),
        vec![(2, 1008), (4, 1512 - 1008), (0, 0)]
    );
    let mut got = vec![0u8; 1512];
    mem.read_slice(&mut got[..8], GuestAddress(DATA + 0x10000))
        .unwrap();
    mem.read_slice(&mut got[8..1008], GuestAddress(DATA + 0x20000))
        .unwrap();
    mem.read_slice(&mut got[1008..], GuestAddress(DATA + 0x30000))
        .unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    assert_eq!(&got[12..], &f[..]);
}

#[test]
fn used_entries_are_published_across_the_ring_wrap_with_one_index_update() {
    let mem = memory();
    let mut q = queue();
    q.set_next_used(12);
    let entries: Vec<(u16, u32)> = (0..40u16).map(|i| (i % 16, 100 + u32::from(i))).collect();
    queue_io::publish_used(&mut q, &mem, &entries).unwrap();
    assert_eq!(q.next_used(), 52);
    let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(idx, 52);
    // Slot of entry i is (12 + i) % 16; the last 16 entries (24..40) are what the ring holds.
    for i in 24..40u16 {
        let at = USED + 4 + u64::from((12 + i) % 16) * 8;
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        assert_eq!(
            (id, len),
            (u32::from(i % 16), 100 + u32::from(i)),
            "entry {i}"
        );
    }
    // Nothing past the ring's 16 slots was written.
    let after: u64 = mem.read_obj(GuestAddress(USED + 4 + 16 * 8)).unwrap();
    assert_eq!(after, 0);
}

/// The receive path with no TAP, mergeable buffers and throwaway counters and interrupt.
fn run_rx(
    rx: &mut Receiver,
    q: &std::sync::Mutex<virtio_queue::Queue>,
    mem: &GuestMemory,
) -> Result<(), queue_io::RingError> {
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
    let interrupt = crate::virtio::Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let counters = crate::virtio::DeviceCounters::default();
    rx.run(
        q,
        mem,
        &std::sync::Mutex::new(None),
        true,
        &counters,
        &interrupt,
    )
}

/// Runs `f` on a thread; false if it has not returned within `secs`.
fn returns_within(secs: u64, f: impl FnOnce() + Send + 'static) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(secs)).is_ok()
}

#[test]
fn an_available_index_past_the_ring_is_an_error_not_a_busy_loop() {
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
    // The driver claims 17 new chains on a 16-entry ring: no chain can be taken, and looking
    // again never helps. Both paths must give up with an error (the device then needs a reset).
    let transmit = returns_within(5, || {
        let mem = memory();
        mem.write_obj(17u16, GuestAddress(AVAIL + 2)).unwrap();
        let mut q = queue();
        let interrupt = crate::virtio::Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let r = Transmitter::new(Negotiated::default()).run(
            &mut q,
            &mem,
            &std::sync::Mutex::new(None),
            &crate::virtio::DeviceCounters::default(),
            &interrupt,
        );
        assert!(r.is_err(), "{r:?}");
    });
    assert!(transmit, "the transmit path kept looking at a broken ring");
    let receive = returns_within(5, || {
        let mem = memory();
        mem.write_obj(17u16, GuestAddress(AVAIL + 2)).unwrap();
        let q = std::sync::Mutex::new(queue());
        let mut rx = Receiver::new();
        // A frame waits for buffers (as after a TAP read): the path must look at the ring.
        rx.hold_for_test(64);
        let r = run_rx(&mut rx, &q, &mem);
        assert!(r.is_err(), "{r:?}");
    });
    assert!(receive, "the receive path kept looking at a broken ring");
}

#[test]
fn a_frame_waiting_for_more_buffers_than_offered_leaves_the_worker_free() {
    // Mergeable buffers: one 1024-byte chain for a 1512-byte frame. The path must return (the
    // frame waits for the driver's notification), not look at the same chain again and again.
    let done = returns_within(5, || {
        let mem = memory();
        rx_buffers(&mem, 1, 1024);
        let q = std::sync::Mutex::new(queue());
        let mut rx = Receiver::new();
        rx.hold_for_test(1512);
        run_rx(&mut rx, &q, &mem).unwrap();
        assert!(rx.is_waiting());
        assert_eq!(q.lock().unwrap().next_avail(), 0, "nothing consumed");
        // A second buffer arrives: the frame goes out over both.
        write_desc(&mem, DESC, 1, DATA + 0x10000, 1024, 2, 0);
        publish(&mem, &[0, 1]);
        run_rx(&mut rx, &q, &mem).unwrap();
        assert!(!rx.is_waiting());
        assert_eq!(used_entries(&mem), vec![(0, 1024), (1, 1512 - 1024)]);
    });
    assert!(done, "the receive path kept looking at too few buffers");
}

#[test]
fn without_buffers_nothing_is_consumed_and_oversized_frames_are_dropped() {
    let mem = memory();
    let mut f = vec![0u8; 12];
    f.extend(frame(1500, 5));
    // Mergeable, one 1024-byte buffer of a 16-entry ring: wait for more.
    rx_buffers(&mem, 1, 1024);
    let mut q = queue();
    assert_eq!(
        deliver_rx(&mut q, &mem, &mut f, true, &mut RxScratch::default()).unwrap(),
        RxOutcome::NoBuffers
    );
    assert_eq!(q.next_avail(), 0, "nothing consumed");
    assert!(used_entries(&mem).is_empty());
    // Not mergeable: a chain too small for the frame can never take it.
    assert_eq!(
        deliver_rx(&mut q, &mem, &mut f, false, &mut RxScratch::default()).unwrap(),
        RxOutcome::Dropped
    );
    assert_eq!(q.next_avail(), 0);
    // A frame larger than the whole ring (16 chains of 64 bytes) is dropped, not waited for.
    rx_buffers(&mem, 16, 64);
    let mut q = queue();
    assert_eq!(
        deliver_rx(&mut q, &mem, &mut f, true, &mut RxScratch::default()).unwrap(),
        RxOutcome::Dropped
    );
    assert_eq!(q.next_avail(), 0);
    // Broken receive chains (read-only, outside memory) are returned empty, and skipped.
    write_desc(&mem, DESC, 0, DATA, 2048, 0, 0);
    write_desc(&mem, DESC, 1, 1 << 40, 2048, 2, 0);
    write_desc(&mem, DESC, 2, DATA, 2048, 2, 0);
    publish(&mem, &[0, 1, 2]);
    let mut q = queue();
    assert_eq!(
        deliver_rx(&mut q, &mem, &mut f, false, &mut RxScratch::default()).unwrap(),
        RxOutcome::Delivered(1)
    );
    assert_eq!(used_entries(&mem), vec![(2, 1512), (0, 0), (1, 0)]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    /// Random descriptor tables and rings on both queues never panic, never use more chains
    /// than were published, and never write guest memory outside the chains' buffers.
    #[test]
    fn random_descriptor_tables_are_handled(
        descs in proptest::collection::vec((0u64..(40 << 20), 0u32..(1 << 18), 0u16..8, 0u16..32), 16),
        heads in proptest::collection::vec(0u16..24, 0..16),
        frame_len in 0usize..70_000,
        mergeable in any::<bool>(),
        neg_bits in any::<u64>(),
    ) {
        let mem = memory();
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            write_desc(&mem, DESC, i as u16, *addr, *len, *flags, *next);
        }
        publish(&mem, &heads);
        // Transmit: every chain either yields a frame within bounds or an error.
        let neg = Negotiated::from_features(neg_bits);
        let mut q = queue();
        let mut buf = Vec::new();
        let mut n = 0;
        while let Some(chain) = q.pop_descriptor_chain(&mem) {
            if let Ok(len) = read_tx_chain(chain, &mem, &neg, &mut buf) {
                prop_assert!(len <= 12 + neg.max_tx_frame());
            }
            prop_assert!(buf.len() <= queue_io::MAX_BUFFER);
            n += 1;
        }
        prop_assert!(n <= heads.len());
        // Receive: whatever happens, the used ring holds at most the published chains.
        let mut q = queue();
        let mut f = vec![0xa5u8; frame_len];
        let mut scratch = RxScratch::default();
        let mut delivered = 0usize;
        for _ in 0..4 {
            match deliver_rx(&mut q, &mem, &mut f, mergeable, &mut scratch) {
                Ok(RxOutcome::Delivered(k)) => delivered += usize::from(k),
                Ok(_) | Err(_) => break,
            }
        }
        // The device's own count of used entries (not the ring in memory: a receive buffer the
        // guest points at its own rings gets the frame written over them, as asked; found by
        // this test in a CI run, a chain at guest address 0 covering the used ring).
        prop_assert!(usize::from(q.next_used()) <= heads.len());
        prop_assert!(delivered <= heads.len());
    }
}

// --- The device on a TAP -------------------------------------------------------------------

/// A namespace with TAP `tap`, a device on it behind the test driver (negotiating `bits`),
/// and a packet socket on the interface; the calling thread stays in the namespace while the
/// returned guard lives.
struct Rig {
    driver: Driver,
    handle: NetHandle,
    counters: Arc<DeviceCounters>,
    sock: PacketSocket,
    _guard: crate::virtio::testing::NetNsGuard,
    ns: NetNs,
}

fn rig(tag: &str, bits: &[u32]) -> Rig {
    let ns = NetNs::new(tag).unwrap();
    ns.add_tap("t0", None).unwrap();
    let guard = ns.enter().unwrap();
    let sock = PacketSocket::bind("t0").unwrap();
    let tap = Tap::open("t0").unwrap();
    ns.wait_up("t0").unwrap();
    let net = Net::new(tap, "06:00:00:00:00:07".parse().unwrap()).unwrap();
    let handle = net.handle();
    let counters = net.counters().unwrap();
    let mut driver = Driver::new(Box::new(net));
    let status = driver.init(features(bits), 2);
    assert_eq!(status & 0xf, 0xf, "driver ok");
    Rig {
        driver,
        handle,
        counters,
        sock,
        _guard: guard,
        ns,
    }
}

impl Rig {
    /// Sends `f` (with a zero header) on the transmit queue and waits for its completion.
    fn transmit(&mut self, addr: u64, f: &[u8]) {
        let mut b = vec![0u8; 12];
        b.extend_from_slice(f);
        self.driver.mem.write_slice(&b, GuestAddress(addr)).unwrap();
        self.driver.add_chain_q(1, &[(addr, b.len() as u32, false)]);
        assert_eq!(self.driver.kick_and_wait_q(1, 1)[0].1, 0);
    }

    fn post_rx(&mut self, addr: u64, len: u32) {
        self.driver.add_chain_q(0, &[(addr, len, true)]);
        self.driver.wr(0x50, 0);
    }

    fn rx_bytes(&self, addr: u64, len: u32) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        self.driver
            .mem
            .read_slice(&mut b, GuestAddress(addr))
            .unwrap();
        b
    }

    fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }
}

const WAIT: Duration = Duration::from_secs(5);

#[test]
fn frames_cross_the_tap_both_ways() {
    if !net_or_skip("frames_cross_the_tap_both_ways") {
        return;
    }
    let mut r = rig("xfer", &[vn::VIRTIO_NET_F_MAC, vn::VIRTIO_NET_F_MRG_RXBUF]);
    // The MAC is in the configuration space.
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        let mut one = [0u8; 1];
        r.driver.transport.read(0x100 + i as u64, &mut one);
        *b = one[0];
    }
    assert_eq!(mac, [6, 0, 0, 0, 0, 7]);

    // Transmit: the frame appears on the interface byte for byte.
    let f = frame(1514, 9);
    r.transmit(DATA, &f);
    let got = r.sock.recv_matching(WAIT, ours).unwrap();
    assert_eq!(got.as_deref(), Some(&f[..]));

    // Receive into two 1024-byte buffers (mergeable), straight from the TAP: the pages the
    // kernel wrote are in the dirty log all the same.
    let rx = DATA + 0x100000;
    let mem = r.driver.mem.clone();
    let region = mem.find_region(GuestAddress(rx)).unwrap();
    let log: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
    log.bitmap().reset();
    r.post_rx(rx, 1024);
    r.post_rx(rx + 0x1000, 1024);
    let g = frame(1400, 10);
    r.sock.send(&g).unwrap();
    let used = r.driver.wait_used(0, 2);
    assert_eq!(used, vec![(0, 1024), (1, 1412 - 1024)]);
    let mut back = r.rx_bytes(rx, 1024);
    back.extend(r.rx_bytes(rx + 0x1000, 1412 - 1024));
    assert_eq!(u16::from_le_bytes([back[10], back[11]]), 2);
    assert_eq!(&back[12..], &g[..]);
    let base = region.start_addr().raw_value();
    for page in [rx, rx + 0x1000] {
        assert!(
            log.bitmap().dirty_at((page - base) as usize),
            "page {page:#x} not logged"
        );
    }
    assert_eq!(r.counters.requests.load(Ordering::Relaxed), 1);
    assert_eq!(r.counters.deliveries.load(Ordering::Relaxed), 1);
}

/// A VMM captures the device's state with its queues held (a live clone's pause) and reads the
/// TAP's name then: a frame arriving meanwhile must not leave the receive path holding the TAP
/// while it waits for the queue (the lock-order inversion that deadlocked a clone of a Linux
/// guest in the nested harness).
#[test]
fn the_state_is_read_while_the_queues_are_held_and_a_frame_arrives() {
    if !net_or_skip("the_state_is_read_while_the_queues_are_held_and_a_frame_arrives") {
        return;
    }
    let mut r = rig("hold", &[vn::VIRTIO_NET_F_MAC, vn::VIRTIO_NET_F_MRG_RXBUF]);
    let rx = DATA + 0x100000;
    r.post_rx(rx, 2048);
    // The worker handles what activation left pending first.
    std::thread::sleep(Duration::from_millis(300));
    let guards = r.driver.transport.lock_queues();
    // The worker wakes for the frame and runs the receive path, which waits for the queue.
    r.sock.send(&frame(200, 3)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (tx, done) = std::sync::mpsc::channel();
    let handle = r.handle.clone();
    std::thread::spawn(move || {
        let _ = tx.send(handle.state());
    });
    let state = done.recv_timeout(WAIT);
    drop(guards);
    let state = state.expect("the state waited for the receive path: lock-order inversion");
    assert_eq!(state.tap, "t0");
    // Released, the frame is delivered.
    assert_eq!(r.driver.wait_used(0, 1), vec![(0, 212)]);
}

#[test]
fn a_guest_that_never_refills_costs_one_frame_and_the_kernel_drops_the_rest() {
    if !net_or_skip("a_guest_that_never_refills_costs_one_frame_and_the_kernel_drops_the_rest") {
        return;
    }
    let mut r = rig("norefill", &[vn::VIRTIO_NET_F_MRG_RXBUF]);
    for i in 0..3000u32 {
        r.sock.send(&frame(1000, i as u8)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    // The device holds one frame; the TAP's queue in the kernel (bounded) dropped the rest.
    let out = std::process::Command::new("ip")
        .args(["-n", &r.ns.name, "-s", "-j", "link", "show", "t0"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dropped = v[0]["stats64"]["tx"]["dropped"].as_u64().unwrap();
    assert!(dropped > 1000, "kernel dropped {dropped}");
    // Buffers now: the held frame comes first, then those the kernel kept.
    let rx = DATA + 0x100000;
    for i in 0..4u64 {
        r.post_rx(rx + i * 0x1000, 2048);
    }
    let used = r.driver.wait_used(0, 4);
    assert!(used.iter().all(|&(_, len)| len == 1012));
    for i in 0..4u8 {
        let got = r.rx_bytes(rx + u64::from(i) * 0x1000, 1012);
        assert_eq!(&got[12..], &frame(1000, i)[..], "frame {i}");
    }
    assert_eq!(r.dropped(), 0, "the device itself dropped nothing");
}

#[test]
fn bad_transmit_chains_are_dropped_and_returned_and_the_device_goes_on() {
    if !net_or_skip("bad_transmit_chains_are_dropped_and_returned_and_the_device_goes_on") {
        return;
    }
    let mut r = rig("badtx", &[vn::VIRTIO_NET_F_MRG_RXBUF]);
    let d = r.driver.mem.clone();
    d.write_slice(&[0u8; 12], GuestAddress(DATA)).unwrap();
    for chain in [
        vec![(DATA, 12u32, false)],     // header only
        vec![(DATA, 0, false)],         // zero length
        vec![(DATA, 12 + 4000, false)], // over the MTU, no TSO negotiated
        vec![(DATA, 100, true)],        // device-writable
        vec![(1u64 << 40, 100, false)], // outside guest memory
    ] {
        r.driver.add_chain_q(1, &chain);
        assert_eq!(r.driver.kick_and_wait_q(1, 1)[0].1, 0);
    }
    assert_eq!(r.dropped(), 5);
    let f = frame(100, 11);
    r.transmit(DATA + 0x2000, &f);
    assert_eq!(
        r.sock.recv_matching(WAIT, ours).unwrap().as_deref(),
        Some(&f[..])
    );
    assert!(
        r.driver.transport.state().status & 0x40 == 0,
        "no reset needed"
    );
}

#[test]
fn a_tap_moves_between_devices_without_reopening() {
    if !net_or_skip("a_tap_moves_between_devices_without_reopening") {
        return;
    }
    let mut a = rig("move", &[vn::VIRTIO_NET_F_MRG_RXBUF]);
    // A second device on a second TAP of the same namespace.
    a.ns.add_tap("t1", None).unwrap();
    let tap1 = Tap::open("t1").unwrap();
    a.ns.wait_up("t1").unwrap();
    let net_b = Net::new(tap1, "06:00:00:00:00:08".parse().unwrap()).unwrap();
    let hb = net_b.handle();
    let mut b = Driver::new(Box::new(net_b));
    assert_eq!(
        b.init(features(&[vn::VIRTIO_NET_F_MRG_RXBUF]), 2) & 0xf,
        0xf
    );

    let moved = a.handle.take_tap().expect("a has its TAP");
    let fd = moved.as_raw_fd();
    // A transmits into the void now.
    a.transmit(DATA, &frame(80, 1));
    assert_eq!(a.dropped(), 1);
    let old = hb.attach_tap(moved).expect("b had t1");
    assert_eq!(old.name(), "t1");
    assert_eq!(hb.tap_name().as_deref(), Some("t0"));
    hb.set_mac(a.handle.mac());
    assert_eq!(hb.mac(), a.handle.mac());
    // B's frames leave through t0, on the same fd.
    assert_eq!(
        lock(&hb.shared.tap).as_ref().map(AsRawFd::as_raw_fd),
        Some(fd)
    );
    let f = frame(90, 2);
    let mut bytes = vec![0u8; 12];
    bytes.extend(&f);
    b.mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
    b.add_chain_q(1, &[(DATA, bytes.len() as u32, false)]);
    b.kick_and_wait_q(1, 1);
    assert_eq!(
        a.sock.recv_matching(WAIT, ours).unwrap().as_deref(),
        Some(&f[..])
    );
    // And t0's frames reach B.
    b.add_chain_q(0, &[(DATA + 0x100000, 2048, true)]);
    b.wr(0x50, 0);
    let g = frame(200, 3);
    a.sock.send(&g).unwrap();
    assert_eq!(b.wait_used(0, 1), vec![(0, 212)]);
    // The configuration change was signalled.
    assert_ne!(
        b.transport.state().interrupt_status & crate::virtio::INT_CONFIG,
        0
    );
}

#[test]
fn a_frame_longer_than_the_buffers_taken_waits_for_more_and_arrives_whole() {
    let name = "a_frame_longer_than_the_buffers_taken_waits_for_more_and_arrives_whole";
    if !net_or_skip(name) {
        return;
    }
    let mut r = rig("spill", &[vn::VIRTIO_NET_F_MRG_RXBUF]);
    r.ns.ip(&["link", "set", "t0", "mtu", "9000"]).unwrap();
    let rx = DATA + 0x100000;
    r.post_rx(rx, 1024);
    r.post_rx(rx + 0x1000, 1024);
    let big = frame(4000, 12);
    r.sock.send(&big).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        r.driver
            .wait_used_timeout(0, 1, Duration::from_millis(200))
            .is_none(),
        "4012 bytes cannot go into 2048"
    );
    r.post_rx(rx + 0x2000, 1024);
    r.post_rx(rx + 0x3000, 1024);
    let used = r.driver.wait_used(0, 4);
    assert_eq!(
        used,
        vec![(0, 1024), (1, 1024), (2, 1024), (3, 4012 - 3072)]
    );
    let mut back = Vec::new();
    for (i, &(_, len)) in used.iter().enumerate() {
        back.extend(r.rx_bytes(rx + i as u64 * 0x1000, len));
    }
    assert_eq!(u16::from_le_bytes([back[10], back[11]]), 4);
    assert_eq!(&back[12..], &big[..]);
    assert_eq!(r.dropped(), 0);
}

/// `ethtool -k` of `iface` in `ns`: the feature lines, e.g. "tx-checksumming: on".
fn offloads(ns: &NetNs, iface: &str) -> String {
    let out = ns
        .command("ethtool")
        .args(["-k", iface])
        .output()
        .expect("ethtool (scripts/setup.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn negotiated_receive_offloads_are_set_on_the_tap_and_follow_it_to_another_device() {
    let name = "negotiated_receive_offloads_are_set_on_the_tap_and_follow_it_to_another_device";
    if !net_or_skip(name) {
        return;
    }
    let on = |text: &str, feature: &str| text.contains(&format!("{feature}: on"));
    // A driver that takes checksum and TSO offloads: set by the device's worker.
    let r = rig(
        "offload",
        &[
            vn::VIRTIO_NET_F_GUEST_CSUM,
            vn::VIRTIO_NET_F_GUEST_TSO4,
            vn::VIRTIO_NET_F_MRG_RXBUF,
        ],
    );
    let t = std::time::Instant::now();
    while !on(&offloads(&r.ns, "t0"), "tcp-segmentation-offload") {
        assert!(t.elapsed() < WAIT, "{}", offloads(&r.ns, "t0"));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(on(&offloads(&r.ns, "t0"), "tx-checksumming"));
    // Moved to a device whose driver took none: they are cleared.
    r.ns.add_tap("t1", None).unwrap();
    let net_b = Net::new(Tap::open("t1").unwrap(), MacAddr::random_local()).unwrap();
    let hb = net_b.handle();
    let mut b = Driver::new(Box::new(net_b));
    assert_eq!(
        b.init(features(&[vn::VIRTIO_NET_F_MRG_RXBUF]), 2) & 0xf,
        0xf
    );
    hb.attach_tap(r.handle.take_tap().unwrap());
    let t = std::time::Instant::now();
    while on(&offloads(&r.ns, "t0"), "tcp-segmentation-offload") {
        assert!(t.elapsed() < WAIT, "{}", offloads(&r.ns, "t0"));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!on(&offloads(&r.ns, "t0"), "tx-checksumming"));
}
