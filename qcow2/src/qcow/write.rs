//! Guest writes: planning, cluster allocation, copy-on-write fill, the
//! in-flight allocation set and the commit of new L2 entries (the write
//! ordering in the parent module's doc).

use super::*;

impl Qcow2 {
    /// Decides how to write `len` bytes at guest offset `pos`: in place
    /// into clusters we own, or into newly allocated clusters. Called with
    /// the lock held and the first cluster not in flight.
    pub(super) fn plan_write(
        &self,
        m: &mut Meta,
        pos: GuestOffset,
        len: usize,
    ) -> Result<WritePlan> {
        if self.extl2 {
            return self.plan_write_ext(m, pos, len);
        }
        let cs = self.cluster_size();
        let cb = self.cluster_bits;
        let l2n = 1u64 << self.l2_bits();
        let gc = pos.cluster(cb);
        let in_cl = pos.in_cluster(cb);
        let l1i = gc.l1_index(self.l2_bits());
        let l2i = gc.l2_index(self.l2_bits()) as u64;
        let want = (in_cl + len as u64).div_ceil(cs).min(l2n - l2i);
        if let Some(slot) = self.l2_for(m, l1i)? {
            if let L2Entry::Normal { host, copied: true } =
                self.decode(Self::l2_get(m, slot, l2i as usize))?
            {
                let mut n = 1;
                while n < want {
                    match self.decode(Self::l2_get(m, slot, (l2i + n) as usize))? {
                        L2Entry::Normal {
                            host: h,
                            copied: true,
                        } if h == host + n * cs => n += 1,
                        _ => break,
                    }
                }
                let bytes = ((n * cs - in_cl) as usize).min(len);
                let host = HostOffset(host) + in_cl;
                // The mapping may point at metadata (a corrupt image).
                self.check_data_overlap(m, host, bytes as u64)?;
                return Ok(WritePlan::InPlace { host, len: bytes });
            }
        }
        let slot = self.l2_writable(m, l1i)?;
        let first_old = self.decode(Self::l2_get(m, slot, l2i as usize))?;
        // A preallocated zero cluster we own is reused in place.
        if let L2Entry::Zero {
            host: Some(h),
            copied: true,
        } = first_old
        {
            let host = HostOffset(h);
            self.check_data_overlap(m, host, cs)?;
            m.inflight.insert(gc);
            return Ok(WritePlan::Alloc(Alloc {
                gc,
                n: 1,
                host,
                reuse: true,
                fresh: false,
                first_old,
                last_old: first_old,
                sub: None,
                cow_ends: (true, true),
                log: ilog::Slot::No,
            }));
        }
        let mut n = 1;
        let mut last_old = first_old;
        // Whether the old entries are all the same and have no host
        // cluster (only then may the allocation go to the intent log).
        let mut same_hostless = first_old.host_range(cs).is_none();
        while n < want {
            if m.inflight.contains(&(gc + n)) {
                break;
            }
            match self.decode(Self::l2_get(m, slot, (l2i + n) as usize))? {
                L2Entry::Normal { copied: true, .. }
                | L2Entry::Zero {
                    host: Some(_),
                    copied: true,
                } => break,
                e => {
                    same_hostless &= e == first_old;
                    last_old = e;
                }
            }
            n += 1;
        }
        if self.data.is_some() {
            // Data clusters of a data file sit at the guest offset and
            // have no refcounts (qcow2.rst, "External data file").
            m.inflight.extend(gc.span(n));
            return Ok(WritePlan::Alloc(Alloc {
                gc,
                n,
                host: HostOffset::identity(gc.offset(cb)),
                reuse: false,
                fresh: false,
                first_old,
                last_old,
                sub: None,
                cow_ends: (true, true),
                log: ilog::Slot::No,
            }));
        }
        let (host, got, fresh) = self.alloc_data_clusters(m, n)?;
        if got < n {
            // A shorter run: the write maps a shorter prefix.
            n = got;
            if n > 1 {
                // Decoded in the loop above: cannot fail.
                last_old = self.decode(Self::l2_get(m, slot, (l2i + n - 1) as usize))?;
            } else {
                last_old = first_old;
            }
        }
        m.inflight.extend(gc.span(n));
        if fresh {
            self.reserve_ahead(m, host + n * cs);
        }
        let log = if self.log_eligible(m, false, same_hostless) {
            m.ilog.reserve()
        } else {
            ilog::Slot::No
        };
        Ok(WritePlan::Alloc(Alloc {
            gc,
            n,
            host,
            reuse: false,
            fresh,
            first_old,
            last_old,
            sub: None,
            cow_ends: (true, true),
            log,
        }))
    }

