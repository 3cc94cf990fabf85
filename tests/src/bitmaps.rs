//! Persistent dirty bitmaps as QEMU reads them: the flags `qemu-img info`
//! reports and the dirty ranges qemu-nbd exports (read with `qemu-img
//! map` and x-dirty-bitmap).

use std::path::{Path, PathBuf};

use crate::{ok, qemu_img, qemu_io, run};

/// A bitmap's name and flags ("in-use", "auto"), as qemu-img reports them.
pub type Flags = (String, Vec<String>);

/// (name, flags) of each bitmap, as `qemu-img info` reports them.
pub fn qemu_bitmaps(img: &Path) -> Vec<Flags> {
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

/// The (name, flags) entry of bitmap `name` with `flags`, for comparing
/// with [`qemu_bitmaps`].
pub fn bitmap(name: &str, flags: &[&str]) -> Flags {
    (name.into(), flags.iter().map(|f| f.to_string()).collect())
}

/// The dirty ranges of bitmap `name` as QEMU reads them: qemu-nbd
/// exports it (and exits when the one client is done), `qemu-img map`
/// reports dirty ranges as "data": false.
pub fn qemu_dirty(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let sock = img.with_extension(format!("{name}.sock"));
    let s = sock.to_str().unwrap();
    ok(run(
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
    // qemu-nbd exits once its client is gone, but its image lock can
    // outlive the map for a moment: the next writer must not meet it.
    crate::wait_unlocked(img, std::time::Duration::from_secs(30));
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

/// Ranges rounded out to `g` and merged.
pub fn granular(ranges: &[(u64, u64)], g: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges
        .iter()
        .map(|&(o, l)| (o - o % g, (o + l).next_multiple_of(g)))
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(l) if a <= l.0 + l.1 => l.1 = l.1.max(b - l.0),
            _ => out.push((a, b - a)),
        }
    }
    out
}

/// A 64 MiB image `dir/a.qcow2` with bitmaps `on` (enabled, 4 KiB
/// granularity), `big` (enabled, 64 KiB) and `off` (disabled), and one
/// write made by QEMU (0..12k).
pub fn image_with_bitmaps(dir: &Path) -> PathBuf {
    let img = dir.join("a.qcow2");
    let p = img.to_str().unwrap();
    ok(qemu_img(&["create", "-q", "-f", "qcow2", p, "64M"]));
    ok(qemu_img(&["bitmap", "--add", "-g", "4096", p, "on"]));
    ok(qemu_img(&["bitmap", "--add", p, "big"]));
    ok(qemu_img(&["bitmap", "--add", "--disable", p, "off"]));
    qemu_io(&img, &["write -P 1 0 12k"]);
    img
}

/// Asserts that `qemu-img check` finds no corruption in `img` (leaks
/// are allowed: what a crash may leave).
pub fn assert_no_corruption(img: &Path) {
    let o = qemu_img(&["check", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{v}");
}
