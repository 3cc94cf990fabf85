//! `rimg convert` side by side with `qemu-img convert` on the same inputs:
//! the same content (qemu-img compare), qemu-img check clean on what rimg
//! wrote, comparable allocation, and the same exit codes on errors.

use std::path::{Path, PathBuf};

use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, ok, qemu_img, qemu_io, qemu_overlay, run,
    tempdir, tool, workspace_bin,
};
use serde_json::Value;

/// Bytes of guest data that are allocated (data: true) in the top layer.
fn allocated(img: &Path) -> u64 {
    let o = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true && e["depth"] == 0)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

struct Inputs {
    _dir: tempfile::TempDir,
    dir: PathBuf,
}

/// A raw image with data, zeros and holes; a qcow2 chain of three with
/// zero clusters and compressed clusters.
fn inputs() -> Inputs {
    let d = tempdir();
    let dir = d.path().to_path_buf();
    let raw = dir.join("src.raw");
    {
        let mut v = vec![0u8; 24 << 20];
        for (i, b) in v.iter_mut().enumerate().take(5 << 20).skip(1 << 20) {
            *b = (i * 7 % 251) as u8;
        }
        v[(9 << 20) + 12345] = 1;
        for (i, b) in v.iter_mut().enumerate().skip(20 << 20) {
            *b = (i % 13) as u8;
        }
        std::fs::write(&raw, &v).unwrap();
        // A real hole in the middle.
        let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        f.set_len(24 << 20).unwrap();
    }
    let base = dir.join("base.qcow2");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "24M"])
            .status
            .success()
    );
    qemu_io(
        &base,
        &[
            "write -P 0x11 0 8M",
            "write -c -P 0x12 8M 1M",
            "write -P 0x13 16M 64k",
        ],
    );
    qemu_overlay(&mid, "base.qcow2", &[]);
    qemu_io(
        &mid,
        &[
            "write -P 0x21 1M 100k",
            "write -z 2M 1M",
            "write -P 0x22 8200k 64k",
        ],
    );
    qemu_overlay(&top, "mid.qcow2", &[]);
    qemu_io(
        &top,
        &[
            "write -P 0x31 4000k 300k",
            "write -z 16M 64k",
            "write -P 0 20M 64k",
        ],
    );
    Inputs { _dir: d, dir }
}

