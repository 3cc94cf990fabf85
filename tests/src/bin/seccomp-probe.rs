//! Installs a daemon's or the VMM's seccomp filters in this process, then
//! makes one system call, for tests/tests/seccomp.rs:
//!
//!     seccomp-probe blk|net|blk-worker|net-worker|vmm kill|log CALL
//!
//! `blk` and `net` make the call on the main thread under the daemon's
//! process filter; the `-worker` kinds make it on a thread that has also
//! entered the vring workers' filter, as a daemon's queue threads do.
//! `vmm` makes it on the main thread under rimg-vmm's filter, built for
//! two eventfds standing in for the VM and vCPU descriptors.
//! CALL is `allowed` (what such a thread does all day: eventfds, an
//! allocation, a write to stderr, and on a daemon's main thread a new
//! thread) or a call outside the list: `openat`, `inet-socket`, `fork`,
//! `thread`, `exec-mmap`, `tty-ioctl`, `memfd`; `unix-socket` and
//! `io-uring-setup` (allowed in a daemon's process, not in a worker nor
//! the VMM); `tun-ioctl`, one of the net daemon's allowed ioctls; or the
//! VMM's KVM ioctls: `kvm-run` (KVM_RUN on the vCPU descriptor) and
//! `kvm-irqfd` (KVM_IRQFD on the VM descriptor), allowed for the VMM, and
//! `kvm-run-on-vm` and `kvm-create-vcpu` (KVM_CREATE_VCPU on the VM
//! descriptor), which are not. KVM ioctls on eventfds fail with ENOTTY:
//! what matters is whether the filter lets them reach the kernel. Prints
//! "survived" and exits 0 if the process is still alive after the call.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};

use rimg_vhost_server::{SeccompAction, SyscallList};
use vmm_sys_util::eventfd::EventFd;

/// KVM_CREATE_VCPU, _IO(KVMIO, 0x41).
const KVM_CREATE_VCPU: libc::c_ulong = 0xae41;

/// The VMM's stand-in VM and vCPU descriptors.
struct Kvm {
    vm: RawFd,
    vcpu: RawFd,
}

fn ioctl(fd: RawFd, req: u32) {
    // SAFETY: a KVM request without an argument block on one of our
    // eventfds: the kernel answers ENOTTY and touches no memory.
    let r = unsafe { libc::ioctl(fd, req as libc::c_ulong, 0 as libc::c_ulong) };
    assert_eq!(r, -1);
}

fn call(name: &str, worker: bool, efd: &EventFd, kvm: &Kvm) {
    let [kvm_run, _] = rimg_vmm::seccomp::vcpu_ioctls();
    let [kvm_irqfd, _] = rimg_vmm::seccomp::vm_ioctls();
    match name {
        "allowed" => {
            if worker {
                efd.write(1).unwrap();
                assert_eq!(efd.read().unwrap(), 1);
            } else {
                let t = std::thread::spawn(|| {
                    let e = EventFd::new(0).unwrap();
                    e.write(1).unwrap();
                    e.read().unwrap()
                });
                assert_eq!(t.join().unwrap(), 1);
            }
            let v = vec![7u8; 1 << 20];
            eprintln!("allowed calls work ({} bytes)", v.len());
        }
        "openat" => {
            let _ = std::fs::File::open("/proc/self/status");
        }
        "thread" => {
            let _ = std::thread::Builder::new().spawn(|| ()).map(|t| t.join());
        }
        "memfd" => {
            // SAFETY: memfd_create with a NUL-terminated name; a
            // descriptor we get stays open until exit.
            let _ = unsafe { libc::memfd_create(c"probe".as_ptr(), 0) };
        }
        "kvm-run" => ioctl(kvm.vcpu, kvm_run),
        "kvm-irqfd" => ioctl(kvm.vm, kvm_irqfd),
        "kvm-run-on-vm" => ioctl(kvm.vm, kvm_run),
        "kvm-create-vcpu" => ioctl(kvm.vm, KVM_CREATE_VCPU as u32),
        "inet-socket" => {
            let _ = std::net::UdpSocket::bind("127.0.0.1:0");
        }
        "unix-socket" => {
            let _ = std::os::unix::net::UnixDatagram::unbound();
        }
        "io-uring-setup" => {
            let _ = io_uring::IoUring::new(8);
        }
        "fork" => {
            // SAFETY: fork; the child exits at once without touching any
            // state.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: leaving the forked child.
                unsafe { libc::_exit(0) };
            }
        }
        "exec-mmap" => {
            // SAFETY: an anonymous mapping request; a mapping we get is
            // never used and stays until exit.
            let _ = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
        }
        "tty-ioctl" => {
            let mut ws = libc::winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCGWINSZ writes into the winsize we own.
            let _ = unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) };
        }
        "tun-ioctl" => {
            // SAFETY: an ioctl on a descriptor that is not open: EBADF.
            let r = unsafe { libc::ioctl(-1, libc::TUNSETQUEUE, 0 as libc::c_ulong) };
            assert_eq!(r, -1);
        }
        _ => panic!("unknown call {name}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, kind, action, name] = &args[..] else {
        eprintln!("usage: seccomp-probe blk|net|blk-worker|net-worker|vmm kill|log CALL");
        std::process::exit(2);
    };
    let action: SeccompAction = action.parse().unwrap();
    // Like a daemon, which starts its signal thread before the filter,
    // and the VMM, which starts all of its threads first: the C library
    // sets up its thread machinery (a signal handler) on the first
    // thread a process creates.
    std::thread::spawn(|| ()).join().unwrap();
    let efd = EventFd::new(0).unwrap();
    let (vm, vcpu) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    let kvm = Kvm {
        vm: vm.as_raw_fd(),
        vcpu: vcpu.as_raw_fd(),
    };
    if kind == "vmm" {
        rimg_vmm::seccomp::filter(kvm.vm, &[kvm.vcpu])
            .install(action)
            .expect("install filter");
        // The VMM's threads never create threads: "allowed" as a
        // worker's.
        call(name, true, &efd, &kvm);
        survived();
        return;
    }
    let (daemon, worker) = match kind.strip_suffix("-worker") {
        Some(d) => (d, true),
        None => (kind.as_str(), false),
    };
    let sandbox = match daemon {
        "blk" => rimg_vhost_blk::seccomp::sandbox(),
        "net" => rimg_vhost_net::seccomp::sandbox(),
        _ => panic!("unknown daemon {daemon}"),
    };
    sandbox
        .install(action, &SyscallList::new())
        .expect("install filter");
    if worker {
        let name = name.clone();
        std::thread::spawn(move || {
            rimg_vhost_server::seccomp::enter_vring_worker();
            call(&name, true, &efd, &kvm);
        })
        .join()
        .unwrap();
    } else {
        call(name, false, &efd, &kvm);
    }
    survived();
}

fn survived() {
    let mut out = std::io::stdout();
    out.write_all(b"survived\n").unwrap();
    out.flush().unwrap();
}
