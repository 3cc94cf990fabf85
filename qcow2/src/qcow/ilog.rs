//! The intent log: copying writes without a sync per write
//! ([`MetadataPersistence::ProcessDeath`], `Qcow2Options::intent_log`).
//!
//! # Why
//! A guest write into a new cluster over a backing file copies the rest
//! of the cluster from the backing file (copy-on-write fill). The L2
//! entry mapping the cluster may reach the disk only after that fill:
//! the kernel writes pages back in any order, and an entry that lands
//! first shows zeros where the backing file's data was (old data lost
//! after a power loss). Without the log the fill is synced before the
//! entry is written, one fdatasync per such write.
//!
//! # How
//! The new entry stays in the L2 cache, out of the file, and a 64-byte
//! record of it is appended (pwrite, no sync) to a log area in the image.
//! A killed process leaves the records in the page cache; the next
//! writable open replays them. Entries reach their tables only at a
//! checkpoint, after one sync that covers the fills of every record
//! before it. A power loss drops the log (records are replayed only when
//! written during the current boot, `boot_id`), which loses only
//! unflushed writes: every flush checkpoints.
//!
//! The one rule, enforced in `write_back` and at cache eviction: **an L2
//! table holding an entry of a record is written or evicted only after a
//! checkpoint**, and an entry of a record changes (discard, zeroes) only
//! after a checkpoint is complete in the file (tables, then the head).
//!
//! # Format (rimg's own; QEMU ignores it)
//! - Header extension [`crate::header::ext::INTENT_LOG`], 32 bytes,
//!   big-endian: version (u32, 1), flags (u32, 0), log offset, log bytes,
//!   log id (u64 each). It stays once written; autoclear bit 63
//!   ([`crate::header::autoclear::INTENT_LOG`]) says whether the log is
//!   live. QEMU clears unknown autoclear bits when it opens an image for
//!   writing (qcow2.txt, "autoclear_features"), so a log QEMU may have
//!   overtaken is never replayed.
//! - Log area: page 0, then a ring of 64-byte records.
//!   - Page 0: "RIMGILOG", version (u32), record size (u32), log id,
//!     boot id (16 bytes), head (u64: first record not yet in the
//!     tables), slots (u64), CRC-32C of its 64 bytes at byte 60.
//!   - Record `seq` at page 0 + 4096 + (seq % slots) * 64: CRC-32C at 0,
//!     kind (u32, 1: map) at 4, seq at 8, log id at 16, first guest
//!     cluster at 24, cluster count at 32, first host offset at 40 (the
//!     clusters are contiguous, in one L2 table), the raw L2 entry every
//!     one of them had before (the same for all) at 48.
//!
//! Only fills from a backing file into clusters with no host cluster
//! before are logged (extended L2 entries, data files, encryption and
//! reused clusters keep the sync).

use super::*;

/// Records in a log area unless `Qcow2Options::intent_log_records` says
/// otherwise: with the page, 256 KiB.
const DEFAULT_SLOTS: u64 = 4032;
const PAGE: u64 = 4096;
const REC: usize = 64;
const MAGIC: &[u8; 8] = b"RIMGILOG";
const VERSION: u32 = 1;
const KIND_MAP: u32 = 1;

/// The header extension's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ext {
    pub offset: u64,
    pub bytes: u64,
    pub id: u64,
}

impl Ext {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32);
        b.extend_from_slice(&VERSION.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&self.offset.to_be_bytes());
        b.extend_from_slice(&self.bytes.to_be_bytes());
        b.extend_from_slice(&self.id.to_be_bytes());
        b
    }

    /// The live log the header names (bit set, payload well formed).
    pub fn from_header(h: &Header, cluster_size: u64) -> Option<Ext> {
        if h.version < 3 || h.autoclear_features & crate::header::autoclear::INTENT_LOG == 0 {
            return None;
        }
        let e = h
            .other_extensions
            .iter()
            .find(|e| e.kind == crate::header::ext::INTENT_LOG && e.data.len() == 32)?;
        let d = &e.data;
        let u64_at = |o: usize| u64::from_be_bytes(d[o..o + 8].try_into().unwrap());
        let ext = Ext {
            offset: u64_at(8),
            bytes: u64_at(16),
            id: u64_at(24),
        };
        let ok = u32::from_be_bytes(d[0..4].try_into().unwrap()) == VERSION
            && ext.offset != 0
            && ext.offset.is_multiple_of(cluster_size)
            && ext.bytes > PAGE
            && ext.bytes <= 16 << 20
            && ext.offset.checked_add(ext.bytes).is_some();
        ok.then_some(ext)
    }
}

