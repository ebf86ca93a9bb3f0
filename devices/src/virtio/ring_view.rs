//! The driver's available chains of a split virtqueue, read through host mappings of the
//! descriptor table and the available ring taken once per pass. virtio-queue's `AvailIter` and
//! `DescriptorChain` look every ring entry's and descriptor's guest address up again (a region
//! search and a bounds walk each time), which showed in profiles of the receive path. The rules
//! for chains are virtio-queue's, and a property test holds the two to the same answers: a
//! chain ends at a descriptor without NEXT, after as many descriptors as its table has, at an
//! index outside the table, at a descriptor that cannot be read, or when its lengths would pass
//! 4 GiB; an INDIRECT descriptor switches to its table once (not from inside one).

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::{AtomicBitmap, BS};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend as _, VolatileSlice};

use super::GuestMemory;

/// Size of one descriptor in a table.
const DESC_SIZE: usize = 16;
/// Flags and index before the available ring's entries.
const AVAIL_HEADER: usize = 4;

/// Guest memory read through one host mapping (the common case), or address by address (an
/// area that spans two memory regions or lies partly outside memory).
#[derive(Clone, Copy, Debug)]
enum Area<'m> {
    Mapped(VolatileSlice<'m, BS<'m, AtomicBitmap>>),
    Guest(GuestAddress),
}

impl<'m> Area<'m> {
    fn new(mem: &'m GuestMemory, addr: GuestAddress, len: usize) -> Self {
        match mem.get_slice(addr, len) {
            Ok(s) => Area::Mapped(s),
            Err(_) => Area::Guest(addr),
        }
    }

    fn read<T: ByteValued>(&self, mem: &GuestMemory, off: usize) -> Option<T> {
        match self {
            Area::Mapped(s) => s.read_obj(off).ok(),
            Area::Guest(a) => mem.read_obj(a.checked_add(off as u64)?).ok(),
        }
    }

    fn load_u16(&self, mem: &GuestMemory, off: usize) -> Option<u16> {
        match self {
            Area::Mapped(s) => s.load::<u16>(off, Ordering::Acquire).ok(),
            Area::Guest(a) => mem
                .load::<u16>(a.checked_add(off as u64)?, Ordering::Acquire)
                .ok(),
        }
        .map(u16::from_le)
    }
}

/// The chains the driver made available, from the queue's next available index up to the
/// index read when the view was made. The queue itself is not touched: give the position back
/// with `queue.set_next_avail(view.next_avail())` when done.
#[derive(Debug)]
pub struct AvailView<'m> {
    mem: &'m GuestMemory,
    table: Area<'m>,
    ring: Area<'m>,
    size: u16,
    next: Wrapping<u16>,
    last: Wrapping<u16>,
}

impl<'m> AvailView<'m> {
    /// Reads the driver's available index (acquire) and maps the rings. Like virtio-queue's
    /// `Queue::iter`, a queue not ready (or reset without being set up again) and an index more
    /// than a ring ahead of the device's are errors.
    pub fn new(q: &Queue, mem: &'m GuestMemory) -> Result<Self, virtio_queue::Error> {
        if !q.ready() || q.avail_ring() == 0 {
            return Err(virtio_queue::Error::QueueNotReady);
        }
        let last = q.avail_idx(mem, Ordering::Acquire)?;
        let next = Wrapping(q.next_avail());
        let size = q.size();
        if (last - next).0 > size {
            return Err(virtio_queue::Error::InvalidAvailRingIndex);
        }
        let n = usize::from(size);
        Ok(Self {
            mem,
            table: Area::new(mem, GuestAddress(q.desc_table()), n * DESC_SIZE),
            ring: Area::new(mem, GuestAddress(q.avail_ring()), AVAIL_HEADER + 2 * n),
            size,
            next,
            last,
        })
    }

    /// The driver's available index as read by [`AvailView::new`].
    pub fn avail_idx(&self) -> u16 {
        self.last.0
    }

    /// The next available index the device will take (to store back into the queue).
    pub fn next_avail(&self) -> u16 {
        self.next.0
    }

    /// Puts the last chain taken back (it will be taken again).
    pub fn go_back(&mut self) {
        self.next -= Wrapping(1);
    }

    /// The next available chain, or `None` when the driver has made no more available (or its
    /// ring entry cannot be read).
    pub fn next_chain(&mut self) -> Option<Chain<'m>> {
        if self.next == self.last || self.size == 0 {
            return None;
        }
        let slot = usize::from(self.next.0 % self.size);
        let head = self.ring.load_u16(self.mem, AVAIL_HEADER + 2 * slot)?;
        self.next += Wrapping(1);
        Some(Chain {
            mem: self.mem,
            table: self.table,
            entries: self.size,
            head,
            next: head,
            ttl: self.size,
            indirect: false,
            yielded: 0,
        })
    }
}

/// One available chain: its descriptors in order.
#[derive(Debug)]
pub struct Chain<'m> {
    mem: &'m GuestMemory,
    table: Area<'m>,
    entries: u16,
    head: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    yielded: u32,
}

impl Chain<'_> {
    /// The chain's head index (what the used ring names).
    pub fn head_index(&self) -> u16 {
        self.head
    }

    /// Switches to the indirect table `d` points at; `None` if that is not allowed.
    fn enter_indirect(&mut self, d: &Descriptor) -> Option<()> {
        if self.indirect || !(d.len() as usize).is_multiple_of(DESC_SIZE) {
            return None;
        }
        let entries = u16::try_from(d.len() as usize / DESC_SIZE).ok()?;
        self.table = Area::new(self.mem, d.addr(), usize::from(entries) * DESC_SIZE);
        self.entries = entries;
        self.next = 0;
        self.ttl = entries;
        self.indirect = true;
        Some(())
    }
}

