//! A process killed after its writes completed: simulated by forgetting
//! the image (no drop, so no flush), then reopening the file. And the
//! order and size of the metadata writes, recorded under the engine.
use super::*;
use crate::create::{create, CreateOptions};
use crate::storage::{Faults, IoKind};
use std::path::PathBuf;

pub(super) struct TempFile(pub(super) PathBuf);
impl TempFile {
    pub(super) fn new(tag: &str) -> TempFile {
        static N: AtomicU64 = AtomicU64::new(0);
        TempFile(std::env::temp_dir().join(format!(
            "rimg-persist-{tag}-{}-{}.qcow2",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )))
    }
}
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(super) fn make(p: &Path, size: u64, cs: u64, extl2: bool) {
    create(
        p,
        &CreateOptions {
            size,
            cluster_size: cs,
            extended_l2: extl2,
            ..Default::default()
        },
    )
    .unwrap();
}

fn open_with(p: &Path, mode: MetadataPersistence, faults: Option<Arc<Recorder>>) -> Qcow2 {
    let st = Storage::open(p, true).unwrap();
    if let Some(f) = faults {
        st.set_faults(f);
    }
    let opts = Qcow2Options {
        metadata_persistence: mode,
        ..Default::default()
    };
    Qcow2::open(st, None, opts).unwrap()
}

/// A writer that is killed: no drop, no flush, no release of the reserve.
pub(super) fn kill(q: Qcow2) {
    std::mem::forget(q);
}

/// What a workload did: (offset, length, byte) in order, zeros as 0.
type Ops = Vec<(u64, u64, u8)>;

/// Writes, zeroes and discards over several L2 tables without a flush.
fn workload(q: &Qcow2, size: u64) -> Ops {
    let mut ops = Ops::new();
    let cs = q.cluster_size();
    let span = cs * (cs / if q.extl2 { 16 } else { 8 }); // one L2 table
    let mut k = 0u8;
    let mut off = 512u64;
    while off + 3 * cs < size {
        k = k.wrapping_add(1).max(1);
        let len = cs + 1024;
        q.write_at(&vec![k; len as usize], off).unwrap();
        ops.push((off, len, k));
        off += (span / 3).min(size / 7) + 4096 * k as u64;
    }
    // Zeroes and a discard over written clusters, and a write after them.
    q.write_zeroes(0, 2 * cs, false).unwrap();
    ops.push((0, 2 * cs, 0));
    let d = ops[1].0 - 1000;
    q.discard(d, 2 * cs).unwrap();
    // Only whole clusters are dropped.
    let (a, b) = (d.next_multiple_of(cs), (d + 2 * cs) / cs * cs);
    ops.push((a, b - a, 0));
    q.write_at(&[0x77; 4096], cs).unwrap();
    ops.push((cs, 4096, 0x77));
    ops
}

/// Reads every range `ops` touched and compares it with their effect.
fn verify(q: &Qcow2, ops: &Ops, what: &str) {
    for &(off, len, _) in ops {
        let mut want = vec![0u8; len as usize];
        for &(o, l, v) in ops {
            let (a, b) = (o.max(off), (o + l).min(off + len));
            if a < b {
                want[(a - off) as usize..(b - off) as usize].fill(v);
            }
        }
        let mut got = vec![0u8; len as usize];
        q.read_at(&mut got, off).unwrap();
        let bad = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(bad.is_none(), "{what}: lost writes at {off:#x} + {bad:?}");
    }
}

fn check_leaks_at_most(p: &Path) {
    let q = open_with(p, MetadataPersistence::Flush, None);
    let r = q.check().unwrap();
    let n = r.messages.len().min(5);
    assert_eq!(
        (r.corruptions, r.check_errors),
        (0, 0),
        "{:?}",
        &r.messages[..n]
    );
}

#[test]
fn completed_writes_survive_a_killed_process() {
    for (cs, extl2) in [(512, false), (4096, false), (65536, false), (65536, true)] {
        let f = TempFile::new("kill");
        // Several L2 tables, a refcount block or more.
        let size = cs * cs / 8 * 3;
        make(&f.0, size, cs, extl2);
        let q = open_with(&f.0, MetadataPersistence::ProcessDeath, None);
        let ops = workload(&q, size);
        kill(q);
        check_leaks_at_most(&f.0);
        let q = open_with(&f.0, MetadataPersistence::Flush, None);
        verify(&q, &ops, &format!("cluster {cs} extl2 {extl2}"));
    }
}

/// Closed, not killed: the reserve is given back, nothing leaks.
#[test]
fn a_closed_image_leaks_nothing() {
    for cs in [512, 65536] {
        let f = TempFile::new("close");
        let size = 32 << 20;
        make(&f.0, size, cs, false);
        let q = open_with(&f.0, MetadataPersistence::ProcessDeath, None);
        let ops = workload(&q, size);
        drop(q);
        let q = open_with(&f.0, MetadataPersistence::Flush, None);
        let r = q.check().unwrap();
        let n = r.messages.len();
        assert_eq!(
            (r.corruptions, r.leaks),
            (0, 0),
            "{n} problems: {:?}",
            &r.messages[..n.min(5)]
        );
        verify(&q, &ops, "closed");
    }
}

