//! The load: one thread per libblkio queue keeps up to QD requests in
//! flight, each registered with the shared [`Model`] before it is
//! submitted and checked against it when it completes. Every request has
//! a deadline; a late one is reported as a hang.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blkio::{Blkioq, Completion, ReqFlags};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::{Config, Mix};
use super::model::{fill_sector, Model, SECTOR, ZERO};

/// Bytes of buffer each request slot owns: the largest request plus room
/// for gaps between its segments.
pub const SLOT_BUF: usize = (1 << 20) + (64 << 10);
const MAX_SEGS: usize = 8;

/// What went wrong in a run, by kind (the soak script counts them).
#[derive(Debug, Clone)]
pub enum Failure {
    Hang(String),
    Verify(String),
    Io(String),
    Exit(String),
    Check(String),
    Setup(String),
}

impl Failure {
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Hang(_) => "hang",
            Failure::Verify(_) => "verify",
            Failure::Io(_) => "io",
            Failure::Exit(_) => "exit",
            Failure::Check(_) => "check",
            Failure::Setup(_) => "setup",
        }
    }

    pub fn text(&self) -> &str {
        match self {
            Failure::Hang(s)
            | Failure::Verify(s)
            | Failure::Io(s)
            | Failure::Exit(s)
            | Failure::Check(s)
            | Failure::Setup(s) => s,
        }
    }
}

/// State the queue threads and the run's driver share.
pub struct Shared {
    pub model: Mutex<Model>,
    pub failures: Mutex<Vec<Failure>>,
    /// Stop submitting; finish what is in flight.
    pub stop: AtomicBool,
    /// Stop waiting: the daemon is gone or a request is late.
    pub abandon: AtomicBool,
    /// SIGTERM was sent: failed requests are expected, late ones are the
    /// driver's business (it waits for the exit with a deadline).
    pub terminating: AtomicBool,
    /// A request missed its deadline (the driver dumps state).
    pub hung: AtomicBool,
    /// The state dump's SIGUSR1 ended the daemon.
    pub dump_killed: AtomicBool,
    pub requests: AtomicU64,
}

impl Shared {
    pub fn new(model: Model) -> Shared {
        Shared {
            model: Mutex::new(model),
            failures: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            terminating: AtomicBool::new(false),
            hung: AtomicBool::new(false),
            dump_killed: AtomicBool::new(false),
            requests: AtomicU64::new(0),
        }
    }

    pub fn fail(&self, f: Failure) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(f);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The disk's geometry as the load sees it.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub size: u64,
    pub span: u64,
    /// The hot set, a few clusters every queue hits: [hot, hot + hot_len).
    pub hot: u64,
    pub hot_len: u64,
    pub cluster: u64,
    /// Discards zero whole clusters only (qcow2); raw zeroes the range.
    pub qcow2: bool,
    /// Discards change nothing (qcow2 with a raw data file: the data
    /// file must keep reading as the disk, and discard is advisory).
    pub discard_keeps: bool,
}

impl Layout {
    pub fn new(cfg: &Config, seed: u64) -> Layout {
        let size = cfg.size_mib << 20;
        let span = cfg.span_mib << 20;
        let cluster = cfg.cluster;
        let hot_len = (4 * cluster).max(256 << 10).min(span);
        let mut r = StdRng::seed_from_u64(seed ^ 0x0068_6f74);
        let hot = r.random_range(0..=(span - hot_len) / cluster) * cluster;
        Layout {
            size,
            span,
            hot,
            hot_len,
            cluster,
            qcow2: cfg.is_qcow2(),
            discard_keeps: cfg.data == "raw",
        }
    }

    /// The sectors a discard of [off, off + len) is certain to zero.
    fn discard_zeroes(&self, off: u64, len: u64) -> Option<(u64, u64)> {
        if self.discard_keeps {
            return None;
        }
        let (s, e) = if self.qcow2 {
            let e = off + len;
            let last = if e == self.size {
                e.next_multiple_of(self.cluster)
            } else {
                e - e % self.cluster
            };
            (off.next_multiple_of(self.cluster), last.min(self.size))
        } else {
            (off, off + len)
        };
        (s < e).then_some((s / SECTOR, e / SECTOR))
    }
}

