//! The intent log (`qcow::ilog`): copying writes over a backing file make
//! no sync, a flush orders them, a kill keeps them, a reboot drops only
//! what was never flushed, and a clean close leaves a plain image.
use super::tests::{be64_at, kill, Recorder, TempFile};
use super::*;
use crate::create::{create, CreateOptions};
use crate::raw::Raw;
use crate::storage::IoKind;

const BOOT_A: [u8; 16] = [0xa; 16];
const BOOT_B: [u8; 16] = [0xb; 16];
/// The backing file's bytes: k-th 512-byte sector filled with k + 1.
fn backing_byte(off: u64) -> u8 {
    (off / 512 % 251) as u8 + 1
}

struct Overlay {
    img: TempFile,
    backing: TempFile,
    cs: u64,
    size: u64,
}

impl Overlay {
    fn new(tag: &str, cs: u64, size: u64) -> Overlay {
        let backing = TempFile::new(&format!("{tag}-base"));
        let data: Vec<u8> = (0..size).map(backing_byte).collect();
        std::fs::write(&backing.0, data).unwrap();
        let img = TempFile::new(tag);
        create(
            &img.0,
            &CreateOptions {
                size,
                cluster_size: cs,
                backing_file: Some(backing.0.to_str().unwrap().to_string()),
                backing_format: Some("raw".into()),
                ..Default::default()
            },
        )
        .unwrap();
        Overlay {
            img,
            backing,
            cs,
            size,
        }
    }

    fn open(&self, opts: Qcow2Options, rec: Option<Arc<Recorder>>) -> Qcow2 {
        self.open_as(true, opts, rec)
    }

    fn open_as(&self, writable: bool, opts: Qcow2Options, rec: Option<Arc<Recorder>>) -> Qcow2 {
        let b = Raw::open(Storage::open(&self.backing.0, false).unwrap()).unwrap();
        let st = Storage::open(&self.img.0, writable).unwrap();
        if let Some(r) = rec {
            st.set_faults(r);
        }
        Qcow2::open(st, Some(Arc::new(b)), opts).unwrap()
    }

    fn logged(&self, boot: [u8; 16], records: u64, rec: Option<Arc<Recorder>>) -> Qcow2 {
        self.open(
            Qcow2Options {
                metadata_persistence: MetadataPersistence::ProcessDeath,
                intent_log: true,
                boot_id: Some(boot),
                intent_log_records: Some(records),
                ..Default::default()
            },
            rec,
        )
    }

    fn autoclear(&self) -> u64 {
        be64_at(&self.img.0, field::AUTOCLEAR)
    }
}

fn read_all(q: &Qcow2) -> Vec<u8> {
    let mut b = vec![0u8; q.size() as usize];
    q.read_at(&mut b, 0).unwrap();
    b
}

fn check_clean(q: &Qcow2, leaks: bool) {
    let r = q.check().unwrap();
    assert_eq!((r.corruptions, r.check_errors), (0, 0), "{:?}", r.messages);
    if !leaks {
        assert_eq!(r.leaks, 0, "{:?}", r.messages);
    }
}