    /// With `preallocate_ahead`, makes sure the file has space reserved up
    /// to `end`, reserving `preallocate_ahead` bytes past it when not.
    /// Only an optimization: a filesystem that cannot reserve space is not
    /// asked again, and the data writes report any real lack of space.
    pub(super) fn reserve_ahead(&self, m: &mut Meta, end: HostOffset) {
        let end = end.0;
        let ahead = self.opts.preallocate_ahead;
        if ahead == 0 || end <= m.reserved_end || m.preallocated.is_none() {
            return;
        }
        let cs = self.cluster_size();
        let to = end.saturating_add(ahead).next_multiple_of(cs);
        // Space already reserved or written stays as it is (mode 0).
        match self.st.allocate(m.reserved_end, to - m.reserved_end) {
            Ok(()) => {
                m.reserved_end = to;
                m.preallocated = Some(true);
            }
            Err(_) => m.preallocated = None,
        }
    }

    /// Cuts off the space `reserve_ahead` reserved past the last cluster
    /// in use (at drop). Clusters there have no refcount and nothing
    /// points at them.
    pub(super) fn trim_reserved(&self, m: &mut Meta) -> Result<()> {
        if m.preallocated != Some(true) {
            return Ok(());
        }
        let end = (m.rc.end() * self.cluster_size()).max(m.len_at_open);
        if self.st.len()? > end {
            self.st.set_len(end)?;
        }
        m.preallocated = Some(false);
        m.reserved_end = end;
        Ok(())
    }

    /// Fills `out` (one cluster) with what guest cluster `gc` reads as in
    /// the mapping `old`: the copy-on-write source.
    pub(super) fn cow_source(&self, gc: GuestCluster, old: L2Entry, out: &mut [u8]) -> Result<()> {
        let guest = gc.offset(self.cluster_bits);
        match old {
            // Copy-on-write needs the real backing data.
            L2Entry::Unallocated if self.has_backing_file && self.backing.is_none() => {
                Err(Error::Backing(
                    "the backing file is not open: cannot fill a partial cluster from it".into(),
                ))
            }
            L2Entry::Unallocated => self.read_unallocated(out, guest.0),
            L2Entry::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            L2Entry::Normal { host, .. } if self.crypt_method != 0 => {
                self.st.debug_event("read_aio");
                self.read_encrypted(out, HostOffset(host), guest)
            }
            L2Entry::Normal { host, .. } => {
                self.st.debug_event("read_aio");
                self.data_storage().read_at(out, host)
            }
            L2Entry::Compressed { .. } => self.with_decompressed(old, |c| out.copy_from_slice(c)),
        }
    }

    /// Whether guest cluster `gc` read as zeros under mapping `old`.
    pub(super) fn reads_zero(&self, old: L2Entry) -> bool {
        matches!(old, L2Entry::Zero { .. })
            || (old == L2Entry::Unallocated && !self.has_backing_file)
    }

