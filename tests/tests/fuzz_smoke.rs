//! The fuzz targets (`qcow2::fuzz_targets`, which libFuzzer runs from
//! `fuzz/`) run deterministically in the normal test suite: over every
//! fixture (and the VDI, VHD and VMDK images `fixtures/make-foreign.sh`
//! makes), every committed regression input (`fuzz/regressions/`), and a
//! fixed number of seeded mutations aimed at the fixtures' metadata. No input may make
//! a target panic or fail one of its assertions, and none may take more
//! than 10 s.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use qcow2::fuzz_targets::TARGETS;
use qcow2::Header;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rimg_tests::mutate::BOUNDARY;

/// Mutations per fixture; each mutated image goes through every target.
/// `RIMG_FUZZ_SMOKE_MUTATIONS` overrides it for a longer (still seeded)
/// run.
fn mutations_per_fixture() -> usize {
    std::env::var("RIMG_FUZZ_SMOKE_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Files of a directory (sorted, so runs are reproducible), with names.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v.into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let all = files(&root().join("fixtures"));
    let images: Vec<_> = all
        .into_iter()
        .filter(|(n, _)| n.ends_with(".qcow2") || n.ends_with(".raw"))
        .collect();
    assert!(images.len() >= 10, "fixtures/ has too few images");
    images
}

/// The foreign-format images, made at test time (nothing binary is
/// committed for them).
fn foreign_fixtures() -> Vec<(String, Vec<u8>)> {
    let d = rimg_tests::tempdir();
    rimg_tests::make_foreign(d.path());
    // The images and descriptors, not the extent files beside them.
    let names = [
        rimg_tests::FOREIGN_VDI,
        rimg_tests::FOREIGN_VPC,
        rimg_tests::FOREIGN_VMDK,
        rimg_tests::FOREIGN_VMDK_DESCRIPTORS,
        &["vhdx-dynamic.vhdx"],
    ]
    .concat();
    names
        .iter()
        .map(|n| {
            let bytes = std::fs::read(d.path().join(n)).expect("make-foreign.sh image");
            (n.to_string(), bytes)
        })
        .collect()
}

/// Byte ranges of a VHD image's metadata: the footer at the start (a
/// dynamic disk's) and at the end, and a dynamic disk's header (at the
/// footer's data offset) and BAT (u32 per block at the header's table
/// offset).
fn vpc_metadata(img: &[u8]) -> Vec<Range<usize>> {
    let len = img.len();
    let mut out = vec![0..len.min(512), len.saturating_sub(512)..len];
    let be = |at: usize, w: usize| {
        img.get(at..at + w)
            .map(|b| b.iter().fold(0u64, |v, &x| v << 8 | x as u64) as usize)
    };
    if let Some(h) = be(16, 8).filter(|&h| h < len) {
        out.push(h..(h + 1024).min(len));
        if let (Some(bat), Some(n)) = (be(h + 16, 8), be(h + 28, 4)) {
            if bat < len {
                out.push(bat..(bat + 4 * n.max(1)).min(len));
            }
        }
    }
    out
}

/// Byte ranges of a VMDK sparse file's metadata: the header, the
/// embedded descriptor, the grain directory (at the header's GD sector,
/// one u32 per table) and the first grain table it names.
fn vmdk_metadata(img: &[u8]) -> Vec<Range<usize>> {
    let len = img.len();
    let mut out = vec![0..len.min(512), len.min(512)..len.min(1536)];
    let le = |at: usize| {
        img.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize * 512)
    };
    if let Some(gd) = le(56).filter(|&g| g > 0 && g < len) {
        out.push(gd..(gd + 512).min(len));
        if let Some(gt) = le(gd).filter(|&g| g > 0 && g < len) {
            out.push(gt..(gt + 2048).min(len));
        }
    }
    // A descriptor shorter than a sector is its first range.
    out.retain(|r| !r.is_empty());
    out
}

