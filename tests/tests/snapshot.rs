//! Internal snapshots: made by rimg and used by qemu-img, and the reverse.
//! After every step `qemu-img check` is clean and each snapshot reads as
//! the disk did when it was taken.

use std::path::Path;

use rimg_tests::{
    assert_qemu_check_clean, qemu_create, qemu_img, qemu_io, run, tempdir, workspace_bin,
};
use serde_json::Value;

fn content(img: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = img.with_extension(format!("{}.raw", snapshot.unwrap_or("now")));
    let mut a = vec!["convert", "-O", "raw"];
    if let Some(s) = snapshot {
        a.extend(["-l", s]);
    }
    a.extend([img.to_str().unwrap(), out.to_str().unwrap()]);
    let o = qemu_img(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).unwrap()
}

fn ok(cmd: &str, args: &[&str]) {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn rimg_snapshots_work_in_qemu_img() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    for cs in ["512", "65536"] {
        let img = dir.path().join(format!("a{cs}.qcow2"));
        let p = img.to_str().unwrap();
        qemu_create(p, &format!("cluster_size={cs}"), "8M");
        qemu_io(&img, &["write -P 0x41 0 3M"]);
        let s1 = content(&img, None);
        ok(rimg, &["snapshot", "-c", "first", p]);
        assert_qemu_check_clean(&img);
        qemu_io(&img, &["write -P 0x42 1M 3M", "write -z 0 64k"]);
        let s2 = content(&img, None);
        ok(rimg, &["snapshot", "-c", "second", p]);
        assert_qemu_check_clean(&img);
        qemu_io(&img, &["write -P 0x43 5M 1M"]);
        let now = content(&img, None);

        // qemu-img lists them with the same IDs and names.
        let info = qemu_img(&["info", "--output=json", p]);
        let v: Value = serde_json::from_slice(&info.stdout).unwrap();
        let names: Vec<(String, String)> = v["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap().into(),
                    s["name"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [("1".into(), "first".into()), ("2".into(), "second".into())]
        );
        let list = |cmd: &str| String::from_utf8(run(cmd, &["snapshot", "-l", p]).stdout).unwrap();
        assert_eq!(list(rimg), list("qemu-img"), "snapshot -l output");

        // Their content is what the disk was.
        assert!(content(&img, Some("first")) == s1, "first");
        assert!(content(&img, Some("second")) == s2, "second");
        assert!(content(&img, None) == now, "current");

        // qemu-img applies and deletes what rimg made.
        ok("qemu-img", &["snapshot", "-a", "first", p]);
        assert_qemu_check_clean(&img);
        assert!(content(&img, None) == s1, "after qemu-img -a first");
        ok("qemu-img", &["snapshot", "-d", "second", p]);
        assert_qemu_check_clean(&img);
        ok("qemu-img", &["snapshot", "-d", "first", p]);
        assert_qemu_check_clean(&img);
        assert!(content(&img, None) == s1);
    }
}

#[test]
fn qemu_img_snapshots_work_in_rimg() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    let img = dir.path().join("b.qcow2");
    let p = img.to_str().unwrap();
    qemu_create(p, "", "8M");
    qemu_io(&img, &["write -P 0x51 0 2M", "write -c -P 0x52 4M 64k"]);
    let s1 = content(&img, None);
    ok("qemu-img", &["snapshot", "-c", "one", p]);
    // Writes through rimg's library over clusters the snapshot shares.
    {
        let i = qcow2::open(
            &img,
            &qcow2::OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        i.write_at(&vec![0x53; 100_000], 1_000_000).unwrap();
        i.write_at(&vec![0x54; 5000], (4 << 20) + 100).unwrap();
        i.flush().unwrap();
    }
    assert_qemu_check_clean(&img);
    let s2 = content(&img, None);
    ok("qemu-img", &["snapshot", "-c", "two", p]);
    qemu_io(&img, &["write -P 0x55 0 8M"]);

    ok(rimg, &["snapshot", "-a", "one", p]);
    assert_qemu_check_clean(&img);
    assert!(content(&img, None) == s1, "rimg -a one");
    ok(rimg, &["snapshot", "-a", "2", p]);
    assert_qemu_check_clean(&img);
    assert!(content(&img, None) == s2, "rimg -a 2 (by id)");
    ok(rimg, &["snapshot", "-d", "one", p]);
    assert_qemu_check_clean(&img);
    assert!(content(&img, Some("two")) == s2);
    ok(rimg, &["snapshot", "-d", "two", p]);
    assert_qemu_check_clean(&img);
    assert!(content(&img, None) == s2);
    assert_eq!(run(rimg, &["snapshot", "-l", p]).stdout, b"");
}

#[test]
fn snapshot_errors() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    let img = dir.path().join("c.qcow2");
    let p = img.to_str().unwrap();
    qemu_create(p, "refcount_bits=1", "1M");
    // With data allocated, a snapshot would need refcounts of 2: both
    // tools refuse.
    qemu_io(&img, &["write -P 1 0 64k"]);
    // qemu-img runs on a copy: its failed snapshot leaks the new L1
    // table's cluster, and rimg's the same (iotest 112 expects the leak).
    let copy = dir.path().join("copy.qcow2");
    let c = copy.to_str().unwrap();
    for op in [["-c", "x"], ["-a", "nope"], ["-d", "nope"]] {
        std::fs::copy(&img, &copy).unwrap();
        let q = qemu_img(&["snapshot", op[0], op[1], c]);
        let args = ["snapshot", op[0], op[1], p];
        let r = run(rimg, &args);
        assert_eq!(
            r.status.code(),
            q.status.code(),
            "{args:?}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&r.stderr).lines().count(), 1);
    }
    let check = |f: &str| {
        let o = qemu_img(&["check", f]);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert_eq!(check(p), check(c));
    assert!(run(rimg, &["check", "-q", "-r", "leaks", p])
        .status
        .success());
    assert_qemu_check_clean(&img);
}
