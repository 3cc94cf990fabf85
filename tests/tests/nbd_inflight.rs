//! Many requests in flight on one connection: QEMU's NBD client (qemu-io
//! `aio_*`, up to 16 requests at once, flushes among them) against
//! rimg-nbd, which answers them concurrently and out of order, on its
//! io_uring (the default) and on worker threads (`--aio threads`). Every
//! read checks its pattern; afterwards the image equals a model made by
//! the same commands on a local raw file (`qemu-img compare`), and
//! `qemu-img check` is clean. Seeded; `RIMG_SEED` replays a run. Two
//! connections then allocate the same clusters at once, so that one
//! waits for the other's allocation.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rimg_tests::nbd::{self, unix_uri, Creds};
use rimg_tests::{run_ok, spawn_watched, tempdir};

const MODES: [&str; 2] = ["io_uring", "threads"];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// qemu-io commands: a first batch of asynchronous writes into disjoint
/// slots, a drain, then reads of that batch (checked) interleaved with
/// writes (some FUA, some of zeros), discards of whole 64 KiB blocks into
/// other slots, and flushes sent while those are in flight; a drain.
fn commands(seed: u64, slots: u64, slot: u64) -> Vec<String> {
    let mut r = Rng(seed | 1);
    let mut first = Vec::new();
    let mut c = Vec::new();
    for i in 0..slots / 2 {
        let len = (1 + r.below(slot / 512 - 1)) * 512;
        let off = i * slot + r.below((slot - len) / 512 + 1) * 512;
        let p = 1 + (i % 250);
        c.push(format!("aio_write -P {p} {off} {len}"));
        first.push((p, off, len));
    }
    c.push("aio_flush".into());
    for (i, (p, off, len)) in first.into_iter().enumerate() {
        c.push(format!("aio_read -P {p} {off} {len}"));
        let j = slots / 2 + i as u64;
        let len = (1 + r.below(slot / 512 - 1)) * 512;
        let off = j * slot + r.below((slot - len) / 512 + 1) * 512;
        let p = 1 + (j % 250);
        match r.below(6) {
            0 => c.push(format!("aio_write -z {off} {len}")),
            1 => c.push(format!("aio_write -f -P {p} {off} {len}")),
            2 => {
                let blocks = slot >> 16;
                let k = r.below(blocks);
                let n = 1 + r.below(blocks - k);
                c.push(format!("aio_write -P {p} {} {}", j * slot, slot));
                c.push("aio_flush".into());
                c.push(format!("discard {} {}", j * slot + (k << 16), n << 16));
            }
            _ => c.push(format!("aio_write -P {p} {off} {len}")),
        }
        if i % 16 == 15 {
            c.push("flush".into());
        }
    }
    c.push("aio_flush".into());
    c
}

fn qemu_io(fmt: &str, target: &str, cmds: &[String]) -> String {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(target);
    run_ok("qemu-io", &args)
}

/// A round's verdict: qemu-io reported no failure (`out`), the image
/// holds what the same commands put in a raw model, and a qcow2 checks
/// clean.
fn judge(case: &str, out: &str, log: &str, cmds: &[String], fmt: &str, img: &Path, model: &Path) {
    assert!(
        !out.contains("fail") && !out.contains("error"),
        "{case}: {out}\nserver: {log}"
    );
    qemu_io("raw", s(model), cmds);
    run_ok(
        "qemu-img",
        &["compare", "-f", fmt, "-F", "raw", s(img), s(model)],
    );
    if fmt == "qcow2" {
        run_ok("qemu-img", &["check", s(img)]);
    }
}

