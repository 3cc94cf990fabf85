//! rimg-vhost-blk serving encrypted images that qemu-img created (qcow2
//! with LUKS or legacy AES encryption, LUKS with extended L2 entries or a
//! data file, plain LUKS volumes), the password
//! read from `--key-file` as QEMU reads `--object secret,file=`: the same
//! key file serves both (its trailing newline is part of the password).
//! A libblkio client on four queues writes known patterns (inside and
//! across clusters, larger than the bounce buffer, concurrent allocations
//! in one cluster, write-zeroes, discard), the daemon exits 0 on SIGTERM,
//! and qemu-io with the key reads every byte back; `qemu-img check` and
//! `qemu-img compare` against a raw twin judge the image. The reverse:
//! qemu-io writes, the client reads the same bytes. Missing and wrong
//! passwords stop the daemon before it listens, and the password shows
//! in no output, not even at debug level.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rimg_tests::blk::{Client, Req};
use rimg_tests::daemon::DaemonProcess;
use rimg_tests::{run, run_ok, run_watched, tempdir, workspace_bin, OutputText};

const SIZE: u64 = 32 << 20;
const QUEUES: usize = 4;
/// The password, with the newline a key file written by `echo` ends in:
/// QEMU keeps it, so the daemon must too.
const PASSWORD: &str = "vhost-blk-Secret-4711\n";
/// What shows in no output: the password's text.
const NEEDLE: &str = "vhost-blk-Secret-4711";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Enc {
    /// qcow2, `encrypt.format=luks`.
    Qcow2Luks,
    /// qcow2, `encrypt.format=aes` (legacy; no key check possible).
    Qcow2Aes,
    /// A plain LUKS volume (`-f luks`).
    Luks,
    /// qcow2 with LUKS and extended L2 entries (2 KiB subclusters: a
    /// sector's write fills the rest of its subcluster).
    Qcow2LuksExtL2,
    /// qcow2 with LUKS and an external data file.
    Qcow2LuksDataFile,
}

impl Enc {
    fn format(self) -> &'static str {
        match self {
            Enc::Luks => "luks",
            _ => "qcow2",
        }
    }

    /// `-o` for qemu-img create (a data file goes in `dir`).
    fn create_opts(self, dir: &Path) -> String {
        const LUKS: &str = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
        match self {
            Enc::Qcow2LuksExtL2 => format!("{LUKS},extended_l2=on"),
            Enc::Qcow2LuksDataFile => {
                format!("{LUKS},data_file={}", dir.join("disk.data").display())
            }
            other => other.create_opts_plain().into(),
        }
    }

    fn create_opts_plain(self) -> &'static str {
        match self {
            Enc::Qcow2Luks | Enc::Qcow2LuksExtL2 | Enc::Qcow2LuksDataFile => {
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
            }
            Enc::Qcow2Aes => "encrypt.format=aes,encrypt.key-secret=sec0",
            Enc::Luks => "key-secret=sec0,iter-time=10",
        }
    }

    /// The image as `--image-opts` for QEMU, with key `sec0`.
    fn spec(self, img: &Path) -> String {
        match self {
            Enc::Luks => format!(
                "driver=luks,file.filename={},key-secret=sec0",
                img.display()
            ),
            _ => format!(
                "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
                img.display()
            ),
        }
    }

    /// What the daemon needs besides the key: luks is never probed.
    fn daemon_args(self) -> &'static [&'static str] {
        match self {
            Enc::Luks => &["--format", "luks"],
            _ => &[],
        }
    }
}

/// A scratch directory with the key file and an image made by qemu-img.
struct Setup {
    dir: tempfile::TempDir,
    enc: Enc,
    img: PathBuf,
    key: PathBuf,
}

