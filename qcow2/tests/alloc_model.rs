//! Model checking of the engine's cross-thread protocols with shuttle:
//! the engine is built with shuttle's mutexes and condition variables
//! (`--features shuttle`), and shuttle explores the interleavings of the
//! threads below, each run on a fresh image. Run with
//! `cargo test -p rimg-qcow2 --features shuttle --test alloc_model`.
//!
//! - `parked_writes_are_woken`: block-daemon queues as event loops that
//!   never block on each other (the worker in `vhost-blk/src/worker.rs`):
//!   a write refused by `try_begin_write` is parked, and the queue sleeps
//!   until its eventfd is written, by its own completions or by the waker
//!   the engine calls when the allocation ends. Without that waker (the
//!   daemon before the fix, `lost_wake_up_is_found`) shuttle finds the
//!   schedule in which a queue sleeps forever on a parked write.
//! - `freed_clusters_wait_for_io_epochs`: a cluster freed by a discard
//!   is not reused by another allocation while an I/O that mapped it
//!   still holds its epoch guard, whatever the interleaving with flushes.
//! - `zeroing_waits_for_allocations`: write-zeroes against an in-flight
//!   allocation of the same clusters ends, per cluster, in one of the two
//!   orders.
//! - `zeroing_waits_for_inplace_writes`: write-zeroes that keeps the host
//!   cluster, racing an in-place write and a write that then reuses the
//!   cluster: once the first two have ended, what the in-place write's
//!   range reads as never changes again (a late in-place write used to
//!   reappear when the reusing write committed).
//! - `raw_data_file_zeroing_is_ordered_with_writes`: write-zeroes on an
//!   image with a raw external data file, racing a write into the same
//!   cluster: afterwards the data file reads as the image does (the zeros
//!   went into it before waiting for the write, which then landed over
//!   them while the image read zeros).
//! - `logged_fills_reach_tables_only_after_a_sync`: queues writing into
//!   new clusters over a backing file with the intent log (a log of 2
//!   records, so it fills and drains) and a flush racing them: an L2
//!   table write that carries an entry always follows a sync that
//!   followed the last write of that entry's cluster, and every write
//!   reads back.
//! - `foreign_units_are_allocated_once`: writers into the same new block
//!   of a VDI image and of a VHDX image (the foreign formats' allocation
//!   lock, whole and sparse units): the block is allocated once and holds
//!   every writer's bytes.
#![cfg(feature = "shuttle")]

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use qcow2::storage::Storage;
use qcow2::{
    AllocWaker, CreateOptions, HostOffset, Image, Mapping, PendingWrite, Qcow2, Qcow2Options,
};
use rimg_model::{explore, schedules};
use shuttle::sync::{Condvar, Mutex};

const CS: u64 = 512;

/// A fresh image per shuttle iteration, in a directory removed at exit.
struct Images {
    dir: PathBuf,
    n: AtomicUsize,
    _removed_after: RemoveDir,
}

impl Images {
    fn new(tag: &str) -> Images {
        let dir = std::env::temp_dir().join(format!("rimg-model-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Images {
            _removed_after: RemoveDir(dir.clone()),
            dir,
            n: AtomicUsize::new(0),
        }
    }

    fn fresh(&self) -> (Arc<Qcow2>, PathBuf) {
        self.fresh_with(|_, _| {})
    }

    /// A fresh image whose creation options `f` adjusts (given the image's
    /// path).
    fn fresh_with(&self, f: impl FnOnce(&Path, &mut CreateOptions)) -> (Arc<Qcow2>, PathBuf) {
        let p = self
            .dir
            .join(format!("{}.qcow2", self.n.fetch_add(1, Ordering::Relaxed)));
        let mut o = CreateOptions {
            size: 64 * CS,
            cluster_size: CS,
            ..CreateOptions::default()
        };
        f(&p, &mut o);
        qcow2::create(&p, &o).unwrap();
        (open(&p), p)
    }
}

/// Removes a directory when dropped: the `Images`' own, and one more for
/// a test whose `Images` is never dropped (shuttle keeps the closure it
/// found a deadlock in).
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(p: &Path) -> Arc<Qcow2> {
    let st = Storage::open(p, true).unwrap();
    Arc::new(Qcow2::open(st, None, Qcow2Options::default()).unwrap())
}

fn assert_clean(img: &Qcow2) {
    let r = img.check().unwrap();
    assert_eq!(
        (r.corruptions, r.check_errors),
        (0, 0),
        "check: {:?}",
        r.messages
    );
}

/// A queue's eventfd: a counter its event loop sleeps on.
#[derive(Default)]
struct EventFd {
    count: Mutex<u64>,
    cv: Condvar,
}

impl EventFd {
    fn write(&self) {
        *self.count.lock().unwrap() += 1;
        self.cv.notify_all();
    }

