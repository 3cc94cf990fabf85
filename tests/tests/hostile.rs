//! Hostile input: thousands of truncated, bit-flipped, field-overwritten
//! and size-inflated qcow2, VDI, VHD and VMDK images, each opened
//! read-only and
//! read-write, read at scattered offsets, written, flushed and checked.
//! Every case must end in a result or an error: never a panic, never a
//! hang (10 s per case, detected by a channel timeout), never an
//! allocation past the bound.
//!
//! The bound: opening caps the L1 table at 32 MiB and the refcount table at
//! 8 MiB (QEMU's caps), the L2 and refcount-block caches hold at most 32 MiB
//! and 4 MiB, the snapshot table is capped at 64 MiB, and `check` keeps one
//! refcount per cluster of the file it can prove exists. With buffers for
//! one request on top, 256 MiB above the process's baseline is more than any
//! case may need; a case above it has an allocation driven by a hostile
//! field. A VDI image holds at most its file's bytes of block map, however
//! many blocks its header claims (entries past the end of the file are
//! zeros and are not held), and its check at most one entry per block
//! held plus a capped list of messages. A VHD image holds at most its
//! file's bytes of BAT, a VMDK image its file's bytes of grain directory
//! (grain tables are read per lookup), the same way.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use qcow2::OpenOptions;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rimg_tests::mutate::{
    mutate_vdi, mutate_vhdx, mutate_vmdk, mutate_vmdk_descriptor, mutate_vpc, scribble, truncate,
    BOUNDARY,
};
use rimg_tests::{qemu_img, run, tempdir};

/// Counts live heap bytes and the peak since the last reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates every call to the system allocator unchanged; the
// counters are plain atomics and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const BOUND: usize = 256 << 20;
const CASES_PER_SEED: usize = 160;

fn seeds(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let specs: &[(&str, &str, &[&str])] = &[
        (
            "v3-64k",
            "compat=1.1",
            &["write -P 0x11 0 200k", "write -P 0x12 3M 64k"],
        ),
        (
            "v2-4k",
            "compat=0.10,cluster_size=4096",
            &["write -P 0x21 0 100k", "write -P 0x22 2M 8k"],
        ),
        (
            "zlib-512",
            "cluster_size=512",
            &["write -c -P 0x31 0 4k", "write -P 0x32 1M 4k"],
        ),
        (
            "zstd",
            "compression_type=zstd",
            &["write -c -P 0x41 0 64k", "write -z 1M 64k"],
        ),
        (
            "rc1",
            "refcount_bits=1,cluster_size=4096",
            &["write -P 0x51 0 64k"],
        ),
        ("lazy", "lazy_refcounts=on", &["write -P 0x61 0 128k"]),
    ];
    let mut out = Vec::new();
    for (name, opts, cmds) in specs {
        let p = dir.join(format!("{name}.qcow2"));
        let ps = p.to_str().unwrap();
        assert!(
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, ps, "4M"])
                .status
                .success()
        );
        let mut args = Vec::new();
        for c in *cmds {
            args.extend(["-c", c]);
        }
        args.push(ps);
        assert!(run("qemu-io", &args).status.success());
        out.push((name.to_string(), std::fs::read(&p).unwrap()));
    }
    // An image with an internal snapshot and a backing file name.
    let p = dir.join("snap.qcow2");
    let ps = p.to_str().unwrap();
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", ps, "4M"])
        .status
        .success());
    assert!(run("qemu-io", &["-c", "write -P 0x71 0 128k", ps])
        .status
        .success());
    assert!(qemu_img(&["snapshot", "-c", "s1", ps]).status.success());
    assert!(run("qemu-io", &["-c", "write -P 0x72 64k 64k", ps])
        .status
        .success());
    out.push(("snap".into(), std::fs::read(&p).unwrap()));
    // VDI images (mutated by `mutate_vdi`): dynamic and static.
    let vdi = dir.join("vdi");
    rimg_tests::make_foreign(&vdi);
    for name in ["vdi-dynamic.vdi", "vdi-static.vdi"] {
        out.push((name.into(), std::fs::read(vdi.join(name)).unwrap()));
    }
    // VHD images (mutated by `mutate_vpc`, opened as vpc): dynamic, with
    // data in three of its four blocks, and fixed.
    for name in ["vpc-dynamic-6m.vhd", "vpc-fixed.vhd"] {
        out.push((name.into(), std::fs::read(vdi.join(name)).unwrap()));
    }
    // VMDK sparse files (mutated by `mutate_vmdk`, opened as vmdk):
    // grains at 0, 1M, 3M; zeroed grains; compressed grains (a stream).
    for name in ["vmdk-sparse.vmdk", "vmdk-zeroed.vmdk", "vmdk-stream.vmdk"] {
        out.push((name.into(), std::fs::read(vdi.join(name)).unwrap()));
    }
    // VHDX images (mutated by `mutate_vhdx`, opened as vhdx): dynamic
    // with present and zero blocks, and fixed.
    for name in ["vhdx-dynamic.vhdx", "vhdx-fixed.vhdx"] {
        out.push((name.into(), std::fs::read(vdi.join(name)).unwrap()));
    }
    // A VMDK descriptor (mutated as text by `mutate_vmdk_descriptor`):
    // flat, VMFS and sparse extents over the files above, named from
    // where the cases are written.
    let desc = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\n\nRW 2048 FLAT \"vdi/vmdk-flat-flat.vmdk\" 8\nRW 100 VMFS \"vdi/vmdk-short.raw\"\nRW 1 SPARSE \"vdi/vmdk-sparse.vmdk\"\nRW 1 SPARSE \"vdi/vmdk-stream.vmdk\"\n";
    out.push(("vmdk-desc.vmdk".into(), desc.as_bytes().to_vec()));
    out
}

