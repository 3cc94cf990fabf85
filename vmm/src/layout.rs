//! Guest physical address map. Everything the VMM places in guest memory
//! or the MMIO hole is named here, so overlaps are visible in one place.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_7000  boot_params (zero page)
//! 0x0000_8ff0  boot stack (grows down)  0x0000_9000  PML4, PDPT, 4 PDs
//! 0x0002_0000  kernel command line      0x000e_0000  ACPI RSDP and tables
//! 0x0010_0000  kernel (1 MiB)           top of low RAM: initrd
//! 0xd000_0000  virtio-mmio windows, 4 KiB each, IRQ 5 upwards
//! 0xfec0_0000  IOAPIC                   0xfee0_0000  local APICs
//! ```
//! RAM above `MMIO_HOLE_START` continues at 4 GiB.

pub const GDT: u64 = 0x500;
pub const ZERO_PAGE: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
/// Four page directories of 2 MiB pages: the identity map covers 4 GiB,
/// so a freestanding guest reaches the MMIO windows without its own tables.
pub const PD: u64 = 0xb000;
pub const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Where Linux looks for the RSDP on legacy-free machines too (and it is
/// also passed in boot_params.acpi_rsdp_addr).
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// End of conventional memory reported usable below 1 MiB.
pub const EBDA_START: u64 = 0x9fc00;
pub const HIMEM_START: u64 = 0x100000;

pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 1 << 32;
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC: u64 = 0xfec0_0000;
pub const LAPIC: u64 = 0xfee0_0000;

/// First IRQ given to virtio-mmio devices (4 is the serial port's).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC pins available to devices (KVM's IOAPIC has 24).
pub const MAX_DEVICES: usize = 24 - VIRTIO_IRQ_BASE as usize;

pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// i8042 command port: 0xfe written here is the keyboard-controller reset
/// Linux uses with `reboot=k`.
pub const I8042_CMD: u16 = 0x64;
pub const I8042_DATA: u16 = 0x60;
/// Hardware-reduced ACPI sleep control / status registers (FADT).
pub const ACPI_SLEEP_CONTROL: u16 = 0x3c0;
pub const ACPI_SLEEP_STATUS: u16 = 0x3c1;
/// FADT reset register.
pub const ACPI_RESET: u16 = 0x3c2;
pub const ACPI_RESET_VALUE: u8 = 0x1;

/// (start, len) of guest RAM regions for `mem` bytes of memory.
pub fn ram_regions(mem: u64) -> Vec<(u64, u64)> {
    if mem <= MMIO_HOLE_START {
        vec![(0, mem)]
    } else {
        vec![(0, MMIO_HOLE_START), (FOUR_GIB, mem - MMIO_HOLE_START)]
    }
}

/// MMIO window of virtio device `i`.
pub fn virtio_mmio(i: usize) -> u64 {
    VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE
}

pub fn virtio_irq(i: usize) -> u32 {
    VIRTIO_IRQ_BASE + i as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_skip_the_hole() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![
                (0, MMIO_HOLE_START),
                (FOUR_GIB, (4 << 30) - MMIO_HOLE_START)
            ]
        );
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (GDT, 0x100),
            (ZERO_PAGE, 0x1000),
            (PML4, 0x1000),
            (PDPT, 0x1000),
            (PD, 0x4000),
            (CMDLINE, CMDLINE_MAX as u64),
            (ACPI_START, ACPI_END - ACPI_START),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{a:x?} {b:x?}");
            }
        }
        const { assert!(BOOT_STACK < PML4 && BOOT_STACK > ZERO_PAGE + 0x1000) };
        const { assert!(VIRTIO_MMIO_BASE + MAX_DEVICES as u64 * VIRTIO_MMIO_SIZE < IOAPIC) };
    }
}
