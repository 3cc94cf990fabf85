//! Compressed cluster writes (qcow2.rst, "Compressed Clusters Descriptor").

use super::*;

impl Qcow2 {
    /// Writes one whole guest cluster compressed (for `convert -c`). The
    /// guest cluster must not be allocated yet (compressed clusters never
    /// overwrite data, as in QEMU). Data that does not compress is written
    /// normally.
    pub fn write_compressed(&self, off: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check_clear()?;
        // Checked first: `size - off` and the L1 index below need
        // `off` inside the image.
        if off >= self.size() {
            return Err(Error::OutOfRange {
                offset: off,
                len: data.len() as u64,
                size: self.size(),
            });
        }
        self.check_range(off, data.len() as u64)?;
        let cs = self.cluster_size();
        if self.data.is_some() {
            return Err(Error::InvalidArgument(
                "compression is not supported with an external data file".into(),
            ));
        }
        if off & (cs - 1) != 0 || data.len() as u64 != cs.min(self.size() - off) {
            return Err(Error::InvalidArgument(
                "compressed writes take whole clusters".into(),
            ));
        }
        self.mark_dirty(off, data.len() as u64)?;
        let padded;
        let cluster: &[u8] = if data.len() as u64 == cs {
            data
        } else {
            // The image's last, partial cluster is compressed zero-padded.
            let mut v = vec![0u8; cs as usize];
            v[..data.len()].copy_from_slice(data);
            padded = v;
            &padded
        };
        let Some(z) = compress::compress(self.compression, cluster) else {
            return self.write_at(data, off);
        };
        let gc = GuestOffset(off).cluster(self.cluster_bits);
        let l1i = gc.l1_index(self.l2_bits());
        let idx = gc.l2_index(self.l2_bits());
        let m = self.lock();
        let mut m = self.wait_inflight(m, gc, 1)?;
        let slot = self.l2_writable(&mut m, l1i)?;
        match self.decode(Self::l2_get(&m, slot, idx))? {
            L2Entry::Unallocated | L2Entry::Zero { host: None, .. } => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "cannot write a compressed cluster over allocated data at {off:#x}"
                )))
            }
        }
        let at = self.alloc_bytes(&mut m, z.len() as u64)?;
        let host = at.0;
        m.rc.overlap
            .check(&self.st, host, z.len() as u64, Allow::NOTHING)?;
        m.inflight.insert(gc);
        drop(m);
        let r = self.st.write_at(&z, host);
        let mut m = self.lock();
        let r = r.map(|_| {
            let sectors = ((host + z.len() as u64 - 1) >> 9) - (host >> 9) + 1;
            let e = L2Entry::Compressed {
                offset: host,
                len: sectors * 512 - (host & 511),
                sectors,
            };
            // The table may have been evicted meanwhile: look it up again.
            let slot = self.l2_writable(&mut m, l1i)?;
            Self::l2_set(&mut m, slot, idx, e.encode(self.geom));
            if self.extl2 {
                // Compressed clusters have no subclusters.
                Self::l2_bitmap_set(&mut m, slot, idx, 0);
            }
            // Durable before the table is written (`sync_before_l2`).
            m.data_unsynced = true;
            Ok::<(), Error>(())
        });
        let r = match r {
            Ok(inner) => inner,
            Err(e) => {
                let _ = m.rc.unref(&self.st, at, z.len() as u64, |_| {});
                Err(e)
            }
        };
        let r = r.and_then(|()| self.persist(&mut m));
        self.release_inflight(m, gc, 1);
        r
    }

    // ----- used by check/rebuild -----
}
