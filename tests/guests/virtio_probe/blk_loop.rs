//! `blk-loop` mode: rounds of a 4 KiB write, its read-back and a
//! comparison, each round in the next of 64 slots with its own pattern,
//! while the test kills and restarts the disk's backend. Typed on the
//! console between rounds: `w` flushes the disk and waits (the guest
//! says so once the flush is done: nothing in flight, nothing in the
//! backend's write cache) until the next byte; `q` ends the loop.

use crate::blk::{blk_request, pattern};
use crate::io::{fill, hex, inb, print, r32, r8};
use crate::virtio::{Queue, BUF};

/// The loop's slots start here (past the 4 KiB at sector 40).
const FIRST_SECTOR: u64 = 1024;
const SLOTS: u64 = 64;
const COM1: u16 = 0x3f8;
const STATUS_NEEDS_RESET: u32 = 0x40;

/// A byte typed on the console, if any.
fn typed() -> Option<u8> {
    (inb(COM1 + 5) & 1 != 0).then(|| inb(COM1))
}

fn report(what: &str, v: u64) {
    print("blk-loop: ");
    print(what);
    hex(v);
    print("\n");
}

pub fn run(base: u64, q: &mut Queue) -> bool {
    print("blk-loop: running\n");
    let wbuf = BUF + 0x1000;
    let rbuf = BUF + 0x3000;
    let mut round = 0u64;
    let mut waits = 0u64;
    loop {
        match typed() {
            Some(b'q') => break,
            Some(b'w') => {
                waits += 1;
                let f = blk_request(base, q, 4, 0, 0, 0);
                if f != 0 {
                    report("flush status ", f as u64);
                    return false;
                }
                report("wait ", waits);
                while typed().is_none() {}
                report("on after wait ", waits);
            }
            _ => {}
        }
        round += 1;
        let sector = FIRST_SECTOR + (round % SLOTS) * 8;
        fill(wbuf, 4096, |i| pattern(round, i));
        fill(rbuf, 4096, |_| 0);
        let w = blk_request(base, q, 1, sector, wbuf, 4096);
        let r = if w == 0 {
            blk_request(base, q, 0, sector, rbuf, 4096)
        } else {
            w
        };
        let status = r32(base + 0x70);
        if w != 0 || r != 0 || status & STATUS_NEEDS_RESET != 0 {
            report("failed in round ", round);
            report("write status ", w as u64);
            report("read status ", r as u64);
            report("device status ", status as u64);
            return false;
        }
        if let Some(i) = (0..4096).find(|&i| r8(rbuf + i) != r8(wbuf + i)) {
            report("data mismatch in round ", round);
            report("at byte ", i);
            return false;
        }
    }
    report("rounds verified ", round);
    report("device status ", r32(base + 0x70) as u64);
    true
}
