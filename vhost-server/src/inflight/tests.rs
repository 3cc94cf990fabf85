use std::fs::File;
use std::sync::{Arc, Mutex};

use super::*;

/// A region in a plain vector.
struct Plain(Mutex<Vec<u8>>);

impl Plain {
    fn new(len: usize) -> Plain {
        Plain(Mutex::new(vec![0; len]))
    }
    fn get<const N: usize>(&self, at: usize) -> [u8; N] {
        self.0.lock().unwrap()[at..at + N].try_into().unwrap()
    }
    fn put(&self, at: usize, b: &[u8]) {
        self.0.lock().unwrap()[at..at + b.len()].copy_from_slice(b)
    }
}

impl RegionMem for Plain {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn load8(&self, at: usize) -> u8 {
        self.get::<1>(at)[0]
    }
    fn load16(&self, at: usize) -> u16 {
        u16::from_ne_bytes(self.get(at))
    }
    fn load64(&self, at: usize) -> u64 {
        u64::from_ne_bytes(self.get(at))
    }
    fn store8(&self, at: usize, v: u8) {
        self.put(at, &[v])
    }
    fn store16(&self, at: usize, v: u16) {
        self.put(at, &v.to_ne_bytes())
    }
    fn store64(&self, at: usize, v: u64) {
        self.put(at, &v.to_ne_bytes())
    }
}

#[test]
fn stride_matches_the_spec() {
    // libvhost-user's align_up(16 * qs + 2, 64) and DPDK's.
    assert_eq!(stride(128), 2112);
    assert_eq!(stride(256), 4160);
    for qs in 1..=MAX_QUEUE_SIZE {
        let q = usize::from(qs);
        assert_eq!(stride(qs), (16 * q + 2).next_multiple_of(64));
    }
}

/// A fresh two-queue region of 8 entries.
fn plain() -> Arc<Plain> {
    Arc::new(Plain::new(2 * stride(8)))
}

/// Queue 1's log.
fn log(mem: &Arc<Plain>) -> QueueLog<Arc<Plain>> {
    QueueLog::new(mem.clone(), stride(8), 8).unwrap()
}

#[test]
fn marks_survive_and_come_back_in_take_order() {
    let mem = plain();
    let mut l = log(&mem);
    assert_eq!(l.recover(0, 8), Ok(vec![]));
    assert_eq!(mem.load16(stride(8) + VERSION), REGION_VERSION);
    assert_eq!(mem.load16(stride(8) + DESC_NUM), 8);
    for h in [5, 2, 7, 0] {
        l.take(h);
    }
    l.complete_begin(&[2]);
    l.complete_end(&[2], 1);
    // Queue 0's region is untouched.
    assert!(mem.0.lock().unwrap()[..stride(8)].iter().all(|&b| b == 0));
    let mut again = log(&mem);
    assert_eq!(again.recover(1, 8), Ok(vec![5, 7, 0]));
    // The counter goes on after the largest.
    again.take(3);
    assert_eq!(log(&mem).recover(1, 8), Ok(vec![5, 7, 0, 3]));
}

#[test]
fn a_published_batch_with_marks_left_is_cleared() {
    let mem = plain();
    let mut l = log(&mem);
    l.recover(100, 8).unwrap();
    for h in [1, 2, 3, 4] {
        l.take(h);
    }
    l.complete_begin(&[3, 1, 4]);
    // Killed after the used index reached 103, before complete_end.
    assert_eq!(log(&mem).recover(103, 8), Ok(vec![2]));
    assert_eq!(mem.load16(stride(8) + USED_IDX), 103);
    // Killed before: all four come back.
    let mem2 = plain();
    let mut l = log(&mem2);
    l.recover(100, 8).unwrap();
    for h in [1, 2, 3, 4] {
        l.take(h);
    }
    l.complete_begin(&[3, 1, 4]);
    assert_eq!(log(&mem2).recover(100, 8), Ok(vec![1, 2, 3, 4]));
}

