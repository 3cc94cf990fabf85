//! `rimg compact`: a fragmented image shrinks in place to about what
//! `qemu-img convert` writes, with the same content (`qemu-img compare`)
//! and a clean `qemu-img check`, whatever its layout holds (snapshots,
//! bitmaps, a backing file, compressed clusters, extended L2 entries,
//! version 2); and SIGKILLs at random moments of a compaction (67 of
//! them, `RIMG_COMPACT_SEED` to vary) leave a consistent image (leaks at
//! most) with the same content and bitmaps.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rimg_tests::bitmaps::{qemu_bitmaps, qemu_dirty, Flags};
use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, ok_as, qemu_img, qemu_io, rimg, tempdir,
    workspace_bin,
};

const MIB: u64 = 1 << 20;

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Creates `name` in `dir` with `opts` and fragments it: data over the
/// first 24 MiB and 40-48 MiB, every other MiB of the first part
/// discarded, then data at 60 MiB (new L2 tables at the end of the file
/// with small clusters). With `grow`, the disk grows to that size before
/// the discards: QEMU moves its L1 table after the data.
fn fragmented(dir: &Path, name: &str, opts: &str, grow: Option<&str>) -> PathBuf {
    let img = dir.join(name);
    ok_as(
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, s(&img), "64M"]),
        "create",
    );
    qemu_io(&img, &["write -P 0x11 0 24M", "write -P 0x22 40M 8M"]);
    if let Some(size) = grow {
        ok_as(qemu_img(&["resize", "-q", s(&img), size]), "resize");
    }
    let mut cmds: Vec<String> = (0..24)
        .step_by(2)
        .map(|m| format!("discard {m}M 1M"))
        .collect();
    cmds.push("write -P 0x33 60M 2M".to_string());
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&img, &cmds);
    img
}

/// A 64 MiB image with 4 KiB clusters whose persistent bitmaps (`b0`,
/// 4 KiB granularity; `second-bitmap`, 64 KiB; `off`, disabled) lie at
/// the end of the file, above 16 MiB of clusters that hold zeros:
/// `--zero-detect` frees those, and only moving the bitmaps' directory,
/// tables and data lets the file shrink. Names of different lengths put
/// the directory's entries at uneven offsets.
fn bitmaps_at_the_end(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    ok_as(
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(&img),
            "64M",
        ]),
        "create",
    );
    qemu_io(&img, &["write -P 0x11 0 16M", "write -P 0 16M 16M"]);
    ok_as(qemu_img(&["bitmap", "--add", s(&img), "b0"]), "bitmap b0");
    ok_as(
        qemu_img(&["bitmap", "--add", "-g", "65536", s(&img), "second-bitmap"]),
        "bitmap second-bitmap",
    );
    ok_as(
        qemu_img(&["bitmap", "--add", "--disable", s(&img), "off"]),
        "bitmap off",
    );
    // No free cluster below: QEMU stores the bitmaps after this data.
    qemu_io(&img, &["write -P 0x12 40M 2M", "write -P 0x13 50M 64k"]);
    img
}

/// What QEMU reads of the bitmaps of `img`: names and flags, and each
/// one's dirty ranges.
fn bitmap_state(img: &Path) -> Vec<(Flags, Vec<(u64, u64)>)> {
    qemu_bitmaps(img)
        .into_iter()
        .map(|f| {
            let dirty = qemu_dirty(img, &f.0);
            (f, dirty)
        })
        .collect()
}

fn converted_len(img: &Path, dir: &Path, opts: &str) -> u64 {
    let out = dir.join("converted.qcow2");
    ok_as(
        qemu_img(&["convert", "-O", "qcow2", "-o", opts, s(img), s(&out)]),
        "convert",
    );
    let l = len(&out);
    std::fs::remove_file(out).unwrap();
    l
}

/// Compacts `img` and checks it against a copy taken before; returns
/// (length before, after).
fn compact_checked(img: &Path, extra: &[&str]) -> (u64, u64) {
    let before = img.with_extension("before");
    std::fs::copy(img, &before).unwrap();
    let l0 = len(img);
    let mut args = vec!["compact"];
    args.extend(extra);
    args.push(s(img));
    let o = ok_as(rimg(&args), "rimg compact");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.starts_with("Image compacted: "), "{text}");
    assert_qemu_check_clean(img);
    assert_qemu_compare_equal(&before, img);
    let l1 = len(img);
    assert!(l1 <= l0, "grew: {l0} -> {l1}");
    (l0, l1)
}

