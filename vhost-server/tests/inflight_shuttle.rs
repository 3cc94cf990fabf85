//! The inflight protocol under shuttle: a device thread (takes heads from
//! the avail ring and marks them, completes them out of order in batches
//! through the real [`QueueLog`]), a guest thread (posts requests, sees
//! them returned through the used ring, re-posts their heads) and a kill
//! at whatever point shuttle schedules it; from then on the device's
//! stores are lost and it stops. A new daemon then recovers from the
//! region: every request the guest has out runs exactly once (resubmitted
//! or read from the avail ring), none it saw returned runs again. The
//! device variant that marks a head only after its next completion is
//! published must be caught. Run with
//! `cargo test -p rimg-vhost-server --features shuttle --test inflight_shuttle`.
#![cfg(feature = "shuttle")]

use std::sync::Arc;

use rimg_vhost_server::inflight::{stride, QueueLog, RegionMem};
use shuttle::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};

const N: u16 = 4;
/// Requests the guest posts in one run.
const POSTS: usize = 7;

/// Region fields (one cell per field offset, as wide as any access to
/// it), the avail and used rings, and the kill switch: stores made after
/// the kill are lost with the process.
struct Shared {
    region: Vec<AtomicU64>,
    avail: Vec<AtomicU16>,
    avail_idx: AtomicU16,
    used: Vec<AtomicU64>,
    used_idx: AtomicU16,
    killed: AtomicBool,
    /// Stores the device made, and whether it stopped by itself.
    stores: AtomicUsize,
    done: AtomicBool,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            region: (0..stride(N)).map(|_| AtomicU64::new(0)).collect(),
            avail: (0..N).map(|_| AtomicU16::new(0)).collect(),
            avail_idx: AtomicU16::new(0),
            used: (0..N).map(|_| AtomicU64::new(0)).collect(),
            used_idx: AtomicU16::new(0),
            killed: AtomicBool::new(false),
            stores: AtomicUsize::new(0),
            done: AtomicBool::new(false),
        }
    }

    fn alive(&self) -> bool {
        !self.killed.load(Ordering::SeqCst)
    }

    /// Counts a store the device is about to make; false once killed.
    fn storing(&self) -> bool {
        self.stores.fetch_add(1, Ordering::SeqCst);
        self.alive()
    }
}

impl RegionMem for Shared {
    fn len(&self) -> usize {
        self.region.len()
    }
    fn load8(&self, at: usize) -> u8 {
        self.region[at].load(Ordering::SeqCst) as u8
    }
    fn load16(&self, at: usize) -> u16 {
        self.region[at].load(Ordering::SeqCst) as u16
    }
    fn load64(&self, at: usize) -> u64 {
        self.region[at].load(Ordering::SeqCst)
    }
    fn store8(&self, at: usize, v: u8) {
        self.store64(at, v.into())
    }
    fn store16(&self, at: usize, v: u16) {
        self.store64(at, v.into())
    }
    fn store64(&self, at: usize, v: u64) {
        if self.storing() {
            self.region[at].store(v, Ordering::SeqCst)
        }
    }
}

/// The device: takes what is available (marking it before anything
/// later is published, or, with `mark_late`, after), completes batches
/// of up to two in reverse take order.
fn device(s: Arc<Shared>, mark_late: bool) {
    let mut log = QueueLog::new(s.clone(), 0, N).unwrap();
    log.recover(0, N).unwrap();
    let (mut next, mut used) = (0u16, 0u16);
    let mut taken: Vec<u16> = Vec::new();
    let mut late: Vec<u16> = Vec::new();
    while s.alive() && (used as usize) < POSTS {
        if next != s.avail_idx.load(Ordering::SeqCst) {
            let h = s.avail[usize::from(next % N)].load(Ordering::SeqCst);
            next = next.wrapping_add(1);
            taken.push(h);
            if mark_late && taken.len() == 1 {
                late.push(h);
            } else {
                log.take(h);
            }
            continue;
        }
        let ready: Vec<u16> = taken
            .iter()
            .copied()
            .filter(|h| !late.contains(h))
            .rev()
            .take(2)
            .collect();
        if ready.is_empty() {
            for h in late.drain(..) {
                log.take(h);
            }
            shuttle::thread::yield_now();
            continue;
        }
        taken.retain(|h| !ready.contains(h));
        log.complete_begin(&ready);
        for &h in &ready {
            if s.storing() {
                s.used[usize::from(used % N)].store(h.into(), Ordering::SeqCst);
            }
            used = used.wrapping_add(1);
        }
        if s.storing() {
            s.used_idx.store(used, Ordering::SeqCst);
        }
        log.complete_end(&ready, used);
        for h in late.drain(..) {
            log.take(h);
        }
    }
    s.done.store(true, Ordering::SeqCst);
}