impl Setup {
    fn new(enc: Enc) -> Setup {
        let dir = tempdir();
        let key = dir.path().join("key");
        std::fs::write(&key, PASSWORD).unwrap();
        let img = dir.path().join(format!("disk.{}", enc.format()));
        let s = Setup { dir, enc, img, key };
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "--object",
                &s.secret(),
                "-f",
                enc.format(),
                "-o",
                &enc.create_opts(s.dir.path()),
                s.img.to_str().unwrap(),
                &SIZE.to_string(),
            ],
        );
        s
    }

    /// The guest content as QEMU reads it (a fresh luks volume's
    /// unwritten payload decrypts to noise, not zeros).
    fn qemu_content(&self) -> Vec<u8> {
        let raw = self.dir.path().join("content.raw");
        run_ok(
            "qemu-img",
            &[
                "convert",
                "--object",
                &self.secret(),
                "--image-opts",
                &self.enc.spec(&self.img),
                "-O",
                "raw",
                raw.to_str().unwrap(),
            ],
        );
        std::fs::read(&raw).unwrap()
    }

    fn secret(&self) -> String {
        format!("secret,id=sec0,file={}", self.key.display())
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("blk.sock")
    }

    /// The daemon's command line for this image with `key` (or none),
    /// logging at debug level.
    fn daemon_cmd(&self, key: Option<&Path>, extra: &[&str]) -> Command {
        let mut cmd = Command::new(workspace_bin("rimg-vhost-blk"));
        cmd.env("RUST_LOG", "debug")
            .arg("--socket")
            .arg(self.sock())
            .arg("--image")
            .arg(&self.img)
            .args(self.enc.daemon_args())
            .args(extra);
        if let Some(k) = key {
            cmd.arg("--key-file").arg(k);
        }
        cmd
    }

    fn start(&self, extra: &[&str]) -> DaemonProcess {
        let nq = QUEUES.to_string();
        let mut args = vec!["--num-queues", nq.as_str()];
        args.extend(extra);
        DaemonProcess::spawn(self.daemon_cmd(Some(&self.key), &args), &self.sock()).expect("daemon")
    }

    /// qemu-io with the key; every command must succeed.
    fn qemu_io(&self, cmds: &[String]) -> String {
        let (secret, spec) = (self.secret(), self.enc.spec(&self.img));
        let mut args = vec!["--object", &secret, "--image-opts", &spec];
        for c in cmds {
            args.extend(["-c", c]);
        }
        let out = run_ok("qemu-io", &args);
        assert!(
            !out.contains("Pattern verification failed") && !out.contains("failed:"),
            "{out}"
        );
        out
    }

    /// `qemu-img compare` of the raw file `raw` with the image.
    fn assert_equal_to(&self, raw: &Path) {
        let r = format!("driver=raw,file.filename={}", raw.display());
        let out = run_ok(
            "qemu-img",
            &[
                "compare",
                "--object",
                &self.secret(),
                "--image-opts",
                &r,
                &self.enc.spec(&self.img),
            ],
        );
        assert!(out.contains("Images are identical"), "{out}");
    }

    /// `qemu-img check` with the key finds neither errors nor leaks
    /// (qcow2; a luks volume has no metadata to check).
    fn assert_check_clean(&self) {
        if self.enc == Enc::Luks {
            return;
        }
        let (secret, spec) = (self.secret(), self.enc.spec(&self.img));
        let out = run_ok(
            "qemu-img",
            &[
                "check",
                "--output=json",
                "--object",
                &secret,
                "--image-opts",
                &spec,
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&out).expect("check json");
        for key in ["corruptions", "leaks", "check-errors"] {
            let n = v.get(key).and_then(|x| x.as_u64()).unwrap_or(0);
            assert_eq!(n, 0, "qemu-img check: {key} = {n}\n{out}");
        }
    }
}

/// One step of the workload, the same for the client and for qemu-io.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Offset, length, pattern byte.
    Write(u64, u64, u8),
    /// Offset, length, unmap allowed.
    Zero(u64, u64, bool),
    Discard(u64, u64),
}

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;

