//! `rimg check` against `qemu-img check` on images with injected faults:
//! same exit codes and counts, and `rimg check -r all` leaves an image
//! that qemu-img finds clean with every readable cluster's data intact.

use std::os::unix::fs::FileExt;
use std::path::Path;

use qcow2::Header;
use rimg_tests::{
    assert_qemu_check_clean, qemu_img, qemu_raw_content, run, tempdir, workspace_bin,
};
use serde_json::Value;

const CS: u64 = 65536;

fn be64(f: &std::fs::File, off: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

fn put64(f: &std::fs::File, off: u64, v: u64) {
    f.write_all_at(&v.to_be_bytes(), off).unwrap();
}

/// Where things are in a freshly made test image.
struct Layout {
    /// Host offset of the refcount block covering clusters 0..32767.
    refblock: u64,
    /// Host offset of the first L2 table.
    l2: u64,
    file_len: u64,
}

fn layout(path: &Path) -> (std::fs::File, Layout) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut first = vec![0u8; CS as usize];
    f.read_exact_at(&mut first, 0).unwrap();
    let h = Header::parse(&first).unwrap();
    let refblock = be64(&f, h.refcount_table_offset) & !511;
    let l2 = be64(&f, h.l1_table_offset) & 0x00ff_ffff_ffff_fe00;
    let file_len = f.metadata().unwrap().len();
    (
        f,
        Layout {
            refblock,
            l2,
            file_len,
        },
    )
}

fn set_refcount(f: &std::fs::File, l: &Layout, cluster: u64, v: u16) {
    f.write_all_at(&v.to_be_bytes(), l.refblock + cluster * 2)
        .unwrap();
}

/// `tool ARGS`: its exit code and what it said (stdout, then stderr),
/// the image path `img` written as IMG.
fn said(tool: &str, args: &[&str], img: &str) -> (Option<i32>, String) {
    let o = run(tool, args);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    (o.status.code(), text.replace(img, "IMG"))
}

fn check_json(cmd: &str, path: &Path) -> (i32, Value) {
    let out = run(cmd, &["check", "--output=json", path.to_str().unwrap()]);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap(), v)
}

