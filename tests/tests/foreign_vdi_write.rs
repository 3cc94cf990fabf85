//! VDI images written by rimg as qemu-img writes them: `create` (its
//! options, refusals and words, and the same bytes but for the random
//! UUIDs), `convert -O vdi` and `dd -O vdi` (the same layout, block for
//! block), and the engine's own writes (odd offsets and lengths, zeroes,
//! and threads racing to allocate the same new blocks). Every image rimg
//! writes is checked clean and compared equal by qemu-img.

use std::path::Path;
use std::sync::Arc;

use qcow2::{Image, OpenOptions};
use rimg_tests::image::{open_rw, race_new_units, read_all, scattered_writes};
use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, qemu_img_in, same_as_qemu as same, tempdir,
    write_mixed_raw,
};

/// The header's two random UUIDs (the image's and its last snapshot's).
const UUIDS: std::ops::Range<usize> = 0x188..0x1a8;

/// `a` and `b` hold the same bytes but for the UUIDs, which are set
/// (random, version 4) in both.
fn same_but_uuids(a: &Path, b: &Path) {
    let (mut x, mut y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "{} vs {}: lengths",
        a.display(),
        b.display()
    );
    for img in [&x, &y] {
        let u = &img[UUIDS];
        assert!(u[0..16] != [0; 16] && u[16..32] != [0; 16], "a null UUID");
        assert_eq!(
            (u[7] >> 4, u[8] >> 6),
            (4, 2),
            "not a version 4 UUID (byte 7: LE fields)"
        );
    }
    x[UUIDS].fill(0);
    y[UUIDS].fill(0);
    let first = x.iter().zip(&y).position(|(p, q)| p != q);
    assert!(
        first.is_none(),
        "{} and {} differ at byte {first:?}",
        a.display(),
        b.display()
    );
}

#[test]
fn create_matches_qemu() {
    let d = tempdir();
    let dir = d.path();
    for (size, opts) in [
        ("0", ""),
        ("1", ""),
        ("3000001", ""),
        ("5M", "static=on"),
        ("1G", ""),
        ("1G", "static=yes"),
        ("3000001", "static=off,preallocation=full"),
        ("1M", "preallocation=falloc"),
    ] {
        let mut args = vec!["create", "-f", "vdi"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        // Made by qemu-img, then by rimg over it (same_as_qemu runs both).
        qemu_img_in(dir, &[&args[..], &["q.vdi", size]].concat());
        let (code, ..) = same(dir, &[&args[..], &["r.vdi", size]].concat());
        assert_eq!(code, Some(0), "{opts} {size}");
        same_but_uuids(&dir.join("q.vdi"), &dir.join("r.vdi"));
        assert_qemu_check_clean(&dir.join("r.vdi"));
        same(dir, &["info", "--output=json", "r.vdi"]);
    }
    qemu_img_in(dir, &["create", "-f", "qcow2", "base.qcow2", "1M"]);
    for args in [
        &["create", "-f", "vdi", "big.vdi", "3P"][..],
        &["create", "-f", "vdi", "-o", "static=maybe", "e.vdi", "1M"],
        &[
            "create",
            "-f",
            "vdi",
            "-o",
            "preallocation=metadata",
            "e.vdi",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vdi",
            "-o",
            "cluster_size=1M",
            "e.vdi",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vdi",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "e.vdi",
        ],
        &[
            "create",
            "-f",
            "raw",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "e.raw",
        ],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "cluster_size=1M",
            "e.raw",
            "1M",
        ],
        &["create", "-f", "vdi", "-o", "help", "e.vdi"],
        &["measure", "-O", "vdi", "--size", "5M"],
    ] {
        same(dir, args);
    }
    // As QEMU's vdi driver: the file its file layer made stays, empty.
    assert_eq!(std::fs::metadata(dir.join("big.vdi")).unwrap().len(), 0);
}

/// Converts `input` to VDI with `opts` by both tools; rimg's image must
/// be qemu-img's, block for block, check clean and equal to the input.
fn convert_both(dir: &Path, input: &str, opts: &[&str]) {
    let args = [&["convert", "-O", "vdi"], opts, &[input]].concat();
    qemu_img_in(dir, &[&args[..], &["q.vdi"]].concat());
    same(dir, &[&args[..], &["r.vdi"]].concat());
    same_but_uuids(&dir.join("q.vdi"), &dir.join("r.vdi"));
    assert_qemu_check_clean(&dir.join("r.vdi"));
    assert_qemu_compare_equal(&dir.join(input), &dir.join("r.vdi"));
    for cmd in ["info", "map"] {
        same(dir, &[cmd, "--output=json", "r.vdi"]);
    }
    same(dir, &["check", "r.vdi"]);
}

#[test]
fn convert_and_dd_lay_blocks_out_as_qemu() {
    let d = tempdir();
    let dir = d.path();
    // Not a whole number of blocks, nor of sectors.
    write_mixed_raw(&dir.join("in.raw"), (37 << 20) + 1000, 8);
    for opts in [&[][..], &["-o", "static=on"], &["-S", "0"]] {
        convert_both(dir, "in.raw", opts);
    }
    // From qcow2 (zero clusters, holes), and from a VDI rimg wrote.
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
    std::fs::rename(dir.join("r.vdi"), dir.join("again.vdi")).unwrap();
    convert_both(dir, "again.vdi", &[]);
    // Into an existing image (-n): what the target holds is overwritten.
    qemu_img_in(dir, &["convert", "-O", "vdi", "top.qcow2", "n.vdi"]);
    same(dir, &["convert", "-n", "-O", "vdi", "in.raw", "n.vdi"]);
    assert_qemu_check_clean(&dir.join("n.vdi"));
    assert_qemu_compare_equal(&dir.join("in.raw"), &dir.join("n.vdi"));
    // dd makes the target and copies in bs pieces.
    let dd = ["dd", "-O", "vdi", "bs=192k", "count=100", "if=in.raw"];
    qemu_img_in(dir, &[&dd[..], &["of=q.vdi"]].concat());
    same(dir, &[&dd[..], &["of=r.vdi"]].concat());
    same_but_uuids(&dir.join("q.vdi"), &dir.join("r.vdi"));
    assert_qemu_check_clean(&dir.join("r.vdi"));
    same(
        dir,
        &["compare", "-f", "vdi", "-F", "vdi", "q.vdi", "r.vdi"],
    );
}

