//! The guest's serial console: vm-superio's 16550A on IRQ 4, with one
//! correction to how it raises the transmitter-empty (THRE) interrupt.
//!
//! A real UART's interrupt output follows its conditions: enabling the
//! THRE interrupt (IER bit 1) while the holding register is empty, which
//! in this model it always is, asserts it at once. Linux's 8250 driver
//! relies on that: its transmit path sets IER.THRI and, unless it found
//! the UART buggy at start-up, waits for the interrupt. vm-superio raises
//! it only when its IIR's THRE bit was clear, and that bit is cleared by
//! nothing but a read of IIR. An interrupt the guest never handled (an
//! edge lost, e.g. while the guest had the IOAPIC pin masked) leaves the
//! bit set, and every later IER write then raises nothing: the console
//! would stop for good. So an IER write enabling THRI first drops a stale
//! identification, as reading IIR does; the guest sees at most one
//! spurious interrupt, which the driver ignores. (Found while chasing a
//! nested run whose guest stopped printing for minutes; whether that
//! stall was this is not established.)

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Register offsets (16550A).
const IER: u8 = 1;
const IIR: u8 = 2;
const IER_THRI: u8 = 1 << 1;

/// An interrupt line: for the VMM, an irqfd on IRQ 4.
pub trait Line {
    fn pulse(&self) -> std::io::Result<()>;
}

impl Line for EventFd {
    fn pulse(&self) -> std::io::Result<()> {
        self.write(1)
    }
}

pub struct IrqLine<L: Line>(pub L);

impl<L: Line> Trigger for IrqLine<L> {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.pulse()
    }
}

/// Guest console output, unbuffered so prompts without a newline show.
pub struct Console;

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(b)?;
        out.flush()?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

pub struct Uart<L: Line, W: Write> {
    serial: Serial<IrqLine<L>, NoEvents, W>,
}

impl<L: Line, W: Write> Uart<L, W> {
    pub fn new(line: L, out: W) -> Self {
        Uart {
            serial: Serial::new(IrqLine(line), out),
        }
    }

    /// A guest write to register `offset`.
    pub fn write(&mut self, offset: u8, v: u8) {
        if offset == IER && v & IER_THRI != 0 {
            // See the module docs: the THRE interrupt is raised anew.
            let _ = self.serial.read(IIR);
        }
        // Errors: the console's output failed (the byte is dropped, as
        // a real UART's line would drop it) or the irqfd write did.
        let _ = self.serial.write(offset, v);
    }

    /// A guest read of register `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.serial.read(offset)
    }

    /// Host input for the guest; how many bytes were taken.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[derive(Clone, Default)]
    struct Count(Rc<Cell<u32>>);
    impl Line for Count {
        fn pulse(&self) -> std::io::Result<()> {
            self.0.set(self.0.get() + 1);
            Ok(())
        }
    }

    const THR: u8 = 0;

    /// The interrupt the guest missed: a byte written with THRI enabled
    /// raised it, the guest never read IIR. Its transmit path then turns
    /// THRI off and on again and must get an interrupt.
    #[test]
    fn enabling_thri_raises_the_interrupt_after_a_missed_one() {
        let n = Count::default();
        let mut u = Uart::new(n.clone(), Vec::new());
        u.write(IER, IER_THRI);
        let after_enable = n.0.get();
        u.write(THR, b'x');
        assert_eq!(n.0.get(), after_enable, "THRE still pending: no new edge");
        u.write(IER, 0);
        u.write(IER, IER_THRI | 1);
        assert_eq!(
            n.0.get(),
            after_enable + 1,
            "re-enabling THRI raised nothing"
        );
        // The guest's handler then sees THRE and writes on.
        assert_eq!(u.read(IIR) & 0x0f, 0x02, "IIR: THRE");
        u.write(THR, b'y');
        assert_eq!(n.0.get(), after_enable + 2);
    }

    /// Writes that leave THRI off raise nothing.
    #[test]
    fn thri_off_raises_nothing() {
        let n = Count::default();
        let mut u = Uart::new(n.clone(), Vec::new());
        u.write(IER, 1);
        u.write(THR, b'x');
        u.write(IER, 0);
        assert_eq!(n.0.get(), 0);
    }
}