#[test]
fn repairs_injected_faults() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    // The fault kinds the acceptance criterion names.
    type Fault = fn(&std::fs::File, &Layout);
    let faults: Vec<(&str, Fault)> = vec![
        ("leaked cluster", |f, l| {
            // One more cluster at the end of the file, counted but unused.
            f.set_len(l.file_len + CS).unwrap();
            set_refcount(f, l, l.file_len / CS, 1);
        }),
        ("refcount too low", |f, l| {
            let data = be64(f, l.l2) & 0x00ff_ffff_ffff_fe00;
            set_refcount(f, l, data / CS, 0);
        }),
        ("refcount too high", |f, l| {
            let data = be64(f, l.l2 + 8) & 0x00ff_ffff_ffff_fe00;
            set_refcount(f, l, data / CS, 2);
        }),
        ("L2 entry outside the file", |f, l| {
            put64(f, l.l2 + 16, (1 << 63) | (1 << 40));
        }),
        ("COPIED flag wrong", |f, l| {
            let e = be64(f, l.l2 + 24);
            put64(f, l.l2 + 24, e & !(1 << 63));
        }),
    ];
    for (name, inject) in faults {
        let img = dir.path().join("f.qcow2");
        let _ = std::fs::remove_file(&img);
        assert!(
            qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"])
                .status
                .success()
        );
        let io = run(
            "qemu-io",
            &[
                "-c",
                "write -P 0x61 0 64k",
                "-c",
                "write -P 0x62 64k 64k",
                "-c",
                "write -P 0x64 192k 200k",
                img.to_str().unwrap(),
            ],
        );
        assert!(io.status.success());
        let (f, l) = layout(&img);
        inject(&f, &l);
        drop(f);
        let before = qemu_raw_content(&img, &dir.path().join("before.raw"));

        let (qc, qj) = check_json("qemu-img", &img);
        let (rc, rj) = check_json(rimg, &img);
        assert_ne!(qc, 0, "{name}: the fault is visible to qemu-img");
        assert_eq!(rc, qc, "{name}: exit code\nqemu: {qj}\nrimg: {rj}");
        for k in [
            "corruptions",
            "leaks",
            "check-errors",
            "allocated-clusters",
            "total-clusters",
        ] {
            assert_eq!(rj.get(k), qj.get(k), "{name}: {k}\nqemu: {qj}\nrimg: {rj}");
        }

        let out = run(rimg, &["check", "-r", "all", img.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: repair: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        if name == "L2 entry outside the file" {
            // The repair changed an entry: it says so.
            assert!(
                stderr.contains("Repairing L2 entry"),
                "{name}: repair is reported: {stderr}"
            );
        }
        assert_qemu_check_clean(&img);
        let after = qemu_raw_content(&img, &dir.path().join("after.raw"));
        assert!(before == after, "{name}: content changed by the repair");
    }
}

#[test]
fn repair_leaks_only_and_exit_codes() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    let img = dir.path().join("l.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"])
            .status
            .success()
    );
    assert!(run(
        "qemu-io",
        &["-c", "write -P 1 0 128k", img.to_str().unwrap()]
    )
    .status
    .success());
    let (f, l) = layout(&img);
    f.set_len(l.file_len + 2 * CS).unwrap();
    set_refcount(&f, &l, l.file_len / CS, 1);
    set_refcount(&f, &l, l.file_len / CS + 1, 3);
    drop(f);
    assert_eq!(check_json(rimg, &img).0, 3, "leaks only: exit 3");
    let out = run(
        rimg,
        &[
            "check",
            "-r",
            "leaks",
            "--output=json",
            img.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["leaks-fixed"], 2);
    assert_qemu_check_clean(&img);

    // A raw image has no checks (qemu-img exits 63); a missing file is 1.
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, [0u8; 4096]).unwrap();
    assert_eq!(
        run(rimg, &["check", raw.to_str().unwrap()]).status.code(),
        Some(63)
    );
    assert_eq!(
        run(rimg, &["check", "/nonexistent/x.qcow2"]).status.code(),
        Some(1)
    );
}

/// A compressed cluster whose extended L2 entry has a subcluster bitmap
/// (QEMU's iotest 214 with extended_l2=on), plus a leak: both tools
/// report the entry and repair the leak around it, with the same
/// messages and exit code (the entry is never repaired).
#[test]
fn compressed_entries_with_a_subcluster_bitmap_are_reported_not_fatal() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![0x5a; CS as usize]).unwrap();
    let base = dir.path().join("base.qcow2");
    let b = base.to_str().unwrap();
    let o = qemu_img(
        &["convert", "-c", "-O", "qcow2", "-o", "extended_l2=on"]
            .into_iter()
            .chain([src.to_str().unwrap(), b])
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{o:?}");
    let (f, l) = layout(&base);
    // Entry 0 (16 bytes with extended L2): its bitmap half set.
    put64(&f, l.l2 + 8, 1);
    // A leak: one more reference counted on the L2 table's cluster.
    set_refcount(&f, &l, l.l2 / CS, 2);
    drop(f);
    let mut outs = Vec::new();
    for tool in ["qemu-img", workspace_bin("rimg").to_str().unwrap()] {
        let img = dir.path().join("t.qcow2");
        std::fs::copy(&base, &img).unwrap();
        let p = img.to_str().unwrap();
        outs.push(said(tool, &["check", "-r", "all", p], p));
    }
    assert_eq!(outs[0], outs[1], "qemu-img vs rimg");
    assert!(outs[0].1.contains("non-zero subcluster allocation bitmap"));
}

/// Text that deflate shrinks to about three quarters: compressed
/// clusters then span sector and cluster boundaries.
fn compressible(len: usize) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % 64) as usize]
        })
        .collect()
}