/// A record: `n` guest clusters from `gc`, each with raw entry `old`
/// before, now map the host clusters from `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Record {
    pub seq: u64,
    pub gc: u64,
    pub n: u64,
    pub host: u64,
    pub old: u64,
}

/// CRC-32C of a record or page, the 4 bytes at `at` (where it is kept)
/// read as zeros.
fn crc(b: &[u8], at: usize) -> u32 {
    crate::foreign::crc32c::crc32c_without(b, at)
}

impl Record {
    pub fn encode(&self, id: u64) -> [u8; REC] {
        let mut b = [0u8; REC];
        b[4..8].copy_from_slice(&KIND_MAP.to_be_bytes());
        b[8..16].copy_from_slice(&self.seq.to_be_bytes());
        b[16..24].copy_from_slice(&id.to_be_bytes());
        b[24..32].copy_from_slice(&self.gc.to_be_bytes());
        b[32..40].copy_from_slice(&self.n.to_be_bytes());
        b[40..48].copy_from_slice(&self.host.to_be_bytes());
        b[48..56].copy_from_slice(&self.old.to_be_bytes());
        let c = crc(&b, 0);
        b[0..4].copy_from_slice(&c.to_be_bytes());
        b
    }

    /// The record in `b` if it is intact, of log `id` and numbered `seq`.
    pub fn decode(b: &[u8], id: u64, seq: u64) -> Option<Record> {
        let u64_at = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
        let ok = b.len() == REC
            && u32::from_be_bytes(b[0..4].try_into().unwrap()) == crc(b, 0)
            && u32::from_be_bytes(b[4..8].try_into().unwrap()) == KIND_MAP
            && u64_at(8) == seq
            && u64_at(16) == id;
        ok.then(|| Record {
            seq,
            gc: u64_at(24),
            n: u64_at(32),
            host: u64_at(40),
            old: u64_at(48),
        })
    }
}

/// Page 0 of the area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Page {
    pub id: u64,
    pub boot: [u8; 16],
    pub head: u64,
    pub slots: u64,
}

impl Page {
    pub fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_be_bytes());
        b[12..16].copy_from_slice(&(REC as u32).to_be_bytes());
        b[16..24].copy_from_slice(&self.id.to_be_bytes());
        b[24..40].copy_from_slice(&self.boot);
        b[40..48].copy_from_slice(&self.head.to_be_bytes());
        b[48..56].copy_from_slice(&self.slots.to_be_bytes());
        let c = crc(&b, 60);
        b[60..64].copy_from_slice(&c.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; 64], id: u64) -> Option<Page> {
        let u64_at = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
        let p = Page {
            id: u64_at(16),
            boot: b[24..40].try_into().unwrap(),
            head: u64_at(40),
            slots: u64_at(48),
        };
        let ok = &b[0..8] == MAGIC
            && u32::from_be_bytes(b[8..12].try_into().unwrap()) == VERSION
            && u32::from_be_bytes(b[12..16].try_into().unwrap()) == REC as u32
            && u32::from_be_bytes(b[60..64].try_into().unwrap()) == crc(b, 60)
            && p.id == id
            && p.slots > 0;
        ok.then_some(p)
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), as 16 bytes.
pub(super) fn boot_id() -> Option<[u8; 16]> {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let hex: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Whether a planned allocation's entries will be logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Slot {
    /// Not eligible: the write syncs its fill as without a log.
    #[default]
    No,
    /// A record slot is reserved for it.
    Reserved,
    /// Eligible, but the log was full: the write syncs its fill, and
    /// that sync covers every record numbered below `upto` (appended
    /// after its data was written, before this write began).
    Full { upto: u64 },
}