#[test]
fn hostile_regions_are_refused_and_reset() {
    let base = stride(8);
    let fresh = || {
        let mem = plain();
        let mut l = log(&mem);
        l.recover(10, 8).unwrap();
        l.take(6);
        mem
    };
    type Spoil<'a> = Box<dyn Fn(&Plain) + 'a>;
    let cases: Vec<(&str, Spoil, InflightError)> = vec![
        (
            "version",
            Box::new(|m| m.store16(base + VERSION, 7)),
            InflightError::BadVersion(7),
        ),
        (
            "desc_num",
            Box::new(|m| m.store16(base + DESC_NUM, 9)),
            InflightError::DescNum { found: 9, want: 8 },
        ),
        (
            "batch longer than the ring",
            Box::new(|m| m.store16(base + USED_IDX, 1)),
            InflightError::TornBatch {
                used: 10,
                logged: 1,
                batch: 9,
                ring: 8,
            },
        ),
        (
            "next loop",
            Box::new(|m| {
                m.store16(base + USED_IDX, 7);
                m.store16(base + LAST_BATCH_HEAD, 2);
                m.store16(base + DESCS + 2 * DESC_LEN + D_NEXT, 2);
            }),
            InflightError::BatchLoop(2),
        ),
        (
            "batch head outside the ring",
            Box::new(|m| {
                m.store16(base + USED_IDX, 9);
                m.store16(base + LAST_BATCH_HEAD, 300);
            }),
            InflightError::HeadOutOfRange { head: 300, ring: 8 },
        ),
        (
            "mark value",
            Box::new(|m| m.store8(base + DESCS + 3 * DESC_LEN, 9)),
            InflightError::BadMark { head: 3, value: 9 },
        ),
    ];
    for (what, spoil, want) in cases {
        let mem = fresh();
        spoil(&mem);
        let mut l = log(&mem);
        assert_eq!(l.recover(10, 8), Err(want), "{what}");
        assert_eq!(l.restart(1, 10, 8), Vec::<u16>::new(), "{what}");
        assert_eq!(log(&mem).recover(10, 8), Ok(vec![]), "{what}: reset");
    }
    // A marked head beyond a smaller ring.
    let mem = fresh();
    assert_eq!(
        log(&mem).recover(10, 4),
        Err(InflightError::HeadOutOfRange { head: 6, ring: 4 })
    );
    assert_eq!(
        log(&mem).recover(10, 16),
        Err(InflightError::RingTooLarge {
            ring: 16,
            desc_num: 8
        })
    );
}

#[test]
fn logs_fit_their_memory() {
    let mem = plain();
    assert!(QueueLog::new(mem.clone(), 2 * stride(8), 8).is_none());
    assert!(QueueLog::new(mem.clone(), 0, 0).is_none());
    assert!(QueueLog::new(mem.clone(), 8, 8).is_none());
    assert!(QueueLog::new(mem, 0, 9).is_some());
}

fn description(queues: u16, queue_size: u16) -> Description {
    Description {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: queues,
        queue_size,
    }
}

#[test]
fn created_regions_are_sealed_and_map() {
    let inflight = Inflight::new(2);
    let (d, file) = inflight.get(&description(2, 128).encode()).unwrap();
    assert_eq!((d.mmap_size, d.mmap_offset), (2 * 2112, 0));
    assert_eq!(file.metadata().unwrap().len(), 2 * 2112);
    assert!(file.set_len(100).is_err(), "sealed against shrinking");
    inflight.set(&d.encode(), &[file]).unwrap();
    let mut q1 = inflight.queue(1).unwrap();
    assert!(inflight.queue(2).is_none());
    assert_eq!(q1.recover(0, 128), Ok(vec![]));
    q1.take(77);
    assert_eq!(inflight.queue(1).unwrap().recover(0, 128), Ok(vec![77]));
}

#[test]
fn bad_descriptions_and_files_are_refused() {
    let inflight = Inflight::new(2);
    for (q, qs) in [(0, 128), (3, 128), (1, 0), (1, MAX_QUEUE_SIZE + 1)] {
        assert!(matches!(
            inflight.get(&description(q, qs).encode()),
            Err(RegionSetError::Geometry { .. })
        ));
    }
    assert!(matches!(
        inflight.get(&[0; 12]),
        Err(RegionSetError::Payload(12))
    ));
    let (d, file) = inflight.get(&description(1, 64).encode()).unwrap();
    let short = Description {
        mmap_size: d.mmap_size + 4096,
        ..d
    };
    assert!(matches!(
        inflight.set(&short.encode(), &[file.try_clone().unwrap()]),
        Err(RegionSetError::Size { .. })
    ));
    let too_small = Description {
        queue_size: 128,
        ..d
    };
    assert!(matches!(
        inflight.set(&too_small.encode(), &[file.try_clone().unwrap()]),
        Err(RegionSetError::Size { .. })
    ));
    assert!(matches!(
        inflight.set(&d.encode(), &[]),
        Err(RegionSetError::Fds(0))
    ));
    // An unsealed memfd could shrink under the mapping.
    // SAFETY: a NUL-terminated name; the result is checked.
    let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: a fresh descriptor we own.
    let unsealed = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    unsealed.set_len(d.mmap_size).unwrap();
    assert!(matches!(
        inflight.set(&d.encode(), &[unsealed]),
        Err(RegionSetError::Unsealed(_))
    ));
    assert!(inflight.queue(0).is_none(), "nothing attached");
}
