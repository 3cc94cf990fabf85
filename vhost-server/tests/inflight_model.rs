//! Every crash point of the inflight protocol: a device model drives the
//! real [`QueueLog`] over a memory that records each store (to the region,
//! and the used index it publishes) while a guest model posts requests,
//! the device takes them and completes them out of order in batches. For
//! every prefix of those stores the daemon is "killed" there: a new log
//! recovers from the region as it was, the guest may meanwhile re-post
//! into the slots of the heads it saw returned, and the new daemon runs
//! what it resubmits plus what it then reads from the avail ring.
//!
//! Checked at each crash point: the resubmitted heads are exactly the
//! marked, unpublished ones in take order, and every request the guest
//! posted and did not see returned runs exactly once, none that it saw
//! returned runs again. Mutants of the device's ordering (a mark made
//! after a later completion is published, marks cleared before the
//! publication, no batch links) must be caught.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rimg_vhost_server::inflight::{stride, QueueLog, RegionMem};

/// Ring (and region) entries.
const N: u16 = 8;
/// The first avail and used index: the run wraps around 65535.
const BASE: u16 = 65530;

#[derive(Clone, Debug)]
enum Store {
    Region {
        at: usize,
        bytes: Vec<u8>,
    },
    /// The used index, and the requests this publication returned.
    Used {
        idx: u16,
        reqs: Vec<usize>,
    },
}

/// Region bytes, with every store recorded (and the guest's post count
/// when it was made).
struct Recorder {
    bytes: Mutex<Vec<u8>>,
    stores: Mutex<Vec<(Store, usize)>>,
    posts: AtomicUsize,
}

impl Recorder {
    fn new(bytes: Vec<u8>) -> Recorder {
        Recorder {
            bytes: Mutex::new(bytes),
            stores: Mutex::default(),
            posts: AtomicUsize::new(0),
        }
    }
    fn load<const K: usize>(&self, at: usize) -> [u8; K] {
        self.bytes.lock().unwrap()[at..at + K].try_into().unwrap()
    }
    fn store(&self, at: usize, b: &[u8]) {
        self.bytes.lock().unwrap()[at..at + b.len()].copy_from_slice(b);
        self.stores.lock().unwrap().push((
            Store::Region {
                at,
                bytes: b.to_vec(),
            },
            self.posts.load(Ordering::Relaxed),
        ));
    }
    fn publish(&self, idx: u16, reqs: Vec<usize>) {
        self.stores.lock().unwrap().push((
            Store::Used { idx, reqs },
            self.posts.load(Ordering::Relaxed),
        ));
    }
    fn stores(&self) -> usize {
        self.stores.lock().unwrap().len()
    }
}

impl RegionMem for Recorder {
    fn len(&self) -> usize {
        self.bytes.lock().unwrap().len()
    }
    fn load8(&self, at: usize) -> u8 {
        self.load::<1>(at)[0]
    }
    fn load16(&self, at: usize) -> u16 {
        u16::from_ne_bytes(self.load(at))
    }
    fn load64(&self, at: usize) -> u64 {
        u64::from_ne_bytes(self.load(at))
    }
    fn store8(&self, at: usize, v: u8) {
        self.store(at, &[v])
    }
    fn store16(&self, at: usize, v: u16) {
        self.store(at, &v.to_ne_bytes())
    }
    fn store64(&self, at: usize, v: u64) {
        self.store(at, &v.to_ne_bytes())
    }
}

/// How the device orders its steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    Correct,
    /// Marks some taken heads only after the next completion of other
    /// requests is published.
    MarkLate,
    /// Clears the marks before the used index is published.
    ClearFirst,
    /// Publishes without linking the batch.
    NoBatchLink,
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// One run: the recorded stores, the requests posted (head of each;
/// request `i` sits at avail index `BASE + i`), which requests were taken
/// with the index of their mark store, and the region before the first
/// store.
struct Run {
    stores: Vec<(Store, usize)>,
    posts: Vec<u16>,
    takes: Vec<(usize, usize)>,
    initial: Vec<u8>,
}