#[test]
fn fragmented_images_shrink_to_what_convert_writes() {
    let dir = tempdir();
    for (name, opts) in [
        ("c4k", "cluster_size=4096"),
        // The L1 table at the end of the file moves down too.
        ("grown", "cluster_size=4096"),
        ("c64k", "cluster_size=65536"),
        ("v2", "compat=0.10"),
        ("c512", "cluster_size=512"),
        ("lazy", "cluster_size=4096,lazy_refcounts=on"),
        ("extl2", "cluster_size=32768,extended_l2=on"),
    ] {
        let grow = (name == "grown").then_some("4G");
        let img = fragmented(dir.path(), &format!("{name}.qcow2"), opts, grow);
        let conv = converted_len(&img, dir.path(), opts);
        let (l0, l1) = compact_checked(&img, &[]);
        let cs: u64 = opts
            .split(',')
            .find_map(|o| o.strip_prefix("cluster_size="))
            .map_or(65536, |v| v.parse().unwrap());
        println!("{name}: {l0} -> {l1} bytes; qemu-img convert: {conv}");
        // Within a cluster run of convert's output: the refcount
        // structures stay where they were, convert lays out its own.
        assert!(
            l1 <= conv + 4 * cs,
            "{name}: {l1} bytes after compaction, convert writes {conv}"
        );
        assert!(l1 < l0 * 3 / 4, "{name}: {l0} -> {l1}");
        // Once more: nothing left to move.
        let o = ok_as(rimg(&["compact", s(&img)]), "again");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(" 0 clusters moved"),
            "{name}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert_eq!(len(&img), l1, "{name}");
    }
}

#[test]
fn pinned_structures_stay_and_the_rest_moves() {
    let dir = tempdir();
    let d = dir.path();
    // A backing file: the overlay's data is partial clusters over it.
    let base = fragmented(d, "base.qcow2", "cluster_size=65536", None);
    let top = d.join("top.qcow2");
    ok_as(
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&top),
            "64M",
        ]),
        "overlay",
    );
    qemu_io(
        &top,
        &[
            "write -P 0x44 1M 6M",
            "write -P 0x55 30M 3M",
            "discard 2M 2M",
            "write -P 0x66 50M 1M",
        ],
    );
    let (l0, l1) = compact_checked(&top, &[]);
    assert!(l1 < l0, "overlay: {l0} -> {l1}");
    assert_qemu_check_clean(&base);

    // Snapshots: the clusters they share stay; the rest moves.
    let img = fragmented(d, "snap.qcow2", "cluster_size=4096", None);
    ok_as(qemu_img(&["snapshot", "-c", "s1", s(&img)]), "snapshot");
    qemu_io(&img, &["discard 40M 8M", "write -P 0x77 56M 2M"]);
    let snap_before = d.join("s1.raw");
    ok_as(
        qemu_img(&["convert", "-l", "s1", "-O", "raw", s(&img), s(&snap_before)]),
        "snapshot content",
    );
    compact_checked(&img, &[]);
    let snap_after = d.join("s1-after.raw");
    ok_as(
        qemu_img(&["convert", "-l", "s1", "-O", "raw", s(&img), s(&snap_after)]),
        "snapshot content after",
    );
    assert!(
        std::fs::read(&snap_before).unwrap() == std::fs::read(&snap_after).unwrap(),
        "the snapshot's content changed"
    );

    // Persistent bitmaps and compressed clusters (several to a host
    // cluster: they stay).
    let img = d.join("bm.qcow2");
    ok_as(
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(&img),
            "64M",
        ]),
        "create",
    );
    ok_as(qemu_img(&["bitmap", "--add", s(&img), "b0"]), "bitmap");
    qemu_io(
        &img,
        &[
            "write -c -P 0x22 20M 1M",
            "write -P 0x11 0 16M",
            "discard 0 8M",
        ],
    );
    let info = |p: &Path| {
        let o = ok_as(qemu_img(&["info", "--output=json", s(p)]), "info");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["format-specific"]["data"]["bitmaps"].clone()
    };
    let bitmaps = info(&img);
    assert!(
        bitmaps.as_array().is_some_and(|a| a.len() == 1),
        "{bitmaps}"
    );
    let state = bitmap_state(&img);
    // Never marked in use (a kill cannot spoil them).
    let (l0, l1) = compact_checked(&img, &["--zero-detect"]);
    assert!(l1 < l0, "bitmaps: {l0} -> {l1}");
    assert_eq!(info(&img), bitmaps, "the bitmaps changed");
    assert_eq!(bitmap_state(&img), state, "the bitmaps' bits changed");
}

