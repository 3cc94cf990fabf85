//! A power loss at any moment of a workload: the image must open, check
//! without corruption, and read, sector by sector, only values the guest
//! could see after such a crash (what its last completed flush made
//! durable, or what it wrote after that flush); with
//! `MetadataPersistence::ProcessDeath`, a killed process (the page
//! cache intact) must also keep every completed write.
//!
//! The model of the disk (`model.rs`): each page a file
//! changed since its last sync may hold any of its versions after a
//! crash, independently of the others.
//!
//! Crash images are drawn at every snapshot of the workload: the newest
//! and the oldest version of every page, and random mixes. A failing
//! case prints its seed; `RIMG_POWERLOSS_SEED=N` replays it and
//! `RIMG_POWERLOSS_SEEDS=K` runs K seeds per configuration (a soak).

mod model;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use model::{crash_file, Pick, Tape};
use qcow2::encrypt::{EncryptFormat, Secret};
use qcow2::image::{ExtentKind, Format};
use qcow2::luks::LuksParams;
use qcow2::storage::Storage;
use qcow2::{CreateOptions, Image, MetadataPersistence, OpenOptions, Qcow2, Qcow2Options};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SECTOR: u64 = 512;
const GUEST: u64 = 4 << 20;
/// Guest operations per workload.
const OPS: u64 = 40;
/// The key of encrypted images.
const KEY: &[u8] = b"power-loss";

/// What a guest operation does to the sectors it covers.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Fills with this byte (1..=199).
    Write(u8),
    Zero {
        unmap: bool,
    },
    Discard,
    Flush,
}

#[derive(Debug)]
struct Op {
    kind: Kind,
    off: u64,
    len: u64,
    /// Events recorded before the operation began and after it returned.
    start: usize,
    end: usize,
    /// The sectors (from `off`) that were not data of this image before
    /// a write: only there may it read as zeros after a power loss.
    new_alloc: Vec<bool>,
}

#[derive(Debug, Clone, Copy)]
struct Config {
    cs: u64,
    extended_l2: bool,
    backing: bool,
    /// The image has an (empty, enabled) persistent dirty bitmap.
    bitmap: bool,
    mode: MetadataPersistence,
    /// Freed clusters are punched out of the file (the default); without,
    /// they keep their old data until reused.
    punch: bool,
    /// Caches of 4 tables (the least): tables are evicted, and written,
    /// between flushes.
    small_cache: bool,
    /// Guest data in an external data file (`Some(data_file_raw)`).
    data_file: Option<bool>,
    /// LUKS-encrypted data.
    encrypt: bool,
    /// The writer keeps copy-on-write mappings in the intent log.
    intent_log: bool,
}

/// The boot the writer ran in; a reader in it replays the writer's
/// intent log (a killed process), one in another drops it (a power loss).
const BOOT_A: [u8; 16] = [0xa; 16];
const BOOT_B: [u8; 16] = [0xb; 16];

impl Config {
    fn new(cs: u64, mode: MetadataPersistence) -> Config {
        Config {
            cs,
            extended_l2: false,
            backing: false,
            bitmap: false,
            mode,
            punch: false,
            small_cache: false,
            data_file: None,
            encrypt: false,
            intent_log: false,
        }
    }

    /// The options every open of the image takes: the key, the data
    /// file in place of the one the header names (`data`), and the boot.
    fn open_options(&self, data: Option<&Path>, boot: [u8; 16]) -> Qcow2Options {
        Qcow2Options {
            encrypt_key: self.encrypt.then(|| Secret(KEY.to_vec())),
            data_file: data.map(Path::to_path_buf),
            boot_id: Some(boot),
            ..Default::default()
        }
    }
}

/// The files of an image: the image, and its data file if any.
struct Files {
    img: PathBuf,
    data: Option<PathBuf>,
}

impl Files {
    fn in_dir(dir: &Path, name: &str, cfg: Config) -> Files {
        Files {
            img: dir.join(format!("{name}.qcow2")),
            data: cfg.data_file.map(|_| dir.join(format!("{name}.data"))),
        }
    }

    fn all(&self) -> Vec<&Path> {
        std::iter::once(self.img.as_path())
            .chain(self.data.as_deref())
            .collect()
    }
}

