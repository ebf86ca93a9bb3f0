//! The in-memory extent index of a delta: which byte ranges it holds, as data or as zeros,
//! and the sequence number of the record that last changed each range.

use std::collections::BTreeMap;

/// Tracking granularity: 4 KiB.
pub const BLOCK_SIZE: u64 = 4096;

/// What a delta holds for a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentKind {
    /// Bytes stored in the delta's data file at the same offsets.
    Data,
    /// Reads as zeros (write-zeroes or discard); nothing stored.
    Zero,
}

/// A block-aligned byte range held by a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Extent {
    /// Start, in bytes (a multiple of [`BLOCK_SIZE`]).
    pub offset: u64,
    /// Length in bytes (a multiple of [`BLOCK_SIZE`]).
    pub len: u64,
    /// Data or zeros.
    pub kind: ExtentKind,
    /// Sequence number of the record that last changed the range.
    pub seq: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Non-overlapping extents keyed by start offset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentMap {
    map: BTreeMap<u64, (u64, ExtentKind, u64)>,
}

impl ExtentMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `[offset, offset + len)` as `kind`, changed at `seq`, replacing what overlaps.
    /// `offset` and `len` must be block-aligned (callers check).
    pub fn insert(&mut self, offset: u64, len: u64, kind: ExtentKind, seq: u64) {
        if len == 0 {
            return;
        }
        let end = offset + len;
        let mut add = Vec::new();
        if let Some((&s, &(e, k, q))) = self.map.range(..offset).next_back()
            && e > offset
        {
            self.map.insert(s, (offset, k, q));
            if e > end {
                add.push((end, (e, k, q)));
            }
        }
        let inside: Vec<u64> = self.map.range(offset..end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some((e, k, q)) = self.map.remove(&s)
                && e > end
            {
                add.push((end, (e, k, q)));
            }
        }
        for (s, v) in add {
            self.map.insert(s, v);
        }
        let mut start = offset;
        let mut stop = end;
        // Coalesce with neighbours changed by the same record.
        if let Some((&s, &(e, k, q))) = self.map.range(..offset).next_back()
            && e == offset
            && k == kind
            && q == seq
        {
            self.map.remove(&s);
            start = s;
        }
        if let Some(&(e, k, q)) = self.map.get(&end)
            && k == kind
            && q == seq
        {
            self.map.remove(&end);
            stop = e;
        }
        self.map.insert(start, (stop, kind, seq));
    }

    /// Forgets `[offset, offset + len)` (the range falls through to the parent again).
    pub fn remove(&mut self, offset: u64, len: u64) {
        // Insert a marker then drop it: reuses the splitting logic.
        self.insert(offset, len, ExtentKind::Zero, u64::MAX);
        self.map.remove(&offset);
    }

    /// Extents overlapping `[offset, offset + len)`, clipped to it, in order.
    pub fn range(&self, offset: u64, len: u64) -> Vec<Extent> {
        let end = offset + len;
        let mut out = Vec::new();
        if let Some((_, &(e, k, q))) = self.map.range(..offset).next_back()
            && e > offset
        {
            out.push(Extent {
                offset,
                len: e.min(end) - offset,
                kind: k,
                seq: q,
            });
        }
        for (&s, &(e, k, q)) in self.map.range(offset..end) {
            out.push(Extent {
                offset: s,
                len: e.min(end) - s,
                kind: k,
                seq: q,
            });
        }
        out
    }

    /// All extents in order.
    pub fn iter(&self) -> impl Iterator<Item = Extent> + '_ {
        self.map.iter().map(|(&s, &(e, k, q))| Extent {
            offset: s,
            len: e - s,
            kind: k,
            seq: q,
        })
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if the map holds nothing.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Total bytes covered.
    pub fn bytes(&self) -> u64 {
        self.map.iter().map(|(&s, &(e, _, _))| e - s).sum()
    }

    /// Extents changed after `seq`, adjacent ones of the same kind coalesced (their `seq` is
    /// the highest of the run).
    pub fn changed_since(&self, seq: u64) -> Vec<Extent> {
        coalesce(self.iter().filter(|e| e.seq > seq))
    }
}

/// Joins adjacent extents of the same kind (keeping the highest seq).
pub fn coalesce(extents: impl IntoIterator<Item = Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for x in extents {
        if let Some(last) = out.last_mut()
            && last.end() == x.offset
            && last.kind == x.kind
        {
            last.len += x.len;
            last.seq = last.seq.max(x.seq);
            continue;
        }
        out.push(x);
    }
    out
}

#[cfg(test)]
mod tests {
    // test code: values are small and fixed
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

    use super::*;

    const B: u64 = BLOCK_SIZE;

    fn blocks(m: &ExtentMap) -> Vec<Option<(ExtentKind, u64)>> {
        let mut v = vec![None; 16];
        for e in m.iter() {
            for b in e.offset / B..e.end() / B {
                v[b as usize] = Some((e.kind, e.seq));
            }
        }
        v
    }

    #[test]
    fn insert_splits_and_coalesces() {
        let mut m = ExtentMap::new();
        m.insert(0, 8 * B, ExtentKind::Data, 1);
        m.insert(2 * B, 2 * B, ExtentKind::Zero, 2);
        assert_eq!(m.len(), 3);
        let v = blocks(&m);
        assert_eq!(v[1], Some((ExtentKind::Data, 1)));
        assert_eq!(v[2], Some((ExtentKind::Zero, 2)));
        assert_eq!(v[4], Some((ExtentKind::Data, 1)));
        m.insert(4 * B, 2 * B, ExtentKind::Zero, 2);
        assert_eq!(
            m.len(),
            3,
            "same record coalesces: {:?}",
            m.iter().collect::<Vec<_>>()
        );
        m.remove(B, 6 * B);
        assert_eq!(m.bytes(), 2 * B);
        assert_eq!(m.changed_since(0).len(), 2);
        assert_eq!(m.range(0, 16 * B).len(), 2);
        assert_eq!(m.range(B, B).len(), 0);
    }

    #[test]
    fn changed_since_filters_by_seq() {
        let mut m = ExtentMap::new();
        m.insert(0, B, ExtentKind::Data, 1);
        m.insert(B, B, ExtentKind::Data, 2);
        m.insert(2 * B, B, ExtentKind::Data, 3);
        let c = m.changed_since(1);
        assert_eq!(
            c,
            vec![Extent {
                offset: B,
                len: 2 * B,
                kind: ExtentKind::Data,
                seq: 3
            }]
        );
        assert!(m.changed_since(3).is_empty());
    }
}
