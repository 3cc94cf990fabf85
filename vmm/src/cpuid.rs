//! The CPUID each vCPU sees: what KVM supports (KVM_GET_SUPPORTED_CPUID),
//! minus what neither this VMM nor KVM backs, plus this VM's topology.
//!
//! - Topology: vCPU `id` has APIC ID `id`; the `count` vCPUs are cores
//!   of one package, one thread each. Leaf 1 (initial APIC ID, logical
//!   count, HTT), leaves 0xb/0x1f (x2APIC topology: KVM reports only
//!   their first subleaf, so all are written here), AMD 0x8000_0008
//!   (core count, APIC ID size) and 0x8000_001e (extended APIC ID, core
//!   ID; KVM returns it zeroed rather than the host's), and the cache
//!   leaves' sharing counts (4, 0x8000_001d), which come from the host
//!   and otherwise describe the host's packages.
//! - No performance monitoring: the VMM turns KVM's vPMU off for the VM
//!   (KVM_CAP_PMU_CAPABILITY) where KVM offers that, and a nested host's
//!   KVM often has none to give; so no architectural PMU (leaf 0xa), no
//!   PDCM (IA32_PERF_CAPABILITIES), no AMD core/NB/LLC counter
//!   extensions or PerfMonV2. (AMD's four legacy counters have no CPUID
//!   bit: a guest probes them, KVM drops the writes, and Linux falls
//!   back to software events.)
//! - No nested virtualisation: VMX and SVM (and the SVM leaf) hidden.
//! - The KVM paravirtual leaves (0x4000_0000/1) stay as KVM reports them:
//!   every feature there is implemented in KVM itself, and none that
//!   needs the VMM (MSI_EXT_DEST_ID) is added.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use crate::error::{Error, Result};

const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_PDCM: u32 = 1 << 15;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const EXT1_ECX_SVM: u32 = 1 << 2;
const EXT1_ECX_TOPOEXT: u32 = 1 << 22;
const EXT1_ECX_PERFCTR_CORE: u32 = 1 << 23;
const EXT1_ECX_PERFCTR_NB: u32 = 1 << 24;
const EXT1_ECX_PERFCTR_LLC: u32 = 1 << 28;
/// Cache leaves (4, 0x8000_001d) EAX: cache type, and "logical
/// processors sharing this cache - 1" in bits 25:14.
const CACHE_TYPE_MASK: u32 = 0x1f;
const CACHE_SHARING_SHIFT: u32 = 14;
const CACHE_SHARING_MASK: u32 = 0xfff << CACHE_SHARING_SHIFT;
/// Leaf 4 EAX bits 31:26: addressable core IDs in the package - 1.
const LEAF4_CORES_SHIFT: u32 = 26;

/// Bits needed to number `count` things (0 for one).
fn width(count: u32) -> u32 {
    32 - count.saturating_sub(1).leading_zeros()
}

fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        ..Default::default()
    }
}

/// x2APIC topology subleaves for leaf 0xb or 0x1f: SMT level (one
/// thread), core level (`count` cores), then the terminating subleaf.
fn topology_leaf(function: u32, id: u32, count: u32) -> [kvm_cpuid_entry2; 3] {
    const SMT: u32 = 1;
    const CORE: u32 = 2;
    [
        entry(function, 0, [0, 1, (SMT << 8), id]),
        entry(function, 1, [width(count), count, (CORE << 8) | 1, id]),
        entry(function, 2, [0, 0, 2, id]),
    ]
}

