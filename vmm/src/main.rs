//! rimg-vmm: a minimal KVM VMM that boots Linux with vhost-user virtio-mmio
//! disks and NICs.

mod acpi;
mod backend_req;
mod config;
mod control;
mod cpu;
mod cpuid;
mod diag;
mod error;
mod handshake;
mod layout;
mod loader;
mod memory;
mod mmio;
mod net_ctrl;
mod pause;
mod reconnect;
mod replay;
mod uart;
mod vhost_user;
mod vmm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rimg_seccomp::SeccompAction;

/// Boot a Linux kernel (bzImage or ELF vmlinux) on KVM, with a 16550
/// console on ttyS0 and virtio-mmio devices served by vhost-user backends
/// (rimg-vhost-blk, rimg-vhost-net, qemu-storage-daemon, ...).
#[derive(Parser)]
#[command(name = "rimg-vmm", version)]
struct Args {
    /// Kernel image: bzImage or ELF vmlinux
    #[arg(long, value_name = "FILE")]
    kernel: PathBuf,
    /// Initramfs loaded at the top of low memory
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line (virtio_mmio.device= entries are appended)
    #[arg(
        long,
        value_name = "STR",
        default_value = "console=ttyS0 reboot=k panic=-1"
    )]
    cmdline: String,
    /// Guest memory size (K, M, G suffixes)
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    memory: String,
    /// Number of vCPUs
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u8,
    /// vhost-user-blk disk: socket=PATH[,readonly][,reconnect=SECS];
    /// repeatable. reconnect=SECS: when the backend goes away, wait that
    /// long for it to come back (the guest only sees a pause) before
    /// marking the device failed (NEEDS_RESET); 0, the default, fails it
    /// at once
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// vhost-user-net NIC: socket=PATH[,mac=MAC][,reconnect=SECS];
    /// repeatable
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    /// seccomp filter, installed once the VM is built, before the guest
    /// runs: `kill` ends the VMM on a system call outside its list, `log`
    /// allows such calls and has the kernel log them (audit type 1326),
    /// `off` installs no filter
    #[arg(long, default_value_t = SeccompAction::Kill, value_name = "kill|log|off")]
    seccomp: SeccompAction,
    /// Control socket to create (mode 0600): JSON requests, one per line
    /// (query-status, query-devices, pause, resume, quit); `rimg ctl` is
    /// a client
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

fn build(a: Args) -> error::Result<vmm::VmConfig> {
    Ok(vmm::VmConfig {
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: a.cmdline,
        memory: config::parse_size(&a.memory)?,
        cpus: a.cpus,
        disks: a
            .disk
            .iter()
            .map(|d| config::parse_disk(d))
            .collect::<error::Result<_>>()?,
        nets: a
            .net
            .iter()
            .map(|n| config::parse_net(n))
            .collect::<error::Result<_>>()?,
        seccomp: a.seccomp,
        control: a.control,
    })
}

fn main() -> ExitCode {
    let args: Args = rimg_vhost_server::cli::parse();
    let stop = build(args).and_then(vmm::run);
    match stop {
        Ok(vmm::Stop::PowerOff) => ExitCode::SUCCESS,
        Ok(vmm::Stop::Reset) => {
            // rimg-vmm does not restart guests (as QEMU's -no-reboot): say
            // why it ended, since a reboot may not have been meant as an end.
            eprintln!("rimg-vmm: guest reset; exiting");
            ExitCode::SUCCESS
        }
        Ok(vmm::Stop::Fault(msg)) => {
            eprintln!("rimg-vmm: {msg}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("rimg-vmm: {e}");
            ExitCode::from(1)
        }
    }
}
