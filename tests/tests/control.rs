//! The daemons' control sockets (`--control`), driven as an operator's
//! tool would: malformed input, too many clients, the socket's owner-only
//! mode, statistics against what a libblkio frontend did, online resize
//! (refusals, and growth while two queues write), `quit`; every daemon
//! with seccomp in kill mode, its exit status asserted and the image
//! checked by qemu-img afterwards.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rimg_tests::blk::{Client, Daemon};
use rimg_tests::control::{error, execute, ok, try_request};
use rimg_tests::{assert_qemu_check_clean, qemu_create, qemu_img, tempdir};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn qcow2(dir: &Path, mib: u64) -> std::path::PathBuf {
    let img = dir.join("disk.qcow2");
    qemu_create(&img, "", &format!("{mib}M"));
    img
}

fn virtual_size(img: &Path) -> u64 {
    let o = qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

fn line(r: &mut BufReader<UnixStream>) -> String {
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    l
}

#[test]
fn blk_control_answers_bad_input_and_counts_what_the_frontend_did() {
    let dir = tempdir();
    let img = qcow2(dir.path(), 64);
    let sock = dir.path().join("blk.sock");
    let ctl = dir.path().join("ctl.sock");
    let d = Daemon::start(
        &sock,
        &img,
        &["--control", ctl.to_str().unwrap(), "--num-queues", "2"],
    )
    .unwrap();
    let meta = std::fs::metadata(&ctl).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // SAFETY: getuid has no preconditions.
    assert_eq!(meta.uid(), unsafe { libc::getuid() });

    let st = ok(&ctl, "query-status", json!({}));
    assert_eq!(
        (st["frontend"].clone(), st["connections"].clone()),
        (json!(false), json!(0))
    );

    // Bad input on one connection: each line answered, the connection
    // kept; an id comes back with its answer.
    let c = UnixStream::connect(&ctl).unwrap();
    let mut w = c.try_clone().unwrap();
    let mut r = BufReader::new(c);
    for (bad, want) in [
        ("\u{1}\u{2}garbage", "JSON parse error"),
        ("[1,2]", "Expected a JSON object"),
        (r#"{"arguments":{}}"#, "Expected 'execute'"),
        (
            r#"{"execute":"resize","arguments":5}"#,
            "'arguments' must be an object",
        ),
        (r#"{"execute":"no-such"}"#, "has not been found"),
        (r#"{"execute":"resize"}"#, "'size'"),
        (
            r#"{"execute":"resize","arguments":{"size":"big"}}"#,
            "'size'",
        ),
    ] {
        writeln!(w, "{bad}").unwrap();
        let a = line(&mut r);
        assert!(a.contains(want), "{bad}: {a}");
    }
    writeln!(w, r#"{{"execute":"query-status","id":"x1"}}"#).unwrap();
    let a: Value = serde_json::from_str(&line(&mut r)).unwrap();
    assert_eq!(a["id"], "x1");
    assert_eq!(a["return"]["status"], "running");

    // A line past the limit: an error, then the daemon closes.
    let mut long = UnixStream::connect(&ctl).unwrap();
    let _ = long.write_all(&vec![b' '; 70_000]);
    let _ = long.write_all(b"x\n");
    let mut got = String::new();
    let _ = long.read_to_string(&mut got);
    assert!(got.contains("longer than"), "{got}");

    // Eight clients at once are served (`w` is one); the ninth is told
    // and closed; once one leaves, a new one is served.
    let held: Vec<UnixStream> = (0..7).map(|_| UnixStream::connect(&ctl).unwrap()).collect();
    let mut ninth = UnixStream::connect(&ctl).unwrap();
    let mut got = String::new();
    ninth.read_to_string(&mut got).unwrap();
    assert!(got.contains("too many control clients"), "{got}");
    drop(held);
    drop(r);
    drop(w);
    // The daemon may not have seen them leave yet: a client turned away
    // meanwhile (told, or closed on before its request is written) tries
    // again.
    let served = rimg_tests::net::wait_for(Duration::from_secs(10), || {
        try_request(&ctl, r#"{"execute":"query-status"}"#).is_ok_and(|a| a.get("return").is_some())
    });
    assert!(served, "no client served after the others left");

    // What the frontend does is what query-stats counts.
    let mut cl = Client::connect(&sock, 2, false).unwrap();
    let st = ok(&ctl, "query-status", json!({}));
    assert_eq!(
        (st["frontend"].clone(), st["connections"].clone()),
        (json!(true), json!(1))
    );
    let before = ok(&ctl, "query-stats", json!({}));
    let data = vec![0x5au8; 8192];
    for i in 0..10u64 {
        cl.write(0, i * 65536, &data).unwrap();
    }
    for i in 0..7u64 {
        cl.read(1, i * 65536, 4096).unwrap();
    }
    cl.flush(1).unwrap();
    let after = ok(&ctl, "query-stats", json!({}));
    let diff = |q: usize, k: &str| {
        after["queues"][q][k].as_u64().unwrap() - before["queues"][q][k].as_u64().unwrap()
    };
    assert_eq!(
        (
            diff(0, "writes"),
            diff(0, "written-bytes"),
            diff(0, "reads")
        ),
        (10, 10 * 8192, 0),
        "{after}"
    );
    assert_eq!(
        (diff(1, "reads"), diff(1, "read-bytes"), diff(1, "flushes")),
        (7, 7 * 4096, 1),
        "{after}"
    );
    assert_eq!(diff(0, "failed") + diff(1, "failed"), 0, "{after}");
    let hist: u64 = after["queues"][0]["latency"]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert!(hist >= 10, "{after}");
    drop(cl);

    let a = execute(&ctl, "quit", json!({}));
    assert_eq!(a, json!({"return": {}}));
    let (st, log) = d.exit_within(Duration::from_secs(30));
    let st = st.unwrap_or_else(|| panic!("quit did not end the daemon: {log}"));
    assert!(st.success(), "daemon exit {st}: {log}");
    assert!(!ctl.exists() && !sock.exists(), "sockets left behind");
    assert_qemu_check_clean(&img);
}

#[test]
fn blk_resize_refusals() {
    let dir = tempdir();
    let img = qcow2(dir.path(), 64);
    let sock = dir.path().join("blk.sock");
    let ctl = dir.path().join("ctl.sock");
    let c = ctl.to_str().unwrap();
    let d = Daemon::start(&sock, &img, &["--control", c]).unwrap();
    let e = error(&ctl, "resize", json!({"size": 64 * MIB + 100}));
    assert!(e.contains("not a multiple of 512"), "{e}");
    let e = error(&ctl, "resize", json!({"size": 32 * MIB}));
    assert!(e.contains("only grows"), "{e}");
    let e = error(&ctl, "resize", json!({"size": -1}));
    assert!(e.contains("'size'"), "{e}");
    // Past what qcow2 can address with 64 KiB clusters: the engine's
    // refusal, and the disk unchanged.
    let e = error(&ctl, "resize", json!({"size": 1u64 << 62}));
    assert!(e.contains("resize"), "{e}");
    // Its own size: nothing to do, the frontend still told.
    let r = ok(&ctl, "resize", json!({"size": 64 * MIB}));
    assert_eq!(r["old-size"], 64 * MIB);
    let (st, log) = d.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    assert_eq!(virtual_size(&img), 64 * MIB);
    assert_qemu_check_clean(&img);

    let d = Daemon::start(&sock, &img, &["--control", c, "--readonly"]).unwrap();
    let e = error(&ctl, "resize", json!({"size": 128 * MIB}));
    assert!(e.contains("read-only"), "{e}");
    let (st, log) = d.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
}

/// Growth while a frontend writes and reads back on two queues (the
/// resize quiesces the engine's allocations, which those writes make):
/// nothing is lost, every resize lands, and a new connection sees the
/// final capacity and can use it.
#[test]
fn blk_grows_while_two_queues_write_qcow2() {
    let dir = tempdir();
    grows_while_two_queues_write(&qcow2(dir.path(), 64));
}

/// A raw file grows by truncation, which only the control thread may do.
#[test]
fn blk_grows_while_two_queues_write_raw() {
    let dir = tempdir();
    let img = dir.path().join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    grows_while_two_queues_write(&img);
}

fn grows_while_two_queues_write(img: &Path) {
    let dir = img.parent().unwrap();
    let img = img.to_path_buf();
    let sock = dir.join("blk.sock");
    let ctl = dir.join("ctl.sock");
    let d = Daemon::start(
        &sock,
        &img,
        &["--control", ctl.to_str().unwrap(), "--num-queues", "2"],
    )
    .unwrap();
    let mut cl = Client::connect(&sock, 2, false).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let io = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::Acquire) || round < 4 {
                for q in 0..2usize {
                    // Fresh clusters each round (allocations), spread over
                    // the old 64 MiB.
                    let off = ((round * 2 + q as u64) * 65536 * 7) % (64 * MIB - 65536);
                    let data = vec![(round as u8) ^ (q as u8 * 0x80); 65536];
                    cl.write(q, off, &data).unwrap();
                    assert_eq!(cl.read(q, off, 65536).unwrap(), data, "round {round}");
                }
                round += 1;
                done.store(round, Ordering::Release);
            }
            round
        })
    };
    let mut size = 64 * MIB;
    for i in 0..8 {
        // Each resize while the frontend is between rounds i and i + 1 or
        // later: interleaved with its writes, not before them all.
        let going = rimg_tests::net::wait_for(Duration::from_secs(30), || {
            done.load(Ordering::Acquire) >= i
        });
        assert!(going, "the frontend made no progress");
        size += 8 * MIB + 65536;
        let r = ok(&ctl, "resize", json!({ "size": size }));
        assert_eq!(r["size"], size);
        println!("resize to {size}: {r}");
    }
    stop.store(true, Ordering::Release);
    let rounds = io.join().unwrap();
    assert!(rounds >= 4);

    let mut cl = Client::connect(&sock, 2, false).unwrap();
    assert_eq!(cl.capacity(), size);
    let tail = vec![0xc3u8; 65536];
    cl.write(1, size - 65536, &tail).unwrap();
    assert_eq!(cl.read(0, size - 65536, 65536).unwrap(), tail);
    drop(cl);
    let (st, log) = d.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    assert!(!log.contains("seccomp"), "{log}");
    assert_eq!(virtual_size(&img), size);
    if img.extension().is_some_and(|e| e == "qcow2") {
        assert_qemu_check_clean(&img);
    }
}

/// `rimg resize` of an image a daemon serves asks that daemon (through
/// the link it published next to its control socket) instead of failing
/// on the image's lock; qemu-img resize's checks come first; a link in a
/// directory others could write, or one a killed daemon left, is not
/// followed.
#[test]
fn rimg_resize_asks_the_daemon_serving_the_image() {
    use std::process::Command;
    let dir = tempdir();
    let img = qcow2(dir.path(), 64);
    let sock = dir.path().join("blk.sock");
    let ctl = dir.path().join("ctl.sock");
    let run_dir = dir.path().join("run");
    let start = || {
        let mut cmd = Command::new(rimg_tests::workspace_bin("rimg-vhost-blk"));
        cmd.env("RIMG_RUNTIME_DIR", &run_dir)
            .arg("--socket")
            .arg(&sock)
            .arg("--image")
            .arg(&img)
            .arg("--control")
            .arg(&ctl);
        rimg_tests::daemon::DaemonProcess::spawn(cmd, &sock).unwrap()
    };
    let resize = |args: &[&str], size: &str| {
        let o = Command::new(rimg_tests::workspace_bin("rimg"))
            .env("RIMG_RUNTIME_DIR", &run_dir)
            .arg("resize")
            .args(args)
            .arg(&img)
            .arg(size)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let d = start();
    let mut cl = Client::connect(&sock, 1, false).unwrap();
    cl.write(0, 0, &[0x11; 4096]).unwrap();
    let (code, out, err) = resize(&[], "+64M");
    assert_eq!((code, out.as_str()), (Some(0), "Image resized.\n"), "{err}");
    let size = |ctl: &Path| {
        ok(ctl, "query-block", json!({}))["virtual-size"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(size(&ctl), 128 * MIB);
    // The connected frontend keeps working.
    cl.write(0, 4096, &[0x22; 4096]).unwrap();
    let (code, _, err) = resize(&[], "32M");
    assert_eq!(code, Some(1));
    assert!(err.contains("Use the --shrink option"), "{err}");
    let (code, _, err) = resize(&["--shrink"], "32M");
    assert_eq!(code, Some(1));
    assert!(
        err.contains("served by a running daemon") && err.contains("only grows"),
        "{err}"
    );
    let (code, _, err) = resize(&["--preallocation=full"], "+1M");
    assert_eq!(code, Some(1));
    assert!(err.contains("--preallocation"), "{err}");
    assert_eq!(size(&ctl), 128 * MIB);

    // A directory others could write: its links are not followed, so
    // the image's lock stands.
    let mode = |m| std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(m)).unwrap();
    mode(0o755);
    let (code, _, err) = resize(&[], "+1M");
    assert_eq!(code, Some(1));
    assert!(err.contains("lock"), "{err}");
    mode(0o700);
    drop(cl);
    let (st, log) = d.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    let links = || std::fs::read_dir(&run_dir).unwrap().count();
    assert_eq!(links(), 0, "link left behind");
    assert_eq!(virtual_size(&img), 128 * MIB);
    assert_qemu_check_clean(&img);

    // A daemon killed: its link stays but leads nowhere, and rimg resizes
    // the (now unlocked) image itself.
    let d = start();
    assert_eq!(links(), 1);
    d.signal(libc::SIGKILL);
    let (st, _) = d.exit_within(Duration::from_secs(10));
    assert!(st.is_some());
    let (code, _, err) = resize(&[], "+64M");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(virtual_size(&img), 192 * MIB);
    assert_qemu_check_clean(&img);
}

/// An image with an external data file grows through the control socket
/// too (its length is read with fstat under the filter), raw data file
/// or not.
#[test]
fn blk_resize_of_an_image_with_a_data_file() {
    for raw in ["off", "on"] {
        let dir = tempdir();
        let img = dir.path().join("disk.qcow2");
        let data = dir.path().join("disk.data");
        qemu_create(
            &img,
            &format!("data_file={},data_file_raw={raw}", data.display()),
            "64M",
        );
        let sock = dir.path().join("blk.sock");
        let ctl = dir.path().join("ctl.sock");
        let d = Daemon::start(&sock, &img, &["--control", ctl.to_str().unwrap()]).unwrap();
        let mut cl = Client::connect(&sock, 1, false).unwrap();
        cl.write(0, 0, &[0x42; 65536]).unwrap();
        let r = ok(&ctl, "resize", json!({ "size": 96 * MIB }));
        assert_eq!(r["size"], 96 * MIB);
        drop(cl);
        let mut cl = Client::connect(&sock, 1, false).unwrap();
        cl.write(0, 95 * MIB, &[0x43; 65536]).unwrap();
        assert_eq!(cl.read(0, 0, 65536).unwrap(), vec![0x42; 65536]);
        drop(cl);
        let (st, log) = d.terminate();
        assert!(st.success(), "data_file_raw={raw}: daemon exit {st}: {log}");
        assert_eq!(virtual_size(&img), 96 * MIB);
        assert_qemu_check_clean(&img);
    }
}

/// A daemon with a control socket closes its image when it ends, so its
/// persistent bitmaps are stored and not left in use (the control
/// threads held the image until process exit).
#[test]
fn blk_control_daemon_leaves_bitmaps_consistent() {
    for how in ["quit", "sigterm"] {
        let dir = tempdir();
        let img = qcow2(dir.path(), 64);
        let o = qemu_img(&["bitmap", "--add", img.to_str().unwrap(), "b0"]);
        assert!(o.status.success());
        let sock = dir.path().join("blk.sock");
        let ctl = dir.path().join("ctl.sock");
        let d = Daemon::start(&sock, &img, &["--control", ctl.to_str().unwrap()]).unwrap();
        let mut cl = Client::connect(&sock, 1, false).unwrap();
        cl.write(0, 0, &[1; 65536]).unwrap();
        // A control client still connected when the daemon ends.
        let _idle = UnixStream::connect(&ctl).unwrap();
        drop(cl);
        let (st, log) = match how {
            "quit" => {
                ok(&ctl, "quit", json!({}));
                d.exit_within(Duration::from_secs(30))
            }
            _ => d.terminate_within(Duration::from_secs(30)),
        };
        let st = st.unwrap_or_else(|| panic!("{how}: the daemon did not end: {log}"));
        assert!(st.success(), "{how}: daemon exit {st}: {log}");
        let o = qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let flags = &v["format-specific"]["data"]["bitmaps"][0]["flags"];
        assert_eq!(flags, &json!(["auto"]), "{how}: {v}");
        assert_qemu_check_clean(&img);
    }
}

/// A second daemon may not take a control socket another one answers
/// on; and `rimg resize` does not follow a stale link to a socket that
/// now serves another image.
#[test]
fn control_paths_are_not_taken_over() {
    use std::process::Command;
    let dir = tempdir();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    for p in [&a, &b] {
        qemu_create(p, "", "64M");
    }
    let ctl = dir.path().join("shared.ctl");
    let run_dir = dir.path().join("run");
    let start = |img: &Path, sock: &str| {
        let mut cmd = Command::new(rimg_tests::workspace_bin("rimg-vhost-blk"));
        cmd.env("RIMG_RUNTIME_DIR", &run_dir)
            .arg("--socket")
            .arg(dir.path().join(sock))
            .arg("--image")
            .arg(img)
            .arg("--control")
            .arg(&ctl);
        rimg_tests::daemon::DaemonProcess::spawn(cmd, &dir.path().join(sock))
    };
    let da = start(&a, "a.sock").unwrap();
    let e = start(&b, "b.sock")
        .err()
        .expect("a second daemon took the socket");
    assert!(e.contains("a running process listens there"), "{e}");
    // Daemon A dies without cleaning up; B then serves b on that path.
    da.signal(libc::SIGKILL);
    let (st, _) = da.exit_within(Duration::from_secs(10));
    assert!(st.is_some());
    let db = start(&b, "b.sock").unwrap();
    let o = Command::new(rimg_tests::workspace_bin("rimg"))
        .env("RIMG_RUNTIME_DIR", &run_dir)
        .args(["resize", a.to_str().unwrap(), "+64M"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("another image"), "{err}");
    assert_eq!(ok(&ctl, "query-block", json!({}))["virtual-size"], 64 * MIB);
    let (st, log) = db.terminate();
    assert!(st.success(), "{log}");
    assert_eq!(virtual_size(&a), 64 * MIB);
    assert_eq!(virtual_size(&b), 64 * MIB);
}

/// Persistent dirty bitmaps edited through the control socket while a
/// frontend writes (QMP's block-dirty-bitmap-* names), read back by
/// QEMU: exactly the writes made while each bitmap was enabled, at its
/// granularity.
#[test]
fn blk_bitmaps_edited_online_as_qemu_reads_them() {
    use rimg_tests::bitmaps::{bitmap, granular, qemu_bitmaps, qemu_dirty};
    let dir = tempdir();
    let img = qcow2(dir.path(), 64);
    let o = qemu_img(&["bitmap", "--add", img.to_str().unwrap(), "old"]);
    assert!(o.status.success());
    let sock = dir.path().join("blk.sock");
    let ctl = dir.path().join("ctl.sock");
    let d = Daemon::start(&sock, &img, &["--control", ctl.to_str().unwrap()]).unwrap();
    let mut cl = Client::connect(&sock, 1, false).unwrap();
    cl.write(0, 0, &[9; 4096]).unwrap();
    let add = |args: Value| ok(&ctl, "block-dirty-bitmap-add", args);
    add(json!({"name": "live", "granularity": 65536}));
    add(json!({"name": "off", "disabled": true}));
    let e = error(&ctl, "block-dirty-bitmap-add", json!({"name": "live"}));
    assert!(e.contains("already exists"), "{e}");
    let e = error(
        &ctl,
        "block-dirty-bitmap-add",
        json!({"name": "g", "granularity": 1000}),
    );
    assert!(e.contains("power of 2"), "{e}");
    let e = error(&ctl, "block-dirty-bitmap-remove", json!({"name": "nope"}));
    assert!(e.contains("not found"), "{e}");
    let e = error(&ctl, "block-dirty-bitmap-clear", json!({}));
    assert!(e.contains("'name'"), "{e}");
    cl.write(0, MIB, &[1; 4096]).unwrap();
    cl.write(0, 10 * MIB, &[2; 8192]).unwrap();
    ok(&ctl, "block-dirty-bitmap-disable", json!({"name": "live"}));
    cl.write(0, 20 * MIB, &[3; 4096]).unwrap();
    ok(&ctl, "block-dirty-bitmap-enable", json!({"name": "off"}));
    cl.write(0, 30 * MIB, &[4; 4096]).unwrap();
    drop(cl);
    let (st, log) = d.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    assert_qemu_check_clean(&img);
    let mut got = qemu_bitmaps(&img);
    got.sort();
    assert_eq!(
        got,
        vec![
            bitmap("live", &[]),
            bitmap("off", &["auto"]),
            bitmap("old", &["auto"]),
        ]
    );
    assert_eq!(
        qemu_dirty(&img, "live"),
        granular(&[(MIB, 4096), (10 * MIB, 8192)], 65536)
    );
    assert_eq!(
        qemu_dirty(&img, "off"),
        granular(&[(30 * MIB, 4096)], 65536)
    );
    assert_eq!(
        qemu_dirty(&img, "old"),
        granular(
            &[
                (0, 4096),
                (MIB, 4096),
                (10 * MIB, 8192),
                (20 * MIB, 4096),
                (30 * MIB, 4096)
            ],
            65536
        )
    );
}

/// `checksum` of a served disk follows the guest's writes and is what
/// `rimg checksum` gives for the file once the daemon has let it go.
#[test]
fn blk_checksum_of_a_served_disk_is_rimg_checksum_of_the_file() {
    let dir = tempdir();
    let img = qcow2(dir.path(), 64);
    let sock = dir.path().join("blk.sock");
    let ctl = dir.path().join("ctl.sock");
    let d = Daemon::start(
        &sock,
        &img,
        &["--control", ctl.to_str().unwrap(), "--num-queues", "2"],
    )
    .unwrap();
    let mut cl = Client::connect(&sock, 2, false).unwrap();
    let empty = ok(&ctl, "checksum", json!({}));
    assert_eq!(empty["size"], json!(64 * MIB), "{empty}");
    // Pieces across blocks and clusters, from both queues.
    for i in 0..8u64 {
        let piece = vec![i as u8 + 1; 65536 + 512];
        cl.write((i % 2) as usize, i * 7 * MIB + i * 4096, &piece)
            .unwrap();
    }
    cl.flush(0).unwrap();
    cl.flush(1).unwrap();
    let served = ok(&ctl, "checksum", json!({}));
    assert_ne!(served["checksum"], empty["checksum"]);
    drop(cl);
    assert_eq!(execute(&ctl, "quit", json!({})), json!({"return": {}}));
    let (st, log) = d.exit_within(Duration::from_secs(30));
    let st = st.unwrap_or_else(|| panic!("quit did not end the daemon: {log}"));
    assert!(st.success(), "daemon exit {st}: {log}");
    assert_qemu_check_clean(&img);
    let file = |p: &Path| {
        let out = rimg_tests::ok(rimg_tests::rimg(&["checksum", p.to_str().unwrap()]));
        json!(out[..64])
    };
    assert_eq!(served["checksum"], file(&img));
    let fresh = dir.path().join("fresh.qcow2");
    qemu_create(&fresh, "", "64M");
    assert_eq!(empty["checksum"], file(&fresh));
}

/// A checksum of an exabyte disk runs for days: one at a time, and
/// SIGTERM cancels it instead of waiting for it.
#[test]
fn blk_checksum_runs_once_and_sigterm_cancels_it() {
    let dir = tempdir();
    let img = dir.path().join("huge.qcow2");
    qemu_create(&img, "cluster_size=2M", "2E");
    let sock = dir.path().join("blk.sock");
    let ctl = dir.path().join("ctl.sock");
    let d = Daemon::start(&sock, &img, &["--control", ctl.to_str().unwrap()]).unwrap();
    // Two ask at once: whichever runs, the other is refused while it
    // does (so it is known to run).
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..2 {
        let mut c = UnixStream::connect(&ctl).unwrap();
        c.write_all(b"{\"execute\": \"checksum\"}\n").unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut answer = String::new();
            let _ = BufReader::new(&c).read_line(&mut answer);
            let _ = tx.send(answer);
        });
    }
    let refused = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(refused.contains("running already"), "{refused}");
    let (st, log) = d.terminate_within(Duration::from_secs(30));
    let st = st.unwrap_or_else(|| panic!("SIGTERM waited for the checksum: {log}"));
    assert!(st.success(), "daemon exit {st}: {log}");
    let answer = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(!answer.contains("\"return\""), "{answer}");
}
