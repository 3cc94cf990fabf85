//! `rimg amend` and `rimg measure` side by side with qemu-img on copies of
//! the same inputs: same content, same header fields, `qemu-img check`
//! clean, same measure JSON.

use std::path::Path;

use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, ok_as as ok, qemu_create, qemu_img,
    qemu_overlay, run, tempdir, workspace_bin,
};

/// A qcow2 image with data, zero clusters and a compressed cluster.
fn populated(path: &Path, opts: &str) {
    let p = path.to_str().unwrap();
    qemu_create(p, opts, "16M");
    ok(
        run(
            "qemu-io",
            &[
                "-c",
                "write -P 0x11 0 3M",
                "-c",
                "write -z 1M 512k",
                "-c",
                "write -P 0x22 5M 64k",
                "-c",
                "write -c -P 0x33 8M 64k",
                "-c",
                "write -P 0x44 15M 100k",
                p,
            ],
        ),
        "qemu-io",
    );
}

fn info_json(path: &Path) -> serde_json::Value {
    let o = ok(
        qemu_img(&["info", "--output=json", path.to_str().unwrap()]),
        "info",
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn amend_matches_qemu_img() {
    let rimg = workspace_bin("rimg");
    let d = tempdir();
    let cases: &[(&str, &str)] = &[
        ("compat=1.1", "refcount_bits=1"),
        ("compat=1.1", "refcount_bits=64"),
        ("compat=1.1,refcount_bits=4", "refcount_bits=16"),
        ("compat=1.1", "compat=0.10"),
        ("compat=0.10", "compat=1.1"),
        ("compat=1.1", "lazy_refcounts=on"),
        ("compat=1.1,lazy_refcounts=on", "lazy_refcounts=off"),
        // A downgrade drops lazy refcounts unless asked to keep them (061).
        ("compat=1.1,lazy_refcounts=on", "compat=0.10"),
        (
            "compat=1.1,lazy_refcounts=on",
            "compat=0.10,lazy_refcounts=on",
        ),
        (
            "compat=1.1,cluster_size=4096",
            "refcount_bits=8,lazy_refcounts=on",
        ),
        // 4 KiB compressed clusters pack 16 to a host cluster: a refcount
        // of 16 does not fit in 2 bits, and both tools refuse.
        ("compat=1.1,cluster_size=4096", "refcount_bits=2"),
    ];
    for (i, (create_opts, amend_opts)) in cases.iter().enumerate() {
        let src = d.path().join(format!("src{i}.qcow2"));
        populated(&src, create_opts);
        let mine = d.path().join(format!("mine{i}.qcow2"));
        let theirs = d.path().join(format!("theirs{i}.qcow2"));
        std::fs::copy(&src, &mine).unwrap();
        std::fs::copy(&src, &theirs).unwrap();
        let a = run(
            rimg.to_str().unwrap(),
            &["amend", "-o", amend_opts, mine.to_str().unwrap()],
        );
        let b = qemu_img(&["amend", "-o", amend_opts, theirs.to_str().unwrap()]);
        assert_eq!(
            a.status.code(),
            b.status.code(),
            "{amend_opts}: rimg {}\nqemu {}",
            String::from_utf8_lossy(&a.stderr),
            String::from_utf8_lossy(&b.stderr)
        );
        assert_qemu_check_clean(&mine);
        if !a.status.success() {
            assert_eq!(String::from_utf8_lossy(&a.stderr).lines().count(), 1);
            assert_qemu_compare_equal(&mine, &src);
            continue;
        }
        assert_qemu_compare_equal(&mine, &src);
        assert_qemu_compare_equal(&mine, &theirs);
        let (vm, vt) = (info_json(&mine), info_json(&theirs));
        let fm = &vm["format-specific"]["data"];
        let ft = &vt["format-specific"]["data"];
        for key in ["compat", "refcount-bits", "lazy-refcounts", "corrupt"] {
            assert_eq!(fm[key], ft[key], "{amend_opts}: {key}");
        }
    }
}

#[test]
fn amend_backing_fields_and_errors() {
    let rimg = workspace_bin("rimg");
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    populated(&base, "compat=1.1");
    let top = d.path().join("top.qcow2");
    qemu_overlay(&top, "base.qcow2", &[]);
    std::fs::copy(&base, d.path().join("other.qcow2")).unwrap();
    // Changing the backing file by amend is refused by both (QEMU removed
    // it in 6.1: rebase -u does it); restating it as it is works.
    for (opts, changes) in [
        ("backing_file=other.qcow2,backing_fmt=qcow2", true),
        ("backing_file=base.qcow2", true),
        ("backing_fmt=qcow2", true),
        ("backing_file=base.qcow2,backing_fmt=qcow2", false),
    ] {
        for tool in [rimg.to_str().unwrap(), "qemu-img"] {
            let o = run(tool, &["amend", "-o", opts, top.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&o.stderr);
            if changes {
                assert_eq!(o.status.code(), Some(1), "{tool} amend {opts}: {err}");
                assert!(
                    err.contains("Cannot amend the backing file"),
                    "{tool}: {err}"
                );
            } else {
                assert!(o.status.success(), "{tool} amend {opts}: {err}");
            }
            let v = info_json(&top);
            assert_eq!(v["backing-filename"], "base.qcow2");
            assert_eq!(v["backing-filename-format"], "qcow2");
        }
    }
    assert_qemu_check_clean(&top);

    // Changing cluster_size is refused by both, with a non-zero exit.
    for tool in [rimg.to_str().unwrap(), "qemu-img"] {
        let o = run(
            tool,
            &["amend", "-o", "cluster_size=4096", base.to_str().unwrap()],
        );
        assert_eq!(o.status.code(), Some(1), "{tool} cluster_size");
    }
    // A missing file: one line, exit 1.
    let o = run(
        rimg.to_str().unwrap(),
        &["amend", "-o", "compat=1.1", "/nonexistent/x.qcow2"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&o.stderr).lines().count(), 1);
}

#[test]
fn measure_matches_qemu_img() {
    let rimg = workspace_bin("rimg");
    let d = tempdir();
    let src = d.path().join("src.qcow2");
    populated(&src, "compat=1.1");
    let raw = d.path().join("src.raw");
    ok(
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            src.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]),
        "convert",
    );
    let s = src.to_str().unwrap();
    let r = raw.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["--size", "10G", "-O", "qcow2"],
        vec!["--size", "1T", "-O", "qcow2", "-o", "cluster_size=2M"],
        vec!["--size", "100M", "-O", "qcow2", "-o", "preallocation=full"],
        vec!["--size", "100M", "-O", "raw"],
        vec!["-O", "qcow2", s],
        vec!["-O", "qcow2", r],
        vec!["-O", "raw", s],
        vec!["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1", s],
    ];
    for c in cases {
        let mut args = vec!["measure", "--output=json"];
        args.extend(&c);
        let a = ok(run(rimg.to_str().unwrap(), &args), "rimg measure");
        let b = ok(qemu_img(&args), "qemu-img measure");
        let va: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
        let vb: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
        assert_eq!(va, vb, "measure {c:?}");
        let mut human = vec!["measure"];
        human.extend(&c);
        let a = ok(run(rimg.to_str().unwrap(), &human), "rimg measure");
        let b = ok(qemu_img(&human), "qemu-img measure");
        assert_eq!(a.stdout, b.stdout, "measure human {c:?}");
    }
}
