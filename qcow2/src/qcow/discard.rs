//! Discard and write-zeroes: unmapping clusters and releasing their data.

use super::*;

impl Qcow2 {
    /// Changes whole guest clusters [gc, gc + n) to zero clusters
    /// (`zero`) or deallocates them, dropping their host clusters.
    /// Bitmaps are the caller's: a guest write-zeroes or discard marks
    /// them, a change the guest cannot see (commit emptying the top,
    /// a shrink) does not, as in QEMU.
    pub(super) fn unmap_clusters(
        &self,
        gc: GuestCluster,
        n: u64,
        zero: bool,
        keep_alloc: bool,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let mut keep_alloc = keep_alloc;
        // The raw data file must read as the disk does: zeros go into it
        // (below, per chunk), and its clusters stay mapped.
        let raw = self.data.as_ref().filter(|d| d.raw);
        if raw.is_some() {
            if !zero {
                return Ok(()); // Discard is advisory.
            }
            keep_alloc = true;
        }
        let l2b = self.l2_bits();
        let l2n = 1u64 << l2b;
        let mut c = gc;
        while c < gc + n {
            let l1i = c.l1_index(l2b);
            let chunk = (l2n - c.l2_index(l2b) as u64).min((gc + n).0 - c.0);
            let m = self.lock();
            // Zeros that keep the host cluster also wait for in-place
            // writes into it (see the module docs).
            let mut m = self.wait_busy(m, c, chunk, zero && keep_alloc)?;
            // Entries of intent log records change only after they are in
            // the file, head included (see `ilog`).
            if m.ilog.holds(L1Entry(m.l1[l1i]).l2_offset()) {
                self.log_checkpoint_written(&mut m)?;
            }
            if let Some(d) = raw {
                // Only now, under the lock: no write into these clusters
                // is in flight or can begin until their entries read as
                // zeros, so none lands in the data file after the zeros
                // (it would show there, not in the image).
                let start = c.offset(self.cluster_bits).0;
                let end = (c + chunk).offset(self.cluster_bits).0.min(self.size());
                d.st.zero_data_range(start, end - start)?;
            }
            let has_table = L1Entry(m.l1[l1i]).l2_offset() != 0;
            if !has_table && !zero {
                // Unallocated already reads as zeros without a backing file;
                // zero clusters are still written (QEMU's write-zeroes sets
                // the flag in version 3, table or not).
                c += chunk;
                continue;
            }
            let slot = self.l2_writable(&mut m, l1i)?;
            for gk in c.span(chunk) {
                let idx = gk.l2_index(l2b);
                let old = self.decode(Self::l2_get(&m, slot, idx))?;
                if self.extl2 {
                    let (new, bm) = Self::unmapped_ext(old, zero, keep_alloc);
                    if new == old && bm == Self::l2_bitmap_get(&m, slot, idx) {
                        continue;
                    }
                    Self::l2_set(&mut m, slot, idx, new.encode(self.geom));
                    Self::l2_bitmap_set(&mut m, slot, idx, bm);
                    if new == old {
                        continue; // The host cluster is kept.
                    }
                    if let Some((host, len)) = old.host_range(cs) {
                        self.release_data(&mut m, HostOffset(host), len)?;
                    }
                    continue;
                }
                let new = match (zero, old) {
                    (true, L2Entry::Normal { host, copied: true }) if keep_alloc => L2Entry::Zero {
                        host: Some(host),
                        copied: true,
                    },
                    (
                        true,
                        L2Entry::Zero {
                            host: Some(h),
                            copied: true,
                        },
                    ) if keep_alloc => L2Entry::Zero {
                        host: Some(h),
                        copied: true,
                    },
                    (true, _) => L2Entry::Zero {
                        host: None,
                        copied: false,
                    },
                    (false, _) => L2Entry::Unallocated,
                };
                if new == old {
                    continue;
                }
                Self::l2_set(&mut m, slot, idx, new.encode(self.geom));
                let kept = matches!(new, L2Entry::Zero { host: Some(_), .. });
                if !kept {
                    if let Some((host, len)) = old.host_range(cs) {
                        self.release_data(&mut m, HostOffset(host), len)?;
                    }
                }
            }
            self.persist(&mut m)?;
            drop(m);
            c += chunk;
        }
        Ok(())
    }

    /// Drops the reference of an unmapped entry to its host range.
    pub(super) fn release_data(&self, m: &mut Meta, host: HostOffset, len: u64) -> Result<()> {
        match &self.data {
            None => self.queue_free(m, host, len),
            // No refcounts there: only give the space back, at once (as
            // QEMU does). Not under encryption: until the cleared entry
            // reaches the disk, a crash keeps the old one, and the zeros
            // of a hole decrypt to noise there (the old ciphertext reads
            // as the old data, which the unflushed discard may leave).
            Some(d) if self.opts.discard_passthrough && self.cipher.is_none() => {
                d.st.punch_hole(host.0, len)?
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Writes zeros through the normal write path, in bounded pieces.
    pub(super) fn write_zero_bytes(&self, off: u64, len: u64) -> Result<()> {
        crate::pagebuf::zero_pieces(off, len, |z, at| self.write_inner(z, at))
    }
}
