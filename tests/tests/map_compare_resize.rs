//! `rimg map`, `compare`, `resize` and `dd` side by side with qemu-img on
//! the same inputs (raw, qcow2 with 64 KiB and 512-byte clusters, data,
//! zero and compressed clusters, a raw <- qcow2 <- qcow2 backing chain, a
//! metadata-preallocated image, version 2): same map output, same compare
//! verdicts and exit codes, resized copies that `qemu-img check` passes
//! with the same content and layout as qemu-img's, same dd output.

use std::path::{Path, PathBuf};
use std::process::Output;

use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, ok_as as ok, qemu_img, rimg, run, tempdir,
};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// qemu-io commands on an image of format `fmt`.
fn qio(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(s(img));
    ok(run("qemu-io", &args), &format!("qemu-io {cmds:?}"));
}

fn create(path: &Path, fmt: &str, opts: &[&str], size: &str) {
    let mut args = vec!["create", "-q", "-f", fmt];
    for o in opts {
        args.extend(["-o", o]);
    }
    args.extend([s(path), size]);
    ok(qemu_img(&args), "qemu-img create");
}

struct Input {
    path: PathBuf,
    fmt: &'static str,
}

/// The test inputs, made by qemu-img and qemu-io in `d`.
fn inputs(d: &Path) -> Vec<Input> {
    let p = |n: &str| d.join(n);
    // Raw: data, holes, a zeroed range and data up to the end.
    create(&p("raw.raw"), "raw", &[], "4M");
    qio(
        &p("raw.raw"),
        "raw",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 1M 200k",
            "write -z 2M 64k",
            "write -P 0x33 4000k 96k",
        ],
    );
    // Raw whose length is not a whole number of sectors.
    std::fs::write(p("odd.raw"), vec![0x5au8; 1000]).unwrap();
    // qcow2, 64 KiB clusters: data, preallocated and plain zero clusters,
    // compressed clusters, a partial cluster at the end of the data.
    create(&p("q64.qcow2"), "qcow2", &[], "16M");
    qio(
        &p("q64.qcow2"),
        "qcow2",
        &[
            "write -P 0x11 0 3M",
            "write -z 1M 512k",
            "write -z -u 2560k 128k",
            "write -P 0x22 5M 64k",
            "write -c -P 0x33 8M 64k",
            "write -c -P 0x34 8256k 64k",
            "write -P 0x44 15M 100k",
        ],
    );
    // qcow2, 512-byte clusters: many small L2 tables and refcount blocks.
    create(&p("q512.qcow2"), "qcow2", &["cluster_size=512"], "4M");
    qio(
        &p("q512.qcow2"),
        "qcow2",
        &[
            "write -P 1 0 100k",
            "write -P 2 1M 300k",
            "write -z 1100k 10k",
            "write -z -u 2M 64k",
            "write -c -P 3 3M 64k",
            "write -P 4 4000k 96k",
        ],
    );
    // Backing chain: raw <- qcow2 <- qcow2, each longer than the one below.
    create(&p("base.raw"), "raw", &[], "6M");
    qio(
        &p("base.raw"),
        "raw",
        &["write -P 5 0 1M", "write -P 6 5M 512k"],
    );
    ok(
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&p("mid.qcow2")),
            "8M",
        ]),
        "create mid",
    );
    qio(
        &p("mid.qcow2"),
        "qcow2",
        &[
            "write -P 7 512k 1M",
            "write -z 5M 64k",
            "write -c -P 8 6M 64k",
        ],
    );
    ok(
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&p("top.qcow2")),
            "12M",
        ]),
        "create top",
    );
    qio(
        &p("top.qcow2"),
        "qcow2",
        &["write -P 9 7M 2M", "write -z 0 64k", "write -P 10 300k 4k"],
    );
    // Metadata preallocation: data clusters that are holes in the file.
    create(&p("pre.qcow2"), "qcow2", &["preallocation=metadata"], "4M");
    qio(&p("pre.qcow2"), "qcow2", &["write -P 1 64k 64k"]);
    // Version 2 (no zero clusters).
    create(&p("v2.qcow2"), "qcow2", &["compat=0.10"], "8M");
    qio(
        &p("v2.qcow2"),
        "qcow2",
        &[
            "write -P 1 0 1M",
            "write -c -P 2 2M 128k",
            "write -P 3 7M 4k",
        ],
    );
    [
        ("raw.raw", "raw"),
        ("odd.raw", "raw"),
        ("q64.qcow2", "qcow2"),
        ("q512.qcow2", "qcow2"),
        ("base.raw", "raw"),
        ("mid.qcow2", "qcow2"),
        ("top.qcow2", "qcow2"),
        ("pre.qcow2", "qcow2"),
        ("v2.qcow2", "qcow2"),
    ]
    .into_iter()
    .map(|(n, fmt)| Input { path: p(n), fmt })
    .collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The error message without the program name.
