//! Internal snapshots (qcow2.rst, "Snapshots").
//!
//! Ordering: references a snapshot adds are durable before the snapshot
//! table that names it; a snapshot is removed from the table (durably)
//! before the references it held are dropped; when applying one, its
//! references are added and durable before the active L1 switches to it,
//! and the old active references are dropped only after the switch.

use super::*;

impl Qcow2 {
    /// Waits until no allocation is in flight (metadata can then be walked
    /// and changed as a whole).
    pub(super) fn quiesce<'a>(&'a self, mut m: MutexGuard<'a, Meta>) -> MutexGuard<'a, Meta> {
        while !m.inflight.is_empty() {
            m = self
                .alloc_done
                .wait(m)
                .expect("qcow2 metadata lock poisoned");
        }
        // Metadata is walked or changed as a whole: no reserved clusters.
        self.release_reserve(&mut m);
        m
    }

    /// Adds `delta` to the refcount of every L2 table under `l1` and every
    /// cluster those tables reference.
    pub(super) fn update_l1_refcounts(&self, m: &mut Meta, l1: &[u64], delta: i64) -> Result<()> {
        let cs = self.cluster_size();
        let mut table = vec![0u8; cs as usize];
        let mut freed = Vec::new();
        for &e in l1 {
            let off = L1Entry(e).l2_offset();
            if off == 0 {
                continue;
            }
            let slot = self.l2_slot(m, off)?;
            table.copy_from_slice(m.l2.data(slot));
            for raw in table.chunks_exact(m.l2_stride) {
                let raw = &raw[..8];
                let entry = self.decode(u64::from_be_bytes(raw.try_into().unwrap()))?;
                if let Some((o, l)) = entry.host_range(cs) {
                    m.rc.update_range(&self.st, o, l, delta, |_| {})?;
                }
            }
            m.rc.update_range(&self.st, off, cs, delta, |c| freed.push(c))?;
        }
        for c in freed {
            m.l2.remove(c << self.cluster_bits);
        }
        Ok(())
    }

    /// Sets the COPIED flags of the active L1 and L2 entries from the
    /// refcounts (qcow2.rst: set exactly when the refcount is 1).
    pub(super) fn refresh_copied(&self, m: &mut Meta) -> Result<()> {
        let l2n = 1usize << self.l2_bits();
        for i in 0..m.l1.len() {
            let e = L1Entry(m.l1[i]);
            let off = e.l2_offset();
            if off == 0 {
                continue;
            }
            let own = m.rc.get(&self.st, off >> self.cluster_bits)? == 1;
            if own != e.copied() {
                Self::set_l1(m, i, L1Entry::new(off, own).0);
            }
            let slot = self.l2_slot(m, off)?;
            for k in 0..l2n {
                let raw = Self::l2_get(m, slot, k);
                let host = match self.decode(raw)? {
                    L2Entry::Normal { host, .. }
                    | L2Entry::Zero {
                        host: Some(host), ..
                    } => host,
                    _ => continue,
                };
                let own = m.rc.get(&self.st, host >> self.cluster_bits)? == 1;
                let want = if own {
                    raw | crate::l2::COPIED
                } else {
                    raw & !crate::l2::COPIED
                };
                if want != raw {
                    // The refcount lookups above do not touch the L2 cache.
                    Self::l2_set(m, slot, k, want);
                }
            }
        }
        Ok(())
    }

    pub(super) fn read_l1_at(&self, off: u64, entries: u32) -> Result<Vec<u64>> {
        crate::l2::read_l1(&self.st, off, entries)
    }

    /// Writes a new snapshot table and switches the header to it.
    pub(super) fn replace_snapshot_table(&self, m: &mut Meta, snaps: Vec<Snapshot>) -> Result<()> {
        self.write_snapshot_table(m, snaps, true)
    }