/// A live log area.
struct Area {
    offset: u64,
    bytes: u64,
    slots: u64,
    id: u64,
    boot: [u8; 16],
}

/// The log's state in [`Meta`].
#[derive(Default)]
pub(super) struct Log {
    area: Option<Area>,
    /// Next record number.
    next: u64,
    /// Slots reserved by planned writes.
    reserved: u64,
    /// The head in page 0: a replay starts there. Slots from it on are
    /// never reused until a later head is written.
    head: u64,
    /// Records below this are settled (their entries are ordinary dirty
    /// ones): the head to write once the tables hold them.
    settled: u64,
    /// Entries of records, by L2 table offset: (index, raw entry). They
    /// are in the cached table, which is not marked dirty for them.
    pending: HashMap<u64, Vec<(usize, u64)>>,
    /// A read-only image's view of a killed writer's live log: entries
    /// put into each table as it is read (see `l2_slot`).
    overlay: HashMap<u64, Vec<(usize, u64)>>,
}

impl Log {
    pub fn is_live(&self) -> bool {
        self.area.is_some()
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn holds(&self, table: u64) -> bool {
        self.pending.contains_key(&table)
    }

    /// Puts the overlay's entries for `table` into its freshly read copy.
    pub fn overlay(&self, table: u64, buf: &mut [u8], stride: usize) {
        for &(idx, raw) in self.overlay.get(&table).into_iter().flatten() {
            buf[idx * stride..idx * stride + 8].copy_from_slice(&raw.to_be_bytes());
        }
    }

    /// A slot for an eligible allocation.
    pub fn reserve(&mut self) -> Slot {
        let Some(a) = &self.area else {
            return Slot::No;
        };
        if self.next + self.reserved - self.head < a.slots {
            self.reserved += 1;
            Slot::Reserved
        } else {
            Slot::Full { upto: self.next }
        }
    }

    pub fn release(&mut self, s: Slot) {
        if s == Slot::Reserved {
            self.reserved -= 1;
        }
    }
}

impl Qcow2 {
    /// Whether an allocation of new clusters may be logged rather than
    /// synced (see the module docs): `same_hostless`, its old entries
    /// are all the same and have no host cluster.
    pub(super) fn log_eligible(&self, m: &Meta, reuse: bool, same_hostless: bool) -> bool {
        m.ilog.is_live()
            && !reuse
            && same_hostless
            && self.data.is_none()
            && self.cipher.is_none()
            && !self.extl2
    }

    /// Appends the record of `a` (under the lock, after its data and
    /// fill were written) and notes its entries as pending. The caller
    /// sets them in the cached table without marking it dirty.
    pub(super) fn log_append(&self, m: &mut Meta, a: &Alloc, table: u64, old: u64) -> Result<()> {
        // A log is closed only with no slot reserved (`log_close`).
        let area = m.ilog.area.as_ref().expect("a reserved slot has a log");
        let rec = Record {
            seq: m.ilog.next,
            gc: a.gc.0,
            n: a.n,
            host: a.host.0,
            old,
        };
        let at = area.offset + PAGE + (rec.seq % area.slots) * REC as u64;
        let b = rec.encode(area.id);
        m.rc.overlap.write(&self.st, &b, at, Allow::NOTHING)?;
        m.ilog.next += 1;
        let cs = self.cluster_size();
        let list = m.ilog.pending.entry(table).or_default();
        for k in 0..a.n {
            let idx = (a.gc + k).l2_index(self.l2_bits());
            let raw = L2Entry::Normal {
                host: (a.host + k * cs).0,
                copied: true,
            }
            .encode(self.geom);
            list.push((idx, raw));
        }
        Ok(())
    }

    /// After a sync that covered the fills of every record before `upto`
    /// (all of them when None): their entries become ordinary dirty
    /// entries, written by the next `write_back`, which then moves the
    /// head (see `write_back`).
    pub(super) fn log_settle(&self, m: &mut Meta, upto: Option<u64>) {
        // Records appended since `upto` stay pending (a later full write
        // or the next checkpoint drains them).
        if m.ilog.pending.is_empty() || upto.is_some_and(|u| u < m.ilog.next) {
            return;
        }
        for (table, entries) in std::mem::take(&mut m.ilog.pending) {
            // Tables with pending entries are never evicted (see
            // `writeback_l2`), so the table is cached.
            let slot =
                m.l2.lookup(table)
                    .expect("an L2 table with pending log entries stays cached");
            for (idx, raw) in entries {
                Self::l2_set(m, slot, idx, raw);
            }
        }
        m.ilog.settled = m.ilog.next;
    }

