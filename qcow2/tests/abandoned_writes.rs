//! A write given up on while its data I/O may still run
//! (`PendingWrite::abandon`, a daemon whose io_uring cannot be waited
//! on) must never be able to land over a newer write. Where its data has
//! a host place of its own (a fresh qcow2 cluster) that place is leaked;
//! where it can land only in the guest's own range (raw images, external
//! data files, writes in place, a cluster whose other subclusters hold
//! data) the range is fenced off: later changes there fail at once,
//! never wait, until the image is opened again.
//!
//! Every "later change" below runs in non-blocking mode, so a change
//! that would wait for the abandoned write for good (the behaviour
//! before fences) fails the test with `WouldBlock` instead of hanging.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::{AllocWaker, CreateOptions, Error, Image, OpenOptions};

const CS: u64 = 65536;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("rimg-abandon-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(p: &Path) -> Arc<dyn Image> {
    let o = OpenOptions {
        writable: true,
        ..Default::default()
    };
    qcow2::open(p, &o).unwrap()
}

/// A fresh 4 MiB qcow2 image with 64 KiB clusters in `d`, its creation
/// options adjusted by `f` (given the directory), opened for writing.
fn qcow2_image(d: &Dir, f: impl FnOnce(&Path, &mut CreateOptions)) -> (PathBuf, Arc<dyn Image>) {
    let p = d.0.join("t.qcow2");
    let mut o = CreateOptions {
        size: 4 << 20,
        cluster_size: CS,
        ..CreateOptions::default()
    };
    f(&d.0, &mut o);
    qcow2::create(&p, &o).unwrap();
    let img = open(&p);
    (p, img)
}

struct NoWake;

impl AllocWaker for NoWake {
    fn wake(&self) {}
}

/// Runs `f` in non-blocking mode: a change that would wait fails with
/// `WouldBlock` instead.
fn now<R>(f: impl FnOnce() -> R) -> R {
    let w: Arc<dyn AllocWaker> = Arc::new(NoWake);
    qcow2::sync::without_blocking(&w, f)
}

fn assert_fenced<T: std::fmt::Debug>(r: qcow2::Result<T>, what: &str) {
    match r {
        Err(Error::Fenced { .. }) => {}
        other => panic!("{what}: expected a fenced range, got {other:?}"),
    }
}

