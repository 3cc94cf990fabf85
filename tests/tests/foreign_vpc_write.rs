//! VHD (vpc) images written by rimg as qemu-img writes them: `create`
//! (dynamic and fixed, the CHS rounding, `force_size`, refusals and
//! words; the same bytes but for the timestamp, checksum and UUID),
//! `convert -O vpc` and `dd -O vpc` (the same blocks in the same places),
//! and the engine's own writes (odd offsets, a block whose sector bitmap
//! another writer left partial, threads racing to allocate the same new
//! blocks). qemu-img has no check for vpc: every image rimg writes is
//! compared by qemu-img with what was written.

use std::path::Path;
use std::sync::Arc;

use qcow2::{Image, OpenOptions};
use rimg_tests::image::{race_new_units, read_all, scattered_writes};
use rimg_tests::{qemu_img_in, same_as_qemu as same, tempdir, write_mixed_raw};

/// A footer's fields that differ from run to run: the timestamp, the
/// checksum, the UUID.
const VARYING: [std::ops::Range<usize>; 2] = [24..28, 64..84];

/// `a` and `b` hold the same bytes but for the varying footer fields (at
/// 0 in a dynamic image, and in the last sector).
fn same_but_stamps(a: &Path, b: &Path) {
    let (mut x, mut y) = (sample(a), sample(b));
    assert_eq!(
        x.len(),
        y.len(),
        "{} vs {}: lengths",
        a.display(),
        b.display()
    );
    for img in [&mut x, &mut y] {
        let mut copies = vec![img.len() - 512];
        if img.starts_with(b"conectix") && img.len() > 512 {
            copies.push(0);
        }
        for c in copies {
            let uuid = &img[c + 68..c + 84];
            assert!(uuid != [0; 16], "a null UUID");
            assert_eq!((uuid[6] >> 4, uuid[8] >> 6), (4, 2), "not a version 4 UUID");
            for r in VARYING {
                img[c + r.start..c + r.end].fill(0);
            }
        }
    }
    let first = x.iter().zip(&y).position(|(p, q)| p != q);
    assert!(
        first.is_none(),
        "{} and {} differ at byte {first:?}",
        a.display(),
        b.display()
    );
}

/// The file's bytes; of a file over 64 MiB (a fixed disk, sparse) only
/// its first and last MiB, with its length between.
fn sample(p: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len();
    if len <= 64 << 20 {
        return std::fs::read(p).unwrap();
    }
    // Head, length, tail: the footers stay first and last.
    let mut head = vec![0u8; 1 << 20];
    let mut tail = vec![0u8; 1 << 20];
    f.read_exact_at(&mut head, 0).unwrap();
    f.read_exact_at(&mut tail, len - (1 << 20)).unwrap();
    [head, len.to_le_bytes().to_vec(), tail].concat()
}

#[test]
fn create_matches_qemu() {
    let d = tempdir();
    let dir = d.path();
    let sizes = ["0", "1", "1000", "1M", "10M", "1G", "127G", "2040G"];
    for opts in [
        "",
        "force_size",
        "subformat=fixed",
        "subformat=fixed,force_size=on",
    ] {
        for size in sizes {
            if opts.contains("fixed") && size == "0" {
                // A 512-byte file QEMU cannot open: compared as bytes only.
                continue;
            }
            let mut args = vec!["create", "-f", "vpc"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            qemu_img_in(dir, &[&args[..], &["q.vhd", size]].concat());
            let (code, ..) = same(dir, &[&args[..], &["r.vhd", size]].concat());
            assert_eq!(code, Some(0), "{opts} {size}");
            same_but_stamps(&dir.join("q.vhd"), &dir.join("r.vhd"));
            same(dir, &["info", "-f", "vpc", "--output=json", "r.vhd"]);
        }
    }
    qemu_img_in(
        dir,
        &["create", "-f", "vpc", "-o", "subformat=fixed", "q.vhd", "0"],
    );
    same(
        dir,
        &["create", "-f", "vpc", "-o", "subformat=fixed", "r.vhd", "0"],
    );
    same_but_stamps(&dir.join("q.vhd"), &dir.join("r.vhd"));

    qemu_img_in(dir, &["create", "-f", "qcow2", "base.qcow2", "1M"]);
    for args in [
        &["create", "-f", "vpc", "e.vhd", "2041G"][..],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            "e.vhd",
            "2190433320961",
        ],
        &["create", "-f", "vpc", "-o", "subformat=foo", "e.vhd", "1M"],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "force_size=maybe",
            "e.vhd",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "noforce_size,subformat=dynamic",
            "e.vhd",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "force_size=yes,subformat=fixed",
            "e.vhd",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "preallocation=full",
            "e.vhd",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "cluster_size=1M",
            "e.vhd",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vpc",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "e.vhd",
        ],
        &["create", "-f", "vpc", "-o", "help", "e.vhd"],
        &["create", "-f", "vdi", "-o", "static", "e.vdi", "1M"],
        &["create", "-f", "raw", "-o", "nocow", "e.raw", "1M"],
        &["measure", "-O", "vpc", "--size", "5M"],
    ] {
        same(dir, args);
        // What a refusal leaves (QEMU's vpc driver leaves the file its
        // file layer made, empty).
        let left = |prog: &str| {
            let _ = std::fs::remove_file(dir.join("e.vhd"));
            rimg_tests::run_in(prog, dir, args);
            std::fs::metadata(dir.join("e.vhd")).map(|m| m.len()).ok()
        };
        let bin = rimg_tests::workspace_bin("rimg");
        assert_eq!(
            left("qemu-img"),
            left(bin.to_str().unwrap()),
            "{args:?}: the file left differs"
        );
    }
}

