//! Builds the VM (memory, irqchip, PIT, devices, boot state) and runs the
//! vCPUs until the guest powers off or resets, or a vCPU fails.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd};
use rimg_seccomp::SeccompAction;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi;
use crate::backend_req;
use crate::config::{DiskSpec, NetSpec};
use crate::control::{DeviceInfo, VmmControl};
use crate::cpu;
use crate::diag::{self, ExitKind, ExitRing, Kick};
use crate::error::{Error, IoContext, KvmContext, Result};
use crate::layout;
use crate::loader;
use crate::memory::GuestRam;
use crate::mmio::{self, MmioDevice};
use crate::pause::Pause;
use crate::reconnect::{Health, Watcher};
use crate::vhost_user::{Backend, Kind};

pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory: u64,
    pub cpus: u8,
    pub disks: Vec<DiskSpec>,
    pub nets: Vec<NetSpec>,
    /// What a system call outside the VMM's seccomp list does (or no
    /// filter).
    pub seccomp: SeccompAction,
    /// The control socket to create (`--control`).
    pub control: Option<PathBuf>,
}

/// Why the VM stopped.
#[derive(Debug)]
pub enum Stop {
    PowerOff,
    Reset,
    Fault(String),
}

const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;

/// The guest's console: IRQ 4 is an irqfd (`crate::uart`).
type Uart = crate::uart::Uart<EventFd, crate::uart::Console>;

struct Bus {
    serial: Mutex<Uart>,
    /// Each device (base address, device) behind the lock that also
    /// serialises its vhost-user connection (see `vhost_user::Backend`):
    /// the vCPUs take it for register accesses, the request-channel
    /// thread for a configuration change, the watcher to reconnect.
    devices: Vec<(u64, Mutex<MmioDevice>)>,
}

