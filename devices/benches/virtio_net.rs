//! virtio-net frame handling in the device model (simulated queues in test memory, the
//! device's transmit and receive paths on a real TAP) against raw `write`/`read` on the same
//! TAP, in the same run, for 64- and 1500-byte frames. The TAP lives in a private network
//! namespace. Needs root and /dev/net/tun (prints SKIP otherwise). After the criterion groups, an
//! interleaved comparison prints the medians and the device/raw ratio per path and size.
// test code: values are small and fixed
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use devices::virtio::net::queue_io::Negotiated;
use devices::virtio::net::tap::{Tap, VNET_HDR_LEN};
use devices::virtio::net::{Receiver, Transmitter};
use devices::virtio::testing::{DATA, Driver, NetNs, PacketSocket, net_skip_reason, queue};
use devices::virtio::{DeviceCounters, GuestMemory, Interrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Frames per measured batch (the test queue has 16 entries).
const BATCH: usize = 8;
const SIZES: [usize; 2] = [64, 1500];

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0x5a; len];
    // To a MAC nobody has, with an experimental ethertype: the host stack drops it at once.
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x98]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

/// Everything one benchmark run needs: the TAP (shared with the device paths), a packet socket
/// on its host side, and guest memory with queues.
struct Rig {
    tap: Mutex<Option<Tap>>,
    sock: PacketSocket,
    driver: Driver,
    counters: DeviceCounters,
    interrupt: Interrupt,
}

impl Rig {
    fn tap(&self) -> std::sync::MutexGuard<'_, Option<Tap>> {
        self.tap.lock().unwrap()
    }

    fn mem(&self) -> &GuestMemory {
        &self.driver.mem
    }

    /// Publishes BATCH transmit chains of `len`-byte frames (with header) on a fresh queue.
    fn tx_queue(&mut self, len: usize) -> Queue {
        let mut b = vec![0u8; VNET_HDR_LEN];
        b.extend(frame(len));
        self.driver.mem.write_slice(&b, GuestAddress(DATA)).unwrap();
        for _ in 0..BATCH {
            self.driver.add_chain(&[(DATA, b.len() as u32, false)]);
        }
        resumed_queue(&self.driver)
    }

    /// Publishes BATCH receive chains of 2 KiB on a fresh queue.
    fn rx_queue(&mut self) -> Queue {
        for k in 0..BATCH as u64 {
            self.driver
                .add_chain(&[(DATA + 0x10000 + k * 0x1000, 2048, true)]);
        }
        resumed_queue(&self.driver)
    }

    /// Sends BATCH frames into the TAP from its host side.
    fn inject(&self, len: usize) {
        let f = frame(len);
        for _ in 0..BATCH {
            self.sock.send(&f).unwrap();
        }
    }
}

/// A queue at the driver's rings, positioned where the driver's last batch starts.
fn resumed_queue(d: &Driver) -> Queue {
    let mut q = queue();
    let avail: u16 = d
        .mem
        .read_obj(GuestAddress(devices::virtio::testing::AVAIL + 2))
        .unwrap();
    let start = avail.wrapping_sub(BATCH as u16);
    q.set_next_avail(start);
    q.set_next_used(start);
    q
}

fn rig(ns: &NetNs) -> Rig {
    ns.add_tap("bench0", None).unwrap();
    let tap = Tap::open("bench0").unwrap();
    ns.wait_up("bench0").unwrap();
    let sock = PacketSocket::bind("bench0").unwrap();
    // Any device will do for the driver: only its memory and ring helpers are used.
    let dummy = devices::virtio::blk::Block::new(
        devices::virtio::testing::RamDisk::new(4096, false),
        "bench",
    );
    Rig {
        tap: Mutex::new(Some(tap)),
        sock,
        driver: Driver::new(Box::new(dummy)),
        counters: DeviceCounters::default(),
        interrupt: Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
    }
}

/// One batch through the device's transmit path; returns its time.
fn device_tx(r: &mut Rig, tx: &mut Transmitter, len: usize) -> Duration {
    let mut q = r.tx_queue(len);
    let t = Instant::now();
    tx.run(&mut q, r.mem(), &r.tap, &r.counters, &r.interrupt)
        .unwrap();
    t.elapsed()
}