/// The byte a backing file holds in sector `s` (never a written value).
fn backing_byte(s: u64) -> u8 {
    200 + (s % 50) as u8
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open_backing(p: &Path) -> Arc<dyn Image> {
    let o = OpenOptions {
        format: Some(Format::Raw),
        ..Default::default()
    };
    qcow2::open(p, &o).unwrap()
}

/// A random plan of guest operations: (kind, offset, length).
fn random_plan(cfg: Config, rng: &mut StdRng) -> Vec<(Kind, u64, u64)> {
    let sectors = GUEST / SECTOR;
    let max_len = (3 * cfg.cs / SECTOR).max(8);
    (0..OPS)
        .map(|i| {
            let n = rng.random_range(1..=max_len);
            let s = rng.random_range(0..sectors - n);
            let kind = match rng.random_range(0..20) {
                0..=11 => Kind::Write(1 + (i % 199) as u8),
                12..=13 => Kind::Zero {
                    unmap: rng.random_bool(0.5),
                },
                14..=15 => Kind::Discard,
                _ => Kind::Flush,
            };
            (kind, s * SECTOR, n * SECTOR)
        })
        .collect()
}

/// Runs `plan` under the tape; returns the operations as they ran.
fn workload(
    cfg: Config,
    files: &Files,
    backing: Option<&Path>,
    plan: &[(Kind, u64, u64)],
) -> (Vec<Op>, Arc<Tape>) {
    let tape = Tape::new(&files.all());
    let st = Storage::open(&files.img, true).unwrap();
    st.set_faults(tape.hook(0));
    let opts = Qcow2Options {
        metadata_persistence: cfg.mode,
        discard_passthrough: cfg.punch,
        l2_cache_bytes: if cfg.small_cache { 1 } else { 32 << 20 },
        refcount_cache_bytes: if cfg.small_cache { 1 } else { 4 << 20 },
        intent_log: cfg.intent_log,
        // A small log fills and drains within a workload.
        intent_log_records: cfg.small_cache.then_some(4),
        ..cfg.open_options(None, BOOT_A)
    };
    let q = Qcow2::open(st, backing.map(open_backing), opts).unwrap();
    if files.data.is_some() {
        q.data_storage().set_faults(tape.hook(1));
    }
    let mut ops = Vec::new();
    for &(kind, off, len) in plan {
        let new_alloc = match kind {
            Kind::Write(_) => (0..len / SECTOR)
                .map(|k| {
                    let e = q.block_status(off + k * SECTOR, SECTOR).unwrap();
                    e.kind != ExtentKind::Data
                })
                .collect(),
            _ => Vec::new(),
        };
        let start = tape.snap(None);
        match kind {
            Kind::Write(v) => q.write_at(&vec![v; len as usize], off).unwrap(),
            Kind::Zero { unmap } => q.write_zeroes(off, len, unmap).unwrap(),
            Kind::Discard => q.discard(off, len).unwrap(),
            Kind::Flush => q.flush().unwrap(),
        }
        let end = tape.snap(None);
        ops.push(Op {
            kind,
            off,
            len,
            start,
            end,
            new_alloc,
        });
    }
    // Killed: no close, no flush.
    std::mem::forget(q);
    (ops, tape)
}

/// The value each sector has after `op` (None: unchanged by it).
fn effect(op: &Op, s: u64, cfg: Config) -> Option<u8> {
    let cs = cfg.cs;
    let (a, b) = (op.off / SECTOR, (op.off + op.len) / SECTOR);
    if !(a..b).contains(&s) {
        return None;
    }
    match op.kind {
        Kind::Write(v) => Some(v),
        Kind::Zero { .. } => Some(0),
        // A raw data file reads as the disk: discard is advisory there
        // and changes nothing.
        Kind::Discard if cfg.data_file == Some(true) => None,
        // Only whole clusters are dropped; they read as zeros.
        Kind::Discard => {
            let (ca, cb) = (op.off.next_multiple_of(cs), (op.off + op.len) / cs * cs);
            let at = s * SECTOR;
            (at >= ca && at < cb).then_some(0)
        }
        Kind::Flush => None,
    }
}

/// The values each sector may hold at crash point `p`: after a power
/// loss (`strict` false) or a killed process (`strict`: completed
/// operations all kept).
fn allowed(ops: &[Op], p: usize, cfg: Config, strict: bool) -> Vec<Vec<u8>> {
    let sectors = GUEST / SECTOR;
    let init = |s| if cfg.backing { backing_byte(s) } else { 0 };
    let mut latest: Vec<u8> = (0..sectors).map(init).collect();
    let mut ok: Vec<Vec<u8>> = latest.iter().map(|&v| vec![v]).collect();
    for op in ops {
        if op.start >= p {
            break;
        }
        let done = op.end <= p;
        if let Kind::Flush = op.kind {
            if done {
                for (s, set) in ok.iter_mut().enumerate() {
                    *set = vec![latest[s]];
                }
            }
            continue;
        }
        for s in op.off / SECTOR..(op.off + op.len) / SECTOR {
            if let Some(v) = effect(op, s, cfg) {
                latest[s as usize] = v;
                let set = &mut ok[s as usize];
                if strict && done {
                    *set = vec![v];
                } else {
                    set.push(v);
                    // A write into a newly allocated cluster whose data
                    // had not reached the disk reads as zeros after a
                    // power loss (as with QEMU: its L2 entry may be
                    // written back before the data without a flush
                    // between; only a copy-on-write fill, which holds
                    // data the guest did not write, is synced first).
                    // A write into the image's own data never does.
                    let k = ((s * SECTOR - op.off) / SECTOR) as usize;
                    if !strict && op.new_alloc.get(k) == Some(&true) {
                        set.push(0);
                    }
                }
            }
        }
    }
    ok
}

/// Opens a crash image, checks it, and compares every sector with what
/// may be there. Err: what is wrong.
fn judge(
    dir: &Path,
    crash: &[Vec<u8>],
    cfg: Config,
    backing: Option<&Path>,
    ok: &[Vec<u8>],
    repair: Option<bool>,
    boot: [u8; 16],
) -> Result<(), String> {
    let files = Files::in_dir(dir, "crash", cfg);
    for (p, bytes) in files.all().into_iter().zip(crash) {
        std::fs::write(p, bytes).unwrap();
    }
    let data = files.data.as_deref();
    let st = Storage::open(&files.img, false).unwrap();
    let q = Qcow2::open(st, backing.map(open_backing), cfg.open_options(data, boot))
        .map_err(|e| format!("does not open: {e}"))?;
    let r = q.check().map_err(|e| format!("check failed: {e}"))?;
    if r.corruptions != 0 || r.check_errors != 0 {
        return Err(format!(
            "check: {:?}",
            &r.messages[..r.messages.len().min(6)]
        ));
    }
    let mut buf = vec![0u8; GUEST as usize];
    q.read_at(&mut buf, 0).map_err(|e| format!("read: {e}"))?;
    sectors_allowed(&buf, ok)?;
    if cfg.data_file == Some(true) {
        // data_file_raw: the data file itself reads as the disk (past
        // its end, zeros).
        let mut raw = crash[1].clone();
        raw.resize(GUEST as usize, 0);
        sectors_allowed(&raw, ok).map_err(|e| format!("the raw data file: {e}"))?;
    }
    if cfg.bitmap {
        bitmap_not_wrong(&q, &buf, cfg)?;
    }
    drop(q);
    if let Some(leaks_too) = repair {
        // The next writer repairs what a killed process left (the leaks
        // of an image marked dirty): then the image is clean. After a
        // power loss leaks may stay (for `check -r`, as with QEMU), but
        // never a corruption.
        let st = Storage::open(&files.img, true).unwrap();
        let q = Qcow2::open(st, backing.map(open_backing), cfg.open_options(data, boot))
            .map_err(|e| format!("does not open for writing: {e}"))?;
        let r = q.check().map_err(|e| format!("check failed: {e}"))?;
        let leaks = if leaks_too { r.leaks } else { 0 };
        if r.corruptions + leaks + r.check_errors != 0 {
            return Err(format!(
                "after the repair: {:?}",
                &r.messages[..r.messages.len().min(6)]
            ));
        }
    }
    Ok(())
}

/// Each sector of `disk` holds one byte value, one of those `ok` allows.
fn sectors_allowed(disk: &[u8], ok: &[Vec<u8>]) -> Result<(), String> {
    for (s, set) in ok.iter().enumerate() {
        let sec = &disk[s * SECTOR as usize..(s + 1) * SECTOR as usize];
        if !sec.iter().all(|&b| b == sec[0]) || !set.contains(&sec[0]) {
            let at = sec.iter().position(|&b| b != sec[0]).unwrap_or(0);
            return Err(format!(
                "sector {s} (guest {:#x}) reads {:#x} (byte {at}: {:#x}), may be one of {set:?}",
                s as u64 * SECTOR,
                sec[0],
                sec[at]
            ));
        }
    }
    Ok(())
}

/// The bitmap, added empty before the workload and never stored since
/// (the writer was killed), is either marked in use (inconsistent: QEMU
/// and rimg then refuse to trust it) or still empty, and then no write
/// of the workload may have reached the disk.
fn bitmap_not_wrong(q: &Qcow2, guest: &[u8], cfg: Config) -> Result<(), String> {
    let h = q.header();
    if h.autoclear_features & qcow2::header::autoclear::BITMAPS == 0 {
        return Err("the bitmaps' autoclear bit is gone".into());
    }
    let dir = qcow2::bitmap::track::read_directory(q.storage(), &h)
        .map_err(|e| format!("bitmap directory: {e}"))?
        .ok_or("the bitmaps extension is gone")?
        .1;
    let b = dir
        .iter()
        .find(|d| d.name_str() == "b")
        .ok_or("the bitmap is gone")?;
    if b.in_use() {
        return Ok(());
    }
    for (s, sec) in guest.chunks(SECTOR as usize).enumerate() {
        let init = if cfg.backing {
            backing_byte(s as u64)
        } else {
            0
        };
        if sec[0] != init {
            return Err(format!(
                "the bitmap is not marked in use but sector {s} was written ({:#x})",
                sec[0]
            ));
        }
    }
    Ok(())
}

fn run(cfg: Config, seed: u64, plan: Option<&[(Kind, u64, u64)]>, randoms: usize) {
    // One directory per run: the tests run at once, and a replayed seed
    // is the same in all of them.
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = Dir(std::env::temp_dir().join(format!(
        "rimg-power-loss-{}-{run}-{seed}",
        std::process::id(),
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    let files = Files::in_dir(&dir.0, "t", cfg);
    let img = &files.img;
    let bpath = dir.0.join("base.raw");
    let backing = cfg.backing.then_some(bpath.as_path());
    if cfg.backing {
        let mut b = vec![0u8; GUEST as usize];
        for (s, sec) in b.chunks_mut(SECTOR as usize).enumerate() {
            sec.fill(backing_byte(s as u64));
        }
        std::fs::write(&bpath, &b).unwrap();
    }
    qcow2::create(
        img,
        &CreateOptions {
            size: GUEST,
            cluster_size: cfg.cs,
            extended_l2: cfg.extended_l2,
            backing_file: cfg.backing.then(|| bpath.to_string_lossy().into_owned()),
            backing_format: cfg.backing.then(|| "raw".to_string()),
            data_file: files
                .data
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            data_file_raw: cfg.data_file == Some(true),
            // The least work a key derivation may take: every crash
            // image is opened with the key.
            encrypt: cfg.encrypt.then(|| {
                let p = LuksParams {
                    iter_time_ms: 1,
                    ..Default::default()
                };
                (EncryptFormat::Luks(p), Secret(KEY.to_vec()))
            }),
            ..Default::default()
        },
    )
    .unwrap();
    if cfg.bitmap {
        let st = Storage::open(img, true).unwrap();
        let q = Qcow2::open(st, None, cfg.open_options(None, BOOT_A)).unwrap();
        let t = q.bitmap_tracker().expect("a v3 image tracks bitmaps");
        t.add(&q, "b", None, false).unwrap();
        q.finish().unwrap();
    }
    let init: Vec<Vec<u8>> = files
        .all()
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let plan = match plan {
        Some(p) => p.to_vec(),
        None => random_plan(cfg, &mut rng),
    };
    let (ops, tape) = workload(cfg, &files, backing, &plan);
    let st = tape.st.lock().unwrap();
    let events = &st.events;
    let fail = |what: String| -> ! {
        panic!("{cfg:?} seed {seed}: {what}\nreplay: RIMG_POWERLOSS_SEED={seed}");
    };
    let crash = |p: usize, pick: Pick, rng: &mut StdRng| -> Vec<Vec<u8>> {
        (0..init.len())
            .map(|f| crash_file(events, f, &init[f], p, pick, rng))
            .collect()
    };
    for p in 0..=events.len() {
        let ok = allowed(&ops, p, cfg, false);
        let picks = [Pick::Newest, Pick::Oldest]
            .into_iter()
            .chain(std::iter::repeat_n(Pick::Random, randoms));
        for (i, pick) in picks.enumerate() {
            let image = crash(p, pick, &mut rng);
            let repair = (i == 2 && p % 4 == 0).then_some(false);
            if let Err(e) = judge(&dir.0, &image, cfg, backing, &ok, repair, BOOT_B) {
                fail(format!(
                    "power loss at event {p} of {} ({pick:?}): {e}",
                    events.len()
                ));
            }
        }
        if cfg.mode == MetadataPersistence::ProcessDeath {
            let ok = allowed(&ops, p, cfg, true);
            let image = crash(p, Pick::Newest, &mut rng);
            let repair = (p % 4 == 0).then_some(true);
            if let Err(e) = judge(&dir.0, &image, cfg, backing, &ok, repair, BOOT_A) {
                fail(format!(
                    "process killed at event {p} of {}: {e}",
                    events.len()
                ));
            }
        }
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("RIMG_POWERLOSS_SEED") {
        return vec![s.parse().expect("RIMG_POWERLOSS_SEED is a number")];
    }
    let n: u64 = std::env::var("RIMG_POWERLOSS_SEEDS")
        .map(|s| s.parse().expect("RIMG_POWERLOSS_SEEDS is a number"))
        .unwrap_or(1);
    let base: u64 = rand::random();
    (0..n).map(|i| base.wrapping_add(i)).collect()
}

fn configs(mode: MetadataPersistence) -> Vec<Config> {
    let mut v = Vec::new();
    for (cs, extended_l2) in [(512, false), (4096, false), (65536, false), (65536, true)] {
        for backing in [false, true] {
            v.push(Config {
                extended_l2,
                backing,
                bitmap: backing,
                punch: !backing,
                small_cache: cs == 4096 || extended_l2,
                intent_log: backing,
                ..Config::new(cs, mode)
            });
        }
    }
    // Over a backing file without the intent log (fills synced per
    // write), and with it where tables of 64 entries are evicted often.
    v.push(Config {
        backing: true,
        ..Config::new(65536, mode)
    });
    v.push(Config {
        backing: true,
        small_cache: true,
        intent_log: true,
        ..Config::new(512, mode)
    });
    // External data files (data before entries: no refcount sync covers
    // them), raw or not; LUKS (zeros in the file decrypt to garbage).
    v.push(Config {
        bitmap: true,
        punch: true,
        small_cache: true,
        data_file: Some(false),
        ..Config::new(65536, mode)
    });
    v.push(Config {
        data_file: Some(true),
        ..Config::new(4096, mode)
    });
    v.push(Config {
        small_cache: true,
        encrypt: true,
        ..Config::new(4096, mode)
    });
    for extended_l2 in [false, true] {
        v.push(Config {
            extended_l2,
            backing: true,
            bitmap: true,
            encrypt: true,
            ..Config::new(65536, mode)
        });
    }
    v.push(Config {
        punch: true,
        encrypt: true,
        data_file: Some(false),
        ..Config::new(16384, mode)
    });
    v
}

#[test]
fn a_power_loss_or_kill_keeps_what_process_death_mode_promises() {
    for cfg in configs(MetadataPersistence::ProcessDeath) {
        for seed in seeds() {
            run(cfg, seed, None, 1);
        }
    }
}

#[test]
fn a_power_loss_keeps_what_the_last_flush_made_durable() {
    for cfg in configs(MetadataPersistence::Flush) {
        for seed in seeds() {
            run(cfg, seed, None, 1);
        }
    }
}

/// Clusters freed by a discard and allocated again hold the discarded
/// data until the new data reaches the disk: the entry mapping them must
/// not get there first, in either mode (a crash would show the discarded
/// data, which the guest flushed away, in another place).
#[test]
fn reused_clusters_never_show_their_old_data() {
    let cs = 4096;
    // 128 clusters: a whole reserve (ProcessDeath), so the next write
    // takes a new one, made of the freed clusters.
    let plan = [
        (Kind::Write(1), 0, 128 * cs),
        (Kind::Flush, 0, 0),
        (Kind::Discard, 0, 128 * cs),
        (Kind::Flush, 0, 0),
        (Kind::Write(2), 1 << 20, 16 * cs),
        (Kind::Flush, 0, 0),
    ];
    for mode in [
        MetadataPersistence::Flush,
        MetadataPersistence::ProcessDeath,
    ] {
        for seed in seeds() {
            run(Config::new(cs, mode), seed, Some(&plan), 24);
        }
    }
}

/// An external data file keeps a discarded cluster's data in place (at
/// its guest offset) until it is written again: a write there, and the
/// rest of its cluster, must not be mapped before they reach the disk.
#[test]
fn a_data_file_never_shows_discarded_data_again() {
    let cs = 4096;
    let plan = [
        (Kind::Write(1), 0, 16 * cs),
        (Kind::Flush, 0, 0),
        (Kind::Discard, 0, 16 * cs),
        (Kind::Flush, 0, 0),
        (Kind::Write(2), cs / 2, 4 * cs),
        (Kind::Write(3), 9 * cs, cs / 2),
        (Kind::Flush, 0, 0),
    ];
    for mode in [
        MetadataPersistence::Flush,
        MetadataPersistence::ProcessDeath,
    ] {
        for raw in [false, true] {
            let cfg = Config {
                data_file: Some(raw),
                ..Config::new(cs, mode)
            };
            for seed in seeds() {
                run(cfg, seed, Some(&plan), 24);
            }
        }
    }
}
