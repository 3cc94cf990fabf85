//! rimg-vhost-blk driven by libblkio's virtio-blk-vhost-user driver (a
//! real vhost-user-blk frontend): verified reads and writes at queue
//! depth, flush, discard and write-zeroes on raw and qcow2 images, with a
//! backing file, one and two queues, read-only mode, reconnects, locks,
//! SIGTERM under load, and the subcluster kinds of extended L2 entries. Every image is then checked by `qemu-img check` and
//! compared with a model of what the client wrote.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rimg_tests::blk::{Client, Daemon};
use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, qemu_img, qemu_overlay, run, tempdir,
};

const SIZE: u64 = 64 << 20;

fn ok(o: std::process::Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Creates the image to serve and returns the model of its content.
fn make_image(dir: &Path, fmt: &str, backing: bool) -> (std::path::PathBuf, Vec<u8>) {
    let img = dir.join(format!("disk.{fmt}"));
    let p = img.to_str().unwrap();
    if backing {
        let base = dir.join("base.qcow2");
        let b = base.to_str().unwrap();
        ok(
            qemu_img(&["create", "-q", "-f", "qcow2", b, &SIZE.to_string()]),
            "create base",
        );
        ok(
            run(
                "qemu-io",
                &[
                    "-c",
                    "write -P 0x5a 0 8M",
                    "-c",
                    "write -P 0xa5 20M 3M",
                    "-c",
                    "write -c -P 0x33 40M 1M",
                    b,
                ],
            ),
            "qemu-io base",
        );
        qemu_overlay(&img, "base.qcow2", &[]);
    } else {
        ok(
            qemu_img(&["create", "-q", "-f", fmt, p, &SIZE.to_string()]),
            "create",
        );
        if fmt == "qcow2" {
            // Some pre-existing data, a zero cluster and a compressed one.
            ok(
                run(
                    "qemu-io",
                    &[
                        "-c",
                        "write -P 0x11 1M 2M",
                        "-c",
                        "write -z 1536k 64k",
                        "-c",
                        "write -c -P 0x22 10M 64k",
                        p,
                    ],
                ),
                "qemu-io",
            );
        }
    }
    let raw = dir.join("initial.raw");
    ok(
        qemu_img(&["convert", "-O", "raw", p, raw.to_str().unwrap()]),
        "convert initial",
    );
    let model = std::fs::read(&raw).unwrap();
    (img, model)
}

fn sector_aligned(rng: &mut StdRng, max_len: u64) -> (u64, u64) {
    let len = rng.random_range(1..=max_len / 512) * 512;
    let off = rng.random_range(0..(SIZE - len) / 512) * 512;
    (off, len)
}

/// Random verified I/O through every queue; updates `model`.
fn exercise(c: &mut Client, queues: usize, model: &mut [u8], seed: u64, rounds: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..rounds {
        let q = round % queues;
        match rng.random_range(0..10) {
            0..=3 => {
                let (off, len) = sector_aligned(&mut rng, 256 << 10);
                let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                c.write(q, off, &data).expect("write");
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            4 => {
                // Queue depth 16, 4 KiB writes, distinct offsets, some in
                // the same 64 KiB cluster (allocation races).
                let base = rng.random_range(0..SIZE / (1 << 20)) << 20;
                let mut offs: Vec<u64> = (0..16).map(|i| base + i * 4096 * 3).collect();
                offs.dedup();
                let data: Vec<u8> = (0..offs.len() * 4096).map(|_| rng.random()).collect();
                let r = c.write_many(q, &offs, &data, 4096);
                assert!(r.iter().all(|&x| x == 0), "write_many {r:?}");
                for (i, &o) in offs.iter().enumerate() {
                    model[o as usize..o as usize + 4096]
                        .copy_from_slice(&data[i * 4096..(i + 1) * 4096]);
                }
            }
            5..=7 => {
                let (off, len) = sector_aligned(&mut rng, 1 << 20);
                let got = c.read(q, off, len as usize).expect("read");
                let want = &model[off as usize..(off + len) as usize];
                if got != want {
                    let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
                    panic!("seed {seed} round {round}: mismatch at {}", off + i as u64);
                }
            }
            8 => {
                let (off, len) = sector_aligned(&mut rng, 2 << 20);
                let unmap = rng.random();
                c.write_zeroes(q, off, len, unmap).expect("write_zeroes");
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                if rng.random_bool(0.5) {
                    c.flush(q).expect("flush");
                } else {
                    // Discarded sectors read back as before or as zeros;
                    // the model takes what the device now says.
                    let (off, len) = sector_aligned(&mut rng, 2 << 20);
                    c.discard(q, off, len).expect("discard");
                    let got = c.read(q, off, len as usize).expect("read");
                    let m = &mut model[off as usize..(off + len) as usize];
                    for (s, (g, w)) in got.chunks(512).zip(m.chunks_mut(512)).enumerate() {
                        assert!(
                            g == w || g.iter().all(|&b| b == 0),
                            "discarded sector {} reads neither old data nor zeros",
                            off / 512 + s as u64
                        );
                        w.copy_from_slice(g);
                    }
                }
            }
        }
    }
    c.flush(0).expect("final flush");
}

fn finish_and_verify(d: Daemon, img: &Path, model: &[u8], dir: &Path) {
    let (st, log) = d.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    if img.extension().is_some_and(|e| e == "qcow2") {
        assert_qemu_check_clean(img);
    }
    assert_qemu_compare_equal(&raw, img);
}

fn serve_and_exercise(fmt: &str, backing: bool, queues: usize) {
    serve_and_exercise_with(fmt, backing, queues, &[]);
}

fn serve_and_exercise_with(fmt: &str, backing: bool, queues: usize, extra: &[&str]) {
    let d = tempdir();
    let (img, mut model) = make_image(d.path(), fmt, backing);
    let sock = d.path().join("blk.sock");
    let nq = queues.to_string();
    let mut args = vec!["--num-queues", &nq];
    args.extend_from_slice(extra);
    let daemon = Daemon::start(&sock, &img, &args).expect("daemon");
    let mut c = Client::connect(&sock, queues, false).expect("connect");
    assert_eq!(c.capacity(), SIZE);
    exercise(&mut c, queues, &mut model, 7 + queues as u64, 300);
    drop(c);
    finish_and_verify(daemon, &img, &model, d.path());
}

/// Images on tmpfs, whose reads the workers make themselves (it has no
/// nonblocking reads for io_uring), under the default seccomp filter.
#[test]
fn tmpfs_reads_made_by_the_worker() {
    for (fmt, backing) in [("raw", false), ("qcow2", false), ("qcow2", true)] {
        let d = tempfile::Builder::new()
            .prefix("rimg-test-")
            .tempdir_in("/dev/shm")
            .expect("tempdir on /dev/shm");
        let probe = d.path().join("probe");
        std::fs::write(&probe, b"x").unwrap();
        assert!(
            rimg_vhost_server::inline::reads_here(&std::fs::File::open(&probe).unwrap()),
            "/dev/shm is not tmpfs here: this test would not cover worker reads"
        );
        let (img, mut model) = make_image(d.path(), fmt, backing);
        let sock = d.path().join("blk.sock");
        let daemon = Daemon::start(&sock, &img, &["--num-queues", "2"]).expect("daemon");
        let mut c = Client::connect(&sock, 2, false).expect("connect");
        exercise(&mut c, 2, &mut model, 11, 300);
        drop(c);
        finish_and_verify(daemon, &img, &model, d.path());
    }
}

#[test]
fn raw_one_queue() {
    serve_and_exercise("raw", false, 1);
}

#[test]
fn raw_two_queues() {
    serve_and_exercise("raw", false, 2);
}

#[test]
fn qcow2_one_queue() {
    serve_and_exercise("qcow2", false, 1);
}

#[test]
fn qcow2_two_queues() {
    serve_and_exercise("qcow2", false, 2);
}

#[test]
fn qcow2_backing_two_queues() {
    serve_and_exercise("qcow2", true, 2);
}

/// Busy polling (`--poll-us`): the same load, answers and end state, and
/// SIGTERM still ends the daemon cleanly while its workers poll.
#[test]
fn qcow2_two_queues_polling() {
    serve_and_exercise_with("qcow2", true, 2, &["--poll-us", "200"]);
}

#[test]
fn readonly_refuses_writes() {
    let d = tempdir();
    let (img, model) = make_image(d.path(), "qcow2", false);
    let before = std::fs::read(&img).unwrap();
    let sock = d.path().join("ro.sock");
    let daemon = Daemon::start(&sock, &img, &["--readonly"]).expect("daemon");
    let mut c = Client::connect(&sock, 1, true).expect("connect read-only");
    assert!(c.prop_bool("read-only"));
    let got = c.read(0, 1 << 20, 2 << 20).expect("read");
    assert_eq!(got, model[1 << 20..3 << 20]);
    drop(c);
    // The device says it is read-only (VIRTIO_BLK_F_RO): libblkio refuses
    // a read-write connection to it.
    let e = Client::connect(&sock, 1, false)
        .err()
        .expect("read-write connect");
    assert!(e.contains("read-only"), "{e}");
    let (st, log) = daemon.terminate();
    assert!(st.success(), "{log}");
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "read-only image changed"
    );
}

#[test]
fn reconnect_keeps_data() {
    let d = tempdir();
    let (img, mut model) = make_image(d.path(), "qcow2", false);
    let sock = d.path().join("re.sock");
    let daemon = Daemon::start(&sock, &img, &["--num-queues", "2"]).expect("daemon");
    for round in 0..3u64 {
        let mut c = Client::connect(&sock, 2, false).expect("connect");
        // What the previous client wrote is there.
        let got = c.read(0, 0, 4 << 20).expect("read");
        assert_eq!(got, model[..4 << 20], "round {round}");
        let data = vec![round as u8 + 1; 128 << 10];
        c.write(1, round * (128 << 10), &data).expect("write");
        model[(round * (128 << 10)) as usize..((round + 1) * (128 << 10)) as usize]
            .copy_from_slice(&data);
        // Disconnect without a flush: the daemon flushes on disconnect.
        drop(c);
    }
    finish_and_verify(daemon, &img, &model, d.path());
}

#[test]
fn second_writer_is_refused() {
    let d = tempdir();
    let (img, _) = make_image(d.path(), "qcow2", false);
    let daemon = Daemon::start(&d.path().join("a.sock"), &img, &[]).expect("daemon");
    let second = Daemon::start(&d.path().join("b.sock"), &img, &[]);
    let err = second.err().expect("second daemon must fail");
    assert!(err.contains("lock"), "unclear error: {err}");
    let o = run("qemu-io", &["-c", "write 0 4k", img.to_str().unwrap()]);
    assert!(!o.status.success(), "qemu-io wrote to an image in use");
    let (st, log) = daemon.terminate();
    assert!(st.success(), "{log}");
    assert_qemu_check_clean(&img);
}

#[test]
fn sigterm_under_load_exits_clean() {
    let d = tempdir();
    let (img, _) = make_image(d.path(), "qcow2", false);
    let sock = d.path().join("t.sock");
    let daemon = Daemon::start(&sock, &img, &["--num-queues", "2"]).expect("daemon");
    let (tx, rx) = std::sync::mpsc::channel();
    let s2 = sock.clone();
    let load = std::thread::spawn(move || {
        let mut c = Client::connect(&s2, 1, false).expect("connect");
        let mut rng = StdRng::seed_from_u64(99);
        let data = vec![0x77u8; 64 << 10];
        let mut n = 0u64;
        loop {
            let offs: Vec<u64> = (0..8)
                .map(|_| rng.random_range(0..SIZE / 4096) * 4096)
                .collect();
            let r = c.write_many(0, &offs, &data, 4096);
            if r.iter().any(|&x| x != 0) {
                return n;
            }
            n += 1;
            if n == 50 {
                tx.send(()).unwrap();
            }
            if n > 100_000 {
                return n;
            }
        }
    });
    rx.recv().expect("load started");
    let (st, log) = daemon.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    // The client may stay blocked on requests nobody will complete: it is
    // left behind (the test process ends with it).
    drop(load);
    assert_qemu_check_clean(&img);
}

/// SIGUSR1 prints the state of every queue and of the image's allocations
/// (for diagnosing a stuck guest) and the daemon, seccomp in kill mode,
/// goes on serving; SIGTERM still ends it cleanly.
#[test]
fn sigusr1_dumps_state_and_keeps_serving() {
    let d = tempdir();
    let (img, mut model) = make_image(d.path(), "qcow2", false);
    let sock = d.path().join("u.sock");
    let daemon = Daemon::start(&sock, &img, &["--num-queues", "2"]).expect("daemon");
    let mut c = Client::connect(&sock, 2, false).expect("connect");
    exercise(&mut c, 2, &mut model, 5, 40);
    daemon.signal(libc::SIGUSR1);
    assert!(
        daemon.wait_for_log("state dump end", std::time::Duration::from_secs(10)),
        "no state dump: {}",
        daemon.log()
    );
    let log = daemon.log();
    for needle in ["queue 0: ", "queue 1: ", "image: clusters being allocated"] {
        assert!(log.contains(needle), "dump lacks {needle:?}: {log}");
    }
    exercise(&mut c, 2, &mut model, 6, 40);
    drop(c);
    finish_and_verify(daemon, &img, &model, d.path());
}

/// Extended L2 entries through the daemon, deterministically: a cluster
/// whose data subclusters surround zero subclusters that still have the
/// old data under them (QEMU's write -z into an allocated cluster), and a
/// cluster with one data subcluster among unallocated ones over a backing
/// file. Reads spanning every kind must show zeros and the backing data,
/// never the host data under them; writes into zero and unallocated
/// subclusters and a NO_UNMAP write-zeroes then read back as the model.
#[test]
fn extended_l2_subcluster_kinds_read_and_write_as_qemu() {
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    let img = d.path().join("ext.qcow2");
    ok(
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "4M"]),
        "create base",
    );
    rimg_tests::qemu_io(&base, &["write -P 0xcc 0 512k"]);
    qemu_overlay(&img, "base.qcow2", &["cluster_size=65536,extended_l2=on"]);
    rimg_tests::qemu_io(
        &img,
        &[
            "write -P 0xaa 0 64k",
            "write -z 4k 8k",
            "write -P 0xbb 130k 2k",
            "write -z 200k 6k",
        ],
    );
    let mut model = rimg_tests::qemu_raw_content(&img, &d.path().join("q.raw"));
    assert_eq!(model[4096], 0, "qemu-io made no zero subclusters");
    let sock = d.path().join("ext.sock");
    let daemon = Daemon::start(&sock, &img, &["--num-queues", "2"]).expect("daemon");
    let mut c = Client::connect(&sock, 2, false).expect("connect");
    for (q, off, len) in [
        (0, 0, 512 << 10),
        (1, 2048, 20 << 10),
        (0, 129 << 10, 8 << 10),
    ] {
        let got = c.read(q, off, len).expect("read");
        assert_eq!(
            got,
            model[off as usize..off as usize + len],
            "read {off}+{len}"
        );
    }
    let mut put = |c: &mut Client, q: usize, off: u64, data: &[u8]| {
        c.write(q, off, data).expect("write");
        model[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    put(&mut c, 0, 4096 + 512, &[0x11; 512]);
    put(&mut c, 1, 128 << 10, &[0x22; 1536]);
    put(&mut c, 0, 200 << 10, &[0x33; 3000 / 512 * 512]);
    c.write_zeroes(1, 32 << 10, 16 << 10, false)
        .expect("write zeroes");
    model[32 << 10..48 << 10].fill(0);
    let got = c.read(0, 0, 512 << 10).expect("read back");
    assert!(
        got == model[..512 << 10],
        "read back differs from the model"
    );
    c.flush(0).expect("flush");
    drop(c);
    finish_and_verify(daemon, &img, &model, d.path());
}