/// One batch of raw TAP writes of the same frames.
fn raw_tx(r: &Rig, len: usize) -> Duration {
    let mut b = vec![0u8; VNET_HDR_LEN];
    b.extend(frame(len));
    let tap = r.tap();
    let tap = tap.as_ref().unwrap();
    let t = Instant::now();
    for _ in 0..BATCH {
        tap.write_frame(&b).unwrap();
    }
    t.elapsed()
}

/// One batch through the device's receive path (frames already queued on the TAP).
fn device_rx(r: &mut Rig, rx: &mut Receiver, len: usize) -> Duration {
    let q = Mutex::new(r.rx_queue());
    r.inject(len);
    let t = Instant::now();
    rx.run(&q, r.mem(), &r.tap, true, &r.counters, &r.interrupt)
        .unwrap();
    let d = t.elapsed();
    assert!(!rx.is_waiting());
    d
}

/// One batch of raw TAP reads, until the TAP is empty (as any non-blocking reader, and the
/// device, find out).
fn raw_rx(r: &Rig, len: usize) -> Duration {
    r.inject(len);
    let mut buf = vec![0u8; 65_600];
    let tap = r.tap();
    let tap = tap.as_ref().unwrap();
    let t = Instant::now();
    let mut n = 0;
    while tap.read_frame(&mut buf).is_ok() {
        n += 1;
    }
    let d = t.elapsed();
    assert_eq!(n, BATCH);
    d
}

fn bench(c: &mut Criterion) {
    if let Some(why) = net_skip_reason() {
        println!("SKIP: virtio_net benchmarks: {why}");
        return;
    }
    let ns = NetNs::new("bench").unwrap();
    let _in_ns = ns.enter().unwrap();
    let mut r = rig(&ns);
    let mut tx = Transmitter::new(Negotiated::default());
    let mut rx = Receiver::new();
    let mut g = c.benchmark_group("virtio_net");
    for len in SIZES {
        g.throughput(Throughput::Elements(BATCH as u64));
        g.bench_with_input(BenchmarkId::new("raw_tap_write", len), &len, |b, &len| {
            b.iter_custom(|n| (0..n).map(|_| raw_tx(&r, len)).sum());
        });
        g.bench_with_input(BenchmarkId::new("device_tx", len), &len, |b, &len| {
            b.iter_custom(|n| (0..n).map(|_| device_tx(&mut r, &mut tx, len)).sum());
        });
        g.bench_with_input(BenchmarkId::new("raw_tap_read", len), &len, |b, &len| {
            b.iter_custom(|n| (0..n).map(|_| raw_rx(&r, len)).sum());
        });
        g.bench_with_input(BenchmarkId::new("device_rx", len), &len, |b, &len| {
            b.iter_custom(|n| (0..n).map(|_| device_rx(&mut r, &mut rx, len)).sum());
        });
    }
    g.finish();

    // Interleaved medians: the ratio of raw time to device time (1.0 = as fast as raw).
    const ROUNDS: usize = 2000;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!("virtio_net: medians of {ROUNDS} interleaved batches of {BATCH} frames");
    for len in SIZES {
        let (mut dt, mut rt, mut dr, mut rr) = (vec![], vec![], vec![], vec![]);
        for _ in 0..ROUNDS {
            dt.push(device_tx(&mut r, &mut tx, len));
            rt.push(raw_tx(&r, len));
            rr.push(raw_rx(&r, len));
            dr.push(device_rx(&mut r, &mut rx, len));
        }
        let (dt, rt, dr, rr) = (median(dt), median(rt), median(dr), median(rr));
        let pps = |d: Duration| BATCH as f64 / d.as_secs_f64();
        let mbs = |d: Duration| (BATCH * len) as f64 / d.as_secs_f64() / 1e6;
        println!(
            "  {len:>4} B TX: device {:>9.0} pkt/s {:>7.1} MB/s, raw {:>9.0} pkt/s: ratio {:.2}",
            pps(dt),
            mbs(dt),
            pps(rt),
            rt.as_secs_f64() / dt.as_secs_f64()
        );
        println!(
            "  {len:>4} B RX: device {:>9.0} pkt/s {:>7.1} MB/s, raw {:>9.0} pkt/s: ratio {:.2}",
            pps(dr),
            mbs(dr),
            pps(rr),
            rr.as_secs_f64() / dr.as_secs_f64()
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
