//! The overlap checks seen from the outside: writes that would land on
//! metadata are refused, the image is marked corrupt, and the file is
//! otherwise left exactly as it was.
use super::*;
use crate::create::{create, CreateOptions};
use crate::header::incompat;
use crate::Repair;
use std::path::PathBuf;

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "rimg-qcow-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(p: &Path, repair: bool) -> Result<Qcow2> {
    let st = Storage::open(p, true)?;
    Qcow2::open(
        st,
        None,
        Qcow2Options {
            repair,
            ..Default::default()
        },
    )
}

fn be64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

/// A 16 MiB image with guest clusters 0 and 1 written (one L2 table).
fn image(dir: &TempDir, version: u32, cs: u64) -> (PathBuf, Header) {
    let p = dir.0.join("t.qcow2");
    create(
        &p,
        &CreateOptions {
            size: 16 << 20,
            cluster_size: cs,
            version,
            ..Default::default()
        },
    )
    .unwrap();
    let q = open(&p, false).unwrap();
    q.write_at(&vec![0x11; cs as usize], 0).unwrap();
    q.write_at(&vec![0x22; cs as usize], cs).unwrap();
    q.flush().unwrap();
    let h = q.header();
    drop(q);
    (p, h)
}

fn l2_of(file: &[u8], h: &Header) -> u64 {
    be64(file, h.l1_table_offset) & OFFSET_MASK
}

fn patch(p: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// The file is `before` with the corrupt bit set (version 3) or
/// unchanged (version 2).
fn assert_only_corrupt_bit(p: &Path, before: &[u8], version: u32) {
    let after = std::fs::read(p).unwrap();
    let mut want = before.to_vec();
    if version >= 3 {
        let bits = be64(before, field::INCOMPATIBLE) | incompat::CORRUPT;
        want[72..80].copy_from_slice(&bits.to_be_bytes());
    }
    assert_eq!(after.len(), want.len(), "file length");
    let diff = after.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(diff, None, "first differing byte");
}

#[test]
fn in_place_write_onto_an_l2_table_is_refused() {
    for (version, cs) in [(3, 65536), (2, 65536), (3, 512)] {
        let dir = TempDir::new("inplace");
        let (p, h) = image(&dir, version, cs);
        let file = std::fs::read(&p).unwrap();
        let l2 = l2_of(&file, &h);
        // Guest cluster 1 now maps (COPIED, so in place) onto its own
        // L2 table.
        patch(&p, l2 + 8, &(l2 | crate::l2::COPIED).to_be_bytes());
        let before = std::fs::read(&p).unwrap();
        let q = open(&p, false).unwrap();
        let e = q.write_at(&[0xee; 512], cs).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::OverlapRefused(_)), "{msg}");
        assert!(
            msg.contains(&format!("active L2 table at {l2:#x}")),
            "{msg}"
        );
        assert!(q.overlap_refused().is_some());
        // Nothing else gets written through this image either.
        assert!(q.write_at(&[1; 512], 2 * cs).is_err());
        assert!(q.flush().is_err());
        if version >= 3 {
            assert!(q.header().is_corrupt());
        }
        drop(q);
        assert_only_corrupt_bit(&p, &before, version);
        if version >= 3 {
            assert!(matches!(open(&p, false), Err(Error::MarkedCorrupt)));
        }
        // Repair drops the entry and clears the bit; writes work again.
        let q = open(&p, true).unwrap();
        let rep = q.check_repair(Repair::All).unwrap();
        assert!(rep.corruptions_fixed > 0, "{rep:?}");
        assert_eq!(rep.corruptions, 0, "{rep:?}");
        q.write_at(&[0x33; 512], cs).unwrap();
        q.flush().unwrap();
        drop(q);
        let q = open(&p, false).unwrap();
        assert!(!q.header().is_corrupt());
        let mut b = [0u8; 512];
        q.read_at(&mut b, cs).unwrap();
        assert_eq!(b, [0x33; 512]);
        q.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0x11; 512]);
        assert_eq!(q.check().unwrap().corruptions, 0);
    }
}

#[test]
fn in_place_writes_onto_each_kind_are_refused() {
    let dir = TempDir::new("kinds");
    let (p0, h) = image(&dir, 3, 65536);
    let file = std::fs::read(&p0).unwrap();
    let refblock = be64(&file, h.refcount_table_offset) & !511;
    let targets = [
        ("active L1 table", h.l1_table_offset),
        ("refcount table", h.refcount_table_offset),
        ("refcount block", refblock),
    ];
    for (name, at) in targets {
        let p = dir.0.join("k.qcow2");
        std::fs::copy(&p0, &p).unwrap();
        let l2 = l2_of(&file, &h);
        patch(&p, l2 + 8, &(at | crate::l2::COPIED).to_be_bytes());
        let before = std::fs::read(&p).unwrap();
        let q = open(&p, false).unwrap();
        let msg = q
            .write_at(&[0xee; 4096], 65536 + 4096)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(&format!("{name} at {at:#x}")), "{name}: {msg}");
        drop(q);
        assert_only_corrupt_bit(&p, &before, 3);
    }
}