impl Bus {
    fn device(&self, addr: u64) -> Option<(u64, &Mutex<MmioDevice>)> {
        self.devices
            .iter()
            .find(|(base, _)| addr >= *base && addr < *base + layout::VIRTIO_MMIO_SIZE)
            .map(|(base, d)| (addr - base, d))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn run(cfg: VmConfig) -> Result<Stop> {
    if cfg.cpus == 0 || cfg.cpus > 64 {
        return Err(Error::Usage(format!(
            "--cpus {} out of range 1..=64",
            cfg.cpus
        )));
    }
    let ndev = cfg.disks.len() + cfg.nets.len();
    if ndev > layout::MAX_DEVICES {
        return Err(Error::Usage(format!(
            "at most {} --disk/--net devices",
            layout::MAX_DEVICES
        )));
    }
    if !cfg.kernel.is_file() {
        return Err(Error::Kernel {
            path: cfg.kernel.clone(),
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    // Backends first: a socket nobody listens on is a usage error, found
    // before any guest state exists.
    let mut backends = Vec::new();
    for d in &cfg.disks {
        let extra = if d.readonly { VIRTIO_BLK_F_RO } else { 0 };
        let b = Backend::connect(Kind::Block, &d.socket, extra)?;
        backends.push((b, d.reconnect));
    }
    for n in &cfg.nets {
        let extra = if n.mac.is_some() { VIRTIO_NET_F_MAC } else { 0 };
        let mut b = Backend::connect(Kind::Net, &n.socket, extra)?;
        if let Some(mac) = n.mac {
            b.set_mac(mac);
        }
        backends.push((b, n.reconnect));
    }

    let kvm = Kvm::new().map_err(|e| Error::Kvm {
        what: "opening /dev/kvm",
        source: e,
    })?;
    let vm = kvm.create_vm().kvm("KVM_CREATE_VM")?;
    cpu::disable_pmu(&vm)?;
    vm.set_tss_address(0xfffb_d000).kvm("KVM_SET_TSS_ADDR")?;
    vm.set_identity_map_address(0xfffb_c000)
        .kvm("KVM_SET_IDENTITY_MAP_ADDR")?;
    vm.create_irq_chip().kvm("KVM_CREATE_IRQCHIP")?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .kvm("KVM_CREATE_PIT2")?;

    let ram = GuestRam::new(cfg.memory)?;
    for (slot, r) in ram.regions.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: r.guest,
            memory_size: r.size,
            userspace_addr: r.host,
            flags: 0,
        };
        // SAFETY: the host range is a live mapping owned by `ram`, which
        // outlives the VM (both live until the process exits), and the
        // guest ranges do not overlap.
        unsafe { vm.set_user_memory_region(region) }.kvm("KVM_SET_USER_MEMORY_REGION")?;
    }

    // Devices: window, IRQ, one ioeventfd per queue, one irqfd.
    let mut threads = Threads::new();
    let mut devices = Vec::new();
    let mut acpi_devs = Vec::new();
    let mut channels = Vec::new();
    let mut watchers = Vec::new();
    let mut infos = Vec::new();
    let mut cmdline = cfg.cmdline.clone();
    for (i, (mut backend, reconnect)) in backends.into_iter().enumerate() {
        let base = layout::virtio_mmio(i);
        let irq = layout::virtio_irq(i);
        let call = EventFd::new(libc::EFD_NONBLOCK).io_ctx(|| "eventfd")?;
        vm.register_irqfd(&call, irq).kvm("KVM_IRQFD")?;
        let mut kicks = Vec::new();
        for q in 0..backend.queues {
            let kick = EventFd::new(libc::EFD_NONBLOCK).io_ctx(|| "eventfd")?;
            // A multiqueue NIC's queue 2 is the second pair's receive queue
            // with MQ, but the control queue when the driver takes CTRL_VQ
            // without MQ (virtio 1.2, 5.1.2), which only the guest's
            // feature choice decides, later. Its notifications therefore
            // exit to the VMM, which passes them on to this eventfd or runs
            // the control queue (mmio.rs). The control queue at 2 * pairs
            // has no ioeventfd and no kick at all.
            if !(backend.max_pairs.is_some() && q == 2) {
                vm.register_ioevent(
                    &kick,
                    &IoEventAddress::Mmio(base + mmio::REG_QUEUE_NOTIFY),
                    q as u32,
                )
                .kvm("KVM_IOEVENTFD")?;
            }
            kicks.push(kick);
        }
        let health = Arc::new(Health::new(reconnect, backend.tracks_inflight()));
        watchers.push(Watcher {
            socket: backend.socket.clone(),
            health: health.clone(),
            call: call.try_clone().io_ctx(|| "eventfd")?,
        });
        infos.push(DeviceInfo {
            kind: backend.kind,
            socket: backend.socket.clone(),
            base,
            irq,
            health: health.clone(),
        });
        if let Some(ch) = backend.take_request_channel() {
            channels.push((i, ch, backend.socket.clone()));
        }
        devices.push((
            base,
            Mutex::new(MmioDevice::new(
                backend,
                ram.regions.clone(),
                ram.fd(),
                ram.mem.clone(),
                kicks,
                call,
                health,
            )),
        ));
        acpi_devs.push(acpi::MmioDev { base, irq });
        // For kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES.
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
    }

    cpu::write_boot_tables(&ram.mem)?;
    let rsdp = acpi::write(&ram.mem, cfg.cpus, &acpi_devs)?;
    let loaded = loader::load(&ram, &cfg.kernel, cfg.initrd.as_deref(), &cmdline, rsdp)?;

    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).io_ctx(|| "eventfd")?;
    vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
        .kvm("KVM_IRQFD")?;
    let bus = Arc::new(Bus {
        serial: Mutex::new(Uart::new(serial_irq, crate::uart::Console)),
        devices,
    });
    spawn_stdin(&mut threads, bus.clone())?;
    for (i, ch, socket) in channels {
        serve_backend_requests(&mut threads, bus.clone(), i, ch, socket)?;
    }
    for (i, w) in watchers.into_iter().enumerate() {
        watch_backend(&mut threads, bus.clone(), i, w)?;
    }

    let (tx, rx) = mpsc::channel();
    let mut vcpus = Vec::new();
    let host = cpu::HostCpu::new(&kvm)?;
    for id in 0..cfg.cpus {
        let vcpu = vm.create_vcpu(id as u64).kvm("KVM_CREATE_VCPU")?;
        let entry = (id == 0).then_some(loaded.entry);
        cpu::setup(&host, &vcpu, id, cfg.cpus, entry)?;
        vcpus.push(vcpu);
    }
    let vcpu_fds: Vec<RawFd> = vcpus.iter().map(|v| v.as_raw_fd()).collect();
    let kick = Kick::new(vcpus.len())?;
    let pause = Arc::new(Pause::new(vcpus.len()));
    let control_fd = match &cfg.control {
        Some(path) => Some(spawn_control(
            &mut threads,
            path,
            VmmControl {
                devices: infos,
                pause: pause.clone(),
                kick: kick.clone(),
            },
        )?),
        None => None,
    };
    // The vCPUs enter the guest only once the filter is on.
    let go = Arc::new(Barrier::new(vcpus.len() + 1));
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let bus = bus.clone();
        let tx = tx.clone();
        let go = go.clone();
        let kick = kick.clone();
        let pause = pause.clone();
        threads.spawn(format!("vcpu{id}"), move || {
            kick.register(id);
            go.wait();
            // None: this vCPU was stopped for another's failure, which
            // that one reports.
            if let Some(stop) = run_vcpu(id, vcpu, &bus, &kick, &pause) {
                let _ = tx.send(stop);
            }
        })?;
    }
    drop(tx);
    // Every thread is past its start-up: from here on only the calls the
    // running VM needs.
    threads.wait_started();
    rimg_vmm::seccomp::filter(vm.as_raw_fd(), &vcpu_fds, control_fd).install(cfg.seccomp)?;
    go.wait();
    let stop = rx
        .recv()
        .unwrap_or_else(|_| Stop::Fault("all vCPU threads ended".into()));
    // Other vCPUs stay in KVM_RUN; the process exit ends them.
    keep(vm);
    keep(ram);
    Ok(stop)
}

/// The VMM's threads, all started before the seccomp filter is
/// installed (which then allows no thread creation): each reports once
/// its start-up (the C library's and std's per-thread set-up: robust
/// futex list, rseq, signal stack, name) is behind it.
struct Threads {
    started_tx: mpsc::Sender<()>,
    started: mpsc::Receiver<()>,
    count: usize,
}

impl Threads {
    fn new() -> Threads {
        let (started_tx, started) = mpsc::channel();
        Threads {
            started_tx,
            started,
            count: 0,
        }
    }