#[test]
fn requests_in_flight_are_answered_concurrently_and_correctly() {
    let seed = std::env::var("RIMG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    let d = tempdir();
    for (fmt, aio) in ["raw", "qcow2"]
        .into_iter()
        .flat_map(|f| MODES.map(|m| (f, m)))
    {
        let (slots, slot) = (256u64, 256u64 << 10);
        let size = (slots * slot).to_string();
        let img = d.path().join(format!("disk.{aio}.{fmt}"));
        let model = d.path().join(format!("model.{aio}.{fmt}.raw"));
        run_ok("qemu-img", &["create", "-f", fmt, s(&img), &size]);
        run_ok("qemu-img", &["create", "-f", "raw", s(&model), &size]);
        let cmds = commands(seed, slots, slot);
        let sock = d.path().join(format!("{aio}.{fmt}.sock"));
        let args = ["--discard", "unmap", "--aio", aio, "-f", fmt, s(&img)];
        let srv = nbd::serve(&sock, &args);
        let out = qemu_io("raw", &unix_uri(&sock, ""), &cmds);
        let log = nbd::stop(srv);
        let case = format!("seed {seed} ({fmt}, {aio})");
        judge(&case, &out, &log, &cmds, fmt, &img, &model);
    }
}

/// Two clients write the two halves of every cluster of a new qcow2
/// image at once, in the same order, up to 16 requests each in flight:
/// where both reach a cluster together, one connection's write waits
/// for the other's allocation (parked and woken on the io_uring path,
/// blocked on the threaded one). Both must finish (within a deadline: a
/// lost wake-up is a hang) and every half must hold its writer's bytes.
#[test]
fn two_connections_allocating_the_same_clusters_both_finish() {
    let d = tempdir();
    let (clusters, cs) = (1024u64, 64u64 << 10);
    let half = cs / 2;
    let size = (clusters * cs).to_string();
    for aio in MODES {
        for round in 0..2 {
            let img = d.path().join(format!("race.{aio}.{round}.qcow2"));
            let model = d.path().join(format!("race.{aio}.{round}.raw"));
            run_ok(
                "qemu-img",
                &[
                    "create",
                    "-f",
                    "qcow2",
                    "-o",
                    "cluster_size=65536",
                    s(&img),
                    &size,
                ],
            );
            run_ok("qemu-img", &["create", "-f", "raw", s(&model), &size]);
            let sock = d.path().join(format!("race.{aio}.{round}.sock"));
            let srv = nbd::serve(&sock, &["-e", "2", "--aio", aio, "-f", "qcow2", s(&img)]);
            let writer = |second: u64| -> Vec<String> {
                let p = 0xa0 + second;
                let mut c: Vec<String> = (0..clusters)
                    .map(|k| format!("aio_write -P {p} {} {half}", k * cs + second * half))
                    .collect();
                c.push("aio_flush".into());
                c
            };
            let (a, b) = (writer(0), writer(1));
            let spawn = |cmds: &[String]| {
                let mut cmd = Command::new("qemu-io");
                cmd.args(["-f", "raw"]);
                for c in cmds {
                    cmd.args(["-c", c]);
                }
                cmd.arg(unix_uri(&sock, ""));
                spawn_watched(cmd, std::process::Stdio::null())
            };
            let (ca, cb) = (spawn(&a), spawn(&b));
            let (ra, rb) = (
                ca.wait(Duration::from_secs(120)),
                cb.wait(Duration::from_secs(120)),
            );
            let log = nbd::stop(srv);
            for (who, r) in [("first", &ra), ("second", &rb)] {
                let out = String::from_utf8_lossy(&r.stdout);
                assert!(
                    !r.timed_out,
                    "{aio}, round {round}: the {who} client hung:\n{out}\nserver: {log}"
                );
                assert!(
                    r.status.is_some_and(|s| s.success()) && !out.contains("fail"),
                    "{aio}, round {round}: the {who} client: {out}\n{}\nserver: {log}",
                    String::from_utf8_lossy(&r.stderr)
                );
            }
            qemu_io("raw", s(&model), &a);
            qemu_io("raw", s(&model), &b);
            run_ok(
                "qemu-img",
                &["compare", "-f", "qcow2", "-F", "raw", s(&img), s(&model)],
            );
            run_ok("qemu-img", &["check", s(&img)]);
        }
    }
}

/// The same over TLS, X.509 (rustls) and pre-shared keys (OpenSSL):
/// TLS sessions are answered concurrently too, one TLS state machine
/// shared by the connection's reader and workers, replies whole.
#[test]
fn tls_requests_in_flight_are_answered_concurrently_and_correctly() {
    let seed = std::env::var("RIMG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7157_u64);
    let d = tempdir();
    let t = nbd::tls_dirs(d.path());
    let psk = nbd::psk_dir(d.path(), "psk", &[("qemu", &nbd::psk_key(7, 32))]);
    let creds = [
        (Creds::X509(&t.server), Creds::X509(&t.client)),
        (Creds::Psk(&psk, None), Creds::Psk(&psk, None)),
    ];
    for (n, (server, client)) in creds.iter().enumerate() {
        for fmt in ["raw", "qcow2"] {
            let (slots, slot) = (128u64, 256u64 << 10);
            let size = (slots * slot).to_string();
            let img = d.path().join(format!("disk.{n}.{fmt}"));
            let model = d.path().join(format!("model.{n}.{fmt}.raw"));
            run_ok("qemu-img", &["create", "-f", fmt, s(&img), &size]);
            run_ok("qemu-img", &["create", "-f", "raw", s(&model), &size]);
            let cmds = commands(seed ^ n as u64, slots, slot);
            let sock = d.path().join(format!("tls.{n}.{fmt}.sock"));
            let object = server.object("server");
            let args = [
                "--discard",
                "unmap",
                "--object",
                &object,
                "--tls-creds",
                "tls0",
                "-f",
                fmt,
                s(&img),
            ];
            let srv = nbd::serve(&sock, &args);
            let o = client.qemu_io(&sock, &cmds);
            let out = String::from_utf8_lossy(&o.stdout);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "seed {seed}: {out}{err}");
            let log = nbd::stop(srv);
            let case = format!("seed {seed} ({fmt}, {object})");
            judge(&case, &out, &log, &cmds, fmt, &img, &model);
        }
    }
}