/// Where a queue's requests come from.
#[derive(Clone)]
pub enum Source {
    /// Random requests until `until`.
    Load { until: Instant },
    /// Reads of these ranges, shared out between the queues.
    Sweep {
        ranges: Arc<Vec<(u64, u64)>>,
        next: Arc<AtomicUsize>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Read,
    Write,
    Flush,
    Discard,
    Zeroes(bool),
}

struct Slot {
    busy: bool,
    id: u64,
    op: Op,
    off: u64,
    len: u64,
    since: Instant,
    iov: Vec<libc::iovec>,
}

/// One queue's thread: runs `src` on `q` with `cfg.qd` slots whose
/// buffers start at `buf` (SLOT_BUF bytes each); returns the queue.
pub struct QueueLoad {
    pub index: usize,
    pub queue: Blkioq,
    /// Address of this queue's buffers in the mapped region.
    pub buf: usize,
    pub rng_seed: u64,
}

/// A description of a request for failure messages.
fn describe(q: usize, s: &Slot) -> String {
    format!(
        "queue {q}: {:?} id {} at {:#x} len {:#x} ({} segments)",
        s.op,
        s.id,
        s.off,
        s.len,
        s.iov.len()
    )
}

pub fn run_queue(mut ql: QueueLoad, cfg: &Config, lay: Layout, src: Source, sh: &Shared) -> Blkioq {
    let mut rng = StdRng::seed_from_u64(ql.rng_seed);
    let deadline = Duration::from_millis(cfg.deadline_ms);
    let mut slots: Vec<Slot> = (0..cfg.qd)
        .map(|_| Slot {
            busy: false,
            id: 0,
            op: Op::Flush,
            off: 0,
            len: 0,
            since: Instant::now(),
            iov: Vec::with_capacity(MAX_SEGS),
        })
        .collect();
    let mut inflight = 0usize;
    let mut scratch = vec![0u8; 1 << 20];
    let mut done: Vec<MaybeUninit<Completion>> = (0..64).map(|_| MaybeUninit::uninit()).collect();
    loop {
        if sh.abandon.load(Ordering::SeqCst) {
            break;
        }
        let more = !(sh.stop.load(Ordering::SeqCst) || cfg.batch && inflight > 0)
            && match &src {
                Source::Load { until } => Instant::now() < *until,
                Source::Sweep { .. } => true,
            };
        let mut exhausted = !more;
        if more {
            for (i, s) in slots.iter_mut().enumerate() {
                if s.busy {
                    continue;
                }
                let buf = ql.buf + i * SLOT_BUF;
                let ok = match &src {
                    Source::Load { .. } => {
                        plan_random(&mut rng, cfg, &lay, s);
                        true
                    }
                    Source::Sweep { ranges, next } => {
                        match ranges.get(next.fetch_add(1, Ordering::SeqCst)) {
                            Some(&(off, len)) => {
                                (s.op, s.off, s.len) = (Op::Read, off, len);
                                true
                            }
                            None => false,
                        }
                    }
                };
                if !ok {
                    exhausted = true;
                    break;
                }
                let one = cfg.mix == Mix::Writes4k && matches!(src, Source::Load { .. });
                lay_out(&mut rng, s, buf, one);
                submit(&mut ql.queue, i, s, &lay, sh, &mut scratch);
                inflight += 1;
            }
        }
        if inflight == 0 && exhausted {
            break;
        }
        if inflight == 0 {
            continue;
        }
        let mut t = Duration::from_millis(50);
        let n = match ql.queue.do_io(&mut done, 1, Some(&mut t), None) {
            Ok(n) => n,
            Err(e) if e.errno() == blkio::Errno::TIME => 0,
            Err(e) => {
                if !sh.terminating.load(Ordering::SeqCst) {
                    sh.fail(Failure::Io(format!(
                        "queue {}: do_io: {}",
                        ql.index,
                        e.message()
                    )));
                }
                break;
            }
        };
        for c in done.iter().take(n) {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_read() };
            let s = &mut slots[c.user_data];
            complete(ql.index, s, c.ret, sh, &mut scratch);
            s.busy = false;
            inflight -= 1;
            sh.requests.fetch_add(1, Ordering::Relaxed);
        }
        if !sh.terminating.load(Ordering::SeqCst) {
            if let Some(s) = slots
                .iter()
                .find(|s| s.busy && s.since.elapsed() > deadline)
            {
                let others = slots.iter().filter(|s| s.busy).count();
                sh.fail(Failure::Hang(format!(
                    "{} missed its {} ms deadline (age {:?}, {others} requests in flight on this queue)",
                    describe(ql.index, s),
                    cfg.deadline_ms,
                    s.since.elapsed()
                )));
                sh.hung.store(true, Ordering::SeqCst);
                sh.abandon.store(true, Ordering::SeqCst);
                break;
            }
        }
    }
    // Whatever is still in flight never completed for us: its writes
    // may or may not have landed.
    let mut m = sh.model();
    for s in slots.iter().filter(|s| s.busy) {
        m.abandon(s.id);
    }
    ql.queue
}