    /// Copy-on-write fill of the parts of newly allocated clusters that the
    /// guest write [pos, pos + len) does not cover: the head of the first
    /// cluster and the tail of the last, from what they read as before.
    /// Returns whether it wrote anything: that must be on disk before an
    /// L2 entry mapping the clusters is (a power loss must not keep the
    /// entry and lose the copy: the guest's old data would be gone).
    pub(super) fn cow_fill(&self, a: &Alloc, pos: GuestOffset, len: u64) -> Result<bool> {
        if self.extl2 {
            return self.cow_fill_ext(a, pos, len);
        }
        let cs = self.cluster_size();
        let in_cl = pos - a.gc.offset(self.cluster_bits);
        let end = in_cl + len; // relative to the first cluster
        let last = a.n - 1;
        let mut regions: [(u64, L2Entry, u64, u64); 2] = [(0, a.first_old, 0, 0); 2];
        let mut count = 0;
        let mut wrote = false;
        if in_cl > 0 {
            regions[count] = (0, a.first_old, 0, in_cl);
            count += 1;
        }
        if end < a.n * cs {
            regions[count] = (last, a.last_old, end - last * cs, cs);
            count += 1;
        }
        for &(k, old, from, to) in &regions[..count] {
            let host = a.host + k * cs;
            if let Some(c) = &self.cipher {
                // Encrypted: even zeros are written, encrypted for here.
                let guest = (a.gc + k).offset(self.cluster_bits);
                BOUNCE.with(|b| -> Result<()> {
                    let mut bounce = b.borrow_mut();
                    bounce.resize(cs as usize);
                    if self.reads_zero(old) {
                        bounce.fill(0);
                    } else {
                        self.cow_source(a.gc + k, old, &mut bounce)?;
                    }
                    let part = &mut bounce[from as usize..to as usize];
                    c.encrypt(host + from, guest + from, part);
                    self.data_storage().write_data_at(part, (host + from).0)
                })?;
                wrote = true;
                continue;
            }
            if self.reads_zero(old) {
                if !a.fresh {
                    self.data_storage()
                        .write_data_zeroes((host + from).0, to - from)?;
                    wrote = true;
                }
                continue;
            }
            BOUNCE.with(|b| -> Result<()> {
                let mut bounce = b.borrow_mut();
                bounce.resize(cs as usize);
                self.cow_source(a.gc + k, old, &mut bounce)?;
                self.data_storage()
                    .write_data_at(&bounce[from as usize..to as usize], (host + from).0)
            })?;
            wrote = true;
        }
        Ok(wrote)
    }

    /// Gives back clusters of an allocation that was never committed (a
    /// failed `commit_alloc` set no entry, so nothing points at them).
    pub(super) fn rollback_alloc(&self, m: &mut Meta, a: &Alloc) {
        if !a.reuse && self.data.is_none() {
            // Nothing points at the new clusters yet, so they can be freed
            // at once. On failure they stay allocated: a leak, not damage.
            let _ =
                m.rc.unref(&self.st, a.host, a.n * self.cluster_size(), |_| {});
        }
    }

    /// Points the L2 entries at the new clusters and queues the old
    /// clusters' references for release. All or nothing: on error no
    /// entry has changed, so `rollback_alloc` frees clusters nothing
    /// points at.
    ///
    /// `logged`: the fill was not synced; the record goes to the intent
    /// log and the entries stay out of the file until a checkpoint.
    pub(super) fn commit_alloc(&self, m: &mut Meta, a: &Alloc, logged: bool) -> Result<()> {
        let cs = self.cluster_size();
        let l1i = a.gc.l1_index(self.l2_bits());
        let slot = self.l2_writable(m, l1i)?;
        let idx = |k: u64| (a.gc + k).l2_index(self.l2_bits());
        // The table may have been evicted and read back since plan_write
        // decoded the entries: decode them all before changing any.
        for k in 0..a.n {
            self.decode(Self::l2_get(m, slot, idx(k)))?;
        }
        if logged {
            let table = m.l2.key(slot);
            // All the same (`plan_write`): the first one stands for all.
            let old = Self::l2_get(m, slot, idx(0));
            self.log_append(m, a, table, old)?;
            for k in 0..a.n {
                let new = L2Entry::Normal {
                    host: (a.host + k * cs).0,
                    copied: true,
                };
                // In the cached table only (not marked dirty): the
                // checkpoint writes it, after the sync its fill needs.
                let at = idx(k) * m.l2_stride;
                m.l2.buffer(slot)[at..at + 8].copy_from_slice(&new.encode(self.geom).to_be_bytes());
            }
            // The old entries had no host cluster: nothing to free.
            return Ok(());
        }
        for k in 0..a.n {
            let idx = idx(k);
            // Cannot fail: the same entry decoded above, lock held.
            let old = self.decode(Self::l2_get(m, slot, idx))?;
            let new = L2Entry::Normal {
                host: (a.host + k * cs).0,
                copied: true,
            };
            Self::l2_set(m, slot, idx, new.encode(self.geom));
            if self.extl2 {
                Self::commit_bitmap(m, slot, idx, a);
            }
            // Data file clusters have no refcounts (and stay where they are).
            if !a.reuse && self.data.is_none() {
                if let Some((host, len)) = old.host_range(cs) {
                    self.queue_free(m, HostOffset(host), len);
                }
            }
        }
        Ok(())
    }