/// Rounds of requests; each round's requests run at once on their
/// queues, so their ranges never overlap. Clusters are 64 KiB.
fn rounds() -> Vec<Vec<(usize, Op)>> {
    let mut first = vec![
        // Inside one cluster.
        (0, Op::Write(0, 4 * K, 0x11)),
        // Across a cluster boundary.
        (1, Op::Write(60 * K, 8 * K, 0x22)),
        // Across several, starting one sector before a MiB.
        (2, Op::Write(M - 512, 129 * K, 0x33)),
        // Larger than the worker's 1 MiB bounce buffer.
        (3, Op::Write(5 * M, 2 * M, 0x44)),
        (0, Op::Write(10 * M + 512, 512, 0x55)),
    ];
    // Sixteen 4 KiB writes into three clusters from every queue at once:
    // concurrent allocations of one cluster.
    for i in 0..16u64 {
        let op = Op::Write(20 * M + i * 12 * K, 4 * K, 0x60 + i as u8);
        first.push((i as usize % QUEUES, op));
    }
    let second = vec![
        (1, Op::Zero(5 * M + 64 * K, 128 * K, true)),
        (2, Op::Zero(K, K, false)),
        (3, Op::Discard(6 * M, 256 * K)),
        (0, Op::Write(24 * M, 64 * K, 0x77)),
        (1, Op::Write(20 * M + 4 * K, 4 * K, 0x70)),
    ];
    vec![first, second]
}

/// Applies `op` to the model of the disk (a discard leaves it as it is:
/// the device's answer is taken afterwards).
fn apply(model: &mut [u8], op: Op) {
    let r = |o: u64, l: u64| o as usize..(o + l) as usize;
    match op {
        Op::Write(o, l, p) => model[r(o, l)].fill(p),
        Op::Zero(o, l, _) => model[r(o, l)].fill(0),
        Op::Discard(..) => {}
    }
}

fn qemu_io_cmd(op: Op) -> String {
    match op {
        Op::Write(o, l, p) => format!("write -P {p:#x} {o} {l}"),
        Op::Zero(o, l, unmap) => format!("write -z{} {o} {l}", if unmap { " -u" } else { "" }),
        Op::Discard(o, l) => format!("discard {o} {l}"),
    }
}

/// qemu-io reads checking every byte the workload touched in `model`:
/// one `read -P` per run of equal bytes.
fn qemu_io_reads(model: &[u8]) -> Vec<String> {
    let mut touched = vec![false; model.len()];
    for &(_, op) in rounds().iter().flatten() {
        let (Op::Write(o, l, _) | Op::Zero(o, l, _) | Op::Discard(o, l)) = op;
        touched[o as usize..(o + l) as usize].fill(true);
    }
    let mut cmds = Vec::new();
    let mut at = 0;
    while at < model.len() {
        let (b, t) = (model[at], touched[at]);
        let n = (at..model.len())
            .position(|i| model[i] != b || touched[i] != t)
            .unwrap_or(model.len() - at);
        if t {
            assert!(n >= 512, "the workload writes whole sectors");
            cmds.push(format!("read -P {b:#x} {at} {n}"));
        }
        at += n;
    }
    cmds
}

/// Reads the whole disk through the client, 1 MiB per request, the
/// requests spread over the queues.
fn read_all(c: &mut Client) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIZE as usize);
    for (i, off) in (0..SIZE).step_by(M as usize).enumerate() {
        out.extend(c.read(i % QUEUES, off, M as usize).expect("read"));
    }
    out
}

/// The client's workload on the served image whose content was
/// `initial`: returns the model of the disk (discarded ranges as the
/// device then reads them).
fn client_workload(c: &mut Client, initial: Vec<u8>) -> Vec<u8> {
    let mut model = initial;
    let mut data = Vec::new();
    for round in rounds() {
        data.clear();
        for &(_, op) in &round {
            if let Op::Write(_, l, p) = op {
                data.push(vec![p; l as usize]);
            }
        }
        let mut next = data.iter();
        let reqs: Vec<(usize, Req<'_>)> = round
            .iter()
            .map(|&(q, op)| {
                let r = match op {
                    Op::Write(o, ..) => Req::Write(o, next.next().unwrap()),
                    Op::Zero(o, l, unmap) => Req::WriteZeroes(o, l, unmap),
                    Op::Discard(o, l) => Req::Discard(o, l),
                };
                (q, r)
            })
            .collect();
        let r = c.batch(&reqs);
        assert!(r.iter().all(|&x| x == 0), "{round:?}: {r:?}");
        for &(_, op) in &round {
            apply(&mut model, op);
        }
    }
    c.flush(0).expect("flush");
    let got = read_all(c);
    // Discarded sectors read as before or as zeros.
    for &(_, op) in rounds().iter().flatten() {
        if let Op::Discard(o, l) = op {
            let r = o as usize..(o + l) as usize;
            for (s, (g, w)) in got[r.clone()]
                .chunks(512)
                .zip(model[r.clone()].chunks(512))
                .enumerate()
            {
                assert!(
                    g == w || g.iter().all(|&b| b == 0),
                    "discarded sector {} reads neither old data nor zeros",
                    o / 512 + s as u64
                );
            }
            model[r.clone()].copy_from_slice(&got[r]);
        }
    }
    assert_same(&got, &model, "read back through the daemon");
    model
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: {:#x}, expected {:#x}",
            got[i], want[i]
        );
    }
    assert_eq!(got.len(), want.len(), "{what}: length");
}