/// Writes through the engine at odd offsets and lengths, zeroes among
/// them, against a model of the disk.
#[test]
fn engine_writes_read_back_and_check_clean() {
    let d = tempdir();
    let dir = d.path();
    let size = (9 << 20) + 512;
    for is_static in [false, true] {
        let path = dir.join(format!("w{is_static}.vdi"));
        let mut o = qcow2::CreateOptions {
            format: qcow2::Format::Vdi,
            size,
            ..Default::default()
        };
        o.foreign.is_static = is_static;
        qcow2::create(&path, &o).unwrap();
        let img = open_rw(&path);
        assert!(img.is_writable());
        let model = scattered_writes(img.as_ref(), 5);
        img.discard(0, 4096).unwrap();
        assert!(read_all(img.as_ref()) == model, "engine reads differ");
        assert!(matches!(
            img.resize(size * 2),
            Err(qcow2::Error::ResizeUnsupported)
        ));
        img.flush().unwrap();
        drop(img);
        let raw = dir.join("model.raw");
        std::fs::write(&raw, &model).unwrap();
        assert_qemu_check_clean(&path);
        assert_qemu_compare_equal(&raw, &path);
    }
}

/// Threads write interleaved 4 KiB pieces of the same new blocks, in
/// different orders: each block must be allocated once, holding every
/// thread's pieces.
#[test]
fn racing_writers_allocate_each_block_once() {
    const BLOCKS: u64 = 24;
    let d = tempdir();
    let path = d.path().join("race.vdi");
    for round in 0..4u64 {
        qcow2::create(
            &path,
            &qcow2::CreateOptions {
                format: qcow2::Format::Vdi,
                size: BLOCKS << 20,
                ..Default::default()
            },
        )
        .unwrap();
        let img: Arc<dyn Image> = open_rw(&path);
        race_new_units(&img, BLOCKS, 1 << 20, round);
        drop(img);
        assert_qemu_check_clean(&path);
        let file = std::fs::metadata(&path).unwrap().len();
        assert_eq!(
            file,
            1024 + (BLOCKS << 20),
            "round {round}: blocks allocated twice"
        );
    }
}

#[test]
fn read_only_opens_and_served_images_still_refuse_writes() {
    let d = tempdir();
    let dir = d.path();
    qemu_img_in(dir, &["create", "-f", "vdi", "x.vdi", "4M"]);
    qemu_img_in(
        dir,
        &["create", "-f", "vdi", "-o", "static=on", "s.vdi", "4M"],
    );
    let before = std::fs::read(dir.join("x.vdi")).unwrap();
    let img = qcow2::open(&dir.join("x.vdi"), &OpenOptions::default()).unwrap();
    assert!(!img.is_writable());
    let read_only = |r: qcow2::Result<()>| matches!(r, Err(qcow2::Error::ReadOnly));
    assert!(read_only(img.write_at(&[1; 512], 0)));
    assert!(read_only(img.write_zeroes(0, 512, true)));
    assert!(read_only(img.discard(0, 512)));
    assert!(read_only(img.resize(8 << 20)));
    assert!(img.clone().begin_write(0, 512).is_err());
    img.flush().unwrap();
    drop(img);
    assert!(std::fs::read(dir.join("x.vdi")).unwrap() == before);
    // qemu-img's words for what its vdi driver cannot do.
    for f in ["x.vdi", "s.vdi"] {
        same(dir, &["resize", f, "8M"]);
        same(dir, &["resize", "--shrink", f, "1M"]);
        same(dir, &["amend", "-o", "static=on", f]);
        for op in ["-c", "-a", "-d"] {
            same(dir, &["snapshot", op, "s1", f]);
        }
        same(dir, &["snapshot", "-l", f]);
        same(dir, &["amend", "-f", "raw", "-o", "size=1M", f]);
        same(dir, &["commit", f]);
    }
}

/// The block daemon's workers write where the split data path maps, which
/// a writable VDI image does not have: it is served read-only or not at
/// all, said before the socket is taken.
#[test]
fn block_daemon_refuses_to_write_vdi() {
    let d = tempdir();
    let dir = d.path();
    qemu_img_in(dir, &["create", "-f", "vdi", "x.vdi", "4M"]);
    let mut cmd = std::process::Command::new(rimg_tests::workspace_bin("rimg-vhost-blk"));
    cmd.arg("--socket")
        .arg(dir.join("blk.sock"))
        .arg("--image")
        .arg(dir.join("x.vdi"))
        .args(["--format", "vdi"]);
    let w = rimg_tests::run_watched(cmd, std::time::Duration::from_secs(60));
    assert!(!w.timed_out, "the daemon served a writable vdi image");
    let err = String::from_utf8_lossy(&w.stderr);
    assert_eq!(w.status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(
        err.contains("vdi images are served read-only (use --readonly)"),
        "{err}"
    );
    assert!(!dir.join("blk.sock").exists());
}
