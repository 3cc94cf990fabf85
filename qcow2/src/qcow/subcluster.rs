//! Extended L2 entries (qcow2.rst, "Extended L2 Entries"): each L2 entry
//! is followed by a 64-bit subcluster bitmap, and a standard cluster is
//! split into 32 subclusters. Bits 0-31 say which subclusters are
//! allocated (read from the host cluster), bits 32-63 which read as zeros;
//! a subcluster with neither bit reads from the backing file. Compressed
//! clusters have no subclusters (their bitmap must be 0).
//!
//! A child module of `qcow`, so that it works on the metadata directly.
//! Allocations stay per guest cluster (the in-flight set tracks clusters),
//! but copy-on-write fills only the subclusters a write touches in part,
//! and a write into a cluster we own allocates its subclusters in place.

use super::*;

pub const SUBCLUSTERS: u32 = 32;
pub const ALL_ALLOC: u64 = 0xffff_ffff;
pub const ALL_ZERO: u64 = ALL_ALLOC << 32;

/// Allocation bits of subclusters [a, b).
pub fn alloc_range(a: u32, b: u32) -> u64 {
    if b >= 32 {
        ALL_ALLOC & !((1u64 << a) - 1)
    } else {
        (1u64 << b) - (1u64 << a)
    }
}

/// Zero bits of subclusters [a, b).
pub fn zero_range(a: u32, b: u32) -> u64 {
    alloc_range(a, b) << 32
}

/// What one subcluster is (QEMU's QCow2SubclusterType).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScKind {
    /// Data in the host cluster.
    Data,
    /// Reads as zeros; the cluster has a host offset.
    ZeroAlloc,
    /// Reads as zeros, no host cluster.
    Zero,
    /// Reads from the backing file; the cluster has a host offset.
    UnallocAlloc,
    /// Reads from the backing file, no host cluster.
    Unalloc,
    Compressed,
    /// The bitmap contradicts itself or the entry.
    Invalid,
}

/// Classifies subcluster `i` of a decoded entry with its bitmap.
pub fn kind(e: L2Entry, bitmap: u64, i: u32) -> ScKind {
    match e {
        L2Entry::Compressed { .. } if bitmap != 0 => ScKind::Invalid,
        L2Entry::Compressed { .. } => ScKind::Compressed,
        L2Entry::Normal { .. } if (bitmap >> 32) & bitmap != 0 => ScKind::Invalid,
        L2Entry::Normal { .. } if bitmap & (1 << (32 + i)) != 0 => ScKind::ZeroAlloc,
        L2Entry::Normal { .. } if bitmap & (1 << i) != 0 => ScKind::Data,
        L2Entry::Normal { .. } => ScKind::UnallocAlloc,
        // Decoding masks the zero flag off, so only offset 0 is left.
        L2Entry::Unallocated | L2Entry::Zero { .. } if bitmap & ALL_ALLOC != 0 => ScKind::Invalid,
        L2Entry::Unallocated | L2Entry::Zero { .. } if bitmap & (1 << (32 + i)) != 0 => {
            ScKind::Zero
        }
        L2Entry::Unallocated | L2Entry::Zero { .. } => ScKind::Unalloc,
    }
}

impl Qcow2 {
    fn sc_size(&self) -> u64 {
        self.cluster_size() / SUBCLUSTERS as u64
    }

    pub(super) fn l2_bitmap_get(m: &Meta, slot: usize, idx: usize) -> u64 {
        let at = idx * 16 + 8;
        u64::from_be_bytes(m.l2.data(slot)[at..at + 8].try_into().unwrap())
    }