    pub(super) fn finish_alloc(&self, mut m: MutexGuard<'_, Meta>, a: &Alloc) {
        m.ilog.release(a.log);
        self.release_inflight(m, a.gc, a.n);
    }

    /// Maps the write after the lock was taken and the first cluster is
    /// known not to be in flight.
    pub(super) fn begin_locked(
        &self,
        mut m: MutexGuard<'_, Meta>,
        pos: GuestOffset,
        len: usize,
    ) -> Result<WriteIo> {
        self.fence.check(pos.0, len as u64)?;
        self.mark_dirty(pos.0, len as u64)?;
        match self.plan_write(&mut m, pos, len)? {
            WritePlan::InPlace { host, len } => {
                let cb = self.cluster_bits;
                let first = pos.cluster(cb);
                let n = GuestOffset(pos.0 + len as u64 - 1).cluster(cb).0 - first.0 + 1;
                for c in first.span(n) {
                    *m.inplace.entry(c).or_default() += 1;
                }
                Ok(WriteIo {
                    host,
                    len,
                    alloc: None,
                    inplace: Some((first, n)),
                    data_first: false,
                })
            }
            WritePlan::Alloc(a) => {
                drop(m);
                let in_cl = pos - a.gc.offset(self.cluster_bits);
                let n = (len as u64).min(a.n * self.cluster_size() - in_cl);
                // The data must be durable before the entry when the
                // entry reaching the disk first would show something the
                // guest did not write: the old data of a zero cluster
                // reused in place or of a data file's cluster (freed data
                // stays there), or the garbage that zeros decrypt to. (A
                // new cluster in this file reads as zeros until written:
                // past the file's old end, or zeroed with the reserve.)
                let always = a.reuse || self.data.is_some() || self.cipher.is_some();
                let data_first = match self.cow_fill(&a, pos, n) {
                    Ok(w) => w || always,
                    Err(e) => {
                        let mut m = self.lock();
                        self.rollback_alloc(&mut m, &a);
                        self.finish_alloc(m, &a);
                        return Err(e);
                    }
                };
                Ok(WriteIo {
                    host: a.host + in_cl,
                    len: n as usize,
                    alloc: Some(a),
                    inplace: None,
                    data_first,
                })
            }
        }
    }

    /// First step of a guest write whose data I/O the caller does itself:
    /// maps a prefix of [off, off + len) to one host extent, allocating
    /// and doing copy-on-write fill where needed. The caller writes
    /// `io.len` bytes of its data at `io.host`, then calls
    /// [`end_write`](Self::end_write) with the outcome. Blocks while
    /// another request is allocating the same guest cluster. Until
    /// `end_write`, write-zeroes without unmap over these clusters waits
    /// for it: a thread must not run one while it holds the `WriteIo`.
    /// Callers outside the engine get it in a [`PendingWrite`]
    /// ([`Image::begin_write`]), which ends it.
    pub(crate) fn map_write(&self, off: u64, len: usize) -> Result<WriteIo> {
        self.check_writable()?;
        self.check_clear()?;
        self.check_range(off, len as u64)?;
        let off = GuestOffset(off);
        let m = self.lock();
        let m = self.wait_inflight(m, off.cluster(self.cluster_bits), 1)?;
        self.begin_locked(m, off, len)
    }

    /// As [`map_write`](Self::map_write), but returns `Ok(None)` instead
    /// of waiting when another request is allocating the cluster (for
    /// event loops that must not block on another queue). `waker` is then
    /// registered on that cluster and called once its allocation ends:
    /// retry after that (the protocol is in [`crate::sync`]).
    pub(crate) fn try_map_write(
        &self,
        off: u64,
        len: usize,
        waker: &Arc<dyn AllocWaker>,
    ) -> Result<Option<WriteIo>> {
        self.check_writable()?;
        self.check_clear()?;
        self.check_range(off, len as u64)?;
        let off = GuestOffset(off);
        let mut m = self.lock();
        let gc = off.cluster(self.cluster_bits);
        if m.inflight.contains(&gc) {
            m.waiters.register(gc, waker);
            return Ok(None);
        }
        self.begin_locked(m, off, len).map(Some)
    }

