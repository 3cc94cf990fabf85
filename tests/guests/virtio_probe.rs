//! A freestanding x86-64 guest for rimg-vmm's fast tests (built by the
//! test with the host rustc, loaded as an ELF "kernel"). It starts in the
//! long mode rimg-vmm sets up for Linux (identity map of 4 GiB), drives
//! every virtio-mmio device it finds as a plain virtio 1.x driver would,
//! reports on the serial port, and powers off through the ACPI sleep
//! register.
//!
//! Block device: write 4 KiB at sector 40, read it back, flush.
//! Net device: send one frame (ethertype 0x88b5), then wait for a frame
//! with ethertype 0x88b6 written into the TAP by the test.
//! Net device offering MQ and CTRL_VQ (two queue pairs): a frame queued
//! on the second pair stays there until VQ_PAIRS_SET 2, bad control
//! commands and chains are answered ERR or returned unused, then frames
//! go out on both pairs and one comes in on either; after a reset, CTRL_VQ
//! alone (control queue at index 2) and one more frame on pair 0.
//! With `blk-resize` on the command line, the block device then waits
//! for a configuration change (the test resizes the disk): the device's
//! interrupt, InterruptStatus, ConfigGeneration and the new capacity.
//! With `blk-loop`, rounds of verified I/O until the test types `q` on
//! the console, while it restarts the disk's backend (blk_loop.rs).
//!
//! One module per concern: `io` (serial, memory, MMIO), `virtio`
//! (rings, initialisation), `blk`, `net`, `irq` (taking the device's
//! interrupt).

#![no_std]
#![no_main]

// The crate root is this file, not a directory's mod.rs: its modules
// are found by path.
#[path = "virtio_probe/blk.rs"]
mod blk;
#[path = "virtio_probe/blk_loop.rs"]
mod blk_loop;
#[path = "virtio_probe/io.rs"]
mod io;
#[path = "virtio_probe/irq.rs"]
mod irq;
#[path = "virtio_probe/net.rs"]
mod net;
#[path = "virtio_probe/virtio.rs"]
mod virtio;

use core::arch::{asm, global_asm};
use core::ptr::{read_volatile, write_volatile};

use io::{hex, outb, print, r32};

global_asm!(
    ".globl _start",
    "_start:",
    "mov rsp, 0x1ff000",
    "call guest_main",
    "2: hlt",
    "jmp 2b",
);

const MMIO: u64 = 0xd000_0000;

#[no_mangle]
extern "C" fn guest_main() -> ! {
    print("probe: hello\n");
    let mut ok = true;
    let mut found = 0;
    for i in 0..8u64 {
        let base = MMIO + i * 0x1000;
        if r32(base) != 0x7472_6976 {
            continue;
        }
        found += 1;
        let id = r32(base + 8);
        // rimg-vmm gives device i IOAPIC pin 5 + i (vmm/src/layout.rs).
        let irq = 5 + i as u32;
        let pass = match id {
            2 => blk::blk(
                base,
                irq,
                cmdline_has(b"blk-resize"),
                cmdline_has(b"blk-loop"),
            ),
            1 => net::net(base),
            _ => true,
        };
        print(if pass { "device ok\n" } else { "device FAILED\n" });
        ok &= pass;
    }
    print("probe: devices ");
    hex(found);
    print("\n");
    print(if ok { "probe: PASS\n" } else { "probe: FAIL\n" });
    // ACPI S5: SLP_TYP 5, SLP_EN.
    outb(0x3c0, (5 << 2) | 0x20);
    loop {
        // SAFETY: halts until the VMM stops the vCPU.
        unsafe { asm!("hlt") };
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    print("probe: panic\n");
    outb(0x3c0, (5 << 2) | 0x20);
    loop {}
}

// memset, memcpy, memmove, memcmp and the personality stub.
include!("libc_shim.rs");
// cmdline_has.
include!("cmdline.rs");
