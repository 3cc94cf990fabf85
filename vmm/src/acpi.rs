//! ACPI tables (rust-vmm's acpi_tables): RSDP, XSDT, a hardware-reduced
//! FADT, the MADT and a DSDT describing the serial port and each
//! virtio-mmio device (`_HID "LNRO0005"`, which Linux's virtio_mmio
//! driver binds). The 6.1 cloud kernel finds CPUs and virtio-mmio devices
//! only this way (no MP table parsing, no command-line devices).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::layout;
use crate::memory::Mem;

const OEM_ID: [u8; 6] = *b"RIMG  ";
const OEM_TABLE: [u8; 8] = *b"RIMGVMM ";

/// A virtio-mmio device as the DSDT names it.
pub struct MmioDev {
    pub base: u64,
    pub irq: u32,
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn dsdt(devs: &[MmioDev]) -> Vec<u8> {
    let mut body = Vec::new();
    // COM1, so 8250_pnp knows the port and its interrupt.
    let com1_io = aml::IO::new(layout::SERIAL_PORT, layout::SERIAL_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, layout::SERIAL_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_crs);
    aml::Device::new("_SB_.COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs])
        .to_aml_bytes(&mut body);
    for (i, d) in devs.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, d.base as u32, layout::VIRTIO_MMIO_SIZE as u32);
        // Edge: the backend signals used buffers through an irqfd, which
        // pulses the line.
        let irq = aml::Interrupt::new(true, true, false, false, d.irq);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid_str: &'static str = "LNRO0005";
        let uid_val = i as u32;
        let hid = aml::Name::new("_HID".into(), &hid_str);
        let uid = aml::Name::new("_UID".into(), &uid_val);
        let crs = aml::Name::new("_CRS".into(), &crs);
        let name = format!("_SB_.V{i:03X}");
        aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut body);
    }
    // S5 (soft off): sleep type 5 in the sleep control register.
    let s5 = aml::Package::new(vec![&5u8]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port as u64,
        )
    };
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    f.sleep_control_reg = io(layout::ACPI_SLEEP_CONTROL);
    f.sleep_status_reg = io(layout::ACPI_SLEEP_STATUS);
    f.reset_reg = io(layout::ACPI_RESET);
    f.reset_value = layout::ACPI_RESET_VALUE;
    // IA-PC boot architecture flags (ACPI 6.5, 5.2.9.3): no 8042, no
    // VGA, and above all no CMOS RTC. Linux otherwise registers rtc_cmos
    // and probes ports 0x70/0x71, which nothing here answers: measured
    // 4.2 s of a nested boot. Wall-clock time comes from kvm-clock.
    f.iapc_boot_arch = (IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"RIMGVMM\0").into();
    bytes(&f.finalize())
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(layout::LAPIC as u32),
    );
    for i in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(cpus, layout::IOAPIC as u32, 0));
    bytes(&m)
}

/// Writes all tables between `ACPI_START` and `ACPI_END`; returns the
/// RSDP's address.
pub fn write(mem: &Mem, cpus: u8, devs: &[MmioDev]) -> Result<u64> {
    let rsdp_addr = layout::ACPI_START;
    let mut at = rsdp_addr + 64;
    let mut put = |data: &[u8]| -> Result<u64> {
        let addr = at;
        if addr + data.len() as u64 > layout::ACPI_END {
            return Err(Error::Memory("ACPI tables do not fit below 1 MiB".into()));
        }
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("writing ACPI table: {e}")))?;
        at = (addr + data.len() as u64).next_multiple_of(16);
        Ok(addr)
    };
    let dsdt_addr = put(&dsdt(devs))?;
    let fadt_addr = put(&fadt(dsdt_addr))?;
    let madt_addr = put(&madt(cpus))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = put(&bytes(&xsdt))?;
    mem.write_slice(
        &bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
        GuestAddress(rsdp_addr),
    )
    .map_err(|e| Error::Memory(format!("writing RSDP: {e}")))?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        let d = dsdt(&[MmioDev {
            base: layout::virtio_mmio(0),
            irq: 5,
        }]);
        assert_eq!(&d[..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes(d[4..8].try_into().unwrap()) as usize,
            d.len()
        );
        assert!(checksum_ok(&d));
        assert!(d.windows(8).any(|w| w == b"LNRO0005"));
        let f = fadt(0x1234);
        assert_eq!(&f[..4], b"FACP");
        assert!(checksum_ok(&f));
        // Hardware-reduced flag (bit 20 of the flags at offset 112).
        let flags = u32::from_le_bytes(f[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0);
        // IAPC_BOOT_ARCH at offset 109: no CMOS RTC, no VGA, no 8042.
        let boot_arch = u16::from_le_bytes(f[109..111].try_into().unwrap());
        assert_eq!(boot_arch, (1 << 5) | (1 << 2));
        let m = madt(2);
        assert!(checksum_ok(&m));
        assert_eq!(m.len(), 44 + 2 * 8 + 12);
    }
}
