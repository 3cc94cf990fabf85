//! Persistent dirty bitmaps across edits and resizes, with qemu-img as
//! the judge: the same steps with rimg and with qemu-img leave the same
//! bitmap flags and the same dirty ranges (read back by QEMU: qemu-nbd
//! exporting the bitmap, `qemu-img map` with x-dirty-bitmap).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use qcow2::{open, Image, OpenOptions};
use rimg_tests::{assert_qemu_check_clean, qemu_img, qemu_io, tempdir, workspace_bin};

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn tool(name: &str, args: &[&str]) -> Output {
    let prog = match name {
        "rimg" => workspace_bin("rimg"),
        _ => PathBuf::from(name),
    };
    std::process::Command::new(prog)
        .args(args)
        .output()
        .unwrap()
}

/// (name, flags) of each bitmap, as `qemu-img info` reports them.
fn qemu_bitmaps(img: &Path) -> Vec<(String, Vec<String>)> {
    let out = ok(qemu_img(&[
        "info",
        "-U",
        "--output=json",
        img.to_str().unwrap(),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let list = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    list.iter()
        .map(|b| {
            let flags = b["flags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect();
            (b["name"].as_str().unwrap().to_string(), flags)
        })
        .collect()
}

/// The dirty ranges of bitmap `name` as QEMU reads them (qemu-nbd exits
/// when its one client is done).
fn qemu_dirty(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let sock = img.with_extension(format!("{name}.sock"));
    let s = sock.to_str().unwrap();
    ok(rimg_tests::run(
        "qemu-nbd",
        &[
            "--fork",
            "-r",
            "-k",
            s,
            "-f",
            "qcow2",
            "-B",
            name,
            img.to_str().unwrap(),
        ],
    ));
    let out = ok(qemu_img(&[
        "map",
        "--output=json",
        "--image-opts",
        &format!(
            "driver=nbd,server.type=unix,server.path={s},x-dirty-bitmap=qemu:dirty-bitmap:{name}"
        ),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut r: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if !e["data"].as_bool().unwrap() {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match r.last_mut() {
                Some(l) if l.0 + l.1 == start => l.1 += len,
                _ => r.push((start, len)),
            }
        }
    }
    r
}

/// A 64 MiB image with bitmaps `e` (enabled) and `d` (disabled), 64 KiB
/// written while `e` tracked.
fn two_bitmaps(img: &Path) {
    let p = img.to_str().unwrap();
    ok(qemu_img(&["create", "-q", "-f", "qcow2", p, "64M"]));
    ok(qemu_img(&["bitmap", "--add", p, "e"]));
    ok(qemu_img(&["bitmap", "--add", "--disable", p, "d"]));
    qemu_io(img, &["write 0 64k"]);
}

/// `bitmap --enable` and `--disable` leave what qemu-img leaves; a bitmap
/// enabled in a session is marked in use on disk before it tracks
/// anything (as QEMU marks every bitmap it loads), so a crash leaves it
/// inconsistent rather than missing the writes.
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
    let q: Arc<dyn Image> = open(
        &img,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let q2 = q.as_qcow2().unwrap();
    q2.bitmap_tracker()
        .unwrap()
        .set_enabled(q2, "d", true)
        .unwrap();
    q.write_at(&[3; 4096], 2 << 20).unwrap();
    q.flush().unwrap();
    std::mem::forget(q);
    let crashed = dir.path().join("crashed.qcow2");
    std::fs::copy(&img, &crashed).unwrap();
    let flags = qemu_bitmaps(&crashed);
    let in_use_auto = vec!["in-use".to_string(), "auto".to_string()];
    assert!(
        flags.contains(&("d".into(), in_use_auto.clone())),
        "{flags:?}"
    );
    assert!(flags.contains(&("e".into(), in_use_auto)), "{flags:?}");
    let o = qemu_img(&["check", "--output=json", crashed.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{v}");
}

/// Growing an image over a longer backing file zeroes the new area (so
/// the backing file does not show through); QEMU does that below its
/// dirty tracking, so the enabled bitmaps do not see it: the new area
/// is clean, whatever the preallocation.
#[test]
fn growing_over_a_longer_backing_file_leaves_the_new_area_clean() {
    let dir = tempdir();
    let backing = dir.path().join("backing.qcow2");
    let b = backing.to_str().unwrap();
    ok(qemu_img(&["create", "-q", "-f", "qcow2", b, "128M"]));
    qemu_io(&backing, &["write -P 7 0 128M"]);
    // An old size on a cluster boundary, and one that is not.
    for (size, g) in [("64M", "65536"), ("67109376", "512")] {
        let top = dir.path().join("top.qcow2");
        let t = top.to_str().unwrap();
        ok(qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t, size,
        ]));
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