/// `supported` shaped for vCPU `id` of `count` (see the module
/// comment). `tsc_deadline`: KVM emulates the TSC-deadline timer
/// (KVM_CAP_TSC_DEADLINE_TIMER), which KVM_GET_SUPPORTED_CPUID does not
/// always report.
pub fn shape(supported: &CpuId, id: u8, count: u8, tsc_deadline: bool) -> Result<CpuId> {
    let (id, count) = (id as u32, count as u32);
    let mut cpuid = supported.clone();
    let max_basic = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let topoext = cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == 0x8000_0001 && e.ecx & EXT1_ECX_TOPOEXT != 0);
    // Logical processors sharing a cache never exceed the package.
    let package_ids = (1u32 << width(count)) - 1;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (count << 16);
                e.edx |= LEAF1_EDX_HTT;
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                e.ecx &= !(LEAF1_ECX_VMX | LEAF1_ECX_PDCM);
                if tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
            }
            4 | 0x8000_001d if e.eax & CACHE_TYPE_MASK != 0 => {
                let sharing =
                    ((e.eax & CACHE_SHARING_MASK) >> CACHE_SHARING_SHIFT).min(package_ids);
                e.eax = (e.eax & !CACHE_SHARING_MASK) | (sharing << CACHE_SHARING_SHIFT);
                if e.function == 4 {
                    e.eax =
                        (e.eax & !(0x3f << LEAF4_CORES_SHIFT)) | (package_ids << LEAF4_CORES_SHIFT);
                }
            }
            // Architectural PMU; AMD PerfMonV2; SVM features.
            0xa | 0x8000_0022 | 0x8000_000a => {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
            0x8000_0001 => {
                e.ecx &= !(EXT1_ECX_SVM
                    | EXT1_ECX_PERFCTR_CORE
                    | EXT1_ECX_PERFCTR_NB
                    | EXT1_ECX_PERFCTR_LLC);
            }
            // NC (cores - 1) in bits 7:0, APIC ID size in 15:12.
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (width(count) << 12) | (count - 1);
            }
            // Extended APIC ID; core ID with one thread per core; one
            // node.
            0x8000_001e => {
                (e.eax, e.ebx, e.ecx, e.edx) = if topoext {
                    (id, id & 0xff, 0, 0)
                } else {
                    (0, 0, 0, 0)
                };
            }
            _ => {}
        }
    }
    cpuid.retain(|e| e.function != 0xb && e.function != 0x1f);
    let mut leaves = Vec::new();
    if max_basic >= 0xb {
        leaves.push(0xb);
    }
    if max_basic >= 0x1f {
        leaves.push(0x1f);
    }
    for f in leaves {
        for e in topology_leaf(f, id, count) {
            cpuid
                .push(e)
                .map_err(|e| Error::Usage(format!("CPUID table full: {e:?}")))?;
        }
    }
    Ok(cpuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(c: &CpuId, f: u32, i: u32) -> Option<kvm_cpuid_entry2> {
        c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .copied()
    }

    fn amd_like() -> CpuId {
        let e = |f, i, r| entry(f, i, r);
        CpuId::from_entries(&[
            e(0, 0, [0x1c, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            e(
                1,
                0,
                [
                    0xa10f11,
                    0x0002_0800,
                    0x7ef8_b203 | LEAF1_ECX_PDCM | LEAF1_ECX_VMX,
                    0x178b_fbff,
                ],
            ),
            e(0xa, 0, [0x0603_0302, 0, 0, 0x603]),
            e(0xb, 0, [1, 2, 0x100, 7]),
            e(
                0x8000_0001,
                0,
                [
                    0,
                    0,
                    0x0040_0393 | EXT1_ECX_SVM | EXT1_ECX_PERFCTR_CORE | EXT1_ECX_PERFCTR_NB,
                    0,
                ],
            ),
            e(0x8000_0008, 0, [0x3030, 0, 0x7001, 0]),
            e(0x8000_000a, 0, [1, 0x8000, 0, 0x1234]),
            e(0x8000_001d, 3, [0x4163 | (15 << 14), 0x3c0_003f, 0x7fff, 1]),
            e(0x8000_001e, 0, [0, 0, 0, 0]),
            e(0x8000_0022, 0, [7, 0x106, 0, 0]),
        ])
        .unwrap()
    }

    #[test]
    fn vcpu_topology_and_hidden_features() {
        let c = shape(&amd_like(), 2, 3, true).unwrap();
        let l1 = find(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 2, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 3, "logical count");
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(l1.ecx & (LEAF1_ECX_PDCM | LEAF1_ECX_VMX), 0);
        for f in [0xa, 0x8000_000a, 0x8000_0022] {
            let e = find(&c, f, 0).unwrap();
            assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0), "{f:#x}");
        }
        let x1 = find(&c, 0x8000_0001, 0).unwrap();
        assert_eq!(
            x1.ecx & (EXT1_ECX_SVM | EXT1_ECX_PERFCTR_CORE | EXT1_ECX_PERFCTR_NB),
            0
        );
        assert_ne!(x1.ecx & EXT1_ECX_TOPOEXT, 0);
        assert_eq!(find(&c, 0x8000_0008, 0).unwrap().ecx, 0x2002);
        let x1e = find(&c, 0x8000_001e, 0).unwrap();
        assert_eq!((x1e.eax, x1e.ebx, x1e.ecx), (2, 2, 0));
        // 16 sharing the host's L3 becomes at most the 4 IDs of this
        // package.
        let l3 = find(&c, 0x8000_001d, 3).unwrap();
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        let b0 = find(&c, 0xb, 0).unwrap();
        let b1 = find(&c, 0xb, 1).unwrap();
        let b2 = find(&c, 0xb, 2).unwrap();
        assert_eq!((b0.eax, b0.ebx, b0.ecx, b0.edx), (0, 1, 0x100, 2));
        assert_eq!((b1.eax, b1.ebx, b1.ecx, b1.edx), (2, 3, 0x201, 2));
        assert_eq!((b2.ebx, b2.ecx & 0xff00), (0, 0));
        assert!(find(&c, 0x1f, 0).is_none(), "max basic leaf 0x1c");
        assert_eq!(c.as_slice().iter().filter(|e| e.function == 0xb).count(), 3);
    }

    #[test]
    fn one_vcpu() {
        let c = shape(&amd_like(), 0, 1, false).unwrap();
        assert_eq!(find(&c, 0x8000_0008, 0).unwrap().ecx, 0);
        let b1 = find(&c, 0xb, 1).unwrap();
        assert_eq!((b1.eax, b1.ebx), (0, 1));
        assert_eq!((find(&c, 0x8000_001d, 3).unwrap().eax >> 14) & 0xfff, 0);
    }

    /// On this machine's KVM: the table KVM hands out goes through.
    #[test]
    fn shapes_what_this_kvm_supports() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            panic!("/dev/kvm is required");
        };
        let s = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let c = shape(&s, 1, 2, true).unwrap();
        assert_eq!(find(&c, 0xb, 1).unwrap().edx, 1);
        assert_eq!(find(&c, 1, 0).unwrap().ebx >> 24, 1);
    }
}
