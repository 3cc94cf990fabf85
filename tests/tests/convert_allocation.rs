//! What `convert` allocates, from QEMU's iotest 122, with qemu-img run on
//! the same source as the judge: `-S 0` allocates everything, `-S N`
//! makes holes only of zero runs of at least N bytes (aligned as qemu-img
//! aligns them), and `-c` with several sources compresses a cluster that
//! straddles two of them. Maps are compared without host offsets (the
//! two tools may place clusters differently).

use std::path::Path;

use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, qemu_create, qemu_io, run, run_ok, tempdir,
    workspace_bin,
};

/// Runs `cmd`, asserts that it succeeded.
fn ok(cmd: &str, args: &[&str]) {
    run_ok(cmd, args);
}
use serde_json::Value;

/// qemu-img's map without host offsets, adjacent equal extents merged.
fn map(img: &Path) -> Vec<Value> {
    let o = run("qemu-img", &["map", "--output=json", img.to_str().unwrap()]);
    assert!(o.status.success());
    let v: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let mut out: Vec<Value> = Vec::new();
    for mut e in v {
        let m = e.as_object_mut().unwrap();
        m.remove("offset");
        let len = m.remove("length").unwrap().as_u64().unwrap();
        let start = m.remove("start").unwrap().as_u64().unwrap();
        if let Some(last) = out.last_mut() {
            let l = last.as_object_mut().unwrap();
            let (ls, ll) = (l["start"].as_u64().unwrap(), l["length"].as_u64().unwrap());
            let same = m.iter().all(|(k, v)| l.get(k) == Some(v));
            if same && ls + ll == start {
                l.insert("length".into(), (ll + len).into());
                continue;
            }
        }
        m.insert("start".into(), start.into());
        m.insert("length".into(), len.into());
        out.push(e);
    }
    out
}

/// Runs `convert ARGS... SOURCES... OUT` with rimg and with qemu-img and
/// asserts equal maps and contents; returns rimg's map.
fn same_as_qemu_img(dir: &Path, args: &[&str], sources: &[&Path]) -> Vec<Value> {
    let rimg = workspace_bin("rimg");
    let mut maps = Vec::new();
    for (tool, name) in [
        (rimg.to_str().unwrap(), "rimg.out"),
        ("qemu-img", "qemu.out"),
    ] {
        let out = dir.join(name);
        let mut a = vec!["convert"];
        a.extend_from_slice(args);
        a.extend(sources.iter().map(|s| s.to_str().unwrap()));
        a.push(out.to_str().unwrap());
        ok(tool, &a);
        assert_qemu_check_clean(&out);
        // rimg reserves file space ahead of a qcow2 target's new
        // clusters: none of it is left past the image's end (which can
        // be past the file's: compressed data ends mid-cluster).
        let o = run(
            "qemu-img",
            &["check", "--output=json", out.to_str().unwrap()],
        );
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let (len, end) = (
            std::fs::metadata(&out).unwrap().len(),
            v["image-end-offset"].as_u64().unwrap(),
        );
        assert!(len <= end, "{tool}: file length {len}, image end {end}");
        maps.push(map(&out));
    }
    assert_qemu_compare_equal(&dir.join("rimg.out"), &dir.join("qemu.out"));
    assert_eq!(
        maps[0], maps[1],
        "convert {args:?}: rimg's map, then qemu-img's"
    );
    maps.swap_remove(0)
}

#[test]
fn s0_allocates_everything() {
    let dir = tempdir();
    let src = dir.path().join("src.qcow2");
    qemu_create(&src, "", "64M");
    qemu_io(&src, &["write -P 0x22 0 3M", "write -P 0 3M 3M"]);
    let m = same_as_qcow2_map(dir.path(), &["-O", "qcow2", "-S", "0"], &src);
    assert_eq!(m.len(), 1, "one data extent over the whole disk: {m:?}");
    assert_eq!(m[0]["data"], true);
    let m = same_as_qcow2_map(dir.path(), &["-O", "qcow2", "-c", "-S", "0"], &src);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0]["compressed"], true);
}

fn same_as_qcow2_map(dir: &Path, args: &[&str], src: &Path) -> Vec<Value> {
    same_as_qemu_img(dir, args, &[src])
}

