//! The probe's hardware access: serial console, guest memory and MMIO
//! registers, the time-stamp counter.

use core::arch::asm;
use core::ptr::{read_volatile, write_volatile};

const COM1: u16 = 0x3f8;

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to the emulated UART / ACPI registers; no memory
    // is touched.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v) };
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O read from the emulated UART.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v) };
    v
}

pub fn putc(c: u8) {
    while inb(COM1 + 5) & 0x20 == 0 {}
    outb(COM1, c);
}

pub fn print(s: &str) {
    for b in s.bytes() {
        putc(b);
    }
}

pub fn hex(v: u64) {
    print("0x");
    let mut started = false;
    for i in (0..16).rev() {
        let d = ((v >> (i * 4)) & 0xf) as u8;
        if d != 0 || started || i == 0 {
            started = true;
            putc(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
    }
}

pub fn r32(a: u64) -> u32 {
    // SAFETY: identity-mapped guest RAM or device MMIO.
    unsafe { read_volatile(a as *const u32) }
}
pub fn w32(a: u64, v: u32) {
    // SAFETY: identity-mapped guest RAM or device MMIO.
    unsafe { write_volatile(a as *mut u32, v) }
}
pub fn r16(a: u64) -> u16 {
    // SAFETY: identity-mapped guest RAM.
    unsafe { read_volatile(a as *const u16) }
}
pub fn w16(a: u64, v: u16) {
    // SAFETY: identity-mapped guest RAM.
    unsafe { write_volatile(a as *mut u16, v) }
}
pub fn w64(a: u64, v: u64) {
    // SAFETY: identity-mapped guest RAM.
    unsafe { write_volatile(a as *mut u64, v) }
}
pub fn r8(a: u64) -> u8 {
    // SAFETY: identity-mapped guest RAM or device MMIO.
    unsafe { read_volatile(a as *const u8) }
}
pub fn w8(a: u64, v: u8) {
    // SAFETY: identity-mapped guest RAM.
    unsafe { write_volatile(a as *mut u8, v) }
}
pub fn fill(a: u64, len: u64, f: impl Fn(u64) -> u8) {
    for i in 0..len {
        w8(a + i, f(i));
    }
}

pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: reads the time-stamp counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi) };
    ((hi as u64) << 32) | lo as u64
}
