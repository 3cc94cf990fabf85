//! Torture runs for rimg-vhost-blk: a seeded, concurrent, verifying
//! libblkio client (see [`load`] and [`model`]) against a daemon running
//! as in production (seccomp in kill mode), through phases separated by
//! disconnects, ended by SIGTERM (quietly or under load), then judged by
//! the exit status, `qemu-img check` and a read-back of every sector
//! through `qemu-img convert`. A request that misses its deadline is a
//! hang: the daemon's state is dumped and the run fails.
//!
//! `tests/tests/vhost_blk_torture.rs` runs a short seeded profile;
//! `scripts/soak.sh` runs random ones (through the `blk_torture` example)
//! for as long as asked.

pub mod config;
pub mod load;
pub mod model;
pub mod setup;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, MemoryRegion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::blk::Daemon;
pub use config::{Config, End, Mix};
pub use load::Failure;
use load::{Layout, QueueLoad, Shared, Source, SLOT_BUF};
use model::{Model, SECTOR};

/// How long the daemon gets to exit after SIGTERM, and a client to
/// disconnect.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);

/// What a run did and found.
pub struct Outcome {
    pub seed: u64,
    pub cfg: Config,
    pub requests: u64,
    pub failures: Vec<Failure>,
    /// Sectors left with more than one acceptable value at the end.
    pub ambiguous: usize,
    pub log: String,
    pub elapsed: Duration,
}

/// The command that replays run `seed` with `cfg`.
pub fn replay_command(seed: u64, cfg: &Config) -> String {
    format!(
        "cargo run --release -p rimg-tests --example blk_torture -- --seed {seed} --config '{cfg}'"
    )
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// A readable account: seed, configuration, replay command, failures
    /// and the end of the daemon's log.
    pub fn report(&self) -> String {
        let mut s = format!(
            "torture run {}: seed {} config {}\nreplay: {}\n{} requests in {:.1?}, {} ambiguous sectors at the end\n",
            if self.ok() { "passed" } else { "FAILED" },
            self.seed,
            self.cfg,
            replay_command(self.seed, &self.cfg),
            self.requests,
            self.elapsed,
            self.ambiguous
        );
        for f in &self.failures {
            s.push_str(&format!("[{}] {}\n", f.kind(), f.text()));
        }
        if !self.ok() {
            let lines: Vec<&str> = self.log.lines().collect();
            let from = lines.len().saturating_sub(60);
            s.push_str(&format!(
                "--- daemon log (last {} lines) ---\n",
                lines.len() - from
            ));
            for l in &lines[from..] {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }
}

/// A connected libblkio client: the instance and its mapped buffers.
struct Client {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
}

fn connect(sock: &Path, cfg: &Config) -> Result<Client, String> {
    let e = |e: blkio::Error| format!("libblkio: {}", e.message());
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(e)?;
    b.set_str("path", sock.to_str().unwrap()).map_err(e)?;
    b.connect().map_err(e)?;
    b.set_i32("num-queues", cfg.queues as i32).map_err(e)?;
    let out = b.start().map_err(e)?;
    let align = b.get_u64("mem-region-alignment").map_err(e)? as usize;
    let len = (cfg.queues * cfg.qd * SLOT_BUF).next_multiple_of(align);
    let region = b.alloc_mem_region(len).map_err(e)?;
    b.map_mem_region(&region).map_err(e)?;
    Ok(Client {
        blkio: b,
        queues: out.queues,
        region,
    })
}

/// Drops a client (the frontend disconnects) within the deadline; the
/// daemon drains and flushes meanwhile, so a hang there is caught too.
fn disconnect(c: Client) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(c.queues);
        drop(c.blkio);
        let _ = tx.send(());
    });
    rx.recv_timeout(EXIT_DEADLINE).is_ok()
}

/// Ranges the end-of-phase sweep reads: the whole span when small, else
/// the hot set and 64 random MiB.
fn sweep_ranges(lay: &Layout, r: &mut StdRng) -> Vec<(u64, u64)> {
    let chunk = 1u64 << 20;
    let mut v = Vec::new();
    let mut add = |off: u64, len: u64| {
        let mut o = off;
        while o < off + len {
            let n = chunk.min(off + len - o);
            v.push((o, n));
            o += n;
        }
    };
    if lay.span <= 64 << 20 {
        add(0, lay.span);
    } else {
        add(lay.hot, lay.hot_len);
        for _ in 0..64 {
            add(r.random_range(0..lay.span / chunk) * chunk, chunk);
        }
    }
    v
}