/// Byte ranges of a VDI image's metadata: the header and the block map
/// (u32 per MiB of disk at the header's map offset).
fn vdi_metadata(img: &[u8]) -> Vec<Range<usize>> {
    let len = img.len();
    let mut out = Vec::new();
    out.push(0..len.min(512));
    if len >= 0x184 {
        let le32 = |at: usize| u32::from_le_bytes(img[at..at + 4].try_into().unwrap()) as usize;
        let (map, blocks) = (le32(0x154), le32(0x180));
        if map < len {
            out.push(map..(map + 4 * blocks.max(1)).min(len));
        }
    }
    out
}

/// Byte ranges of an image's metadata (header cluster, L1 table, refcount
/// table and first blocks, snapshot table, first L2 tables): mutations
/// there reach the parsers; most other bytes are guest data.
fn metadata(img: &[u8]) -> Vec<Range<usize>> {
    let len = img.len();
    let mut out = Vec::new();
    out.push(0..len.min(4096));
    let Ok(h) = Header::parse(&img[..len.min(2 << 20)]) else {
        return out;
    };
    let cs = h.cluster_size() as usize;
    let clamp = |off: u64, n: usize| -> Option<Range<usize>> {
        let s = usize::try_from(off).ok().filter(|&s| s < len)?;
        Some(s..(s + n.max(8)).min(len))
    };
    let be64 = |at: usize| u64::from_be_bytes(img[at..at + 8].try_into().unwrap());
    let mut tables = Vec::new();
    if let Some(r) = clamp(h.l1_table_offset, h.l1_size as usize * 8) {
        // L2 tables named by the first L1 entries.
        for at in r.clone().step_by(8).take(4) {
            if at + 8 <= len {
                tables.extend(clamp(be64(at) & qcow2::l2::OFFSET_MASK, cs));
            }
        }
        tables.push(r);
    }
    if let Some(r) = clamp(h.refcount_table_offset, cs) {
        for at in r.clone().step_by(8).take(2) {
            if at + 8 <= len {
                tables.extend(clamp(be64(at) & !511, cs));
            }
        }
        tables.push(r);
    }
    if h.nb_snapshots > 0 {
        tables.extend(clamp(h.snapshots_offset, 512));
    }
    // The bitmap directory (its entries point at the bitmap tables).
    if let Ok(Some(e)) = qcow2::bitmap::BitmapsExt::from_header(&h) {
        tables.extend(clamp(e.directory_offset, 512));
    }
    out.extend(tables.into_iter().filter(|r| r.start >= 8));
    out
}

/// Header fields (offset, width), qcow2.rst "Header".
const FIELDS: &[(usize, usize)] = &[
    (4, 4),
    (8, 8),
    (16, 4),
    (20, 4),
    (24, 8),
    (32, 4),
    (36, 4),
    (40, 8),
    (48, 8),
    (56, 4),
    (60, 4),
    (64, 8),
    (72, 8),
    (80, 8),
    (88, 8),
    (96, 4),
    (100, 4),
];

