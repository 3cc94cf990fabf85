//! A real Linux guest (QEMU TCG, virtio_net over vhost-user) behind
//! rimg-vhost-net: it pings the TAP side and moves 16 MiB each way over
//! TCP with matching sha256, and large segments cross unsegmented both
//! ways. Everything runs in a network namespace the test creates and
//! deletes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use rand::{RngCore, SeedableRng};
use rimg_tests::guest::Guest;
use rimg_tests::net::{pair_stats, NetDaemon, Netns};
use rimg_tests::tempdir;
use sha2::{Digest, Sha256};

const MAC: &str = "52:54:00:12:34:56";
const LEN: usize = 16 << 20;

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

const SCRIPT: &str = r#"
ip link set eth0 up
ip addr add 10.0.0.2/24 dev eth0
echo "eth0 queues: $(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
ping -c 3 -W 10 10.0.0.1
dd if=/dev/urandom of=/tmp/out bs=1M count=16 2>/dev/null
echo "out-sum $(sha256sum /tmp/out)"
# One flow per vCPU: each CPU transmits on its own queue pair (XPS) and
# the TAP steers each flow's replies to the queue it came from.
taskset 1 nc 10.0.0.1 5001 < /tmp/out
taskset 2 nc 10.0.0.1 5002 < /dev/null > /tmp/in
echo "in-sum $(sha256sum /tmp/in)"
echo GUEST-OK
"#;

#[test]
fn linux_guest_ping_and_tcp_both_ways() {
    guest_run(1);
}

/// Two queue pairs: the guest sees both, and each carries frames both
/// ways.
#[test]
fn linux_guest_two_queue_pairs() {
    let stats = guest_run(2);
    for p in 0..2 {
        let s = stats
            .iter()
            .find(|s| s.0 == p)
            .unwrap_or_else(|| panic!("no stats for pair {p}: {stats:?}"));
        assert!(s.1[0] > 0 && s.1[2] > 0, "pair {p} idle: {stats:?}");
    }
}

fn guest_run(pairs: u32) -> Vec<(usize, [u64; 4])> {
    let pairs_arg = pairs.to_string();
    let ns = Netns::new("ng");
    let dir = tempdir();
    let sock = dir.path().join("net.sock");
    let d = NetDaemon::start_in(
        &ns,
        &sock,
        &[
            "--tap-create",
            "rg0",
            "--mac",
            MAC,
            "--num-queue-pairs",
            &pairs_arg,
        ],
    )
    .unwrap();
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "rg0"]);

    let mut data = vec![0u8; LEN];
    rand::rngs::StdRng::seed_from_u64(42).fill_bytes(&mut data);
    let sent_sum = hex(&Sha256::digest(&data));
    // The TAP side: receive on 5001, send on 5002. Bound before the guest
    // starts, so its connections find them listening.
    let (l1, l2) = ns.run_in(|| {
        (
            TcpListener::bind("10.0.0.1:5001").unwrap(),
            TcpListener::bind("10.0.0.1:5002").unwrap(),
        )
    });
    let recv = std::thread::spawn(move || {
        let (mut s, _) = l1.accept().unwrap();
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v);
        (v.len(), hex(&Sha256::digest(&v)))
    });
    let send = std::thread::spawn(move || {
        let (mut s, _) = l2.accept().unwrap();
        let _ = s.write_all(&data);
    });

    let out = Guest::new(SCRIPT).vhost_user_net(&sock, pairs, MAC).run();
    // Whatever the guest did, unblock the accepts so the threads end.
    ns.run_in(|| {
        let _ = TcpStream::connect("10.0.0.1:5001");
        let _ = TcpStream::connect("10.0.0.1:5002");
    });
    let (got_len, got_sum) = recv.join().unwrap();
    send.join().unwrap();
    let tap_rx_bytes = ns.counter("rg0", "rx_bytes");
    let tap_rx_packets = ns.counter("rg0", "rx_packets");
    let (st, log) = d.terminate();
    println!("{}\n{log}", out.console);
    out.assert_success();
    assert!(st.success(), "daemon exit {st}: {log}");
    let c = &out.console;
    assert!(c.contains("3 packets received"), "ping failed:\n{c}");
    let queues: String = (0..pairs).map(|q| format!("rx-{q} ")).collect();
    assert!(
        c.contains(&queues),
        "guest does not see {pairs} queue pairs:\n{c}"
    );
    let sum_of = |tag: &str| rimg_tests::console_field(c, tag);
    assert_eq!(got_len, LEN, "TAP side received {got_len} bytes");
    assert_eq!(sum_of("out-sum "), got_sum, "guest->TAP data differs");
    assert_eq!(sum_of("in-sum "), sent_sum, "TAP->guest data differs");

    // Offloads: some of the guest's TCP frames crossed to the TAP as TSO
    // super-frames (GSO type set in their vnet header, larger than the
    // MTU), and the TAP handed GSO frames to the guest.
    let stats = pair_stats(&log);
    println!("pairs: {stats:?}, TAP rx {tap_rx_packets} frames / {tap_rx_bytes} bytes");
    assert!(tap_rx_bytes as usize > LEN, "TAP saw {tap_rx_bytes} bytes");
    let total = |i: usize| stats.iter().map(|s| s.1[i]).sum::<u64>();
    assert!(total(1) > 0, "no TSO frame from the guest: {stats:?}");
    assert!(total(3) > 0, "no GSO frame to the guest: {stats:?}");
    stats
}
