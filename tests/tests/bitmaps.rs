//! Persistent dirty bitmaps with QEMU as the judge: images whose bitmaps
//! `qemu-img bitmap` made, written by rimg, must keep them (qemu-img info
//! flags, qemu-img check clean), and the dirty ranges QEMU reads from them
//! (qemu-nbd exporting the bitmap, `qemu-img map` with x-dirty-bitmap)
//! must be exactly the ranges written, at the bitmap's granularity.

use std::path::Path;
use std::sync::Arc;

use qcow2::{open, Image, OpenOptions};
use rimg_tests::{assert_qemu_check_clean, qemu_img, qemu_io, tempdir, workspace_bin};

fn ok(o: std::process::Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn rw(img: &Path) -> Arc<dyn Image> {
    open(
        img,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A 64 MiB image with bitmaps `on` (enabled, 4 KiB granularity), `big`
/// (enabled, 64 KiB) and `off` (disabled), and one write made by QEMU.
fn image_with_bitmaps(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("a.qcow2");
    let p = img.to_str().unwrap();
    ok(qemu_img(&["create", "-q", "-f", "qcow2", p, "64M"]));
    ok(qemu_img(&["bitmap", "--add", "-g", "4096", p, "on"]));
    ok(qemu_img(&["bitmap", "--add", p, "big"]));
    ok(qemu_img(&["bitmap", "--add", "--disable", p, "off"]));
    qemu_io(&img, &["write -P 1 0 12k"]);
    img
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

/// The dirty ranges of bitmap `name` as QEMU reads them: qemu-nbd
/// exports it (and exits when the one client is done), `qemu-img map`
/// reports dirty ranges as "data": false.
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

/// Ranges rounded out to `g` and merged.
fn granular(ranges: &[(u64, u64)], g: u64) -> Vec<(u64, u64)> {
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

fn rimg(args: &[&str]) -> std::process::Output {
    std::process::Command::new(workspace_bin("rimg"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn check_counts_bitmap_clusters_and_repairs_nothing() {
    let dir = tempdir();
    let img = image_with_bitmaps(dir.path());
    let p = img.to_str().unwrap();
    let before = std::fs::read(&img).unwrap();
    let out = ok(rimg(&["check", p]));
    assert!(out.contains("No errors were found"), "{out}");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "check changed the image"
    );
    let (flags, dirty) = (qemu_bitmaps(&img), qemu_dirty(&img, "on"));
    for mode in ["leaks", "all"] {
        let out = ok(rimg(&["check", "-r", mode, p]));
        assert!(out.contains("No errors were found"), "{out}");
        // A repair stores the bitmaps at its close, as qemu-img's does:
        // where they are changes, what they hold does not.
        assert_qemu_check_clean(&img);
        assert_eq!(qemu_bitmaps(&img), flags, "check -r {mode}");
        assert_eq!(qemu_dirty(&img, "on"), dirty, "check -r {mode}");
    }
}

#[test]
fn library_writes_are_recorded_in_enabled_bitmaps() {
    let dir = tempdir();
    let img = image_with_bitmaps(dir.path());
    let off_before = qemu_dirty(&img, "off");
    let writes = [(1 << 20, 4096u64), (10 << 20, 100 << 10), (33 << 20, 1)];
    let zeroes = (20 << 20, 256u64 << 10);
    let discard = (40 << 20, 1u64 << 20);
    {
        let q = rw(&img);
        // In use on disk from the open on: a crash leaves them inconsistent.
        let flags = qemu_bitmaps(&img);
        assert!(
            flags.contains(&("on".into(), vec!["in-use".into(), "auto".into()])),
            "{flags:?}"
        );
        for &(o, l) in &writes {
            q.write_at(&vec![9u8; l as usize], o).unwrap();
        }
        q.write_zeroes(zeroes.0, zeroes.1, true).unwrap();
        q.discard(discard.0, discard.1).unwrap();
        q.flush().unwrap();
    }
    assert_qemu_check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            ("on".into(), vec!["auto".into()]),
            ("big".into(), vec!["auto".into()]),
            ("off".into(), vec![]),
        ]
    );
    let mut all = vec![(0, 12 << 10)];
    all.extend(writes);
    all.extend([zeroes, discard]);
    assert_eq!(qemu_dirty(&img, "on"), granular(&all, 4096));
    assert_eq!(qemu_dirty(&img, "big"), granular(&all, 65536));
    assert_eq!(qemu_dirty(&img, "off"), off_before);
    // A second session starts from the stored bits.
    {
        let q = rw(&img);
        q.write_at(&[1; 512], 50 << 20).unwrap();
    }
    all.push((50 << 20, 512));
    assert_eq!(qemu_dirty(&img, "on"), granular(&all, 4096));
    assert_qemu_check_clean(&img);
}

#[test]
fn a_crash_leaves_the_bitmaps_in_use_never_wrong() {
    let dir = tempdir();
    let img = image_with_bitmaps(dir.path());
    let q = rw(&img);
    q.write_at(&[5; 4096], 8 << 20).unwrap();
    q.flush().unwrap();
    // No close: the file as a kill would leave it, copied away from the
    // still-open (and locked) image.
    std::mem::forget(q);
    let img = dir.path().join("crashed.qcow2");
    std::fs::copy(dir.path().join("a.qcow2"), &img).unwrap();
    let flags = qemu_bitmaps(&img);
    assert!(
        flags.contains(&("on".into(), vec!["in-use".into(), "auto".into()])),
        "{flags:?}"
    );
    assert!(flags.contains(&("off".into(), vec![])), "{flags:?}");
    // Leaks at most; rimg's check agrees with qemu-img's.
    let o = qemu_img(&["check", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{v}");
    // The inconsistent bitmap is left alone by the next session.
    drop(rw(&img));
    let flags = qemu_bitmaps(&img);
    assert!(
        flags.contains(&("on".into(), vec!["in-use".into(), "auto".into()])),
        "{flags:?}"
    );
}

#[test]
fn cli_writers_keep_bitmaps() {
    let dir = tempdir();
    let img = image_with_bitmaps(dir.path());
    let src = dir.path().join("s.raw");
    std::fs::write(&src, vec![0u8; 64 << 20]).unwrap();
    qemu_io(&src, &["write -P 7 3M 8k"]);
    ok(rimg(&[
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        img.to_str().unwrap(),
    ]));
    assert_qemu_check_clean(&img);
    let flags = qemu_bitmaps(&img);
    assert!(
        flags.contains(&("on".into(), vec!["auto".into()])),
        "{flags:?}"
    );
    // convert -n writes the whole disk (zeros included), as qemu-img does.
    assert_eq!(qemu_dirty(&img, "on"), vec![(0, 64 << 20)]);
}

#[test]
fn resize_keeps_bitmaps_as_qemu_img_does() {
    let dir = tempdir();
    let r = image_with_bitmaps(dir.path());
    let q = dir.path().join("q.qcow2");
    std::fs::copy(&r, &q).unwrap();
    for size in ["128M", "32M"] {
        for (img, tool) in [(&r, "rimg"), (&q, "qemu-img")] {
            let a = ["resize", "--shrink", img.to_str().unwrap(), size];
            ok(if tool == "rimg" {
                rimg(&a)
            } else {
                qemu_img(&a)
            });
            qemu_io(img, &["write 30M 64k"]);
            assert_qemu_check_clean(img);
        }
        assert_eq!(qemu_bitmaps(&r), qemu_bitmaps(&q));
        for b in ["on", "big", "off"] {
            assert_eq!(qemu_dirty(&r, b), qemu_dirty(&q, b), "{b} at {size}");
        }
    }
    // An inconsistent bitmap refuses the resize before anything changes.
    let c = rw(&r);
    std::mem::forget(c);
    let crashed = dir.path().join("crashed.qcow2");
    std::fs::copy(&r, &crashed).unwrap();
    let before = std::fs::read(&crashed).unwrap();
    let o = rimg(&["resize", crashed.to_str().unwrap(), "64M"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is inconsistent"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(std::fs::read(&crashed).unwrap() == before);
}

#[test]
fn a_broken_directory_refuses_every_open() {
    let dir = tempdir();
    let img = image_with_bitmaps(dir.path());
    // The directory's first entry: break its granularity (byte 17).
    let h = qcow2::Header::parse(&std::fs::read(&img).unwrap()[..65536]).unwrap();
    let e = h
        .other_extensions
        .iter()
        .find(|e| e.kind == qcow2::header::ext::BITMAPS)
        .unwrap();
    let dir_off = u64::from_be_bytes(e.data[16..24].try_into().unwrap());
    let mut f = std::fs::read(&img).unwrap();
    f[dir_off as usize + 17] = 40;
    std::fs::write(&img, &f).unwrap();
    let err = open(
        &img,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("doesn't satisfy the constraints"),
        "{err}"
    );
    assert!(
        std::fs::read(&img).unwrap() == f,
        "a refused open changed the file"
    );
    // QEMU loads the bitmaps at every open: read-only too (see
    // bitmaps_damaged.rs for the commands).
    let err = open(&img, &OpenOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("doesn't satisfy the constraints"),
        "{err}"
    );
}

/// Runs `args` with rimg and with qemu-img; both must give the same
/// messages (program name aside) and exit status.
fn same_as_qemu(args: &[&str]) {
    let r = rimg(args);
    let q = qemu_img(args);
    let norm = |o: &std::process::Output| {
        let t = String::from_utf8_lossy(&o.stderr).replace("qemu-img", "rimg");
        // QEMU names the node by a generated name, rimg by the file.
        let t = regex_lite_block(&t);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            t,
        )
    };
    assert_eq!(norm(&r), norm(&q), "{args:?}");
}

/// Replaces the node name in "persistent in '...'" by a placeholder.
fn regex_lite_block(t: &str) -> String {
    match (t.find("persistent in '"), t.find("': ")) {
        (Some(a), Some(b)) if b > a => format!("{}NODE{}", &t[..a + 15], &t[b..]),
        _ => t.to_string(),
    }
}

#[test]
fn bitmap_command_matches_qemu_img() {
    let dir = tempdir();
    let r = dir.path().join("r.qcow2");
    let q = dir.path().join("q.qcow2");
    let v2 = dir.path().join("v2.qcow2");
    for p in [&r, &q] {
        ok(qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            p.to_str().unwrap(),
            "64M",
        ]));
    }
    let v = v2.to_str().unwrap();
    ok(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        v,
        "1M",
    ]));
    for args in [
        vec!["bitmap", "--add", v, "b"],
        vec!["bitmap", v, "b"],
        vec!["bitmap", "--add", v],
        vec!["bitmap", "-g", "4096", "--remove", v, "x"],
        vec!["bitmap", "--add", "-g", "256", v, "z"],
        vec!["bitmap", "--add", "-g", "4G", v, "z"],
        vec!["bitmap", "--add", v, ""],
        vec!["bitmap", "--bogus", v, "x"],
        vec!["bitmap", "--add", "-F", "qcow2", v, "x"],
        vec!["bitmap", "--add", "-b", v, v, "x"],
        vec!["bitmap", "--remove", v, "nope"],
        vec!["bitmap", "--add", "-g"],
        vec!["bitmap", "--add", v, "x", "--merge"],
    ] {
        same_as_qemu(&args);
    }
    // The same edits by both tools, with guest writes between them.
    for (img, tool) in [(&r, "rimg"), (&q, "qemu-img")] {
        let p = img.to_str().unwrap();
        let run = |args: &[&str]| {
            // Options, then the file, then the bitmap name (last).
            let (name, opts) = args.split_last().unwrap();
            let mut a = vec!["bitmap"];
            a.extend_from_slice(opts);
            a.extend([p, *name]);
            let o = if tool == "rimg" {
                rimg(&a)
            } else {
                qemu_img(&a)
            };
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stderr).replace(tool, "X"),
            )
        };
        assert_eq!(run(&["--add", "a"]).0, Some(0));
        assert_eq!(run(&["--add", "-g", "4096", "--disable", "b"]).0, Some(0));
        assert_eq!(run(&["--add", "--remove", "c"]).0, Some(0));
        assert_eq!(
            run(&["--add", "a"]),
            (
                Some(1),
                "X: Operation add on bitmap a failed: Bitmap already exists: a\n".into()
            )
        );
        qemu_io(img, &["write 1M 64k", "write 9M 1k"]);
        assert_eq!(run(&["--merge", "a", "b"]).0, Some(0));
        assert_eq!(run(&["--clear", "a"]).0, Some(0));
        assert_eq!(run(&["--enable", "b"]).0, Some(0));
        assert_eq!(run(&["--disable", "a"]).0, Some(0));
        qemu_io(img, &["write 20M 4k"]);
        assert_eq!(run(&["--add", "-g", "1M", "d"]).0, Some(0));
        assert_eq!(run(&["--merge", "b", "d"]).0, Some(0));
        assert_qemu_check_clean(img);
    }
    assert_eq!(qemu_bitmaps(&r), qemu_bitmaps(&q));
    for b in ["a", "b", "d"] {
        assert_eq!(qemu_dirty(&r, b), qemu_dirty(&q, b), "bitmap {b}");
    }
    // A source in another image (-b).
    for (img, tool) in [(&r, "rimg"), (&q, "qemu-img")] {
        let p = img.to_str().unwrap();
        let other = if tool == "rimg" { &q } else { &r };
        let a = [
            "bitmap",
            "--merge",
            "d",
            "-b",
            other.to_str().unwrap(),
            "-F",
            "qcow2",
            p,
            "a",
        ];
        let o = if tool == "rimg" {
            rimg(&a)
        } else {
            qemu_img(&a)
        };
        ok(o);
    }
    assert_eq!(qemu_dirty(&r, "a"), qemu_dirty(&q, "a"));
    // info shows the bitmaps as qemu-img does, human and JSON.
    for fmt in ["human", "json"] {
        let a = ["info", "--output", fmt, r.to_str().unwrap()];
        assert_eq!(ok(rimg(&a)), ok(qemu_img(&a)), "info --output {fmt}");
    }
}

#[test]
fn measure_reports_bitmaps_size_as_qemu_img() {
    let dir = tempdir();
    let img = image_with_bitmaps(dir.path());
    let p = img.to_str().unwrap();
    for opts in [
        vec!["-O", "qcow2"],
        vec!["--output=json", "-O", "qcow2", "-o", "cluster_size=2M"],
        vec!["-O", "qcow2", "-o", "cluster_size=512"],
        vec!["-O", "qcow2", "-o", "compat=0.10"],
        vec!["-O", "raw"],
    ] {
        let mut a = vec!["measure"];
        a.extend(&opts);
        a.extend(["-f", "qcow2", p]);
        assert_eq!(ok(rimg(&a)), ok(qemu_img(&a)), "{a:?}");
    }
}

#[test]
fn convert_copies_bitmaps_as_qemu_img() {
    let dir = tempdir();
    let src = image_with_bitmaps(dir.path());
    let s = src.to_str().unwrap();
    let out = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let (r, q) = (out("r.qcow2"), out("q.qcow2"));
    ok(rimg(&["convert", "--bitmaps", "-O", "qcow2", s, &r]));
    ok(qemu_img(&["convert", "--bitmaps", "-O", "qcow2", s, &q]));
    let (r, q) = (Path::new(&r), Path::new(&q));
    assert_qemu_check_clean(r);
    assert_eq!(qemu_bitmaps(r), qemu_bitmaps(q));
    for b in ["on", "big", "off"] {
        assert_eq!(qemu_dirty(r, b), qemu_dirty(q, b), "{b}");
    }
    // Refusals, with qemu-img's words.
    let raw = out("x.raw");
    for args in [
        vec!["convert", "--bitmaps", "-O", "raw", s, &raw],
        vec!["convert", "--skip-broken-bitmaps", "-O", "qcow2", s, &raw],
        vec!["convert", "--bitmaps", "-O", "qcow2", "-f", "raw", s, &raw],
        vec!["convert", "--bitmaps", "-O", "qcow2", s, s, &raw],
    ] {
        same_as_qemu(&args);
    }
    // An inconsistent bitmap: refused, or skipped with a warning.
    let c = rw(&src);
    std::mem::forget(c);
    let crashed = out("crashed.qcow2");
    std::fs::copy(&src, &crashed).unwrap();
    let o1 = out("o1.qcow2");
    same_as_qemu(&["convert", "--bitmaps", "-O", "qcow2", &crashed, &o1]);
    let (r2, q2) = (out("r2.qcow2"), out("q2.qcow2"));
    let a = |dst: &str| {
        vec![
            "convert".to_string(),
            "--bitmaps".into(),
            "--skip-broken-bitmaps".into(),
            "-O".into(),
            "qcow2".into(),
            crashed.clone(),
            dst.to_string(),
        ]
    };
    let ra = a(&r2);
    let qa = a(&q2);
    let ro = rimg(&ra.iter().map(String::as_str).collect::<Vec<_>>());
    let qo = qemu_img(&qa.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(ro.status.code(), qo.status.code());
    assert_eq!(
        String::from_utf8_lossy(&ro.stderr).replace("rimg", "qemu-img"),
        String::from_utf8_lossy(&qo.stderr)
    );
    assert_eq!(qemu_bitmaps(Path::new(&r2)), qemu_bitmaps(Path::new(&q2)));
}

/// rimg-vhost-blk serving an image with bitmaps: what a vhost-user-blk
/// client (libblkio) writes, zeroes and discards is what QEMU reads as
/// dirty afterwards; a SIGKILL leaves the bitmaps marked in use.
#[test]
fn vhost_blk_writes_are_recorded_and_a_kill_leaves_them_in_use() {
    use rimg_tests::blk::{Client, Daemon};
    let dir = tempdir();
    let img = image_with_bitmaps(dir.path());
    let off_before = qemu_dirty(&img, "off");
    let sock = dir.path().join("blk.sock");
    let daemon = Daemon::start(&sock, &img, &["--num-queues", "2"]).expect("daemon");
    let mut c = Client::connect(&sock, 2, false).expect("connect");
    let writes = [(2u64 << 20, 4096u64), (5 << 20, 192 << 10), (63 << 20, 512)];
    for (i, &(o, l)) in writes.iter().enumerate() {
        c.write(i % 2, o, &vec![i as u8 + 1; l as usize])
            .expect("write");
    }
    c.write_zeroes(0, 12 << 20, 1 << 20, false)
        .expect("write zeroes");
    c.discard(1, 30 << 20, 2 << 20).expect("discard");
    c.flush(0).expect("flush");
    drop(c);
    let (st, log) = daemon.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    assert_qemu_check_clean(&img);
    let flags = qemu_bitmaps(&img);
    assert!(
        flags.contains(&("on".into(), vec!["auto".into()])),
        "{flags:?}"
    );
    let mut all = vec![(0, 12 << 10)];
    all.extend(writes);
    all.extend([(12 << 20, 1 << 20), (30 << 20, 2 << 20)]);
    assert_eq!(qemu_dirty(&img, "on"), granular(&all, 4096));
    assert_eq!(qemu_dirty(&img, "big"), granular(&all, 65536));
    assert_eq!(qemu_dirty(&img, "off"), off_before);

    // SIGKILL while serving: the enabled bitmaps stay in use on disk.
    let daemon = Daemon::start(&sock, &img, &[]).expect("daemon");
    let mut c = Client::connect(&sock, 1, false).expect("connect");
    c.write(0, 40 << 20, &[7; 4096]).expect("write");
    c.flush(0).expect("flush");
    daemon.signal(libc::SIGKILL);
    drop(c);
    let (_, _) = daemon.terminate();
    let flags = qemu_bitmaps(&img);
    assert!(
        flags.contains(&("on".into(), vec!["in-use".into(), "auto".into()])),
        "{flags:?}"
    );
    assert!(flags.contains(&("off".into(), vec![])), "{flags:?}");
    let o = qemu_img(&["check", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{v}");
}

/// An image whose bitmaps bit a program without bitmap support cleared:
/// the bitmaps no longer count (QEMU ignores them too), their clusters
/// are leaks that both checks report alike and `check -r leaks` frees.
#[test]
fn cleared_autoclear_bit_makes_bitmap_clusters_leaks_as_in_qemu() {
    let dir = tempdir();
    let img = image_with_bitmaps(dir.path());
    let mut f = std::fs::read(&img).unwrap();
    f[88..96].fill(0);
    std::fs::write(&img, &f).unwrap();
    let p = img.to_str().unwrap();
    let r = rimg(&["check", "--output=json", p]);
    let q = qemu_img(&["check", "--output=json", p]);
    let j = |o: &std::process::Output| -> serde_json::Value {
        let mut v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v.as_object_mut().unwrap().remove("filename");
        v
    };
    assert_eq!(r.status.code(), q.status.code());
    assert_eq!(j(&r), j(&q));
    assert!(j(&q)["leaks"].as_u64().unwrap() > 0);
    ok(rimg(&["check", "-r", "leaks", p]));
    assert_qemu_check_clean(&img);
    // Opened for writing, the stale extension goes (as QEMU drops it):
    // qemu-img warns no more.
    drop(rw(&img));
    assert!(qemu_bitmaps(&img).is_empty());
    assert_qemu_check_clean(&img);
    let o = qemu_img(&["info", p]);
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn snapshot_apply_is_refused_with_bitmaps_as_in_qemu() {
    let dir = tempdir();
    let r = dir.path().join("r.qcow2");
    let p = r.to_str().unwrap();
    ok(qemu_img(&["create", "-q", "-f", "qcow2", p, "1M"]));
    ok(qemu_img(&["snapshot", "-c", "s1", p]));
    ok(qemu_img(&["bitmap", "--add", "--disable", p, "b"]));
    same_as_qemu(&["snapshot", "-a", "s1", p]);
    same_as_qemu(&["snapshot", "-a", "nope", p]);
    assert_eq!(qemu_bitmaps(&r), vec![("b".into(), vec![])]);
    assert_qemu_check_clean(&r);
    ok(qemu_img(&["bitmap", "--remove", p, "b"]));
    ok(rimg(&["snapshot", "-a", "s1", p]));
    assert_qemu_check_clean(&r);
}

/// Emptying the top image after a commit changes nothing the guest sees:
/// its bitmaps keep exactly what they had, as with qemu-img (rimg used to
/// mark the whole disk dirty, turning the next incremental backup into a
/// full one). Discard and write-zeroes of the guest still mark.
#[test]
fn commit_leaves_the_top_bitmaps_as_qemu_img_does() {
    let tmp = tempdir();
    let mut dirty = Vec::new();
    for tool in ["qemu-img", "rimg"] {
        let d = tmp.path().join(tool);
        std::fs::create_dir(&d).unwrap();
        let (base, top) = (d.join("base.qcow2"), d.join("top.qcow2"));
        let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
        ok(qemu_img(&["create", "-q", "-f", "qcow2", b, "10M"]));
        qemu_io(&base, &["write -P 1 0 2M"]);
        ok(qemu_img(&["bitmap", "--add", b, "bb"]));
        ok(qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t,
        ]));
        ok(qemu_img(&["bitmap", "--add", t, "tb"]));
        qemu_io(
            &top,
            &[
                "write -P 2 100k 8k",
                "write -z 1M 128k",
                "discard 3M 64k",
                "write -P 3 5M 1k",
            ],
        );
        let before = qemu_dirty(&top, "tb");
        assert_eq!(before.len(), 4, "{before:?}");
        let o = if tool == "rimg" {
            rimg(&["commit", "-q", t])
        } else {
            qemu_img(&["commit", "-q", t])
        };
        ok(o);
        assert_eq!(qemu_dirty(&top, "tb"), before, "{tool}: top's bitmap");
        assert_qemu_check_clean(&top);
        assert_qemu_check_clean(&base);
        dirty.push((qemu_dirty(&base, "bb"), before));
    }
    assert_eq!(dirty[0], dirty[1], "qemu-img (left) and rimg (right)");
}