fn assert_no_password(text: &str, what: &str) {
    assert!(!text.contains(NEEDLE), "{what} shows the password:\n{text}");
}

/// The daemon writes, QEMU reads back.
fn daemon_writes_qemu_reads(enc: Enc, extra: &[&str]) {
    let s = Setup::new(enc);
    let initial = s.qemu_content();
    let d = s.start(extra);
    let mut c = Client::connect(&s.sock(), QUEUES, false).expect("connect");
    assert_eq!(c.capacity(), SIZE);
    let model = client_workload(&mut c, initial);
    drop(c);
    let (st, log) = d.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    // The configuration is logged at debug level, the password hidden.
    assert!(log.contains("key: Some(Secret(..))"), "{log}");
    assert_no_password(&log, "the daemon's log");
    s.qemu_io(&qemu_io_reads(&model));
    s.assert_check_clean();
    let twin = s.dir.path().join("twin.raw");
    std::fs::write(&twin, &model).unwrap();
    s.assert_equal_to(&twin);
}

#[test]
fn qcow2_luks_daemon_writes_qemu_reads() {
    daemon_writes_qemu_reads(Enc::Qcow2Luks, &[]);
}

#[test]
fn qcow2_aes_daemon_writes_qemu_reads() {
    daemon_writes_qemu_reads(Enc::Qcow2Aes, &[]);
}

#[test]
fn luks_daemon_writes_qemu_reads() {
    daemon_writes_qemu_reads(Enc::Luks, &[]);
}

/// Encryption with subclusters (each partial write's fill encrypted per
/// subcluster) and with a data file.
#[test]
fn qcow2_luks_with_subclusters_or_data_file_daemon_writes_qemu_reads() {
    daemon_writes_qemu_reads(Enc::Qcow2LuksExtL2, &[]);
    daemon_writes_qemu_reads(Enc::Qcow2LuksDataFile, &[]);
    qemu_writes_daemon_reads(Enc::Qcow2LuksExtL2);
    qemu_writes_daemon_reads(Enc::Qcow2LuksDataFile);
}

/// With `--direct` the engine writes through the O_DIRECT descriptor.
#[test]
fn direct_qcow2_luks_and_luks() {
    daemon_writes_qemu_reads(Enc::Qcow2Luks, &["--direct"]);
    daemon_writes_qemu_reads(Enc::Luks, &["--direct"]);
}

/// QEMU writes, the daemon reads.
fn qemu_writes_daemon_reads(enc: Enc) {
    let s = Setup::new(enc);
    let mut model = s.qemu_content();
    let mut cmds = Vec::new();
    for &(_, op) in rounds().iter().flatten() {
        // What a discard leaves is QEMU's choice: not part of this check.
        if !matches!(op, Op::Discard(..)) {
            cmds.push(qemu_io_cmd(op));
            apply(&mut model, op);
        }
    }
    s.qemu_io(&cmds);
    let d = s.start(&["--readonly"]);
    let mut c = Client::connect(&s.sock(), QUEUES, true).expect("connect");
    assert_eq!(c.capacity(), SIZE);
    let got = read_all(&mut c);
    drop(c);
    let (st, log) = d.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    assert_same(&got, &model, "the daemon's reads of what qemu-io wrote");
}

#[test]
fn qcow2_luks_qemu_writes_daemon_reads() {
    qemu_writes_daemon_reads(Enc::Qcow2Luks);
}

#[test]
fn qcow2_aes_qemu_writes_daemon_reads() {
    qemu_writes_daemon_reads(Enc::Qcow2Aes);
}