    /// As [`Self::replace_snapshot_table`]; without `free_old` only the
    /// old table's clusters that have a refcount are freed (a repair).
    pub(super) fn write_snapshot_table(
        &self,
        m: &mut Meta,
        mut snaps: Vec<Snapshot>,
        free_old: bool,
    ) -> Result<()> {
        let cs = self.cluster_size();
        // Every entry is written complete (what version 3 requires).
        for s in &mut snaps {
            s.fill_missing(m.header.size);
        }
        let raw = Snapshot::encode_table(&snaps);
        let new_off = if raw.is_empty() {
            0
        } else {
            let off = m.rc.alloc(&self.st, (raw.len() as u64).div_ceil(cs))?;
            m.rc.overlap.write(&self.st, &raw, off, Allow::NOTHING)?;
            off
        };
        // The table and its refcount are durable before the header names it.
        m.rc.flush(&self.st)?;
        self.st.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(snaps.len() as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&new_off.to_be_bytes());
        m.rc.overlap.write(
            &self.st,
            &hdr,
            field::NB_SNAPSHOTS,
            Allow::only(Kind::Header),
        )?;
        self.st.sync()?;
        Self::register_snapshots(&mut m.rc.overlap, new_off, raw.len() as u64, &snaps);
        let (old_off, old_len) = (m.header.snapshots_offset, m.snapshot_table_bytes);
        if m.header.nb_snapshots > 0 && old_len > 0 {
            if free_old {
                // As qemu-img: a table that cannot be freed is leaked (the
                // new one is in place already), not a failure.
                self.st.debug_event("cluster_free");
                if let Err(e) =
                    m.rc.update_range(&self.st, old_off, old_len, -1, |_| {})
                        .and_then(|()| m.rc.flush(&self.st))
                {
                    self.st.report_swallowed("qcow2_free_clusters failed", &e);
                }
            } else {
                // A repair: refcounts may be wrong; what is off is left to
                // the refcount repair that follows.
                let cs = self.cluster_size();
                let first = old_off / cs;
                for c in first..(old_off + old_len).div_ceil(cs) {
                    if m.rc.get(&self.st, c)? > 0 {
                        m.rc.update_range(&self.st, c * cs, cs, -1, |_| {})?;
                    }
                }
            }
        }
        m.header.nb_snapshots = snaps.len() as u32;
        m.header.snapshots_offset = new_off;
        m.snapshot_table_bytes = raw.len() as u64;
        m.snapshots = snaps;
        Ok(())
    }

    /// Rewrites the snapshot table with every entry complete, if one is not
    /// (before an upgrade to version 3, which requires them complete).
    pub(crate) fn complete_snapshot_table(&self) -> Result<()> {
        let m = self.lock();
        let mut m = self.quiesce(m);
        if m.snapshots.iter().all(Snapshot::complete_for_v3) {
            return Ok(());
        }
        self.flush_locked(&mut m)?;
        let snaps = m.snapshots.clone();
        self.replace_snapshot_table(&mut m, snaps)
    }

