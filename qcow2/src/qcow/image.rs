//! The engine's one `Image` interface for qcow2, and closing on drop.

use super::*;

impl<'a> dyn Image + 'a {
    /// The qcow2 image behind this one, for what only qcow2 has
    /// (snapshots, bitmaps, amend, repair); None for other formats.
    pub fn as_qcow2(&self) -> Option<&Qcow2> {
        self.as_any().downcast_ref()
    }
}

impl Image for Qcow2 {
    fn storage(&self) -> &Storage {
        &self.st
    }
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn path(&self) -> &Path {
        self.st.path()
    }
    fn is_writable(&self) -> bool {
        self.st.writable()
    }
    fn backing(&self) -> Option<&Arc<dyn Image>> {
        self.backing.as_ref()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        let _epoch = self.epoch();
        self.read_inner(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, buf.len() as u64)?;
        self.write_inner(buf, off)
    }

    fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len)?;
        let cs = self.cluster_size();
        let first_full = off.next_multiple_of(cs);
        let end = off + len;
        // The image's last cluster may be partial: it counts as whole.
        let last_full = if end == self.size() {
            end.next_multiple_of(cs)
        } else {
            end - end % cs
        };
        if first_full >= last_full {
            return self.write_zero_bytes(off, len);
        }
        if off < first_full {
            self.write_zero_bytes(off, first_full - off)?;
        }
        let (gc, n) = (GuestCluster(first_full / cs), (last_full - first_full) / cs);
        self.mark_dirty(first_full, last_full - first_full)?;
        if self.version >= 3 {
            self.unmap_clusters(gc, n, true, !unmap)?;
        } else if !self.has_backing_file {
            // Version 2 has no zero flag; unallocated reads as zeros only
            // without a backing file.
            self.unmap_clusters(gc, n, false, false)?;
        } else {
            self.write_zero_bytes(first_full, last_full.min(end) - first_full)?;
        }
        if last_full < end {
            self.write_zero_bytes(last_full, end - last_full)?;
        }
        Ok(())
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len)?;
        let cs = self.cluster_size();
        let end = off + len;
        let first_full = off.next_multiple_of(cs);
        let last_full = if end == self.size() {
            end.next_multiple_of(cs)
        } else {
            end - end % cs
        };
        if first_full >= last_full {
            return Ok(()); // Discard is advisory; partial clusters stay.
        }
        // With a backing file, deallocating would expose its data: use
        // zero clusters where the format has them (as QEMU does).
        let zero = self.version >= 3 && self.has_backing_file;
        if self.version < 3 && self.has_backing_file {
            return Ok(());
        }
        self.mark_dirty(first_full, last_full - first_full)?;
        self.unmap_clusters(
            GuestCluster(first_full / cs),
            (last_full - first_full) / cs,
            zero,
            false,
        )
    }

    fn flush(&self) -> Result<()> {
        let mut m = self.lock();
        self.flush_locked(&mut m)
    }

    fn finish(&self) -> Result<()> {
        let mut m = self.lock();
        if self.st.writable() {
            self.release_reserve(&mut m);
        }
        self.flush_locked(&mut m)?;
        self.log_close(&mut m)?;
        self.mark_clean_after_reserve(&mut m)?;
        self.trim_after_reserve(&mut m)
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Extent> {
        self.check_range(off, len)?;
        let mut m = self.lock();
        let (run, n) = self.map_run(&mut m, GuestOffset(off), len)?;
        Ok(match run {
            // Encrypted data has no offset where its guest bytes can be
            // read (QEMU reports none either).
            Mapping::Data(h) => Extent {
                len: n,
                kind: ExtentKind::Data,
                offset: (self.crypt_method == 0).then_some(h.0),
                file: 0,
                compressed: false,
                recurse: false,
            },
            Mapping::Zero(h) => Extent {
                len: n,
                kind: ExtentKind::Zero,
                offset: h.map(|h| h.0),
                file: 0,
                compressed: false,
                recurse: false,
            },
            Mapping::Unallocated => Extent {
                len: n,
                kind: ExtentKind::Unallocated,
                offset: None,
                file: 0,
                compressed: false,
                recurse: false,
            },
            Mapping::Compressed(_) => Extent {
                len: n,
                kind: ExtentKind::Data,
                offset: None,
                file: 0,
                compressed: true,
                recurse: false,
            },
        })
    }

    fn data_storage(&self) -> &Storage {
        Qcow2::data_storage(self)
    }
    fn io_epoch(&self) -> IoEpoch {
        self.epoch()
    }
    fn map_read(&self, off: u64, len: u64) -> Result<(Mapping, u64)> {
        self.map_for_read(off, len)
    }
    fn read_mapped(&self, mapping: Mapping, buf: &mut [u8], off: u64) -> Result<()> {
        self.read_run(mapping, buf, off)
    }
    fn begin_write(self: Arc<Self>, off: u64, len: usize) -> Result<PendingWrite> {
        crate::datapath::check_write_len(len)?;
        let io = self.map_write(off, len)?;
        Ok(write::QcowWrite::guard(self, io))
    }
    fn try_begin_write(
        self: Arc<Self>,
        off: u64,
        len: usize,
        waker: &Arc<dyn AllocWaker>,
    ) -> Result<Option<PendingWrite>> {
        crate::datapath::check_write_len(len)?;
        let io = self.try_map_write(off, len, waker)?;
        Ok(io.map(|io| write::QcowWrite::guard(self, io)))
    }
    fn wait_for_allocations(&self, timeout: std::time::Duration) {
        self.wait_any_allocation(timeout)
    }
    fn alloc_state(&self) -> Option<String> {
        Some(self.describe_allocations())
    }

    fn data_in_clear(&self) -> bool {
        !self.is_encrypted()
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(Qcow2::cluster_size(self))
    }
    fn subcluster_size(&self) -> Option<u64> {
        Some(Qcow2::subcluster_size(self))
    }
    fn has_external_data_file(&self) -> bool {
        self.data.is_some()
    }
    fn supports_zero_clusters(&self) -> bool {
        self.lock().header.version >= 3
    }
    fn supports_compression(&self) -> bool {
        true
    }
    fn write_compressed(&self, off: u64, data: &[u8]) -> Result<()> {
        Qcow2::write_compressed(self, off, data)
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        self.prepare_bitmaps_for_resize()?;
        let m = self.lock();
        let mut m = self.quiesce(m);
        let old = m.header.size;
        self.check_resizable(&m)?;
        if new_size < old {
            drop(m);
            return self.shrink(new_size);
        }
        // A backing file longer than the old size would show through the
        // new area: it must read as zeros instead (QEMU's bdrv_co_truncate
        // zero-fills it the same way). Version 2 has no zero clusters;
        // QEMU refuses there, before changing anything.
        let hide_backing = new_size > old && self.backing.as_ref().is_some_and(|b| b.size() > old);
        if hide_backing && self.version < 3 {
            return Err(Error::InvalidArgument(
                "Failed to zero out new clusters: Operation not supported".into(),
            ));
        }
        self.grow(&mut m, new_size)?;
        drop(m);
        if let Some(d) = &self.data {
            // The data file covers the disk, as QEMU resizes it; a raw one
            // keeps mapping every cluster (QEMU preallocates the metadata).
            if d.st.len()? < new_size {
                d.st.set_len(new_size)?;
            }
            if d.raw && new_size > old {
                self.preallocate_metadata_range(old, new_size)?;
            }
        }
        if hide_backing {
            self.untracked(|| self.write_zeroes(old, new_size - old, false))?;
            self.flush()?;
        }
        Ok(())
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        // Errors leave the bitmaps marked in use (inconsistent), never
        // wrong; `store_bitmaps` reports them.
        let _ = self.store_bitmaps();
        if self.st.writable() {
            if let Ok(mut m) = self.meta.lock() {
                self.release_reserve(&mut m);
                // Errors here cannot be reported; callers that care flush
                // explicitly before dropping.
                if self.flush_locked(&mut m).is_ok() && self.log_close(&mut m).is_ok() {
                    let _ = self.mark_clean_after_reserve(&mut m);
                    let _ = self.trim_after_reserve(&mut m);
                }
                let _ = self.trim_reserved(&mut m);
            }
        }
    }
}
