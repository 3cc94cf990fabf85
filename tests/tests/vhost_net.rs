//! rimg-vhost-net against DPDK's testpmd (virtio-user port: a real
//! vhost-user-net frontend, no VM), inside network namespaces the tests
//! create and delete.

use std::net::UdpSocket;
use std::time::Duration;

use rimg_tests::net::{pair_stats, wait_for, NetDaemon, Netns, Testpmd};
use rimg_tests::tempdir;

const MAC: &str = "52:54:00:aa:bb:01";

fn virtio_user(sock: &std::path::Path, queues: u32) -> String {
    format!("virtio_user0,path={},queues={queues}", sock.display())
}

/// testpmd txonly of `size`-byte frames -> daemon -> TAP: every frame
/// testpmd sent is counted on the TAP, none dropped.
fn txonly_round(ns: &Netns, sock: &std::path::Path, tap: &str, prefix: &str, size: u32) -> u64 {
    let before = ns.counter(tap, "rx_packets");
    let bytes_before = ns.counter(tap, "rx_bytes");
    let vdev = virtio_user(sock, 1);
    let txpkts = format!("--txpkts={size}");
    let pmd = Testpmd::start(
        ns,
        prefix,
        &["--vdev", &vdev],
        &[
            "--forward-mode=txonly",
            "--total-num-mbufs=4096",
            &txpkts,
            "-a",
        ],
    );
    assert!(
        pmd.wait_started(Duration::from_secs(60)),
        "testpmd did not start"
    );
    assert!(
        wait_for(Duration::from_secs(60), || ns.counter(tap, "rx_packets")
            >= before + 50_000),
        "frames did not reach the TAP"
    );
    let (st, out) = pmd.stop();
    assert!(st.tx > 0, "{out}");
    // testpmd counts frames it put in the ring; those the device had not
    // taken when testpmd stopped it (at most one ring) are never sent.
    let got = ns.counter(tap, "rx_packets") - before;
    assert!(
        got <= st.tx && st.tx - got <= 256,
        "testpmd sent {} frames, TAP received {got}",
        st.tx
    );
    let bytes = ns.counter(tap, "rx_bytes") - bytes_before;
    assert_eq!(bytes, got * u64::from(size), "frames of {size} bytes");
    got
}

#[test]
fn testpmd_txonly_frames_reach_tap_and_reconnect() {
    let ns = Netns::new("ntx");
    let dir = tempdir();
    let sock = dir.path().join("net.sock");
    let ctl = dir.path().join("ctl.sock");
    let c = ctl.to_str().unwrap();
    let d = NetDaemon::start_in(
        &ns,
        &sock,
        &["--tap-create", "rt0", "--mac", MAC, "--control", c],
    )
    .unwrap();
    // Two frontends one after the other on the same daemon and TAP; small
    // frames (copied) then large ones (written from guest memory).
    let a = txonly_round(&ns, &sock, "rt0", "ntx1", 64);
    let b = txonly_round(&ns, &sock, "rt0", "ntx2", 1500);
    // The control socket counts both connections' frames.
    let s = rimg_tests::control::ok(&ctl, "query-stats", serde_json::json!({}));
    assert_eq!(s["pairs"][0]["tx-frames"], a + b, "{s}");
    assert_eq!(s["pairs"][0]["tx-dropped"], 0, "{s}");
    let st = rimg_tests::control::ok(&ctl, "query-status", serde_json::json!({}));
    assert_eq!(st["connections"], 2, "{st}");
    let (st, log) = d.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    let stats = pair_stats(&log);
    assert_eq!(stats.len(), 2, "{log}");
    assert_eq!(stats[0].1[0], a, "{log}");
    assert_eq!(stats[1].1[0], b, "{log}");
    assert!(!log.contains("dropping"), "{log}");
}