/// Runs `src` on every queue of `c` until all are done (or a request is
/// late: then the daemon's state is dumped into `dump`). With `sigterm`,
/// the daemon gets SIGTERM after that long, under load, and the returned
/// status is its exit.
#[allow(clippy::too_many_arguments)]
fn drive(
    c: &mut Client,
    cfg: &Config,
    lay: Layout,
    src: Source,
    sh: &Shared,
    daemon: &mut Option<Daemon>,
    seed: u64,
    nonce: u64,
    sigterm: Option<Duration>,
) -> Option<(Option<std::process::ExitStatus>, String)> {
    let start = Instant::now();
    let mut exit = None;
    let base = c.region.addr;
    let queues: Vec<Blkioq> = c.queues.drain(..).collect();
    let returned = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(i, queue)| {
                let ql = QueueLoad {
                    index: i,
                    queue,
                    buf: base + i * cfg.qd * SLOT_BUF,
                    rng_seed: seed
                        ^ (i as u64 + 1).wrapping_mul(0x5bd1_e995)
                        ^ nonce.wrapping_mul(0x2545_f491_4f6c_dd1d),
                };
                let src = src.clone();
                s.spawn(move || load::run_queue(ql, cfg, lay, src, sh))
            })
            .collect();
        // Last resort if a client thread itself gets stuck.
        let limit = start + Duration::from_millis(cfg.phase_ms) + Duration::from_secs(120);
        loop {
            let finished = handles.iter().all(|h| h.is_finished());
            if sh.hung.load(Ordering::SeqCst) {
                if let Some(d) = daemon.as_ref() {
                    let dump = setup::dump_state(d);
                    let mut f = sh.failures.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(Failure::Hang(t)) = f.iter_mut().rev().find(|f| f.kind() == "hang")
                    {
                        t.push('\n');
                        t.push_str(&dump);
                    }
                    sh.dump_killed.store(d.exited(), Ordering::SeqCst);
                }
                sh.hung.store(false, Ordering::SeqCst);
            }
            if finished {
                break;
            }
            if let Some(t) = sigterm {
                if start.elapsed() >= t && daemon.is_some() {
                    sh.terminating.store(true, Ordering::SeqCst);
                    exit = Some(daemon.take().unwrap().terminate_within(EXIT_DEADLINE));
                    sh.abandon.store(true, Ordering::SeqCst);
                }
            }
            if Instant::now() > limit {
                sh.fail(Failure::Hang(
                    "client threads did not finish within 120 s of the phase's end".into(),
                ));
                sh.abandon.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("queue thread panicked"))
            .collect::<Vec<_>>()
    });
    c.queues = returned;
    exit
}