#[test]
fn logged_fills_make_no_sync_and_a_flush_orders_them() {
    let o = Overlay::new("ilog-order", 65536, 8 << 20);
    let cs = o.cs;
    let rec = Arc::new(Recorder::default());
    let q = o.logged(BOOT_A, 64, Some(rec.clone()));
    assert_ne!(o.autoclear() & crate::header::autoclear::INTENT_LOG, 0);
    // The first write makes the L2 table (synced as without a log).
    q.write_at(&[1; 4096], 512).unwrap();
    q.flush().unwrap();
    rec.take();
    let l2 = be64_at(&o.img.0, q.header().l1_table_offset) & crate::l2::OFFSET_MASK;
    let in_l2 = |op: &(IoKind, u64, u64)| op.0 == IoKind::Write && op.1 >= l2 && op.1 < l2 + cs;
    for k in 1..6u64 {
        q.write_at(&[0x40 + k as u8; 4096], k * 7 * cs + 1024)
            .unwrap();
    }
    let ops = rec.take();
    assert!(
        !ops.iter().any(|op| op.0 == IoKind::Flush),
        "a logged copying write synced: {ops:?}"
    );
    assert!(
        !ops.iter().any(in_l2),
        "an entry reached its table: {ops:?}"
    );
    q.flush().unwrap();
    let ops = rec.take();
    let first_l2 = ops.iter().position(in_l2).expect("no L2 write at flush");
    assert!(
        ops[..first_l2].iter().any(|op| op.0 == IoKind::Flush),
        "the fills were not synced before their entries: {ops:?}"
    );
    let mut want: Vec<u8> = (0..o.size).map(backing_byte).collect();
    want[512..512 + 4096].fill(1);
    for k in 1..6u64 {
        let at = (k * 7 * cs + 1024) as usize;
        want[at..at + 4096].fill(0x40 + k as u8);
    }
    assert!(read_all(&q) == want, "read back differs");
    // A write that needs no fill dirties the same table: the logged
    // entry written with it needs its fill synced first.
    rec.take();
    q.write_at(&[9; 4096], 50 * cs + 512).unwrap();
    q.write_at(&vec![8; cs as usize], 60 * cs).unwrap();
    let ops = rec.take();
    let first_l2 = ops.iter().position(in_l2).expect("no L2 write");
    assert!(
        ops[..first_l2].iter().any(|op| op.0 == IoKind::Flush),
        "a logged entry went out with another write's: {ops:?}"
    );
}