    /// A checkpoint before tables holding pending entries are written:
    /// the data sync, then the entries marked dirty.
    pub(super) fn log_checkpoint(&self, m: &mut Meta) -> Result<()> {
        if m.ilog.has_pending() {
            self.data_storage().sync()?;
            self.log_settle(m, None);
        }
        Ok(())
    }

    /// Writes page 0 with the current head, once the tables hold every
    /// entry below it (end of `write_back`).
    pub(super) fn log_write_head(&self, m: &mut Meta) -> Result<()> {
        if m.ilog.settled == m.ilog.head {
            return Ok(());
        }
        if let Some(a) = &m.ilog.area {
            let page = Page {
                id: a.id,
                boot: a.boot,
                head: m.ilog.settled,
                slots: a.slots,
            };
            m.rc.overlap
                .write(&self.st, &page.encode(), a.offset, Allow::NOTHING)?;
        }
        m.ilog.head = m.ilog.settled;
        Ok(())
    }

    /// A complete checkpoint in the file (tables, L1, head), before an
    /// entry of a record may change.
    pub(super) fn log_checkpoint_written(&self, m: &mut Meta) -> Result<()> {
        if m.ilog.has_pending() {
            self.log_checkpoint(m)?;
            self.write_back(m)?;
        }
        Ok(())
    }
}

impl Qcow2 {
    /// Makes a log area and names it in the header (writable open, after
    /// the image was marked dirty: a kill now leaves the area a leak
    /// that the next writer repairs). Any failure leaves the image
    /// without a log: writes then sync their fills.
    pub(super) fn log_open(&self, m: &mut Meta) {
        let wanted = self.opts.intent_log
            && self.opts.metadata_persistence == MetadataPersistence::ProcessDeath
            && self.st.writable()
            && !self.opts.repair
            && m.header.version == 3
            && m.header.is_dirty()
            && self.has_backing_file
            && self.data.is_none()
            && self.cipher.is_none()
            && !self.extl2;
        if !wanted {
            return;
        }
        let Some(boot) = self.opts.boot_id.or_else(boot_id) else {
            return;
        };
        if let Err(e) = self.log_make(m, boot) {
            self.st.report_swallowed("rimg intent log not opened", &e);
        }
    }

    fn log_make(&self, m: &mut Meta, boot: [u8; 16]) -> Result<()> {
        let cs = self.cluster_size();
        let slots = self.opts.intent_log_records.unwrap_or(DEFAULT_SLOTS).max(1);
        let bytes = (PAGE + slots * REC as u64).next_multiple_of(cs);
        let mut id = [0u8; 8];
        crate::crypto::random_bytes(&mut id)?;
        let id = u64::from_be_bytes(id);
        let offset = m.rc.alloc(&self.st, bytes / cs)?;
        m.rc.overlap
            .write_zeroes(&self.st, offset, bytes, Allow::NOTHING)?;
        let page = Page {
            id,
            boot,
            head: 0,
            slots,
        };
        m.rc.overlap
            .write(&self.st, &page.encode(), offset, Allow::NOTHING)?;
        m.rc.flush(&self.st)?;
        self.st.sync()?;
        let mut h = Self::current_header(m);
        let ext = Ext { offset, bytes, id };
        h.other_extensions
            .retain(|e| e.kind != crate::header::ext::INTENT_LOG);
        h.other_extensions.push(crate::header::Extension {
            kind: crate::header::ext::INTENT_LOG,
            data: ext.encode(),
        });
        h.autoclear_features |= crate::header::autoclear::INTENT_LOG;
        let first = h.encode()?;
        m.rc.overlap
            .write(&self.st, &first, 0, Allow::only(Kind::Header))?;
        self.st.sync()?;
        m.header = h;
        m.ilog = Log {
            area: Some(Area {
                offset,
                bytes,
                slots,
                id,
                boot,
            }),
            ..Log::default()
        };
        Ok(())
    }

