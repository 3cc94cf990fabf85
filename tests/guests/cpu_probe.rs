//! A freestanding x86-64 guest for rimg-vmm's CPU tests (built by the
//! test with the host rustc, loaded as an ELF "kernel", entered in the
//! long mode rimg-vmm sets up for Linux).
//!
//! It prints the CPUID leaves the VMM shapes for vCPU 0, starts vCPU 1
//! the way Linux starts an application processor (INIT, then two
//! start-up IPIs through the local APIC to a real-mode trampoline) and
//! prints what CPUID tells that vCPU about itself. Then, when the kernel
//! command line holds `fault`, it makes a few marked exits (port 0x80,
//! an MMIO read) and triple-faults: an empty IDT and a divide by zero
//! (#DE cannot be delivered, nor the #GP that raises, nor the #DF).
//! Otherwise it powers off through the ACPI sleep register, or with
//! `stay` halts for good (a guest that hangs).

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::ptr::{read_volatile, write_volatile};

global_asm!(
    ".globl _start",
    "_start:",
    "mov rsp, 0x1ff000",
    "call guest_main",
    "2: hlt",
    "jmp 2b",
    // The application processor's real-mode start-up code, copied to
    // TRAMP by vCPU 0 (SIPI vector TRAMP >> 12: CS = 0x1000, IP = 0).
    // It records what CPUID says to it at TRAMP + 0x100.. and halts.
    ".globl ap_start",
    ".globl ap_end",
    ".code16",
    "ap_start:",
    "cli",
    "mov ax, cs",
    "mov ds, ax",
    "mov eax, 1",
    "xor ecx, ecx",
    "cpuid",
    "mov dword ptr [0x100], ebx",
    "mov eax, 0x8000001e",
    "xor ecx, ecx",
    "cpuid",
    "mov dword ptr [0x104], eax",
    "mov dword ptr [0x108], ebx",
    "mov eax, 0xb",
    "xor ecx, ecx",
    "cpuid",
    "mov dword ptr [0x10c], edx",
    "mov dword ptr [0x110], 0x600d0a90",
    "3: hlt",
    "jmp 3b",
    "ap_end:",
    ".code64",
);

extern "C" {
    static ap_start: u8;
    static ap_end: u8;
}

const COM1: u16 = 0x3f8;
const TRAMP: u64 = 0x1_0000;
const AP_DONE: u32 = 0x600d_0a90;
const LAPIC: u64 = 0xfee0_0000;

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to the emulated UART / POST port / ACPI registers;
    // no memory is touched.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v) };
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O read from the emulated UART.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v) };
    v
}

fn putc(c: u8) {
    while inb(COM1 + 5) & 0x20 == 0 {}
    outb(COM1, c);
}

fn print(s: &str) {
    for b in s.bytes() {
        putc(b);
    }
}

fn hex(v: u64) {
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

fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: CPUID only writes the four registers named; rbx is saved
    // around it because LLVM reserves it.
    unsafe {
        asm!(
            "mov {t:r}, rbx",
            "cpuid",
            "xchg {t:r}, rbx",
            t = out(reg) b,
            inout("eax") leaf => a,
            inout("ecx") sub => c,
            out("edx") d,
        )
    };
    [a, b, c, d]
}

/// `cpuid LEAF SUB eax ebx ecx edx`, all in hex.
fn show(leaf: u32, sub: u32) {
    let r = cpuid(leaf, sub);
    print("cpuid ");
    hex(leaf as u64);
    print(" ");
    hex(sub as u64);
    for v in r {
        print(" ");
        hex(v as u64);
    }
    print("\n");
}

fn r32(a: u64) -> u32 {
    // SAFETY: `a` is identity-mapped guest RAM or an emulated register.
    unsafe { read_volatile(a as *const u32) }
}

fn w32(a: u64, v: u32) {
    // SAFETY: `a` is identity-mapped guest RAM or an emulated register.
    unsafe { write_volatile(a as *mut u32, v) }
}

