//! `convert -C` (copy offloading): data goes from the source's file to
//! the target's by copy_file_range(2), seen with strace, and the target
//! is what `qemu-img convert -C` writes (same content, same allocation,
//! check clean), also with -W and from two sources of sizes that end
//! mid-block; on btrfs the copies are reflinks (filefrag shows the
//! target's data extents shared). What the kernel cannot copy from a
//! file (a backing layer's data, compressed clusters, anything onto
//! another file system) goes through memory, with the same result.

use std::path::{Path, PathBuf};
use std::process::Command;

use rimg_tests::btrfs::Btrfs;
use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, ensure_tool, ok_as, qemu_create_backed,
    qemu_img, qemu_io, tempdir, workspace_bin,
};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `rimg args` under strace; returns the bytes its successful
/// copy_file_range calls copied.
fn rimg_traced(dir: &Path, args: &[&str]) -> u64 {
    ensure_tool("strace", "strace");
    let trace = dir.join("trace.txt");
    let o = Command::new("strace")
        .args(["-f", "-e", "trace=copy_file_range", "-o", s(&trace)])
        .arg(workspace_bin("rimg"))
        .args(args)
        .output()
        .unwrap();
    ok_as(o, &format!("rimg {args:?}"));
    let text = std::fs::read_to_string(&trace).unwrap();
    // Calls of threads that ran at once come in two lines: "... <unfinished
    // ...>", then "<... copy_file_range resumed>) = N".
    text.lines()
        .filter(|l| l.contains("copy_file_range") && !l.ends_with("<unfinished ...>"))
        .filter_map(|l| {
            let r = l.rsplit_once("= ")?.1;
            r.split_whitespace().next()?.parse::<i64>().ok()
        })
        .filter(|&n| n > 0)
        .map(|n| n as u64)
        .sum()
}

fn map(img: &Path) -> String {
    let o = ok_as(qemu_img(&["map", "--output=json", s(img)]), "map");
    String::from_utf8(o.stdout).unwrap()
}

/// A 64 MiB image of `fmt` (created with `opts`, if any) with 9 MiB of
/// data in three places.
fn source(dir: &Path, name: &str, fmt: &str, opts: &str) -> PathBuf {
    let img = dir.join(name);
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&img), "64M"]);
    ok_as(qemu_img(&args), "create");
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 5M",
            "write -P 0x22 20M 3M",
            "write -P 0x33 63M 1M",
        ],
    );
    img
}

/// Converts `srcs` (one disk, one after the other) with -C by rimg and
/// by qemu-img; both targets must hold the same content (the source's,
/// for one source) with the same allocation (not compared with -W,
/// whose order of allocation is any). Returns the bytes rimg had the
/// kernel copy.
fn compare_with_qemu(dir: &Path, srcs: &[&Path], fmt: &str, extra: &[&str]) -> u64 {
    let ours = dir.join(format!("ours.{fmt}"));
    let theirs = dir.join(format!("theirs.{fmt}"));
    let _ = std::fs::remove_file(&ours);
    let _ = std::fs::remove_file(&theirs);
    let mut args = vec!["convert", "-C", "-O", fmt];
    args.extend(extra);
    args.extend(srcs.iter().map(|p| s(p)));
    args.push(s(&ours));
    let copied = rimg_traced(dir, &args);
    args.pop();
    args.push(s(&theirs));
    ok_as(qemu_img(&args), "qemu-img convert -C");
    if let [src] = srcs {
        assert_qemu_compare_equal(src, &ours);
    }
    assert_qemu_compare_equal(&theirs, &ours);
    if fmt == "qcow2" {
        assert_qemu_check_clean(&ours);
    }
    if !extra.contains(&"-W") {
        assert_eq!(map(&ours), map(&theirs), "{srcs:?} -> {fmt} {extra:?}");
    }
    copied
}

