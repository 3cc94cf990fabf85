//! rimg-vmm reconnecting to a disk backend that went away
//! (`--disk socket=PATH,reconnect=SECS`), with the probe guest
//! (tests/guests/virtio_probe/blk_loop.rs) writing, reading back and
//! comparing 4 KiB rounds throughout: rimg-vhost-blk and
//! qemu-storage-daemon killed and started again while the guest waits
//! between rounds, and a backend that never comes back. And a NIC whose
//! rimg-vhost-net is killed and started again between the guest's
//! frame out and the test's frame in. The VMM runs with
//! its seccomp filter in kill mode, so reconnecting needs nothing the
//! filter does not allow.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rimg_tests::blk::Daemon;
use rimg_tests::control::ok;
use rimg_tests::net::{NetDaemon, Netns};
use rimg_tests::qsd::Qsd;
use rimg_tests::vmm::{
    frame_to_guest, guest_frame, packet_socket, probe_guest, send_frame, VmmProcess,
};
use rimg_tests::{assert_qemu_check_clean, qemu_create, qemu_raw_content, tempdir};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
const RESTARTS: u64 = 5;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The probe guest's `blk-loop` pattern (tests/guests/virtio_probe/blk.rs).
fn pattern(round: u64, i: u64) -> u8 {
    (i as u8) ^ ((i >> 8) as u8) ^ (round as u8).wrapping_mul(0x3b) ^ ((round >> 8) as u8) ^ 0xa5
}

struct Setup {
    _dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
    ctl: PathBuf,
}

fn setup() -> Setup {
    let d = tempdir();
    let img = d.path().join("disk.qcow2");
    qemu_create(&img, "", "64M");
    Setup {
        img,
        sock: d.path().join("blk.sock"),
        ctl: d.path().join("vmm.ctl"),
        _dir: d,
    }
}

/// The probe guest in `blk-loop` mode on the disk at `x.sock`, once its
/// rounds run.
fn loop_guest(x: &Setup, reconnect: u32) -> VmmProcess {
    let disk = format!("socket={},reconnect={reconnect}", s(&x.sock));
    let vmm = VmmProcess::spawn(&[
        "--kernel",
        s(probe_guest()),
        "--memory",
        "64M",
        "--disk",
        &disk,
        "--cmdline",
        "blk-loop",
        "--control",
        s(&x.ctl),
    ]);
    assert!(
        vmm.wait_for_console("blk-loop: running", T),
        "the guest never got to its rounds:\n{}",
        vmm.console_so_far()
    );
    vmm
}

fn device(ctl: &Path) -> Value {
    ok(ctl, "query-devices", json!({}))[0].clone()
}