#[test]
fn bitmaps_at_the_end_move_down() {
    let dir = tempdir();
    let img = bitmaps_at_the_end(dir.path(), "bm.qcow2");
    let before = bitmap_state(&img);
    assert_eq!(before.len(), 3, "{before:?}");
    assert_eq!(
        before.iter().filter(|(_, dirty)| !dirty.is_empty()).count(),
        2,
        "{before:?}"
    );
    let conv = converted_len(&img, dir.path(), "cluster_size=4096");
    let (l0, l1) = compact_checked(&img, &["--zero-detect"]);
    println!("bitmaps at the end: {l0} -> {l1} bytes; qemu-img convert: {conv}");
    // Convert drops the bitmaps: their directory, three tables and two
    // data clusters (at most) are the difference.
    assert!(l1 <= conv + 6 * 4096, "{l0} -> {l1}");
    assert_eq!(bitmap_state(&img), before, "the bitmaps changed");
    // Once more: nothing left to move.
    let o = ok_as(rimg(&["compact", s(&img)]), "again");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(" 0 clusters moved"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(len(&img), l1);
}

#[test]
fn zero_detect_drops_clusters_of_zeros() {
    let dir = tempdir();
    let img = dir.path().join("z.qcow2");
    ok_as(
        qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]),
        "create",
    );
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 4M",
            "write -P 0 4M 16M",
            "write -P 0x22 20M 4M",
        ],
    );
    let plain = dir.path().join("plain.qcow2");
    std::fs::copy(&img, &plain).unwrap();
    let (_, without) = compact_checked(&plain, &[]);
    let (_, with) = compact_checked(&img, &["--zero-detect"]);
    assert!(
        with + 15 * MIB < without,
        "--zero-detect: {with} bytes, without: {without}"
    );
    let o = ok_as(qemu_img(&["map", "--output=json", s(&img)]), "map");
    let map: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let zeros = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["start"] == 4 * MIB)
        .expect("an extent at 4 MiB");
    assert_eq!(zeros["zero"], true, "{zeros}");
    assert_eq!(zeros["data"], false, "{zeros}");
}

#[test]
fn compact_refuses_what_it_cannot_do() {
    let dir = tempdir();
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, vec![1u8; 1 << 16]).unwrap();
    let o = rimg(&["compact", s(&raw)]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("only qcow2 images can be compacted"), "{err}");
    assert_eq!(std::fs::read(&raw).unwrap(), vec![1u8; 1 << 16]);

    // A corrupt image: a data cluster's refcount zeroed.
    let img = fragmented(dir.path(), "c.qcow2", "cluster_size=65536", None);
    ok_as(qemu_img(&["check", "-r", "all", s(&img)]), "check -r all");
    let o = ok_as(qemu_img(&["map", "--output=json", s(&img)]), "map");
    let map: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let host = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["start"] == 40 * MIB)
        .and_then(|e| e["offset"].as_u64())
        .expect("data at 40 MiB");
    let mut bad = std::fs::read(&img).unwrap();
    let rt = u64::from_be_bytes(bad[48..56].try_into().unwrap()) as usize;
    let rb = u64::from_be_bytes(bad[rt..rt + 8].try_into().unwrap()) as usize;
    // Its refcount (16-bit entries) zeroed: a corruption.
    let at = rb + 2 * (host >> 16) as usize;
    bad[at..at + 2].copy_from_slice(&[0, 0]);
    std::fs::write(&img, &bad).unwrap();
    assert_eq!(qemu_img(&["check", s(&img)]).status.code(), Some(2));
    // Nothing is written first (a cluster in use may look free): not
    // by --zero-detect, not for the bitmaps.
    ok_as(qemu_img(&["bitmap", "--add", s(&img), "b0"]), "bitmap");
    let bad = std::fs::read(&img).unwrap();
    for extra in [&[][..], &["--zero-detect"][..]] {
        let mut args = vec!["compact"];
        args.extend(extra);
        args.push(s(&img));
        let o = rimg(&args);
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("repair it first"), "{err}");
        let now = std::fs::read(&img).unwrap();
        assert!(now == bad, "{extra:?}: a refused image was changed");
    }
}

