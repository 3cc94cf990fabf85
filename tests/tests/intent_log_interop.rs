//! rimg's intent log (copy-on-write mappings kept out of the L2 tables
//! until a flush, `Qcow2Options::intent_log`) against QEMU 10: an image a
//! killed writer left with a live log is consistent for qemu-img (leaks at
//! most); a writable QEMU open clears the log's autoclear bit, and rimg
//! then never replays it; a rimg open replays it, and QEMU reads the
//! result; a clean close leaves an image qemu-img finds clean.
//!
//! The killed writer is a child process (this test binary again) that
//! exits without closing the image (no close, no flush): its writes are
//! in the page cache, as a killed daemon's are, and its locks are gone.

use std::path::Path;
use std::sync::Arc;

use qcow2::{open, Image, MetadataPersistence, OpenOptions, Qcow2Options};
use rimg_tests::{assert_qemu_check_clean, qemu_img, qemu_io, qemu_raw_content, rimg_in, tempdir};

const SIZE: u64 = 8 << 20;
const AUTOCLEAR: u64 = 88;
const LOG_BIT: u64 = 1 << 63;

fn be64(p: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(p).unwrap(), &mut b, off)
        .unwrap();
    u64::from_be_bytes(b)
}

/// A raw backing file of 0x5b and a qcow2 overlay (64 KiB clusters).
fn overlay(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x5b; SIZE as usize]).unwrap();
    let img = dir.join("top.qcow2");
    let o = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        base.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    img
}

fn logged(img: &Path) -> Arc<dyn Image> {
    open(
        img,
        &OpenOptions {
            writable: true,
            qcow2: Qcow2Options {
                metadata_persistence: MetadataPersistence::ProcessDeath,
                intent_log: true,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap()
}

/// What the writer writes: partial writes into new clusters (logged),
/// after a flushed one; returns the disk's content after them.
fn writes(q: Option<&dyn Image>) -> Vec<u8> {
    let mut want = vec![0x5b; SIZE as usize];
    let mut w = |data: &[u8], off: u64| {
        if let Some(q) = q {
            q.write_at(data, off).unwrap();
        }
        want[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    w(&[1; 512], 0);
    if let Some(q) = q {
        q.flush().unwrap();
    }
    for k in 1..12u64 {
        w(&vec![k as u8 + 1; 3000], k * 300_000 + 1536);
    }
    want
}

const CHILD: &str = "RIMG_ILOG_CHILD_IMAGE";

/// The writer, run as a child process: writes, then exits without
/// closing the image.
#[test]
fn child_writer() {
    let Ok(img) = std::env::var(CHILD) else {
        return; // Only as the child of write_and_die.
    };
    let q = logged(Path::new(&img));
    writes(Some(q.as_ref()));
    std::mem::forget(q);
    std::process::exit(0);
}

/// Runs the writer in a child process, which dies after its writes.
/// Returns the disk's content as the writer saw it.
fn write_and_die(img: &Path) -> Vec<u8> {
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
        .env(CHILD, img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_ne!(be64(img, AUTOCLEAR) & LOG_BIT, 0, "no live log");
    writes(None)
}

/// qemu-img check: exit 0 or 3 (leaks), no corruption.
fn qemu_check_leaks_at_most(img: &Path) {
    let o = qemu_img(&["check", "--output=json", img.to_str().unwrap()]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let code = o.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "check exit {code:?}: {j}"
    );
    assert_eq!(j["corruptions"].as_u64().unwrap_or(0), 0, "{j}");
    assert_eq!(j["check-errors"].as_u64().unwrap_or(0), 0, "{j}");
}

#[test]
fn rimg_replays_a_killed_writer_s_log_and_qemu_reads_the_result() {
    let dir = tempdir();
    let img = overlay(dir.path());
    let want = write_and_die(&img);
    qemu_check_leaks_at_most(&img);
    // qemu-img info still finds the backing file (the extension sits
    // before its name).
    let o = qemu_img(&["info", img.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("base.raw"));
    // A rimg reader sees the writes before any writer reopened it.
    let ro = open(&img, &OpenOptions::default()).unwrap();
    assert!(
        rimg_tests::image::read_all(ro.as_ref()) == want,
        "rimg reader"
    );
    drop(ro);
    // The next rimg writer replays the log, then closes cleanly.
    drop(logged(&img));
    assert_eq!(be64(&img, AUTOCLEAR) & LOG_BIT, 0);
    assert_qemu_check_clean(&img);
    assert!(
        qemu_raw_content(&img, &dir.path().join("out.raw")) == want,
        "QEMU reads otherwise"
    );
}

#[test]
fn a_writable_qemu_open_ends_the_log_and_rimg_does_not_replay_it() {
    let dir = tempdir();
    let img = overlay(dir.path());
    let mut want = write_and_die(&img);
    // QEMU clears autoclear bits it does not know when it opens an image
    // for writing; it keeps the extension.
    qemu_io(&img, &["read 0 512"]);
    assert_eq!(be64(&img, AUTOCLEAR) & LOG_BIT, 0, "QEMU kept bit 63");
    // The logged writes are gone (QEMU's own semantics for a killed
    // writer's unflushed copying writes); the flushed one stays.
    want[512..].fill(0x5b);
    // QEMU's repair freed the log's clusters; its new writes reuse them.
    qemu_io(&img, &["write -P 0x77 6000000 2000000"]);
    want[6_000_000..8_000_000].fill(0x77);
    let (code, _, err) = rimg_in(dir.path(), &["check", "-r", "leaks", "top.qcow2"]);
    assert_eq!(code, Some(0), "{err}");
    assert_qemu_check_clean(&img);
    assert!(
        qemu_raw_content(&img, &dir.path().join("out.raw")) == want,
        "a dropped log was replayed"
    );
    // And a rimg writer later starts a new log and closes cleanly.
    let q = logged(&img);
    q.write_at(&[9; 100], 5_000_000).unwrap();
    want[5_000_000..5_000_100].fill(9);
    drop(q);
    assert_qemu_check_clean(&img);
    assert!(qemu_raw_content(&img, &dir.path().join("out.raw")) == want);
}