    fn spawn(&mut self, name: String, f: impl FnOnce() + Send + 'static) -> Result<()> {
        let tx = self.started_tx.clone();
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let _ = tx.send(());
                drop(tx);
                f()
            })
            .io_ctx(|| format!("spawning thread {name}"))?;
        self.count += 1;
        Ok(())
    }

    /// Waits until every thread spawned has started.
    fn wait_started(self) {
        drop(self.started_tx);
        for _ in 0..self.count {
            // Err: a thread ended before reporting, which it cannot.
            if self.started.recv().is_err() {
                break;
            }
        }
    }
}

/// The control socket at `path`, served by a thread of its own (one
/// client at a time: no thread can be made once the filter is on);
/// returns the listening descriptor, the one the filter lets accept.
fn spawn_control(threads: &mut Threads, path: &Path, control: VmmControl) -> Result<RawFd> {
    let listener = rimg_vhost_server::control::owner_only_listener(path)
        .io_ctx(|| format!("control socket {}", path.display()))?;
    let fd = listener.as_raw_fd();
    threads.spawn("control".into(), move || {
        let quit = Box::new(|| {
            eprintln!("rimg-vmm: quit (control socket)");
            std::process::exit(0);
        });
        rimg_vhost_server::control::serve_in_turn(
            listener,
            Arc::new(control),
            quit,
            rimg_vhost_server::control::IDLE,
        )
    })?;
    Ok(fd)
}

/// Objects the vCPU threads use through raw pointers (guest memory) or
/// descriptors (the VM) must outlive them: they live until process exit.
fn keep<T: Send + 'static>(t: T) {
    std::mem::forget(t);
}

