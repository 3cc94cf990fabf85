//! Taking a device's interrupt, as a driver would get it: the device's
//! IOAPIC pin routed to one vector on this vCPU, whose handler counts it.
//! Interrupts are let in only inside [`wait_beyond`], one instruction at
//! a time, so the rest of the probe runs as before (interrupts off).

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, Ordering};

use crate::io::{fill, outb, rdtsc, w32, w64};

const IOAPIC: u64 = 0xfec0_0000;
const LAPIC: u64 = 0xfee0_0000;
/// The IDT: 256 gates of 16 bytes, in guest memory the rings do not use.
const IDT: u64 = 0x0050_0000;
const VECTOR: u8 = 0x40;
const SPURIOUS: u8 = 0xff;

/// Device interrupts taken (incremented by the handler).
static DEVICE_IRQS: AtomicU32 = AtomicU32::new(0);

// The handlers: count and end the interrupt at the local APIC (EOI);
// the spurious vector needs no EOI. The EOI register's address is above
// 2 GiB, out of reach of a sign-extended 32-bit displacement.
global_asm!(
    ".globl device_irq_entry",
    "device_irq_entry:",
    "push rax",
    "lock inc dword ptr [rip + {count}]",
    "mov rax, 0xfee000b0",
    "mov dword ptr [rax], 0",
    "pop rax",
    "iretq",
    ".globl spurious_irq_entry",
    "spurious_irq_entry:",
    "iretq",
    count = sym DEVICE_IRQS,
);

extern "C" {
    fn device_irq_entry();
    fn spurious_irq_entry();
}

#[repr(C, packed)]
struct Idtr {
    limit: u16,
    base: u64,
}

/// A 64-bit interrupt gate (present, ring 0) for `vector`.
fn gate(vector: u8, handler: u64, cs: u16) {
    let at = IDT + vector as u64 * 16;
    let lo = (handler & 0xffff) | (cs as u64) << 16 | 0x8e << 40 | ((handler >> 16) & 0xffff) << 48;
    w64(at, lo);
    w64(at + 8, handler >> 32);
}

fn ioapic_write(reg: u32, v: u32) {
    w32(IOAPIC, reg);
    w32(IOAPIC + 0x10, v);
}

/// Routes IOAPIC pin `irq` to this vCPU (APIC ID 0): edge-triggered,
/// active high, fixed delivery, as the VMM's ACPI tables describe the
/// devices' lines.
pub fn route(irq: u32) {
    // KVM wires IRQs 0-15 to the 8259 PICs too, which nobody programmed
    // (vector base 0): all their lines masked, only the IOAPIC delivers.
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    fill(IDT, 256 * 16, |_| 0);
    let cs: u16;
    // SAFETY: reads the code segment selector.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs) };
    gate(VECTOR, device_irq_entry as *const () as u64, cs);
    gate(SPURIOUS, spurious_irq_entry as *const () as u64, cs);
    let idtr = Idtr {
        limit: 256 * 16 - 1,
        base: IDT,
    };
    // SAFETY: the IDT's gates are valid or not present; interrupts stay
    // off until wait_beyond.
    unsafe { asm!("lidt [{0}]", in(reg) &idtr) };
    // Software-enable the local APIC.
    w32(LAPIC + 0xf0, 0x100 | SPURIOUS as u32);
    let entry = 0x10 + 2 * irq;
    ioapic_write(entry + 1, 0);
    ioapic_write(entry, VECTOR as u32);
}

/// Lets interrupts in until the handler's count differs from `seen`;
/// the new count, or None after `cycles` time-stamp-counter cycles.
pub fn wait_beyond(seen: u32, cycles: u64) -> Option<u32> {
    let start = rdtsc();
    loop {
        // SAFETY: interrupts open for one instruction, taken by the
        // handlers `route` installed; the block may use the stack (no
        // `nostack`), so nothing live sits below the stack pointer when
        // the CPU pushes the interrupt frame.
        unsafe { asm!("sti", "nop", "cli") };
        let n = DEVICE_IRQS.load(Ordering::SeqCst);
        if n != seen {
            return Some(n);
        }
        if rdtsc() - start > cycles {
            return None;
        }
        // SAFETY: a spin-loop hint.
        unsafe { asm!("pause") };
    }
}