    /// Autoclear bit 63 off, durably: no replay of this log from now on.
    fn log_bit_off(&self, m: &mut Meta) -> Result<()> {
        let bits = m.header.autoclear_features & !crate::header::autoclear::INTENT_LOG;
        m.rc.overlap.write(
            &self.st,
            &bits.to_be_bytes(),
            field::AUTOCLEAR,
            Allow::only(Kind::Header),
        )?;
        self.st.sync()?;
        m.header.autoclear_features = bits;
        Ok(())
    }

    /// Ends the log at a clean close (after a flush, which checkpointed):
    /// the bit off on disk before the area's clusters are given back.
    /// Writes after this sync their fills.
    pub(super) fn log_close(&self, m: &mut Meta) -> Result<()> {
        // A write planned with a slot ends by appending its record: the
        // log stays (and the image dirty, see `mark_clean_after_reserve`).
        if !m.ilog.is_live() || m.ilog.reserved > 0 {
            return Ok(());
        }
        self.log_checkpoint_written(m)?;
        self.log_bit_off(m)?;
        let area = m.ilog.area.take().expect("live");
        m.ilog = Log::default();
        m.rc.unref(&self.st, HostOffset(area.offset), area.bytes, |_| {})?;
        m.rc.flush(&self.st)
    }

    /// At a writable open, before a dirty image is repaired: puts the
    /// entries of a killed process's records into their tables, when the
    /// log was written during this boot (else its unflushed writes are
    /// dropped, as a power loss allows), then ends the log. Returns how
    /// many clusters were mapped.
    pub(super) fn log_recover(&self, m: &mut Meta) -> Result<u64> {
        if m.header.version < 3
            || m.header.autoclear_features & crate::header::autoclear::INTENT_LOG == 0
        {
            return Ok(0);
        }
        let cs = self.cluster_size();
        let mut mapped = 0;
        // A live log leaves the image dirty (rimg marks it before the
        // log starts and clean after it ends); a clean one was closed by
        // another writer since, which may have changed what it maps.
        let ext = Ext::from_header(&m.header, cs).filter(|_| m.header.is_dirty());
        if let Some(ext) = ext {
            let boot = self.opts.boot_id.or_else(boot_id);
            let recs = self.log_read(&ext, boot)?;
            if !recs.is_empty() {
                // The killed writer's fills are in the page cache only:
                // durable before any table that maps them is written.
                self.data_storage().sync()?;
            }
            for rec in &recs {
                mapped += self.log_replay(m, rec, false)?;
            }
            if mapped > 0 {
                self.write_back(m)?;
                self.st.sync()?;
            }
        }
        self.log_bit_off(m)?;
        // The area and any record not replayed are leaks of a dirty image,
        // which the repair that follows frees.
        Ok(mapped)
    }

    /// The records from the head on, if page 0 is intact and of `boot`.
    fn log_read(&self, ext: &Ext, boot: Option<[u8; 16]>) -> Result<Vec<Record>> {
        if ext.offset.saturating_add(ext.bytes) > self.st.len()? {
            return Ok(Vec::new());
        }
        let mut b = [0u8; 64];
        self.st.read_at(&mut b, ext.offset)?;
        let Some(page) = Page::decode(&b, ext.id) else {
            return Ok(Vec::new());
        };
        if Some(page.boot) != boot || PAGE + page.slots * REC as u64 > ext.bytes {
            return Ok(Vec::new());
        }
        let mut recs = Vec::new();
        let mut r = [0u8; REC];
        for seq in page.head..page.head.saturating_add(page.slots) {
            let at = ext.offset + PAGE + (seq % page.slots) * REC as u64;
            self.st.read_at(&mut r, at)?;
            match Record::decode(&r, ext.id, seq) {
                Some(rec) => recs.push(rec),
                None => break,
            }
        }
        Ok(recs)
    }