#[test]
fn luks_qemu_writes_daemon_reads() {
    qemu_writes_daemon_reads(Enc::Luks);
}

/// Runs the daemon expecting it to refuse to start: exit status 1, no
/// socket; returns stderr (stdout must be empty).
fn refused(s: &Setup, key: Option<&Path>) -> String {
    let w = run_watched(s.daemon_cmd(key, &[]), Duration::from_secs(60));
    let (out, err) = (
        String::from_utf8_lossy(&w.stdout).into_owned(),
        String::from_utf8_lossy(&w.stderr).into_owned(),
    );
    assert!(!w.timed_out, "the daemon served:\n{err}");
    assert_eq!(w.status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(out.is_empty(), "stdout: {out}");
    assert!(!s.sock().exists(), "socket created before the refusal");
    assert_no_password(&err, "stderr");
    err
}

/// The password without its newline is a wrong one, for QEMU as for
/// the daemon: same wording, status 1, the password nowhere.
#[test]
fn wrong_password_is_refused_as_qemu_refuses_it() {
    for enc in [Enc::Qcow2Luks, Enc::Luks] {
        let s = Setup::new(enc);
        let wrong = s.dir.path().join("key-without-newline");
        std::fs::write(&wrong, PASSWORD.trim_end()).unwrap();
        let err = refused(&s, Some(&wrong));
        let want = "Invalid password, cannot unlock any keyslot";
        let line = err.lines().last().unwrap_or_default();
        assert!(
            line.starts_with("rimg-vhost-blk: ") && line.ends_with(want),
            "{enc:?}: {err}"
        );
        let secret = format!("secret,id=sec0,file={}", wrong.display());
        let spec = enc.spec(&s.img);
        let q = run(
            "qemu-io",
            &[
                "--object",
                &secret,
                "--image-opts",
                &spec,
                "-c",
                "read 0 512",
            ],
        );
        assert!(!q.status.success(), "qemu-io took the wrong password");
        assert!(q.stderr_text().contains(want), "{}", q.stderr_text());
    }
}

#[test]
fn missing_password_names_the_option() {
    for enc in [Enc::Qcow2Luks, Enc::Qcow2Aes, Enc::Luks] {
        let s = Setup::new(enc);
        let err = refused(&s, None);
        assert!(err.contains("--key-file"), "{enc:?}: {err}");
        assert!(err.contains("encrypted"), "{enc:?}: {err}");
    }
}

/// A LUKS volume is probed as one, as QEMU probes it: without a format
/// it needs its password (refused, naming --key-file, the password
/// nowhere). Given `--format raw` it is served as the raw disk it is (a
/// guest that formatted its whole disk with LUKS sees its header).
#[test]
fn luks_volume_is_served_raw_only_when_asked() {
    let s = Setup::new(Enc::Luks);
    let w = run_watched(
        {
            let mut cmd = Command::new(workspace_bin("rimg-vhost-blk"));
            cmd.arg("--socket")
                .arg(s.sock())
                .arg("--image")
                .arg(&s.img)
                .arg("--readonly");
            cmd
        },
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&w.stderr).into_owned();
    assert!(
        !w.timed_out,
        "the daemon served a probed LUKS volume:\n{err}"
    );
    assert_eq!(w.status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(err.contains("--key-file"), "{err}");
    assert_no_password(&err, "stderr");
    let d = DaemonProcess::spawn(
        {
            let mut cmd = Command::new(workspace_bin("rimg-vhost-blk"));
            cmd.arg("--socket")
                .arg(s.sock())
                .arg("--image")
                .arg(&s.img)
                .args(["--format", "raw", "--readonly"]);
            cmd
        },
        &s.sock(),
    )
    .expect("daemon");
    let mut c = Client::connect(&s.sock(), 1, true).expect("connect");
    let file_len = std::fs::metadata(&s.img).unwrap().len();
    assert_eq!(c.capacity(), file_len & !511);
    assert!(c.capacity() > SIZE);
    let first = c.read(0, 0, 512).expect("read");
    assert_eq!(&first[..6], b"LUKS\xba\xbe");
    drop(c);
    let (st, log) = d.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
}
