//! The snapshot table's extra data and size limits, after QEMU's iotest
//! 261, with qemu-img as the judge: entries written for version 2 without
//! the disk size are completed (image size, icount -1) when rimg upgrades
//! the image or repairs it, and a table over QEMU's 64 MiB limit is
//! refused and repaired by `check -r all` as qemu-img repairs it; a
//! table of many entries lists as qemu-img lists it.

use std::os::unix::fs::FileExt;
use std::path::Path;

use rimg_tests::{
    assert_qemu_check_clean, qemu_create, qemu_img, run, run_ok as ok, tempdir, workspace_bin,
};

const SIZE: u64 = 64 << 20;

fn peek(p: &Path, off: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    b
}

fn be(p: &Path, off: u64, n: usize) -> u64 {
    peek(p, off, n).iter().fold(0, |a, &b| a << 8 | b as u64)
}

fn poke(p: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// One snapshot table entry as the file holds it.
struct Entry {
    fixed: Vec<u8>,
    extra: Vec<u8>,
    names: Vec<u8>,
}

fn entries(p: &Path) -> Vec<Entry> {
    let mut off = be(p, 64, 8);
    (0..be(p, 60, 4))
        .map(|_| {
            let fixed = peek(p, off, 40);
            let id = u16::from_be_bytes([fixed[12], fixed[13]]) as usize;
            let name = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
            let extra_len = u32::from_be_bytes(fixed[36..40].try_into().unwrap()) as usize;
            let extra = peek(p, off + 40, extra_len);
            let names = peek(p, off + 40 + extra_len as u64, id + name);
            off = (off + 40 + (extra_len + id + name) as u64).next_multiple_of(8);
            Entry {
                fixed,
                extra,
                names,
            }
        })
        .collect()
}

/// Rewrites the table in place (it only shrinks here) with entry `i`'s
/// extra data cut to `lens[i]` bytes, as an older writer left it.
fn cut_extra_data(p: &Path, lens: &[usize]) {
    let mut raw = Vec::new();
    for (e, &len) in entries(p).iter().zip(lens) {
        raw.extend_from_slice(&e.fixed[..36]);
        raw.extend_from_slice(&(len as u32).to_be_bytes());
        raw.extend_from_slice(&e.extra[..len]);
        raw.extend_from_slice(&e.names);
        raw.resize(raw.len().next_multiple_of(8), 0);
    }
    poke(p, be(p, 64, 8), &raw);
}

/// (disk size, icount) of each entry; None where the entry lacks it.
fn sizes(p: &Path) -> Vec<(Option<u64>, Option<u64>)> {
    let field = |e: &Entry, at: usize| {
        (e.extra.len() >= at + 8)
            .then(|| u64::from_be_bytes(e.extra[at..at + 8].try_into().unwrap()))
    };
    entries(p)
        .iter()
        .map(|e| (field(e, 8), field(e, 16)))
        .collect()
}

fn virtual_size(p: &Path) -> u64 {
    let out = ok("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// A version 2 image with snapshots sn0 (no extra data), sn1 (complete)
/// and sn2 (only the 64-bit VM state size), as 261 builds it.
fn v2_with_short_entries(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("v2.qcow2");
    let p = img.to_str().unwrap();
    qemu_create(p, "compat=0.10", "64M");
    for sn in ["sn0", "sn1", "sn2"] {
        ok("qemu-img", &["snapshot", "-c", sn, p]);
    }
    cut_extra_data(&img, &[0, 24, 8]);
    assert_qemu_check_clean(&img);
    assert_eq!(
        sizes(&img),
        vec![(None, None), (Some(SIZE), Some(0)), (None, None)]
    );
    img
}

#[test]
fn upgrade_completes_short_snapshot_entries() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    let img = v2_with_short_entries(dir.path());
    let p = img.to_str().unwrap();
    ok(rimg, &["amend", "-o", "compat=1.1", p]);
    // Version 3 requires the disk size in every entry: qemu-img check
    // calls an entry without it incomplete.
    assert_qemu_check_clean(&img);
    let want = vec![
        (Some(SIZE), Some(u64::MAX)),
        (Some(SIZE), Some(0)),
        (Some(SIZE), Some(u64::MAX)),
    ];
    assert_eq!(sizes(&img), want);
    // A snapshot made afterwards rewrites the table: the filled-in sizes
    // stay, and applying an old snapshot keeps the disk's size.
    ok(rimg, &["snapshot", "-c", "sn3", p]);
    assert_qemu_check_clean(&img);
    assert_eq!(sizes(&img)[..3], want[..]);
    ok("qemu-img", &["snapshot", "-a", "sn0", p]);
    assert_eq!(virtual_size(&img), SIZE);
    assert_qemu_check_clean(&img);
}

#[test]
fn snapshot_on_v2_writes_complete_entries() {
    // rimg writing a v2 table with short entries (snapshot -c) must not
    // invent a disk size of 0 for them either.
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    let img = v2_with_short_entries(dir.path());
    let p = img.to_str().unwrap();
    ok(rimg, &["snapshot", "-c", "sn3", p]);
    assert_qemu_check_clean(&img);
    ok("qemu-img", &["amend", "-o", "compat=1.1", p]);
    ok("qemu-img", &["snapshot", "-a", "sn2", p]);
    assert_eq!(virtual_size(&img), SIZE);
    assert_eq!(sizes(&img)[0], (Some(SIZE), Some(u64::MAX)));
}

#[test]
fn check_repairs_incomplete_entries_of_v3() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    let img = v2_with_short_entries(dir.path());
    let p = img.to_str().unwrap();
    // Made version 3 behind the tools' backs (261's "botched v3").
    poke(&img, 4, &3u32.to_be_bytes());
    poke(&img, 100, &104u32.to_be_bytes());
    poke(&img, 96, &4u32.to_be_bytes());
    let judge = qemu_img(&["check", p]);
    assert_eq!(judge.status.code(), Some(2), "qemu-img sees the damage");
    let o = run(rimg, &["check", p]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "rimg check: {err}");
    assert!(
        err.contains("ERROR snapshot table entry 0 is incomplete")
            && err.contains("ERROR snapshot table entry 2 is incomplete"),
        "{err}"
    );
    let o = run(rimg, &["check", "-r", "all", p]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("    2 corruptions"), "{out}");
    assert_qemu_check_clean(&img);
    assert_eq!(sizes(&img)[0], (Some(SIZE), Some(u64::MAX)));
    assert_eq!(sizes(&img)[2], (Some(SIZE), Some(u64::MAX)));
}

/// Marks clusters [first, end) allocated in refcount block 0 (16-bit).
fn allocate(p: &Path, first: u64, end: u64) {
    let reftable = be(p, 48, 8);
    let block = be(p, reftable, 8);
    for c in first..end {
        poke(p, block + c * 2, &1u16.to_be_bytes());
    }
}

#[test]
fn table_over_the_limit_is_refused_and_repaired() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    let img = dir.path().join("big.qcow2");
    let p = img.to_str().unwrap();
    qemu_create(p, "", "64M");
    // Entries of 1 KiB extra data and 64 KiB ID and name each, at 1 MiB,
    // until the table passes 64 MiB (261's "Snapshot table too big").
    let mut entry = vec![0u8; 40];
    entry[12..14].copy_from_slice(&u16::MAX.to_be_bytes());
    entry[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    entry[36..40].copy_from_slice(&1024u32.to_be_bytes());
    let entry_len = (40 + 1024 + 2 * 65535u64).next_multiple_of(8);
    let table = 1u64 << 20;
    let mut count = 0u64;
    while count * entry_len <= 64 << 20 {
        poke(&img, table + count * entry_len, &entry);
        count += 1;
    }
    let end = table + count * entry_len;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(end)
        .unwrap();
    poke(&img, 64, &table.to_be_bytes());
    poke(&img, 60, &(count as u32).to_be_bytes());
    allocate(&img, table >> 16, end.div_ceil(1 << 16));

    let judge = qemu_img(&["info", p]);
    assert!(!judge.status.success(), "qemu-img refuses the table");
    let o = run(rimg, &["info", p]);
    assert!(
        !o.status.success(),
        "rimg opened a snapshot table over QEMU's limit"
    );
    let o = run(rimg, &["check", "-r", "all", p]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "rimg check -r all: {err}");
    assert!(
        err.contains("Discarding 1 overhanging snapshots (snapshot table is too big)"),
        "{err}"
    );
    assert_qemu_check_clean(&img);
    assert_eq!(be(&img, 60, 4), count - 1);
    let out = ok("qemu-img", &["snapshot", "-l", p]);
    assert_eq!(out.lines().count() as u64, 2 + count - 1, "{out}");
}

#[test]
fn a_table_of_many_entries_reads_as_qemu_reads_it() {
    // rimg reads the table through a window of 4 KiB: entries of every
    // length straddle its edges, and a name longer than the window is
    // read in pieces.
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    let img = dir.path().join("many.qcow2");
    let p = img.to_str().unwrap();
    qemu_create(p, "", "64M");
    for i in 0..40 {
        let name = format!("s{i}-{}", "n".repeat(i * 53 % 211));
        ok("qemu-img", &["snapshot", "-c", &name, p]);
    }
    ok("qemu-img", &["snapshot", "-c", &"L".repeat(5000), p]);
    let ours = ok(rimg, &["snapshot", "-l", p]);
    let theirs = ok("qemu-img", &["snapshot", "-l", p]);
    assert_eq!(ours.lines().count(), 2 + 41, "{ours}");
    assert_eq!(ours, theirs);
    let o = run(rimg, &["check", p]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
