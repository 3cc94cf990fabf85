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
        gc: u64,
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
        let l2n = 1u64 << self.l2_bits();
        let mut c = gc;
        while c < gc + n {
            let l1i = (c >> self.l2_bits()) as usize;
            let chunk = (l2n - (c & (l2n - 1))).min(gc + n - c);
            let m = self.lock();
            // Zeros that keep the host cluster also wait for in-place
            // writes into it (see the module docs).
            let mut m = self.wait_busy(m, c, chunk, zero && keep_alloc)?;
            if let Some(d) = raw {
                // Only now, under the lock: no write into these clusters
                // is in flight or can begin until their entries read as
                // zeros, so none lands in the data file after the zeros
                // (it would show there, not in the image).
                let end = ((c + chunk) * cs).min(self.size());
                d.st.zero_data_range(c * cs, end - c * cs)?;
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
            for k in 0..chunk {
                let idx = ((c + k) & (l2n - 1)) as usize;
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
                    if let Some(r) = old.host_range(cs) {
                        self.release_data(&mut m, r)?;
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
                    if let Some(r) = old.host_range(cs) {
                        self.release_data(&mut m, r)?;
                    }
                }
            }
            drop(m);
            c += chunk;
        }
        Ok(())
    }

    /// Drops the reference of an unmapped entry to its host range.
    pub(super) fn release_data(&self, m: &mut Meta, r: (u64, u64)) -> Result<()> {
        match &self.data {
            None => self.queue_free(m, r),
            // No refcounts there: only give the space back.
            Some(d) if self.opts.discard_passthrough => d.st.punch_hole(r.0, r.1)?,
            Some(_) => {}
        }
        Ok(())
    }

    /// Writes zeros through the normal write path, in bounded pieces.
    pub(super) fn write_zero_bytes(&self, off: u64, len: u64) -> Result<()> {
        let zeros = crate::zero_buf();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_inner(&zeros[..n as usize], off + done)?;
            done += n;
        }
        Ok(())
    }
}