#[test]
fn offloaded_copies_write_what_qemu_img_writes() {
    let dir = tempdir();
    let d = dir.path();
    let data = 9 << 20;
    for (name, fmt, opts) in [
        ("src.raw", "raw", ""),
        ("src.qcow2", "qcow2", "cluster_size=65536"),
        ("small.qcow2", "qcow2", "cluster_size=4096"),
    ] {
        let src = source(d, name, fmt, opts);
        for target in ["raw", "qcow2"] {
            let copied = compare_with_qemu(d, &[&src], target, &[]);
            assert_eq!(copied, data, "{name} -> {target}: copied by the kernel");
            // Out of order, four workers: the same bytes copied.
            let copied = compare_with_qemu(d, &[&src], target, &["-W", "-m", "4"]);
            assert_eq!(copied, data, "{name} -> {target} -W");
        }
    }

    // Data in a backing layer, and compressed clusters: read and written
    // (the kernel copies only what the top layer holds in clear).
    let base = source(d, "base.qcow2", "qcow2", "cluster_size=65536");
    let top = d.join("top.qcow2");
    qemu_create_backed(&top, "", &base, "qcow2", "64M");
    qemu_io(&top, &["write -P 0x44 1M 1M", "write -c -P 0x55 40M 64k"]);
    let copied = compare_with_qemu(d, &[&top], "qcow2", &[]);
    assert_eq!(copied, 1 << 20, "only the overlay's uncompressed data");

    // Two sources of sizes that end mid-block, one after the other: the
    // second's data lies at target offsets the first one's end shifts.
    let a = d.join("a.raw");
    let b = d.join("b.raw");
    ok_as(
        qemu_img(&["create", "-q", "-f", "raw", s(&a), "1049088"]),
        "a",
    );
    ok_as(
        qemu_img(&["create", "-q", "-f", "raw", s(&b), "3147264"]),
        "b",
    );
    qemu_io(&a, &["write -P 0x61 0 1049088"]);
    qemu_io(
        &b,
        &["write -P 0x62 4096 1048576", "write -P 0x63 3146240 1024"],
    );
    for fmt in ["raw", "qcow2"] {
        let copied = compare_with_qemu(d, &[&a, &b], fmt, &[]);
        assert!(copied >= 1049088 + 1048576, "{fmt}: {copied} bytes copied");
    }
}

/// Blocks of `img`'s extents that filefrag marks shared, and all blocks.
fn shared_blocks(img: &Path) -> (u64, u64) {
    ensure_tool("filefrag", "e2fsprogs");
    let o = Command::new("filefrag")
        .args(["-v", s(img)])
        .output()
        .unwrap();
    assert!(o.status.success(), "filefrag {img:?}");
    let mut shared = 0;
    let mut all = 0;
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        // "   0:        0..    2047:      15616..     17663:   2048:   shared"
        let cols: Vec<&str> = l.split(':').map(str::trim).collect();
        if cols.len() < 4 || cols[0].parse::<u64>().is_err() {
            continue;
        }
        let Some(n) = cols[3]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        all += n;
        if l.contains("shared") {
            shared += n;
        }
    }
    (shared, all)
}

#[test]
fn offloaded_copies_on_btrfs_are_reflinks() {
    let dir = tempdir();
    let fs = Btrfs::new(dir.path());
    let d = fs.mnt.as_path();
    let src = source(d, "src.qcow2", "qcow2", "cluster_size=65536");
    for fmt in ["raw", "qcow2"] {
        let copied = compare_with_qemu(d, &[&src], fmt, &[]);
        assert_eq!(copied, 9 << 20);
        let ours = d.join(format!("ours.{fmt}"));
        assert!(Command::new("sync").status().unwrap().success());
        let (shared, all) = shared_blocks(&ours);
        // 9 MiB of 4 KiB blocks shared with the source; a qcow2 target's
        // own metadata is not.
        assert!(shared >= 9 * 256, "{fmt}: {shared} of {all} blocks shared");
    }
    // Onto another file system kernels since 5.19 refuse (EXDEV):
    // through memory, with the same result.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    assert_eq!(compare_with_qemu(&other, &[&src], "qcow2", &[]), 0);
}
