//! Images for torture runs (made with qemu-img and qemu-io, their initial
//! content recorded as an [`Initial`]), the end-of-run checks done with
//! qemu-img, and the state dump taken when a request misses its deadline.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::{Config, Mix};
use super::model::{Initial, Mismatch, Model, SECTOR};
use crate::blk::Daemon;

fn must(cmd: &str, args: &[&str]) -> Result<(), String> {
    let o = crate::run(cmd, args);
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

/// qemu-io writes that give a layer some content; recorded in `init`.
struct Layer<'a> {
    path: &'a Path,
    fmt: &'a str,
    cluster: u64,
    size: u64,
    cmds: Vec<String>,
    init: &'a mut Initial,
    /// Where this layer's entries in `init` start.
    mine: usize,
}

impl Layer<'_> {
    fn fill(&mut self, off: u64, len: u64, byte: u8, compressed: bool) {
        let c = if compressed { "-c " } else { "" };
        self.cmds.push(format!("write {c}-P {byte:#x} {off} {len}"));
        self.init.fills.push((off, off + len, byte));
    }

    fn zero(&mut self, off: u64, len: u64) {
        self.cmds.push(format!("write -z {off} {len}"));
        self.init.fills.push((off, off + len, 0));
    }

    /// A random cluster-aligned range of 1 to `max` clusters, not
    /// touching what this layer was given so far (QEMU compresses only
    /// into unallocated clusters).
    fn clusters(&self, r: &mut StdRng, max: u64) -> (u64, u64) {
        loop {
            let n = r.random_range(1..=max);
            let first = r.random_range(0..self.size / self.cluster - n);
            let (o, l) = (first * self.cluster, n * self.cluster);
            let (a, b) = (o / self.cluster, (o + l).div_ceil(self.cluster));
            let clear = self.init.fills[self.mine..]
                .iter()
                .all(|&(s, e, _)| e.div_ceil(self.cluster) <= a || s / self.cluster >= b);
            if clear {
                return (o, l);
            }
        }
    }

    fn apply(self) -> Result<(), String> {
        if self.cmds.is_empty() {
            return Ok(());
        }
        let mut args = vec!["-f", self.fmt];
        for c in &self.cmds {
            args.extend(["-c", c.as_str()]);
        }
        args.push(self.path.to_str().unwrap());
        must("qemu-io", &args)
    }
}

/// Creates the image `cfg` describes in `dir`; returns its path and what
/// it holds.
pub fn make_image(dir: &Path, cfg: &Config, seed: u64) -> Result<(PathBuf, Initial), String> {
    let mut r = StdRng::seed_from_u64(seed ^ 0x696d_6167);
    let size = cfg.size_mib << 20;
    let mut init = Initial::default();
    let img = dir.join(format!("disk.{}", cfg.fmt));
    let p = img.to_str().unwrap();
    let sz = size.to_string();
    if cfg.backing {
        // base <- mid <- disk; both lower layers hold data, compressed
        // clusters and zero clusters (mid's over base's data).
        let base = dir.join("base.qcow2");
        let mid = dir.join("mid.qcow2");
        let bcs = [4096u64, 65536][r.random_range(0..2)];
        let bcs_o = format!("cluster_size={bcs}");
        must(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &bcs_o,
                base.to_str().unwrap(),
                &sz,
            ],
        )?;
        let mut l = Layer {
            path: &base,
            fmt: "qcow2",
            cluster: bcs,
            size,
            cmds: vec![],
            mine: init.fills.len(),
            init: &mut init,
        };
        for i in 0..6 {
            let (o, n) = l.clusters(&mut r, 64);
            l.fill(o, n, 0x10 + i, i % 2 == 1);
        }
        l.apply()?;
        crate::qemu_overlay(&mid, "base.qcow2", &["cluster_size=65536"]);
        let mut l = Layer {
            path: &mid,
            fmt: "qcow2",
            cluster: 65536,
            size,
            cmds: vec![],
            mine: init.fills.len(),
            init: &mut init,
        };
        for i in 0..6 {
            let (o, n) = l.clusters(&mut r, 8);
            match i % 3 {
                0 => l.zero(o, n),
                1 => l.fill(o, n, 0x40 + i as u8, true),
                _ => {
                    // Not cluster-aligned: partial clusters over the base.
                    let o = o + r.random_range(0..8) * 4096;
                    l.fill(o, n / 2 + 4096, 0x40 + i as u8, false);
                }
            }
        }
        l.apply()?;
        let mut opts = vec![format!("cluster_size={}", cfg.cluster)];
        if cfg.lazy {
            opts.push("lazy_refcounts=on".into());
        }
        opts.extend(layout_opts(dir, cfg));
        let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
        crate::qemu_overlay(&img, "mid.qcow2", &opts);
        return Ok((img, init));
    }
    if cfg.is_qcow2() {
        let mut o = format!(
            "cluster_size={},preallocation={},lazy_refcounts={}",
            cfg.cluster,
            cfg.prealloc,
            if cfg.lazy { "on" } else { "off" }
        );
        for x in layout_opts(dir, cfg) {
            o.push(',');
            o.push_str(&x);
        }
        must(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &o, p, &sz],
        )?;
    } else {
        must("qemu-img", &["create", "-q", "-f", "raw", p, &sz])?;
    }
    if cfg.mix == Mix::Writes4k {
        return Ok((img, init)); // A fresh image, as in bug (a).
    }
    // Some old data, zeroed ranges and (on qcow2 without preallocation or
    // data file, where QEMU can write them) compressed clusters.
    let cluster = if cfg.is_qcow2() { cfg.cluster } else { 65536 };
    let compress = cfg.is_qcow2() && cfg.prealloc == "off" && !cfg.has_data_file();
    let mut l = Layer {
        path: &img,
        fmt: &cfg.fmt,
        cluster,
        size,
        cmds: vec![],
        mine: init.fills.len(),
        init: &mut init,
    };
    let most = (1 << 20) / cluster;
    for i in 0..6u8 {
        let (o, n) = l.clusters(&mut r, most.max(1));
        match i % 3 {
            0 => l.fill(o, n, 0x70 + i, false),
            1 if compress => l.fill(o, n, 0x70 + i, true),
            _ => l.zero(o, n),
        }
    }
    l.apply()?;
    Ok((img, init))
}

