//! Persistent dirty bitmaps across edits and resizes, with qemu-img as
//! the judge: the same steps with rimg and with qemu-img leave the same
//! bitmap flags and the same dirty ranges (read back by QEMU: qemu-nbd
//! exporting the bitmap, `qemu-img map` with x-dirty-bitmap).

use std::path::Path;

use rimg_tests::bitmaps::{assert_no_corruption, bitmap, qemu_bitmaps, qemu_dirty};
use rimg_tests::image::open_rw;
use rimg_tests::{
    assert_qemu_check_clean, ok, qemu_create, qemu_create_backed, qemu_img, qemu_io, tempdir, tool,
};

/// A 64 MiB image with bitmaps `e` (enabled) and `d` (disabled), 64 KiB
/// written while `e` tracked.
fn two_bitmaps(img: &Path) {
    qemu_create(img, "", "64M");
    let p = img.to_str().unwrap();
    ok(qemu_img(&["bitmap", "--add", p, "e"]));
    ok(qemu_img(&["bitmap", "--add", "--disable", p, "d"]));
    qemu_io(img, &["write 0 64k"]);
}

/// `bitmap --enable` and `--disable` leave what qemu-img leaves; a bitmap
/// enabled in a session is marked in use on disk before it tracks
/// anything (from the open on, as QEMU marks every bitmap it loads), so a
/// crash leaves it inconsistent rather than missing the writes.
#[test]
fn enable_marks_in_use_while_tracking_and_ends_as_qemu_img() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    two_bitmaps(&base);
    for args in [
        &["--enable"][..],
        &["--disable"],
        &["--enable", "--disable"],
        &["--disable", "--enable"],
    ] {
        for name in ["e", "d"] {
            let mut seen = Vec::new();
            for t in ["rimg", "qemu-img"] {
                let img = dir.path().join(format!("{t}.qcow2"));
                std::fs::copy(&base, &img).unwrap();
                let mut a = vec!["bitmap"];
                a.extend_from_slice(args);
                a.extend([img.to_str().unwrap(), name]);
                ok(tool(t, &a));
                assert_qemu_check_clean(&img);
                qemu_io(&img, &["write 1M 64k"]);
                seen.push((
                    qemu_bitmaps(&img),
                    qemu_dirty(&img, "e"),
                    qemu_dirty(&img, "d"),
                ));
            }
            assert_eq!(seen[0], seen[1], "{args:?} {name}");
        }
    }
    // In a session: `d` enabled, one write, then a crash (no close).
    let img = dir.path().join("session.qcow2");
    std::fs::copy(&base, &img).unwrap();
    let q = open_rw(&img);
    let q2 = q.as_qcow2().unwrap();
    q2.bitmap_tracker().unwrap().set_enabled("d", true).unwrap();
    q.write_at(&[3; 4096], 2 << 20).unwrap();
    q.flush().unwrap();
    std::mem::forget(q);
    let crashed = dir.path().join("crashed.qcow2");
    std::fs::copy(&img, &crashed).unwrap();
    // Both in use since the open; `d` keeps the flags it had there (QEMU
    // writes an enable to disk only at the store, too).
    let flags = qemu_bitmaps(&crashed);
    assert!(
        flags.contains(&bitmap("e", &["in-use", "auto"])),
        "{flags:?}"
    );
    assert!(flags.contains(&bitmap("d", &["in-use"])), "{flags:?}");
    assert_no_corruption(&crashed);
}

/// Growing an image over a longer backing file zeroes the new area (so
/// the backing file does not show through); QEMU does that below its
/// dirty tracking, so the enabled bitmaps do not see it: the new area
/// is clean, whatever the preallocation.
#[test]
fn growing_over_a_longer_backing_file_leaves_the_new_area_clean() {
    let dir = tempdir();
    let backing = dir.path().join("backing.qcow2");
    qemu_create(&backing, "", "128M");
    qemu_io(&backing, &["write -P 7 0 128M"]);
    // An old size on a cluster boundary, and one that is not.
    for (size, g) in [("64M", "65536"), ("67109376", "512")] {
        let top = dir.path().join("top.qcow2");
        qemu_create_backed(&top, "", &backing, "qcow2", size);
        let t = top.to_str().unwrap();
        ok(qemu_img(&["bitmap", "--add", "-g", g, t, "e"]));
        ok(qemu_img(&["bitmap", "--add", "--disable", t, "d"]));
        qemu_io(&top, &["write 0 64k"]);
        for prealloc in ["off", "metadata", "falloc"] {
            let mut seen = Vec::new();
            for tname in ["rimg", "qemu-img"] {
                let img = dir.path().join(format!("{tname}.qcow2"));
                std::fs::copy(&top, &img).unwrap();
                let p = format!("--preallocation={prealloc}");
                ok(tool(tname, &["resize", &p, img.to_str().unwrap(), "128M"]));
                assert_qemu_check_clean(&img);
                seen.push((
                    qemu_bitmaps(&img),
                    qemu_dirty(&img, "e"),
                    qemu_dirty(&img, "d"),
                ));
            }
            assert_eq!(seen[0], seen[1], "{size} {prealloc}");
            assert_eq!(seen[0].1, vec![(0, 65536)], "{size} {prealloc}");
            let (r, q) = (
                dir.path().join("rimg.qcow2"),
                dir.path().join("qemu-img.qcow2"),
            );
            ok(qemu_img(&[
                "compare",
                r.to_str().unwrap(),
                q.to_str().unwrap(),
            ]));
        }
    }
}