/// Random writes, zeroes, discards and flushes over an overlay with a
/// small L2 cache and a small log; then a kill. Reopened in the same
/// boot, the image reads exactly as before the kill; in another boot
/// (a power loss: the log is dropped), each cluster reads as before the
/// kill or as at the last flush, and the image has no corruption.
#[test]
fn a_kill_keeps_logged_writes_and_a_reboot_drops_only_unflushed_ones() {
    // (seed, cluster size, log records, image size): 16, 4, 1 and 16
    // L2 tables, the cache holding 2 at most.
    for (seed, cs, records, size) in [
        (1u64, 512u64, 3u64, 512u64 << 10),
        (2, 4096, 5, 8 << 20),
        (3, 65536, 2, 16 << 20),
        (4, 512, 64, 512 << 10),
    ] {
        for boot in [BOOT_A, BOOT_B] {
            let o = Overlay::new("ilog-kill", cs, size);
            let mut opts = Qcow2Options {
                metadata_persistence: MetadataPersistence::ProcessDeath,
                intent_log: true,
                boot_id: Some(BOOT_A),
                intent_log_records: Some(records),
                ..Default::default()
            };
            // A few tables at most: tables holding log entries are evicted.
            opts.l2_cache_bytes = 2 * cs;
            let q = o.open(opts, None);
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            // What the image must read as.
            let mut model: Vec<u8> = (0..size).map(backing_byte).collect();
            let mut flushed = model.clone();
            for _ in 0..160 {
                let off = next() % size / 512 * 512;
                let len = (next() % (2 * cs) + 1).min(size - off);
                let (a, b) = (off as usize, (off + len) as usize);
                match next() % 10 {
                    0 => {
                        q.write_zeroes(off, len, false).unwrap();
                        model[a..b].fill(0);
                    }
                    1 => {
                        q.discard(off, len).unwrap();
                        // Whole clusters become zero clusters (v3 overlay).
                        let end = if off + len == size {
                            size
                        } else {
                            (off + len) / cs * cs
                        };
                        let first = off.next_multiple_of(cs);
                        if first < end {
                            model[first as usize..end as usize].fill(0);
                        }
                    }
                    2 => {
                        q.flush().unwrap();
                        flushed = model.clone();
                    }
                    _ => {
                        let v = next() as u8 | 1;
                        q.write_at(&vec![v; len as usize], off).unwrap();
                        model[a..b].fill(v);
                    }
                }
            }
            let bad = read_all(&q).iter().zip(&model).position(|(a, b)| a != b);
            assert!(
                bad.is_none(),
                "seed {seed}: reads wrong before the kill at {bad:?}"
            );
            // Last, logged writes into several tables (the log's last
            // records; reading the image above evicted every table, which
            // emptied the log).
            let span = cs * cs / 8;
            for t in 0..(size / span).min(records) {
                let off = t * span + 7 * cs + 512;
                if model[off as usize..off as usize + 1000]
                    == flushed[off as usize..off as usize + 1000]
                {
                    q.write_at(&[0xee; 1000], off).unwrap();
                    model[off as usize..off as usize + 1000].fill(0xee);
                }
            }
            let before = model;
            kill(q);
            let what = format!(
                "seed {seed}, {cs} B clusters, {records} records, boot {:x}",
                boot[0]
            );
            if boot == BOOT_A {
                // A reader before the next writer sees the same.
                let ro = o.open_as(
                    false,
                    Qcow2Options {
                        boot_id: Some(boot),
                        l2_cache_bytes: 2 * cs,
                        ..Default::default()
                    },
                    None,
                );
                // Twice: the second pass reads evicted tables again.
                for pass in 0..2 {
                    let bad = read_all(&ro).iter().zip(&before).position(|(a, b)| a != b);
                    assert!(
                        bad.is_none(),
                        "{what}: a reader sees it differ at {bad:?} (pass {pass})"
                    );
                }
                check_clean(&ro, true);
            }
            let mut opts = Qcow2Options {
                metadata_persistence: MetadataPersistence::ProcessDeath,
                boot_id: Some(boot),
                ..Default::default()
            };
            opts.intent_log = true;
            let q = o.open(opts, None);
            let after = read_all(&q);
            if boot == BOOT_A {
                let bad = after.iter().zip(&before).position(|(a, b)| a != b);
                assert!(bad.is_none(), "{what}: differs at {bad:?}");
            } else {
                for c in 0..(size / cs) as usize {
                    let r = c * cs as usize..(c + 1) * cs as usize;
                    assert!(
                        after[r.clone()] == before[r.clone()] || after[r.clone()] == flushed[r],
                        "{what}: cluster {c} is neither as before the kill nor as flushed"
                    );
                }
            }
            check_clean(&q, false);
            drop(q);
            assert_eq!(
                o.autoclear() & crate::header::autoclear::INTENT_LOG,
                0,
                "{what}"
            );
            let q = o.open(Qcow2Options::default(), None);
            check_clean(&q, false);
            assert!(read_all(&q) == after, "{what}: changed by the clean close");
        }
    }
}

/// A clean close ends the log: the bit is off, the area given back, and
/// the header extension stays (ignored while the bit is off).
#[test]
fn a_clean_close_leaves_a_plain_image() {
    let o = Overlay::new("ilog-close", 65536, 4 << 20);
    let q = o.logged(BOOT_A, 16, None);
    for k in 0..20u64 {
        q.write_at(&[k as u8; 1000], k * 150_000).unwrap();
    }
    let want = read_all(&q);
    drop(q);
    assert_eq!(o.autoclear() & crate::header::autoclear::INTENT_LOG, 0);
    let q = o.open(Qcow2Options::default(), None);
    check_clean(&q, false);
    assert!(read_all(&q) == want);
    let h = q.header();
    assert!(h
        .other_extensions
        .iter()
        .any(|e| e.kind == crate::header::ext::INTENT_LOG));
    assert_eq!(h.backing_file.as_deref(), o.backing.0.to_str());
}

