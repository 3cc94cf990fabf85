//! The network device: one frame out and one in; with MQ and CTRL_VQ,
//! the control queue and the second queue pair.

use crate::io::{fill, hex, print, putc, r16, r32, r8, rdtsc, w16, w32, w8};
use crate::virtio::{init, notify, offered_features, Queue, BUF, F_NEXT, F_WRITE, SECOND};

pub fn net(base: u64) -> bool {
    if offered_features(base) & (CTRL_VQ | MQ) == CTRL_VQ | MQ {
        return net_mq(base);
    }
    // MAC (bit 5).
    let Some([mut rx, mut tx, ..]) = init(base, 1 << 5, 2) else {
        return false;
    };
    let mut mac = [0u8; 6];
    for (i, m) in mac.iter_mut().enumerate() {
        *m = r8(base + 0x100 + i as u64);
    }
    // Eight receive buffers of 2 KiB.
    let rxbuf = BUF + 0x1_0000;
    for i in 0..8u16 {
        rx.set_desc(i, rxbuf + i as u64 * 2048, 2048, F_WRITE, 0);
        rx.push(i);
    }
    w32(base + 0x50, 0);
    // One frame: 12-byte virtio-net header, broadcast, our MAC, 0x88b5.
    let f = BUF + 0x8000;
    fill(f, 12 + 60, |_| 0);
    fill(f + 12, 6, |_| 0xff);
    for (i, m) in mac.iter().enumerate() {
        w8(f + 18 + i as u64, *m);
    }
    w8(f + 24, 0x88);
    w8(f + 25, 0xb5);
    for (i, b) in b"RIMG-VMM-TX".iter().enumerate() {
        w8(f + 26 + i as u64, *b);
    }
    tx.set_desc(0, f, 12 + 60, 0, 0);
    tx.push(0);
    w32(base + 0x50, 1);
    if tx.pop(10 * SECOND).is_none() {
        print("net: tx not completed\n");
        return false;
    }
    print("net: tx done\n");
    loop {
        let Some((id, len)) = rx.pop(10 * SECOND) else {
            print("net: no frame received, device status ");
            hex(r32(base + 0x70) as u64);
            print("\n");
            return false;
        };
        let b = rxbuf + id as u64 * 2048;
        let et = ((r8(b + 12 + 12) as u16) << 8) | r8(b + 12 + 13) as u16;
        print("net: rx len ");
        hex(len as u64);
        print(" ethertype ");
        hex(et as u64);
        print("\n");
        if et == 0x88b6 {
            print("net: rx payload ");
            for i in 0..11 {
                putc(r8(b + 12 + 14 + i));
            }
            print("\n");
            return true;
        }
    }
}

const MAC: u64 = 1 << 5;
const CTRL_VQ: u64 = 1 << 17;
const MQ: u64 = 1 << 22;

/// A 60-byte broadcast frame from `mac` with ethertype 0x88b5 and
/// `payload`, behind a zeroed 12-byte virtio-net header, at `at`.
fn frame(at: u64, mac: &[u8; 6], payload: &[u8]) {
    fill(at, 12 + 60, |_| 0);
    fill(at + 12, 6, |_| 0xff);
    for (i, m) in mac.iter().enumerate() {
        w8(at + 18 + i as u64, *m);
    }
    w8(at + 24, 0x88);
    w8(at + 25, 0xb5);
    for (i, b) in payload.iter().enumerate() {
        w8(at + 26 + i as u64, *b);
    }
}

/// Control command buffers: header (class, command), data, ack.
const CMD: u64 = BUF + 0x9000;
const CMD_DATA: u64 = CMD + 0x10;
const CMD_ACK: u64 = CMD + 0x20;

/// Puts a chain of (addr, len, flags) descriptors on the control queue
/// (NEXT links added), notifies, and returns the used length and the ack
/// byte (0xff: untouched). The VMM answers during the notify's exit, so
/// the used entry is there when the write returns.
fn ctrl_chain(base: u64, q: &mut Queue, descs: &[(u64, u32, u16)]) -> Option<(u32, u8)> {
    w8(CMD_ACK, 0xff);
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let last = i + 1 == descs.len();
        let next = if last { 0 } else { i as u16 + 1 };
        q.set_desc(i as u16, addr, len, flags | if last { 0 } else { F_NEXT }, next);
    }
    q.push(0);
    notify(base, q);
    let (_, len) = q.pop(SECOND)?;
    Some((len, r8(CMD_ACK)))
}