    /// The snapshot table's part of `check`: entries over QEMU's limits
    /// (left out when the image was opened for repair) and, in version 3,
    /// incomplete entries. With `fix` the table is written back without
    /// them. Returns the messages and the number of problems found.
    ///
    /// As qemu-img, dropping overhanging entries (a header update) comes
    /// before the refcount check, so that it finds their clusters leaked;
    /// rewriting the table comes after it (`rewrite`), like the messages.
    pub(crate) fn check_snapshot_table(
        &self,
        fix: bool,
        rewrite: bool,
    ) -> Result<(Vec<String>, u64)> {
        let m = self.lock();
        let mut m = self.quiesce(m);
        let mut msgs = Vec::new();
        let mut found = 0;
        let mut overhanging = 0;
        let snaps = m.snapshots.clone();
        // The header on disk: the open may have cut its count down.
        let mut raw = [0u8; 4];
        self.st.read_at(&mut raw, field::NB_SNAPSHOTS)?;
        let on_disk = u32::from_be_bytes(raw);
        if self.opts.repair {
            let too_many = on_disk.saturating_sub(crate::header::MAX_SNAPSHOTS);
            if too_many > 0 {
                msgs.push(format!(
                    "{} {too_many} overhanging snapshots",
                    if fix { "Discarding" } else { "ERROR" }
                ));
                overhanging += too_many as u64;
                found += too_many as u64;
            }
            let (_, _, fixes) = Snapshot::read_table_repairing(&self.st, &m.header, true)?;
            for &(n, len) in &fixes.extra_dropped {
                msgs.push(format!(
                    "{} too much extra metadata in snapshot table entry {n} ({len} > {})",
                    if fix { "Discarding" } else { "ERROR" },
                    crate::snapshot::MAX_EXTRA_DATA
                ));
                found += 1;
            }
            if fixes.overhanging > 0 {
                msgs.push(format!(
                    "{} {} overhanging snapshots (snapshot table is too big)",
                    if fix { "Discarding" } else { "ERROR" },
                    fixes.overhanging
                ));
                overhanging += fixes.overhanging as u64;
                found += fixes.overhanging as u64;
            }
        }
        if m.header.version >= 3 {
            for (i, s) in snaps.iter().enumerate() {
                if !s.complete_for_v3() {
                    msgs.push(format!(
                        "{} snapshot table entry {i} is incomplete",
                        if fix { "Repairing" } else { "ERROR" }
                    ));
                    found += 1;
                }
            }
        }
        if rewrite {
            if fix && found > overhanging {
                self.flush_locked(&mut m)?;
                self.write_snapshot_table(&mut m, snaps, false)?;
            }
        } else if fix && overhanging > 0 && on_disk != snaps.len() as u32 {
            // Only entries at the end go: the table stays where it is and
            // the header counts fewer (as QEMU repairs it).
            m.rc.overlap.write(
                &self.st,
                &(snaps.len() as u32).to_be_bytes(),
                field::NB_SNAPSHOTS,
                Allow::only(Kind::Header),
            )?;
            self.st.sync()?;
            m.header.nb_snapshots = snaps.len() as u32;
        }
        Ok((msgs, found))
    }

    /// What makes the active tables unfit to be snapshotted, if anything:
    /// an L2 table or data cluster past the end of the file, or a data
    /// cluster on metadata.
    pub(super) fn snapshot_blocker(&self, m: &mut Meta, l1: &[u64]) -> Result<Option<String>> {
        let cs = self.cluster_size();
        // In whole clusters: a compressed cluster's last sector may end
        // past the last byte of the file.
        let file_end = self.st.len()?.next_multiple_of(cs);
        for (i, &e) in l1.iter().enumerate() {
            let off = L1Entry(e).l2_offset();
            if off == 0 {
                continue;
            }
            if off.checked_add(cs).is_none_or(|end| end > file_end) {
                return Ok(Some(format!(
                    "L1 entry {i} names an L2 table at {off:#x}, past the end of the file"
                )));
            }
            let slot = self.l2_slot(m, off)?;
            for k in 0..1usize << self.l2_bits() {
                let entry = self.decode(Self::l2_get(m, slot, k))?;
                let Some((o, l)) = entry.host_range(cs) else {
                    continue;
                };
                if o.checked_add(l).is_none_or(|end| end > file_end) {
                    // qemu-img's errno where it fails before any corruption.
                    if let Some(e) =
                        crate::snapshot_refs::past_eof_error(&m.rc, m.header.cluster_bits, o)
                    {
                        return Err(e);
                    }
                    return Ok(Some(format!(
                        "L2 entry {k} of the table at {off:#x} maps a cluster at {o:#x}, past the end of the file"
                    )));
                }
                if let Some((kind, at)) = m.rc.overlap.find(o, l, Allow::NOTHING) {
                    return Ok(Some(format!(
                        "L2 entry {k} of the table at {off:#x} maps a cluster at {o:#x}, onto {} at {at:#x}",
                        kind.name()
                    )));
                }
            }
        }
        Ok(None)
    }

