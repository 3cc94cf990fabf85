//! Crash consistency: a writer is killed with SIGKILL at random moments,
//! and the image must then be consistent and hold everything flushed.
//!
//! Two writers run the same seeded workload (`rimg_tests::crash`: batches
//! of writes, write-zeroes and discards on non-overlapping sectors, each
//! batch followed by a flush, after which the writer prints `F <batch>`):
//! - the qcow2 library, in the `crash_writer` helper, each batch's requests
//!   spread over several threads;
//! - rimg-vhost-blk, driven by `crash_writer blk` (a libblkio client with a
//!   whole batch in flight, over one or two queues, so one or two daemon
//!   worker threads); there the daemon is killed.
//!
//! Variants cover cluster sizes 512 B, 4 KiB and 64 KiB, compat 0.10 and
//! 1.1, with and without a backing file, lazy_refcounts on some. Each
//! image goes through several rounds on the same file: start the writer,
//! wait for a random number of flush lines or a random short time (both
//! from a seeded RNG), SIGKILL, then:
//! - `qemu-img check` finds no corruption (leaks allowed: exit 0 or 3);
//! - `rimg check -r leaks` makes it clean, and `qemu-img check` agrees;
//! - read through `qemu-img convert -O raw`, every sector holds either its
//!   value at the last flush the writer reported, or the value the batch
//!   after it (the only one that may have been under way) gave it:
//!   whole, never cut inside the sector (the writers' buffers are
//!   sector-aligned, as the engine's own are: see `qcow2::pagebuf`).
//!
//! A second test runs the same writers without flushes (`crash_writer
//! ... noflush`, printing `C <batch>` when a batch completed) and checks
//! the same with "completed" for "flushed": a process killed after
//! reporting a write complete must not lose it (rimg-vhost-blk and the
//! library in `MetadataPersistence::ProcessDeath` write the metadata
//! mapping it before completing; the page cache outlives the process).
//!
//! RIMG_CRASH_SEED=N changes the seed (the kill moments themselves depend
//! on timing); RIMG_CRASH_ROUNDS=N multiplies the rounds per variant;
//! RIMG_CRASH_ONLY=TEXT runs only the variants whose name contains TEXT
//! (e.g. `Blk`, `cluster=512`).

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rimg_tests::bitmaps::qemu_bitmaps;
use rimg_tests::blk::Daemon;
use rimg_tests::crash::{effect, pattern, DiscardRule, Op, Val, Workload, SECTOR};
use rimg_tests::{
    assert_qemu_check_clean, ok_as, qemu_create, qemu_img, qemu_io, qemu_raw_content, run, tempdir,
    wait_unlocked, workspace_bin,
};

const SIZE: u64 = 16 << 20;
/// Longest wait for a line from the writer before the test gives up.
const LINE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
enum Writer {
    /// The library, with this many threads.
    Lib(usize),
    /// rimg-vhost-blk and a libblkio client, with this many queues.
    Blk(usize),
}

#[derive(Debug, Clone, Copy)]
struct Variant {
    cluster: u64,
    compat: &'static str,
    backing: bool,
    lazy: bool,
    writer: Writer,
    kills: usize,
    /// Persistent bitmaps: `on` (enabled, 4 KiB) and `off` (disabled).
    bitmaps: bool,
    /// Extended L2 entries (subclusters).
    extl2: bool,
}

impl Variant {
    fn name(&self) -> String {
        format!(
            "{:?} cluster={} compat={}{}{}{}{}",
            self.writer,
            self.cluster,
            self.compat,
            if self.backing { " backing" } else { "" },
            if self.lazy { " lazy_refcounts" } else { "" },
            if self.bitmaps { " bitmaps" } else { "" },
            if self.extl2 { " extended_l2" } else { "" }
        )
    }
}

const fn v(
    cluster: u64,
    compat: &'static str,
    backing: bool,
    lazy: bool,
    writer: Writer,
) -> Variant {
    Variant {
        cluster,
        compat,
        backing,
        lazy,
        writer,
        kills: 8,
        bitmaps: false,
        extl2: false,
    }
}

/// A variant whose image has persistent bitmaps.
const fn with_bitmaps(v: Variant) -> Variant {
    Variant { bitmaps: true, ..v }
}

/// A variant whose image has extended L2 entries.
const fn with_extl2(v: Variant) -> Variant {
    Variant { extl2: true, ..v }
}