/// The external data file of `cfg`'s image in `dir`, if it has one.
pub fn data_file(dir: &Path, cfg: &Config) -> Option<PathBuf> {
    cfg.has_data_file().then(|| dir.join("disk.data"))
}

/// qcow2 creation options for extended L2 entries and a data file.
fn layout_opts(dir: &Path, cfg: &Config) -> Vec<String> {
    let mut o = Vec::new();
    if cfg.extl2 {
        o.push("extended_l2=on".into());
    }
    if let Some(d) = data_file(dir, cfg) {
        o.push(format!("data_file={}", d.display()));
        if cfg.data == "raw" {
            o.push("data_file_raw=on".into());
        }
    }
    o
}

/// `qemu-img check`: no corruption, leak or check error.
pub fn qemu_check(img: &Path) -> Result<(), String> {
    let p = img.to_str().unwrap();
    let out = crate::qemu_img(&["check", "--output=json", p]);
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        format!(
            "qemu-img check {p}: {e}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let mut found = Vec::new();
    for key in ["corruptions", "leaks", "check-errors"] {
        let n = v.get(key).and_then(|x| x.as_u64()).unwrap_or(0);
        if n != 0 {
            found.push(format!("{key} = {n}"));
        }
    }
    if !out.status.success() || !found.is_empty() {
        return Err(format!(
            "qemu-img check {p} exited {:?}: {}\n{text}{}",
            out.status.code(),
            found.join(", "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Reads the image back through `qemu-img convert -O raw` and checks
/// every sector against the model; returns the mismatches.
pub fn read_back(img: &Path, scratch: &Path, model: &Model) -> Result<Vec<Mismatch>, String> {
    must(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            scratch.to_str().unwrap(),
        ],
    )?;
    let mut f = std::fs::File::open(scratch).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4 << 20];
    let mut sector = 0;
    let mut bad = Vec::new();
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]).map_err(|e| e.to_string())? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        bad.extend(model.check_final(sector, &buf[..n]));
        sector += n as u64 / SECTOR;
    }
    let _ = std::fs::remove_file(scratch);
    Ok(bad)
}

/// A raw data file must read as the disk: `qemu-img convert` of it as a
/// raw image must equal `qemu-img convert -O raw` of the qcow2 image,
/// byte for byte (scratch files `scratch`.1 and .2, removed after).
pub fn raw_data_file_matches(img: &Path, data: &Path, scratch: &Path) -> Result<(), String> {
    let (a, b) = (scratch.with_extension("1"), scratch.with_extension("2"));
    let conv = |fmt: &str, from: &Path, to: &Path| {
        must(
            "qemu-img",
            &[
                "convert",
                "-f",
                fmt,
                "-O",
                "raw",
                from.to_str().unwrap(),
                to.to_str().unwrap(),
            ],
        )
    };
    let r = conv("qcow2", img, &a)
        .and_then(|()| conv("raw", data, &b))
        .and_then(|()| first_difference(&a, &b));
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    match r {
        Ok(None) => Ok(()),
        Ok(Some(at)) => Err(format!(
            "raw data file {} differs from the qcow2 image's content at byte {at}",
            data.display()
        )),
        Err(e) => Err(e),
    }
}

/// The first byte offset where files `a` and `b` differ (a length
/// difference counts), if any.
fn first_difference(a: &Path, b: &Path) -> Result<Option<u64>, String> {
    let open = |p: &Path| std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut pos = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if let Some(i) = ba[..na.min(nb)]
            .iter()
            .zip(&bb[..na.min(nb)])
            .position(|(x, y)| x != y)
        {
            return Ok(Some(pos + i as u64));
        }
        if na != nb {
            return Ok(Some(pos + na.min(nb) as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        pos += na as u64;
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> Result<usize, String> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).map_err(|e| e.to_string())? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// What the daemon says about itself when a request is late: its SIGUSR1
/// report (queue workers' slots in flight, parked requests and the
/// clusters they wait on), then each thread's name, wait channel and
/// kernel stack from /proc.
pub fn dump_state(d: &Daemon) -> String {
    let pid = d.pid();
    let before = d.log().len();
    d.signal(libc::SIGUSR1);
    // Poll the captured stderr until the report has arrived and stopped
    // growing for 300 ms (or 3 s pass, or the daemon dies of it).
    let end = Instant::now() + Duration::from_secs(3);
    let (mut len, mut since) = (before, Instant::now());
    while Instant::now() < end && !d.exited() {
        let now_len = d.log().len();
        if now_len != len {
            (len, since) = (now_len, Instant::now());
        } else if len > before && since.elapsed() > Duration::from_millis(300) {
            break;
        }
        d.wait_for_log("\u{0}never", Duration::from_millis(20));
    }
    let log = d.log();
    let mut out = String::from("--- daemon state (SIGUSR1) ---\n");
    if log.len() > before {
        out.push_str(&log[before..]);
    } else {
        out.push_str("(nothing logged within 3 s)\n");
    }
    if d.exited() {
        out.push_str("(the daemon died on SIGUSR1: no handler on this branch)\n");
    }
    out.push_str(&crate::daemon::proc_threads(pid));
    out
}