    /// Second step of a guest write: once the data write completed
    /// (`ok`), points the L2 entries at the new clusters; otherwise gives
    /// the clusters back.
    pub(crate) fn end_write(&self, io: WriteIo, ok: bool) -> Result<()> {
        if let Some((first, n)) = io.inplace {
            self.end_inplace(first, n);
        }
        let Some(a) = io.alloc else {
            return Ok(());
        };
        // Copy-on-write fill (and the data of a reused cluster) reaches
        // the disk before the entry that maps it (QEMU orders the fill
        // the same way: a flush before the L2 table is written). Synced
        // per request when metadata is written per request, else at the
        // next write-back; outside the lock either way.
        // With the intent log, the fill is synced at the next checkpoint
        // instead (see `ilog`).
        let persist_now = self.opts.metadata_persistence == MetadataPersistence::ProcessDeath;
        let logged = ok && io.data_first && persist_now && a.log == ilog::Slot::Reserved;
        let sync = ok && io.data_first && persist_now && !logged;
        let synced = if sync {
            self.data_storage().sync()
        } else {
            Ok(())
        };
        let mut m = self.lock();
        if let (true, Ok(()), ilog::Slot::Full { upto }) = (sync, &synced, a.log) {
            // That sync covered the fills of the records before `upto`.
            self.log_settle(&mut m, Some(upto));
        }
        let r = match synced {
            Ok(()) if ok => self.commit_alloc(&mut m, &a, logged),
            Ok(()) => Ok(()),
            Err(e) => Err(e),
        };
        if !ok || r.is_err() {
            self.rollback_alloc(&mut m, &a);
        } else if !persist_now {
            m.data_unsynced = true;
        }
        let r = r.and_then(|()| self.persist(&mut m));
        self.finish_alloc(m, &a);
        r
    }

    /// Ends a write whose data I/O may still be running and will never be
    /// waited for (its io_uring could not be waited on). The guest cluster
    /// keeps its old mapping. Where the late write can land only in host
    /// space that stays the guest cluster's (in place, an external data
    /// file, or a cluster whose other subclusters hold data) the guest
    /// clusters are fenced off: later changes there fail rather than be
    /// overtaken. Elsewhere the new host clusters are leaked, never
    /// referenced nor reused, so a late write into them damages nothing.
    /// Whoever waits for the clusters goes on either way.
    pub(crate) fn abandon_write(&self, io: WriteIo) {
        let cb = self.cluster_bits;
        if let Some((first, n)) = io.inplace {
            let m = self.lock();
            self.fence.add(first.offset(cb).0, n << cb);
            drop(m);
            self.end_inplace(first, n);
        }
        let Some(a) = io.alloc else {
            return;
        };
        let mut m = self.lock();
        let mut fence = self.data.is_some() || (a.reuse && self.extl2);
        if a.reuse && !fence {
            // The preallocated cluster stays allocated but is no longer
            // this guest cluster's: unmap it (zero without a host).
            let idx = a.gc.l2_index(self.l2_bits());
            let unmapped = L2Entry::Zero {
                host: None,
                copied: false,
            };
            match self.l2_writable(&mut m, a.gc.l1_index(self.l2_bits())) {
                Ok(slot) => Self::l2_set(&mut m, slot, idx, unmapped.encode(self.geom)),
                Err(_) => fence = true,
            }
        }
        if fence {
            self.fence.add(a.gc.offset(cb).0, a.n << cb);
        }
        if let Err(e) = self.persist(&mut m) {
            self.st.report_swallowed("qcow2 metadata write failed", &e);
        }
        self.finish_alloc(m, &a);
    }

    pub(super) fn write_inner(&self, buf: &[u8], off: u64) -> Result<()> {
        let _epoch = self.epoch();
        if self.crypt_method != 0 {
            self.write_encrypted(buf, off)
        } else {
            self.write_inner_in_epoch(buf, off)
        }
    }

