//! rimg-vmm's seccomp filter: what the VMM may call once the VM runs.
//!
//! Everything that needs more is done first: opening /dev/kvm, the kernel
//! and the initrd, creating guest memory (memfd, mmap), the VM, its
//! irqchip, PIT, memory slots, irqfds and ioeventfds, the vCPUs and their
//! state, connecting to the vhost-user backends (and creating their
//! request channels' socket pairs) and starting every thread (vCPUs,
//! console input, backend watchers, request channels). The filter is then
//! installed on every thread (TSYNC) before any vCPU enters the guest.
//!
//! While the guest runs the VMM only:
//! - runs the vCPUs: `ioctl(KVM_RUN)` on the vCPU descriptors (and
//!   `KVM_GET_REGS`, `KVM_GET_SREGS` and `KVM_GET_VCPU_EVENTS`, to dump
//!   the state of a vCPU that failed, see `diag.rs`);
//! - registers irqfds and ioeventfds: `ioctl(KVM_IRQFD, KVM_IOEVENTFD)`
//!   on the VM descriptor;
//! - stops the other vCPUs when one fails, so they dump their state
//!   too: `tgkill` to this process's threads with [`kick_signal`] only;
//! - talks vhost-user to the backends from the vCPU threads, when the
//!   driver starts or resets a device or (control queue) enables queues,
//!   and from a request-channel thread, to fetch a changed config space:
//!   `sendmsg` with the rings' descriptors, `recvmsg` for replies;
//! - serves the backends' request channels: `read` a request, `write`
//!   the reply;
//! - signals irqfds (`write` on eventfds), prints the console (`write`),
//!   reads console input (`read`), watches the backends' sockets
//!   (`poll`);
//! - connects to a backend again after it went away (`reconnect=SECS`,
//!   reconnect.rs): `socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)`
//!   only, `connect`, and `poll` with no descriptors to wait between
//!   attempts;
//! - and what [`rimg_seccomp::runtime`] allows any thread: memory,
//!   futexes, signals, clocks, closing descriptors, exit; and what the C
//!   library does on its own (a heap trim's `openat`, answered EACCES).
//!
//! No thread is created once the filter is on (no `clone`), no file
//! opened (`open` and `openat` fail with EACCES), no socket but a Unix
//! stream, no process started, no other ioctl.

use std::os::fd::RawFd;

use rimg_seccomp::{Arg, SyscallList};

/// The KVM ioctl request numbers the running VMM uses (as kvm-ioctls
/// issues them, which does not export them).
mod nr {
    use kvm_bindings::{kvm_ioeventfd, kvm_irqfd, kvm_regs, kvm_sregs, kvm_vcpu_events, KVMIO};
    vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    vmm_sys_util::ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
    vmm_sys_util::ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
}

/// The ioctl requests allowed on the VM descriptor.
pub fn vm_ioctls() -> [u32; 2] {
    [nr::KVM_IRQFD() as u32, nr::KVM_IOEVENTFD() as u32]
}

/// The ioctl requests allowed on a vCPU descriptor to run it (and read
/// its registers).
pub fn vcpu_ioctls() -> [u32; 2] {
    [nr::KVM_RUN() as u32, nr::KVM_GET_REGS() as u32]
}

/// The further vCPU requests a failure dump makes (diag.rs).
pub fn vcpu_dump_ioctls() -> [u32; 2] {
    [nr::KVM_GET_SREGS() as u32, nr::KVM_GET_VCPU_EVENTS() as u32]
}

/// The signal a failing vCPU sends the others to take them out of
/// KVM_RUN for their dump (its handler does nothing).
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

/// Everything rimg-vmm may call while the guest runs, for the VM
/// descriptor `vm` and the vCPU descriptors `vcpus`.
pub fn filter(vm: RawFd, vcpus: &[RawFd], control: Option<RawFd>) -> SyscallList {
    use libc::*;
    let mut l = rimg_seccomp::runtime();
    l.allow(&[
        // vhost-user requests (with descriptors) and replies.
        SYS_sendmsg,
        SYS_recvmsg,
        // The backend watchers wait for a hang-up, and between
        // connection attempts.
        SYS_poll,
        // Connecting to a backend that came back (a Unix socket path).
        SYS_connect,
    ]);
    l.allow_if(
        SYS_socket,
        &[
            Arg::Eq32(0, AF_UNIX as u32),
            Arg::Eq32(1, (SOCK_STREAM | SOCK_CLOEXEC) as u32),
        ],
    );
    l.allow_if(
        SYS_tgkill,
        &[
            Arg::Eq32(0, std::process::id()),
            Arg::Eq32(2, kick_signal() as u32),
        ],
    );
    if let Some(fd) = control {
        // The control socket's clients, on its listening descriptor only.
        l.allow_if(SYS_accept4, &[Arg::Eq32(0, fd as u32)]);
    }
    for req in vm_ioctls() {
        l.allow_if(SYS_ioctl, &[Arg::Eq32(0, vm as u32), Arg::Eq32(1, req)]);
    }
    for &fd in vcpus {
        for req in vcpu_ioctls().into_iter().chain(vcpu_dump_ioctls()) {
            l.allow_if(SYS_ioctl, &[Arg::Eq32(0, fd as u32), Arg::Eq32(1, req)]);
        }
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use rimg_seccomp::SeccompAction;

    #[test]
    fn kvm_request_numbers() {
        // linux/kvm.h, as the kernel defines them.
        assert_eq!(vcpu_ioctls(), [0xae80, 0x8090_ae81]);
        assert_eq!(vcpu_dump_ioctls(), [0x8138_ae83, 0x8040_ae9f]);
        assert_eq!(vm_ioctls(), [0x4020_ae76, 0x4040_ae79]);
    }

    #[test]
    fn list() {
        let l = filter(10, &[11, 12], None);
        for nr in [
            libc::SYS_ioctl,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_poll,
            libc::SYS_write,
            libc::SYS_socket,
            libc::SYS_connect,
        ] {
            assert!(l.contains(nr), "{nr}");
        }
        assert_eq!(l.denied(libc::SYS_openat), Some(libc::EACCES));
        assert_eq!(l.denied(libc::SYS_clone3), None);
        for nr in [
            libc::SYS_openat,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_socketpair,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_execve,
            libc::SYS_memfd_create,
            libc::SYS_io_uring_setup,
            libc::SYS_prctl,
            libc::SYS_seccomp,
        ] {
            assert!(!l.contains(nr), "{nr}");
        }
        // Two requests on the VM, four on each vCPU.
        assert_eq!(l.rules(libc::SYS_ioctl), 2 + 2 * 4);
        assert_eq!(l.rules(libc::SYS_tgkill), 1);
        // Unix stream sockets only.
        assert_eq!(l.rules(libc::SYS_socket), 1);
        assert_eq!(l.len(), 29);
        // 64 vCPUs still make a program the kernel takes (4096
        // instructions at most).
        let fds: Vec<RawFd> = (100..164).collect();
        let p = filter(99, &fds, Some(98))
            .compile(SeccompAction::Kill)
            .unwrap()
            .unwrap();
        assert!(p[1].len() < 4096, "{}", p[1].len());
    }
}