/// Starts vCPU 1 at TRAMP (INIT, SIPI, SIPI through the xAPIC ICR) and
/// prints what it found.
fn start_ap() {
    // SAFETY: ap_start..ap_end is the trampoline's code in this image.
    let (s, e) = unsafe { (&ap_start as *const u8, &ap_end as *const u8) };
    let len = e as usize - s as usize;
    for i in 0..len {
        // SAFETY: reads within the trampoline; TRAMP is free guest RAM
        // (identity-mapped), nothing else lives there.
        unsafe { write_volatile((TRAMP as *mut u8).add(i), read_volatile(s.add(i))) };
    }
    for off in (0x100..0x120).step_by(4) {
        w32(TRAMP + off, 0);
    }
    // Software-enable the local APIC (spurious vector 0xff).
    w32(LAPIC + 0xf0, 0x1ff);
    let icr = |dest: u32, low: u32| {
        w32(LAPIC + 0x310, dest << 24);
        w32(LAPIC + 0x300, low);
        while r32(LAPIC + 0x300) & (1 << 12) != 0 {}
    };
    icr(1, 0x4500); // INIT, level assert
    let sipi = 0x4600 | (TRAMP >> 12) as u32;
    icr(1, sipi);
    icr(1, sipi);
    let mut spins = 0u64;
    while r32(TRAMP + 0x110) != AP_DONE {
        spins += 1;
        if spins > 1 << 28 {
            print("ap: no answer\n");
            return;
        }
        // SAFETY: a spin-loop hint.
        unsafe { asm!("pause") };
    }
    print("ap: leaf1.ebx ");
    hex(r32(TRAMP + 0x100) as u64);
    print(" 8000001e.eax ");
    hex(r32(TRAMP + 0x104) as u64);
    print(" 8000001e.ebx ");
    hex(r32(TRAMP + 0x108) as u64);
    print(" b.edx ");
    hex(r32(TRAMP + 0x10c) as u64);
    print("\n");
}

#[repr(C, packed)]
struct Idtr {
    limit: u16,
    base: u64,
}

static EMPTY_IDT: Idtr = Idtr { limit: 0, base: 0 };

fn triple_fault() -> ! {
    print("fault: now\n");
    // Marked exits for the VMM's exit ring.
    outb(0x80, 0xd1);
    outb(0x80, 0xd2);
    r32(0xd000_0ff0);
    // SAFETY: deliberately fatal: with an empty IDT, the divide error
    // cannot be delivered, nor the #GP that raises, nor the #DF, and the
    // vCPU shuts down. (A divide error, because this machine's nested KVM
    // fails to emulate the delivery of an int3.) The marker values in rax
    // and rdx show in the VMM's register dump where the host keeps them.
    unsafe {
        asm!(
            "lidt [{idtr}]",
            "div {zero}",
            idtr = in(reg) &EMPTY_IDT,
            zero = in(reg) 0u64,
            in("rax") 0x5452_4950_4c45_4654u64,
            in("rdx") 0x0000_0000_dead_f417u64,
            options(noreturn)
        )
    }
}

#[no_mangle]
extern "C" fn guest_main() -> ! {
    print("cpu: hello\n");
    for (leaf, sub) in [
        (0x0, 0),
        (0x1, 0),
        (0x6, 0),
        (0xa, 0),
        (0xb, 0),
        (0xb, 1),
        (0x4000_0000, 0),
        (0x4000_0001, 0),
        (0x8000_0000, 0),
        (0x8000_0001, 0),
        (0x8000_0008, 0),
        (0x8000_001d, 0),
        (0x8000_001d, 1),
        (0x8000_001d, 2),
        (0x8000_001d, 3),
        (0x8000_001e, 0),
        (0x8000_0022, 0),
    ] {
        show(leaf, sub);
    }
    if cmdline_has(b"twocpus") {
        start_ap();
    }
    if cmdline_has(b"fault") {
        triple_fault();
    }
    print("cpu: done\n");
    if cmdline_has(b"stay") {
        // Runs on (halted) until the VMM is killed.
        print("cpu: staying\n");
    } else {
        outb(0x3c0, (5 << 2) | 0x20);
    }
    loop {
        // SAFETY: halts until the VMM stops the vCPU.
        unsafe { asm!("hlt") };
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    print("cpu: panic\n");
    outb(0x3c0, (5 << 2) | 0x20);
    loop {}
}

// memset, memcpy, memmove, memcmp and the personality stub.
include!("libc_shim.rs");
// cmdline_has.
include!("cmdline.rs");