#[test]
fn allocation_of_metadata_with_refcount_zero_is_refused() {
    let dir = TempDir::new("alloc");
    let (p, h) = image(&dir, 3, 65536);
    let file = std::fs::read(&p).unwrap();
    let l2 = l2_of(&file, &h);
    let refblock = be64(&file, h.refcount_table_offset) & !511;
    // The L2 table's refcount (16 bits) drops to 0: the allocator would
    // hand it out as the next data cluster.
    patch(&p, refblock + (l2 >> 16) * 2, &[0, 0]);
    let before = std::fs::read(&p).unwrap();
    let q = open(&p, false).unwrap();
    let msg = q.write_at(&[0xee; 4096], 8 << 20).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("active L2 table at {l2:#x}")),
        "{msg}"
    );
    drop(q);
    assert_only_corrupt_bit(&p, &before, 3);
}

#[test]
fn discarding_a_cluster_that_is_metadata_is_refused() {
    let dir = TempDir::new("discard");
    let (p, h) = image(&dir, 3, 65536);
    let file = std::fs::read(&p).unwrap();
    let l2 = l2_of(&file, &h);
    let refblock = be64(&file, h.refcount_table_offset) & !511;
    // Guest cluster 1 maps onto the refcount block, whose refcount is
    // 1: discarding it would free and punch the block.
    patch(&p, l2 + 8, &(refblock | crate::l2::COPIED).to_be_bytes());
    let before = std::fs::read(&p).unwrap();
    let q = open(&p, false).unwrap();
    q.discard(65536, 65536).unwrap();
    let msg = q.flush().unwrap_err().to_string();
    assert!(msg.contains("refcount block"), "{msg}");
    drop(q);
    // The L2 change never reached the disk either (the refused punch
    // came after it was written, so only compare the refcount block).
    let after = std::fs::read(&p).unwrap();
    let rb = refblock as usize;
    assert_eq!(after[rb..rb + 65536], before[rb..rb + 65536]);
    assert_ne!(be64(&after, field::INCOMPATIBLE) & incompat::CORRUPT, 0);
}

/// No false alarms: everything that moves metadata around (refcount
/// table growth, L1 growth, snapshots, shrink) keeps the map right.
#[test]
fn metadata_moves_keep_the_map_right() {
    use rand::{Rng, SeedableRng};
    let dir = TempDir::new("moves");
    let p = dir.0.join("m.qcow2");
    create(
        &p,
        &CreateOptions {
            size: 4 << 20,
            cluster_size: 512,
            lazy_refcounts: true,
            ..Default::default()
        },
    )
    .unwrap();
    let q = open(&p, false).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut model = vec![0u8; 64 << 20];
    fn write(q: &Qcow2, rng: &mut rand::rngs::StdRng, model: &mut [u8], size: u64) {
        for _ in 0..400 {
            let len = rng.random_range(1..4096usize);
            let off = rng.random_range(0..size - len as u64);
            let v: u8 = rng.random();
            q.write_at(&vec![v; len], off).unwrap();
            model[off as usize..off as usize + len].fill(v);
        }
    }
    write(&q, &mut rng, &mut model, 4 << 20);
    q.snapshot_create("a").unwrap();
    write(&q, &mut rng, &mut model, 4 << 20);
    // Growing moves the L1; the refcount table grows on the way.
    Image::resize(&q, 64 << 20).unwrap();
    write(&q, &mut rng, &mut model, 64 << 20);
    q.snapshot_create("b").unwrap();
    write(&q, &mut rng, &mut model, 64 << 20);
    q.snapshot_delete("a").unwrap();
    q.discard(0, 32 << 20).unwrap();
    model[..32 << 20].fill(0);
    write(&q, &mut rng, &mut model, 64 << 20);
    q.flush().unwrap();
    assert_eq!(q.overlap_refused(), None);
    let rep = q.check().unwrap();
    assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.messages);
    let mut got = vec![0u8; 64 << 20];
    q.read_at(&mut got, 0).unwrap();
    assert!(got == model, "content");
    q.snapshot_apply("b").unwrap();
    Image::resize(&q, 8 << 20).unwrap();
    q.write_at(&[5; 4096], 0).unwrap();
    q.flush().unwrap();
    assert_eq!(q.overlap_refused(), None);
    assert_eq!(q.check().unwrap().corruptions, 0);
}