const VARIANTS: &[Variant] = &[
    v(65536, "1.1", false, false, Writer::Lib(2)),
    v(65536, "0.10", true, false, Writer::Lib(2)),
    v(4096, "1.1", true, true, Writer::Lib(2)),
    v(4096, "0.10", false, false, Writer::Lib(3)),
    v(512, "1.1", false, false, Writer::Lib(2)),
    v(512, "0.10", true, false, Writer::Lib(2)),
    v(65536, "1.1", true, true, Writer::Lib(3)),
    v(65536, "1.1", true, false, Writer::Blk(2)),
    v(4096, "0.10", false, false, Writer::Blk(1)),
    v(512, "1.1", false, true, Writer::Blk(2)),
    with_bitmaps(v(65536, "1.1", true, false, Writer::Lib(2))),
    with_bitmaps(v(4096, "1.1", false, true, Writer::Blk(2))),
    with_extl2(v(65536, "1.1", true, false, Writer::Lib(2))),
    with_extl2(v(32768, "1.1", true, true, Writer::Blk(2))),
];

/// The image of a variant (and its backing file, with data in parts of
/// it: plain, and a compressed stretch).
fn make_image(dir: &Path, var: &Variant) -> PathBuf {
    let img = dir.join("disk.qcow2");
    let mut opts = format!("cluster_size={},compat={}", var.cluster, var.compat);
    if var.lazy {
        opts += ",lazy_refcounts=on";
    }
    if var.extl2 {
        opts += ",extended_l2=on";
    }
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
    if var.backing {
        let base = dir.join("base.qcow2");
        qemu_create(&base, "", &SIZE.to_string());
        qemu_io(
            &base,
            &[
                "write -P 0x5a 0 5M",
                "write -P 0xa5 9M 2M",
                "write -c -P 0x33 13M 1M",
            ],
        );
        args.extend(["-b", "base.qcow2", "-F", "qcow2"]);
    }
    let size = SIZE.to_string();
    args.extend([img.to_str().unwrap(), size.as_str()]);
    ok_as(qemu_img(&args), "create");
    if var.bitmaps {
        let p = img.to_str().unwrap();
        ok_as(
            qemu_img(&["bitmap", "--add", "-g", "4096", p, "on"]),
            "bitmap on",
        );
        ok_as(
            qemu_img(&["bitmap", "--add", "--disable", p, "off"]),
            "bitmap off",
        );
    }
    img
}

/// Reads the writer's stdout lines into a channel (closed at EOF).
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_line(rx: &mpsc::Receiver<String>, what: &str) -> Option<String> {
    match rx.recv_timeout(LINE_TIMEOUT) {
        Ok(l) => Some(l),
        Err(mpsc::RecvTimeoutError::Disconnected) => None,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("no line from the writer in {LINE_TIMEOUT:?} ({what})")
        }
    }
}

/// The batch of an `F <batch>` (flushed) or `C <batch>` (completed) line.
fn batch_of(line: &str) -> Option<u64> {
    line.strip_prefix("F ")
        .or_else(|| line.strip_prefix("C "))
        .and_then(|n| n.parse().ok())
}

fn sigkill(child: &mut Child) {
    // Child::kill sends SIGKILL; the child is not reaped yet, so its pid
    // cannot have been reused.
    let _ = child.kill();
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut s);
    }
    s
}