/// Chooses a random request: op, offset and length.
fn plan_random(r: &mut StdRng, cfg: &Config, lay: &Layout, s: &mut Slot) {
    if cfg.mix == Mix::Writes4k {
        s.op = Op::Write;
        s.len = 4096;
        s.off = r.random_range(0..lay.span / 4096) * 4096;
        return;
    }
    s.op = match r.random_range(0..100) {
        0..35 => Op::Read,
        35..75 => Op::Write,
        75..80 => Op::Flush,
        80..90 => Op::Discard,
        _ => Op::Zeroes(r.random_bool(0.5)),
    };
    let (lo, hi) = if r.random_bool(0.5) {
        (lay.hot, lay.hot + lay.hot_len)
    } else {
        (0, lay.span)
    };
    let max: u64 = match r.random_range(0..10) {
        0..6 => 16 << 10,
        6..9 => 128 << 10,
        _ => 1 << 20,
    };
    let max = if matches!(s.op, Op::Discard | Op::Zeroes(_)) {
        max * 2
    } else {
        max
    }
    .min(hi - lo);
    let c = lay.cluster;
    if r.random_bool(0.4) && c <= max && (hi - lo) / c > 0 {
        // Cluster-aligned.
        let n = r.random_range(1..=max / c);
        s.len = n * c;
        s.off = lo + r.random_range(0..=(hi - lo) / c - n) * c;
    } else {
        let n = r.random_range(1..=max / SECTOR);
        s.len = n * SECTOR;
        s.off = lo + r.random_range(0..=(hi - lo) / SECTOR - n) * SECTOR;
    }
}

/// Splits a read or write into 1..=8 segments inside the slot's buffer,
/// sometimes cut at odd byte counts and with gaps between them.
fn lay_out(r: &mut StdRng, s: &mut Slot, buf: usize, one_segment: bool) {
    s.iov.clear();
    if !matches!(s.op, Op::Read | Op::Write) {
        return;
    }
    let len = s.len as usize;
    let k = if one_segment {
        1
    } else {
        r.random_range(1..=MAX_SEGS.min(len / 64).max(1))
    };
    let odd = r.random_bool(0.25);
    let mut cuts: Vec<usize> = (1..k)
        .map(|_| {
            let c = r.random_range(1..len);
            if odd {
                c
            } else {
                (c / 512 * 512).max(512)
            }
        })
        .filter(|&c| c < len)
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts.push(len);
    let mut at = 0usize;
    let mut prev = 0usize;
    let gap_room = SLOT_BUF - len;
    for c in cuts {
        let gap = if s.iov.is_empty() {
            0
        } else {
            r.random_range(0..=(gap_room / MAX_SEGS).min(4096))
        };
        at += gap;
        s.iov.push(libc::iovec {
            iov_base: (buf + at) as *mut libc::c_void,
            iov_len: c - prev,
        });
        at += c - prev;
        prev = c;
    }
}