fn message(o: &Output) -> String {
    let e = text(&o.stderr);
    e.lines()
        .filter(|l| !l.contains("warning:") && !l.starts_with("WARNING") && !l.starts_with(' '))
        .map(|l| {
            l.trim_start_matches("rimg: ")
                .trim_start_matches("qemu-img: ")
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the same arguments through both tools; asserts the same exit
/// code and stdout, and that rimg's stderr is at most one line.
fn same(args: &[&str]) -> (Output, Output) {
    let a = rimg(args);
    let b = qemu_img(args);
    assert_eq!(
        a.status.code(),
        b.status.code(),
        "{args:?}: exit codes differ\nrimg: {}{}\nqemu: {}{}",
        text(&a.stdout),
        text(&a.stderr),
        text(&b.stdout),
        text(&b.stderr)
    );
    assert_eq!(
        text(&a.stdout),
        text(&b.stdout),
        "{args:?}: stdout differs\nrimg stderr: {}",
        text(&a.stderr)
    );
    let err = text(&a.stderr);
    assert!(err.lines().count() <= 1, "{args:?}: stderr {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    (a, b)
}

#[test]
fn map_matches_qemu_img() {
    let d = tempdir();
    for i in inputs(d.path()) {
        let f = s(&i.path);
        let variants: &[&[&str]] = &[
            &[],
            &["--start-offset", "1M", "--max-length", "3M"],
            &["--start-offset", "1000", "--max-length", "2000"],
            &["--start-offset", "0x100000"],
            &["--max-length", "0"],
            &["--start-offset", "1G"],
        ];
        for v in variants {
            for output in ["json", "human"] {
                let out = format!("--output={output}");
                let mut args = vec!["map", "-f", i.fmt, &out];
                args.extend(*v);
                args.push(f);
                let (a, b) = same(&args);
                assert_eq!(message(&a), message(&b), "{args:?}");
                if output == "json" && b.status.success() {
                    let va: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
                    let vb: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
                    assert_eq!(va, vb, "{args:?}");
                }
            }
        }
        // A qcow2 image read as raw: its file's data and holes.
        if i.fmt == "qcow2" {
            same(&["map", "-f", "raw", "--output=json", f]);
        }
        // Probed format.
        same(&["map", "--output=json", f]);
    }
}

#[test]
fn compare_matches_qemu_img() {
    let d = tempdir();
    let ins = inputs(d.path());
    let p = |n: &str| d.path().join(n);
    for (k, i) in ins.iter().enumerate() {
        let f = s(&i.path);
        let ext = i.fmt;
        // Identical copy.
        let copy = p(&format!("copy{k}.{ext}"));
        std::fs::copy(&i.path, &copy).unwrap();
        // The same content in the other format (other allocation).
        let other_fmt = if ext == "raw" { "qcow2" } else { "raw" };
        let conv = p(&format!("conv{k}.{other_fmt}"));
        ok(
            qemu_img(&["convert", "-f", ext, "-O", other_fmt, f, s(&conv)]),
            "convert",
        );
        // One sector changed in the middle of a sector.
        let changed = p(&format!("changed{k}.{ext}"));
        std::fs::copy(&i.path, &changed).unwrap();
        let size = qemu_len(&i.path);
        let at = (size / 3) | 100;
        qio(&changed, ext, &[&format!("write -P 0x99 {at} 1")]);
        // Longer, reading zeros past the original end; and with data there.
        let longer = p(&format!("longer{k}.{ext}"));
        std::fs::copy(&i.path, &longer).unwrap();
        ok(
            qemu_img(&["resize", "-q", "-f", ext, s(&longer), "+1M"]),
            "resize",
        );
        let longer_data = p(&format!("longerdata{k}.{ext}"));
        std::fs::copy(&longer, &longer_data).unwrap();
        let tail = qemu_len(&longer_data) - 3000;
        qio(&longer_data, ext, &[&format!("write -P 0x77 {tail} 10")]);

        let pairs: Vec<(String, String, &str, &str)> = vec![
            (f.into(), s(&copy).into(), ext, ext),
            (f.into(), s(&conv).into(), ext, other_fmt),
            (s(&conv).into(), f.into(), other_fmt, ext),
            (f.into(), s(&changed).into(), ext, ext),
            (f.into(), s(&longer).into(), ext, ext),
            (s(&longer).into(), f.into(), ext, ext),
            (f.into(), s(&longer_data).into(), ext, ext),
            (s(&longer_data).into(), f.into(), ext, ext),
        ];
        for (a, b, fa, fb) in &pairs {
            for flags in [&[][..], &["-s"], &["-q"], &["-s", "-q"]] {
                let mut args = vec!["compare", "-f", fa, "-F", fb];
                args.extend(flags);
                args.extend([a.as_str(), b.as_str()]);
                same(&args);
            }
            // Formats probed.
            same(&["compare", a, b]);
        }
    }
    // A missing image: exit 2 from both.
    let f = s(&ins[2].path);
    let (a, _) = same(&["compare", f, "/nonexistent/x.qcow2"]);
    assert_eq!(a.status.code(), Some(2));
    let (a, _) = same(&["compare", "-f", "bogus", f, f]);
    assert_eq!(a.status.code(), Some(2));
}

/// Two images of 1 TiB with a few writes: compare must skip what neither
/// stores rather than read it (reading would take minutes).
#[test]
fn compare_skips_unallocated_ranges() {
    let d = tempdir();
    let (a, b) = (d.path().join("a.qcow2"), d.path().join("b.qcow2"));
    for x in [&a, &b] {
        create(x, "qcow2", &[], "1T");
        qio(x, "qcow2", &["write -P 1 0 64k", "write -P 2 700G 1M"]);
    }
    let (o, _) = same(&["compare", s(&a), s(&b)]);
    assert_eq!(o.status.code(), Some(0));
    qio(&b, "qcow2", &["write -P 3 900G 512"]);
    let (o, _) = same(&["compare", s(&a), s(&b)]);
    assert_eq!(
        text(&o.stdout),
        "Content mismatch at offset 966367641600!\n"
    );
    assert_eq!(o.status.code(), Some(1));
}

/// Length of an image as qemu-img reports it.
fn qemu_len(p: &Path) -> u64 {
    info(p)["virtual-size"].as_u64().unwrap()
}

fn info(p: &Path) -> serde_json::Value {
    let o = ok(qemu_img(&["info", "--output=json", s(p)]), "info");
    serde_json::from_slice(&o.stdout).unwrap()
}

fn map_json(p: &Path) -> String {
    text(&ok(qemu_img(&["map", "--output=json", s(p)]), "map").stdout)
}

#[test]
fn resize_matches_qemu_img() {
    let d = tempdir();
    let mut ins = inputs(d.path());
    let p = |n: &str| d.path().join(n);
    // Internal snapshots (version 3 may be resized, version 2 not).
    for (n, src) in [("snap.qcow2", "q512.qcow2"), ("snapv2.qcow2", "v2.qcow2")] {
        std::fs::copy(p(src), p(n)).unwrap();
        ok(qemu_img(&["snapshot", "-c", "s1", s(&p(n))]), "snapshot");
        qio(
            &p(n),
            "qcow2",
            &["write -P 0x66 50k 20k", "write -P 0x67 3M 8k"],
        );
        ins.push(Input {
            path: p(n),
            fmt: "qcow2",
        });
    }
    // Overlays over a longer backing file: growing must not let it show
    // through (version 3 writes zero clusters, version 2 cannot).
    create(&p("long.qcow2"), "qcow2", &[], "8M");
    qio(&p("long.qcow2"), "qcow2", &["write -P 0x55 0 8M"]);
    // The odd one ends inside a cluster: preallocating the new area must
    // keep that cluster's head from the backing file.
    for (n, compat, size) in [
        ("short.qcow2", "compat=1.1", "4M"),
        ("shortv2.qcow2", "compat=0.10", "4M"),
        ("shortodd.qcow2", "compat=1.1", "4193792"),
    ] {
        ok(
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                compat,
                "-b",
                "long.qcow2",
                "-F",
                "qcow2",
                s(&p(n)),
                size,
            ]),
            "create overlay",
        );
        ins.push(Input {
            path: p(n),
            fmt: "qcow2",
        });
    }
    let cases: &[&[&str]] = &[
        &["+4M"],
        &["-1M"],
        &["--shrink", "-1M"],
        &["--shrink", "1M"],
        &["--shrink", "100k"],
        &["--shrink", "-3500k"],
        &["6M"],
        &["+1000"],
        &["--shrink", "1000"],
        &["--shrink", "-0"],
        &["+3000k"],
        &["--shrink", "-100M"],
        &["--preallocation=falloc", "+1M"],
        &["--preallocation=full", "+1M"],
        &["--preallocation=metadata", "+1M"],
        &["--shrink", "--preallocation=full", "-1M"],
    ];
    for (k, i) in ins.iter().enumerate() {
        for (c, case) in cases.iter().enumerate() {
            let name = i.path.file_name().unwrap().to_str().unwrap();
            let mine = p(&format!("m{k}-{c}-{name}"));
            let theirs = p(&format!("q{k}-{c}-{name}"));
            std::fs::copy(&i.path, &mine).unwrap();
            std::fs::copy(&i.path, &theirs).unwrap();
            let run_on = |img: &Path| {
                let mut args = vec!["resize", "-f", i.fmt];
                args.extend(*case);
                let (size, opts) = args.split_last().map(|(l, r)| (*l, r.to_vec())).unwrap();
                let mut args = opts;
                args.extend([s(img), size]);
                args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
            };
            let am = run_on(&mine);
            let am: Vec<&str> = am.iter().map(String::as_str).collect();
            let at = run_on(&theirs);
            let at: Vec<&str> = at.iter().map(String::as_str).collect();
            let a = rimg(&am);
            let b = qemu_img(&at);
            let what = format!("{name} {case:?}");
            assert_eq!(
                a.status.code(),
                b.status.code(),
                "{what}: rimg {}{} / qemu {}{}",
                text(&a.stdout),
                text(&a.stderr),
                text(&b.stdout),
                text(&b.stderr)
            );
            assert_eq!(text(&a.stdout), text(&b.stdout), "{what}");
            assert_eq!(message(&a), message(&b), "{what}");
            let err = text(&a.stderr);
            assert!(
                err.lines().count() <= 1 && !err.contains("panicked"),
                "{what}: {err}"
            );
            if i.fmt == "qcow2" {
                assert_qemu_check_clean(&mine);
            }
            assert_eq!(qemu_len(&mine), qemu_len(&theirs), "{what}");
            assert_qemu_compare_equal(&mine, &theirs);
            // Same clusters mapped the same way (preallocation lays out
            // new clusters differently, so only content counts there).
            if !case[0].starts_with("--preallocation") {
                assert_eq!(map_json(&mine), map_json(&theirs), "{what}");
                let (lm, lt) = (
                    std::fs::metadata(&mine).unwrap().len(),
                    std::fs::metadata(&theirs).unwrap().len(),
                );
                // A shrink may leave qemu-img's self-describing refcount
                // block at the old end of the file; rimg frees it and
                // truncates, so it is only held to "no larger".
                // qemu-img leaves a grown L1 table unpadded at the end of
                // the file; rimg pads it to a cluster.
                let cs = info(&theirs)
                    .get("cluster-size")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(1);
                if case.contains(&"--shrink") {
                    assert!(lm <= lt, "{what}: file length {lm} > qemu-img's {lt}");
                } else {
                    assert_eq!(lm.div_ceil(cs), lt.div_ceil(cs), "{what}: file length");
                }
            }
            let (im, it) = (info(&mine), info(&theirs));
            assert_eq!(im.get("snapshots"), it.get("snapshots"), "{what}");
        }
    }
    // Applying the snapshot taken before a shrink brings back the data.
    let m = ins
        .iter()
        .position(|i| i.path.ends_with("snap.qcow2"))
        .unwrap();
    let c = cases
        .iter()
        .position(|c| *c == ["--shrink", "100k"])
        .unwrap();
    let shrunk = p(&format!("m{m}-{c}-snap.qcow2"));
    ok(
        qemu_img(&["snapshot", "-a", "s1", s(&shrunk)]),
        "snapshot -a",
    );
    assert_qemu_check_clean(&shrunk);
    assert_qemu_compare_equal(&shrunk, &p("q512.qcow2"));
}

#[test]
fn dd_matches_qemu_img() {
    let d = tempdir();
    let ins = inputs(d.path());
    let cases: &[&[&str]] = &[
        &[],
        &["-O", "qcow2"],
        &["bs=1M", "count=3"],
        &["bs=1M", "count=3", "skip=1"],
        &["-O", "qcow2", "bs=64k", "skip=3"],
        &["bs=1M", "skip=2"],
        &["bs=1M", "skip=100"],
        &["bs=1M", "skip=4"],
        &["bs=1M", "count=100"],
        &["bs=1000", "count=3"],
        &["-O", "qcow2", "bs=7", "count=3"],
        &["count=0"],
        &["bs=1.5k", "count=5", "skip=2"],
    ];
    for (k, i) in ins.iter().enumerate() {
        for (c, case) in cases.iter().enumerate() {
            let out_fmt = if case.contains(&"qcow2") {
                "qcow2"
            } else {
                "raw"
            };
            let mine = d.path().join(format!("dd-m{k}-{c}.{out_fmt}"));
            let theirs = d.path().join(format!("dd-q{k}-{c}.{out_fmt}"));
            let ifarg = format!("if={}", s(&i.path));
            let args = |of: &Path| {
                let mut v: Vec<String> = vec!["dd".into(), "-f".into(), i.fmt.into()];
                v.extend(case.iter().map(|x| x.to_string()));
                v.push(ifarg.clone());
                v.push(format!("of={}", s(of)));
                v
            };
            let am = args(&mine);
            let at = args(&theirs);
            let a = rimg(&am.iter().map(String::as_str).collect::<Vec<_>>());
            let b = qemu_img(&at.iter().map(String::as_str).collect::<Vec<_>>());
            let what = format!("{:?} {case:?}", i.path.file_name().unwrap());
            assert_eq!(
                a.status.code(),
                b.status.code(),
                "{what}: {}",
                text(&a.stderr)
            );
            assert_eq!(message(&a), message(&b), "{what}");
            assert_eq!(text(&a.stdout), text(&b.stdout), "{what}");
            if b.status.success() {
                assert_eq!(qemu_len(&mine), qemu_len(&theirs), "{what}");
                assert_qemu_compare_equal(&mine, &theirs);
                if out_fmt == "qcow2" {
                    assert_qemu_check_clean(&mine);
                }
            }
        }
    }
}

/// Bad usage and missing files: the same exit code as qemu-img, one line
/// on stderr, never a panic.
#[test]
fn bad_usage_is_one_line() {
    let d = tempdir();
    let img = d.path().join("x.qcow2");
    create(&img, "qcow2", &[], "1M");
    let x = s(&img);
    let out = d.path().join("out.raw");
    let of = format!("of={}", s(&out));
    let ifx = format!("if={x}");
    let cases: Vec<Vec<&str>> = vec![
        vec!["map"],
        vec!["map", "/nonexistent/x.qcow2"],
        vec!["map", "--output=xml", x],
        vec!["map", "--start-offset", "abc", x],
        vec!["map", "--max-length=-1", x],
        vec!["map", "-f", "bogus", x],
        vec!["map", x, x],
        vec!["compare", x],
        vec!["compare", x, "/nonexistent/x.qcow2"],
        vec!["compare", "/nonexistent/x.qcow2", x],
        vec!["compare", "-x", x, x],
        vec!["resize", x],
        vec!["resize", "/nonexistent/x.qcow2", "1M"],
        vec!["resize", x, "abc"],
        vec!["resize", x, "+-1"],
        vec!["resize", "--preallocation=bogus", x, "+1M"],
        vec!["resize", "--shrink", x, "-100M"],
        vec!["resize", "--shrink", x, "0"],
        vec!["resize", x, "512k"],
        vec!["resize", "--shrink", "--preallocation=falloc", x, "-512k"],
        vec!["dd"],
        vec!["dd", &ifx],
        vec!["dd", &of],
        vec!["dd", "if=/nonexistent/x.qcow2", &of],
        vec!["dd", "bs=0", &ifx, &of],
        vec!["dd", "bs=abc", &ifx, &of],
        vec!["dd", "count=1k", &ifx, &of],
        vec!["dd", "skip=-1", &ifx, &of],
        vec!["dd", "foo=1", &ifx, &of],
        vec!["dd", "bar", &ifx, &of],
    ];
    for args in cases {
        let a = rimg(&args);
        let b = qemu_img(&args);
        let err = text(&a.stderr);
        assert_ne!(a.status.code(), Some(0), "{args:?}");
        assert_eq!(a.status.code(), b.status.code(), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// A qcow2 header whose size is not whole sectors (another tool's, or a
/// hand edit): QEMU sees the disk rounded down to a sector and writes
/// that size back; rimg the same: info, map, dd and a resize agree.
#[test]
fn a_size_in_part_sectors_is_rounded_down_as_qemu() {
    let d = tempdir();
    let p = |n: &str| d.path().join(n);
    for who in ["qemu", "rimg"] {
        let img = p(&format!("{who}.qcow2"));
        create(&img, "qcow2", &[], "1M");
        qio(&img, "qcow2", &["write -P 0x5a 1047552 512"]);
        // 1048476: 412 bytes into the last sector but one.
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &1_048_476u64.to_be_bytes(), 24).unwrap();
    }
    let (q, r) = (p("qemu.qcow2"), p("rimg.qcow2"));
    let json = |tool: &str, args: &[&str]| -> serde_json::Value {
        let o = match tool {
            "rimg" => rimg(args),
            _ => qemu_img(args),
        };
        serde_json::from_slice(&ok(o, "info").stdout).unwrap()
    };
    let size =
        |tool, img: &Path| json(tool, &["info", "--output=json", s(img)])["virtual-size"].clone();
    assert_eq!(size("rimg", &r), size("qemu-img", &q));
    assert_eq!(size("rimg", &r), serde_json::json!(1_048_064));
    same(&["map", "--output=json", s(&r)]);
    let (dr, dq) = (p("r.raw"), p("q.raw"));
    ok(
        rimg(&[
            "dd",
            "-O",
            "raw",
            &format!("if={}", s(&r)),
            &format!("of={}", s(&dr)),
        ]),
        "dd",
    );
    ok(
        qemu_img(&[
            "dd",
            "-O",
            "raw",
            &format!("if={}", s(&q)),
            &format!("of={}", s(&dq)),
        ]),
        "dd",
    );
    assert!(std::fs::read(&dr).unwrap() == std::fs::read(&dq).unwrap());
    // A resize writes the header back: both write the rounded size's
    // successor, and the data stays.
    ok(rimg(&["resize", s(&r), "+512"]), "rimg resize");
    ok(qemu_img(&["resize", s(&q), "+512"]), "qemu-img resize");
    assert_eq!(size("qemu-img", &r), size("qemu-img", &q));
    assert_qemu_check_clean(&r);
    assert_qemu_compare_equal(&r, &q);
}