/// Runs `rimg compact` on a fresh copy of `template` and kills it after a
/// random number of progress lines or a random time below `span`;
/// returns whether it was killed before it finished.
fn kill_round(
    rimg_bin: &Path,
    template: &Path,
    img: &Path,
    extra: &[&str],
    span: Duration,
    max_lines: usize,
    rng: &mut StdRng,
) -> bool {
    std::fs::copy(template, img).unwrap();
    let mut child = Command::new(rimg_bin)
        .arg("compact")
        .args(extra)
        .args(["--progress=json", s(img)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if rng.random_bool(0.3) {
        // The first line comes before any move, the next after each
        // batch.
        let lines = rng.random_range(1..=max_lines);
        let err = child.stderr.take().unwrap();
        for l in BufReader::new(err).lines().take(lines) {
            if l.is_err() {
                break;
            }
        }
    } else {
        std::thread::sleep(span.mul_f64(rng.random_range(0.0..0.9)));
    }
    let _ = child.kill();
    let st = child.wait().unwrap();
    match st.signal() {
        Some(libc::SIGKILL) => true,
        _ => {
            assert_eq!(st.code(), Some(0), "compact ended by itself: {st}");
            false
        }
    }
}

#[test]
fn killed_compactions_leave_consistent_images_with_the_same_content() {
    let seed: u64 = std::env::var("RIMG_COMPACT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xc0_ac7);
    let mut rng = StdRng::seed_from_u64(seed);
    let rimg_bin = workspace_bin("rimg");
    let dir = tempdir();
    let d = dir.path();
    let mut kills = 0;
    let mut rounds = 0;
    // Kills wanted per variant (64 KiB clusters, version 2: data only;
    // 4 KiB: L2 tables, refcount blocks and the L1 table move too; 512 B: the refcount
    // table too, and empty tables are dropped; bitmaps: zero detection,
    // then the bitmaps' data, tables and directory move). A round that
    // finished before its kill counts no kill; at most 100 rounds each.
    for (opts, want) in [
        ("cluster_size=4096", 25),
        ("cluster_size=65536,compat=0.10", 15),
        ("cluster_size=512", 15),
        ("bitmaps", 12),
    ] {
        // Bitmaps: one move per batch, so that kills fall between the
        // moves of data, tables and the directory.
        let (template, extra): (PathBuf, &[&str]) = if opts == "bitmaps" {
            (
                bitmaps_at_the_end(d, "template.qcow2"),
                &["--zero-detect", "--batch-clusters", "1"],
            )
        } else {
            // 4 KiB: grown first, so that the L1 table moves as well.
            let grow = (opts == "cluster_size=4096").then_some("4G");
            (fragmented(d, "template.qcow2", opts, grow), &[])
        };
        let bitmaps = bitmap_state(&template);
        let img = d.join("img.qcow2");
        // How long an uninterrupted compaction takes: kills fall inside.
        std::fs::copy(&template, &img).unwrap();
        let t = Instant::now();
        compact_checked(&img, extra);
        let span = t.elapsed();
        let target = len(&img);
        let mut got = 0;
        for round in 0.. {
            assert!(
                round < 100,
                "{opts}: only {got} of 100 rounds were killed mid-way"
            );
            if got == want {
                break;
            }
            rounds += 1;
            let ctx = format!("{opts} round {round} (RIMG_COMPACT_SEED={seed})");
            // One line per batch of 1024, more often with one-move
            // batches (a line per percent).
            let max_lines = if opts == "bitmaps" { 6 } else { 2 };
            if kill_round(&rimg_bin, &template, &img, extra, span, max_lines, &mut rng) {
                got += 1;
                kills += 1;
            }
            let o = qemu_img(&["check", "--output=json", s(&img)]);
            let code = o.status.code();
            let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            assert!(
                matches!(code, Some(0 | 3)),
                "{ctx}: check exit {code:?}: {j}"
            );
            for k in ["corruptions", "check-errors"] {
                assert_eq!(j[k].as_u64().unwrap_or(0), 0, "{ctx}: {k}: {j}");
            }
            assert_qemu_compare_equal(&template, &img);
            if !bitmaps.is_empty() {
                assert_eq!(bitmap_state(&img), bitmaps, "{ctx}: the bitmaps changed");
            }
            // Every few rounds, a compaction after the kill finishes
            // the job: leaks given back, the same size as uninterrupted.
            if round % 6 == 5 {
                compact_checked(&img, extra);
                assert_eq!(len(&img), target, "{ctx}");
                if !bitmaps.is_empty() {
                    assert_eq!(bitmap_state(&img), bitmaps, "{ctx}: the bitmaps changed");
                }
            }
        }
    }
    println!("compact: {kills} kills in {rounds} rounds, no corruption, content kept");
    assert!(kills >= 67);
}
