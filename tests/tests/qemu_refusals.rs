//! What qemu-img refuses, rimg refuses too (from QEMU's iotests 080, 061
//! and 114), and the image is left as it was: qemu-img is the judge of
//! the refusal and of the image afterwards.

use std::os::unix::fs::FileExt;
use std::path::Path;

use rimg_tests::{
    assert_qemu_check_clean, qemu_create, qemu_img, qemu_io, qemu_raw_content, run, run_ok as ok,
    tempdir, workspace_bin,
};

fn be64(p: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u64::from_be_bytes(b)
}

fn info(p: &Path) -> serde_json::Value {
    let out = ok("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap()
}

/// Asserts that `rimg snapshot -c test` on `img` fails with `want` in its
/// message, leaving the file's length and no snapshot; returns qemu-img's
/// info of the image.
fn snapshot_refused(img: &Path, want: &str) -> serde_json::Value {
    let len_before = std::fs::metadata(img).unwrap().len();
    let o = rimg_tests::rimg(&["snapshot", "-c", "test", img.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "rimg snapshot -c: {err}");
    assert!(err.contains(want), "{err}");
    assert_eq!(std::fs::metadata(img).unwrap().len(), len_before);
    let v = info(img);
    assert!(v.get("snapshots").is_none(), "{v}");
    v
}

/// An image whose first L2 entry maps the cluster at `poked`, past the
/// end of the file; returns it and a copy for qemu-img.
fn image_mapping_past_its_end(dir: &Path, poked: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let img = dir.join("t.qcow2");
    let p = img.to_str().unwrap();
    qemu_create(p, "", "64M");
    qemu_io(&img, &["write 0 512"]);
    let l2 = be64(&img, be64(&img, 40)) & 0x00ff_ffff_ffff_fe00;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&(poked | 1 << 63).to_be_bytes(), l2)
        .unwrap();
    let judge_copy = dir.join("judge.qcow2");
    std::fs::copy(&img, &judge_copy).unwrap();
    (img, judge_copy)
}

/// 080 "Invalid L2 entry (huge physical offset)": an L2 entry pointing
/// about 1 TiB past the end of the file, where no refcount block covers
/// it. qemu-img fails with EAGAIN (it would first have to allocate that
/// block); rimg fails the same way, changes nothing (it once grew the
/// file to 1 TiB) and leaves the image usable.
#[test]
fn snapshot_of_an_image_mapping_past_its_end_is_refused() {
    let dir = tempdir();
    let (img, judge_copy) = image_mapping_past_its_end(dir.path(), 0xff_ffff_0000);
    let judge = qemu_img(&["snapshot", "-c", "test", judge_copy.to_str().unwrap()]);
    assert!(!judge.status.success(), "qemu-img refuses");
    let v = snapshot_refused(&img, "Resource temporarily unavailable");
    assert_eq!(v["format-specific"]["data"]["corrupt"], false, "{v}");
}

/// Past the end of the file but where a refcount block exists, qemu-img
/// takes the snapshot and counts a reference to a cluster that is not
/// there; rimg refuses that as corruption and marks the image corrupt
/// (a deliberate difference), and a second try is refused at open.
#[test]
fn snapshot_mapping_a_missing_cluster_marks_corrupt() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    let (img, _) = image_mapping_past_its_end(dir.path(), 0x1000_0000);
    let p = img.to_str().unwrap();
    let v = snapshot_refused(&img, "past the end of the file");
    assert_eq!(v["format-specific"]["data"]["corrupt"], true, "{v}");
    let o = run(rimg, &["snapshot", "-c", "test", p]);
    assert_eq!(o.status.code(), Some(1));
}

/// 061 "Testing backing file": amend may not give an image a backing
/// file (it would change what the guest reads); rebase -u does that.
#[test]
fn amend_does_not_set_a_backing_file() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    let img = dir.path().join("t.qcow2");
    let base = dir.path().join("t.qcow2.base");
    let (p, b) = (img.to_str().unwrap(), base.to_str().unwrap());
    qemu_create(p, "", "64M");
    qemu_create(b, "", "64M");
    qemu_io(&base, &["write -P 0x2a 0 128k"]);
    let opts = format!("backing_file={b},backing_fmt=qcow2");
    for tool in ["qemu-img", rimg] {
        let o = run(tool, &["amend", "-o", &opts, p]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{tool} amend: {err}");
        assert!(
            err.contains("Cannot amend the backing file"),
            "{tool}: {err}"
        );
        assert!(info(&img).get("backing-filename").is_none());
        let raw = qemu_raw_content(&img, &dir.path().join("raw"));
        assert!(raw[..128 << 10].iter().all(|&x| x == 0));
    }
    // With the backing file set by rebase -u, restating it is accepted.
    ok(rimg, &["rebase", "-u", "-b", b, "-F", "qcow2", p]);
    ok(rimg, &["amend", "-o", &opts, p]);
    qemu_io(&img, &["read -P 0x2a 0 128k"]);
    assert_qemu_check_clean(&img);
}

/// 114: a backing file is never recorded without its format (probing a
/// raw backing file lets a guest choose what it is read as).
#[test]
fn rebase_requires_the_backing_format() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    let img = dir.path().join("t.qcow2");
    let base = dir.path().join("t.qcow2.base");
    let (p, b) = (img.to_str().unwrap(), base.to_str().unwrap());
    qemu_create(b, "", "64M");
    qemu_create(p, "", "64M");
    for unsafe_mode in [true, false] {
        for tool in ["qemu-img", rimg] {
            let mut args = vec!["rebase"];
            if unsafe_mode {
                args.push("-u");
            }
            args.extend(["-b", b, p]);
            let o = run(tool, &args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{tool} {args:?}: {err}");
            assert!(
                err.contains(&format!(
                    "Could not change the backing file to '{b}': backing format must be specified"
                )),
                "{tool}: {err}"
            );
            assert!(info(&img).get("backing-filename").is_none());
        }
    }
    ok(rimg, &["rebase", "-u", "-b", b, "-F", "qcow2", p]);
    assert_eq!(info(&img)["backing-filename-format"], "qcow2");
    assert_qemu_check_clean(&img);
    // convert -B without -F: refused, in qemu-img's words.
    for tool in ["qemu-img", rimg] {
        let out = dir.path().join(format!("{}.conv", tool.len()));
        let o = run(
            tool,
            &["convert", "-O", "qcow2", "-B", b, b, out.to_str().unwrap()],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{tool}: {err}");
        assert!(
            err.contains("Use of backing file requires explicit backing format"),
            "{tool}: {err}"
        );
    }
}
