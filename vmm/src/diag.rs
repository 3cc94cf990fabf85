//! What a vCPU leaves behind when the guest dies under it: its recent
//! exits (a small ring, filled on every exit without allocating) and, on
//! a triple fault, a KVM internal error, a failed entry or a failed
//! KVM_RUN, a dump of its registers, segments, control registers,
//! descriptor tables and pending events.
//!
//! When one vCPU fails, the others are taken out of KVM_RUN (a signal,
//! [`Kick`]) and dump their state too, before the VMM exits: what the
//! rest of the guest was doing when one CPU died. SIGUSR1 asks every
//! vCPU for the same dump while the guest goes on running: where a
//! guest that hangs is stuck.
//!
//! On AMD (SVM) KVM re-initialises a vCPU after a SHUTDOWN intercept
//! (the VMCB is undefined after one), so a triple fault the hardware
//! took leaves the INIT state in the registers: the dump says so, and
//! the exit ring (with the time of each exit before the fault) is then
//! what shows where the guest was.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::VcpuFd;

/// Exits kept per vCPU.
pub const RING: usize = 16;

#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub enum ExitKind {
    #[default]
    None,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    Other,
}

/// One exit: what, where (port or guest-physical address), the data
/// (for reads, what the VMM answered) and when.
#[derive(Clone, Copy, Debug)]
pub struct Exit {
    pub kind: ExitKind,
    pub addr: u64,
    pub len: u8,
    pub data: [u8; 8],
    pub at: Option<Instant>,
}

impl Default for Exit {
    fn default() -> Exit {
        Exit {
            kind: ExitKind::None,
            addr: 0,
            len: 0,
            data: [0; 8],
            at: None,
        }
    }
}

/// The last [`RING`] exits of one vCPU and how many it took in all.
pub struct ExitRing {
    slots: [Exit; RING],
    total: u64,
}

impl Default for ExitRing {
    fn default() -> ExitRing {
        ExitRing {
            slots: [Exit::default(); RING],
            total: 0,
        }
    }
}

impl ExitRing {
    pub fn record(&mut self, kind: ExitKind, addr: u64, data: &[u8]) {
        let n = data.len().min(8);
        let mut d = [0u8; 8];
        d[..n].copy_from_slice(&data[..n]);
        self.slots[(self.total % RING as u64) as usize] = Exit {
            kind,
            addr,
            len: data.len().min(255) as u8,
            data: d,
            at: Some(Instant::now()),
        };
        self.total += 1;
    }

