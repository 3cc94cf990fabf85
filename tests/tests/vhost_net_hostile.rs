//! A hostile vhost-user-net driver: TX and RX chains with loops, bad next
//! indexes, addresses outside guest memory, zero-length and oversized
//! buffers, wrong directions, headers shorter than the virtio-net header
//! and avail indexes far ahead of the device, written by hand into split
//! rings in shared memory (tests/src/rings.rs). Each bad chain must be
//! returned (used length 0) and logged, its frame dropped; valid frames
//! before and after must cross both ways intact; the daemon must exit
//! cleanly on SIGTERM. A used ring the daemon cannot write to fails
//! every return of a chain: logged, but at most the warning cap per pair
//! and connection. Frames only cross a TAP inside a network namespace
//! the test creates: a packet socket on the TAP plays the host side.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rimg_tests::net::{pair_stats, NetDaemon, Netns, PacketSocket};
use rimg_tests::rings::{Desc, Driver, DATA, F_INDIRECT, F_NEXT, F_WRITE};
use rimg_tests::tempdir;
use rimg_vhost_server::warn::MAX_WARNINGS;
use vhost::vhost_user::VhostUserFrontend;

const MEM: usize = 16 << 20;
const QS: u16 = 16;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01];
const MAC_ARG: &str = "52:54:00:ab:cd:01";
/// IEEE 802 local experimental EtherType: nothing in the namespace
/// answers it.
const ETHERTYPE: u16 = 0x88b5;
const HDR: usize = 12;
const TX_BUF: u64 = DATA;
const RX_BUF: u64 = DATA + 0x10000;
const TABLE: u64 = DATA + 0x20000;
const BIG: u64 = DATA + 0x40000;
const WAIT: Duration = Duration::from_secs(10);

const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const INDIRECT_DESC: u64 = 1 << 28;

/// An Ethernet frame of `len` bytes marked with `tag`.
fn frame(dst: [u8; 6], src: [u8; 6], tag: u8, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.resize(len, tag);
    f
}

/// A frame from the guest.
fn guest_frame(tag: u8) -> Vec<u8> {
    frame([0x02, 0, 0, 0, 0, 2], MAC, tag, 64)
}

/// A frame to the guest.
fn host_frame(tag: u8) -> Vec<u8> {
    frame(MAC, [0x02, 0, 0, 0, 0, 2], tag, 80)
}

/// A namespace with a TAP made for the daemon to attach to: no IPv6, so
/// the kernel sends nothing on it by itself.
fn netns_with_tap(tag: &str, tap: &str, multi_queue: bool) -> Netns {
    let ns = Netns::new(tag);
    let mut add = vec!["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"];
    if multi_queue {
        add.push("multi_queue");
    }
    ns.ip(&add);
    let key = format!("net.ipv6.conf.{tap}.disable_ipv6=1");
    let o = ns.command("sysctl").args(["-qw", &key]).output().unwrap();
    assert!(o.status.success(), "{o:?}");
    ns.ip(&["link", "set", tap, "up"]);
    ns
}

fn connect(sock: &Path, pairs: usize) -> Driver {
    // No EVENT_IDX and no MRG_RXBUF: every used entry signals, and a frame
    // must fit one receive chain.
    Driver::connect(sock, MEM, 2 * pairs, QS, |f| {
        f & (VERSION_1 | PROTOCOL_FEATURES | INDIRECT_DESC)
    })
}

/// Writes vnet header + `f` at TX_BUF (header zero: no offloads).
fn put_tx(r: &Driver, f: &[u8]) {
    r.shm.write(TX_BUF, &[0u8; HDR]);
    r.shm.write(TX_BUF + HDR as u64, f);
}

