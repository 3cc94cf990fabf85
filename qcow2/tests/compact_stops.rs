//! A compaction stopped before any one of its syncs (a process killed
//! there: what it wrote before stays, nothing after reaches the file)
//! leaves an image that checks without corruption, reads the same, and
//! that the next compaction makes exactly as small as an uninterrupted
//! one. Every sync of the compaction is tried, in order.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qcow2::qcow::CompactOptions;
use qcow2::storage::{Faults, IoKind, Storage};
use qcow2::{CreateOptions, Image, Qcow2, Qcow2Options};

/// Lets `syncs` syncs through; from the next one on, every write and
/// sync fails (the process is gone: nothing more reaches the file).
#[derive(Debug)]
struct StopBeforeSync {
    syncs: AtomicU64,
    stopped: std::sync::atomic::AtomicBool,
}

impl Faults for StopBeforeSync {
    fn event(&self, _: &str) {}
    fn check(&self, kind: IoKind, _: u64, _: u64) -> Option<i32> {
        if kind == IoKind::Read {
            return None;
        }
        if kind == IoKind::Flush
            && self
                .syncs
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
        {
            self.stopped.store(true, Ordering::SeqCst);
        }
        self.stopped.load(Ordering::SeqCst).then_some(libc::EIO)
    }
    fn swallowed(&self, _: &str, _: &qcow2::error::Error) {}
}

fn open(p: &Path, faults: Option<Arc<StopBeforeSync>>) -> Qcow2 {
    let st = Storage::open(p, true).unwrap();
    if let Some(f) = faults {
        st.set_faults(f);
    }
    let opts = Qcow2Options {
        bitmaps_on_disk: true,
        ..Default::default()
    };
    Qcow2::open(st, None, opts).unwrap()
}

fn compact(q: &Qcow2) -> qcow2::Result<qcow2::qcow::CompactStats> {
    q.compact(&CompactOptions::default(), &mut |_, _| {})
}

fn content(p: &Path) -> Vec<u8> {
    let q = open(p, None);
    let mut v = vec![0u8; q.size() as usize];
    q.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn a_compaction_stopped_before_any_sync_is_finished_by_the_next() {
    let dir = std::env::temp_dir().join(format!("rimg-compact-stops-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let template = dir.join("t.qcow2");
    // 512-byte clusters: a refcount block covers 256 clusters, so the
    // file spans many blocks, and those of its upper part count nothing
    // once the data moves down.
    let size = 2u64 << 20;
    qcow2::create(
        &template,
        &CreateOptions {
            size,
            cluster_size: 512,
            ..Default::default()
        },
    )
    .unwrap();
    {
        let q = open(&template, None);
        for i in 0..size / 4096 {
            q.write_at(&[(i % 251) as u8 + 1; 4096], i * 4096).unwrap();
        }
        // Holes low in the file for the upper clusters to move into.
        for i in (0..size / 4096).step_by(3) {
            q.discard(i * 4096, 4096).unwrap();
        }
        q.finish().unwrap();
    }
    let want = content(&template);
    let img = dir.join("i.qcow2");
    std::fs::copy(&template, &img).unwrap();
    compact(&open(&img, None)).unwrap();
    let target = std::fs::metadata(&img).unwrap().len();
    assert!(target < std::fs::metadata(&template).unwrap().len());
    let mut stops = 0;
    for n in 0.. {
        assert!(n < 100_000, "the compaction never ends");
        std::fs::copy(&template, &img).unwrap();
        let f = Arc::new(StopBeforeSync {
            syncs: AtomicU64::new(n),
            stopped: false.into(),
        });
        let q = open(&img, Some(f.clone()));
        let r = compact(&q);
        drop(q);
        if !f.stopped.load(Ordering::SeqCst) {
            r.unwrap();
            break;
        }
        stops += 1;
        let q = open(&img, None);
        let rep = q.check().unwrap();
        assert_eq!(
            (rep.corruptions, rep.check_errors),
            (0, 0),
            "stopped before sync {n}"
        );
        compact(&q).unwrap();
        drop(q);
        assert_eq!(
            std::fs::metadata(&img).unwrap().len(),
            target,
            "stopped before sync {n}"
        );
        assert!(
            content(&img) == want,
            "stopped before sync {n}: the content changed"
        );
    }
    assert!(stops > 10, "{stops} syncs only");
    let _ = std::fs::remove_dir_all(&dir);
}