/// qemu-img compare finds `vhd` (read as vpc: a fixed one probes as
/// raw) equal to `input`.
fn equal_to(dir: &Path, input: &str, vhd: &str) {
    let o = rimg_tests::run_in("qemu-img", dir, &["compare", "-F", "vpc", input, vhd]);
    assert!(o.status.success(), "compare {input} {vhd}: {o:?}");
}

/// Converts `input` to VHD with `opts` by both tools: the same image but
/// for the stamps, equal to the input.
fn convert_both(dir: &Path, input: &str, opts: &[&str]) {
    let args = [&["convert", "-O", "vpc"], opts, &[input]].concat();
    qemu_img_in(dir, &[&args[..], &["q.vhd"]].concat());
    same(dir, &[&args[..], &["r.vhd"]].concat());
    same_but_stamps(&dir.join("q.vhd"), &dir.join("r.vhd"));
    equal_to(dir, input, "r.vhd");
    for cmd in ["info", "map"] {
        same(dir, &[cmd, "-f", "vpc", "--output=json", "r.vhd"]);
    }
    let du = |n: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir.join(n)).unwrap().blocks()
    };
    assert_eq!(
        du("q.vhd"),
        du("r.vhd"),
        "{opts:?}: not as sparse as qemu-img's"
    );
}

#[test]
fn convert_and_dd_place_blocks_as_qemu() {
    let d = tempdir();
    let dir = d.path();
    write_mixed_raw(&dir.join("in.raw"), (29 << 20) + 1000, 9);
    for opts in [
        &[][..],
        &["-S", "0"],
        &["-o", "subformat=fixed"],
        &["-o", "force_size=on"],
        &["-o", "subformat=fixed,force_size=on"],
    ] {
        convert_both(dir, "in.raw", opts);
    }
    qemu_img_in(dir, &["convert", "-O", "qcow2", "in.raw", "in.qcow2"]);
    qemu_img_in(
        dir,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "in.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    rimg_tests::qemu_io(
        &dir.join("top.qcow2"),
        &["write -z 0 3M", "write -P 0x5a 5M 100k"],
    );
    convert_both(dir, "top.qcow2", &[]);
    std::fs::rename(dir.join("r.vhd"), dir.join("again.vhd")).unwrap();
    convert_both(dir, "again.vhd", &["-o", "force_size=on"]);
    // Into an existing image (-n): its blocks are overwritten.
    qemu_img_in(dir, &["convert", "-O", "vpc", "top.qcow2", "n.vhd"]);
    same(dir, &["convert", "-n", "-O", "vpc", "in.raw", "n.vhd"]);
    equal_to(dir, "in.raw", "n.vhd");
    let dd = ["dd", "-O", "vpc", "bs=192k", "count=100", "if=in.raw"];
    qemu_img_in(dir, &[&dd[..], &["of=q.vhd"]].concat());
    same(dir, &[&dd[..], &["of=r.vhd"]].concat());
    same_but_stamps(&dir.join("q.vhd"), &dir.join("r.vhd"));
    same(
        dir,
        &["compare", "-f", "vpc", "-F", "vpc", "q.vhd", "r.vhd"],
    );
}

fn create(path: &Path, size: u64, subformat: &str) {
    let mut o = qcow2::CreateOptions {
        format: qcow2::Format::Vpc,
        size,
        ..Default::default()
    };
    o.foreign.subformat = Some(subformat.into());
    o.foreign.force_size = true;
    qcow2::create(path, &o).unwrap();
}

fn open_rw(path: &Path) -> Arc<dyn Image> {
    let o = OpenOptions {
        writable: true,
        format: Some(qcow2::Format::Vpc),
        ..Default::default()
    };
    qcow2::open(path, &o).unwrap()
}