    /// Creates an internal snapshot of the current disk state.
    pub fn snapshot_create(&self, name: &str) -> Result<Snapshot> {
        self.check_writable()?;
        self.refuse_snapshots_with_data_file()?;
        if name.len() > u16::MAX as usize {
            return Err(Error::InvalidArgument("snapshot name is too long".into()));
        }
        let m = self.lock();
        let mut m = self.quiesce(m);
        // A snapshot would share clusters an abandoned write may still
        // land in.
        self.fence.check(0, u64::MAX)?;
        if m.snapshots.len() as u32 >= crate::header::MAX_SNAPSHOTS {
            return Err(Error::TooLarge("too many snapshots".into()));
        }
        self.flush_locked(&mut m)?;
        let cs = self.cluster_size();
        let l1 = m.l1.clone();
        // The snapshot takes a reference to every cluster the tables map:
        // one past the end of the file or onto metadata would have its
        // refcount raised where there is no such cluster to count.
        if let Some(msg) = self.snapshot_blocker(&mut m, &l1)? {
            return Err(m.rc.overlap.refuse_corrupt(&self.st, msg));
        }
        let l1_off = if l1.is_empty() {
            0
        } else {
            let off = m.rc.alloc(&self.st, (l1.len() as u64 * 8).div_ceil(cs))?;
            let mut raw = vec![0u8; (l1.len() * 8).next_multiple_of(512)];
            for (k, e) in l1.iter().enumerate() {
                raw[k * 8..k * 8 + 8].copy_from_slice(&e.to_be_bytes());
            }
            m.rc.overlap.write(&self.st, &raw, off, Allow::NOTHING)?;
            off
        };
        self.update_l1_refcounts(&mut m, &l1, 1)?;
        self.refresh_copied(&mut m)?;
        self.flush_locked(&mut m)?;
        let id = m
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let sn = Snapshot {
            l1_table_offset: l1_off,
            l1_size: l1.len() as u32,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(m.header.size),
            icount: Some(0),
            extra_unknown: Vec::new(),
        };
        let mut snaps = m.snapshots.clone();
        snaps.push(sn.clone());
        self.replace_snapshot_table(&mut m, snaps)?;
        Ok(sn)
    }

    /// Deletes an internal snapshot (by ID or name).
    pub fn snapshot_delete(&self, key: &str) -> Result<()> {
        self.check_writable()?;
        self.refuse_snapshots_with_data_file()?;
        let m = self.lock();
        let mut m = self.quiesce(m);
        let Some((idx, sn)) = Snapshot::find(&m.snapshots, key).map(|(i, s)| (i, s.clone())) else {
            return Err(Error::InvalidArgument(format!(
                "snapshot '{key}' not found"
            )));
        };
        sn.check_l1(self.cluster_size())?;
        self.flush_locked(&mut m)?;
        let mut snaps = m.snapshots.clone();
        snaps.remove(idx);
        self.replace_snapshot_table(&mut m, snaps)?;
        let l1 = self
            .read_l1_at(sn.l1_table_offset, sn.l1_size)
            .and_then(|l1| self.update_l1_refcounts(&mut m, &l1, -1))
            .map_err(|e| match e {
                Error::Io { source, .. } => {
                    Error::io("Failed to free the cluster and L1 table", source)
                }
                e => e,
            });
        l1?;
        if sn.l1_size > 0 {
            self.st.debug_event("cluster_free");
            let cs = self.cluster_size();
            let bytes = (sn.l1_size as u64 * 8).next_multiple_of(cs);
            m.rc.update_range(&self.st, sn.l1_table_offset, bytes, -1, |_| {})?;
        }
        self.refresh_copied(&mut m)?;
        self.flush_locked(&mut m)
    }