/// A well-formed command: header, data, ack.
fn ctrl_cmd(base: u64, q: &mut Queue, class: u8, cmd: u8, data: &[u8]) -> Option<(u32, u8)> {
    w8(CMD, class);
    w8(CMD + 1, cmd);
    for (i, b) in data.iter().enumerate() {
        w8(CMD_DATA + i as u64, *b);
    }
    ctrl_chain(
        base,
        q,
        &[
            (CMD, 2, 0),
            (CMD_DATA, data.len() as u32, 0),
            (CMD_ACK, 1, F_WRITE),
        ],
    )
}

/// Prints `net: ctrl NAME len L ack A` and checks both.
fn expect(name: &str, got: Option<(u32, u8)>, len: u32, ack: u8) -> bool {
    print("net: ctrl ");
    print(name);
    let Some((l, a)) = got else {
        print(" not answered\n");
        return false;
    };
    print(" len ");
    hex(l as u64);
    print(" ack ");
    hex(a as u64);
    print("\n");
    l == len && a == ack
}

const VQ_PAIRS_SET: (u8, u8) = (4, 0);

fn net_mq(base: u64) -> bool {
    let pairs = r16(base + 0x108);
    print("net: max_virtqueue_pairs ");
    hex(pairs as u64);
    print("\n");
    if pairs != 2 {
        return false;
    }
    // Queues 0-3 are RX/TX of pairs 0 and 1; 4 is the control queue.
    let Some([mut rx0, mut tx0, mut rx1, mut tx1, mut ctrl]) =
        init(base, MAC | CTRL_VQ | MQ, 5)
    else {
        return false;
    };
    let mut mac = [0u8; 6];
    for (i, m) in mac.iter_mut().enumerate() {
        *m = r8(base + 0x100 + i as u64);
    }
    // Four receive buffers of 2 KiB on each pair.
    let rxbuf = BUF + 0x1_0000;
    for (n, q) in [&mut rx0, &mut rx1].into_iter().enumerate() {
        for i in 0..4u16 {
            q.set_desc(i, rxbuf + (n as u64 * 4 + i as u64) * 2048, 2048, F_WRITE, 0);
            q.push(i);
        }
        notify(base, q);
    }
    // Pair 1 is disabled until VQ_PAIRS_SET (virtio 1.2, 5.1.6.5.5): a
    // frame queued on its TX queue waits, one on pair 0 goes out.
    let early = BUF + 0x8000;
    frame(early, &mac, b"RIMG-MQ-TX1-EARLY");
    tx1.set_desc(0, early, 12 + 60, 0, 0);
    tx1.push(0);
    notify(base, &tx1);
    let f0 = BUF + 0x8100;
    frame(f0, &mac, b"RIMG-MQ-TX0");
    tx0.set_desc(0, f0, 12 + 60, 0, 0);
    tx0.push(0);
    notify(base, &tx0);
    if tx0.pop(10 * SECOND).is_none() {
        print("net: tx0 not completed\n");
        return false;
    }
    print("net: tx0 done\n");
    if r16(tx1.used + 2) != 0 {
        print("net: tx1 used while pair 1 disabled\n");
        return false;
    }
    print("net: tx1 held while pair 1 disabled\n");

    // Bad commands and chains: ERR where there is an ack byte to write,
    // returned unused (length 0) where there is not.
    let (c, m) = VQ_PAIRS_SET;
    let mut ok = true;
    ok &= expect("pairs-3", ctrl_cmd(base, &mut ctrl, c, m, &[3, 0]), 1, 1);
    ok &= expect("pairs-0", ctrl_cmd(base, &mut ctrl, c, m, &[0, 0]), 1, 1);
    ok &= expect("bogus", ctrl_cmd(base, &mut ctrl, 0x7f, 0x7f, &[0]), 1, 1);
    ok &= expect("short", ctrl_cmd(base, &mut ctrl, c, m, &[2]), 1, 1);
    w8(CMD, c);
    w8(CMD + 1, m);
    w8(CMD_DATA, 2);
    w8(CMD_DATA + 1, 0);
    let hdr = (CMD, 2, 0);
    let data = (CMD_DATA, 2, 0);
    let ack = (CMD_ACK, 1, F_WRITE);
    let outside = (0x7f_0000_0000, 2, 0);
    ok &= expect("outside", ctrl_chain(base, &mut ctrl, &[hdr, outside, ack]), 1, 1);
    ok &= expect("order", ctrl_chain(base, &mut ctrl, &[ack, hdr, data]), 1, 1);
    ok &= expect("no-ack", ctrl_chain(base, &mut ctrl, &[hdr, data]), 0, 0xff);
    // A descriptor that is its own next: a loop the VMM must cut.
    ctrl.set_desc(0, CMD, 2, F_NEXT, 1);
    ctrl.set_desc(1, CMD_DATA, 2, F_NEXT, 1);
    w8(CMD_ACK, 0xff);
    ctrl.push(0);
    notify(base, &ctrl);
    ok &= expect("loop", ctrl.pop(SECOND).map(|(_, l)| (l, r8(CMD_ACK))), 0, 0xff);
    // An avail index far ahead: ignored, then repaired.
    let used_before = r16(ctrl.used + 2);
    w16(ctrl.avail + 2, ctrl.avail_idx.wrapping_add(100));
    notify(base, &ctrl);
    let ignored = r16(ctrl.used + 2) == used_before;
    w16(ctrl.avail + 2, ctrl.avail_idx);
    print(if ignored {
        "net: ctrl runaway avail index ignored\n"
    } else {
        "net: ctrl runaway avail index used\n"
    });
    ok &= ignored;
    // A head index past the ring, then the real command: only the
    // latter comes back, enabling pair 1.
    ctrl.push(200);
    let r = ctrl_chain(base, &mut ctrl, &[hdr, data, ack]);
    ok &= expect("VQ_PAIRS_SET 2", r, 1, 0);
    if !ok {
        return false;
    }

    if tx1.pop(10 * SECOND).is_none() {
        print("net: tx1 early frame not sent\n");
        return false;
    }
    print("net: tx1 early frame sent after VQ_PAIRS_SET\n");
    let f1 = BUF + 0x8200;
    frame(f1, &mac, b"RIMG-MQ-TX1");
    tx1.set_desc(1, f1, 12 + 60, 0, 0);
    tx1.push(1);
    notify(base, &tx1);
    if tx1.pop(10 * SECOND).is_none() {
        print("net: tx1 not completed\n");
        return false;
    }
    print("net: tx1 done\n");
    // A frame from the test, on whichever pair the TAP picks.
    let start = rdtsc();
    while rdtsc() - start < 10 * SECOND {
        for (n, q) in [&mut rx0, &mut rx1].into_iter().enumerate() {
            let Some((id, _)) = q.pop(0) else {
                continue;
            };
            let b = rxbuf + (n as u64 * 4 + id as u64) * 2048;
            let et = ((r8(b + 12 + 12) as u16) << 8) | r8(b + 12 + 13) as u16;
            if et == 0x88b6 {
                print("net: rx payload ");
                for i in 0..11 {
                    putc(r8(b + 12 + 14 + i));
                }
                print(" on pair ");
                hex(n as u64);
                print("\n");
                return net_ctrl_only(base, &mac);
            }
        }
    }
    print("net: no frame received\n");
    false
}

/// After a reset, CTRL_VQ without MQ: one pair, and the control queue at
/// index 2 (virtio 1.2, 5.1.2), where the second pair's receive queue was.
/// The MQ class is an error there; pair 0 still carries frames.
fn net_ctrl_only(base: u64, mac: &[u8; 6]) -> bool {
    let Some([_rx, mut tx, mut ctrl, ..]) = init(base, MAC | CTRL_VQ, 3) else {
        return false;
    };
    let (c, m) = VQ_PAIRS_SET;
    let mut ok = true;
    ok &= expect("ctrl-only pairs-1", ctrl_cmd(base, &mut ctrl, c, m, &[1, 0]), 1, 1);
    ok &= expect("ctrl-only bogus", ctrl_cmd(base, &mut ctrl, 9, 9, &[]), 1, 1);
    if !ok {
        return false;
    }
    let f = BUF + 0x8300;
    frame(f, mac, b"RIMG-CTRL-ONLY-TX0");
    tx.set_desc(0, f, 12 + 60, 0, 0);
    tx.push(0);
    notify(base, &tx);
    if tx.pop(10 * SECOND).is_none() {
        print("net: ctrl-only tx not completed\n");
        return false;
    }
    print("net: ctrl-only tx done\n");
    true
}
