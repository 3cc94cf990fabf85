//! Persistent dirty bitmaps that do not hold, with qemu-img as the judge:
//! the same command on two copies of one damaged image, with rimg and
//! with qemu-img, must print the same and exit alike, and `qemu-img check`
//! must then say the same of both copies. (bitmaps.rs has the bitmaps
//! that hold.)

use std::path::{Path, PathBuf};
use std::process::Command;

use rimg_tests::{ok, qemu_create, qemu_img, qemu_io, tempdir, workspace_bin};

const BITMAPS_EXT: u32 = 0x2385_2875;

/// A 64 MiB image with an enabled bitmap `x` whose one table entry points
/// to a data cluster (QEMU wrote 64 KiB while it tracked).
fn base(dir: &Path) -> PathBuf {
    let img = dir.join("base.qcow2");
    qemu_create(&img, "", "64M");
    ok(qemu_img(&["bitmap", "--add", img.to_str().unwrap(), "x"]));
    qemu_io(&img, &["write 0 64k"]);
    img
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Offsets of the first bitmap's directory entry and of its table.
fn first_bitmap(f: &[u8]) -> (usize, usize) {
    let mut at = be32(f, 100) as usize;
    loop {
        let (kind, len) = (be32(f, at), be32(f, at + 4) as usize);
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == BITMAPS_EXT {
            let dir = be64(f, at + 8 + 16) as usize;
            return (dir, be64(f, dir) as usize);
        }
        at += 8 + len.next_multiple_of(8);
    }
}

/// A copy of `base` with `edit(file, directory entry, table)` applied.
fn damaged(base: &Path, name: &str, edit: impl Fn(&mut Vec<u8>, usize, usize)) -> PathBuf {
    let mut f = std::fs::read(base).unwrap();
    let (entry, table) = first_bitmap(&f);
    edit(&mut f, entry, table);
    let img = base.with_file_name(name);
    std::fs::write(&img, &f).unwrap();
    img
}

fn put32(f: &mut [u8], at: usize, v: u32) {
    f[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(f: &mut [u8], at: usize, v: u64) {
    f[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// (exit status, stdout, stderr) of `prog args` run in `dir` (so that
/// file names in messages are the same for both tools).
fn run_in(dir: &Path, prog: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let norm = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .replace("qemu-img: ", "PROG: ")
            .replace("rimg: ", "PROG: ")
    };
    (o.status.code(), norm(&o.stdout), norm(&o.stderr))
}

/// Runs each command (`t.qcow2` names the image) on a fresh copy of
/// `img` with both tools; both must behave alike, and leave copies that
/// `qemu-img check` judges alike.
fn same_as_qemu(img: &Path, cmds: &[&[&str]]) {
    let top = img.parent().unwrap();
    let rimg = workspace_bin("rimg");
    let qemu = PathBuf::from("qemu-img");
    for (k, cmd) in cmds.iter().enumerate() {
        let mut results = Vec::new();
        for (tag, prog) in [("r", &rimg), ("q", &qemu)] {
            let dir = top.join(format!("{tag}{k}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(img, dir.join("t.qcow2")).unwrap();
            let out = run_in(&dir, prog, cmd);
            let mut check = run_in(&dir, &qemu, &["check", "t.qcow2"]);
            // Where the new structures went is rimg's business (it writes
            // them before freeing the old ones).
            check.1 = check
                .1
                .lines()
                .filter(|l| !l.starts_with("Image end offset"))
                .collect();
            results.push((out, check));
        }
        assert_eq!(results[0].0, results[1].0, "{cmd:?} on {}", img.display());
        assert_eq!(
            results[0].1,
            results[1].1,
            "qemu-img check after {cmd:?} on {}",
            img.display()
        );
    }
}

/// Every command qemu-img refuses an image with a bitmap it cannot load
/// for: all of them, read-only opens and checks included.
const EVERY_OPEN: &[&[&str]] = &[
    &["info", "t.qcow2"],
    &["info", "-U", "t.qcow2"],
    &["check", "t.qcow2"],
    &["check", "-r", "all", "t.qcow2"],
    &["bitmap", "--clear", "t.qcow2", "x"],
    &["resize", "t.qcow2", "128M"],
    &["convert", "-O", "raw", "t.qcow2", "t.raw"],
];

#[test]
fn add_of_an_existing_name_is_refused_as_by_qemu_img() {
    let dir = tempdir();
    let img = base(dir.path());
    // Consistent and in-use (left by a killed writer) bitmaps alike.
    let in_use = damaged(&img, "inuse.qcow2", |f, e, _| put32(f, e + 12, 3));
    let dup: &[&[&str]] = &[
        &["bitmap", "--add", "t.qcow2", "x"],
        &["bitmap", "--add", "--disable", "t.qcow2", "x"],
        &["bitmap", "--add", "--add", "t.qcow2", "y"],
        &["bitmap", "--add", "-g", "1M", "t.qcow2", "x"],
    ];
    same_as_qemu(&img, dup);
    same_as_qemu(&in_use, dup);
}

#[test]
fn a_bitmap_beyond_qemus_limits_refuses_every_open() {
    let dir = tempdir();
    let img = base(dir.path());
    // Directory values QEMU refuses: a table over BME_MAX_TABLE_SIZE, one
    // over the physical size limit, a granularity over 2^31.
    for (name, at, v) in [
        ("max_table.qcow2", 8, 0x800_0001u32),
        ("phys.qcow2", 8, 0x2001),
    ] {
        let bad = damaged(&img, name, |f, e, _| put32(f, e + at, v));
        same_as_qemu(&bad, EVERY_OPEN);
    }
    let gran = damaged(&img, "gran.qcow2", |f, e, _| f[e + 17] = 40);
    same_as_qemu(&gran, EVERY_OPEN);
    // A reserved flag, an unknown type.
    let flag = damaged(&img, "flag.qcow2", |f, e, _| put32(f, e + 12, 6));
    same_as_qemu(&flag, EVERY_OPEN);
    let kind = damaged(&img, "type.qcow2", |f, e, _| f[e + 16] = 2);
    same_as_qemu(&kind, EVERY_OPEN);
    // The extension: more bitmaps than QEMU supports, a directory larger
    // than it allows.
    let ext = |f: &[u8]| {
        let mut at = be32(f, 100) as usize;
        while be32(f, at) != BITMAPS_EXT {
            at += 8 + (be32(f, at + 4) as usize).next_multiple_of(8);
        }
        at + 8
    };
    let many = damaged(&img, "many.qcow2", |f, _, _| {
        let at = ext(f);
        put32(f, at, 65536)
    });
    same_as_qemu(&many, EVERY_OPEN);
    let dir_size = damaged(&img, "dirsize.qcow2", |f, _, _| {
        let at = ext(f);
        put64(f, at + 8, 1024 * 65535 + 8)
    });
    same_as_qemu(&dir_size, EVERY_OPEN);
    // A table larger than the disk needs (within the limits): QEMU fails
    // to load the bitmap, and refuses the image.
    let big = damaged(&img, "big.qcow2", |f, e, _| put32(f, e + 8, 2));
    same_as_qemu(&big, EVERY_OPEN);
    // The library refuses it read-only too.
    let err = qcow2::open(&big, &qcow2::OpenOptions::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("Could not read bitmap 'x' from image: Invalid argument"),
        "{err}"
    );
}

#[test]
fn table_entry_with_reserved_bits_as_qemu_img() {
    let dir = tempdir();
    let img = base(dir.path());
    // Consistent bitmap: no open at all (qemu-img check exits 1).
    let bad = damaged(&img, "reserved.qcow2", |f, _, t| {
        let e = be64(f, t);
        put64(f, t, e | 2)
    });
    same_as_qemu(&bad, EVERY_OPEN);
    // In use: the image opens, the check fails ("Invalid argument").
    let in_use = damaged(&img, "reserved_in_use.qcow2", |f, e, t| {
        put32(f, e + 12, 3);
        let x = be64(f, t);
        put64(f, t, x | 2)
    });
    same_as_qemu(
        &in_use,
        &[
            &["info", "t.qcow2"],
            &["check", "t.qcow2"],
            &["check", "-r", "leaks", "t.qcow2"],
            &["check", "-r", "all", "t.qcow2"],
            &["bitmap", "--remove", "t.qcow2", "x"],
        ],
    );
}

#[test]
fn bitmap_structures_past_the_end_of_the_file_as_qemu_img() {
    let dir = tempdir();
    let img = base(dir.path());
    // A data cluster, and a whole table, past the end of the file: both
    // read as zeros; check reports them; a repair fixes the leaks.
    let data = damaged(&img, "data.qcow2", |f, _, t| put64(f, t, 0x1008_0000));
    let table = damaged(&img, "table.qcow2", |f, e, _| put64(f, e, 0x1000_0000));
    for bad in [&data, &table] {
        same_as_qemu(
            bad,
            &[
                &["info", "t.qcow2"],
                &["check", "t.qcow2"],
                // The repairs fix the leaks; the bitmaps are then stored
                // (as qemu-img's close stores them) without the stray
                // reference, whose clusters cannot be freed.
                &["check", "-r", "leaks", "t.qcow2"],
                &["check", "-r", "all", "t.qcow2"],
                &["bitmap", "--clear", "t.qcow2", "x"],
                &["bitmap", "--add", "t.qcow2", "y"],
                &["convert", "-O", "raw", "t.qcow2", "t.raw"],
            ],
        );
    }
}