/// Registers the request with the model, fills write data, submits.
fn submit(q: &mut Blkioq, i: usize, s: &mut Slot, lay: &Layout, sh: &Shared, data: &mut [u8]) {
    let (sec, end) = (s.off / SECTOR, (s.off + s.len) / SECTOR);
    {
        let mut m = sh.model();
        s.id = m.new_id();
        match s.op {
            Op::Read => m.read_submitted(s.id, sec, end),
            Op::Write => m.write_submitted(s.id, sec, end, s.id),
            Op::Zeroes(_) => m.write_submitted(s.id, sec, end, ZERO),
            Op::Discard => {
                if let Some((a, b)) = lay.discard_zeroes(s.off, s.len) {
                    m.write_submitted(s.id, a, b, ZERO);
                }
            }
            Op::Flush => {}
        }
    }
    s.busy = true;
    s.since = Instant::now();
    let flags = ReqFlags::empty();
    match s.op {
        Op::Read => q.readv(
            s.off,
            s.iov.as_ptr() as *const _,
            s.iov.len() as u32,
            i,
            flags,
        ),
        Op::Write => {
            let len = s.len as usize;
            for (k, c) in data[..len].chunks_mut(SECTOR as usize).enumerate() {
                fill_sector(s.id, sec + k as u64, c);
            }
            scatter(&s.iov, &data[..len]);
            q.writev(
                s.off,
                s.iov.as_ptr() as *const _,
                s.iov.len() as u32,
                i,
                flags,
            )
        }
        Op::Flush => q.flush(i, flags),
        Op::Discard => q.discard(s.off, s.len, i, flags),
        Op::Zeroes(unmap) => {
            let f = if unmap { flags } else { ReqFlags::NO_UNMAP };
            q.write_zeroes(s.off, s.len, i, f)
        }
    }
}

fn scatter(iov: &[libc::iovec], data: &[u8]) {
    let mut at = 0;
    for v in iov {
        // SAFETY: every iovec lies inside this slot's part of the mapped
        // region (lay_out), which no request in flight uses.
        let dst = unsafe { std::slice::from_raw_parts_mut(v.iov_base as *mut u8, v.iov_len) };
        dst.copy_from_slice(&data[at..at + v.iov_len]);
        at += v.iov_len;
    }
}

fn gather(iov: &[libc::iovec], out: &mut [u8]) {
    let mut at = 0;
    for v in iov {
        // SAFETY: as in scatter; the read that filled it has completed.
        let src = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
        out[at..at + v.iov_len].copy_from_slice(src);
        at += v.iov_len;
    }
}

/// Records a completion in the model; checks a read's data.
fn complete(q: usize, s: &Slot, ret: i32, sh: &Shared, data: &mut [u8]) {
    if ret != 0 {
        sh.model().abandon(s.id);
        if !sh.terminating.load(Ordering::SeqCst) {
            sh.fail(Failure::Io(format!("{} failed: ret {ret}", describe(q, s))));
        }
        return;
    }
    let mut m = sh.model();
    match s.op {
        Op::Read => {
            let len = s.len as usize;
            gather(&s.iov, &mut data[..len]);
            let bad = m.read_completed(s.id, &data[..len]);
            if !bad.is_empty() {
                let lines: Vec<String> = bad.iter().take(8).map(|b| format!("  {b}")).collect();
                drop(m);
                sh.fail(Failure::Verify(format!(
                    "{}: {} sectors wrong, first ones:\n{}",
                    describe(q, s),
                    bad.len(),
                    lines.join("\n")
                )));
            }
        }
        Op::Flush => {}
        Op::Write | Op::Discard | Op::Zeroes(_) => m.write_completed(s.id),
    }
}