    /// epoll_wait + read: sleeps until the counter is non-zero, clears it.
    fn wait(&self) {
        let mut c = self.count.lock().unwrap();
        while *c == 0 {
            c = self.cv.wait(c).unwrap();
        }
        *c = 0;
    }
}

struct Waker(Arc<EventFd>);

impl AllocWaker for Waker {
    fn wake(&self) {
        self.0.write();
    }
}

struct NoWake;

impl AllocWaker for NoWake {
    fn wake(&self) {}
}

/// A guest write request: bytes [off, off + len) filled with `fill`.
#[derive(Clone, Copy)]
struct Req {
    off: u64,
    len: u64,
    fill: u8,
}

/// One queue's worker, reduced to its scheduling: requests are mapped
/// extent by extent with `try_begin_write`; an extent's data write sits in
/// the "ring" until the loop reaps it (then its commit and a completion
/// that writes the eventfd); a refused request is parked and retried
/// whenever the loop handles its eventfd. The loop sleeps only when its
/// ring is empty, as the daemon's epoll loop does.
struct Queue {
    img: Arc<Qcow2>,
    efd: Arc<EventFd>,
    waker: Arc<dyn AllocWaker>,
    ring: VecDeque<(PendingWrite, u8)>,
    /// Requests with bytes still to map: (request, bytes done).
    parked: VecDeque<(Req, u64)>,
}

impl Queue {
    fn new(img: Arc<Qcow2>, wake: bool) -> Queue {
        let efd = Arc::new(EventFd::default());
        let waker: Arc<dyn AllocWaker> = if wake {
            Arc::new(Waker(efd.clone()))
        } else {
            Arc::new(NoWake)
        };
        Queue {
            img,
            efd,
            waker,
            ring: VecDeque::new(),
            parked: VecDeque::new(),
        }
    }

    /// Maps and "issues" the rest of a request; parks it when refused.
    fn plan(&mut self, r: Req, mut done: u64) {
        while done < r.len {
            let w = self
                .img
                .clone()
                .try_begin_write(r.off + done, (r.len - done) as usize, &self.waker)
                .unwrap();
            let Some(w) = w else {
                self.parked.push_back((r, done));
                return;
            };
            done += w.len() as u64;
            self.ring.push_back((w, r.fill));
        }
    }

    /// Reaps one data write: writes it, commits it, signals completion.
    fn reap_one(&mut self) {
        let (w, fill) = self.ring.pop_front().unwrap();
        let data = vec![fill; w.len()];
        let ok = self.img.storage().write_at(&data, w.host().0).is_ok();
        // A failed data write is rolled back by dropping the guard.
        if ok {
            w.commit().unwrap();
        }
        self.efd.write();
    }

    fn run_parked(&mut self) {
        for _ in 0..self.parked.len() {
            let (r, done) = self.parked.pop_front().unwrap();
            self.plan(r, done);
        }
    }

