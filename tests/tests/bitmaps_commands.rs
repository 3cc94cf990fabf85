//! The bitmap-aware commands against qemu-img: `bitmap`, and measure,
//! convert, snapshot and commit on images with persistent dirty bitmaps
//! must print, exit and leave bitmaps as qemu-img's do. (bitmaps.rs has
//! the library and daemon writers.)

use std::path::Path;

use rimg_tests::bitmaps::{image_with_bitmaps, qemu_bitmaps, qemu_dirty};
use rimg_tests::image::open_rw as rw;
use rimg_tests::{
    assert_qemu_check_clean, ok, qemu_create, qemu_img, qemu_io, rimg, tempdir, tool,
};

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
        qemu_create(p, "", "64M");
    }
    qemu_create(&v2, "compat=0.10", "1M");
    let v = v2.to_str().unwrap();
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
    for (img, prog) in [(&r, "rimg"), (&q, "qemu-img")] {
        let p = img.to_str().unwrap();
        let run = |args: &[&str]| {
            // Options, then the file, then the bitmap name (last).
            let (name, opts) = args.split_last().unwrap();
            let mut a = vec!["bitmap"];
            a.extend_from_slice(opts);
            a.extend([p, *name]);
            let o = tool(prog, &a);
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stderr).replace(prog, "X"),
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
    for (img, prog) in [(&r, "rimg"), (&q, "qemu-img")] {
        let p = img.to_str().unwrap();
        let other = if prog == "rimg" { &q } else { &r };
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
        ok(tool(prog, &a));
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

#[test]
fn snapshot_apply_is_refused_with_bitmaps_as_in_qemu() {
    let dir = tempdir();
    let r = dir.path().join("r.qcow2");
    let p = r.to_str().unwrap();
    qemu_create(&r, "", "1M");
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
    for prog in ["qemu-img", "rimg"] {
        let d = tmp.path().join(prog);
        std::fs::create_dir(&d).unwrap();
        let (base, top) = (d.join("base.qcow2"), d.join("top.qcow2"));
        let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
        qemu_create(&base, "", "10M");
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
        ok(tool(prog, &["commit", "-q", t]));
        assert_eq!(qemu_dirty(&top, "tb"), before, "{prog}: top's bitmap");
        assert_qemu_check_clean(&top);
        assert_qemu_check_clean(&base);
        dirty.push((qemu_dirty(&base, "bb"), before));
    }
    assert_eq!(dirty[0], dirty[1], "qemu-img (left) and rimg (right)");
}