/// Zeroing or discarding a cluster whose entry is only in the log: it
/// reads as zeros, before a kill and after it (a replay must not bring
/// the logged data back).
#[test]
fn zeroing_a_logged_cluster_sticks() {
    let cs = 65536;
    for how in ["zero", "zero-unmap", "discard"] {
        let o = Overlay::new("ilog-zero", cs, 4 << 20);
        let q = o.logged(BOOT_A, 64, None);
        q.write_at(&[1; 512], 512).unwrap();
        q.flush().unwrap();
        // Logged, then zeroed; another logged write in the same table.
        q.write_at(&[2; 1024], 3 * cs + 512).unwrap();
        match how {
            "zero" => q.write_zeroes(3 * cs, cs, false).unwrap(),
            "zero-unmap" => q.write_zeroes(3 * cs, cs, true).unwrap(),
            _ => q.discard(3 * cs, cs).unwrap(),
        }
        q.write_at(&[3; 1024], 5 * cs + 512).unwrap();
        let zeros = vec![0u8; cs as usize];
        let mut got = vec![0u8; cs as usize];
        q.read_at(&mut got, 3 * cs).unwrap();
        assert!(got == zeros, "{how}: not zeros before the kill");
        kill(q);
        let q = o.logged(BOOT_A, 64, None);
        q.read_at(&mut got, 3 * cs).unwrap();
        assert!(got == zeros, "{how}: the logged data came back");
        q.read_at(&mut got, 5 * cs).unwrap();
        assert!(
            got[512..1536].iter().all(|&b| b == 3),
            "{how}: lost a logged write"
        );
        check_clean(&q, false);
    }
}

/// The next writer replays a killed writer's records only over what the
/// records replaced, only while the image is still marked dirty (a clean
/// image was closed by another writer since), and syncs the killed
/// writer's fills before the first table that maps them.
#[test]
fn a_replay_is_durable_and_touches_only_what_the_log_replaced() {
    let cs = 65536;
    for case in ["replay", "changed-entry", "clean"] {
        let o = Overlay::new("ilog-replay", cs, 4 << 20);
        let q = o.logged(BOOT_A, 64, None);
        q.write_at(&[1; 512], 0).unwrap();
        q.flush().unwrap();
        q.write_at(&[2; 1024], 3 * cs + 512).unwrap();
        let l2 = be64_at(&o.img.0, q.header().l1_table_offset) & crate::l2::OFFSET_MASK;
        kill(q);
        let file = || {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&o.img.0)
                .unwrap()
        };
        use std::os::unix::fs::FileExt;
        match case {
            // Another writer zeroed the cluster (QEMU's zero flag).
            "changed-entry" => file()
                .write_all_at(&1u64.to_be_bytes(), l2 + 3 * 8)
                .unwrap(),
            // Another writer closed the image cleanly.
            "clean" => {
                let bits = be64_at(&o.img.0, field::INCOMPATIBLE) & !incompat::DIRTY;
                file()
                    .write_all_at(&bits.to_be_bytes(), field::INCOMPATIBLE)
                    .unwrap();
            }
            _ => {}
        }
        let rec = Arc::new(Recorder::default());
        let q = o.logged(BOOT_A, 64, Some(rec.clone()));
        let ops = rec.take();
        let mut got = vec![0u8; 1024];
        q.read_at(&mut got, 3 * cs + 512).unwrap();
        let want: Vec<u8> = (0..1024u64)
            .map(|i| match case {
                "replay" => 2,
                "changed-entry" => 0,
                _ => backing_byte(3 * cs + 512 + i),
            })
            .collect();
        assert!(got == want, "{case}: reads {:#x}", got[0]);
        if case == "replay" {
            let table_write = ops
                .iter()
                .position(|op| op.0 == IoKind::Write && op.1 >= l2 && op.1 < l2 + cs)
                .expect("the replay wrote no table");
            assert!(
                ops[..table_write].iter().any(|op| op.0 == IoKind::Flush),
                "the fill was not synced before its table: {ops:?}"
            );
        }
        // A clean image is not repaired at open: its leaks stay.
        check_clean(&q, case == "clean");
    }
}