impl Iterator for Chain<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.entries {
                return None;
            }
            let d: Descriptor = self
                .table
                .read(self.mem, usize::from(self.next) * DESC_SIZE)?;
            if d.refers_to_indirect_table() {
                self.enter_indirect(&d)?;
                continue;
            }
            self.yielded = self.yielded.checked_add(d.len())?;
            if d.has_next() {
                self.next = d.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use virtio_queue::QueueOwnedT;

    use super::*;
    use crate::virtio::testing::{DESC, MEM_SIZE, memory, publish, queue, write_desc};

    /// (head, descriptors as (addr, len, flags, next)) of every chain, in order.
    type Chains = Vec<(u16, Vec<(u64, u32, u16, u16)>)>;

    /// The chains an [`AvailView`] yields.
    fn ours(q: &Queue, mem: &GuestMemory) -> Result<Chains, ()> {
        let mut v = AvailView::new(q, mem).map_err(|_| ())?;
        let mut out = vec![];
        while let Some(c) = v.next_chain() {
            let head = c.head_index();
            out.push((
                head,
                c.map(|d| (d.addr().0, d.len(), d.flags(), d.next()))
                    .collect(),
            ));
        }
        Ok(out)
    }

    /// The same from virtio-queue's iterators.
    fn theirs(q: &mut Queue, mem: &GuestMemory) -> Result<Chains, ()> {
        let it = q.iter(mem).map_err(|_| ())?;
        Ok(it
            .map(|c| {
                let head = c.head_index();
                (
                    head,
                    c.map(|d| (d.addr().0, d.len(), d.flags(), d.next()))
                        .collect(),
                )
            })
            .collect())
    }

    #[test]
    fn a_queue_that_is_not_ready_is_refused_as_virtio_queue_does() {
        let mem = memory();
        publish(&mem, &[0]);
        let mut q = queue();
        q.set_ready(false);
        assert!(matches!(
            AvailView::new(&q, &mem),
            Err(virtio_queue::Error::QueueNotReady)
        ));
        assert!(theirs(&mut q, &mem).is_err());
    }

    #[test]
    fn an_indirect_table_is_followed_once_and_the_position_goes_back() {
        let mem = memory();
        // Chain 0: descriptor 0 -> 1; chain 1: descriptor 2, indirect, a table of two at 0x8000
        // whose second entry is itself INDIRECT (not allowed inside a table: the chain ends).
        write_desc(&mem, DESC, 0, 0x10000, 100, 1 | 2, 1);
        write_desc(&mem, DESC, 1, 0x20000, 200, 2, 0);
        write_desc(&mem, DESC, 2, 0x8000, 32, 4, 0);
        write_desc(&mem, 0x8000, 0, 0x30000, 300, 1 | 2, 1);
        write_desc(&mem, 0x8000, 1, 0x9000, 16, 4, 0);
        publish(&mem, &[0, 2]);
        let mut q = queue();
        let got = ours(&q, &mem).unwrap();
        assert_eq!(
            got,
            vec![
                (0, vec![(0x10000, 100, 3, 1), (0x20000, 200, 2, 0)]),
                (2, vec![(0x30000, 300, 3, 1)]),
            ]
        );
        assert_eq!(got, theirs(&mut q, &mem).unwrap());
        let mut q = queue();
        let mut v = AvailView::new(&q, &mem).unwrap();
        assert_eq!(v.next_chain().unwrap().head_index(), 0);
        assert_eq!(v.next_chain().unwrap().head_index(), 2);
        assert!(v.next_chain().is_none());
        v.go_back();
        assert_eq!(v.next_avail(), 1);
        q.set_next_avail(v.next_avail());
        assert_eq!(q.pop_descriptor_chain(&mem).unwrap().head_index(), 2);
    }

    /// The end of test memory.
    const END: u64 = MEM_SIZE as u64;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]
        /// Random tables (some descriptors INDIRECT, some chains looping, heads past the ring,
        /// tables partly outside memory) and available indexes give the same chains as
        /// virtio-queue's iterators, or an error from both.
        #[test]
        fn the_same_chains_as_virtio_queue(
            descs in proptest::collection::vec(
                (prop_oneof![0u64..END, (END - 64)..(END + 64), Just(0x8000u64)],
                 prop_oneof![0u32..64, 0u32..(1 << 20), Just(u32::MAX)], 0u16..8, 0u16..24),
                16),
            indirect in proptest::collection::vec((0u64..16, 0u32..4, 0u16..8, 0u16..24), 8),
            heads in proptest::collection::vec(0u16..24, 0..16),
            start in 0u16..40,
            extra in 0u16..20,
        ) {
            let mem = memory();
            for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
                let i = u16::try_from(i).unwrap();
                write_desc(&mem, DESC, i, *addr, *len, *flags, *next);
            }
            // An indirect table at 0x8000 that descriptors may point at.
            for (i, (addr, len, flags, next)) in indirect.iter().enumerate() {
                let i = u16::try_from(i).unwrap();
                let at = 0x10000 + addr * 0x1000;
                write_desc(&mem, 0x8000, i, at, *len * 1000, *flags, *next);
            }
            publish(&mem, &heads);
            // The device's position anywhere, and a driver index up to a ring and more ahead.
            let mut q = queue();
            q.set_next_avail(start);
            let idx = start.wrapping_add(extra);
            mem.write_obj(idx, GuestAddress(crate::virtio::testing::AVAIL + 2)).unwrap();
            let a = ours(&q, &mem);
            let b = theirs(&mut q, &mem);
            prop_assert_eq!(a, b);
        }
    }
}