    /// Oldest first.
    pub fn recent(&self) -> impl Iterator<Item = &Exit> {
        let n = self.total.min(RING as u64) as usize;
        let start = (self.total as usize + RING - n) % RING;
        (0..n).map(move |i| &self.slots[(start + i) % RING])
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

fn value(e: &Exit) -> u64 {
    let n = (e.len as usize).min(8);
    let mut b = [0u8; 8];
    b[..n].copy_from_slice(&e.data[..n]);
    u64::from_le_bytes(b)
}

fn exit_line(out: &mut String, e: &Exit, now: Instant) {
    let ago =
        e.at.map(|t| now.saturating_duration_since(t).as_micros())
            .unwrap_or(0);
    let (what, space) = match e.kind {
        ExitKind::IoIn => ("in", "port"),
        ExitKind::IoOut => ("out", "port"),
        ExitKind::MmioRead => ("mmio-read", "addr"),
        ExitKind::MmioWrite => ("mmio-write", "addr"),
        ExitKind::Hlt => ("hlt", ""),
        ExitKind::Other => ("other", "reason"),
        ExitKind::None => return,
    };
    let _ = write!(out, "  -{ago:>8}us {what:<10}");
    if !space.is_empty() {
        let _ = write!(out, " {space} {:#x}", e.addr);
    }
    if e.len > 0 {
        let _ = write!(out, " len {} data {:#x}", e.len, value(e));
    }
    out.push('\n');
}

fn seg(out: &mut String, name: &str, s: &kvm_segment) {
    let _ = writeln!(
        out,
        "  {name:<3} sel {:#06x} base {:#018x} limit {:#010x} type {:#x} s {} dpl {} p {} l {} db {} g {}{}",
        s.selector,
        s.base,
        s.limit,
        s.type_,
        s.s,
        s.dpl,
        s.present,
        s.l,
        s.db,
        s.g,
        if s.unusable != 0 { " unusable" } else { "" }
    );
}

fn table(out: &mut String, name: &str, t: &kvm_dtable) {
    let _ = writeln!(out, "  {name} base {:#018x} limit {:#06x}", t.base, t.limit);
}

fn regs(out: &mut String, r: &kvm_regs) {
    let _ = writeln!(
        out,
        "  rip {:#018x} rsp {:#018x} rflags {:#010x}",
        r.rip, r.rsp, r.rflags
    );
    let gp = [
        ("rax", r.rax),
        ("rbx", r.rbx),
        ("rcx", r.rcx),
        ("rdx", r.rdx),
        ("rsi", r.rsi),
        ("rdi", r.rdi),
        ("rbp", r.rbp),
        ("r8", r.r8),
        ("r9", r.r9),
        ("r10", r.r10),
        ("r11", r.r11),
        ("r12", r.r12),
        ("r13", r.r13),
        ("r14", r.r14),
        ("r15", r.r15),
    ];
    for row in gp.chunks(4) {
        out.push(' ');
        for (n, v) in row {
            let _ = write!(out, " {n:<3} {v:#018x}");
        }
        out.push('\n');
    }
}

fn sregs(out: &mut String, s: &kvm_sregs) {
    for (n, v) in [
        ("cs", &s.cs),
        ("ss", &s.ss),
        ("ds", &s.ds),
        ("es", &s.es),
        ("fs", &s.fs),
        ("gs", &s.gs),
        ("tr", &s.tr),
        ("ldt", &s.ldt),
    ] {
        seg(out, n, v);
    }
    table(out, "gdt", &s.gdt);
    table(out, "idt", &s.idt);
    let _ = writeln!(
        out,
        "  cr0 {:#010x} cr2 {:#018x} cr3 {:#018x} cr4 {:#010x} cr8 {:#x}",
        s.cr0, s.cr2, s.cr3, s.cr4, s.cr8
    );
    let _ = writeln!(out, "  efer {:#x} apic_base {:#x}", s.efer, s.apic_base);
    let pending: Vec<String> = s
        .interrupt_bitmap
        .iter()
        .enumerate()
        .flat_map(|(w, bits)| {
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| format!("{:#x}", w * 64 + b))
        })
        .collect();
    if !pending.is_empty() {
        let _ = writeln!(out, "  pending interrupt vectors: {}", pending.join(" "));
    }
}

fn events(out: &mut String, e: &kvm_vcpu_events) {
    let _ = writeln!(
        out,
        "  events: exception injected {} pending {} nr {} error {:#x} | interrupt injected {} nr {:#x} shadow {} | nmi injected {} pending {} masked {} | triple fault pending {}",
        e.exception.injected,
        e.exception.pending,
        e.exception.nr,
        e.exception.error_code,
        e.interrupt.injected,
        e.interrupt.nr,
        e.interrupt.shadow,
        e.nmi.injected,
        e.nmi.pending,
        e.nmi.masked,
        e.triple_fault.pending,
    );
}

/// The INIT state KVM leaves after re-initialising a vCPU (real mode,
/// CS base 0xffff0000, RIP 0xfff0).
fn looks_reset(r: &kvm_regs, s: &kvm_sregs) -> bool {
    r.rip == 0xfff0 && s.cs.selector == 0xf000 && s.cr0 & 1 == 0
}

/// The dump of vCPU `id`, headed by `why`. Reads the vCPU's state with
/// KVM_GET_REGS, KVM_GET_SREGS and KVM_GET_VCPU_EVENTS (all allowed by
/// the VMM's seccomp filter on vCPU descriptors); a read that fails is
/// reported in its place.
pub fn dump(id: usize, why: &str, vcpu: &VcpuFd, ring: &ExitRing) -> String {
    let now = Instant::now();
    let mut out = format!("vCPU {id} state ({why}):\n");
    let r = vcpu.get_regs();
    let s = vcpu.get_sregs();
    match &r {
        Ok(r) => {
            out.push_str("registers:\n");
            regs(&mut out, r);
        }
        Err(e) => {
            let _ = writeln!(out, "registers: KVM_GET_REGS failed: {e}");
        }
    }
    match &s {
        Ok(s) => {
            out.push_str("segments and system registers:\n");
            sregs(&mut out, s);
        }
        Err(e) => {
            let _ = writeln!(out, "segments: KVM_GET_SREGS failed: {e}");
        }
    }
    match vcpu.get_vcpu_events() {
        Ok(e) => events(&mut out, &e),
        Err(e) => {
            let _ = writeln!(out, "  events: KVM_GET_VCPU_EVENTS failed: {e}");
        }
    }
    if let (Ok(r), Ok(s)) = (&r, &s) {
        if looks_reset(r, s) {
            out.push_str(
                "  (this is the INIT state: KVM re-initialises an AMD vCPU on a \
                 shutdown intercept, so the state at the fault is lost; the exits \
                 below show where the guest was)\n",
            );
        }
    }
    let _ = writeln!(
        out,
        "recent exits ({} of {} in all, oldest first, time before this dump):",
        ring.total().min(RING as u64),
        ring.total()
    );
    for e in ring.recent() {
        exit_line(&mut out, e, now);
    }
    out
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The running VM's [`Kick`], for the SIGUSR1 handler.
static KICK: OnceLock<Arc<Kick>> = OnceLock::new();

/// SIGUSR1, on whichever thread it lands: every vCPU is asked for a
/// dump of its state and taken out of KVM_RUN to write it, then goes on
/// running (an operator's or a test's view of a guest that hangs). Only
/// atomics and tgkill here: async-signal-safe.
extern "C" fn on_dump_request(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if let Some(k) = KICK.get() {
        k.dumps.fetch_add(1, Ordering::AcqRel);
        k.kick_all(None);
    }
}

/// Installs [`on_dump_request`] for SIGUSR1. SA_RESTART: the signal may
/// land on any thread, and the blocking reads of the others (stdin, the
/// vhost-user sockets) go on rather than fail with EINTR.
fn install_dump_handler() -> crate::error::Result<()> {
    // SAFETY: a zeroed sigaction is a valid value (no handler, empty
    // mask), filled in below.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_dump_request as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: `act` is initialised, and the handler only touches
    // atomics and calls tgkill (async-signal-safe); the old action is not
    // asked for.
    let r = unsafe {
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGUSR1, &act, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(crate::error::Error::Io {
            what: "installing the SIGUSR1 handler".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Stopping every vCPU for a dump: once one has failed, or on SIGUSR1.
pub struct Kick {
    /// This process's ID, read before the seccomp filter forbids getpid.
    pid: libc::pid_t,
    /// Thread ID of each vCPU thread (0 until it registers).
    tids: Vec<AtomicI32>,
    requested: AtomicBool,
    /// SIGUSR1 dumps asked for so far.
    dumps: AtomicU64,
    dumped: Mutex<usize>,
    cv: Condvar,
}

impl Kick {
    /// For `n` vCPUs; installs the (empty) handler of
    /// [`rimg_vmm::seccomp::kick_signal`], whose only effect is that
    /// KVM_RUN returns EINTR, and the SIGUSR1 handler (dumps on request).
    pub fn new(n: usize) -> crate::error::Result<Arc<Kick>> {
        let sig = rimg_vmm::seccomp::kick_signal();
        vmm_sys_util::signal::register_signal_handler(sig, on_kick).map_err(|e| {
            crate::error::Error::Io {
                what: format!("installing the handler of signal {sig}"),
                source: e.into(),
            }
        })?;
        let k = Arc::new(Kick {
            pid: std::process::id() as libc::pid_t,
            tids: (0..n).map(|_| AtomicI32::new(0)).collect(),
            requested: AtomicBool::new(false),
            dumps: AtomicU64::new(0),
            dumped: Mutex::new(0),
            cv: Condvar::new(),
        });
        // One VM per process: a second would keep the first's.
        if KICK.set(k.clone()).is_ok() {
            install_dump_handler()?;
        }
        Ok(k)
    }

    /// Called by vCPU thread `id` before it first enters the guest.
    pub fn register(&self, id: usize) {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        self.tids[id].store(tid, Ordering::Release);
    }

    /// Whether another vCPU failed and wants this one's dump.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Whether a SIGUSR1 dump was asked for since `seen` (which is then
    /// brought up to date).
    pub fn dump_asked(&self, seen: &mut u64) -> bool {
        let now = self.dumps.load(Ordering::Acquire);
        std::mem::replace(seen, now) != now
    }

    /// Sends the kick signal to every registered vCPU thread but `skip`.
    fn kick_all(&self, skip: Option<usize>) -> usize {
        let mut n = 0;
        for (i, t) in self.tids.iter().enumerate() {
            let tid = t.load(Ordering::Acquire);
            if Some(i) == skip || tid == 0 {
                continue;
            }
            // SAFETY: tgkill to a thread of this process with a signal
            // whose handler does nothing.
            unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    self.pid,
                    tid,
                    rimg_vmm::seccomp::kick_signal(),
                )
            };
            n += 1;
        }
        n
    }

    /// Brings every vCPU out of KVM_RUN (to see a pause).
    pub fn kick_vcpus(&self) {
        self.kick_all(None);
    }

    /// vCPU `me` failed: the others are asked for their dumps, and given
    /// up to a second to write them. Returns false if another vCPU
    /// started this first (then `me` only adds its own dump).
    pub fn stop_others(&self, me: usize) -> bool {
        if self.requested.swap(true, Ordering::AcqRel) {
            self.done();
            return false;
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut dumped = lock(&self.dumped);
        // Again each round: a signal that lands while a vCPU is out of
        // KVM_RUN (handling an exit) does not stop it.
        while *dumped < self.kick_all(Some(me)) && Instant::now() < deadline {
            dumped = self
                .cv
                .wait_timeout(dumped, Duration::from_millis(20))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// This vCPU has written its dump.
    pub fn done(&self) {
        *lock(&self.dumped) += 1;
        self.cv.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_exits_in_order() {
        let mut r = ExitRing::default();
        assert_eq!(r.recent().count(), 0);
        for i in 0..40u64 {
            r.record(ExitKind::IoOut, 0x80, &[i as u8]);
        }
        let seen: Vec<u8> = r.recent().map(|e| e.data[0]).collect();
        assert_eq!(seen, (24..40).collect::<Vec<u8>>());
        assert_eq!(r.total(), 40);
        r.record(ExitKind::MmioRead, 0xd000_0060, &[1, 2, 3, 4]);
        let last = r.recent().last().unwrap();
        assert_eq!(
            (last.kind, last.addr, value(last)),
            (ExitKind::MmioRead, 0xd000_0060, 0x0403_0201)
        );
        let mut s = String::new();
        exit_line(&mut s, last, Instant::now());
        assert!(
            s.contains("mmio-read  addr 0xd0000060 len 4 data 0x4030201"),
            "{s}"
        );
    }

    #[test]
    fn long_data_is_cut_to_eight_bytes() {
        let mut r = ExitRing::default();
        r.record(ExitKind::MmioWrite, 0, &[0xff; 300]);
        let e = r.recent().next().unwrap();
        assert_eq!((e.len, value(e)), (255, u64::MAX));
    }
}
