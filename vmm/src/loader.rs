//! Kernel, initramfs, command line and boot_params (the "zero page",
//! Documentation/arch/x86/zero-page.rst) with the e820 map.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::layout;
use crate::memory::GuestRam;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// "HdrS": a boot_params header the kernel accepts.
const HDRS: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// loadflags: the kernel was loaded high; do not use the heap hint.
const LOADED_HIGH: u8 = 0x1;
const CAN_USE_HEAP: u8 = 0x80;

pub struct Loaded {
    /// 64-bit entry point.
    pub entry: u64,
}

/// Loads `kernel` (bzImage, or ELF vmlinux / freestanding ELF), the
/// optional initramfs, the command line and boot_params.
pub fn load(
    ram: &GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<Loaded> {
    let mut f = File::open(kernel).map_err(|source| Error::Kernel {
        path: kernel.into(),
        source,
    })?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let (entry, header) = match Elf::load(&ram.mem, None, &mut f, himem) {
        Ok(r) => (r.kernel_load.0, None),
        Err(elf_err) => match BzImage::load(&ram.mem, None, &mut f, himem) {
            // startup_64 sits 0x200 past the start of the protected-mode
            // kernel (boot.rst, "64-bit Boot Protocol").
            Ok(r) => (r.kernel_load.0 + 0x200, r.setup_header),
            Err(bz_err) => {
                return Err(Error::KernelLoad {
                    path: kernel.into(),
                    msg: format!("neither an ELF ({elf_err}) nor a bzImage ({bz_err})"),
                })
            }
        },
    };

    let mut cl = Cmdline::new(layout::CMDLINE_MAX).map_err(|e| Error::Usage(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| Error::Usage(format!("kernel command line: {e}")))?;
    load_cmdline(&ram.mem, GuestAddress(layout::CMDLINE), &cl)
        .map_err(|e| Error::Usage(format!("kernel command line: {e}")))?;

    let mut hdr = header.unwrap_or_else(|| setup_header {
        boot_flag: 0xaa55,
        header: HDRS,
        kernel_alignment: 0x0100_0000,
        ..Default::default()
    });
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.loadflags |= LOADED_HIGH;
    hdr.loadflags &= !CAN_USE_HEAP;
    hdr.cmd_line_ptr = layout::CMDLINE as u32;
    hdr.cmdline_size = cl.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0) as u32;

    if let Some(path) = initrd {
        let size = std::fs::metadata(path)
            .map_err(|source| Error::Initrd {
                path: path.into(),
                source,
            })?
            .len();
        // Highest page-aligned spot below the end of low RAM (and the
        // kernel's initrd_addr_max when it states one).
        let mut limit = ram.low_end();
        if hdr.initrd_addr_max != 0 {
            limit = limit.min(hdr.initrd_addr_max as u64 + 1);
        }
        let addr = limit
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= layout::HIMEM_START + (16 << 20))
            .ok_or(Error::InitrdTooBig { size, limit })?;
        let data = std::fs::read(path).map_err(|source| Error::Initrd {
            path: path.into(),
            source,
        })?;
        if data.len() as u64 != size {
            return Err(Error::Initrd {
                path: path.into(),
                source: std::io::Error::other("file changed size while read"),
            });
        }
        ram.mem
            .write_slice(&data, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("writing initrd: {e}")))?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    let mut e820 = vec![
        (0, layout::EBDA_START, E820_RAM),
        (
            layout::EBDA_START,
            layout::HIMEM_START - layout::EBDA_START,
            E820_RESERVED,
        ),
    ];
    for r in &ram.regions {
        let start = r.guest.max(layout::HIMEM_START);
        e820.push((start, r.guest + r.size - start, E820_RAM));
    }
    for (i, (addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = e820.len() as u8;
    ram.mem
        .write_obj(params, GuestAddress(layout::ZERO_PAGE))
        .map_err(|e| Error::Memory(format!("writing boot_params: {e}")))?;
    Ok(Loaded { entry })
}