#[test]
fn hostile_chains_are_dropped_and_valid_frames_still_cross() {
    let ns = netns_with_tap("nh", "rh0", false);
    let dir = tempdir();
    let sock = dir.path().join("net.sock");
    let d = NetDaemon::start_in(&ns, &sock, &["--tap", "rh0", "--mac", MAC_ARG]).unwrap();
    let pk = PacketSocket::open(&ns, "rh0");
    let mut r = connect(&sock, 1);
    let (rxq, txq) = (0, 1);
    let pkt_len = (HDR + 64) as u32;

    // ----- TX: guest -> TAP -----
    let mut tx_sent = Vec::new();
    let a = guest_frame(0xa1);
    put_tx(&r, &a);
    assert_eq!(r.submit(txq, &[(TX_BUF, pkt_len, 0)]), 0);
    assert_eq!(
        pk.recv(ETHERTYPE, WAIT).as_ref(),
        Some(&a),
        "valid TX frame"
    );
    tx_sent.push(a);

    // Each case: (name, chain written at entries 0.., or None when the
    // case writes its own descriptors, what the log must say).
    let bad = guest_frame(0xee);
    put_tx(&r, &bad);
    let b = TX_BUF;
    let tx_cases: Vec<(&str, Vec<Desc>, &'static str)> = vec![
        (
            "outside memory",
            vec![(1 << 40, pkt_len, 0)],
            "address outside guest memory",
        ),
        (
            "straddling the end of memory",
            vec![(MEM as u64 - 40, pkt_len, 0)],
            "address outside guest memory",
        ),
        (
            "4 GiB descriptor",
            vec![(b, u32::MAX, 0)],
            "address outside guest memory",
        ),
        (
            "frame over 64 KiB",
            vec![(BIG, (HDR + 70000) as u32, 0)],
            "frame larger than 64 KiB",
        ),
        (
            "device-writable descriptor",
            vec![(b, HDR as u32, 0), (b + HDR as u64, 64, F_WRITE)],
            "device-writable descriptor in a TX chain",
        ),
        (
            "zero-length buffer",
            vec![(b, 0, 0)],
            "chain shorter than the vnet header",
        ),
        (
            "short header",
            vec![(b, 8, 0)],
            "chain shorter than the vnet header",
        ),
        (
            "header without a frame",
            vec![(b, HDR as u32, 0)],
            "frame shorter than an Ethernet header",
        ),
        (
            "indirect table outside memory",
            vec![(1 << 40, 32, F_INDIRECT)],
            "empty descriptor chain",
        ),
    ];
    let loops = "loops, is longer than the queue or has a bad next index";
    // How often each reason must be in the log by now.
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut logged = |why: &'static str| {
        let n = seen.entry(why).or_default();
        *n += 1;
        assert!(
            d.wait_for_log_count(why, *n, WAIT),
            "'{why}' not logged {n} times:\n{}",
            d.log()
        );
    };
    let mut tx_dropped = 0;
    for (name, descs, why) in &tx_cases {
        assert_eq!(r.submit(txq, descs), 0, "TX {name}: used length");
        logged(why);
        tx_dropped += 1;
    }
    // Chains the driver writes descriptor by descriptor.
    // A descriptor pointing at itself.
    r.write_desc(txq, 0, (b, pkt_len, F_NEXT), 0);
    assert_eq!(r.submit_head(txq, 0), 0, "TX self loop");
    logged(loops);
    // A chain through every entry and on to the first again: longer than
    // the queue.
    for i in 0..QS {
        r.write_desc(txq, i, (b, 8, F_NEXT), (i + 1) % QS);
    }
    assert_eq!(r.submit_head(txq, 0), 0, "TX chain longer than the queue");
    logged(loops);
    // A next index past the table.
    r.write_desc(txq, 0, (b, HDR as u32, F_NEXT), 200);
    assert_eq!(r.submit_head(txq, 0), 0, "TX next index past the table");
    logged(loops);
    // A loop inside an indirect table.
    r.write_desc_at(TABLE, 0, (b, HDR as u32, F_NEXT), 1);
    r.write_desc_at(TABLE, 1, (b + HDR as u64, 64, F_NEXT), 0);
    r.write_desc(txq, 0, (TABLE, 32, F_INDIRECT), 0);
    assert_eq!(r.submit_head(txq, 0), 0, "TX loop in an indirect table");
    logged(loops);
    tx_dropped += 4;

    // A valid frame in unusual pieces: the header split in two, a
    // zero-length descriptor. It is the next frame on the TAP: nothing of
    // the bad chains got there.
    let c = guest_frame(0xc3);
    put_tx(&r, &c);
    let split = [
        (b, 5, 0),
        (b + 5, (HDR - 5) as u32, 0),
        (b + HDR as u64, 0, 0),
        (b + HDR as u64, 64, 0),
    ];
    assert_eq!(r.submit(txq, &split), 0);
    assert_eq!(
        pk.recv(ETHERTYPE, WAIT).as_ref(),
        Some(&c),
        "TX after abuse"
    );
    tx_sent.push(c);

    // Valid frames the daemon writes to the TAP straight from guest
    // memory (one descriptor of 256 bytes or more) and ones it copies
    // (smaller, or in pieces), across page sizes: each arrives intact.
    for (i, (len, pieces)) in [(300, 1), (1514, 1), (1514, 3), (4000, 1), (100, 1)]
        .into_iter()
        .enumerate()
    {
        let f = frame([0x02, 0, 0, 0, 0, 2], MAC, 0x40 + i as u8, len);
        put_tx(&r, &f);
        let total = (HDR + len) as u32;
        let cut = total / pieces;
        let descs: Vec<Desc> = (0..pieces)
            .map(|k| {
                let end = if k + 1 == pieces {
                    total
                } else {
                    cut * (k + 1)
                };
                (b + u64::from(cut * k), end - cut * k, 0)
            })
            .collect();
        assert_eq!(r.submit(txq, &descs), 0);
        assert_eq!(
            pk.recv(ETHERTYPE, WAIT),
            Some(f.clone()),
            "TX frame of {len} bytes in {pieces} pieces"
        );
        tx_sent.push(f);
    }

    // A head outside the queue published in the same avail update as a
    // valid chain: the bad one is dropped (it cannot be returned), the
    // valid one in the same burst still goes back and crosses.
    let g = guest_frame(0xd4);
    put_tx(&r, &g);
    r.write_chain(txq, 0, &[(b, pkt_len, 0)]);
    let before = r.used_idx(txq);
    r.publish(txq, &[QS + 3, 0]);
    assert!(
        r.wait_used(txq, before.wrapping_add(1), WAIT),
        "a valid chain beside a bad head was not returned"
    );
    assert_eq!(
        r.used_elem(txq, before),
        (0, 0),
        "used entry beside a bad head"
    );
    assert_eq!(
        pk.recv(ETHERTYPE, WAIT),
        Some(g.clone()),
        "TX beside a bad head"
    );
    logged("empty descriptor chain");
    r.queues[txq].unreturnable += 1;
    tx_dropped += 1;
    tx_sent.push(g);

    // ----- RX: TAP -> guest -----
    let mut rx_delivered = 0;
    let w = F_WRITE;
    let rb = RX_BUF;
    let rx_cases: Vec<(&str, Vec<Desc>, &'static str)> = vec![
        (
            "device-readable buffer",
            vec![(rb, 2048, 0)],
            "device-readable descriptor in an RX chain",
        ),
        (
            "outside memory",
            vec![(1 << 40, 2048, w)],
            "address outside guest memory",
        ),
        (
            "straddling the end of memory",
            vec![(MEM as u64 - 100, 2048, w)],
            "address outside guest memory",
        ),
        (
            "4 GiB descriptor",
            vec![(rb, u32::MAX, w)],
            "address outside guest memory",
        ),
        (
            "zero-length buffer",
            vec![(rb, 0, w)],
            "RX chain shorter than the vnet header",
        ),
        (
            "short header",
            vec![(rb, 8, w)],
            "RX chain shorter than the vnet header",
        ),
        (
            "too small for the frame",
            vec![(rb, HDR as u32 + 20, w)],
            "RX chain of 32 bytes for a 92-byte frame",
        ),
        (
            "indirect table outside memory",
            vec![(1 << 40, 32, F_INDIRECT)],
            "empty descriptor chain",
        ),
    ];
    let mut rx_dropped = 0;
    let rx_case = |r: &mut Driver, name: &str, tag: u8| {
        // The buffer must stay as the guest left it.
        r.shm.write(rb, &[0x55; 256]);
        r.publish(rxq, &[0]);
        pk.send(&host_frame(tag));
        let want = r.queues[rxq].avail_idx;
        assert!(r.wait_used(rxq, want, WAIT), "RX {name}: no used entry");
        assert_eq!(r.used_elem(rxq, want - 1), (0, 0), "RX {name}: used entry");
        assert_eq!(r.shm.read(rb, 256), vec![0x55; 256], "RX {name}: written");
    };
    for (i, (name, descs, why)) in rx_cases.iter().enumerate() {
        r.write_chain(rxq, 0, descs);
        rx_case(&mut r, name, 0x10 + i as u8);
        logged(why);
        rx_dropped += 1;
    }
    r.write_desc(rxq, 0, (rb, 2048, w | F_NEXT), 0);
    rx_case(&mut r, "self loop", 0x20);
    logged(loops);
    r.write_desc(rxq, 0, (rb, HDR as u32, w | F_NEXT), 100);
    rx_case(&mut r, "next index past the table", 0x21);
    logged(loops);
    rx_dropped += 2;

    // A valid receive chain in unusual pieces.
    let deliver = |r: &mut Driver, tag: u8, send: bool| {
        r.shm.write(rb, &[0x55; 256]);
        r.write_chain(
            rxq,
            0,
            &[(rb, HDR as u32, w), (rb + 12, 0, w), (rb + 100, 2048, w)],
        );
        r.publish(rxq, &[0]);
        let f = host_frame(tag);
        if send {
            pk.send(&f);
        }
        let want = r.queues[rxq].avail_idx;
        assert!(
            r.wait_used(rxq, want, WAIT),
            "RX frame {tag:#x} not delivered"
        );
        assert_eq!(
            r.used_elem(rxq, want - 1),
            (0, (HDR + f.len()) as u32),
            "RX frame {tag:#x}"
        );
        let mut hdr = [0u8; HDR];
        hdr[10] = 1; // num_buffers
        assert_eq!(r.shm.read(rb, HDR), hdr, "RX vnet header");
        assert_eq!(r.shm.read(rb + 100, f.len()), f, "RX frame {tag:#x}");
    };
    deliver(&mut r, 0x31, true);
    rx_delivered += 1;

    // ----- avail indexes far ahead of the device -----
    // RX: the frame that arrives meanwhile waits for a sane ring.
    let good = r.queues[rxq].avail_idx;
    r.set_avail_idx(rxq, good.wrapping_add(QS + 3));
    logged("RX avail index");
    pk.send(&host_frame(0x32));
    r.set_avail_idx(rxq, good);
    deliver(&mut r, 0x32, false);
    rx_delivered += 1;
    // TX: nothing moves until the driver repairs the index.
    let good = r.queues[txq].avail_idx;
    r.set_avail_idx(txq, good.wrapping_add(QS + 3));
    logged("TX avail index");
    r.set_avail_idx(txq, good);
    let e = guest_frame(0xe5);
    put_tx(&r, &e);
    assert_eq!(r.submit(txq, &[(TX_BUF, pkt_len, 0)]), 0);
    assert_eq!(
        pk.recv(ETHERTYPE, WAIT).as_ref(),
        Some(&e),
        "TX after bad index"
    );
    tx_sent.push(e);
    // Nothing else reached the TAP.
    assert_eq!(pk.recv(ETHERTYPE, Duration::from_millis(200)), None);

    drop(r);
    let (st, log) = d.terminate();
    println!("{log}");
    assert!(st.success(), "daemon exit {st}: {log}");
    assert!(!log.contains("panicked"), "{log}");
    let stats = pair_stats(&log);
    assert_eq!(stats.len(), 1, "{log}");
    // (tx frames, tx gso, rx frames, rx gso)
    assert_eq!(
        stats[0].1,
        [tx_sent.len() as u64, 0, rx_delivered, 0],
        "{log}"
    );
    assert!(
        log.contains(&format!("gso, {tx_dropped} dropped), rx")),
        "tx {tx_dropped} dropped: {log}"
    );
    assert!(
        log.contains(&format!("gso, {rx_dropped} dropped)\n")),
        "rx {rx_dropped} dropped: {log}"
    );
}