/// qemu-img check's exit status: 0 clean, 3 leaks only.
fn qemu_img_check(p: &Path, leaks_allowed: bool) {
    let o = std::process::Command::new("qemu-img")
        .args(["check", p.to_str().unwrap()])
        .output()
        .expect("qemu-img");
    let ok = [0].contains(&o.status.code().unwrap_or(-1))
        || (leaks_allowed && o.status.code() == Some(3));
    assert!(
        ok,
        "qemu-img check: {:?}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn read(img: &Arc<dyn Image>, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    img.read_at(&mut b, off).unwrap();
    b
}

/// The changes a guest can make over [off, off + len), each refused.
fn assert_range_fenced(img: &Arc<dyn Image>, off: u64, len: u64) {
    assert_fenced(now(|| img.write_at(&[7; 512], off)), "write");
    assert_fenced(
        now(|| img.clone().begin_write(off, 512)),
        "begin_write at the start",
    );
    assert_fenced(
        now(|| img.clone().begin_write(off + len - 512, 512)),
        "begin_write at the end",
    );
    assert_fenced(now(|| img.write_zeroes(off, len, false)), "write-zeroes");
    assert_fenced(
        now(|| img.write_zeroes(off, len, true)),
        "write-zeroes, unmap",
    );
}

#[test]
fn raw_fences_the_abandoned_range() {
    let d = Dir::new("raw");
    let p = d.0.join("t.raw");
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    let img = open(&p);
    let w = img.clone().begin_write(8192, 4096).unwrap();
    assert_eq!(w.host().0, 8192);
    w.abandon();
    // The late write lands: nothing newer may follow it there.
    img.data_storage()
        .write_data_at(&[0xaa; 4096], 8192)
        .unwrap();
    assert_range_fenced(&img, 8192, 4096);
    assert_fenced(now(|| img.discard(8192, 4096)), "discard");
    // Overlapping by one byte is refused too; next to it is not.
    assert_fenced(now(|| img.write_at(&[1; 512], 8192 - 511)), "overlap");
    now(|| img.write_at(&[1; 512], 8192 - 512)).unwrap();
    now(|| img.write_at(&[2; 512], 8192 + 4096)).unwrap();
    assert_eq!(read(&img, 8192 + 4096, 512), vec![2; 512]);
    // Cutting the range off would let a later growth show the late data.
    assert_fenced(img.resize(8192), "shrink over it");
    assert_eq!(img.size(), 1 << 20);
    img.resize(16384).unwrap();
    drop(img);
    // Reopened: nothing is in flight any more.
    let img = open(&p);
    img.write_at(&[3; 512], 8192).unwrap();
    assert_eq!(read(&img, 8192, 512), vec![3; 512]);
}

#[test]
fn empty_writes_are_refused() {
    let d = Dir::new("empty");
    let raw = d.0.join("t.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let q = d.0.join("t.qcow2");
    let o = CreateOptions {
        size: 1 << 20,
        cluster_size: CS,
        ..CreateOptions::default()
    };
    qcow2::create(&q, &o).unwrap();
    for p in [raw, q] {
        let img = open(&p);
        // Allocated first: a write there would be mapped in place.
        img.write_at(&[1; 512], 0).unwrap();
        for off in [0, CS, (1 << 20) - 512] {
            match img.clone().begin_write(off, 0) {
                Err(Error::InvalidArgument(_)) => {}
                other => panic!("{}: {off}: {other:?}", p.display()),
            }
            let r = img
                .clone()
                .try_begin_write(off, 0, &(Arc::new(NoWake) as _));
            assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        }
    }
}

#[test]
fn qcow2_in_place_fences_the_cluster() {
    let d = Dir::new("inplace");
    let (p, img) = qcow2_image(&d, |_, _| {});
    img.write_at(&vec![0x11; 2 * CS as usize], CS).unwrap();
    let _epoch = img.io_epoch();
    let w = img.clone().begin_write(CS + 4096, 4096).unwrap();
    let host = w.host().0;
    w.abandon();
    img.data_storage()
        .write_data_at(&[0xaa; 4096], host)
        .unwrap();
    // The whole guest cluster: another part of it is refused too.
    assert_range_fenced(&img, CS, CS);
    assert_fenced(now(|| img.discard(CS, CS)), "discard");
    // The next cluster is not fenced.
    now(|| img.write_at(&[0x22; 512], 2 * CS)).unwrap();
    now(|| img.write_zeroes(3 * CS, CS, false)).unwrap();
    // A shrink would free the cluster for reuse, a snapshot share it:
    // both refused before anything changes.
    assert_fenced(img.resize(CS), "shrink over it");
    assert_eq!(img.size(), 4 << 20);
    let q = img.as_qcow2().unwrap();
    assert_fenced(q.snapshot_create("s"), "snapshot");
    assert!(q.snapshots().is_empty());
    img.resize(3 * CS).unwrap();
    img.flush().unwrap();
    drop(img);
    qemu_img_check(&p, false);
}

#[test]
fn qcow2_external_data_file_fences_the_cluster() {
    for raw in [false, true] {
        let d = Dir::new(&format!("datafile-{raw}"));
        let (p, img) = qcow2_image(&d, |dir, o| {
            o.data_file = Some(dir.join("t.data").to_str().unwrap().into());
            o.data_file_raw = raw;
        });
        let w = img.clone().begin_write(CS + 512, 512).unwrap();
        // host = guest offset: the data file has no other place for it.
        assert_eq!(w.host().0, CS + 512);
        w.abandon();
        img.data_storage()
            .write_data_at(&[0xaa; 512], CS + 512)
            .unwrap();
        // Before the fence, a later write of the same guest cluster was
        // allocated the same host range and could be overtaken.
        assert_range_fenced(&img, CS, CS);
        now(|| img.write_at(&[0x22; 512], 2 * CS)).unwrap();
        img.flush().unwrap();
        drop(img);
        qemu_img_check(&p, false);
    }
}

#[test]
fn qcow2_subcluster_of_an_allocated_cluster_is_fenced() {
    let d = Dir::new("extl2");
    let (p, img) = qcow2_image(&d, |_, o| o.extended_l2 = true);
    // Subcluster 0 of guest cluster 1 holds data; subcluster 5 does not.
    img.write_at(&[0x11; 2048], CS).unwrap();
    let _epoch = img.io_epoch();
    let sc = CS / 32;
    let w = img.clone().begin_write(CS + 5 * sc, 512).unwrap();
    let host = w.host().0;
    w.abandon();
    img.data_storage()
        .write_data_at(&[0xaa; 512], host)
        .unwrap();
    // Subcluster 5 still reads as before, and nothing may write there.
    assert_eq!(read(&img, CS + 5 * sc, 512), vec![0; 512]);
    assert_eq!(read(&img, CS, 2048), vec![0x11; 2048]);
    assert_range_fenced(&img, CS, CS);
    img.flush().unwrap();
    drop(img);
    qemu_img_check(&p, false);
}

#[test]
fn qcow2_fresh_cluster_is_leaked_not_fenced() {
    let d = Dir::new("fresh");
    let (p, img) = qcow2_image(&d, |_, _| {});
    // The epoch of the abandoned I/O is never ended (as a daemon leaks
    // it): nothing freed after it began is reused.
    std::mem::forget(img.io_epoch());
    let w = img.clone().begin_write(CS, 4096).unwrap();
    let late = w.host().0;
    w.abandon();
    // The guest cluster is free to be written: it gets another host
    // cluster, and the late write into the leaked one never shows.
    now(|| img.write_at(&[0x22; 4096], CS)).unwrap();
    img.data_storage()
        .write_data_at(&[0xaa; 4096], late)
        .unwrap();
    assert_eq!(read(&img, CS, 4096), vec![0x22; 4096]);
    now(|| img.write_zeroes(CS, CS, true)).unwrap();
    now(|| img.write_at(&[0x33; 512], CS + 512)).unwrap();
    assert_eq!(read(&img, CS + 512, 512), vec![0x33; 512]);
    img.flush().unwrap();
    drop(img);
    qemu_img_check(&p, true);
}

/// A write-zeroes already blocked on an in-place write (a library caller
/// blocks, a daemon does not) fails once that write is abandoned, rather
/// than zero a range the late write may still land in (with a raw data
/// file, the zeros would go into the file and the late data over them).
#[test]
fn a_blocked_zeroing_sees_the_fence() {
    for raw_data in [false, true] {
        let d = Dir::new(&format!("blocked-{raw_data}"));
        let (p, img) = qcow2_image(&d, |dir, o| {
            o.data_file = raw_data.then(|| dir.join("t.data").to_str().unwrap().into());
            o.data_file_raw = raw_data;
        });
        img.write_at(&vec![0x11; CS as usize], CS).unwrap();
        let _epoch = img.io_epoch();
        let w = img.clone().begin_write(CS + 4096, 4096).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let zeroer = {
            let img = img.clone();
            std::thread::spawn(move || tx.send(img.write_zeroes(CS, CS, false)).unwrap())
        };
        // The zeroing is blocked on the in-place write (the engine's
        // state dump counts blocked threads).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let state = img.alloc_state().unwrap();
            if state.contains("threads blocked 1;") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never blocked: {state}"
            );
            std::thread::yield_now();
        }
        w.abandon();
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("still blocked: {}", img.alloc_state().unwrap()));
        zeroer.join().unwrap();
        assert_fenced(r, "the blocked write-zeroes");
        drop(img);
        qemu_img_check(&p, false);
    }
}
