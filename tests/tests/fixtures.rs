//! Every reference image in `fixtures/` (made by qemu-img, see
//! fixtures/make-fixtures.sh) read by the rimg engine and the rimg CLI
//! exactly as QEMU reads it: byte-identical content at odd offsets and
//! lengths, the same `info` JSON, the same `check` exit code, and a
//! `convert -O raw` that qemu-img compares equal.

use std::path::{Path, PathBuf};

use qcow2::OpenOptions;
use rimg_tests::{qemu_img, qemu_raw_content, run, tempdir, workspace_bin};

/// The fixtures the script makes; a missing one fails the test.
const IMAGES: &[&str] = &[
    "v3.qcow2",
    "v2.qcow2",
    "zlib.qcow2",
    "zstd.qcow2",
    "zero.qcow2",
    "chain-base.qcow2",
    "chain-mid.qcow2",
    "chain-top.qcow2",
    "snap.qcow2",
    "rc1.qcow2",
    "rc64.qcow2",
    "cs512.qcow2",
    "cs2m.qcow2",
    "raw.raw",
];

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("fixtures")
}

/// Copies the fixtures into a fresh directory (tests never touch the
/// committed files; relative backing names keep working).
fn copy_all(to: &Path) {
    for e in std::fs::read_dir(fixtures_dir()).unwrap() {
        let p = e.unwrap().path();
        if matches!(
            p.extension().and_then(|x| x.to_str()),
            Some("qcow2") | Some("raw")
        ) {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

#[test]
fn engine_reads_every_fixture_like_qemu() {
    let d = tempdir();
    copy_all(d.path());
    for name in IMAGES {
        let img = d.path().join(name);
        assert!(
            img.exists(),
            "fixture {name} missing: run fixtures/make-fixtures.sh"
        );
        let want = qemu_raw_content(&img, &d.path().join(format!("{name}.want")));
        let image =
            qcow2::open(&img, &OpenOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(image.size(), want.len() as u64, "{name}: size");
        // Chunk sizes that cross sectors, clusters and L2 tables at odd
        // places, then one read of everything.
        rimg_tests::assert_reads_as(
            image.as_ref(),
            &want,
            name,
            &[4097, 511, 65536 + 3, 1 << 20],
        );
    }
}

#[test]
fn cli_matches_qemu_on_every_fixture() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let d = tempdir();
    copy_all(d.path());
    for name in IMAGES {
        let img = d.path().join(name);
        let p = img.to_str().unwrap();
        // info --output=json: same keys and values.
        let a = run(rimg, &["info", "--output=json", p]);
        let b = qemu_img(&["info", "--output=json", p]);
        assert!(a.status.success() && b.status.success(), "{name} info");
        let va: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
        let vb: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
        assert_eq!(va, vb, "{name}: info json");
        // check: same exit code (0, or 63 for raw).
        let a = run(rimg, &["check", p]);
        let b = qemu_img(&["check", p]);
        assert_eq!(a.status.code(), b.status.code(), "{name}: check exit code");
        // convert -O raw: equal content.
        let out = d.path().join(format!("{name}.rimg.raw"));
        let o = run(rimg, &["convert", "-O", "raw", p, out.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let c = qemu_img(&["compare", "-f", "raw", out.to_str().unwrap(), p]);
        assert!(c.status.success(), "{name}: convert differs");
    }
}

#[test]
fn extended_l2_fixture_reads_as_qemu_reads_it() {
    let d = tempdir();
    copy_all(d.path());
    let img = d.path().join("ext-l2.qcow2");
    let q = qcow2::open(&img, &OpenOptions::default()).expect("extended L2 images open");
    assert!(q.as_qcow2().unwrap().header().extended_l2());
    let rimg = workspace_bin("rimg");
    let p = img.to_str().unwrap();
    let o = run(rimg.to_str().unwrap(), &["info", p]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("extended l2: true"));
    let out = d.path().join("ext-l2.raw");
    let o = run(
        rimg.to_str().unwrap(),
        &["convert", "-O", "raw", p, out.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = qemu_img(&["compare", "-f", "raw", out.to_str().unwrap(), p]);
    assert!(c.status.success(), "convert differs");
}