/// A stalled pair (bad ring indexes, a looping chain) does not stop the
/// other pair; SIGTERM still ends the daemon cleanly.
#[test]
fn broken_pair_does_not_stop_the_other() {
    let ns = netns_with_tap("nh2", "rh1", true);
    let dir = tempdir();
    let sock = dir.path().join("net.sock");
    let d = NetDaemon::start_in(
        &ns,
        &sock,
        &["--tap", "rh1", "--mac", MAC_ARG, "--num-queue-pairs", "2"],
    )
    .unwrap();
    let pk = PacketSocket::open(&ns, "rh1");
    let mut r = connect(&sock, 2);
    let pkt_len = (HDR + 64) as u32;
    // Pair 0: a looping TX chain, then both avail indexes far ahead.
    let f = guest_frame(0x01);
    put_tx(&r, &f);
    r.write_desc(1, 0, (TX_BUF, pkt_len, F_NEXT), 0);
    assert_eq!(r.submit_head(1, 0), 0);
    r.set_avail_idx(1, 1 + QS + 7);
    r.set_avail_idx(0, QS + 7);
    assert!(
        d.wait_for_log("TX avail index", WAIT),
        "bogus TX index not logged"
    );
    // Pair 1 (queues 2 and 3) moves frames.
    for tag in [0x41, 0x42] {
        let f = guest_frame(tag);
        put_tx(&r, &f);
        assert_eq!(r.submit(3, &[(TX_BUF, pkt_len, 0)]), 0);
        assert_eq!(pk.recv(ETHERTYPE, WAIT), Some(f), "pair 1 TX {tag:#x}");
    }
    // The driver turns pair 1's receive queue off: its TAP queue is
    // detached (TUNSETQUEUE, allowed by the seccomp filter), and TX on the
    // pair goes on. At exit the queue is attached again.
    r.fe.set_vring_enable(2, false).unwrap();
    let f = guest_frame(0x43);
    put_tx(&r, &f);
    assert_eq!(r.submit(3, &[(TX_BUF, pkt_len, 0)]), 0);
    assert!(
        d.wait_for_log("pair 1: TAP queue detached", WAIT),
        "{}",
        d.log()
    );
    assert_eq!(pk.recv(ETHERTYPE, WAIT), Some(f), "pair 1 TX after RX off");
    drop(r);
    let (st, log) = d.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// TX chains returned to a used ring whose elements lie outside guest
/// memory (only its flags and index are inside): every add_used fails.
/// The frames still cross, and the daemon logs the failures through the
/// pair's warning cap, not once per chain.
#[test]
fn failed_used_ring_writes_are_logged_capped() {
    const FRAMES: usize = 3 * MAX_WARNINGS as usize;
    let ns = netns_with_tap("nh3", "rh2", false);
    let dir = tempdir();
    let sock = dir.path().join("net.sock");
    let d = NetDaemon::start_in(&ns, &sock, &["--tap", "rh2", "--mac", MAC_ARG]).unwrap();
    let pk = PacketSocket::open(&ns, "rh2");
    let mut r = connect(&sock, 1);
    let txq = 1;
    r.set_used_ring(txq, MEM as u64 - 4);
    let pkt_len = (HDR + 64) as u32;
    r.write_chain(txq, 0, &[(TX_BUF, pkt_len, 0)]);
    for k in 0..FRAMES {
        // Each frame is taken (and its return attempted) on its own.
        let f = guest_frame(k as u8);
        put_tx(&r, &f);
        r.publish(txq, &[0]);
        assert_eq!(pk.recv(ETHERTYPE, WAIT), Some(f), "TX frame {k}");
    }
    // Every kick handled: the last frame's add_used has been tried.
    assert!(r.kick_taken(txq, WAIT), "TX worker stuck");
    assert_eq!(r.used_idx(txq), 0, "used index moved");
    drop(r);
    let (st, log) = d.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    assert!(!log.contains("panicked"), "{log}");
    let failures = log.matches("add_used").count();
    assert!(
        (1..=MAX_WARNINGS as usize).contains(&failures),
        "{failures} add_used lines for {FRAMES} failed returns:\n{log}"
    );
    assert!(log.contains("further warnings suppressed"), "{log}");
    let stats = pair_stats(&log);
    assert_eq!(stats[0].1[0], FRAMES as u64, "tx frames: {log}");
}