fn run_vcpu(id: usize, mut vcpu: VcpuFd, bus: &Bus, kick: &Kick, pause: &Pause) -> Option<Stop> {
    let mut ring = ExitRing::default();
    let mut dumps_seen = 0;
    let why = loop {
        pause.park_if_paused();
        if kick.dump_asked(&mut dumps_seen) {
            let report = diag::dump(id, "on request (SIGUSR1); running on", &vcpu, &ring);
            let _ = std::io::stderr()
                .lock()
                .write_all(format!("rimg-vmm: {report}").as_bytes());
        }
        if kick.requested() {
            let report = diag::dump(id, "stopped after another vCPU failed", &vcpu, &ring);
            let _ = std::io::stderr()
                .lock()
                .write_all(format!("rimg-vmm: {report}").as_bytes());
            kick.done();
            return None;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                ring.record(ExitKind::IoOut, port.into(), data);
                if let Some(stop) = io_out(bus, port, data) {
                    return Some(stop);
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                io_in(bus, port, data);
                ring.record(ExitKind::IoIn, port.into(), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                match bus.device(addr) {
                    Some((off, d)) => lock(d).read(off, data),
                    None => data.fill(0xff),
                }
                ring.record(ExitKind::MmioRead, addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ring.record(ExitKind::MmioWrite, addr, data);
                if let Some((off, d)) = bus.device(addr) {
                    lock(d).write(off, data)
                }
            }
            Ok(VcpuExit::Hlt) => ring.record(ExitKind::Hlt, 0, &[]),
            Ok(VcpuExit::Shutdown) => break "triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                break format!("KVM entry failed, hardware reason {reason:#x} on CPU {cpu}")
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for
                // which KVM fills the `internal` member of the union.
                let i = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
                let n = (i.ndata as usize).min(i.data.len());
                let data: Vec<String> = i.data[..n].iter().map(|d| format!("{d:#x}")).collect();
                break format!(
                    "KVM internal error, suberror {} ({}), data [{}]",
                    i.suberror,
                    internal_suberror(i.suberror),
                    data.join(" ")
                );
            }
            Ok(other) => {
                let what = format!("unexpected exit {other:?}");
                ring.record(ExitKind::Other, 0, &[]);
                break what;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => break format!("KVM_RUN: {e}"),
        }
    };
    let report = diag::dump(id, &why, &vcpu, &ring);
    // One write, so the dumps of several vCPUs do not interleave.
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("rimg-vmm: {report}").as_bytes());
    // The other vCPUs' state too; the first vCPU to fail reports.
    kick.stop_others(id)
        .then(|| Stop::Fault(format!("vCPU {id}: {why}")))
}

/// linux/kvm.h KVM_INTERNAL_ERROR_*.
fn internal_suberror(s: u32) -> &'static str {
    use kvm_bindings::*;
    match s {
        KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
        KVM_INTERNAL_ERROR_SIMUL_EX => "simultaneous exceptions",
        KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery",
        KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
        _ => "unknown",
    }
}

fn io_out(bus: &Bus, port: u16, data: &[u8]) -> Option<Stop> {
    let v = data.first().copied().unwrap_or(0);
    match port {
        p if (layout::SERIAL_PORT..layout::SERIAL_PORT + 8).contains(&p) => {
            lock(&bus.serial).write((p - layout::SERIAL_PORT) as u8, v);
        }
        layout::I8042_CMD if v == 0xfe => return Some(Stop::Reset),
        layout::ACPI_RESET if v == layout::ACPI_RESET_VALUE => return Some(Stop::Reset),
        // SLP_EN with sleep type 5 (S5, the DSDT's _S5_).
        layout::ACPI_SLEEP_CONTROL if v & 0x20 != 0 && (v >> 2) & 7 == 5 => {
            return Some(Stop::PowerOff)
        }
        _ => {}
    }
    None
}

fn io_in(bus: &Bus, port: u16, data: &mut [u8]) {
    match port {
        p if (layout::SERIAL_PORT..layout::SERIAL_PORT + 8).contains(&p) => {
            let v = lock(&bus.serial).read((p - layout::SERIAL_PORT) as u8);
            data.fill(0);
            data[0] = v;
        }
        // i8042: nothing pending, input buffer empty.
        layout::I8042_CMD | layout::I8042_DATA => data.fill(0),
        layout::ACPI_SLEEP_STATUS => data.fill(0),
        _ => data.fill(0xff),
    }
}

/// Guest console input: bytes from stdin into the UART's receive FIFO.
fn spawn_stdin(threads: &mut Threads, bus: Arc<Bus>) -> Result<()> {
    threads.spawn("stdin".into(), move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let took = lock(&bus.serial).enqueue(rest);
                rest = &rest[took..];
                if took == 0 {
                    // FIFO full: let the guest drain it.
                    std::thread::yield_now();
                }
            }
        }
    })
}

/// Watches device `i`'s backend connection (reconnect.rs): when the
/// backend goes away the device waits for it to come back, or is marked
/// failed and the driver told, instead of the guest waiting forever on
/// a dead ring.
fn watch_backend(threads: &mut Threads, bus: Arc<Bus>, i: usize, w: Watcher) -> Result<()> {
    let fd = lock(&bus.devices[i].1).backend_fd();
    threads.spawn("vhost-watch".into(), move || {
        w.run(fd, || lock(&bus.devices[i].1));
    })
}

/// Serves device `i`'s backend request channel (backend_req.rs): a
/// configuration change is handled under the device's lock, which also
/// keeps its GET_CONFIG apart from the vCPUs' use of the connection. A
/// backend breaking the channel's protocol loses the channel (dropped
/// here, so closed), not the device.
fn serve_backend_requests(
    threads: &mut Threads,
    bus: Arc<Bus>,
    i: usize,
    ch: UnixStream,
    socket: PathBuf,
) -> Result<()> {
    // Used as a plain descriptor: std's socket reads are recv(2), which
    // the filter does not allow; read(2) and write(2) it does.
    let mut ch = std::fs::File::from(std::os::fd::OwnedFd::from(ch));
    threads.spawn("vhost-req".into(), move || {
        let name = socket.display().to_string();
        let r = backend_req::serve(&mut ch, &name, || lock(&bus.devices[i].1).config_changed());
        if let Err(e) = r {
            eprintln!("rimg-vmm: backend {name}: request channel: {e}; channel closed");
        }
    })
}
