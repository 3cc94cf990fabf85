//! rimg-vhost-net killed and restarted under a running guest: a real
//! Linux guest (QEMU TCG, virtio_net over vhost-user with two queue
//! pairs, the chardev reconnecting) moves data both ways over TCP while
//! the test SIGKILLs the daemon (seccomp in kill mode, as it runs in
//! production) and starts a new one on the same persistent TAP, 10 times.
//! The transfers complete with matching sha256, and the guest's driver
//! never sees a broken ring: the daemon returns TX chains in avail order
//! and each receive frame's buffers with one store of the used index, so
//! QEMU's restart at the guest's used index loses and repeats nothing
//! (see vhost-net/src/worker/order.rs). Everything runs in a network
//! namespace the test creates and deletes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use rimg_tests::guest::Guest;
use rimg_tests::net::{NetDaemon, Netns};
use rimg_tests::tempdir;
use sha2::{Digest, Sha256};

const MAC: &str = "52:54:00:12:34:57";
/// Bytes each way.
const LEN: usize = 24 << 20;
const RESTARTS: u64 = 10;
/// How long the transfers may take to move the next step's bytes.
const STEP_DEADLINE: Duration = Duration::from_secs(90);

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

const SCRIPT: &str = r#"
ip link set eth0 up
ip addr add 10.0.0.2/24 dev eth0
ping -c 2 -W 10 10.0.0.1
dd if=/dev/urandom of=/tmp/out bs=1M count=24 2>/dev/null
echo "out-sum $(sha256sum /tmp/out)"
taskset 1 nc 10.0.0.1 5001 < /tmp/out
taskset 2 nc 10.0.0.1 5002 < /dev/null > /tmp/in
echo "in-sum $(sha256sum /tmp/in)"
echo GUEST-OK
"#;

/// A TCP stream's bytes counted as they pass.
#[derive(Default)]
struct Progress(AtomicU64);

impl Progress {
    fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[test]
fn tcp_both_ways_survives_ten_daemon_kills() {
    let ns = Netns::new("nr");
    let dir = tempdir();
    let sock = dir.path().join("net.sock");
    // A persistent TAP: it outlives each daemon, and the host's address
    // with it.
    ns.ip(&[
        "tuntap",
        "add",
        "dev",
        "rr0",
        "mode",
        "tap",
        "multi_queue",
        "vnet_hdr",
    ]);
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "rr0"]);
    ns.ip(&["link", "set", "rr0", "up"]);
    let args = ["--tap", "rr0", "--mac", MAC, "--num-queue-pairs", "2"];
    let mut daemon = NetDaemon::start_in(&ns, &sock, &args).unwrap();

    let mut data = vec![0u8; LEN];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut data);
    let sent_sum = hex(&Sha256::digest(&data));
    let (l1, l2) = ns.run_in(|| {
        (
            TcpListener::bind("10.0.0.1:5001").unwrap(),
            TcpListener::bind("10.0.0.1:5002").unwrap(),
        )
    });
    let progress = Arc::new(Progress::default());
    let p = progress.clone();
    let recv = std::thread::spawn(move || {
        let (mut s, _) = l1.accept().unwrap();
        let mut v = Vec::with_capacity(LEN);
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    v.extend_from_slice(&buf[..n]);
                    p.add(n);
                }
            }
        }
        (v.len(), hex(&Sha256::digest(&v)))
    });
    let p = progress.clone();
    let send = std::thread::spawn(move || {
        let (mut s, _) = l2.accept().unwrap();
        for chunk in data.chunks(256 << 10) {
            if s.write_all(chunk).is_err() {
                break;
            }
            p.add(chunk.len());
        }
    });

    let sock_arg = sock.display().to_string();
    let guest = std::thread::spawn(move || {
        Guest::new(SCRIPT)
            .qemu_args([
                "-chardev".to_string(),
                format!("socket,id=n0c,path={sock_arg},reconnect=1"),
                "-netdev".to_string(),
                "vhost-user,id=n0,chardev=n0c,queues=2".to_string(),
                "-device".to_string(),
                format!("virtio-net-pci,netdev=n0,mac={MAC},vectors=0,romfile=,mq=on"),
            ])
            .module("virtio_pci")
            .module("virtio_net")
            .cpus(2)
            .timeout(Duration::from_secs(420))
            .run()
    });

    // Kill after every 1/12 of the two transfers, so the restarts fall
    // while data moves both ways; each is checked to have been a kill
    // (the daemon was alive: no seccomp death or crash before it).
    let total = 2 * LEN as u64;
    let mut logs = String::new();
    let mut kills = Vec::new();
    for r in 1..=RESTARTS {
        let want = total * r / (RESTARTS + 2);
        let t = Instant::now();
        while progress.get() < want {
            if t.elapsed() > STEP_DEADLINE || guest.is_finished() {
                daemon.signal(libc::SIGUSR1);
                daemon.wait_for_log("state dump end", Duration::from_secs(2));
                panic!(
                    "restart {r}: the transfers stalled at {} of {total} bytes \
                     (wanted {want}); daemon log:\n{logs}{}",
                    progress.get(),
                    daemon.log()
                );
            }
            // Polls a counter the transfer threads move (no event to
            // wait on that would not slow the copy).
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!daemon.exited(), "restart {r}: the daemon died by itself");
        let (st, log) = daemon.kill();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL), "restart {r}: {st}\n{log}");
        logs.push_str(&log);
        kills.push(progress.get());
        daemon = NetDaemon::start_in(&ns, &sock, &args)
            .unwrap_or_else(|e| panic!("restart {r}: {e}\nlogs:\n{logs}"));
    }

    let out = guest.join().unwrap();
    // Whatever the guest did, unblock the accepts so the threads end.
    ns.run_in(|| {
        let _ = TcpStream::connect("10.0.0.1:5001");
        let _ = TcpStream::connect("10.0.0.1:5002");
    });
    let (got_len, got_sum) = recv.join().unwrap();
    send.join().unwrap();
    let (st, log) = daemon.terminate();
    logs.push_str(&log);
    println!(
        "{}\nkills at {kills:?} of {total} bytes\n{logs}",
        out.console
    );
    out.assert_success();
    assert!(st.success(), "last daemon exit {st}");
    let c = &out.console;
    // virtio_ring's complaints (BAD_RING) about a used entry naming a
    // chain that was not outstanding.
    for bad in ["is not a head", "out of range"] {
        assert!(!c.contains(bad), "guest driver saw {bad:?}:\n{c}");
    }
    let sum_of = |tag: &str| rimg_tests::console_field(c, tag);
    assert_eq!(got_len, LEN, "TAP side received {got_len} bytes");
    assert_eq!(sum_of("out-sum "), got_sum, "guest->TAP data differs");
    assert_eq!(sum_of("in-sum "), sent_sum, "TAP->guest data differs");
    assert_eq!(kills.len() as u64, RESTARTS);
    assert!(
        kills.iter().all(|&k| k < total),
        "a kill came after the transfers: {kills:?}"
    );
}