/// The test above has teeth: at-flush persistence loses the writes.
#[test]
fn flush_mode_loses_unflushed_mappings_when_killed() {
    let f = TempFile::new("lose");
    make(&f.0, 8 << 20, 65536, false);
    let q = open_with(&f.0, MetadataPersistence::Flush, None);
    q.write_at(&[0x42; 4096], 1 << 20).unwrap();
    kill(q);
    let q = open_with(&f.0, MetadataPersistence::Flush, None);
    let mut b = [0u8; 4096];
    q.read_at(&mut b, 1 << 20).unwrap();
    assert_eq!(b, [0u8; 4096]);
}

/// Records the engine's writes and syncs, in order.
#[derive(Debug, Default)]
pub(super) struct Recorder(std::sync::Mutex<Vec<(IoKind, u64, u64)>>);
impl Faults for Recorder {
    fn event(&self, _: &str) {}
    fn check(&self, kind: IoKind, off: u64, len: u64) -> Option<i32> {
        if matches!(kind, IoKind::Write | IoKind::Flush) {
            self.0.lock().unwrap().push((kind, off, len));
        }
        None
    }
    fn swallowed(&self, _: &str, _: &Error) {}
}
impl Recorder {
    pub(super) fn take(&self) -> Vec<(IoKind, u64, u64)> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

pub(super) fn be64_at(p: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(p).unwrap(), &mut b, off)
        .unwrap();
    u64::from_be_bytes(b)
}

#[test]
fn metadata_is_written_in_order_and_only_where_it_changed() {
    let f = TempFile::new("order");
    let cs = 65536u64;
    make(&f.0, 64 << 20, cs, false);
    let rec = Arc::new(Recorder::default());
    let q = open_with(&f.0, MetadataPersistence::ProcessDeath, Some(rec.clone()));
    rec.take();
    let h = q.header();
    let block = be64_at(&f.0, h.refcount_table_offset);
    let is_block = |off: u64| (block..block + cs).contains(&off);

    // First write: a reserve (refcounts, synced), a new L2 table (its
    // refcount synced, the table, a sync), then the L1 entry.
    q.write_at(&[1; 4096], 0).unwrap();
    let ops = rec.take();
    let l2 = be64_at(&f.0, h.l1_table_offset) & crate::l2::OFFSET_MASK;
    assert_ne!(l2, 0, "the L1 entry reached the file: {ops:?}");
    let data = q.block_status(0, 4096).unwrap().offset.unwrap();
    let pos = |pred: &dyn Fn(&(IoKind, u64, u64)) -> bool| {
        ops.iter()
            .position(pred)
            .unwrap_or_else(|| panic!("{ops:?}"))
    };
    let last_rc = ops.iter().rposition(|o| is_block(o.1)).unwrap();
    let w_data = pos(&|o| o.1 == data);
    let w_l2 = pos(&|o| o.1 == l2);
    let w_l1 = pos(&|o| o.1 == h.l1_table_offset);
    let synced = |a: usize, b: usize| ops[a..b].iter().any(|o| o.0 == IoKind::Flush);
    assert!(
        synced(last_rc, w_data.min(w_l2)),
        "refcounts durable first: {ops:?}"
    );
    assert!(w_data < w_l2, "data before the L2 entry: {ops:?}");
    assert!(
        synced(w_l2, w_l1),
        "the new L2 table durable before L1: {ops:?}"
    );
    assert_eq!(ops[w_l2].2, cs, "a new table is written whole");

    // Next allocating writes in the same table: the data, then the page
    // of the L2 table holding the entry; no refcount write, no sync.
    for k in 1..4u64 {
        let at = k * 200 * cs;
        q.write_at(&[2; 512], at).unwrap();
        let ops = rec.take();
        let data = q.block_status(at, 512).unwrap().offset.unwrap();
        let page = l2 + (k * 200 * 8) / 4096 * 4096;
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert_eq!(
            ops[0].1,
            data - data % cs,
            "copy-on-write fill or data first: {ops:?}"
        );
        assert_eq!(ops[1], (IoKind::Write, page, 4096), "{ops:?}");
    }
    // In-place writes change no metadata.
    q.write_at(&[3; 512], 0).unwrap();
    assert_eq!(rec.take().len(), 1);
    kill(q);
}

