//! Offsets and cluster indices of the data path, as distinct types.
//!
//! A guest offset, a host offset and a guest cluster index are all
//! numbers, and the engine turns one into another on every request.
//! Mixing them up corrupts an image silently: data written at the guest
//! offset of the file, an L2 entry pointing at a cluster index, the
//! in-flight set keyed by bytes. These types make such a mix-up a
//! compile error in the allocation and mapping code; the conversions that
//! exist (the cluster of an offset, the offset of a cluster, the offset
//! within a cluster) are methods that take the cluster bits.
//!
//! Metadata parsing, check and amend keep plain `u64`: they read offsets
//! from tables and write them back, without these conversions.

use std::ops::{Add, AddAssign, Sub};

/// A byte offset in the guest's view of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// A byte offset in a host file: the image file (data and metadata), or
/// the external data file guest data lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

/// The index of a guest cluster (its guest offset >> cluster bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestCluster(pub u64);

impl GuestOffset {
    /// The guest cluster this offset lies in.
    pub fn cluster(self, cluster_bits: u32) -> GuestCluster {
        GuestCluster(self.0 >> cluster_bits)
    }

    /// The offset within its cluster.
    pub fn in_cluster(self, cluster_bits: u32) -> u64 {
        self.0 & ((1u64 << cluster_bits) - 1)
    }
}

impl GuestCluster {
    /// The guest offset of the cluster's first byte.
    pub fn offset(self, cluster_bits: u32) -> GuestOffset {
        GuestOffset(self.0 << cluster_bits)
    }

    /// The index of the L1 entry whose L2 table maps this cluster.
    pub fn l1_index(self, l2_bits: u32) -> usize {
        (self.0 >> l2_bits) as usize
    }

    /// The index of the cluster's entry in its L2 table.
    pub fn l2_index(self, l2_bits: u32) -> usize {
        (self.0 & ((1u64 << l2_bits) - 1)) as usize
    }

    /// The `n` clusters from this one on.
    pub fn span(self, n: u64) -> impl Iterator<Item = GuestCluster> {
        (self.0..self.0 + n).map(GuestCluster)
    }

    /// Whether this cluster is one of the `n` from `first` on.
    pub fn within(self, first: GuestCluster, n: u64) -> bool {
        (first.0..first.0 + n).contains(&self.0)
    }
}

impl HostOffset {
    /// Where a layer that stores guest bytes at their guest offset keeps
    /// `guest`: a raw image, an external data file (qcow2.rst, "External
    /// data file"). The one place the two kinds of offset coincide.
    pub fn identity(guest: GuestOffset) -> HostOffset {
        HostOffset(guest.0)
    }

    /// The index of the host cluster this offset lies in (the unit of
    /// refcounts).
    pub fn cluster(self, cluster_bits: u32) -> u64 {
        self.0 >> cluster_bits
    }
}

impl Add<u64> for GuestOffset {
    type Output = GuestOffset;
    fn add(self, bytes: u64) -> GuestOffset {
        GuestOffset(self.0 + bytes)
    }
}

/// Bytes between two guest offsets.
impl Sub for GuestOffset {
    type Output = u64;
    fn sub(self, from: GuestOffset) -> u64 {
        self.0 - from.0
    }
}

impl Add<u64> for HostOffset {
    type Output = HostOffset;
    fn add(self, bytes: u64) -> HostOffset {
        HostOffset(self.0 + bytes)
    }
}

/// Clusters further on.
impl Add<u64> for GuestCluster {
    type Output = GuestCluster;
    fn add(self, clusters: u64) -> GuestCluster {
        GuestCluster(self.0 + clusters)
    }
}

impl AddAssign<u64> for GuestCluster {
    fn add_assign(&mut self, clusters: u64) {
        self.0 += clusters;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        let cb = 16;
        let off = GuestOffset(3 * 65536 + 100);
        assert_eq!(off.cluster(cb), GuestCluster(3));
        assert_eq!(off.in_cluster(cb), 100);
        assert_eq!(GuestCluster(3).offset(cb) + 100, off);
        assert_eq!(off - GuestCluster(3).offset(cb), 100);
        assert_eq!(HostOffset(5 * 65536 + 1).cluster(cb), 5);
        // 8192 entries per L2 table at 64 KiB clusters.
        let gc = GuestCluster(8192 * 2 + 7);
        assert_eq!((gc.l1_index(13), gc.l2_index(13)), (2, 7));
        assert!(GuestCluster(4).within(GuestCluster(3), 2));
        assert!(!GuestCluster(5).within(GuestCluster(3), 2));
        let v: Vec<_> = GuestCluster(3).span(2).collect();
        assert_eq!(v, [GuestCluster(3), GuestCluster(4)]);
    }
}