#[test]
fn s_n_makes_holes_of_long_zero_runs_only() {
    let dir = tempdir();
    let src = dir.path().join("src.qcow2");
    let s = src.to_str().unwrap();
    qemu_create(s, "cluster_size=1k", "64M");
    qemu_io(
        &src,
        &[
            "write -P 0 0 64k",
            "write 0 1k",
            "write 8k 1k",
            "write 17k 1k",
            "write -P 0 65k 1k",
        ],
    );
    for sparse in ["4k", "8k", "1k", "64k"] {
        let m = same_as_qemu_img(
            dir.path(),
            &["-O", "qcow2", "-o", "cluster_size=1k", "-S", sparse],
            &[&src],
        );
        if sparse == "8k" {
            // The zero runs of 7 and 8 KiB between the data are shorter
            // than 8 KiB once aligned: all of it up to 24 KiB is data.
            assert_eq!(m[0]["length"], 24 << 10, "{m:?}");
            assert_eq!(m[0]["data"], true);
        }
    }
}

#[test]
fn compression_over_concatenated_sources() {
    let dir = tempdir();
    let (one, two) = (dir.path().join("1.qcow2"), dir.path().join("2.qcow2"));
    for p in [&one, &two] {
        qemu_create(p, "cluster_size=1024", "1023k");
    }
    qemu_io(
        &one,
        &[
            "write -P 0x11 16k 16k",
            "write -P 0x22 130k 130k",
            "write -P 0x33 1022k 1k",
        ],
    );
    qemu_io(&two, &["write -P 0x44 0k 1k"]);
    let m = same_as_qemu_img(dir.path(), &["-c", "-O", "qcow2"], &[&one, &two]);
    // The 64 KiB cluster at 960 KiB holds the end of the first source
    // and the start of the second: compressed whole.
    let straddling = m
        .iter()
        .find(|e| {
            e["start"].as_u64().unwrap() <= 960 << 10 && e["data"] == true && {
                let end = e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                end >= 1024 << 10
            }
        })
        .unwrap_or_else(|| panic!("no data over 960k..1024k: {m:?}"));
    assert_eq!(straddling["compressed"], true, "{m:?}");
    let out = dir.path().join("rimg.out");
    qemu_io(&out, &["read -P 0x33 1022k 1k", "read -P 0x44 1023k 1k"]);
    // With a backing file for the target, concatenating is refused.
    let rimg = workspace_bin("rimg");
    for tool in [rimg.to_str().unwrap(), "qemu-img"] {
        let o = run(
            tool,
            &[
                "convert",
                "-O",
                "qcow2",
                "-B",
                one.to_str().unwrap(),
                "-F",
                "qcow2",
                one.to_str().unwrap(),
                two.to_str().unwrap(),
                dir.path().join("x.qcow2").to_str().unwrap(),
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{tool}: {err}");
        assert!(
            err.contains("makes no sense when concatenating"),
            "{tool}: {err}"
        );
    }
}

/// A raw target's file space is reserved ahead of its writes (the copy's
/// speed on ext4), by the workers in turn: only what gets written, never
/// the zero runs and holes between, so the file takes the space
/// qemu-img's takes, and its content and map are qemu-img's.
#[test]
fn raw_target_takes_the_space_qemu_img_takes() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempdir();
    let src = dir.path().join("src.qcow2");
    qemu_create(&src, "", "64M");
    // Data within and across the 2 MiB chunks the workers take, written
    // zeros (holes in the target), holes.
    qemu_io(
        &src,
        &[
            "write -P 0x11 0 1M",
            "write -P 0 1M 3M",
            "write -P 0x22 5M 300k",
            "write -P 0x33 10M 6M",
            "write -P 0 20M 4M",
            "write -P 0x44 30M 64k",
            "write -P 0x55 63M 1M",
        ],
    );
    let rimg = workspace_bin("rimg");
    let mut used = Vec::new();
    for (tool, name) in [
        (rimg.to_str().unwrap(), "rimg.raw"),
        ("qemu-img", "qemu.raw"),
    ] {
        let out = dir.path().join(name);
        ok(
            tool,
            &[
                "convert",
                "-O",
                "raw",
                src.to_str().unwrap(),
                out.to_str().unwrap(),
            ],
        );
        used.push(std::fs::metadata(&out).unwrap().blocks() * 512);
    }
    let (r, q) = (dir.path().join("rimg.raw"), dir.path().join("qemu.raw"));
    assert_qemu_compare_equal(&r, &q);
    assert_eq!(map(&r), map(&q), "rimg's map, then qemu-img's");
    // The data is 8,556 KiB; the zero runs and holes, 55 MiB. The file
    // system's own extent blocks may differ a little.
    let data = (1024 + 300 + 6144 + 64 + 1024) << 10;
    assert!(used[0] >= data, "rimg's file holds {} bytes", used[0]);
    assert!(
        used[0] <= used[1] + (64 << 10),
        "rimg's file takes {} bytes, qemu-img's {}",
        used[0],
        used[1]
    );
}
