//! Bodies of the fuzz targets: the libFuzzer binaries in `fuzz/` and the
//! deterministic smoke test in the normal test suite
//! (`tests/tests/fuzz_smoke.rs`) both call these, so a crashing input
//! found by one replays in the other.
//!
//! Each function takes arbitrary bytes. Errors are expected and ignored;
//! a panic is a bug, and so is a failed assertion here: the assertions
//! state invariants that hold for every input, however hostile.
//!
//! The image lives in a memfd (an anonymous in-memory file): the engine
//! does positioned I/O on a `File`, and a memfd gives it one without a
//! path to create or clean up, so a crashed run leaves nothing behind.
//!
//! Work per input is bounded ([`MAX_STEPS`], [`MAX_READ_BYTES`]): a tiny
//! input may describe a petabyte disk, and walking all of it is not a bug
//! but would stall the fuzzer.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::FromRawFd;
use std::path::Path;

use crate::check::Repair;
use crate::header::Header;
use crate::image::{ExtentKind, Image};
use crate::qcow::{Qcow2, Qcow2Options};
use crate::storage::Storage;

/// Most block-status queries or reads one input may cost.
pub const MAX_STEPS: u64 = 1 << 14;
/// Most guest bytes one input may read.
pub const MAX_READ_BYTES: u64 = 64 << 20;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target by name, for drivers that run them all.
pub const TARGETS: &[(&str, Target)] = &[
    ("header", header),
    ("open_walk", open_walk),
    ("read_all", read_all),
    ("check_repair", check_repair),
    ("bitmaps", bitmaps),
    ("vdi", vdi),
    ("vpc", vpc),
    ("vmdk", vmdk),
    ("vhdx", vhdx),
    ("nbd_client", nbd_client),
];

/// The NBD client against a server whose every byte is `data` (see
/// [`crate::nbd::fuzz`]).
pub fn nbd_client(data: &[u8]) {
    crate::nbd::fuzz::client(data)
}