    pub(super) fn l2_bitmap_set(m: &mut Meta, slot: usize, idx: usize, v: u64) {
        let at = idx * 16 + 8;
        m.l2.data_mut_part(slot, at..at + 8)[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    /// A subcluster of kind `k` in entry `e` as the mapping of the guest
    /// bytes at `in_cl` into its cluster.
    fn sc_mapping(e: L2Entry, k: ScKind, in_cl: u64) -> Result<Mapping> {
        let host = match e {
            L2Entry::Normal { host, .. } => HostOffset(host) + in_cl,
            _ => HostOffset(0),
        };
        Ok(match k {
            ScKind::Data => Mapping::Data(host),
            ScKind::ZeroAlloc => Mapping::Zero(Some(host)),
            ScKind::Zero => Mapping::Zero(None),
            ScKind::UnallocAlloc | ScKind::Unalloc => Mapping::Unallocated,
            ScKind::Compressed => Mapping::Compressed(e),
            ScKind::Invalid => {
                return Err(Error::Corrupt(
                    "invalid subcluster allocation bitmap in an extended L2 entry".into(),
                ))
            }
        })
    }

    /// `map_run` for extended L2 entries: runs of subclusters of one kind
    /// (and contiguous host offsets, where they have one).
    pub(super) fn map_run_ext(
        &self,
        m: &mut Meta,
        off: GuestOffset,
        len: u64,
    ) -> Result<(Mapping, u64)> {
        let cs = self.cluster_size();
        let scs = self.sc_size();
        let l2n = 1u64 << self.l2_bits();
        let gc = off.cluster(self.cluster_bits);
        let in_cl = off.in_cluster(self.cluster_bits);
        let l1i = gc.l1_index(self.l2_bits());
        let l2i = gc.l2_index(self.l2_bits()) as u64;
        let want = (in_cl + len).div_ceil(cs).min(l2n - l2i);
        let Some(slot) = self.l2_for(m, l1i)? else {
            return Ok((Mapping::Unallocated, (want * cs - in_cl).min(len)));
        };
        let entry = |m: &Meta, n: u64| -> Result<(L2Entry, u64)> {
            let idx = (l2i + n) as usize;
            Ok((
                self.decode(Self::l2_get(m, slot, idx))?,
                Self::l2_bitmap_get(m, slot, idx),
            ))
        };
        let (e0, b0) = entry(m, 0)?;
        let sc0 = (in_cl / scs) as u32;
        let first = Self::sc_mapping(e0, kind(e0, b0, sc0), in_cl)?;
        if let Mapping::Compressed(_) = first {
            return Ok((first, (cs - in_cl).min(len)));
        }
        // Bytes of the run so far, from `off`.
        let mut done = (sc0 as u64 + 1) * scs - in_cl;
        let (mut n, mut sc) = (0u64, sc0 + 1);
        let (mut e, mut b) = (e0, b0);
        while done < len {
            if sc == SUBCLUSTERS {
                n += 1;
                sc = 0;
                if n >= want {
                    break;
                }
                match entry(m, n) {
                    Ok(x) => (e, b) = x,
                    // A bad entry ends the run (see `map_run`).
                    Err(_) => break,
                }
            }
            let at = n * cs + sc as u64 * scs - in_cl;
            let Ok(next) = Self::sc_mapping(e, kind(e, b, sc), (sc as u64) * scs) else {
                break;
            };
            let same = match (first, next) {
                (Mapping::Data(h0), Mapping::Data(h)) => h == h0 + at,
                (Mapping::Zero(Some(h0)), Mapping::Zero(Some(h))) => h == h0 + at,
                (Mapping::Zero(None), Mapping::Zero(None)) => true,
                (Mapping::Unallocated, Mapping::Unallocated) => true,
                _ => false,
            };
            if !same {
                break;
            }
            done += scs;
            sc += 1;
        }
        Ok((first, done.min(len)))
    }

    /// `plan_write` for extended L2 entries, one guest cluster at a time.
    pub(super) fn plan_write_ext(
        &self,
        m: &mut Meta,
        pos: GuestOffset,
        len: usize,
    ) -> Result<WritePlan> {
        let cs = self.cluster_size();
        let scs = self.sc_size();
        let gc = pos.cluster(self.cluster_bits);
        let in_cl = pos.in_cluster(self.cluster_bits);
        let l1i = gc.l1_index(self.l2_bits());
        let idx = gc.l2_index(self.l2_bits());
        let end = (in_cl + len as u64).min(cs);
        let bytes = (end - in_cl) as usize;
        let (sa, sb) = ((in_cl / scs) as u32, end.div_ceil(scs) as u32);
        if let Some(slot) = self.l2_for(m, l1i)? {
            let e = self.decode(Self::l2_get(m, slot, idx))?;
            let bm = Self::l2_bitmap_get(m, slot, idx);
            if let L2Entry::Normal { host, copied: true } = e {
                let host = HostOffset(host);
                if (sa..sb).any(|i| kind(e, bm, i) == ScKind::Invalid) {
                    Self::sc_mapping(e, ScKind::Invalid, 0)?;
                }
                if (sa..sb).all(|i| kind(e, bm, i) == ScKind::Data) {
                    self.check_data_overlap(m, host + in_cl, bytes as u64)?;
                    return Ok(WritePlan::InPlace {
                        host: host + in_cl,
                        len: bytes,
                    });
                }
                // Our cluster: its subclusters are allocated in place.
                self.check_data_overlap(m, host, cs)?;
                m.inflight.insert(gc);
                return Ok(WritePlan::Alloc(Alloc {
                    gc,
                    n: 1,
                    host,
                    reuse: true,
                    fresh: false,
                    first_old: e,
                    last_old: e,
                    sub: Some((sa, sb)),
                    // A subcluster already holding data is not rewritten:
                    // in-place writes into it do not wait for us.
                    cow_ends: (
                        kind(e, bm, sa) != ScKind::Data,
                        kind(e, bm, sb - 1) != ScKind::Data,
                    ),
                    log: ilog::Slot::No,
                }));
            }
        }
        let slot = self.l2_writable(m, l1i)?;
        let e = self.decode(Self::l2_get(m, slot, idx))?;
        // A cluster shared with a snapshot, or compressed, is copied whole
        // into the new one; otherwise only the touched subclusters are
        // allocated, the others keep what they read as.
        let sub = match e {
            L2Entry::Normal { .. } | L2Entry::Compressed { .. } => None,
            _ => Some((sa, sb)),
        };
        let (host, fresh) = if self.data.is_some() {
            // Data file clusters sit at the guest offset (see plan_write).
            (HostOffset::identity(gc.offset(self.cluster_bits)), false)
        } else {
            let (host, _, fresh) = self.alloc_data_clusters(m, 1)?;
            if fresh {
                self.reserve_ahead(m, host + cs);
            }
            (host, fresh)
        };
        m.inflight.insert(gc);
        Ok(WritePlan::Alloc(Alloc {
            gc,
            n: 1,
            host,
            reuse: false,
            fresh,
            first_old: e,
            last_old: e,
            sub,
            cow_ends: (true, true),
            log: ilog::Slot::No,
        }))
    }

    /// Copy-on-write for extended L2 entries: the parts of the touched
    /// subclusters (or, for a whole-cluster copy, of the cluster) that the
    /// write [pos, pos + len) does not cover get what they read as now.
    /// The guest cluster is in flight, so its mapping cannot change under
    /// the reads.
    /// Returns whether it wrote anything (see [`Qcow2::cow_fill`]).
    pub(super) fn cow_fill_ext(&self, a: &Alloc, pos: GuestOffset, len: u64) -> Result<bool> {
        let cs = self.cluster_size();
        let scs = self.sc_size();
        let base = a.gc.offset(self.cluster_bits);
        let in_cl = pos - base;
        let base = base.0;
        let end = in_cl + len;
        let (from, to) = match a.sub {
            Some((sa, sb)) => (sa as u64 * scs, sb as u64 * scs),
            None => (0, cs),
        };
        // Nothing past the end of the image is ever read.
        let limit = (self.size() - base).min(cs);
        let ends = [
            (from, in_cl, a.cow_ends.0),
            (end, to.min(limit), a.cow_ends.1),
        ];
        let mut wrote = false;
        for (f, t, needed) in ends {
            if f >= t || !needed {
                continue;
            }
            if self.has_backing_file && self.backing.is_none() {
                return Err(Error::Backing(
                    "the backing file is not open: cannot fill a partial cluster from it".into(),
                ));
            }
            wrote |= BOUNCE.with(|b| -> Result<bool> {
                let mut bounce = b.borrow_mut();
                bounce.resize(cs as usize);
                let buf = &mut bounce[..(t - f) as usize];
                self.read_inner(buf, base + f)?;
                if let Some(c) = &self.cipher {
                    // Even zeros are written, encrypted for here (the
                    // subcluster bounds are whole sectors).
                    c.encrypt(a.host + f, GuestOffset(base + f), buf);
                } else if a.fresh && buf.iter().all(|&x| x == 0) {
                    return Ok(false);
                }
                self.data_storage().write_data_at(buf, (a.host + f).0)?;
                Ok(true)
            })?;
        }
        Ok(wrote)
    }

    /// The bitmap of a committed allocation: the touched subclusters
    /// become data, the others keep their state; a whole-cluster copy
    /// is all data.
    pub(super) fn commit_bitmap(m: &mut Meta, slot: usize, idx: usize, a: &Alloc) {
        let new = match a.sub {
            None => ALL_ALLOC,
            Some((sa, sb)) => {
                let old = Self::l2_bitmap_get(m, slot, idx);
                (old & !zero_range(sa, sb)) | alloc_range(sa, sb)
            }
        };
        Self::l2_bitmap_set(m, slot, idx, new);
    }

    /// The entry and bitmap a whole cluster gets when zeroed (`zero`) or
    /// discarded: zeros keep an owned host cluster with `keep_alloc`.
    pub(super) fn unmapped_ext(old: L2Entry, zero: bool, keep_alloc: bool) -> (L2Entry, u64) {
        match (zero, old) {
            (true, L2Entry::Normal { host, copied: true }) if keep_alloc => {
                (L2Entry::Normal { host, copied: true }, ALL_ZERO)
            }
            (true, _) => (L2Entry::Unallocated, ALL_ZERO),
            (false, _) => (L2Entry::Unallocated, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(alloc_range(0, 32), ALL_ALLOC);
        assert_eq!(zero_range(0, 32), ALL_ZERO);
        assert_eq!(alloc_range(1, 3), 0b110);
        assert_eq!(alloc_range(31, 32), 1 << 31);
    }

    #[test]
    fn kinds() {
        let n = L2Entry::Normal {
            host: 0x10000,
            copied: true,
        };
        assert_eq!(kind(n, 1, 0), ScKind::Data);
        assert_eq!(kind(n, 1, 1), ScKind::UnallocAlloc);
        assert_eq!(kind(n, 1 << 33, 1), ScKind::ZeroAlloc);
        assert_eq!(kind(n, 1 | 1 << 32, 5), ScKind::Invalid);
        let u = L2Entry::Unallocated;
        assert_eq!(kind(u, 1 << 32, 0), ScKind::Zero);
        assert_eq!(kind(u, 0, 0), ScKind::Unalloc);
        assert_eq!(kind(u, 1, 3), ScKind::Invalid);
    }
}