/// One round: runs the writer (flushing after each batch or not), kills
/// it when `rng` says, and returns the last batch whose flush (or
/// completion) it reported (None: none was).
fn run_and_kill(
    var: &Variant,
    img: &Path,
    dir: &Path,
    (seed, round): (u64, u64),
    flush: bool,
    rng: &mut StdRng,
) -> Option<u64> {
    let writer = env!("CARGO_BIN_EXE_crash_writer");
    let mut daemon = None;
    let mut cmd = Command::new(writer);
    match var.writer {
        Writer::Lib(threads) => {
            cmd.arg("lib").arg(img).args([
                seed.to_string(),
                round.to_string(),
                threads.to_string(),
            ]);
        }
        Writer::Blk(queues) => {
            let sock = dir.join("blk.sock");
            let _ = std::fs::remove_file(&sock);
            let nq = queues.to_string();
            daemon = Some(
                Daemon::start(&sock, img, &["--num-queues", &nq]).expect("start rimg-vhost-blk"),
            );
            cmd.arg("blk")
                .arg(&sock)
                .args([seed.to_string(), round.to_string(), nq]);
        }
    }
    if !flush {
        cmd.arg("noflush");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn crash_writer");
    let rx = lines(&mut child);
    let mut last = None;
    let ready = next_line(&rx, "ready");
    if ready.as_deref() != Some("ready") {
        sigkill(&mut child);
        let _ = child.wait();
        panic!("writer did not start: {ready:?}: {}", stderr_of(&mut child));
    }
    // The kill: after a random number of completed flushes, or after a
    // random short time (anywhere inside a request or a flush).
    if rng.random_bool(0.5) {
        let n = rng.random_range(1..=40);
        for _ in 0..n {
            match next_line(&rx, "flush") {
                Some(l) => last = batch_of(&l).or(last),
                None => break,
            }
        }
    } else {
        std::thread::sleep(Duration::from_micros(rng.random_range(0..=60_000)));
    }
    // The process that owns the image dies first.
    match daemon.as_mut() {
        Some(d) => sigkill(&mut d.child),
        None => sigkill(&mut child),
    }
    if let Some(d) = daemon.take() {
        let mut d = d;
        let st = d.child.wait().expect("wait daemon");
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "daemon ended by itself: {st}"
        );
        // Its image lock goes with its io_uring, a moment after it.
        wait_unlocked(img, Duration::from_secs(30));
        // The client may be stuck waiting for the dead daemon.
        sigkill(&mut child);
    }
    while let Some(l) = next_line(&rx, "after the kill") {
        last = batch_of(&l).or(last);
    }
    let st = child.wait().expect("wait writer");
    let err = stderr_of(&mut child);
    if matches!(var.writer, Writer::Lib(_)) {
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "writer ended by itself: {st}: {err}"
        );
    } else {
        // Killed by us, or it noticed the daemon's death first.
        assert!(
            st.signal() == Some(libc::SIGKILL) || st.code() == Some(1),
            "client: {st}: {err}"
        );
    }
    last
}

/// The big-endian u64 at `off` in file `p`.
fn read_be64(p: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(p).unwrap(), &mut b, off)
        .unwrap();
    u64::from_be_bytes(b)
}

/// Expected bytes of `sector` holding `v`.
fn expected(v: Val, sector: u64, init: &[u8], out: &mut [u8]) {
    match v {
        Val::Init => {
            let o = (sector * SECTOR) as usize;
            out.copy_from_slice(&init[o..o + SECTOR as usize]);
        }
        Val::Zero => out.fill(0),
        Val::Gen(g) => pattern(sector, g, out),
    }
}