#[test]
fn truncated_compressed_images_match_qemu_img_and_repair() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, compressible(1 << 20)).unwrap();
    let rimg = workspace_bin("rimg");
    let mut past_end = 0;
    for cs in ["512", "4096", "65536"] {
        let base = dir.path().join(format!("c{cs}.qcow2"));
        let b = base.to_str().unwrap();
        let o = qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("cluster_size={cs}"),
            src.to_str().unwrap(),
            b,
        ]);
        assert!(o.status.success(), "{o:?}");
        let len = std::fs::metadata(&base).unwrap().len();
        // Cuts from under a sector to half the file: the end lands inside
        // compressed data, between clusters and past refcount blocks.
        for k in 0..16u64 {
            let cut = 300 + k * (len / 32) + k * 4099;
            let img = dir.path().join("t.qcow2");
            std::fs::copy(&base, &img).unwrap();
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            f.set_len(len - cut).unwrap();
            drop(f);
            let p = img.to_str().unwrap();
            let mut outs = Vec::new();
            for tool in ["qemu-img", rimg.to_str().unwrap()] {
                outs.push(said(tool, &["check", p], p));
            }
            assert_eq!(
                outs[0], outs[1],
                "qemu-img vs rimg, {cs}-byte clusters, cut {cut}"
            );
            if outs[0].1.contains("exceeding the end of the file") {
                past_end += 1;
            }
            // qemu-img cannot repair data past the end; rimg turns those
            // entries into zero clusters and rebuilds the refcounts.
            let o = run(rimg.to_str().unwrap(), &["check", "-r", "all", p]);
            assert_eq!(o.status.code(), Some(0), "{o:?}");
            assert_qemu_check_clean(&img);
        }
    }
    assert!(
        past_end >= 24,
        "only {past_end} cuts reached compressed data"
    );
}

#[test]
fn damaged_refcount_tables_match_qemu_img() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    let b = base.to_str().unwrap();
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", b, "1M"])
        .status
        .success());
    rimg_tests::qemu_io(&base, &["write -P 7 0 64k"]);
    let rimg = workspace_bin("rimg");
    let (f, _) = layout(&base);
    let mut first = vec![0u8; CS as usize];
    f.read_exact_at(&mut first, 0).unwrap();
    let h = Header::parse(&first).unwrap();
    drop(f);
    let (rt, l1) = (h.refcount_table_offset, h.l1_table_offset);
    // (what, [(offset, value)]): refcount table entry 1 with reserved
    // bits, misaligned, outside the image, near 2^64; an L2 table past
    // the end; a misaligned block covering an L2 table past the end (its
    // refcount unreadable: the COPIED check skips it, as qemu-img's).
    let cases: [(&str, &[(u64, u64)]); 6] = [
        ("reserved bits", &[(rt + 8, 0x50100)]),
        ("misaligned block", &[(rt + 8, 0x50200)]),
        ("block outside", &[(rt + 8, 0x10_0000)]),
        ("block near 2^64", &[(rt + 8, 0xffff_ffff_ffff_0000)]),
        ("L2 past the end", &[(l1, 0x8000_0000_0010_0000)]),
        (
            "unreadable refcount",
            &[(rt + 8, 0x50200), (l1, 0x8000_0000_8000_0000)],
        ),
    ];
    for (what, edits) in cases {
        for mode in [&[][..], &["-r", "leaks"][..]] {
            let mut outs = Vec::new();
            for tool in ["qemu-img", rimg.to_str().unwrap()] {
                let img = dir.path().join("t.qcow2");
                std::fs::copy(&base, &img).unwrap();
                let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
                for &(off, v) in edits {
                    put64(&f, off, v);
                }
                drop(f);
                let p = img.to_str().unwrap();
                let mut args = vec!["check"];
                args.extend(mode);
                args.push(p);
                let (code, text) = said(tool, &args, p);
                // qemu-img's block layer adds its own corruption event
                // line, which rimg does not print.
                let text: String = text
                    .lines()
                    .filter(|l| !l.starts_with("qcow2: Image is corrupt"))
                    .map(|l| l.replace("rimg:", "qemu-img:") + "\n")
                    .collect();
                outs.push((code, text));
            }
            assert_eq!(outs[0], outs[1], "qemu-img vs rimg: {what}, {mode:?}");
        }
    }
}