    /// A read-only open of an image a killed writer left with a live log
    /// reads it as the writer did (as its next writable open will): the
    /// records' entries overlay the tables. A log that cannot be read is
    /// only reported.
    pub(super) fn log_load_read_only(&self) {
        let mut m = self.lock();
        let Some(ext) = Ext::from_header(&m.header, self.cluster_size()) else {
            return;
        };
        let boot = self.opts.boot_id.or_else(boot_id);
        let r = self.log_read(&ext, boot).and_then(|recs| {
            recs.iter()
                .try_for_each(|rec| self.log_replay(&mut m, rec, true).map(|_| ()))
        });
        if let Err(e) = r {
            self.st.report_swallowed("rimg intent log not read", &e);
        }
    }

    /// Sets the entries of one record where the table still holds what
    /// the record replaced (no host cluster) and its clusters are still
    /// allocated; anything else is left to the repair. `read_only`: into
    /// the cached table and the overlay, never the file.
    fn log_replay(&self, m: &mut Meta, rec: &Record, read_only: bool) -> Result<u64> {
        let cs = self.cluster_size();
        let cb = self.cluster_bits;
        let mut mapped = 0;
        for k in 0..rec.n.min(1 << self.l2_bits()) {
            let gc = GuestCluster(rec.gc.saturating_add(k));
            let host = rec.host.saturating_add(k * cs);
            if gc.0 >= self.size().div_ceil(cs) || !host.is_multiple_of(cs) {
                continue;
            }
            let l1i = gc.l1_index(self.l2_bits());
            let Some(&e) = m.l1.get(l1i) else { continue };
            let e = L1Entry(e);
            if e.l2_offset() == 0 || !e.copied() {
                continue;
            }
            // A table that cannot be read as one (a corrupt L1 entry) is
            // left to the repair; an I/O error fails the open.
            let slot = match self.l2_slot(m, e.l2_offset()) {
                Ok(s) => s,
                Err(Error::Corrupt(_)) => continue,
                Err(e) => return Err(e),
            };
            let idx = gc.l2_index(self.l2_bits());
            let new = L2Entry::Normal { host, copied: true }.encode(self.geom);
            let cur = Self::l2_get(m, slot, idx);
            if cur == new {
                continue;
            }
            // Only over what the record replaced: anything else was
            // written since, by a writer that did not replay the log.
            let unchanged =
                cur == rec.old && self.decode(cur).is_ok_and(|c| c.host_range(cs).is_none());
            let ours = m.rc.get(&self.st, host >> cb).is_ok_and(|r| r >= 1)
                && m.rc.overlap.find(host, cs, Allow::NOTHING).is_none();
            if unchanged && ours {
                if read_only {
                    let at = idx * m.l2_stride;
                    m.l2.buffer(slot)[at..at + 8].copy_from_slice(&new.to_be_bytes());
                    m.ilog
                        .overlay
                        .entry(e.l2_offset())
                        .or_default()
                        .push((idx, new));
                } else {
                    Self::l2_set(m, slot, idx, new);
                }
                mapped += 1;
            }
        }
        Ok(mapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_page_roundtrip_and_refuse_damage() {
        let r = Record {
            seq: 7,
            gc: 3,
            n: 2,
            host: 0x30000,
            old: 1,
        };
        let b = r.encode(42);
        assert_eq!(Record::decode(&b, 42, 7), Some(r));
        assert_eq!(Record::decode(&b, 43, 7), None, "another log's record");
        assert_eq!(Record::decode(&b, 42, 8), None, "a stale slot");
        for i in 0..REC {
            let mut d = b;
            d[i] ^= 1;
            assert_eq!(Record::decode(&d, 42, 7), None, "byte {i} flipped");
        }
        let p = Page {
            id: 42,
            boot: [5; 16],
            head: 9,
            slots: 4032,
        };
        let b = p.encode();
        assert_eq!(Page::decode(&b, 42), Some(p));
        assert_eq!(Page::decode(&b, 41), None);
        let mut d = b;
        d[40] ^= 1;
        assert_eq!(Page::decode(&d, 42), None);
    }

    #[test]
    fn boot_id_is_read() {
        assert!(boot_id().is_some_and(|b| b != [0; 16]));
    }
}
