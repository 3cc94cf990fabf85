//! x86-64 vCPU boot state, as the Linux 64-bit boot protocol wants it
//! (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"): long mode
//! with paging on an identity map, a GDT holding flat __BOOT_CS (0x10)
//! and __BOOT_DS (0x18), interrupts off, %rsi pointing at boot_params.

use kvm_bindings::{
    kvm_enable_cap, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs,
    KVM_CAP_PMU_CAPABILITY, KVM_PMU_CAP_DISABLE,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::cpuid;
use crate::error::{Error, KvmContext, Result};
use crate::layout;
use crate::memory::Mem;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT: null, null, code (0x10), data (0x18), TSS (0x20).
const GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const CODE_SEL: u16 = 0x10;
const DATA_SEL: u16 = 0x18;
const TSS_SEL: u16 = 0x20;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment(entry: u64, selector: u16) -> kvm_segment {
    let flags = (entry >> 40) & 0xf0ff;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT and the identity-mapping page tables (4 GiB in 2 MiB
/// pages) into guest memory.
pub fn write_boot_tables(mem: &Mem) -> Result<()> {
    let w = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("writing boot tables at {addr:#x}: {e}")))
    };
    for (i, e) in GDT.iter().enumerate() {
        w(layout::GDT + i as u64 * 8, *e)?;
    }
    w(layout::PML4, layout::PDPT | 0x3)?;
    for i in 0..4u64 {
        let pd = layout::PD + i * 0x1000;
        w(layout::PDPT + i * 8, pd | 0x3)?;
        for j in 0..512u64 {
            // Present, writable, 2 MiB page.
            w(pd + j * 8, ((i << 30) | (j << 21)) | 0x83)?;
        }
    }
    Ok(())
}

/// What every vCPU's set-up starts from: KVM's CPUID table and
/// capabilities, read once per VM.
pub struct HostCpu {
    supported: CpuId,
    tsc_deadline: bool,
}

impl HostCpu {
    pub fn new(kvm: &Kvm) -> Result<HostCpu> {
        Ok(HostCpu {
            supported: kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .kvm("KVM_GET_SUPPORTED_CPUID")?,
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
        })
    }
}

/// Turns KVM's virtual PMU off for the VM when KVM offers that
/// (KVM_CAP_PMU_CAPABILITY; before any vCPU exists): the CPUID hides
/// performance monitoring (cpuid.rs), and KVM then drops the guest's
/// counter MSR writes whatever the host has.
pub fn disable_pmu(vm: &VmFd) -> Result<()> {
    let caps = vm.check_extension_raw(KVM_CAP_PMU_CAPABILITY.into());
    if caps <= 0 || caps as u32 & KVM_PMU_CAP_DISABLE == 0 {
        return Ok(());
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_PMU_CAPABILITY,
        ..Default::default()
    };
    cap.args[0] = KVM_PMU_CAP_DISABLE.into();
    vm.enable_cap(&cap).kvm("KVM_ENABLE_CAP(PMU_CAPABILITY)")
}

/// Sets CPUID, MSRs, FPU and local APIC for any vCPU, and for the boot
/// vCPU the long-mode registers starting at `entry`. Application
/// processors get the same state; they stay in the in-kernel APIC's
/// wait-for-SIPI until the guest starts them.
pub fn setup(host: &HostCpu, vcpu: &VcpuFd, id: u8, count: u8, entry: Option<u64>) -> Result<()> {
    let cpuid = cpuid::shape(&host.supported, id, count, host.tsc_deadline)?;
    vcpu.set_cpuid2(&cpuid).kvm("KVM_SET_CPUID2")?;
    let msr = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let msrs = Msrs::from_entries(&[
        msr(0x174, 0),                     // IA32_SYSENTER_CS
        msr(0x175, 0),                     // IA32_SYSENTER_ESP
        msr(0x176, 0),                     // IA32_SYSENTER_EIP
        msr(0xc000_0081, 0),               // STAR
        msr(0xc000_0082, 0),               // LSTAR
        msr(0xc000_0083, 0),               // CSTAR
        msr(0xc000_0084, 0),               // SYSCALL_MASK
        msr(0xc000_0102, 0),               // KERNEL_GS_BASE
        msr(0x10, 0),                      // TSC
        msr(0x1a0, 1),                     // IA32_MISC_ENABLE: fast strings
        msr(0x277, 0x0007_0406_0007_0406), // PAT, power-on value
        // MTRRs on, write-back by default (no ranges): Linux 6.1 turns
        // PAT off too when it finds MTRRs disabled.
        msr(0x2ff, (1 << 11) | 6),
    ])
    .map_err(|e| Error::Memory(format!("MSR list: {e:?}")))?;
    let n = vcpu.set_msrs(&msrs).kvm("KVM_SET_MSRS")?;
    if n != msrs.as_slice().len() {
        return Err(Error::Usage(format!(
            "KVM accepted only {n} of {} boot MSRs",
            msrs.as_slice().len()
        )));
    }
    vcpu.set_fpu(&kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    })
    .kvm("KVM_SET_FPU")?;
    set_lint(vcpu)?;
    let Some(entry) = entry else {
        // Application processors wait for INIT/SIPI in the in-kernel APIC.
        return Ok(());
    };
    let mut sregs = vcpu.get_sregs().kvm("KVM_GET_SREGS")?;
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let code = segment(GDT[2], CODE_SEL);
    let data = segment(GDT[3], DATA_SEL);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT[4], TSS_SEL);
    sregs.cr3 = layout::PML4;
    sregs.cr4 |= CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).kvm("KVM_SET_SREGS")?;
    vcpu.set_regs(&kvm_regs {
        rip: entry,
        rsp: layout::BOOT_STACK,
        rbp: layout::BOOT_STACK,
        rsi: layout::ZERO_PAGE,
        rflags: 2,
        ..Default::default()
    })
    .kvm("KVM_SET_REGS")?;
    Ok(())
}

/// LINT0 as ExtINT (the PIC's line) and LINT1 as NMI, as a BIOS leaves
/// them.
fn set_lint(vcpu: &VcpuFd) -> Result<()> {
    const LINT0: usize = 0x350;
    const LINT1: usize = 0x360;
    const EXTINT: u32 = 0x7 << 8;
    const NMI: u32 = 0x4 << 8;
    let mut lapic = vcpu.get_lapic().kvm("KVM_GET_LAPIC")?;
    let mut rw = |off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, v) in b.iter_mut().enumerate() {
            *v = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | mode;
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    };
    rw(LINT0, EXTINT);
    rw(LINT1, NMI);
    vcpu.set_lapic(&lapic).kvm("KVM_SET_LAPIC")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode() {
        let c = segment(GDT[2], CODE_SEL);
        assert_eq!(
            (c.l, c.db, c.present, c.s, c.type_, c.g),
            (1, 0, 1, 1, 0xb, 1)
        );
        let d = segment(GDT[3], DATA_SEL);
        assert_eq!((d.l, d.db, d.present, d.type_), (0, 1, 1, 0x3));
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }
}