/// The files the VMDK descriptor seed's mutations name.
const DESC_FILES: &[&str] = &[
    "vdi/vmdk-flat-flat.vmdk",
    "vdi/vmdk-sparse.vmdk",
    "vdi/vmdk-zeroed.vmdk",
    "vdi/vmdk-short.raw",
    "vdi/vmdk-2gsparse-s001.vmdk",
    "vdi",
    "case.qcow2",
    "/dev/zero",
    "nope",
];

/// Header fields (offset, width) worth aiming at (qcow2.rst, "Header").
const FIELDS: &[(usize, usize)] = &[
    (4, 4),   // version
    (8, 8),   // backing_file_offset
    (16, 4),  // backing_file_size
    (20, 4),  // cluster_bits
    (24, 8),  // size
    (32, 4),  // crypt_method
    (36, 4),  // l1_size
    (40, 8),  // l1_table_offset
    (48, 8),  // refcount_table_offset
    (56, 4),  // refcount_table_clusters
    (60, 4),  // nb_snapshots
    (64, 8),  // snapshots_offset
    (72, 8),  // incompatible_features
    (80, 8),  // compatible_features
    (88, 8),  // autoclear_features
    (96, 4),  // refcount_order
    (100, 4), // header_length
];

fn mutate(rng: &mut StdRng, img: &[u8]) -> Vec<u8> {
    let mut v = img.to_vec();
    match rng.random_range(0..6) {
        0 => {
            // Bit flips in the header cluster.
            for _ in 0..rng.random_range(1..=4) {
                let i = rng.random_range(0..512.min(v.len()));
                v[i] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            // A header field set to a boundary value.
            let (off, w) = FIELDS[rng.random_range(0..FIELDS.len())];
            let val = BOUNDARY[rng.random_range(0..BOUNDARY.len())];
            v[off..off + w].copy_from_slice(&val.to_be_bytes()[8 - w..]);
        }
        2 => {
            // Table entries (any 8-byte word past the header) set to a
            // boundary value or an offset inside or just past the file.
            for _ in 0..rng.random_range(1..=8) {
                let i = rng.random_range(1..v.len() / 8) * 8;
                let val = if rng.random_bool(0.5) {
                    BOUNDARY[rng.random_range(0..BOUNDARY.len())]
                } else {
                    rng.random_range(0..v.len() as u64 * 2) | (rng.random_range(0..4u64) << 62)
                };
                v[i..i + 8].copy_from_slice(&val.to_be_bytes());
            }
        }
        3 => scribble(rng, &mut v),
        4 => truncate(rng, &mut v),
        _ => {
            // Size inflation: virtual size, L1 size and table sizes grown
            // together, as a "consistent" hostile header would.
            let big = BOUNDARY[rng.random_range(6..BOUNDARY.len())];
            v[24..32].copy_from_slice(&big.to_be_bytes());
            let l1 = rng.random_range(0..=u32::MAX);
            v[36..40].copy_from_slice(&l1.to_be_bytes());
            let rt: u32 = rng.random_range(0..1 << 24);
            v[56..60].copy_from_slice(&rt.to_be_bytes());
        }
    }
    v
}

/// Everything a hostile image may be put through; errors are fine.
/// `format` None: probed.
fn exercise(path: &Path, rw_path: &Path, format: Option<qcow2::Format>) {
    let ro = OpenOptions {
        no_backing: true,
        format,
        ..Default::default()
    };
    if let Ok(img) = qcow2::open(path, &ro) {
        let size = img.size();
        let mut buf = vec![0u8; 65536];
        for k in 0..16u64 {
            if size == 0 {
                break;
            }
            let off = (k.wrapping_mul(0x9e37_79b9_7f4a_7c15)) % size;
            let n = (size - off).min(buf.len() as u64) as usize;
            let _ = img.read_at(&mut buf[..n], off);
        }
        let _ = img.block_status(0, size);
        if let Some(q) = img.as_qcow2() {
            let _ = q.check();
        }
        let _ = qcow2::foreign::check(img.as_ref());
    }
    let rw = OpenOptions {
        writable: true,
        no_backing: true,
        format,
        ..Default::default()
    };
    if let Ok(img) = qcow2::open(rw_path, &rw) {
        let size = img.size();
        if size > 0 {
            let data = vec![0x5au8; 70000];
            for k in 0..6u64 {
                let off = (k.wrapping_mul(0x2545_f491_4f6c_dd1d)) % size;
                let n = (size - off).min(data.len() as u64) as usize;
                let _ = match k % 3 {
                    0 => img.write_at(&data[..n], off),
                    1 => img.write_zeroes(off, n as u64, k % 2 == 0),
                    _ => img.discard(off, n as u64),
                };
            }
        }
        let _ = img.flush();
    }
}

#[test]
fn hostile_images_fail_cleanly() {
    let d = tempdir();
    let seeds = seeds(d.path());
    let case_path: PathBuf = d.path().join("case.qcow2");
    let rw_path: PathBuf = d.path().join("case-rw.qcow2");
    let mut cases = 0usize;
    let mut opened = 0usize;
    let mut vdi_opened = 0usize;
    let mut vpc_opened = 0usize;
    let mut vmdk_opened = 0usize;
    let mut desc_opened = 0usize;
    let mut vhdx_opened = 0usize;
    let mut worst = (0usize, String::new());
    for (si, (name, img)) in seeds.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(0x5eed + si as u64);
        // A fixed VHD probes as raw (as in QEMU): VHD seeds are opened
        // as vpc.
        let format = if name.ends_with(".vhd") {
            Some(qcow2::Format::Vpc)
        } else if name.ends_with(".vhdx") {
            Some(qcow2::Format::Vhdx)
        } else {
            name.ends_with(".vmdk").then_some(qcow2::Format::Vmdk)
        };
        for c in 0..CASES_PER_SEED {
            let m = if name.ends_with(".vdi") {
                mutate_vdi(&mut rng, img)
            } else if name.ends_with(".vhdx") {
                mutate_vhdx(&mut rng, img)
            } else if name == "vmdk-desc.vmdk" {
                mutate_vmdk_descriptor(&mut rng, img, DESC_FILES)
            } else if name.ends_with(".vmdk") {
                mutate_vmdk(&mut rng, img)
            } else if format.is_some() {
                mutate_vpc(&mut rng, img)
            } else {
                mutate(&mut rng, img)
            };
            std::fs::write(&case_path, &m).unwrap();
            std::fs::write(&rw_path, &m).unwrap();
            let label = format!("seed image {name}, case {c}");
            if qcow2::open(
                &case_path,
                &OpenOptions {
                    no_backing: true,
                    format,
                    ..Default::default()
                },
            )
            .is_ok_and(|i| {
                match i.format() {
                    qcow2::Format::Vdi => vdi_opened += 1,
                    qcow2::Format::Vpc => vpc_opened += 1,
                    qcow2::Format::Vhdx => vhdx_opened += 1,
                    qcow2::Format::Vmdk if name == "vmdk-desc.vmdk" => desc_opened += 1,
                    qcow2::Format::Vmdk => vmdk_opened += 1,
                    _ => {}
                }
                true
            }) {
                opened += 1;
            }
            let base = LIVE.load(Ordering::Relaxed);
            PEAK.store(base, Ordering::Relaxed);
            let (tx, rx) = mpsc::channel();
            let (p1, p2) = (case_path.clone(), rw_path.clone());
            let h = std::thread::spawn(move || {
                let r = std::panic::catch_unwind(|| exercise(&p1, &p2, format));
                let _ = tx.send(r.is_ok());
            });
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(true) => {}
                Ok(false) => panic!("{label}: panicked"),
                Err(_) => panic!("{label}: no result within 10 s (hang)"),
            }
            h.join().unwrap();
            let used = PEAK.load(Ordering::Relaxed).saturating_sub(base);
            if used > worst.0 {
                worst = (used, label.clone());
            }
            assert!(
                used <= BOUND,
                "{label}: allocated {} MiB, above the {} MiB bound",
                used >> 20,
                BOUND >> 20
            );
            cases += 1;
        }
    }
    assert!(cases >= 1000, "only {cases} cases");
    assert!(
        vdi_opened >= CASES_PER_SEED / 4,
        "only {vdi_opened} mutated VDI images opened: the mutations miss"
    );
    assert!(
        vpc_opened >= CASES_PER_SEED / 4,
        "only {vpc_opened} mutated VHD images opened: the mutations miss"
    );
    assert!(
        vmdk_opened >= CASES_PER_SEED / 4,
        "only {vmdk_opened} mutated VMDK images opened: the mutations miss"
    );
    assert!(
        vhdx_opened >= CASES_PER_SEED / 4,
        "only {vhdx_opened} mutated VHDX images opened: the mutations miss"
    );
    assert!(
        desc_opened >= CASES_PER_SEED / 4,
        "only {desc_opened} mutated VMDK descriptors opened: the mutations miss"
    );
    eprintln!(
        "{vdi_opened} VDI, {vpc_opened} VHD, {vmdk_opened} VMDK, {desc_opened} VMDK descriptor and {vhdx_opened} VHDX mutants opened"
    );
    eprintln!(
        "{cases} hostile images, {opened} opened; peak allocation {} KiB ({})",
        worst.0 >> 10,
        worst.1
    );
}

