//! An in-place write still in flight when the guest zeroes its cluster
//! with NO_UNMAP (the host cluster stays allocated to the guest cluster)
//! must not reappear once a later write reuses that host cluster.
//!
//! The schedule the block daemon's torture run found (two queues): write
//! W maps its range in place and its data I/O is slow; a write-zeroes Z
//! over the whole cluster completes; a write W2 to another part of the
//! cluster reuses the host cluster and zero-fills around itself; W's
//! data lands; a read sees zeros (the cluster still reads as zero); W2
//! commits; a second read saw W's data. Now Z is refused while W is in
//! flight (the daemon runs it in non-blocking mode), its waker is called
//! when W ends, and the retried Z then zeroes W's data for good. The
//! engine calls are the ones the daemon makes, in that order, from one
//! thread.

use std::path::Path;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use qcow2::storage::Storage;
use qcow2::{AllocWaker, CreateOptions, Error, Image, Qcow2, Qcow2Options};

#[derive(Default)]
struct Count(AtomicUsize);

impl AllocWaker for Count {
    fn wake(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

const CS: u64 = 65536;
/// W's range inside guest cluster 1, and W2's: disjoint from it, but in
/// the same 2 KiB subcluster as W's start (with extended L2 entries only
/// that subcluster is filled around W2).
const W: (u64, usize) = (CS + 0x3e00, 0xa00);
const W2: (u64, usize) = (CS + 0x3800, 0x600);

fn open(p: &Path) -> Arc<Qcow2> {
    let st = Storage::open(p, true).unwrap();
    Arc::new(Qcow2::open(st, None, Qcow2Options::default()).unwrap())
}

fn late_write_after_zeroing(extended_l2: bool) {
    let dir = std::env::temp_dir().join(format!(
        "rimg-late-write-{}-{extended_l2}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("t.qcow2");
    let o = CreateOptions {
        size: 16 << 20,
        cluster_size: CS,
        extended_l2,
        ..CreateOptions::default()
    };
    qcow2::create(&p, &o).unwrap();
    let q = open(&p);
    // Guest cluster 1 is allocated: W will be an in-place write.
    q.write_at(&[0x11; CS as usize], CS).unwrap();

    // W: mapped in place, its data not yet written (slow I/O).
    let tw = q.io_epoch();
    let w = q.clone().begin_write(W.0, W.1).unwrap();
    // Z: write-zeroes over the whole cluster, host cluster kept. Refused
    // while W is in flight.
    let count = Arc::new(Count::default());
    let waker: Arc<dyn AllocWaker> = count.clone();
    let zero = || qcow2::sync::without_blocking(&waker, || q.write_zeroes(CS, CS, false));
    assert!(matches!(zero(), Err(Error::WouldBlock)));
    assert_eq!(count.0.load(Ordering::SeqCst), 0);
    // W's data lands, W completes: Z's waker is called.
    q.data_storage()
        .write_data_at(&[0xaa; W.1], w.host().0)
        .unwrap();
    w.commit().unwrap();
    drop(tw);
    assert_eq!(count.0.load(Ordering::SeqCst), 1);
    zero().unwrap();
    // W2: another part of the cluster; its data I/O is in flight too.
    let t2 = q.io_epoch();
    let w2 = q.clone().begin_write(W2.0, W2.1).unwrap();
    let mut r0 = vec![0u8; W.1];
    q.read_at(&mut r0, W.0).unwrap();
    // W2 lands and commits.
    q.data_storage()
        .write_data_at(&[0xbb; W2.1], w2.host().0)
        .unwrap();
    w2.commit().unwrap();
    drop(t2);
    let mut r1 = vec![0u8; W.1];
    q.read_at(&mut r1, W.0).unwrap();
    assert!(
        r0.iter().chain(&r1).all(|&b| b == 0),
        "W's range, zeroed after W ended: first {:#x}, then {:#x}",
        r0[0],
        r1[0]
    );
    // The rest of the cluster: W2's data, zeros around it.
    let mut all = vec![0u8; CS as usize];
    q.read_at(&mut all, CS).unwrap();
    let (w2_at, w_at) = ((W2.0 - CS) as usize, (W.0 - CS) as usize);
    assert!(all[w2_at..w2_at + W2.1].iter().all(|&b| b == 0xbb));
    assert!(all[..w2_at].iter().all(|&b| b == 0));
    assert!(all[w_at + W.1..].iter().all(|&b| b == 0));
    q.flush().unwrap();
    let r = q.check().unwrap();
    assert_eq!((r.corruptions, r.check_errors), (0, 0), "{:?}", r.messages);
    drop(q);
    let o = std::process::Command::new("qemu-img")
        .args(["check", p.to_str().unwrap()])
        .output()
        .expect("qemu-img");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn late_inplace_write_stays_hidden_by_zeroing() {
    late_write_after_zeroing(false);
}

#[test]
fn late_inplace_write_stays_hidden_by_zeroing_extended_l2() {
    late_write_after_zeroing(true);
}