#[test]
fn convert_matches_qemu_img() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let inp = inputs();
    let d = &inp.dir;
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let cases: Vec<(&str, Vec<String>, bool)> = vec![
        (
            "raw to qcow2",
            vec!["-O".into(), "qcow2".into(), p("src.raw")],
            true,
        ),
        (
            "raw to raw",
            vec!["-O".into(), "raw".into(), p("src.raw")],
            false,
        ),
        (
            "chain flattened to qcow2",
            vec!["-O".into(), "qcow2".into(), p("top.qcow2")],
            true,
        ),
        (
            "chain to raw",
            vec!["-O".into(), "raw".into(), p("top.qcow2")],
            false,
        ),
        (
            "chain to qcow2 512b v2",
            vec![
                "-O".into(),
                "qcow2".into(),
                "-o".into(),
                "cluster_size=512,compat=0.10".into(),
                p("top.qcow2"),
            ],
            true,
        ),
        (
            "compressed zlib",
            vec!["-c".into(), "-O".into(), "qcow2".into(), p("top.qcow2")],
            true,
        ),
        (
            "compressed zstd 4k",
            vec![
                "-c".into(),
                "-O".into(),
                "qcow2".into(),
                "-o".into(),
                "compression_type=zstd,cluster_size=4k".into(),
                p("src.raw"),
            ],
            true,
        ),
        (
            "sparse 64k",
            vec![
                "-S".into(),
                "64k".into(),
                "-O".into(),
                "raw".into(),
                p("top.qcow2"),
            ],
            false,
        ),
        (
            "two sources",
            vec!["-O".into(), "qcow2".into(), p("src.raw"), p("top.qcow2")],
            true,
        ),
    ];
    for (name, args, is_qcow2) in cases {
        let ours = d.join(format!("{}.rimg", name.replace(' ', "_")));
        let theirs = d.join(format!("{}.qemu", name.replace(' ', "_")));
        for (cmd, out) in [(rimg, &ours), ("qemu-img", &theirs)] {
            let mut a: Vec<&str> = vec!["convert"];
            a.extend(args.iter().map(|s| s.as_str()));
            a.push(out.to_str().unwrap());
            let o = run(cmd, &a);
            assert!(
                o.status.success(),
                "{cmd} {name}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        assert_qemu_compare_equal(&ours, &theirs);
        if is_qcow2 {
            assert_qemu_check_clean(&ours);
            // Holes and zeros stay unallocated as in qemu-img's output.
            assert!(
                allocated(&ours) <= allocated(&theirs),
                "{name}: rimg allocates more than qemu-img"
            );
        } else {
            let blocks = |p: &Path| {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata(p).unwrap().blocks()
            };
            assert!(
                blocks(&ours) <= blocks(&theirs) + 64,
                "{name}: raw output is as sparse as qemu-img's"
            );
        }
        if name.starts_with("compressed") {
            let o = qemu_img(&["check", "--output=json", ours.to_str().unwrap()]);
            let v: Value = serde_json::from_slice(&o.stdout).unwrap();
            assert!(
                v["compressed-clusters"].as_u64().unwrap_or(0) > 0,
                "{name}: output has compressed clusters"
            );
        }
    }
}

#[test]
fn convert_with_backing_writes_only_differences() {
    let rimg = workspace_bin("rimg");
    let inp = inputs();
    let d = &inp.dir;
    // Flatten base+mid into one image, then convert top onto it with -B:
    // the output must read like top and hold only what differs.
    let flat = d.join("flat.qcow2");
    let o = qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        d.join("mid.qcow2").to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let out = d.join("delta.qcow2");
    let o = run(
        rimg.to_str().unwrap(),
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "flat.qcow2",
            "-F",
            "qcow2",
            d.join("top.qcow2").to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_qemu_check_clean(&out);
    assert_qemu_compare_equal(&out, &d.join("top.qcow2"));
    let info = qemu_img(&["info", "--output=json", out.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["backing-filename"], "flat.qcow2");
    // top wrote ~300k + 64k of data and 64k of zeros over data.
    let alloc = allocated(&out);
    assert!(
        alloc <= 1 << 20,
        "only differences are written, got {alloc} bytes"
    );
}

#[test]
fn convert_into_existing_target() {
    let rimg = workspace_bin("rimg");
    let inp = inputs();
    let d = &inp.dir;
    let t = d.join("existing.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", t.to_str().unwrap(), "32M"])
            .status
            .success()
    );
    qemu_io(&t, &["write -P 0x77 0 32M"]);
    let o = run(
        rimg.to_str().unwrap(),
        &[
            "convert",
            "-n",
            d.join("top.qcow2").to_str().unwrap(),
            t.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_qemu_check_clean(&t);
    // The first 24M now equal the source (zeros included); the rest keeps
    // its old data.
    let a = d.join("a.raw");
    let b = d.join("b.raw");
    assert!(qemu_img(&[
        "convert",
        "-O",
        "raw",
        t.to_str().unwrap(),
        a.to_str().unwrap()
    ])
    .status
    .success());
    assert!(qemu_img(&[
        "convert",
        "-O",
        "raw",
        d.join("top.qcow2").to_str().unwrap(),
        b.to_str().unwrap()
    ])
    .status
    .success());
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(a[..24 << 20] == b[..], "converted part");
    assert!(a[24 << 20..].iter().all(|&x| x == 0x77), "untouched part");
}

#[test]
fn convert_errors_like_qemu_img() {
    let rimg = workspace_bin("rimg");
    let inp = inputs();
    let d = &inp.dir;
    let src = d.join("src.raw");
    let out = d.join("o.img");
    let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());
    let bad: Vec<Vec<&str>> = vec![
        vec!["convert", "/nonexistent.raw", o],
        vec!["convert", "-O", "nosuchfmt", s, o],
        vec!["convert", "-c", "-O", "raw", s, o],
        vec!["convert", "-O", "qcow2", "-o", "cluster_size=3000", s, o],
        vec!["convert", s],
    ];
    for a in bad {
        let q = qemu_img(&a);
        let r = run(rimg.to_str().unwrap(), &a);
        assert_eq!(
            r.status.code(),
            q.status.code(),
            "{a:?}: rimg {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// qemu-img parses with getopt, which lets options come between the file
/// names: `convert SRC -O qcow2 DST` converts; one name alone is refused
/// with qemu-img's words.
#[test]
fn options_between_file_names() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![7u8; 1 << 20]).unwrap();
    for t in ["rimg", "qemu-img"] {
        let dst = dir.path().join(format!("{t}.qcow2"));
        let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
        ok(tool(t, &["convert", s, "-O", "qcow2", d, "-f", "raw"]));
        ok(tool("qemu-img", &["compare", s, d]));
        assert_qemu_check_clean(&dst);
        let o = tool(t, &["convert", s]);
        assert_eq!(o.status.code(), Some(1), "{t}");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(err, format!("{t}: Must specify image file name\n"));
    }
}

/// Runs of data and zeros inside one target cluster (4 KiB data, 8 KiB
/// zeros, 4 KiB data): the workers copying in guest order map the first
/// run's write (its cluster in flight until committed) before the second
/// run's write or zeroing into the same cluster, which the engine would
/// wait for: a convert that hung here (fresh target, and `-n` into an
/// existing one, where the zero runs are written). A hang is killed
/// after 60 s (status 124).
#[test]
fn runs_inside_one_cluster() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    let mut b = vec![0u8; 8 << 20];
    for c in b.chunks_mut(65536) {
        c[..4096].fill(0x11);
        c[12288..16384].fill(0x22);
    }
    std::fs::write(&src, &b).unwrap();
    let s = src.to_str().unwrap();
    for extl2 in ["off", "on"] {
        let dst = dir.path().join(format!("dst-{extl2}.qcow2"));
        let d = dst.to_str().unwrap();
        let o = format!("extended_l2={extl2}");
        let r = workspace_bin("rimg");
        let r = r.to_str().unwrap();
        let o = run(
            "timeout",
            &["60", r, "convert", "-O", "qcow2", "-o", &o, s, d],
        );
        assert_eq!(o.status.code(), Some(0), "fresh, extended_l2={extl2}");
        assert_qemu_compare_equal(&src, &dst);
        assert_qemu_check_clean(&dst);
        // Into the existing image, now full of other data: the zero runs
        // are written too.
        qemu_io(&dst, &["write -P 0x33 0 8M"]);
        let o = run(
            "timeout",
            &["60", r, "convert", "-n", "-f", "raw", "-O", "qcow2", s, d],
        );
        assert_eq!(o.status.code(), Some(0), "-n, extended_l2={extl2}");
        assert_qemu_compare_equal(&src, &dst);
        assert_qemu_check_clean(&dst);
    }
}

/// `-n` opens the existing target in the format `-O` names, as
/// qemu-img does: a raw file is not a qcow2 target (it used to be probed
/// and written raw, exit 0), and the words are qemu-img's.
#[test]
fn existing_target_opens_in_the_format_given() {
    let dir = tempdir();
    let d = dir.path();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        d.join("s.qcow2").to_str().unwrap(),
        "16M",
    ]);
    std::fs::write(d.join("t.raw"), vec![0u8; 16 << 20]).unwrap();
    rimg_tests::same_as_qemu(d, &["convert", "-n", "-O", "qcow2", "s.qcow2", "t.raw"]);
    assert!(std::fs::read(d.join("t.raw"))
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    rimg_tests::same_as_qemu(d, &["info", "-f", "qcow2", "t.raw"]);
}