#[test]
fn tap_frames_reach_testpmd_rxonly() {
    let ns = Netns::new("nrx");
    let dir = tempdir();
    let sock = dir.path().join("net.sock");
    // No IPv6 on the TAP from its creation on: the kernel's own neighbour
    // discovery frames would make the counts below inexact.
    let o = ns
        .command("sysctl")
        .args(["-qw", "net.ipv6.conf.default.disable_ipv6=1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let d = NetDaemon::start_in(&ns, &sock, &["--tap-create", "rr0", "--mac", MAC]).unwrap();
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "rr0"]);
    ns.ip(&["neigh", "add", "10.77.0.2", "lladdr", MAC, "dev", "rr0"]);
    let vdev = virtio_user(&sock, 1);
    // --no-flush-rx: testpmd counts every frame it reads in its
    // forwarding statistics (without it, frames read by the flush before
    // forwarding starts would be in its port counter, read live below,
    // but not in the statistics it prints at exit).
    let pmd = Testpmd::start(
        &ns,
        "nrx",
        &["--vdev", &vdev],
        &[
            "--forward-mode=rxonly",
            "--total-num-mbufs=4096",
            "--no-flush-rx",
            "-a",
        ],
    );
    assert!(
        pmd.wait_started(Duration::from_secs(60)),
        "testpmd did not start"
    );
    let taken = || ns.counter("rr0", "tx_packets");
    let dropped = || ns.counter("rr0", "tx_dropped");
    let received = || pmd.port_stat(0, "ipackets");
    assert_eq!(taken(), 0, "the kernel sent frames of its own on the TAP");
    // N datagrams through the kernel to the TAP, at most WINDOW ahead of
    // what the daemon has taken from it: the TAP's queue (1000 frames)
    // never overflows however slowly a loaded machine runs the daemon or
    // testpmd, so nothing may be dropped.
    const N: u64 = 3000;
    const BATCH: u64 = 100;
    const WINDOW: u64 = 400;
    let s = ns.run_in(|| UdpSocket::bind("10.77.0.1:0").expect("bind"));
    let payload = [0x5au8; 1000];
    let mut sent = 0;
    while sent < N {
        assert!(
            wait_for(Duration::from_secs(60), || taken() + dropped() + WINDOW
                >= sent + BATCH),
            "the daemon stopped taking frames from the TAP ({} of {sent})",
            taken()
        );
        for _ in 0..BATCH {
            s.send_to(&payload, "10.77.0.2:9").expect("send");
        }
        sent += BATCH;
    }
    assert!(
        wait_for(Duration::from_secs(60), || taken() + dropped() >= N),
        "the daemon took only {} of {N} frames from the TAP",
        taken()
    );
    assert_eq!(dropped(), 0, "the TAP dropped frames");
    // Everything the daemon took reaches testpmd: wait until testpmd has
    // counted it (frames still in the ring when it stops would not be),
    // then stop it and compare exact counts.
    assert!(
        wait_for(Duration::from_secs(60), || received() == Some(taken())),
        "testpmd received {:?} of {} frames",
        received(),
        taken()
    );
    let (st, out) = pmd.stop();
    assert_eq!(st.rx, taken(), "{out}");
    assert_eq!(st.rx, N, "{out}");
    let (es, log) = d.terminate();
    assert!(es.success(), "{log}");
    let stats = pair_stats(&log);
    assert_eq!(stats.len(), 1, "{log}");
    assert_eq!(stats[0].1[2], st.rx, "{log}");
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let ns = Netns::new("nbad");
    let dir = tempdir();
    let sock = dir.path().join("net.sock");
    let e = NetDaemon::start_in(&ns, &sock, &["--tap", "nosuchtap0"])
        .err()
        .unwrap();
    assert!(e.contains("does not exist"), "{e}");
    let e = NetDaemon::start_in(
        &ns,
        &sock,
        &["--tap-create", "x0", "--mac", "01:02:03:04:05:06"],
    )
    .err()
    .unwrap();
    assert!(e.contains("multicast"), "{e}");
    let e = NetDaemon::start_in(
        &ns,
        &sock,
        &["--tap-create", "x0", "--num-queue-pairs", "0"],
    )
    .err()
    .unwrap();
    assert!(e.contains("num-queue-pairs"), "{e}");
    let e = NetDaemon::start_in(&ns, &sock, &[]).err().unwrap();
    assert!(e.contains("--tap"), "{e}");
    for line in e.lines().chain(std::iter::once("")) {
        assert!(!line.contains("panicked"), "{e}");
    }
}

/// `--user nobody` on an existing two-pair TAP of root's: the daemon
/// attaches its queues as root (TUNSETIFF, refused to nobody on a TAP
/// owned by root), then runs as nobody; testpmd's frames on both pairs
/// reach the TAP, across nobody's TUNSETOFFLOAD at connection.
#[test]
fn runs_as_a_user_on_a_multi_queue_tap() {
    let (uid, gid) = rimg_tests::daemon::account_ids("nobody");
    let ns = Netns::new("nusr");
    ns.ip(&[
        "tuntap",
        "add",
        "mode",
        "tap",
        "multi_queue",
        "name",
        "ru0",
        "user",
        "0",
        "group",
        "0",
    ]);
    ns.ip(&["link", "set", "ru0", "up"]);
    let dir = tempdir();
    let sock = dir.path().join("net.sock");
    let d = NetDaemon::start_in(
        &ns,
        &sock,
        &[
            "--tap",
            "ru0",
            "--mac",
            MAC,
            "--num-queue-pairs",
            "2",
            "--user",
            "nobody",
        ],
    )
    .unwrap();
    rimg_tests::daemon::assert_runs_as(d.pid(), uid, gid);
    let vdev = virtio_user(&sock, 2);
    let pmd = Testpmd::start(
        &ns,
        "nusr",
        &["--vdev", &vdev],
        &[
            "--forward-mode=txonly",
            "--total-num-mbufs=8192",
            "--txq=2",
            "--rxq=2",
            "-a",
        ],
    );
    assert!(
        pmd.wait_started(Duration::from_secs(60)),
        "testpmd did not start"
    );
    assert!(
        wait_for(Duration::from_secs(60), || ns.counter("ru0", "rx_packets")
            >= 50_000),
        "frames did not reach the TAP"
    );
    let (st, out) = pmd.stop();
    assert!(st.tx > 0, "{out}");
    let (es, log) = d.terminate();
    assert!(es.success(), "{log}");
    let pairs: Vec<usize> = pair_stats(&log).iter().map(|p| p.0).collect();
    assert!(
        pairs.contains(&0) && pairs.contains(&1),
        "both pairs sent: {log}"
    );
}
