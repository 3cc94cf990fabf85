//! Faults in the middle of a write's metadata update, and writes the
//! library must refuse: the image stays consistent by qemu-img's account.
//! An allocation whose commit fails part-way leaves no L2 entry pointing
//! at a cluster its rollback freed; a compressed write past the end of
//! the image is an error, not a panic.

use std::os::unix::fs::FileExt;
use std::path::Path;

use qcow2::{open, Error, Image, OpenOptions, Qcow2Options};
use rimg_tests::{assert_qemu_check_clean, qemu_img, tempdir};

const CS: u64 = 4096;
/// Guest bytes one L2 table maps with 4 KiB clusters (512 entries).
const L2_SPAN: u64 = 512 * CS;

fn create(img: &Path, size: &str) {
    let o = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        img.to_str().unwrap(),
        size,
    ]);
    assert!(o.status.success(), "{o:?}");
}

fn open_rw(img: &Path, l2_cache_bytes: u64) -> std::sync::Arc<dyn Image> {
    open(
        img,
        &OpenOptions {
            writable: true,
            qcow2: Qcow2Options {
                l2_cache_bytes,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap()
}

fn be64(f: &std::fs::File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

/// An allocation of four clusters whose commit meets a corrupt L2 entry
/// at its third: the L2 table was evicted from the cache between the
/// data write and the commit, and the copy read back from the file has
/// the corrupt entry. The commit must fail as a whole: the entries before
/// the corrupt one must not point at the clusters the rollback frees.
#[test]
fn failed_commit_leaves_no_entry_on_a_freed_cluster() {
    let d = tempdir();
    let img = d.path().join("c.qcow2");
    create(&img, "16M");
    // The smallest cache (4 tables): five L2 tables in use evict each
    // other.
    let image = open_rw(&img, CS);
    let q = &image;
    for t in 0..5 {
        q.write_at(&[0x11; 4096], t * L2_SPAN).unwrap();
    }
    q.flush().unwrap();
    let before = std::fs::read(&img).unwrap();

    // Guest clusters 1..=4: one allocation, data written by the caller.
    let io = q.clone().begin_write(CS, 4 * CS as usize).unwrap();
    assert_eq!(io.len(), 4 * CS as usize, "one allocation of four clusters");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    file.write_all_at(&[0x22; 4 * CS as usize], io.host().0)
        .unwrap();

    // Corrupt guest cluster 3's entry in the file (not cluster aligned)
    // and push the table out of the cache.
    let l1 = be64(&file, 40);
    let l2 = be64(&file, l1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0);
    file.write_all_at(&0x1_0200u64.to_be_bytes(), l2 + 3 * 8)
        .unwrap();
    let mut b = [0u8; 512];
    for t in 1..5 {
        q.read_at(&mut b, t * L2_SPAN).unwrap();
    }

    let e = io.commit().unwrap_err();
    assert!(matches!(e, Error::Corrupt(_)), "{e}");
    q.flush().unwrap();
    drop(image);

    // Undo the corruption this test made: what is left is what the
    // failed write did, and qemu-img judges it.
    file.write_all_at(&0u64.to_be_bytes(), l2 + 3 * 8).unwrap();
    drop(file);
    assert_qemu_check_clean(&img);
    // The commit changed nothing: the L2 table is as before the write.
    let after = std::fs::read(&img).unwrap();
    let l2 = l2 as usize;
    assert_eq!(
        after[l2..l2 + CS as usize],
        before[l2..l2 + CS as usize],
        "L2 table changed"
    );
    // And the image is usable: the same write now succeeds.
    let image = open_rw(&img, CS);
    image.write_at(&[0x33; 4 * 4096], CS).unwrap();
    drop(image);
    assert_qemu_check_clean(&img);
}

/// Compressed writes at or past the end of the image are refused with an
/// out-of-range error (they underflowed, or indexed past the L1 table).
#[test]
fn compressed_write_past_the_end_is_refused() {
    let d = tempdir();
    let img = d.path().join("z.qcow2");
    // Ends in the middle of a cluster, and exactly at an L2 table's span
    // rounded up (the L1 table has no entry past it).
    create(&img, &format!("{}", 2 * L2_SPAN - 512));
    let image = open_rw(&img, 1 << 20);
    let q = image.as_qcow2().unwrap();
    let size = 2 * L2_SPAN - 512;
    let cluster = [0u8; CS as usize];
    for (off, len) in [
        (2 * L2_SPAN, CS as usize),
        (2 * L2_SPAN, 0),
        (3 * L2_SPAN, CS as usize),
        (u64::MAX - CS + 1, CS as usize),
        (1 << 62, 0),
    ] {
        match q.write_compressed(off, &cluster[..len]) {
            Err(Error::OutOfRange { .. }) => {}
            other => panic!("compressed write at {off:#x}+{len}: {other:?}"),
        }
    }
    // The last, partial cluster and a whole one still work.
    let last = size & !(CS - 1);
    q.write_compressed(last, &cluster[..(size - last) as usize])
        .unwrap();
    q.write_compressed(0, &cluster).unwrap();
    drop(image);
    assert_qemu_check_clean(&img);
}

/// A write abandoned because its data I/O will never be waited for (a
/// block daemon whose io_uring broke): whoever waits for the cluster is
/// woken, the guest cluster keeps what it read before, a late write into
/// the abandoned host cluster shows nowhere, later writes to the cluster
/// work, and qemu-img finds leaks at most. Both a fresh allocation and the
/// reuse of an allocated zero cluster (write-zeroes that kept it).
#[test]
fn abandoned_write_leaks_and_lets_others_go_on() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    struct Count(AtomicU32);
    impl qcow2::AllocWaker for Count {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    for prealloc in ["fresh", "zero-allocated"] {
        let d = tempdir();
        let img = d.path().join("a.qcow2");
        let o = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            img.to_str().unwrap(),
            "1M",
        ]);
        assert!(o.status.success(), "{o:?}");
        let im = open_rw(&img, 1 << 20);
        if prealloc == "zero-allocated" {
            im.write_at(&[0x11; CS as usize], 3 * CS).unwrap();
            im.write_zeroes(3 * CS, CS, false).unwrap();
        }
        let w = im.clone().begin_write(3 * CS, CS as usize).unwrap();
        let count = Arc::new(Count(AtomicU32::new(0)));
        let waker: Arc<dyn qcow2::AllocWaker> = count.clone();
        assert!(
            im.clone()
                .try_begin_write(3 * CS, CS as usize, &waker)
                .unwrap()
                .is_none(),
            "{prealloc}: the cluster is being allocated"
        );
        let host = w.host();
        w.abandon();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "{prealloc}: waiter woken"
        );
        // The late data write of the abandoned request.
        im.storage().write_at(&[0xee; CS as usize], host.0).unwrap();
        let mut buf = vec![0xffu8; CS as usize];
        im.read_at(&mut buf, 3 * CS).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "{prealloc}: the late write shows"
        );
        let w = im
            .clone()
            .try_begin_write(3 * CS, CS as usize, &waker)
            .unwrap()
            .expect("the cluster is free to allocate again");
        assert_ne!(
            w.host(),
            host,
            "{prealloc}: the abandoned cluster was reused"
        );
        im.storage()
            .write_at(&[0x33; CS as usize], w.host().0)
            .unwrap();
        w.commit().unwrap();
        im.read_at(&mut buf, 3 * CS).unwrap();
        assert!(buf.iter().all(|&b| b == 0x33), "{prealloc}: new data");
        im.flush().unwrap();
        drop(im);
        let out = qemu_img(&["check", "--output=json", img.to_str().unwrap()]);
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("qemu-img check json");
        assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{prealloc}: {v}");
        assert_eq!(
            v["check-errors"].as_u64().unwrap_or(0),
            0,
            "{prealloc}: {v}"
        );
        assert!(v["leaks"].as_u64().unwrap_or(0) >= 1, "{prealloc}: {v}");
    }
}