    /// The event loop, after a kick that made `reqs` available.
    fn serve(mut self, reqs: &[Req]) {
        for &r in reqs {
            self.plan(r, 0);
        }
        while !self.ring.is_empty() || !self.parked.is_empty() {
            if self.ring.is_empty() {
                // epoll_wait: nothing of ours in flight.
                self.efd.wait();
            } else {
                self.reap_one();
                self.efd.wait();
            }
            self.run_parked();
        }
    }
}

/// Two queues write disjoint byte ranges that share clusters (so they
/// contend for the same allocations), over several clusters each.
fn two_queues(images: &Images, wake: bool) {
    let (img, _p) = images.fresh();
    let q0 = [
        Req {
            off: 0,
            len: CS + CS / 2,
            fill: 0xa0,
        },
        Req {
            off: 3 * CS,
            len: CS / 2,
            fill: 0xa1,
        },
    ];
    let q1 = [
        Req {
            off: CS + CS / 2,
            len: CS + CS / 2,
            fill: 0xb0,
        },
        Req {
            off: 3 * CS + CS / 2,
            len: CS / 2,
            fill: 0xb1,
        },
    ];
    let mut handles = Vec::new();
    for reqs in [q0, q1] {
        let q = Queue::new(img.clone(), wake);
        handles.push(shuttle::thread::spawn(move || q.serve(&reqs)));
    }
    for h in handles {
        h.join().unwrap();
    }
    let mut got = vec![0u8; (4 * CS) as usize];
    img.read_at(&mut got, 0).unwrap();
    for r in q0.iter().chain(&q1) {
        let s = &got[r.off as usize..(r.off + r.len) as usize];
        assert!(
            s.iter().all(|&b| b == r.fill),
            "bytes at {} lost their write",
            r.off
        );
    }
    img.flush().unwrap();
    assert_clean(&img);
}

#[test]
fn parked_writes_are_woken() {
    let images = Arc::new(Images::new("wake"));
    let i = images.clone();
    explore(move || two_queues(&i, true), 1500, 1500);
}

/// The daemon before the fix: a parked write was retried only after the
/// queue's own completions. Shuttle must find the schedule that leaves a
/// queue asleep with a parked write (a deadlock: every task blocked).
#[test]
#[should_panic(expected = "deadlock")]
fn lost_wake_up_is_found() {
    let images = Arc::new(Images::new("lost"));
    // Dropped as the deadlock's panic unwinds this test.
    let _dir = RemoveDir(images.dir.clone());
    let i = images.clone();
    shuttle::check_random(move || two_queues(&i, false), 3000);
}

/// An I/O that mapped a cluster keeps it from being reused while it holds
/// its epoch guard, even if the guest discards the range and flushes.
fn epoch_holds_freed_cluster(images: &Images) {
    let (img, _p) = images.fresh();
    img.write_at(&[0x11; CS as usize], 0).unwrap();
    img.flush().unwrap();
    let reader = {
        let img = img.clone();
        shuttle::thread::spawn(move || {
            let epoch = img.io_epoch();
            let (m, _) = img.map_read(0, CS).unwrap();
            let Mapping::Data(HostOffset(host)) = m else {
                // The discard came first: nothing mapped, nothing to hold.
                return;
            };
            shuttle::thread::yield_now();
            let mut buf = vec![0u8; CS as usize];
            img.storage().read_at(&mut buf, host).unwrap();
            drop(epoch);
            assert!(
                buf.iter().all(|&b| b == 0x11),
                "host cluster {host:#x} was reused while an I/O held it"
            );
        })
    };
    let discarder = {
        let img = img.clone();
        shuttle::thread::spawn(move || {
            img.discard(0, CS).unwrap();
            img.flush().unwrap();
        })
    };
    let writer = {
        let img = img.clone();
        shuttle::thread::spawn(move || {
            for k in 1..4 {
                img.write_at(&[0x22; CS as usize], k * CS).unwrap();
                img.flush().unwrap();
            }
        })
    };
    for h in [reader, discarder, writer] {
        h.join().unwrap();
    }
    img.flush().unwrap();
    assert_clean(&img);
}

#[test]
fn freed_clusters_wait_for_io_epochs() {
    let images = Arc::new(Images::new("epoch"));
    let i = images.clone();
    explore(move || epoch_holds_freed_cluster(&i), 1000, 1000);
}

/// Write-zeroes over a cluster that a queue is allocating waits for the
/// allocation: each cluster ends in one order or the other, never a mix.
fn zeroes_against_allocation(images: &Images) {
    let (img, _p) = images.fresh();
    let q = Queue::new(img.clone(), true);
    let writer = shuttle::thread::spawn(move || {
        q.serve(&[Req {
            off: 2 * CS,
            len: 2 * CS,
            fill: 0x33,
        }])
    });
    let zeroer = {
        let img = img.clone();
        shuttle::thread::spawn(move || {
            img.write_zeroes(2 * CS, 2 * CS, true).unwrap();
        })
    };
    writer.join().unwrap();
    zeroer.join().unwrap();
    let mut got = vec![0u8; (2 * CS) as usize];
    img.read_at(&mut got, 2 * CS).unwrap();
    // Each cluster is changed atomically by either: one order or the
    // other, per cluster.
    for c in got.chunks(CS as usize) {
        assert!(
            c.iter().all(|&b| b == 0) || c.iter().all(|&b| b == 0x33),
            "write-zeroes and a write mixed inside one cluster"
        );
    }
    img.flush().unwrap();
    assert_clean(&img);
}

#[test]
fn zeroing_waits_for_allocations() {
    let images = Arc::new(Images::new("zero"));
    let i = images.clone();
    shuttle::check_random(move || zeroes_against_allocation(&i), schedules(1000));
}

/// An in-place write (its data I/O outside the lock, as a queue's ring
/// does it), write-zeroes over its cluster keeping the host cluster, and
/// a write to another part of the cluster (which reuses the host cluster
/// when it finds it zeroed). Once the in-place write and the zeroing have
/// ended, the in-place write's range reads the same before and after the
/// third write ends.
fn zeroes_against_inplace_write(images: &Images) {
    let (img, _p) = images.fresh();
    img.write_at(&[0x11; CS as usize], CS).unwrap();
    let inplace = {
        let img = img.clone();
        shuttle::thread::spawn(move || {
            let epoch = img.io_epoch();
            let w = img.clone().begin_write(CS, 64).unwrap();
            shuttle::thread::yield_now();
            let ok = img.storage().write_at(&[0xaa; 64], w.host().0).is_ok();
            // A failed data write is rolled back by dropping the guard,
            // before the epoch ends.
            if ok {
                w.commit().unwrap();
            } else {
                drop(w);
            }
            drop(epoch);
        })
    };
    let zeroer = {
        let img = img.clone();
        shuttle::thread::spawn(move || img.write_zeroes(CS, CS, false).unwrap())
    };
    let other = {
        let img = img.clone();
        shuttle::thread::spawn(move || img.write_at(&[0xbb; 64], CS + 256).unwrap())
    };
    inplace.join().unwrap();
    zeroer.join().unwrap();
    let mut before = [0u8; 64];
    img.read_at(&mut before, CS).unwrap();
    other.join().unwrap();
    let mut after = [0u8; 64];
    img.read_at(&mut after, CS).unwrap();
    assert_eq!(
        before, after,
        "the in-place write's range changed after it and the zeroing had ended"
    );
    img.flush().unwrap();
    assert_clean(&img);
}

#[test]
fn zeroing_waits_for_inplace_writes() {
    let images = Arc::new(Images::new("inplace"));
    let i = images.clone();
    explore(move || zeroes_against_inplace_write(&i), 1000, 1000);
}

fn raw_data_file_zeroes_against_write(images: &Images) {
    let (img, p) = images.fresh_with(|p, o| {
        o.data_file = Some(p.with_extension("data").display().to_string());
        o.data_file_raw = true;
    });
    img.write_at(&[0x11; CS as usize], CS).unwrap();
    let writer = {
        let img = img.clone();
        shuttle::thread::spawn(move || img.write_at(&[0xbb; 64], CS + 256).unwrap())
    };
    let zeroer = {
        let img = img.clone();
        shuttle::thread::spawn(move || img.write_zeroes(CS, CS, false).unwrap())
    };
    writer.join().unwrap();
    zeroer.join().unwrap();
    let mut disk = [0u8; CS as usize];
    img.read_at(&mut disk, CS).unwrap();
    let mut raw = [0u8; CS as usize];
    img.data_storage().read_at(&mut raw, CS).unwrap();
    assert_eq!(
        disk.to_vec(),
        raw.to_vec(),
        "the raw data file {} differs from the image",
        p.with_extension("data").display()
    );
    img.flush().unwrap();
    assert_clean(&img);
}

#[test]
fn raw_data_file_zeroing_is_ordered_with_writes() {
    let images = Arc::new(Images::new("rawdata"));
    let i = images.clone();
    explore(move || raw_data_file_zeroes_against_write(&i), 200, 200);
}

/// Three writers into one new block of a foreign image (VDI, or VHDX
/// with 1 MiB blocks, whose first write also updates the headers) and
/// one into the next: whatever the interleaving, each block is
/// allocated once (the file grows by two blocks, check is clean) and
/// every write reads back.
fn foreign_writers_share_new_blocks(images: &Images, format: qcow2::Format) {
    const MB: u64 = 1 << 20;
    let p = images.dir.join(format!(
        "{}.{}",
        images.n.fetch_add(1, Ordering::Relaxed),
        format.name()
    ));
    let mut o = CreateOptions {
        format,
        size: 2 * MB,
        ..CreateOptions::default()
    };
    o.foreign.block_size = Some(MB);
    qcow2::create(&p, &o).unwrap();
    let empty = std::fs::metadata(&p).unwrap().len();
    let opts = qcow2::OpenOptions {
        writable: true,
        ..Default::default()
    };
    let img = qcow2::open(&p, &opts).unwrap();
    let writes = [(0, 1u8), (MB / 2, 2), (MB - 4096, 3), (MB + 8192, 4)];
    let threads: Vec<_> = writes
        .iter()
        .map(|&(off, fill)| {
            let img = img.clone();
            shuttle::thread::spawn(move || img.write_at(&[fill; 4096], off).unwrap())
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for (off, fill) in writes {
        let mut got = [0u8; 4096];
        img.read_at(&mut got, off).unwrap();
        assert!(got.iter().all(|&b| b == fill), "write at {off} lost");
    }
    let r = qcow2::foreign::check(img.as_ref()).unwrap().unwrap();
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), empty + 2 * MB);
}

#[test]
fn foreign_units_are_allocated_once() {
    let images = Arc::new(Images::new("foreign"));
    for format in [qcow2::Format::Vdi, qcow2::Format::Vhdx] {
        let i = images.clone();
        shuttle::check_random(
            move || foreign_writers_share_new_blocks(&i, format),
            schedules(500),
        );
    }
}

/// The engine's writes and syncs, in order; at each one (the ones before
/// it have completed: shuttle runs one thread at a time and switches only
/// at its own primitives), the L2 table in the file is checked: every
/// entry in it maps a cluster whose last write came before a sync.
#[derive(Debug, Default)]
struct Events {
    log: std::sync::Mutex<Vec<(qcow2::storage::IoKind, u64, u64)>>,
    /// The image and its L2 table's offset, once known.
    table: std::sync::Mutex<Option<(PathBuf, u64)>>,
}

impl Events {
    fn check_table(&self) {
        use qcow2::storage::IoKind;
        use std::os::unix::fs::FileExt;
        let Some((path, l2)) = self.table.lock().unwrap().clone() else {
            return;
        };
        let ev = self.log.lock().unwrap();
        let mut t = vec![0u8; CS as usize];
        std::fs::File::open(&path)
            .unwrap()
            .read_exact_at(&mut t, l2)
            .unwrap();
        for (i, e) in t.chunks(8).enumerate() {
            let host = u64::from_be_bytes(e.try_into().unwrap()) & qcow2::l2::OFFSET_MASK;
            if host == 0 {
                continue;
            }
            let last = ev
                .iter()
                .rposition(|&(k, o, l)| k != IoKind::Flush && o < host + CS && host < o + l);
            if let Some(last) = last {
                assert!(
                    ev[last..].iter().any(|x| x.0 == IoKind::Flush),
                    "the entry of cluster {i} is in the file, but its data (event \
                     {last}) was not synced: {ev:?}"
                );
            }
        }
    }
}

impl qcow2::storage::Faults for Events {
    fn event(&self, _: &str) {}
    fn check(&self, kind: qcow2::storage::IoKind, off: u64, len: u64) -> Option<i32> {
        use qcow2::storage::IoKind;
        self.check_table();
        if matches!(kind, IoKind::Write | IoKind::WriteZeroes | IoKind::Flush) {
            self.log.lock().unwrap().push((kind, off, len));
        }
        None
    }
    fn swallowed(&self, _: &str, _: &qcow2::Error) {}
}

fn logged_writers_and_a_flush(images: &Images) {
    let n = images.n.fetch_add(1, Ordering::Relaxed);
    let base = images.dir.join(format!("{n}.raw"));
    std::fs::write(&base, vec![0x5b; 64 * CS as usize]).unwrap();
    let p = images.dir.join(format!("{n}.qcow2"));
    let o = CreateOptions {
        size: 64 * CS,
        cluster_size: CS,
        backing_file: Some(base.display().to_string()),
        backing_format: Some("raw".into()),
        ..CreateOptions::default()
    };
    qcow2::create(&p, &o).unwrap();
    let events = Arc::new(Events::default());
    let st = Storage::open(&p, true).unwrap();
    st.set_faults(events.clone());
    let b = qcow2::Raw::open(Storage::open(&base, false).unwrap()).unwrap();
    let opts = Qcow2Options {
        metadata_persistence: qcow2::MetadataPersistence::ProcessDeath,
        intent_log: true,
        boot_id: Some([1; 16]),
        intent_log_records: Some(2),
        ..Default::default()
    };
    let img = Arc::new(Qcow2::open(st, Some(Arc::new(b)), opts).unwrap());
    // The L2 table exists before the race.
    img.write_at(&[1; 100], 0).unwrap();
    img.flush().unwrap();
    let mut e = [0u8; 8];
    img.storage()
        .read_at(&mut e, img.header().l1_table_offset)
        .unwrap();
    let l2 = u64::from_be_bytes(e) & qcow2::l2::OFFSET_MASK;
    *events.table.lock().unwrap() = Some((p.clone(), l2));
    let writes = [(0u8, [2u64, 3, 4]), (1, [5, 6, 7])];
    let mut threads = Vec::new();
    for (t, clusters) in writes {
        let img = img.clone();
        threads.push(shuttle::thread::spawn(move || {
            for c in clusters {
                img.write_at(&[0x10 + t; 200], c * CS + 100).unwrap();
            }
        }));
    }
    let flusher = img.clone();
    threads.push(shuttle::thread::spawn(move || flusher.flush().unwrap()));
    for t in threads {
        t.join().unwrap();
    }
    img.flush().unwrap();
    events.check_table();
    for (t, clusters) in writes {
        for c in clusters {
            let mut got = [0u8; CS as usize];
            img.read_at(&mut got, c * CS).unwrap();
            let mut want = [0x5b; CS as usize];
            want[100..300].fill(0x10 + t);
            assert_eq!(got.to_vec(), want.to_vec(), "cluster {c}");
        }
    }
    assert_clean(&img);
}
#[test]
fn logged_fills_reach_tables_only_after_a_sync() {
    let images = Arc::new(Images::new("ilog"));
    let i = images.clone();
    explore(move || logged_writers_and_a_flush(&i), 300, 300);
}