/// Kills the device after a random number of its stores (the guest runs
/// meanwhile as shuttle schedules it), unless it finished first.
fn killer(s: &Shared) {
    use shuttle::rand::RngCore;
    let after = (shuttle::rand::thread_rng().next_u64() % 80) as usize;
    while s.stores.load(Ordering::SeqCst) < after && !s.done.load(Ordering::SeqCst) {
        shuttle::thread::yield_now();
    }
    s.killed.store(true, Ordering::SeqCst);
}

/// The guest: posts requests while it has heads, takes back what the used
/// ring returns. Returns the head of each request posted and which were
/// returned.
fn guest(s: &Shared) -> (Vec<u16>, Vec<bool>) {
    let mut posts: Vec<u16> = Vec::new();
    let mut returned: Vec<bool> = Vec::new();
    let mut free: Vec<u16> = (0..N).rev().collect();
    let mut seen = 0u16;
    while posts.len() < POSTS && s.alive() {
        if let Some(h) = free.pop() {
            let i = posts.len() as u16;
            s.avail[usize::from(i % N)].store(h, Ordering::SeqCst);
            s.avail_idx.store(i + 1, Ordering::SeqCst);
            posts.push(h);
            returned.push(false);
            continue;
        }
        let used = s.used_idx.load(Ordering::SeqCst);
        while seen != used {
            let h = s.used[usize::from(seen % N)].load(Ordering::SeqCst) as u16;
            let r = (0..posts.len())
                .find(|&r| posts[r] == h && !returned[r])
                .expect("a used head the guest has out");
            returned[r] = true;
            free.push(h);
            seen += 1;
        }
        shuttle::thread::yield_now();
    }
    (posts, returned)
}

fn run(mark_late: bool) {
    let s = Arc::new(Shared::new());
    let d = {
        let s = s.clone();
        shuttle::thread::spawn(move || device(s, mark_late))
    };
    let k = {
        let s = s.clone();
        shuttle::thread::spawn(move || killer(&s))
    };
    let (posts, mut returned) = guest(&s);
    d.join().unwrap();
    k.join().unwrap();
    // What the guest has not seen yet but the used ring holds.
    let used = s.used_idx.load(Ordering::SeqCst);
    let seen = returned.iter().filter(|&&r| r).count() as u16;
    for i in seen..used {
        let h = s.used[usize::from(i % N)].load(Ordering::SeqCst) as u16;
        let r = (0..posts.len()).find(|&r| posts[r] == h && !returned[r]);
        returned[r.expect("a used head the guest has out")] = true;
    }
    let outstanding: Vec<usize> = (0..posts.len()).filter(|&r| !returned[r]).collect();
    let request_of = |h: u16| outstanding.iter().copied().find(|&r| posts[r] == h);

    // The next daemon, whose stores count.
    s.killed.store(false, Ordering::SeqCst);
    let heads = QueueLog::new(s.clone(), 0, N)
        .unwrap()
        .recover(used, N)
        .expect("recover");
    let mut ran: Vec<usize> = heads
        .iter()
        .map(|&h| request_of(h).expect("a returned head resubmitted"))
        .collect();
    let avail_idx = s.avail_idx.load(Ordering::SeqCst);
    let mut i = used.wrapping_add(heads.len() as u16);
    assert!(
        avail_idx.wrapping_sub(i) <= N,
        "next avail {i} past {avail_idx}"
    );
    while i != avail_idx {
        let h = s.avail[usize::from(i % N)].load(Ordering::SeqCst);
        ran.push(request_of(h).expect("a returned head read from the avail ring"));
        i = i.wrapping_add(1);
    }
    ran.sort_unstable();
    assert_eq!(ran, outstanding, "each outstanding request exactly once");
}

/// Schedules per check.
const SCHEDULES: usize = 3000;

#[test]
fn killed_anywhere_each_request_runs_once() {
    rimg_model::explore(|| run(false), SCHEDULES, SCHEDULES);
}

/// The first request marked only after a later completion is published:
/// shuttle must find the kill in between.
#[test]
#[should_panic]
fn a_late_mark_is_found() {
    shuttle::check_random(|| run(true), rimg_model::schedules(SCHEDULES));
}
