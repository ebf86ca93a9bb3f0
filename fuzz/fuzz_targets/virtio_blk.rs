//! The virtio-blk request path as a guest drives it: a descriptor table, an available ring and
//! request bytes, all from the input, processed by `blk::process_queue` against a RAM disk.
#![no_main]

use std::sync::{Arc, OnceLock};

use devices::virtio::testing::{self, AVAIL, DATA, DESC, QSIZE, RamDisk, USED};
use devices::virtio::{GuestMemory, blk};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

/// Bytes of the data area the input fills (and each run clears).
const DATA_LEN: usize = 0x20000;

fn mem() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(testing::memory)
}

fn disks() -> &'static [Arc<RamDisk>; 2] {
    static DISKS: OnceLock<[Arc<RamDisk>; 2]> = OnceLock::new();
    DISKS.get_or_init(|| [RamDisk::new(1 << 20, false), RamDisk::new(1 << 20, true)])
}

fuzz_target!(|data: &[u8]| {
    let mem = mem();
    // Fresh rings and data area.
    mem.write_slice(
        &vec![0u8; (USED - DESC) as usize + 0x1000],
        GuestAddress(DESC),
    )
    .unwrap();
    mem.write_slice(&vec![0u8; DATA_LEN], GuestAddress(DATA))
        .unwrap();
    let (table, rest) = data.split_at(data.len().min(usize::from(QSIZE) * 16));
    for (i, d) in table.chunks(16).enumerate() {
        let mut b = [0u8; 16];
        b[..d.len()].copy_from_slice(d);
        let mut addr = u64::from_le_bytes(b[0..8].try_into().unwrap());
        let mut len = u32::from_le_bytes(b[8..12].try_into().unwrap());
        let mut flags = u16::from_le_bytes([b[12], b[13]]);
        // Bit 15 (no virtio meaning) asks for the raw address and length; without it they
        // are folded into the data area, where the request bytes are.
        if flags & 0x8000 == 0 {
            addr = DATA + addr % DATA_LEN as u64;
            len %= 0x4000;
        }
        flags &= 0x7fff;
        let mut e = [0u8; 16];
        e[0..8].copy_from_slice(&addr.to_le_bytes());
        e[8..12].copy_from_slice(&len.to_le_bytes());
        e[12..14].copy_from_slice(&flags.to_le_bytes());
        e[14..16].copy_from_slice(&b[14..16]);
        mem.write_slice(&e, GuestAddress(DESC + 16 * i as u64))
            .unwrap();
    }
    let (ctl, rest) = rest.split_first().map_or((0, &[][..]), |(c, r)| (*c, r));
    let n = usize::from(ctl & 0x1f).min(usize::from(QSIZE));
    let (ring, payload) = rest.split_at(rest.len().min(n * 2));
    for (i, e) in ring.chunks(2).enumerate() {
        let head = u16::from_le_bytes([e[0], *e.get(1).unwrap_or(&0)]);
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * i as u64))
            .unwrap();
    }
    mem.write_obj((ring.len() / 2) as u16, GuestAddress(AVAIL + 2))
        .unwrap();
    let payload = &payload[..payload.len().min(DATA_LEN)];
    mem.write_slice(payload, GuestAddress(DATA)).unwrap();
    let disk = &disks()[usize::from(ctl >> 7)];
    let mut q = testing::queue();
    let mut buf = Vec::new();
    let _ = blk::process_queue(
        &mut q,
        mem,
        &**disk,
        b"fuzz-disk-id\0\0\0\0\0\0\0\0",
        &mut buf,
    );
});