/// An in-memory file holding `data`.
fn memfile(data: &[u8]) -> File {
    // SAFETY: the name is a NUL-terminated literal; memfd_create returns a
    // new descriptor (checked below) that nothing else owns.
    let fd = unsafe { libc::memfd_create(c"rimg-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a valid descriptor owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.write_all_at(data, 0).expect("writing the memfd");
    f
}

fn open_file(f: File, writable: bool, opts: Qcow2Options) -> Option<Qcow2> {
    let st = Storage::from_file(f, Path::new("fuzz-input.qcow2"), writable);
    Qcow2::open(st, None, opts).ok()
}

/// Counts steps and bytes against the per-input bounds.
struct Budget {
    steps: u64,
    bytes: u64,
}

impl Budget {
    fn new() -> Self {
        Budget { steps: 0, bytes: 0 }
    }
    /// Takes one step that reads `bytes`; false once the budget is spent.
    fn take(&mut self, bytes: u64) -> bool {
        self.steps += 1;
        self.bytes += bytes;
        self.steps <= MAX_STEPS && self.bytes <= MAX_READ_BYTES
    }
}

/// Header and header-extension parsing: whatever parses must parse the
/// same from its first cluster alone (as `open` reads it), and must encode
/// into a first cluster that parses back to the same header.
pub fn header(data: &[u8]) {
    let Ok(h) = Header::parse(data) else {
        return;
    };
    let cs = h.cluster_size() as usize;
    if data.len() > cs {
        let first = Header::parse(&data[..cs]).expect("the first cluster alone parses");
        assert_eq!(first, h, "bytes past the first cluster changed the header");
    }
    let mut e = h.clone();
    let Ok(bytes) = e.encode() else {
        return;
    };
    assert_eq!(bytes.len(), cs, "encoded header is not one cluster");
    let mut back = Header::parse(&bytes).expect("an encoded header parses");
    // Feature names are decoded lossily from 46-byte fields and cut to 46
    // bytes on encoding: only their kinds and bits must survive.
    let names =
        |h: &Header| -> Vec<(u8, u8)> { h.feature_names.iter().map(|f| (f.kind, f.bit)).collect() };
    assert_eq!(names(&back), names(&e), "feature table changed");
    back.feature_names = e.feature_names.clone();
    assert_eq!(back, e, "header changed through encode and parse");
}

/// Opening an image and walking all its metadata: the header as the
/// engine keeps it, the snapshot table, the mapping of every guest
/// cluster (L1 and L2 tables) and the check's walk of every reference and
/// refcount (active and snapshot L1/L2 tables, refcount table and blocks).
pub fn open_walk(data: &[u8]) {
    let Some(q) = open_file(memfile(data), false, Qcow2Options::default()) else {
        return;
    };
    let h = q.header();
    assert_eq!(q.snapshots().len() as u64, h.nb_snapshots as u64);
    assert_eq!(q.size(), h.size);
    let mut budget = Budget::new();
    let size = q.size();
    let mut pos = 0;
    while pos < size && budget.take(0) {
        match q.block_status(pos, size - pos) {
            Ok(e) => {
                // Callers loop on these lengths: zero would never end.
                assert!(
                    e.len > 0 && e.len <= size - pos,
                    "block_status({pos}, {}) returned {} bytes",
                    size - pos,
                    e.len
                );
                if e.kind == ExtentKind::Data && !e.compressed {
                    assert!(e.offset.is_some(), "data extent without a host offset");
                }
                pos += e.len;
            }
            // A bad entry fails its own cluster only: go on past it.
            Err(_) => pos = (pos + 1).next_multiple_of(q.cluster_size()),
        }
    }
    let _ = q.check();
}

/// Reads every allocated cluster of the image (compressed ones included)
/// one by one and as whole runs, which must agree; ranges that are zero or
/// unallocated must read as zeros (no backing file is opened).
pub fn read_all(data: &[u8]) {
    let Some(q) = open_file(memfile(data), false, Qcow2Options::default()) else {
        return;
    };
    let size = q.size();
    let cs = q.cluster_size();
    let mut budget = Budget::new();
    let mut one = vec![0u8; cs as usize];
    let mut run = Vec::new();
    let mut pos = 0;
    'walk: while pos < size && budget.take(0) {
        let e = match q.block_status(pos, size - pos) {
            Ok(e) => e,
            Err(_) => {
                // Reading the bad cluster must fail cleanly too.
                let n = ((pos + 1).next_multiple_of(cs).min(size) - pos) as usize;
                let _ = q.read_at(&mut one[..n], pos);
                pos += n as u64;
                continue;
            }
        };
        assert!(e.len > 0 && e.len <= size - pos);
        match e.kind {
            ExtentKind::Data => {
                // Whole run (in bounded pieces) against cluster by cluster.
                let mut at = pos;
                while at < pos + e.len {
                    let n = (pos + e.len - at).min(1 << 20);
                    if !budget.take(n) {
                        break 'walk;
                    }
                    run.resize(n as usize, 0);
                    let whole = q.read_at(&mut run, at).is_ok();
                    let mut c = at;
                    while c < at + n {
                        let k = ((c + 1).next_multiple_of(cs).min(at + n) - c) as usize;
                        if !budget.take(k as u64) {
                            break 'walk;
                        }
                        if q.read_at(&mut one[..k], c).is_ok() && whole {
                            let r = (c - at) as usize;
                            assert!(
                                one[..k] == run[r..r + k],
                                "guest bytes at {c:#x} read differently alone and in a run"
                            );
                        }
                        c += k as u64;
                    }
                    at += n;
                }
            }
            ExtentKind::Zero | ExtentKind::Unallocated => {
                // The first cluster of the run is enough: the rest maps
                // the same way.
                let k = (pos + 1).next_multiple_of(cs).min(pos + e.len) - pos;
                if !budget.take(k) {
                    break;
                }
                if q.read_at(&mut one[..k as usize], pos).is_ok() {
                    assert!(
                        one[..k as usize].iter().all(|&b| b == 0),
                        "{:?} range at {pos:#x} does not read as zeros",
                        e.kind
                    );
                }
            }
        }
        pos += e.len;
    }
    // Unaligned reads across cluster boundaries, near the start and end.
    for off in [cs - 7, 2 * cs - 1, size.saturating_sub(cs + 3)] {
        if off < size {
            let n = (cs + 13).min(size - off) as usize;
            run.resize(n, 0);
            let _ = q.read_at(&mut run, off);
        }
    }
}

/// `check`, then repair everything (as `rimg check -r all`). When the
/// repair reports a consistent image, that must hold on disk: a fresh
/// open finds no corruption, and stays consistent after writes.
pub fn check_repair(data: &[u8]) {
    let f = memfile(data);
    let again = f.try_clone().expect("dup of the memfd");
    let opts = Qcow2Options {
        repair: true,
        ..Default::default()
    };
    let Some(q) = open_file(f, true, opts) else {
        return;
    };
    if q.check().is_err() {
        return;
    }
    let Ok(rep) = q.check_repair(Repair::All) else {
        return;
    };
    drop(q);
    if rep.corruptions != 0 {
        return;
    }
    let Some(q) = open_file(again, true, Qcow2Options::default()) else {
        panic!("a repaired image does not open");
    };
    let rep = q.check().expect("checking a repaired image");
    assert_eq!(
        rep.corruptions, 0,
        "repair reported a consistent image, a fresh check disagrees: {:?}",
        rep.messages
    );
    // Written and flushed, the repaired image stays consistent.
    let size = q.size();
    let cs = q.cluster_size();
    let data = vec![0xa5u8; (2 * cs) as usize];
    for off in [0, size / 2, size.saturating_sub(cs / 2)] {
        let n = (data.len() as u64).min(size - off.min(size)) as usize;
        if n > 0 {
            let _ = q.write_at(&data[..n], off);
        }
    }
    if q.flush().is_err() {
        return;
    }
    let rep = q.check().expect("checking a repaired image after writes");
    let harmful: Vec<&String> = rep
        .messages
        .iter()
        .filter(|m| m.starts_with("ERROR") && !copied_clear_on_single_ref(m))
        .collect();
    assert!(
        harmful.is_empty(),
        "writes to a repaired image corrupted it: {harmful:?}"
    );
}

/// Persistent dirty bitmaps: the extension, directory and tables are
/// parsed from hostile bytes; a writable open either refuses the image or
/// keeps its bitmaps valid: after writes, edits and the store at close,
/// the image opens again, its directory parses and every consistent
/// bitmap's table holds. Also where the refcounts count bitmap structures
/// as free and new data lands on them: the content of a bitmap is in
/// memory from the open on, and the directory is protected like the
/// other metadata.
pub fn bitmaps(data: &[u8]) {
    use crate::bitmap::track::{read_directory, read_table};
    let f = memfile(data);
    let again = f.try_clone().expect("dup of the memfd");
    let ro = f.try_clone().expect("dup of the memfd");
    if let Some(q) = open_file(ro, false, Qcow2Options::default()) {
        if let Ok(Some((_, dir))) = read_directory(q.storage(), &q.header()) {
            for d in &dir {
                let _ = read_table(q.storage(), d, q.cluster_size());
            }
        }
        let _ = q.check();
    }
    let Some(q) = open_file(f, true, Qcow2Options::default()) else {
        return;
    };
    let size = q.size();
    let cs = q.cluster_size();
    let buf = vec![0x5au8; cs as usize];
    for off in [0, size / 3, size.saturating_sub(1)] {
        let n = (buf.len() as u64).min(size.saturating_sub(off)) as usize;
        if n > 0 {
            let _ = q.write_at(&buf[..n], off);
        }
    }
    let _ = q.discard(0, size.min(4 * cs));
    if let Some(t) = q.bitmap_tracker() {
        let _ = t.add(&q, "fuzz", None, false);
        let _ = t.clear("fuzz");
    }
    if q.store_bitmaps().is_err() || q.flush().is_err() {
        return;
    }
    drop(q);
    let st = Storage::from_file(again, Path::new("fuzz-input.qcow2"), false);
    let q = Qcow2::open(st, None, Qcow2Options::default())
        .unwrap_or_else(|e| panic!("an image rimg stored bitmaps in does not open: {e}"));
    let dir = read_directory(q.storage(), &q.header())
        .expect("rimg stored a bitmap directory that does not parse")
        .map(|(_, d)| d)
        .unwrap_or_default();
    for d in dir.iter().filter(|d| !d.in_use()) {
        read_table(q.storage(), d, q.cluster_size())
            .expect("rimg stored a bitmap table that does not parse");
    }
}

/// Whether a check message reports an entry without COPIED whose cluster
/// has refcount 1. A write copies such a cluster needlessly, nothing
/// worse; it arises when the repair left two entries sharing a cluster
/// (refcount 2, COPIED clear, as snapshots share) and a write then copied
/// one of them away. qemu-img check counts it as a corruption all the
/// same, and so does `check`.
fn copied_clear_on_single_ref(m: &str) -> bool {
    if !m.starts_with("ERROR OFLAG_COPIED") || !m.ends_with(" refcount=1") {
        return false;
    }
    let entry = m
        .split_whitespace()
        .find_map(|w| {
            w.strip_prefix("l2_entry=")
                .or_else(|| w.strip_prefix("l1_entry="))
        })
        .and_then(|h| u64::from_str_radix(h, 16).ok());
    entry.is_some_and(|e| e & crate::l2::COPIED == 0)
}

/// A VDI image: opened read-only, its
/// block status walked, every data run read whole and through the split
/// data path (which must agree), the first bytes of every zero run read
/// (zeros), reads across block boundaries, then `check`. Whatever the
/// header claims, memory stays at about the input's size: map entries
/// past the end of the input are never held.
pub fn vdi(data: &[u8]) {
    use crate::foreign::vdi;
    let f = memfile(data);
    let rw = f.try_clone().expect("dup of the memfd");
    let st = Storage::from_file(f, Path::new("fuzz-input.vdi"), false);
    let Ok(img) = vdi::open(st) else {
        return;
    };
    let bs = vdi::BLOCK_SIZE;
    walk_foreign(&img, "vdi", false, false, |e, pos| {
        assert_ne!(
            e.kind,
            ExtentKind::Unallocated,
            "vdi has no unallocated ranges"
        );
        // Answers never cross a block.
        assert!(e.len <= bs);
        assert_eq!(pos / bs, (pos + e.len - 1) / bs, "status crosses a block");
    });
    let rep = img.layout().check();
    assert!(rep.corruptions as usize >= rep.messages.len().saturating_sub(1));
    // Where blocks are shared or lie over the header and map, one write
    // lands on another's bytes, as in QEMU: only sound images must read
    // back what was written.
    let sound = rep.corruptions == 0 && img.layout().areas_apart();
    drop(img);
    // Writes into the hostile image: pieces at the start, the middle and
    // the end of the disk read back (when the write succeeds), and
    // nothing panics or takes memory the image did not give.
    let rw = Storage::from_file(rw, Path::new("fuzz-input.vdi"), true);
    let img = vdi::open(rw).expect("a vdi image that opened read-only opens for writing");
    let size = img.size();
    for (k, off) in [0, size / 2, size.saturating_sub(3000)]
        .into_iter()
        .enumerate()
    {
        let n = 3000.min(size - off) as usize;
        let piece = vec![0xa0 + k as u8; n];
        if n > 0 && img.write_at(&piece, off).is_ok() {
            let mut back = vec![0u8; n];
            img.read_at(&mut back, off)
                .expect("a piece just written reads");
            assert!(
                !sound || back == piece,
                "a write at {off} does not read back"
            );
        }
    }
    let _ = img.write_zeroes(0, size.min(bs + 1), false);
    let _ = img.layout().check();
}

/// A VHD image, with each size calculation QEMU's `force_size_calc`
/// offers: opened read-only and walked
/// as [`vdi`] walks its image. A dynamic disk's data never crosses a block
/// (runs of holes may); a fixed disk is one run of data at the guest's
/// own offsets. The BAT is held only as far as the input goes.
pub fn vpc(data: &[u8]) {
    use crate::foreign::vpc::{self, SizeCalc};
    let f = memfile(data);
    let dup = || f.try_clone().expect("dup of the memfd");
    for calc in [SizeCalc::Auto, SizeCalc::Chs, SizeCalc::CurrentSize] {
        let st = Storage::from_file(dup(), Path::new("fuzz-input.vhd"), false);
        let Ok(img) = vpc::open(st, calc) else {
            continue;
        };
        assert!(img.size() <= vpc::MAX_SECTORS * 512, "more than 2040 GiB");
        let fixed = img.layout().footer().disk_type == vpc::TYPE_FIXED;
        assert_eq!(
            fixed,
            img.cluster_size().is_none(),
            "cluster size of {calc:?}"
        );
        let bs = img.layout().dynamic().map(|d| d.block_size);
        walk_foreign(&img, "vpc", false, false, |e, pos| match (bs, e.kind) {
            (_, ExtentKind::Unallocated) => panic!("vpc has no unallocated ranges"),
            (None, _) => {
                assert_eq!(e.offset, Some(pos), "fixed data not at its own offset");
                assert!(e.recurse, "fixed data does not ask the file");
            }
            (Some(bs), ExtentKind::Data) => {
                assert!(e.len <= bs);
                assert_eq!(pos / bs, (pos + e.len - 1) / bs, "data crosses a block");
            }
            _ => {}
        });
    }
    // Writes into the hostile image (last: they change the input):
    // pieces at the start, the middle and the end, a zeroing; blocks
    // placed over each other or over the metadata may clobber what was
    // written, as in QEMU, but nothing may panic or take memory the
    // image did not give.
    let rw = Storage::from_file(dup(), Path::new("fuzz-input.vhd"), true);
    let Ok(img) = vpc::open(rw, SizeCalc::Auto) else {
        return;
    };
    write_hostile(&img, 0xb0, 5 << 20);
}

/// Writes into a hostile image opened for writing: 3000-byte pieces at
/// the start, the middle and the end of the disk (filled from `fill`),
/// each read back, then a zeroing of the first `zero` bytes. Errors are
/// fine; a panic, a hang or a runaway allocation is not.
fn write_hostile(img: &dyn Image, fill: u8, zero: u64) {
    let size = img.size();
    for (k, off) in [0, size / 2, size.saturating_sub(3000)]
        .into_iter()
        .enumerate()
    {
        let n = 3000.min(size - off) as usize;
        if n > 0 && img.write_at(&vec![fill + k as u8; n], off).is_ok() {
            let _ = img.read_at(&mut vec![0u8; n], off);
        }
    }
    let _ = img.write_zeroes(0, size.min(zero), false);
}

/// A VMDK image: a sparse file or a descriptor. Its extent files come
/// from the input too: the file an extent line names is the input from
/// sector N on, N the name's length modulo 64 (so a descriptor can name
/// sparse extents placed after it). Opened read-only and walked as [`vdi`] walks its image (block status may fail
/// where a grain directory cannot place a grain, as QEMU's does). In a
/// sparse file every answer stays within one grain; zeroed and
/// unallocated grains have no offset. Then `check`, when the disk has at
/// most 2^22 grains and 2^16 grain tables (it visits every grain of an
/// allocated table, as QEMU's does, reading each table: millions of them
/// would stall the fuzzer). Grain directories are held only as far as the
/// input goes. Then, opened for writing, written.
pub fn vmdk(data: &[u8]) {
    use crate::foreign::vmdk;
    use std::collections::HashMap;
    let f = memfile(data);
    let dup = |f: &File| f.try_clone().expect("dup of the memfd");
    // One memfd per start: lines naming the same one share its inode.
    let files = std::cell::RefCell::new(HashMap::<usize, File>::new());
    let opener = |p: &Path, _| {
        // At most 64 files: a line of any length names one of them.
        let k = (p.as_os_str().len() % 64 * 512).min(data.len());
        let mut files = files.borrow_mut();
        let f = files.entry(k).or_insert_with(|| memfile(&data[k..]));
        // Thousands of lines run out of descriptors: an error, as QEMU's.
        let f = f.try_clone().map_err(|e| crate::Error::io("dup", e))?;
        Ok(Storage::from_file(f, p, false))
    };
    let st = Storage::from_file(dup(&f), Path::new("fuzz-input.vmdk"), false);
    let Ok(img) = vmdk::open(st, &opener) else {
        return;
    };
    assert!(img.size() < 1 << 63, "past QEMU's largest disk");
    let l = img.layout();
    let compressed = l.compressed();
    let one_file = l.extent_files().is_empty();
    let grain = img.cluster_size();
    if let Some(g) = grain {
        assert!(g > 0 && g <= vmdk::MAX_GRAIN_SECTORS * 512);
    }
    walk_foreign(&img, "vmdk", true, compressed, |e, pos| {
        if let (true, Some(grain)) = (one_file, grain) {
            assert!(e.len <= grain);
            assert_eq!(
                pos / grain,
                (pos + e.len - 1) / grain,
                "status crosses a grain"
            );
        }
        if e.kind != ExtentKind::Data {
            assert_eq!(e.offset, None, "a hole with an offset");
        }
    });
    let (mut grains, mut tables) = (0u64, 0u64);
    for h in l.sparse_headers() {
        grains += h.capacity / h.grain;
        tables += h.capacity / (h.grain * h.gtes_per_gt as u64).max(1);
    }
    if grains <= 1 << 22 && tables <= 1 << 16 {
        if let Ok(rep) = l.check(img.storage()) {
            assert!(rep.failed.is_none() || rep.messages.len() == 1);
            assert_eq!(rep.corruptions, rep.failed.is_some() as u64);
        }
    }
    drop(img);
    // Writes into the hostile image (last: they change the input). Only
    // a monolithicSparse file opens for writing; tables placed over each
    // other may clobber what was written, as in QEMU, but nothing may
    // panic or take memory the image did not give.
    let rw = Storage::from_file(dup(&f), Path::new("fuzz-input.vmdk"), true);
    let no_extents = |_: &Path, _| -> crate::Result<Storage> {
        Err(crate::Error::Format("no extent files here".into()))
    };
    let Ok(img) = vmdk::open(rw, &no_extents) else {
        return;
    };
    write_hostile(&img, 0xc0, 1 << 20);
}

/// A VHDX image. Checksums the input leaves 0 (the two headers', the
/// region table's) are filled in first, so that mutations reach what
/// they guard; a mutated non-zero checksum tests the checksums. Opened
/// read-only both ways (as qemu-img check opens it, and not); block
/// status is all data; reads sampled at block boundaries must agree with
/// the split data path (or both fail); then `check`. Then, opened for
/// writing, written.
pub fn vhdx(data: &[u8]) {
    use crate::foreign::{crc32c::crc32c_without, vhdx};
    let mut d = data.to_vec();
    for (at, len) in [(0x10000usize, 4096usize), (0x20000, 4096), (0x30000, 65536)] {
        if d.len() >= at + len && d[at + 4..at + 8] == [0; 4] {
            let c = crc32c_without(&d[at..at + len], 4);
            d[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
        }
    }
    let f = memfile(&d);
    let dup = || f.try_clone().expect("dup of the memfd");
    for for_check in [false, true] {
        let st = Storage::from_file(dup(), Path::new("fuzz-input.vhdx"), false);
        let Ok(img) = vhdx::open(st, for_check) else {
            continue;
        };
        let size = img.size();
        assert!(size < 1 << 63 && size % 512 == 0, "size {size}");
        let bs = img.cluster_size().expect("a block size");
        assert!((1 << 20..=256 << 20).contains(&bs) && bs.is_power_of_two());
        if size > 0 {
            let e = img.block_status(0, size).expect("block status");
            assert_eq!((e.len, e.offset), (size, None), "all data, no offset");
        }
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        let blocks = size.div_ceil(bs);
        let spots = blocks.clamp(1, 64);
        for k in 0..blocks.min(64) {
            // Spread over the disk: the first, the last, and between.
            let blk = k * blocks / spots;
            for off in [blk * bs, blk * bs + bs - 4096, blk * bs + 1000] {
                if off >= size {
                    continue;
                }
                let n = 4096.min(size - off) as usize;
                let direct = img.read_at(&mut a[..n], off);
                let mapped = img.map_read(off, n as u64).and_then(|(m, got)| {
                    let got = (got as usize).min(n);
                    img.read_mapped(m, &mut b[..got], off).map(|()| got)
                });
                match (direct, mapped) {
                    (Ok(()), Ok(got)) => assert!(a[..got] == b[..got], "reads differ at {off}"),
                    (Err(_), Err(_)) => {}
                    // A read that runs on into a block QEMU cannot read.
                    (Err(_), Ok(got)) => assert!(got < n, "only the mapped read failed at {off}"),
                    (Ok(()), Err(e)) => panic!("the mapped read failed at {off}: {e}"),
                }
            }
        }
        let rep = img.layout().check(img.storage()).expect("check");
        assert_eq!(rep.check_errors, 0);
    }
    let rw = Storage::from_file(dup(), Path::new("fuzz-input.vhdx"), true);
    let Ok(img) = vhdx::open(rw, false) else {
        return;
    };
    write_hostile(&img, 0xd0, 3 << 20);
}

/// The walk [`vdi`], [`vpc`] and [`vmdk`] share: block status over the disk (each
/// answer also judged by `check`, given the answer and where it starts),
/// data runs read whole and through map_read/read_mapped (which must
/// agree), the first bytes of zero runs (zeros), then unaligned reads
/// across 1 MiB boundaries near the start and the end. Only compressed
/// data (`compressed`: VMDK streams) may fail to read (QEMU's EINVAL for
/// a grain it cannot inflate), and then both ways.
fn walk_foreign<L: crate::foreign::Layout>(
    img: &crate::foreign::ForeignImage<L>,
    what: &str,
    status_may_fail: bool,
    compressed: bool,
    check: impl Fn(&crate::image::Extent, u64),
) {
    let size = img.size();
    assert_eq!(size % 512, 0, "the disk size is whole sectors");
    let mut budget = Budget::new();
    let mut whole = Vec::new();
    let mut mapped = Vec::new();
    let mut pos = 0;
    'walk: while pos < size && budget.take(0) {
        let e = match img.block_status(pos, size - pos) {
            Ok(e) => e,
            // VMDK: a grain its directory cannot place (QEMU's EIO).
            Err(_) if status_may_fail => break 'walk,
            Err(e) => panic!("{what} block status failed inside the disk: {e}"),
        };
        assert!(e.len > 0 && e.len <= size - pos);
        check(&e, pos);
        match e.kind {
            ExtentKind::Data => {
                assert_eq!(
                    e.compressed, compressed,
                    "compressed data where there is none"
                );
                assert_eq!(
                    e.offset.is_some(),
                    !e.compressed,
                    "data without a host offset"
                );
                // At most 1 MiB of each run: a fixed disk is one run.
                let n = e.len.min(1 << 20);
                if !budget.take(2 * n) {
                    break 'walk;
                }
                whole.resize(n as usize, 0);
                mapped.resize(n as usize, 0);
                let (m, got) = img.map_read(pos, n).expect("mapping data");
                assert_eq!(got, n, "map_read and block_status disagree");
                match (
                    img.read_at(&mut whole, pos),
                    img.read_mapped(m, &mut mapped, pos),
                ) {
                    (Ok(()), Ok(())) => assert!(
                        whole == mapped,
                        "read_at and read_mapped differ at {pos:#x}"
                    ),
                    (Err(_), Err(_)) if e.compressed => {}
                    // Past QEMU's largest offset (a VMDK flat extent's):
                    // EIO, as its block layer answers.
                    (Err(_), Err(_))
                        if e.offset
                            .is_some_and(|o| o.saturating_add(n) > crate::foreign::MAX_OFFSET) => {}
                    (a, b) => panic!("reading {what} data: {a:?} directly, {b:?} mapped"),
                }
            }
            // No backing file here: unallocated reads as zeros too.
            ExtentKind::Zero | ExtentKind::Unallocated => {
                let k = e.len.min(4096) as usize;
                whole.resize(k, 1);
                img.read_at(&mut whole, pos)
                    .unwrap_or_else(|e| panic!("reading a {what} hole: {e}"));
                assert!(
                    whole.iter().all(|&b| b == 0),
                    "a hole at {pos:#x} is not zeros"
                );
            }
        }
        pos += e.len;
    }
    // Unaligned reads across 1 MiB boundaries, near the start and end.
    let mib = 1u64 << 20;
    for off in [mib - 7, 2 * mib - 1, size.saturating_sub(mib + 3)] {
        if off < size {
            let n = (mib + 13).min(size - off) as usize;
            whole.resize(n, 0);
            let r = img.read_at(&mut whole, off);
            if !compressed {
                r.unwrap_or_else(|e| panic!("reading across {what} blocks: {e}"));
            }
        }
    }
}