fn mutate(rng: &mut StdRng, img: &[u8], regions: &[Range<usize>]) -> Vec<u8> {
    let mut v = img.to_vec();
    let r = regions[rng.random_range(0..regions.len())].clone();
    match rng.random_range(0..6) {
        0 => {
            for _ in 0..rng.random_range(1..=4) {
                let i = rng.random_range(r.clone());
                v[i] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            for _ in 0..rng.random_range(1..=16) {
                let i = rng.random_range(r.clone());
                v[i] = rng.random();
            }
        }
        2 => {
            // Table entries: boundary values, or offsets inside or just
            // past the file with flag bits (COPIED, compressed, zero).
            for _ in 0..rng.random_range(1..=4) {
                let i = rng.random_range(r.clone()) & !7;
                if i + 8 > v.len() {
                    continue;
                }
                let val = if rng.random_bool(0.4) {
                    BOUNDARY[rng.random_range(0..BOUNDARY.len())]
                } else {
                    let off = rng.random_range(0..v.len() as u64 * 2) & !0x1ff;
                    off | (rng.random_range(0..4u64) << 62) | rng.random_range(0..2u64)
                };
                v[i..i + 8].copy_from_slice(&val.to_be_bytes());
            }
        }
        3 if v.len() >= 104 => {
            let (off, w) = FIELDS[rng.random_range(0..FIELDS.len())];
            let val = BOUNDARY[rng.random_range(0..BOUNDARY.len())];
            v[off..off + w].copy_from_slice(&val.to_be_bytes()[8 - w..]);
        }
        4 => {
            let n = rng.random_range(r);
            v.truncate(n);
        }
        _ => {
            // 32-bit words (snapshot entries, refcounts, lengths).
            let i = rng.random_range(r) & !3;
            if i + 4 <= v.len() {
                let val = BOUNDARY[rng.random_range(0..BOUNDARY.len())] as u32;
                v[i..i + 4].copy_from_slice(&val.to_be_bytes());
            }
        }
    }
    v
}

/// Feeds every input to `run` as (label, bytes): regression inputs, then
/// each fixture and its mutations. Mutations are made one at a time, so
/// memory stays at one image and one mutant whatever the count.
fn for_each_case(mut run: impl FnMut(String, &[u8])) {
    for (target, _) in TARGETS {
        let dir = root().join("fuzz/regressions").join(target);
        for (n, b) in files(&dir) {
            run(format!("regression {target}/{n}"), &b);
        }
    }
    let qcow2_fixtures = fixtures().into_iter().map(|f| (f, false));
    let foreign = foreign_fixtures().into_iter().map(|f| (f, true));
    for (i, ((name, img), foreign)) in qcow2_fixtures.chain(foreign).enumerate() {
        let img = &img;
        run(format!("fixture {name}"), img);
        let regions = if foreign && name.ends_with(".vhd") {
            vpc_metadata(img)
        } else if foreign && name.ends_with(".vmdk") {
            vmdk_metadata(img)
        } else if foreign && name.ends_with(".vhdx") {
            // The BAT, the metadata table and its items (no checksum
            // covers them).
            vec![0x200000..0x200040, 0x300000..0x3000e0, 0x310000..0x310028]
        } else if foreign {
            vdi_metadata(img)
        } else {
            metadata(img)
        };
        let mut rng = StdRng::seed_from_u64(0xf022 + i as u64);
        for m in 0..mutations_per_fixture() {
            let mut v = mutate(&mut rng, img, &regions);
            if name.ends_with(".vhd") && m % 2 == 0 {
                // Past the footer's checksum, to the fields behind it.
                rimg_tests::seal_vhd_footers(&mut v);
            }
            run(format!("fixture {name}, mutation {m}"), &v);
        }
    }
}

/// With `RIMG_FUZZ_SMOKE_SAVE=DIR`, a failing input is written to DIR
/// (to replay with cargo fuzz, or to commit as a regression input).
fn save_failing(what: &str, input: &[u8]) {
    if let Some(dir) = std::env::var_os("RIMG_FUZZ_SMOKE_SAVE") {
        let name: String = what
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(Path::new(&dir).join(name), input).unwrap();
    }
}

#[test]
fn fuzz_targets_survive_fixtures_regressions_and_mutations() {
    // One worker runs the cases in order and reports each one it starts;
    // a case that reports nothing for 10 s is a hang.
    let (tx, rx) = mpsc::channel::<Result<String, String>>();
    let worker = std::thread::spawn(move || {
        let mut inputs = 0usize;
        for_each_case(|label, input| {
            inputs += 1;
            for (target, f) in TARGETS {
                let what = format!("{target} on {label}");
                let _ = tx.send(Ok(what.clone()));
                if catch_unwind(AssertUnwindSafe(|| f(input))).is_err() {
                    save_failing(&what, input);
                    let _ = tx.send(Err(what));
                }
            }
        });
        inputs
    });
    let mut failures = Vec::new();
    let mut runs = 0;
    let mut current = String::from("the first case");
    loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(what)) => {
                runs += 1;
                current = what;
            }
            Ok(Err(what)) => failures.push(what),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("{current}: no result within 10 s (hang)")
            }
        }
    }
    let n = worker.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {runs} target runs panicked:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(runs >= 4 * n, "only {runs} target runs for {n} inputs");
    eprintln!("{runs} target runs over {n} inputs, no panic");
}