/// A kill leaves the (v3) image marked dirty (marked at open, before
/// any metadata can change), so the next open for writing repairs the
/// leaked reserve as QEMU repairs a dirty image; a clean close clears
/// the mark.
#[test]
fn a_killed_writer_leaves_the_image_dirty_and_the_next_open_repairs_it() {
    let f = TempFile::new("dirty");
    let size = 32 << 20;
    make(&f.0, size, 65536, false);
    let incompat = || be64_at(&f.0, field::INCOMPATIBLE);
    let q = open_with(&f.0, MetadataPersistence::ProcessDeath, None);
    assert_ne!(incompat() & incompat::DIRTY, 0, "not marked at open");
    let ops = workload(&q, size);
    kill(q);
    assert_ne!(incompat() & incompat::DIRTY, 0, "a kill leaves no mark");
    // Read-only: no repair; the reserve shows as leaks.
    let st = Storage::open(&f.0, false).unwrap();
    let r = Qcow2::open(st, None, Qcow2Options::default())
        .unwrap()
        .check()
        .unwrap();
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    assert!(r.leaks > 0, "the reserve was not leaked: {:?}", r.messages);
    // Writable: repaired at open, clean from then on.
    let q = open_with(&f.0, MetadataPersistence::ProcessDeath, None);
    assert!(
        !q.take_open_messages().unwrap_or_default().is_empty(),
        "no repair at open"
    );
    verify(&q, &ops, "repaired");
    q.write_at(&[7; 4096], size - 4096).unwrap();
    drop(q);
    assert_eq!(
        incompat() & incompat::DIRTY,
        0,
        "a clean close left the mark"
    );
    let q = open_with(&f.0, MetadataPersistence::Flush, None);
    let r = q.check().unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
}

/// A partial write into a cluster shared with a snapshot copies the rest
/// of the old cluster: that copy is synced before the L2 entry mapping
/// the new cluster is written (a power loss keeping the entry and losing
/// the copy would turn the guest's old data into zeros). In both modes:
/// per request with ProcessDeath, at the write-back with Flush.
#[test]
fn copy_on_write_fill_is_durable_before_the_entry_mapping_it() {
    for mode in [
        MetadataPersistence::ProcessDeath,
        MetadataPersistence::Flush,
    ] {
        let f = TempFile::new("cow");
        let cs = 65536u64;
        make(&f.0, 8 << 20, cs, false);
        let rec = Arc::new(Recorder::default());
        let q = open_with(&f.0, mode, Some(rec.clone()));
        q.write_at(&vec![0x11; 2 * cs as usize], 0).unwrap();
        q.snapshot_create("s").unwrap();
        // Unshares the L2 table: the write below changes only an entry.
        q.write_at(&[0x22; 4096], 0).unwrap();
        q.flush().unwrap();
        rec.take();
        q.write_at(&[0x33; 4096], cs).unwrap();
        if mode == MetadataPersistence::Flush {
            q.flush().unwrap();
        }
        let ops = rec.take();
        let host = q.block_status(cs, 4096).unwrap().offset.unwrap();
        let cow = ops
            .iter()
            .position(|o| o.0 == IoKind::Write && o.1 == host + 4096)
            .unwrap_or_else(|| panic!("{mode:?}: no copy-on-write fill: {ops:?}"));
        let l2 = be64_at(&f.0, q.header().l1_table_offset) & crate::l2::OFFSET_MASK;
        let entry = ops
            .iter()
            .position(|o| o.0 == IoKind::Write && (o.1..o.1 + o.2).contains(&(l2 + 8)))
            .unwrap_or_else(|| panic!("{mode:?}: the entry was not written: {ops:?}"));
        assert!(
            ops[cow..entry].iter().any(|o| o.0 == IoKind::Flush),
            "{mode:?}: no sync between the fill and the entry: {ops:?}"
        );
        let mut got = vec![0u8; cs as usize];
        q.read_at(&mut got, cs).unwrap();
        assert!(got[..4096].iter().all(|&b| b == 0x33));
        assert!(got[4096..].iter().all(|&b| b == 0x11));
    }
}

/// A reserve left by a kill is repaired by the next writer even when
/// nothing was written past it (a check counts refcounts only up to
/// the end of the file), and a later writer's clean finish leaves
/// nothing behind.
#[test]
fn a_reserve_left_by_a_kill_is_seen_and_repaired() {
    let f = TempFile::new("reserve-eof");
    make(&f.0, 64 << 20, 65536, false);
    let check = || {
        let st = Storage::open(&f.0, false).unwrap();
        let r = Qcow2::open(st, None, Qcow2Options::default())
            .unwrap()
            .check()
            .unwrap();
        (r.corruptions, r.leaks)
    };
    let q = open_with(&f.0, MetadataPersistence::ProcessDeath, None);
    q.write_at(&[1; 512], 0).unwrap();
    kill(q);
    let (corrupt, leaks) = check();
    assert_eq!(corrupt, 0);
    assert!(
        leaks > 0,
        "the killed writer's reserve is invisible to check"
    );
    let q = open_with(&f.0, MetadataPersistence::ProcessDeath, None);
    assert!(
        !q.take_open_messages().unwrap_or_default().is_empty(),
        "no repair at open"
    );
    q.write_at(&[2; 512], 3 << 20).unwrap();
    q.finish().unwrap();
    kill(q);
    assert_eq!(check(), (0, 0), "finish left leaks");
    assert_eq!(be64_at(&f.0, field::INCOMPATIBLE) & incompat::DIRTY, 0);
}