/// One torture run. Never panics on what the daemon does: everything
/// found is in the outcome.
pub fn run(seed: u64, cfg: &Config) -> Outcome {
    let t0 = Instant::now();
    let mut out = Outcome {
        seed,
        cfg: cfg.clone(),
        requests: 0,
        failures: Vec::new(),
        ambiguous: 0,
        log: String::new(),
        elapsed: Duration::ZERO,
    };
    let dir = crate::tempdir();
    let (img, init) = match setup::make_image(dir.path(), cfg, seed) {
        Ok(x) => x,
        Err(e) => {
            out.failures.push(Failure::Setup(e));
            return out;
        }
    };
    let lay = Layout::new(cfg, seed);
    let sh = Shared::new(Model::new(lay.size / SECTOR, init));
    let sock = dir.path().join("blk.sock");
    let nq = cfg.queues.to_string();
    let mut args = vec!["--num-queues", nq.as_str()];
    if cfg.direct {
        args.push("--direct");
    }
    let poll = cfg.poll_us.to_string();
    if cfg.poll_us > 0 {
        args.extend(["--poll-us", poll.as_str()]);
    }
    let mut daemon = match Daemon::start(&sock, &img, &args) {
        Ok(d) => Some(d),
        Err(e) => {
            out.failures
                .push(Failure::Setup(format!("daemon start: {e}")));
            return out;
        }
    };
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0073_7765_6570);
    let mut exit = None;
    for phase in 0..=cfg.reconnects {
        let last = phase == cfg.reconnects;
        let mut c = match connect(&sock, cfg) {
            Ok(c) => c,
            Err(e) => {
                sh.fail(Failure::Io(format!("phase {phase}: connect: {e}")));
                break;
            }
        };
        let phase_len = Duration::from_millis(cfg.phase_ms);
        let under_load = last && cfg.end == End::UnderLoad;
        let until = Instant::now()
            + if under_load {
                phase_len * 1000
            } else {
                phase_len
            };
        let sig = under_load.then_some(phase_len);
        let nonce = u64::from(phase) * 2;
        exit = drive(
            &mut c,
            cfg,
            lay,
            Source::Load { until },
            &sh,
            &mut daemon,
            seed,
            nonce,
            sig,
        );
        if exit.is_none() && sh.failures.lock().unwrap().is_empty() {
            let src = Source::Sweep {
                ranges: Arc::new(sweep_ranges(&lay, &mut rng)),
                next: Arc::new(AtomicUsize::new(0)),
            };
            drive(
                &mut c,
                cfg,
                lay,
                src,
                &sh,
                &mut daemon,
                seed,
                nonce + 1,
                None,
            );
        }
        let failed = !sh.failures.lock().unwrap().is_empty();
        if failed && exit.is_none() {
            // Stop the daemon before the client goes: a hung daemon would
            // keep the disconnect waiting.
            exit = daemon.take().map(|d| d.terminate_within(EXIT_DEADLINE));
        }
        if !disconnect(c) {
            sh.fail(Failure::Hang(format!(
                "phase {phase}: the client's disconnect did not finish within {EXIT_DEADLINE:?}"
            )));
            break;
        }
        if failed || exit.is_some() {
            break;
        }
    }
    let (status, log) = match exit {
        Some(x) => x,
        None => daemon.take().unwrap().terminate_within(EXIT_DEADLINE),
    };
    out.log = log;
    let clean = match status {
        Some(st) if st.code() == Some(0) => true,
        Some(st) if sh.dump_killed.load(Ordering::SeqCst) => {
            // SIGUSR1 ended it (no state-dump handler on this branch):
            // already reported with the hang.
            let _ = st;
            false
        }
        Some(st) => {
            sh.fail(Failure::Exit(format!(
                "daemon exit status after SIGTERM: {st} (expected 0)"
            )));
            false
        }
        None => {
            sh.fail(Failure::Hang(format!(
                "daemon did not exit within {EXIT_DEADLINE:?} of SIGTERM"
            )));
            false
        }
    };
    if clean {
        if cfg.is_qcow2() {
            if let Err(e) = setup::qemu_check(&img) {
                sh.fail(Failure::Check(e));
            }
        }
        if cfg.data == "raw" {
            let data = setup::data_file(dir.path(), cfg).expect("data file");
            let scratch = dir.path().join("raw-compare");
            if let Err(e) = setup::raw_data_file_matches(&img, &data, &scratch) {
                sh.fail(Failure::Verify(e));
            }
        }
        let m = sh.model.lock().unwrap_or_else(|p| p.into_inner());
        match setup::read_back(&img, &dir.path().join("final.raw"), &m) {
            Ok(bad) if bad.is_empty() => {}
            Ok(bad) => {
                let lines: Vec<String> = bad.iter().take(8).map(|b| format!("  {b}")).collect();
                let text = format!(
                    "final read-back (qemu-img convert): {} sectors wrong, first ones:\n{}",
                    bad.len(),
                    lines.join("\n")
                );
                drop(m);
                sh.fail(Failure::Verify(text));
            }
            Err(e) => {
                drop(m);
                sh.fail(Failure::Check(e));
            }
        }
    }
    out.requests = sh.requests.load(Ordering::SeqCst);
    out.ambiguous = sh
        .model
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .ambiguous();
    out.failures = std::mem::take(&mut *sh.failures.lock().unwrap());
    out.elapsed = t0.elapsed();
    out
}

/// Runs and panics with the report if anything failed.
pub fn assert_run(seed: u64, cfg: &Config) -> Outcome {
    let o = run(seed, cfg);
    assert!(o.ok(), "{}", o.report());
    o
}