/// Writes through the engine at odd offsets and lengths, zeroes among
/// them, against a model of the disk.
#[test]
fn engine_writes_read_back_as_qemu_reads_them() {
    let d = tempdir();
    let dir = d.path();
    let size = (9 << 20) + 512;
    for sub in ["dynamic", "fixed"] {
        let path = dir.join(format!("w-{sub}.vhd"));
        create(&path, size, sub);
        let img = open_rw(&path);
        let model = scattered_writes(img.as_ref(), 6);
        assert!(
            read_all(img.as_ref()) == model,
            "{sub}: engine reads differ"
        );
        assert!(matches!(
            img.resize(size * 2),
            Err(qcow2::Error::ResizeUnsupported)
        ));
        img.flush().unwrap();
        drop(img);
        let raw = dir.join("model.raw");
        std::fs::write(&raw, &model).unwrap();
        let out = rimg_tests::qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            "vpc",
            raw.to_str().unwrap(),
            path.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{sub}: qemu-img compare: {out:?}");
    }
}

/// A block whose sector bitmap is partial (as Virtual PC leaves them)
/// gets every bit set by the first write into it, as QEMU sets them, so
/// readers that honour bitmaps see the new data.
#[test]
fn a_write_marks_its_block_present() {
    let d = tempdir();
    let dir = d.path();
    qemu_img_in(dir, &["create", "-f", "vpc", "b.vhd", "8M"]);
    rimg_tests::qemu_io(&dir.join("b.vhd"), &["write -P 0x61 2M 64k"]);
    let bitmap_at = {
        let f = std::fs::read(dir.join("b.vhd")).unwrap();
        // BAT entry 1 (big-endian sector number) at 1536 + 4.
        u32::from_be_bytes(f[1540..1544].try_into().unwrap()) as u64 * 512
    };
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("b.vhd"))
        .unwrap();
    f.write_all_at(&[0x80; 512], bitmap_at).unwrap();
    let img = open_rw(&dir.join("b.vhd"));
    img.write_at(&[0x62; 4096], (3 << 20) + 4096).unwrap();
    drop(img);
    let mut bitmap = [0u8; 512];
    std::fs::File::open(dir.join("b.vhd"))
        .unwrap()
        .read_exact_at(&mut bitmap, bitmap_at)
        .unwrap();
    assert!(bitmap.iter().all(|&b| b == 0xff), "bitmap left partial");
}

/// Threads write interleaved 4 KiB pieces of the same new blocks, in
/// different orders: each block is allocated once.
#[test]
fn racing_writers_allocate_each_block_once() {
    const BLOCKS: u64 = 12;
    const BLOCK: u64 = 2 << 20;
    let d = tempdir();
    let path = d.path().join("race.vhd");
    for round in 0..4u64 {
        create(&path, BLOCKS * BLOCK, "dynamic");
        let img = open_rw(&path);
        let got = race_new_units(&img, BLOCKS, BLOCK, round);
        drop(img);
        // Footer, header, one BAT sector, the blocks with their bitmaps,
        // the footer.
        let file = std::fs::metadata(&path).unwrap().len();
        assert_eq!(
            file,
            1536 + 512 + BLOCKS * (512 + BLOCK) + 512,
            "round {round}: blocks allocated twice"
        );
        std::fs::write(d.path().join("want.raw"), &got).unwrap();
        equal_to(d.path(), "want.raw", "race.vhd");
    }
}

#[test]
fn what_qemu_cannot_do_to_vpc_is_refused_in_its_words() {
    let d = tempdir();
    let dir = d.path();
    qemu_img_in(dir, &["create", "-f", "vpc", "x.vhd", "4M"]);
    qemu_img_in(
        dir,
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            "s.vhd",
            "4M",
        ],
    );
    let before = std::fs::read(dir.join("x.vhd")).unwrap();
    let img = qcow2::open(&dir.join("x.vhd"), &OpenOptions::default()).unwrap();
    assert!(matches!(
        img.write_at(&[1; 512], 0),
        Err(qcow2::Error::ReadOnly)
    ));
    drop(img);
    assert!(std::fs::read(dir.join("x.vhd")).unwrap() == before);
    for f in ["x.vhd", "s.vhd"] {
        for args in [
            &["resize", "-f", "vpc", f, "8M"][..],
            &["amend", "-f", "vpc", "-o", "force_size=on", f],
            &["snapshot", "-f", "vpc", "-c", "s1", f],
            &["snapshot", "-f", "vpc", "-l", f],
            &["commit", "-f", "vpc", f],
            &["check", "-f", "vpc", f],
            &["check", "-f", "vpc", "-r", "all", f],
        ] {
            same(dir, args);
        }
    }
}