/// Waits until query-devices reports `reconnects` reconnects and the
/// link up.
fn wait_reconnected(ctl: &Path, reconnects: u64) {
    let end = Instant::now() + T;
    loop {
        let d = device(ctl);
        if d["reconnects"] == reconnects && d["state"] == "up" {
            return;
        }
        assert!(Instant::now() < end, "no reconnect {reconnects}: {d}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ends the loop (`q`), then checks that the guest saw no error and no
/// reset, and that the VMM reconnected `restarts` times and never failed
/// the device. Returns the number of rounds.
fn finish(mut vmm: VmmProcess, restarts: u64) -> u64 {
    vmm.send_console(b"q");
    let r = vmm.finish(T);
    r.assert_clean_exit();
    for line in ["blk-loop: device status 0xf", "probe: PASS"] {
        assert!(r.console.contains(line), "missing {line:?}:\n{}", r.console);
    }
    let reconnected = r.stderr.matches(" reconnected (").count() as u64;
    assert_eq!(reconnected, restarts, "{}", r.stderr);
    assert!(!r.stderr.contains("marked failed"), "{}", r.stderr);
    let rounds = r
        .console
        .lines()
        .find_map(|l| l.strip_prefix("blk-loop: rounds verified 0x"))
        .and_then(|n| u64::from_str_radix(n.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no round count:\n{}", r.console));
    assert!(rounds > 0, "{}", r.console);
    rounds
}

/// The guest's last 64 rounds, each in its slot (sector 1024 + 8 *
/// (round % 64)).
fn assert_last_rounds(x: &Setup, rounds: u64) {
    let raw = qemu_raw_content(&x.img, &x.img.with_extension("raw"));
    let bad: Vec<u64> = (rounds.saturating_sub(63).max(1)..=rounds)
        .filter(|&round| {
            let at = ((1024 + (round % 64) * 8) * 512) as usize;
            (0..4096u64).any(|i| raw[at + i as usize] != pattern(round, i))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "of {rounds} rounds, these are not in the image: {bad:?}"
    );
}

/// The disk's backend, made by `start`, killed (SIGKILL, then waitpid:
/// dropped) and started again five times while the guest, between two
/// rounds, waits with its writes flushed: nothing is in flight, so the
/// backend needs no inflight region. The guest's next round goes to the
/// new backend, its notification waiting in the kick eventfd when it
/// comes before the VMM has reconnected (every other time). `stop` ends
/// the last backend.
fn restarts_while_the_guest_waits<B>(start: impl Fn(&Setup) -> B, stop: impl FnOnce(B)) {
    let x = setup();
    let mut backend = Some(start(&x));
    let mut vmm = loop_guest(&x, 10);
    let d = device(&x.ctl);
    assert_eq!((&d["state"], &d["reconnects"]), (&json!("up"), &json!(0)));
    for k in 1..=RESTARTS {
        vmm.send_console(b"w");
        assert!(
            vmm.wait_for_console(&format!("blk-loop: wait {k:#x}\n"), T),
            "{}",
            vmm.console_so_far()
        );
        drop(backend.take());
        rimg_tests::wait_unlocked(&x.img, T);
        backend = Some(start(&x));
        if k % 2 == 0 {
            wait_reconnected(&x.ctl, k);
        }
        vmm.send_console(b"c");
        wait_reconnected(&x.ctl, k);
        // Rounds on this backend.
        std::thread::sleep(Duration::from_millis(200));
    }
    let rounds = finish(vmm, RESTARTS);
    stop(backend.take().unwrap());
    assert_qemu_check_clean(&x.img);
    assert_last_rounds(&x, rounds);
}

#[test]
fn probe_guest_keeps_its_disk_across_rimg_vhost_blk_restarts() {
    restarts_while_the_guest_waits(
        |x| Daemon::start(&x.sock, &x.img, &[]).unwrap(),
        |d| {
            let (st, log) = d.terminate();
            assert!(st.success(), "rimg-vhost-blk: {log}");
        },
    );
}

/// The same with qemu-storage-daemon. Its vhost-user-blk export does not
/// offer INFLIGHT_SHMFD (only libvhost-user's defaults and CONFIG), so
/// the VMM keeps no inflight region for it.
#[test]
fn probe_guest_keeps_its_disk_across_qemu_storage_daemon_restarts() {
    restarts_while_the_guest_waits(
        |x| {
            let q = Qsd::start_blk(&x.img, &x.sock);
            if x.ctl.exists() {
                assert_eq!(device(&x.ctl)["inflight"], false);
            }
            q
        },
        |q| {
            let (st, log) = q.quit();
            assert!(st.success(), "qemu-storage-daemon: {log}");
        },
    );
}

/// `reconnect=2` and a backend that never comes back: the device stays
/// `reconnecting` (no NEEDS_RESET) for about 2 s, then fails as a
/// device without `reconnect` does at once; the guest's next round finds
/// NEEDS_RESET.
#[test]
fn a_backend_that_never_returns_fails_the_device_after_reconnect_secs() {
    let x = setup();
    let daemon = Daemon::start(&x.sock, &x.img, &[]).unwrap();
    let mut vmm = loop_guest(&x, 2);
    vmm.send_console(b"w");
    assert!(vmm.wait_for_console("blk-loop: wait 0x1\n", T));
    let gone = Instant::now();
    drop(daemon);
    let mut seen_reconnecting = false;
    let failed_after = loop {
        let d = device(&x.ctl);
        match d["state"].as_str() {
            Some("failed") => {
                assert_eq!(d["failed"], true, "{d}");
                break gone.elapsed();
            }
            Some("reconnecting") => {
                assert_eq!(d["failed"], false, "{d}");
                seen_reconnecting = true;
            }
            _ => {}
        }
        assert!(gone.elapsed() < T, "never failed: {d}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(seen_reconnecting);
    assert!(
        failed_after >= Duration::from_millis(1900) && failed_after < Duration::from_secs(5),
        "failed after {failed_after:?}"
    );
    vmm.send_console(b"c");
    let r = vmm.finish(T);
    assert_eq!(r.code, Some(0), "{}\n{}", r.console, r.stderr);
    assert!(
        r.stderr
            .contains("did not come back within 2 s; device marked failed"),
        "{}",
        r.stderr
    );
    // DRIVER_OK | FEATURES_OK | DRIVER | ACK with NEEDS_RESET (0x40).
    assert!(
        r.console.contains("blk-loop: device status 0x4f"),
        "{}",
        r.console
    );
    assert!(r.console.contains("probe: FAIL"), "{}", r.console);
}

/// rimg-vhost-net on a persistent TAP, killed (SIGKILL) and started again
/// after the guest's frame went out, while the guest waits with its
/// receive buffers posted: the VMM replays the rings from the guest's
/// used indexes, the new daemon finds the buffers, and the test's frame
/// reaches the guest.
#[test]
fn probe_guest_receives_a_frame_after_rimg_vhost_net_restarts() {
    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let ns = Netns::new("vmmre");
    // Persistent: it outlives the daemons (one queue pair, so no
    // multi_queue).
    ns.ip(&["tuntap", "add", "vr0", "mode", "tap", "vnet_hdr"]);
    ns.ip(&["link", "set", "vr0", "up"]);
    ns.command("sysctl")
        .args(["-qw", "net.ipv6.conf.vr0.disable_ipv6=1"])
        .status()
        .unwrap();
    let d = tempdir();
    let sock = d.path().join("net.sock");
    let ctl = d.path().join("vmm.ctl");
    let daemon = NetDaemon::start_in(&ns, &sock, &["--tap", "vr0"]).unwrap();
    let pkt = ns.run_in(|| packet_socket("vr0"));
    let net = format!("socket={},mac=52:54:00:12:34:56,reconnect=10", s(&sock));
    let vmm = VmmProcess::spawn(&[
        "--kernel",
        s(probe_guest()),
        "--memory",
        "64M",
        "--net",
        &net,
        "--control",
        s(&ctl),
    ]);
    let frame = guest_frame(&pkt, T);
    assert_eq!(&frame[14..25], b"RIMG-VMM-TX");
    drop(daemon);
    // The dead daemon's TAP queue is let go by its io_uring's teardown,
    // which may run after the process was reaped: EBUSY until then.
    let end = Instant::now() + T;
    let daemon = loop {
        match NetDaemon::start_in(&ns, &sock, &["--tap", "vr0"]) {
            Ok(d) => break d,
            Err(e) if e.contains("busy") && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    };
    wait_reconnected(&ctl, 1);
    assert_eq!(device(&ctl)["inflight"], false);
    send_frame(&pkt, &frame_to_guest(MAC));
    let r = vmm.finish(T);
    r.assert_clean_exit();
    for line in ["net: tx done", "net: rx payload RIMG-VMM-RX", "probe: PASS"] {
        assert!(r.console.contains(line), "missing {line:?}:\n{}", r.console);
    }
    assert!(r.stderr.contains(" reconnected (1)"), "{}", r.stderr);
    assert!(!r.stderr.contains("marked failed"), "{}", r.stderr);
    let (st, log) = daemon.terminate();
    assert!(st.success(), "rimg-vhost-net: {log}");
}