/// Checks `got` against the workload of this round up to batch `last`
/// (durable) plus the batch after it (maybe partly done). Returns the
/// number of sectors that hold neither.
fn verify(
    var: &Variant,
    seed: u64,
    round: u64,
    last: Option<u64>,
    init: &[u8],
    got: &[u8],
) -> (u64, Vec<String>) {
    let sectors = SIZE / SECTOR;
    let rule = DiscardRule {
        cluster_sectors: var.cluster / SECTOR,
        zeroes: !(var.compat == "0.10" && var.backing),
    };
    let mut durable = vec![Val::Init; sectors as usize];
    let mut maybe: Vec<Option<Val>> = vec![None; sectors as usize];
    let mut wl = Workload::new(seed, round, sectors);
    let durable_batches = last.map_or(0, |b| b + 1);
    for _ in 0..durable_batches {
        for op in wl.next_batch() {
            for (s, v) in effect(&op, rule) {
                durable[s as usize] = v;
            }
        }
    }
    let window: Vec<Op> = wl.next_batch();
    for op in &window {
        for (s, v) in effect(op, rule) {
            maybe[s as usize] = Some(v);
        }
    }
    let mut bad = 0;
    let mut report = Vec::new();
    let mut want = [0u8; SECTOR as usize];
    for s in 0..sectors {
        let g = &got[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
        expected(durable[s as usize], s, init, &mut want);
        if g == want {
            continue;
        }
        if let Some(m) = maybe[s as usize] {
            expected(m, s, init, &mut want);
            if g == want {
                continue;
            }
        }
        bad += 1;
        if report.len() < 10 {
            // A sector cut in two: its head one value, its tail another.
            let mut old = [0u8; SECTOR as usize];
            expected(durable[s as usize], s, init, &mut old);
            let torn = [(&old, &want), (&want, &old)]
                .into_iter()
                .find_map(|(a, b)| (1..g.len()).find(|&k| g[..k] == a[..k] && g[k..] == b[k..]))
                .map_or(String::new(), |k| format!(" (torn at byte {k})"));
            let found = (
                u64::from_le_bytes(g[..8].try_into().unwrap()),
                u64::from_le_bytes(g[8..16].try_into().unwrap()),
            );
            report.push(
                format!(
                "sector {s} (byte {:#x}): want {:?} or {:?}, found sector/gen fields {found:?}{}",
                s * SECTOR,
                durable[s as usize],
                maybe[s as usize],
                if g.iter().all(|&b| b == 0) {
                    " (zeros)"
                } else {
                    ""
                }
            ) + &torn,
            );
        }
    }
    (bad, report)
}

fn check_json(p: &Path) -> (i32, serde_json::Value, String) {
    let o = qemu_img(&["check", "--output=json", p.to_str().unwrap()]);
    let v = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (
        o.status.code().unwrap_or(-1),
        v,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[derive(Default)]
struct Totals {
    variants: usize,
    kills: usize,
    kills_with_leaks: usize,
    leaked_clusters: u64,
    flushes_seen: u64,
    /// Kills that left a live intent log.
    live_logs: usize,
}

#[test]
fn killed_writers_leave_consistent_images_with_every_flushed_write() {
    kill_rounds(true);
}

#[test]
fn killed_writers_keep_every_completed_write_without_flushing() {
    kill_rounds(false);
}

/// Runs every variant's rounds; `flush`: the writers flush each batch
/// (else they only report it complete).
fn kill_rounds(flush: bool) {
    let start = Instant::now();
    let master: u64 = std::env::var("RIMG_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0de)
        ^ if flush { 0 } else { 0x00f1_u64 << 48 };
    let mult: usize = std::env::var("RIMG_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let rimg = workspace_bin("rimg");
    workspace_bin("rimg-vhost-blk");
    let mut t = Totals::default();
    let only = std::env::var("RIMG_CRASH_ONLY").ok();
    for (vi, var) in VARIANTS.iter().enumerate() {
        if only
            .as_ref()
            .is_some_and(|o| !var.name().contains(o.as_str()))
        {
            continue;
        }
        t.variants += 1;
        let dir = tempdir();
        let img = make_image(dir.path(), var);
        let mut init = qemu_raw_content(&img, &dir.path().join("init.raw"));
        let mut rng = StdRng::seed_from_u64(master ^ ((vi as u64 + 1) << 32));
        // A writer has flushed since the bitmaps were added.
        let mut flushed_once = false;
        for round in 0..(var.kills * mult) as u64 {
            let seed: u64 = rng.random();
            let ctx = format!(
                "{} round {round} (RIMG_CRASH_SEED={master}, workload seed {seed})",
                var.name()
            );
            let last = run_and_kill(var, &img, dir.path(), (seed, round), flush, &mut rng);
            t.kills += 1;
            // The writer's intent log is live after the kill (autoclear
            // bit 63, rimg's): the replay below is exercised.
            if read_be64(&img, 88) & (1 << 63) != 0 {
                t.live_logs += 1;
            }
            t.flushes_seen += last.map_or(0, |b| b + 1);

            // No corruption; leaks are allowed.
            let (code, j, err) = check_json(&img);
            assert!(
                code == 0 || code == 3,
                "{ctx}: qemu-img check exit {code}: {j} {err}"
            );
            for k in ["corruptions", "check-errors"] {
                assert_eq!(j[k].as_u64().unwrap_or(0), 0, "{ctx}: {k}: {j}");
            }
            let leaks = j["leaks"].as_u64().unwrap_or(0);
            if leaks > 0 {
                t.kills_with_leaks += 1;
                t.leaked_clusters += leaks;
            }
            let o = run(
                rimg.to_str().unwrap(),
                &["check", "-r", "leaks", img.to_str().unwrap()],
            );
            assert_eq!(
                o.status.code(),
                Some(0),
                "{ctx}: rimg check -r leaks: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert_qemu_check_clean(&img);

            // Bitmaps: both were marked in use at the open, before the
            // first write (the disabled one too, as QEMU marks every
            // bitmap it loads); once inconsistent, they stay so. check -r
            // leaks freed none of their clusters.
            if var.bitmaps {
                let flags = qemu_bitmaps(&img);
                flushed_once |= flush && last.is_some();
                let in_use = |auto: bool| {
                    let mut f = vec!["in-use".to_string()];
                    f.extend(auto.then(|| "auto".to_string()));
                    f
                };
                if flushed_once {
                    assert_eq!(flags[0], ("on".into(), in_use(true)), "{ctx}: {flags:?}");
                    assert_eq!(flags[1], ("off".into(), in_use(false)), "{ctx}: {flags:?}");
                } else {
                    assert_eq!(flags[1].0, "off", "{ctx}: {flags:?}");
                    assert!(
                        !flags[1].1.contains(&"auto".to_string()),
                        "{ctx}: {flags:?}"
                    );
                }
            }

            // Every flushed (or, without flushes, completed) write is there.
            let got = qemu_raw_content(&img, &dir.path().join("got.raw"));
            assert_eq!(got.len() as u64, SIZE, "{ctx}");
            let (bad, report) = verify(var, seed, round, last, &init, &got);
            if bad > 0 {
                // Kept for a post-mortem: the image, its base, and what a
                // reader saw before this round.
                std::fs::write(dir.path().join("before.raw"), &init).unwrap();
                let kept = dir.keep();
                panic!(
                    "{ctx}: last flush reported: batch {last:?}; {bad} sectors lost \
                     (files kept in {}):\n{}",
                    kept.display(),
                    report.join("\n")
                );
            }
            init = got;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "crash consistency ({}): {} kills over {} variants in {secs:.1} s; {} batches verified; \
         {} kills left leaks ({} leaked clusters, all repaired); no write lost; \
         kills with a live intent log: {}",
        if flush {
            "flushed"
        } else {
            "completed, no flush"
        },
        t.kills,
        t.variants,
        t.flushes_seen,
        t.kills_with_leaks,
        t.leaked_clusters,
        t.live_logs
    );
    if only.is_none() {
        assert!(t.kills >= 50, "at least 50 kills");
        // Without flushes, copying writes over the backing files were
        // logged: the replay was tested.
        assert!(flush || t.live_logs > 0, "no kill left a live intent log");
    }
}

/// The checker itself: content built from the workload passes; a sector
/// written before the last flush but read back as zeros, and an image
/// that lost its last flushes, are caught.
#[test]
fn the_checker_catches_lost_writes() {
    let var = VARIANTS[0];
    let rule = DiscardRule {
        cluster_sectors: var.cluster / SECTOR,
        zeroes: true,
    };
    let sectors = SIZE / SECTOR;
    let init = vec![0u8; SIZE as usize];
    // The image as it is after batches [0, n).
    let content = |n: u64| {
        let mut c = init.clone();
        let mut wl = Workload::new(9, 1, sectors);
        let mut vals = vec![Val::Init; sectors as usize];
        for _ in 0..n {
            for op in wl.next_batch() {
                for (s, v) in effect(&op, rule) {
                    vals[s as usize] = v;
                }
            }
        }
        for (s, v) in vals.iter().enumerate() {
            let o = s * SECTOR as usize;
            expected(*v, s as u64, &init, &mut c[o..o + SECTOR as usize]);
        }
        (c, vals)
    };
    let (good, vals) = content(21);
    assert_eq!(verify(&var, 9, 1, Some(20), &init, &good).0, 0);
    // Batch 21 may be partly done: done entirely is fine too.
    let (ahead, _) = content(22);
    assert_eq!(verify(&var, 9, 1, Some(20), &init, &ahead).0, 0);
    // One flushed sector lost.
    let mut wl = Workload::new(9, 1, sectors);
    let window: Vec<Op> = (0..22).map(|_| wl.next_batch()).last().unwrap();
    let touched = |s: u64| {
        window.iter().any(|o| {
            let (a, n) = o.range();
            (a..a + n).contains(&s)
        })
    };
    let s = (0..sectors)
        .find(|&s| matches!(vals[s as usize], Val::Gen(_)) && !touched(s))
        .expect("a flushed sector");
    let mut lost = good.clone();
    lost[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize].fill(0);
    let (bad, report) = verify(&var, 9, 1, Some(20), &init, &lost);
    assert_eq!(bad, 1, "{report:?}");
    // A sector of the batch under way cut in two (the kernel keeps a
    // write's first bytes when its source page faults under a kill).
    let r = |s: u64| (s * SECTOR) as usize..((s + 1) * SECTOR) as usize;
    let s = (0..sectors)
        .find(|&s| good[r(s)] != ahead[r(s)] && good[r(s)][..16] != ahead[r(s)][..16])
        .expect("a sector batch 21 changes");
    let mut torn = good.clone();
    let at = r(s).start;
    torn[at..at + 16].copy_from_slice(&ahead[at..at + 16]);
    let (bad, report) = verify(&var, 9, 1, Some(20), &init, &torn);
    assert_eq!(bad, 1, "{report:?}");
    // (The cut shows at the first byte from which the tail is the old
    // value: up to 16.)
    assert!(report[0].contains("(torn at byte 1"), "{report:?}");
    // The last ten flushes lost.
    let (old, _) = content(11);
    assert!(verify(&var, 9, 1, Some(20), &init, &old).0 > 0);
}
