//! The block device: a write, a read-back and a flush; in `blk-resize`
//! mode then a resize announced by the backend (see [`resized`]); in
//! `blk-loop` mode then rounds of I/O across backend restarts
//! (blk_loop.rs).

use crate::io::{fill, hex, print, r32, r8, rdtsc, w32, w64, w8};
use crate::irq;
use crate::virtio::{init, Queue, BUF, F_NEXT, F_WRITE, SECOND};

pub fn blk_request(base: u64, q: &mut Queue, kind: u32, sector: u64, data: u64, len: u32) -> u8 {
    let hdr = BUF;
    let status = BUF + 0x100;
    w32(hdr, kind);
    w32(hdr + 4, 0);
    w64(hdr + 8, sector);
    w8(status, 0xff);
    if len > 0 {
        let dflags = if kind == 0 { F_WRITE } else { 0 };
        q.set_desc(0, hdr, 16, F_NEXT, 1);
        q.set_desc(1, data, len, dflags | F_NEXT, 2);
        q.set_desc(2, status, 1, F_WRITE, 0);
    } else {
        q.set_desc(0, hdr, 16, F_NEXT, 1);
        q.set_desc(1, status, 1, F_WRITE, 0);
    }
    q.push(0);
    w32(base + 0x50, q.idx as u32);
    match q.pop(10 * SECOND) {
        Some(_) => r8(status),
        None => 0xee,
    }
}

/// Writes 4 KiB at `sector`, reads it back and compares; `what` starts
/// the report lines.
fn write_read_verify(base: u64, q: &mut Queue, sector: u64, what: &str) -> bool {
    let wbuf = BUF + 0x1000;
    let rbuf = BUF + 0x3000;
    fill(wbuf, 4096, |i| (i as u8) ^ 0x5a ^ ((i >> 8) as u8));
    fill(rbuf, 4096, |_| 0);
    let s = blk_request(base, q, 1, sector, wbuf, 4096);
    print(what);
    print("write status ");
    hex(s as u64);
    print("\n");
    if s != 0 {
        return false;
    }
    let s = blk_request(base, q, 0, sector, rbuf, 4096);
    print(what);
    print("read status ");
    hex(s as u64);
    print("\n");
    if s != 0 {
        return false;
    }
    for i in 0..4096 {
        if r8(rbuf + i) != r8(wbuf + i) {
            print(what);
            print("data mismatch at ");
            hex(i);
            print("\n");
            return false;
        }
    }
    print(what);
    print("data verified\n");
    true
}

fn capacity(base: u64) -> u64 {
    r32(base + 0x100) as u64 | ((r32(base + 0x104) as u64) << 32)
}

/// Byte `i` of the 4 KiB the `blk-loop` mode writes in `round` (the
/// tests compute it too).
pub fn pattern(round: u64, i: u64) -> u8 {
    (i as u8) ^ ((i >> 8) as u8) ^ (round as u8).wrapping_mul(0x3b) ^ ((round >> 8) as u8) ^ 0xa5
}

/// `resize`: then wait for the backend's configuration change on `irq`;
/// `rounds`: then run the `blk-loop` rounds.
pub fn blk(base: u64, irq: u32, resize: bool, rounds: bool) -> bool {
    print("blk: capacity ");
    let cap = capacity(base);
    hex(cap);
    print(" sectors\n");
    // FLUSH (bit 9).
    let Some([mut q, ..]) = init(base, 1 << 9, 1) else {
        return false;
    };
    if !write_read_verify(base, &mut q, 40, "blk: ") {
        return false;
    }
    let s = blk_request(base, &mut q, 4, 0, 0, 0);
    print("blk: flush status ");
    hex(s as u64);
    print("\n");
    if s != 0 {
        return false;
    }
    if resize && !resized(base, irq, &mut q, cap) {
        return false;
    }
    !rounds || crate::blk_loop::run(base, &mut q)
}

const INT_CONFIG: u32 = 2;
/// How long the guest waits for the configuration change (the test
/// resizes the disk as soon as it sees the "waiting" line).
const RESIZE_WAIT: u64 = 20 * SECOND;

/// The capacity and ConfigGeneration as virtio 1.2, 2.5.1 has a driver
/// read a field: again while the generation moves under it.
fn stable_capacity(base: u64) -> (u64, u32) {
    loop {
        let g = r32(base + 0xfc);
        let cap = capacity(base);
        if r32(base + 0xfc) == g {
            return (cap, g);
        }
    }
}

/// Waits (bounded) for the configuration-change interrupt the test's
/// resize makes the backend announce: the device's interrupt comes,
/// InterruptStatus has its configuration-change bit (acknowledged
/// then), ConfigGeneration moved and the capacity grew; 4 KiB past the
/// old end are then written and read back.
fn resized(base: u64, irq: u32, q: &mut Queue, old_cap: u64) -> bool {
    irq::route(irq);
    let gen0 = r32(base + 0xfc);
    print("blk: waiting for a config change, generation ");
    hex(gen0 as u64);
    print("\n");
    let start = rdtsc();
    let mut seen = 0;
    let status = loop {
        let left = RESIZE_WAIT.saturating_sub(rdtsc() - start);
        let Some(n) = irq::wait_beyond(seen, left) else {
            print("blk: timeout: no config interrupt, InterruptStatus ");
            hex(r32(base + 0x60) as u64);
            print(" ConfigGeneration ");
            hex(r32(base + 0xfc) as u64);
            print(" capacity ");
            hex(capacity(base));
            print("\n");
            return false;
        };
        seen = n;
        let status = r32(base + 0x60);
        print("blk: interrupt, InterruptStatus ");
        hex(status as u64);
        print("\n");
        if status & INT_CONFIG != 0 {
            break status;
        }
    };
    w32(base + 0x64, status & INT_CONFIG);
    print("blk: InterruptStatus after the ack ");
    hex(r32(base + 0x60) as u64);
    print("\n");
    let (cap, gen) = stable_capacity(base);
    print("blk: config generation ");
    hex(gen0 as u64);
    print(" -> ");
    hex(gen as u64);
    print("\n");
    print("blk: new capacity ");
    hex(cap);
    print(" sectors\n");
    if gen == gen0 || cap < old_cap + 8 {
        return false;
    }
    write_read_verify(base, q, old_cap, "blk: past the old end: ")
}