    pub(super) fn write_inner_in_epoch(&self, buf: &[u8], off: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = GuestOffset(off + done as u64);
            let m = self.lock();
            let m = self.wait_inflight(m, pos.cluster(self.cluster_bits), 1)?;
            let io = self.begin_locked(m, pos, buf.len() - done)?;
            let n = io.len;
            self.st.debug_event("write_aio");
            let r = self
                .data_storage()
                .write_data_at(&buf[done..done + n], io.host.0);
            self.end_write(io, r.is_ok())?;
            r?;
            done += n;
        }
        Ok(())
    }

    /// Writes to an encrypted image: whole 512-byte sectors (partial ones
    /// read, decrypted and merged first), each host extent encrypted for
    /// where it lands. A partial sector is not atomic against a concurrent
    /// writer of the same sector; vhost-blk, the one concurrent user,
    /// writes whole sectors only (virtio-blk requests are in sectors).
    pub(super) fn write_encrypted(&self, buf: &[u8], off: u64) -> Result<()> {
        let c = self.data_cipher()?;
        let sec = crate::crypto::SECTOR;
        let start = off - off % sec;
        let end = (off + buf.len() as u64).next_multiple_of(sec);
        let mut plain = crate::pagebuf::PageBuf::zeroed((end - start) as usize);
        // The image size is a multiple of 512 (create rounds it), so the
        // merged sectors lie inside it.
        if start < off {
            self.read_inner(&mut plain[..sec as usize], start)?;
        }
        if end > off + buf.len() as u64 {
            let tail = end - sec;
            self.read_inner(&mut plain[(tail - start) as usize..], tail)?;
        }
        let skip = (off - start) as usize;
        plain[skip..skip + buf.len()].copy_from_slice(buf);
        let mut done = 0usize;
        while done < plain.len() {
            let pos = GuestOffset(start + done as u64);
            let m = self.lock();
            let m = self.wait_inflight(m, pos.cluster(self.cluster_bits), 1)?;
            let io = self.begin_locked(m, pos, plain.len() - done)?;
            let n = io.len;
            let chunk = &mut plain[done..done + n];
            c.encrypt(io.host, pos, chunk);
            let r = self.data_storage().write_data_at(chunk, io.host.0);
            self.end_write(io, r.is_ok())?;
            r?;
            done += n;
        }
        Ok(())
    }

    /// Host bytes for `len` bytes of compressed data, packed after the
    /// previous compressed cluster as QEMU packs them: each host cluster
    /// the data touches gets one more reference.
    pub(super) fn alloc_bytes(&self, m: &mut Meta, len: u64) -> Result<HostOffset> {
        let cs = self.cluster_size();
        let tail = m.compressed_tail;
        let room = if tail == 0 { 0 } else { cs - (tail & (cs - 1)) };
        let off = if tail != 0 && room >= len {
            // Fits in the current cluster.
            m.rc.update_range(&self.st, tail, 1, 1, |_| {})?;
            tail
        } else {
            let new = m.rc.alloc(&self.st, 1)?;
            if tail != 0 && new == tail + room && room > 0 {
                // The next cluster is contiguous: spill over into it.
                m.rc.update_range(&self.st, tail, 1, 1, |_| {})?;
                tail
            } else {
                new
            }
        };
        let end = off + len;
        m.compressed_tail = if end & (cs - 1) == 0 { 0 } else { end };
        Ok(HostOffset(off))
    }

    /// Allocates zeroed host clusters for `len` bytes (the LUKS header
    /// area) and returns their offset.
    pub fn alloc_clusters_zeroed(&self, len: u64) -> Result<u64> {
        self.check_writable()?;
        let cs = self.cluster_size();
        let n = len.div_ceil(cs);
        let off = {
            let mut m = self.lock();
            m.rc.alloc(&self.st, n)?
        };
        crate::pagebuf::zero_pieces(off, n * cs, |z, at| self.st.write_at(z, at))?;
        Ok(off)
    }
}

/// How a qcow2 write mapped for a caller outside the engine ends (the
/// engine side of a [`PendingWrite`]).
pub(super) struct QcowWrite {
    pub(super) img: Arc<Qcow2>,
    pub(super) io: WriteIo,
}

impl WriteEnd for QcowWrite {
    fn commit(self: Box<Self>) -> Result<()> {
        self.img.end_write(self.io, true)
    }
    fn rollback(self: Box<Self>) {
        // Cannot fail: without the data nothing is committed.
        let _ = self.img.end_write(self.io, false);
    }
    fn abandon(self: Box<Self>) {
        self.img.abandon_write(self.io)
    }
}

impl QcowWrite {
    /// The guard handed to the caller: it owns the image, so it may be
    /// kept across completions (a block daemon keeps it in a slot).
    pub(super) fn guard(img: Arc<Qcow2>, io: WriteIo) -> PendingWrite {
        let (host, len) = (io.host, io.len);
        PendingWrite::new(host, len, Box::new(QcowWrite { img, io }))
    }
}