/// A bad L2 entry in the middle of a table fails the requests that start
/// on it, and only those: the run before it is reported whole, and the
/// entries after it map normally. (A bad entry used to fail the whole run
/// it ended, so a caller stepping past the error one cluster at a time
/// rescanned the table for every cluster: quadratic, seconds per image.)
#[test]
fn bad_l2_entry_ends_a_run_without_failing_it() {
    let dir = tempdir();
    let img = dir.path().join("bad-entry.qcow2");
    let p = img.to_str().unwrap();
    let cs = 65536u64;
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", p, "1G"])
        .status
        .success());
    rimg_tests::qemu_io(&img, &["write -P 0x11 6553600 64k"]); // cluster 100
    rimg_tests::qemu_io(&img, &["write -P 0x22 6619136 64k"]); // cluster 101
    let mut bytes = std::fs::read(&img).unwrap();
    let be = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let l1 = be(&bytes, 40) as usize;
    let l2 = (be(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let e = l2 + 100 * 8;
    let entry = be(&bytes, e);
    assert_ne!(entry, 0, "cluster 100 is allocated");
    // Host offset no longer cluster aligned.
    bytes[e..e + 8].copy_from_slice(&(entry + 0x1000).to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();

    let ro = OpenOptions {
        no_backing: true,
        ..Default::default()
    };
    let q = qcow2::open(&img, &ro).unwrap();
    let size = q.size();
    let first = q.block_status(0, size).unwrap();
    assert_eq!(first.kind, qcow2::ExtentKind::Unallocated);
    assert_eq!(first.len, 100 * cs, "the run before the bad entry");
    assert!(q.block_status(100 * cs, size - 100 * cs).is_err());
    let mut buf = vec![0u8; cs as usize];
    assert!(q.read_at(&mut buf, 100 * cs).is_err());
    let after = q.block_status(101 * cs, size - 101 * cs).unwrap();
    assert_eq!(after.kind, qcow2::ExtentKind::Data);
    assert_eq!(after.len, cs);
    q.read_at(&mut buf, 101 * cs).unwrap();
    assert!(buf.iter().all(|&b| b == 0x22));
    // A read spanning the bad cluster fails as a whole.
    assert!(q.read_at(&mut vec![0u8; 3 * cs as usize], 99 * cs).is_err());
}

/// QEMU reads a VMDK grain directory whole: up to 32 Mi entries, 128 MiB,
/// which the 256 MiB bound above cannot tell from clipping. A 720 KiB
/// file that claims the largest directory: opening, reading, block status
/// and check hold at most its in-file part (a few MiB).
#[test]
fn vmdk_grain_directory_is_held_only_inside_the_file() {
    let d = tempdir();
    rimg_tests::make_foreign(d.path());
    let mut v = std::fs::read(d.path().join("vmdk-sparse.vmdk")).unwrap();
    // One-sector grains, one per table: 32 Mi GD entries.
    v[20..28].copy_from_slice(&1u64.to_le_bytes());
    v[44..48].copy_from_slice(&1u32.to_le_bytes());
    v[12..20].copy_from_slice(&(32u64 << 20).to_le_bytes());
    let p = d.path().join("big-gd.vmdk");
    std::fs::write(&p, &v).unwrap();
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let ro = OpenOptions {
        no_backing: true,
        ..Default::default()
    };
    let img = qcow2::open(&p, &ro).unwrap();
    assert_eq!(img.size(), 16 << 30);
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, (16 << 30) - 65536).unwrap();
    let _ = img.block_status(0, img.size());
    let rep = qcow2::foreign::check(img.as_ref()).unwrap().unwrap();
    assert!(rep.failed.is_some(), "grains past the end of the file");
    let used = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    assert!(used < 8 << 20, "{} KiB held for a 128 MiB GD", used >> 10);
}
