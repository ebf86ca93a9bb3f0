//! Test helpers: a minimal virtio driver that lays out a split queue in test memory and talks to
//! a transport through its registers, as a guest driver would.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use block::{BlockError, Disk};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::mmio::MmioTransport;
use super::{GuestMemory, Interrupt, VirtioDevice};

/// Descriptor flag: the chain continues.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;

pub const MEM_SIZE: usize = 32 << 20;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
pub const DATA: u64 = 0x10000;
pub const QSIZE: u16 = 16;

pub fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A ready queue 0 at the driver's ring addresses, for calling a device's queue processing
/// directly (without a transport or worker thread).
pub fn queue() -> virtio_queue::Queue {
    use virtio_queue::QueueT;
    let mut q = virtio_queue::Queue::new(QSIZE).expect("QSIZE is a valid queue size");
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    q
}

/// A test driver: plays the guest side of one transport, with up to three queues.
#[derive(Debug)]
pub struct Driver {
    pub mem: GuestMemory,
    pub transport: MmioTransport,
    /// Per queue: next free descriptor slot.
    next_desc: [u16; 3],
    /// Per queue: next available ring index.
    avail_idx: [u16; 3],
    /// Per queue: next used ring index to read.
    used_seen: [u16; 3],
}

impl Driver {
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = memory();
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let transport = MmioTransport::new(device, mem.clone(), irq).unwrap();
        Self {
            mem,
            transport,
            next_desc: [0; 3],
            avail_idx: [0; 3],
            used_seen: [0; 3],
        }
    }

    pub fn rd(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn wr(&mut self, off: u64, v: u32) {
        self.transport.write(off, &v.to_le_bytes());
    }

    /// Runs the virtio 1.x initialisation of section 3.1.1, accepting `features`,
    /// with every queue of the device at DESC/AVAIL/USED + queue * 0x100 offsets... (one queue per
    /// 0x4000 bytes); returns the final status.
    pub fn init(&mut self, features: u64, queues: u32) -> u32 {
        self.wr(0x70, 0);
        self.wr(0x70, 1);
        self.wr(0x70, 1 | 2);
        self.wr(0x24, 0);
        self.wr(0x20, features as u32);
        self.wr(0x24, 1);
        self.wr(0x20, (features >> 32) as u32);
        self.wr(0x70, 1 | 2 | 8);
        if self.rd(0x70) & 8 == 0 {
            return self.rd(0x70);
        }
        for q in 0..queues {
            let base = u64::from(q) * 0x4000;
            self.wr(0x30, q);
            assert!(self.rd(0x34) >= u32::from(QSIZE));
            self.wr(0x38, u32::from(QSIZE));
            self.set_addr(0x80, DESC + base);
            self.set_addr(0x90, AVAIL + base);
            self.set_addr(0xa0, USED + base);
            self.wr(0x44, 1);
        }
        self.wr(0x70, 1 | 2 | 8 | 4);
        self.rd(0x70)
    }

    pub fn set_addr(&mut self, reg: u64, addr: u64) {
        self.wr(reg, addr as u32);
        self.wr(reg + 4, (addr >> 32) as u32);
    }

    /// Writes a raw descriptor at slot `i` of queue 0.
    pub fn put_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.put_desc_q(0, i, addr, len, flags, next);
    }

    fn put_desc_q(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(qbase(q) + DESC + u64::from(i) * 16);
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, at).unwrap();
    }

    /// Adds a chain of (addr, len, writable) buffers to queue 0; returns the head index.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        self.add_chain_q(0, bufs)
    }

    /// Adds a chain of (addr, len, writable) buffers to queue `q` and makes it available.
    pub fn add_chain_q(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc[q];
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % QSIZE;
            let last = k + 1 == bufs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.put_desc_q(q, i, addr, len, flags, (i + 1) % QSIZE);
        }
        self.next_desc[q] = (head + bufs.len() as u16) % QSIZE;
        self.publish_q(q, head);
        head
    }

    /// Puts `head` in queue 0's available ring and bumps its index.
    pub fn publish(&mut self, head: u16) {
        self.publish_q(0, head);
    }

    fn publish_q(&mut self, q: usize, head: u16) {
        let avail = qbase(q) + AVAIL;
        let slot = GuestAddress(avail + 4 + u64::from(self.avail_idx[q] % QSIZE) * 2);
        self.mem.write_obj(head.to_le(), slot).unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q].to_le(), GuestAddress(avail + 2))
            .unwrap();
    }

    /// Notifies queue 0 and waits for `n` more used buffers.
    pub fn kick_and_wait(&mut self, n: u16) -> Vec<(u32, u32)> {
        self.kick_and_wait_q(0, n)
    }

    /// Notifies queue `q` and waits (bounded) for the device to use `n` more buffers;
    /// returns their (id, len) pairs.
    pub fn kick_and_wait_q(&mut self, q: usize, n: u16) -> Vec<(u32, u32)> {
        self.wr(0x50, q as u32);
        self.wait_used(q, n)
    }

    /// Waits (bounded) for `n` more used buffers on queue `q` without notifying.
    pub fn wait_used(&mut self, q: usize, n: u16) -> Vec<(u32, u32)> {
        let used = qbase(q) + USED;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let used_idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            if used_idx.wrapping_sub(self.used_seen[q]) >= n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "device did not complete requests"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut out = Vec::new();
        for _ in 0..n {
            let at = used + 4 + u64::from(self.used_seen[q] % QSIZE) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }
}

/// Offset of queue `q`'s rings from the queue-0 addresses.
pub fn qbase(q: usize) -> u64 {
    q as u64 * 0x4000
}

/// A RAM disk implementing [`block::Disk`], for device tests and benches.
#[derive(Debug)]
pub struct RamDisk {
    /// Contents.
    pub data: Mutex<Vec<u8>>,
    /// Number of flushes.
    pub flushes: Mutex<usize>,
    /// Refuse writes.
    pub read_only: bool,
    /// Changes in order: ('w' write | 'z' zeroes | 'd' discard, offset, len).
    pub log: Mutex<Vec<(char, u64, u64)>>,
}

impl RamDisk {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: usize, read_only: bool) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![0; size]),
            flushes: Mutex::new(0),
            read_only,
            log: Mutex::new(Vec::new()),
        })
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, BlockError> {
        let size = self.data.lock().unwrap().len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(BlockError::OutOfRange { offset, len, size }),
        }
    }
}

impl Disk for RamDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let r = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), BlockError> {
        let r = self.range(offset, data.len() as u64)?;
        self.data.lock().unwrap()[r].copy_from_slice(data);
        self.log
            .lock()
            .unwrap()
            .push(('w', offset, data.len() as u64));
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let r = self.range(offset, len)?;
        self.data.lock().unwrap()[r].fill(0);
        self.log.lock().unwrap().push(('z', offset, len));
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let r = self.range(offset, len)?;
        self.data.lock().unwrap()[r].fill(0);
        self.log.lock().unwrap().push(('d', offset, len));
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
}