    /// Makes this read-only image read as an internal snapshot (by ID or
    /// name, or both when `id` is given): its L1 table replaces the active
    /// one in memory only, as qemu-img convert -l does.
    pub fn snapshot_load_tmp(&self, key: &str, id: Option<&str>) -> Result<()> {
        if self.st.writable() {
            return Err(Error::InvalidArgument(
                "a snapshot is loaded only into a read-only image".into(),
            ));
        }
        let m = self.lock();
        let mut m = self.quiesce(m);
        let found = match id {
            Some(id) => m
                .snapshots
                .iter()
                .find(|s| s.id == id && (key.is_empty() || s.name == key))
                .cloned(),
            None => Snapshot::find(&m.snapshots, key).map(|(_, s)| s.clone()),
        };
        let Some(sn) = found else {
            return Err(Error::SnapshotLoad("Can't find snapshot".into()));
        };
        // qemu-img's checks of the table (qcow2_validate_table's wording).
        if sn.l1_size as u64 > crate::header::MAX_L1_BYTES / 8 {
            return Err(Error::SnapshotLoad("Snapshot L1 table too large".into()));
        }
        let cs = self.cluster_size();
        if sn.l1_table_offset & (cs - 1) != 0
            || sn
                .l1_table_offset
                .checked_add(sn.l1_size as u64 * 8)
                .is_none_or(|e| e > i64::MAX as u64)
        {
            return Err(Error::SnapshotLoad(
                "Snapshot L1 table offset invalid".into(),
            ));
        }
        let mut l1 = self.read_l1_at(sn.l1_table_offset, sn.l1_size)?;
        // Reads past the snapshot's table find nothing allocated.
        l1.resize(l1.len().max(m.l1.len()), 0);
        m.l1 = l1;
        m.l1_dirty = None;
        Ok(())
    }

    /// Reverts the disk to an internal snapshot (by ID or name).
    pub fn snapshot_apply(&self, key: &str) -> Result<()> {
        self.check_writable()?;
        self.refuse_with_bitmaps()?;
        self.refuse_snapshots_with_data_file()?;
        let m = self.lock();
        let mut m = self.quiesce(m);
        let Some((_, sn)) = Snapshot::find(&m.snapshots, key).map(|(i, s)| (i, s.clone())) else {
            return Err(Error::InvalidArgument(format!(
                "snapshot '{key}' not found"
            )));
        };
        sn.check_l1(self.cluster_size())?;
        if sn.disk_size.is_some_and(|s| s != m.header.size) || sn.l1_size as usize > m.l1.len() {
            return Err(Error::InvalidArgument(
                "applying a snapshot taken at another disk size is not supported".into(),
            ));
        }
        self.flush_locked(&mut m)?;
        let mut new_l1 = self.read_l1_at(sn.l1_table_offset, sn.l1_size)?;
        new_l1.resize(m.l1.len(), 0);
        self.update_l1_refcounts(&mut m, &new_l1, 1)?;
        m.rc.flush(&self.st)?;
        // Switch the active L1 in place, durably.
        let mut raw = vec![0u8; new_l1.len() * 8];
        for (k, e) in new_l1.iter().enumerate() {
            raw[k * 8..k * 8 + 8].copy_from_slice(&(e & !crate::l2::COPIED).to_be_bytes());
        }
        let l1_off = m.header.l1_table_offset;
        m.rc.overlap
            .write(&self.st, &raw, l1_off, Allow::only(Kind::ActiveL1))?;
        self.st.sync()?;
        let old = std::mem::replace(
            &mut m.l1,
            new_l1.iter().map(|e| e & !crate::l2::COPIED).collect(),
        );
        m.l1_dirty = None;
        // The old active tables are active no more (those the snapshot
        // shares are named again by the new L1).
        let cs = self.cluster_size();
        m.rc.overlap.clear_kind(Kind::ActiveL2);
        let l2s: Vec<(u64, u64)> =
            m.l1.iter()
                .map(|&e| L1Entry(e).l2_offset())
                .filter(|&o| o != 0)
                .map(|o| (o, cs))
                .collect();
        m.rc.overlap.extend(Kind::ActiveL2, l2s);
        self.update_l1_refcounts(&mut m, &old, -1)?;
        self.refresh_copied(&mut m)?;
        self.flush_locked(&mut m)
    }
}
