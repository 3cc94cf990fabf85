//! The block device: a write, a read-back and a flush.

use crate::io::{fill, hex, print, r32, r8, w32, w64, w8};
use crate::virtio::{init, Queue, BUF, F_NEXT, F_WRITE, SECOND};

fn blk_request(base: u64, q: &mut Queue, kind: u32, sector: u64, data: u64, len: u32) -> u8 {
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

pub fn blk(base: u64) -> bool {
    print("blk: capacity ");
    let cap = r32(base + 0x100) as u64 | ((r32(base + 0x104) as u64) << 32);
    hex(cap);
    print(" sectors\n");
    // FLUSH (bit 9).
    let Some([mut q, ..]) = init(base, 1 << 9, 1) else {
        return false;
    };
    let wbuf = BUF + 0x1000;
    let rbuf = BUF + 0x3000;
    fill(wbuf, 4096, |i| (i as u8) ^ 0x5a ^ ((i >> 8) as u8));
    fill(rbuf, 4096, |_| 0);
    let s = blk_request(base, &mut q, 1, 40, wbuf, 4096);
    print("blk: write status ");
    hex(s as u64);
    print("\n");
    if s != 0 {
        return false;
    }
    let s = blk_request(base, &mut q, 0, 40, rbuf, 4096);
    print("blk: read status ");
    hex(s as u64);
    print("\n");
    if s != 0 {
        return false;
    }
    for i in 0..4096 {
        if r8(rbuf + i) != r8(wbuf + i) {
            print("blk: data mismatch at ");
            hex(i);
            print("\n");
            return false;
        }
    }
    print("blk: data verified\n");
    let s = blk_request(base, &mut q, 4, 0, 0, 0);
    print("blk: flush status ");
    hex(s as u64);
    print("\n");
    s == 0
}