fn run(seed: u64, device: Device) -> Run {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let rec = Arc::new(Recorder::new(vec![0; stride(N)]));
    let mut log = QueueLog::new(rec.clone(), 0, N).unwrap();
    assert_eq!(log.recover(BASE, N), Ok(vec![]));
    let initial = rec.bytes.lock().unwrap().clone();
    rec.stores.lock().unwrap().clear();
    let mut posts: Vec<u16> = Vec::new();
    let mut free: Vec<u16> = (0..N).collect();
    let (mut next_avail, mut used) = (0usize, BASE);
    // Taken, not returned: (request, head). Marks not made yet (MarkLate).
    let mut taken: Vec<(usize, u16)> = Vec::new();
    let mut late: Vec<(usize, u16)> = Vec::new();
    let mut takes = Vec::new();
    for _ in 0..60 {
        match rng.below(3) {
            0 => {
                for _ in 0..1 + rng.below(3) {
                    if free.is_empty() {
                        break;
                    }
                    let h = free.swap_remove(rng.below(free.len()));
                    posts.push(h);
                    rec.posts.store(posts.len(), Ordering::Relaxed);
                }
            }
            1 => {
                for _ in 0..1 + rng.below(3) {
                    if next_avail == posts.len() {
                        break;
                    }
                    let (r, h) = (next_avail, posts[next_avail]);
                    next_avail += 1;
                    taken.push((r, h));
                    if device == Device::MarkLate && rng.below(2) == 0 {
                        late.push((r, h));
                    } else {
                        log.take(h);
                        takes.push((r, rec.stores() - 1));
                    }
                }
            }
            _ => {
                // Only marked requests complete (MarkLate's unmarked ones
                // wait): the mutant breaks nothing but the order of a mark
                // and other requests' completions.
                let mut batch = Vec::new();
                for _ in 0..1 + rng.below(4) {
                    let ready: Vec<usize> = (0..taken.len())
                        .filter(|&k| !late.contains(&taken[k]))
                        .collect();
                    if ready.is_empty() {
                        break;
                    }
                    batch.push(taken.swap_remove(ready[rng.below(ready.len())]));
                }
                if batch.is_empty() {
                    // Nothing published meanwhile: marking now is in time.
                    for (r, h) in late.drain(..) {
                        log.take(h);
                        takes.push((r, rec.stores() - 1));
                    }
                    continue;
                }
                let heads: Vec<u16> = batch.iter().map(|&(_, h)| h).collect();
                used = used.wrapping_add(batch.len() as u16);
                if device != Device::NoBatchLink {
                    log.complete_begin(&heads);
                }
                if device == Device::ClearFirst {
                    log.complete_end(&heads, used);
                }
                rec.publish(used, batch.iter().map(|&(r, _)| r).collect());
                if device != Device::ClearFirst {
                    log.complete_end(&heads, used);
                }
                for (r, h) in late.drain(..) {
                    log.take(h);
                    takes.push((r, rec.stores() - 1));
                }
                // The guest sees them returned.
                free.extend(heads);
            }
        }
    }
    let stores = rec.stores.lock().unwrap().clone();
    Run {
        stores,
        posts,
        takes,
        initial,
    }
}

/// Kills the run after its first `p` stores and checks the recovery.
fn crash(run: &Run, p: usize) -> Result<(), String> {
    let mem = Arc::new(Recorder::new(run.initial.clone()));
    let mut used = BASE;
    let mut published = vec![false; run.posts.len()];
    for (s, _) in &run.stores[..p] {
        match s {
            Store::Region { at, bytes } => {
                mem.bytes.lock().unwrap()[*at..*at + bytes.len()].copy_from_slice(bytes)
            }
            Store::Used { idx, reqs } => {
                used = *idx;
                for &r in reqs {
                    published[r] = true;
                }
            }
        }
    }
    // The guest posted up to here when the daemon died...
    let mut posts = run.posts[..run.stores.get(p).map_or(run.posts.len(), |s| s.1)].to_vec();
    published.truncate(posts.len());
    // ...then re-posts every head it does not have out.
    let out = |posts: &[u16], published: &[bool], h: u16| {
        (0..posts.len()).any(|r| posts[r] == h && !published[r])
    };
    for h in 0..N {
        if !out(&posts, &published, h) {
            posts.push(h);
            published.push(false);
        }
    }
    let outstanding: Vec<usize> = (0..posts.len()).filter(|&r| !published[r]).collect();
    let request_of = |h: u16| outstanding.iter().copied().find(|&r| posts[r] == h);

    let resubmitted = QueueLog::new(mem.clone(), 0, N)
        .unwrap()
        .recover(used, N)
        .map_err(|e| format!("recover: {e}"))?;
    let want: Vec<u16> = run
        .takes
        .iter()
        .filter(|&&(r, mark)| mark < p && !published.get(r).copied().unwrap_or(false))
        .map(|&(r, _)| run.posts[r])
        .collect();
    if resubmitted != want {
        return Err(format!("resubmitted {resubmitted:?}, marked {want:?}"));
    }
    let mut ran = Vec::new();
    for &h in &resubmitted {
        ran.push(request_of(h).ok_or(format!("resubmitted head {h} was returned"))?);
    }
    // The avail ring from used + resubmitted on, as the guest left it.
    let avail_idx = BASE.wrapping_add(posts.len() as u16);
    let mut i = used.wrapping_add(resubmitted.len() as u16);
    let ahead = avail_idx.wrapping_sub(i);
    if ahead > N {
        return Err(format!("next avail {i} is {ahead} behind the guest's"));
    }
    while i != avail_idx {
        // Slot i % N holds the latest request posted at an index i' ≡ i.
        let k = usize::from(i.wrapping_sub(BASE));
        let latest = (0..posts.len())
            .rev()
            .find(|r| r % usize::from(N) == k % usize::from(N));
        let h = posts[latest.expect("slot posted")];
        ran.push(request_of(h).ok_or(format!("avail index {i}: head {h} was returned"))?);
        i = i.wrapping_add(1);
    }
    let mut sorted = ran.clone();
    sorted.sort_unstable();
    if sorted != outstanding {
        return Err(format!("ran {ran:?}, outstanding {outstanding:?}"));
    }
    Ok(())
}

/// The first crash point of `device`'s runs that recovery gets wrong.
fn first_failure(device: Device, seeds: u64) -> Option<String> {
    for seed in 0..seeds {
        let r = run(seed, device);
        for p in 0..=r.stores.len() {
            if let Err(e) = crash(&r, p) {
                return Some(format!("seed {seed}, killed after {p} stores: {e}"));
            }
        }
    }
    None
}

#[test]
fn every_crash_point_recovers() {
    if let Some(e) = first_failure(Device::Correct, 300) {
        panic!("{e}");
    }
}

#[test]
fn the_model_catches_broken_orderings() {
    for device in [Device::MarkLate, Device::ClearFirst, Device::NoBatchLink] {
        let e = first_failure(device, 300);
        assert!(e.is_some(), "{device:?} passed");
        eprintln!("{device:?}: {}", e.unwrap());
    }
}
