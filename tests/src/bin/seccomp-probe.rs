//! Installs a daemon's or the VMM's seccomp filters in this process, then
//! makes one system call, for tests/tests/seccomp.rs:
//!
//!     seccomp-probe blk|net|blk-worker|net-worker|vmm kill|log CALL
//!
//! `blk` and `net` make the call on the main thread under the daemon's
//! process filter; the `-worker` kinds make it on a thread that has also
//! entered the vring workers' filter, as a daemon's queue threads do.
//! `vmm` makes it on a thread started before rimg-vmm's filter (as the
//! VMM's are), built for two eventfds standing in for the VM and vCPU
//! descriptors.
//! CALL is `allowed` (what such a thread does all day: eventfds, an
//! allocation, a write to stderr, and on a daemon's main thread a new
//! thread); `runtime` (what the C library and std may do on any thread
//! of a long run: `clock_gettime` as a real syscall, `sched_getaffinity`,
//! `madvise` hints); `openat` and `open`, which must fail with EACCES
//! (the probe panics otherwise); `heap-trim` (a thread frees a large
//! block at the top of its malloc arena, which glibc trims, reading
//! /proc/sys/vm/overcommit_memory the first time); `madvise-bad` (an
//! advice number from the privileged range, MADV_HWPOISON and up: a
//! value no kernel defines, harmless if it got through); or a call
//! outside the list: `inet-socket`, `fork`,
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
        "runtime" => {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime writes into the timespec we own; the
            // raw syscall, as the vDSO makes it with a clock source it
            // cannot read itself.
            let r =
                unsafe { libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_MONOTONIC, &mut ts) };
            assert_eq!(r, 0);
            let mut set = [0u64; 16];
            // SAFETY: the kernel writes at most size_of_val(&set) bytes
            // into the mask we own.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_sched_getaffinity,
                    0,
                    std::mem::size_of_val(&set),
                    set.as_mut_ptr(),
                )
            };
            assert!(r > 0 && set.iter().any(|&w| w != 0), "{r}");
            let m = Mapping::new(4 << 12);
            for advice in [
                libc::MADV_DONTNEED,
                libc::MADV_FREE,
                libc::MADV_NOHUGEPAGE,
                libc::MADV_DONTFORK,
            ] {
                assert_eq!(m.advise(advice), 0, "advice {advice}");
            }
        }
        "madvise-bad" => {
            let m = Mapping::new(4096);
            let _ = m.advise(libc::MADV_HWPOISON + 900);
        }
        "openat" => {
            let e = std::fs::File::open("/proc/self/status").expect_err("openat succeeded");
            assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        }
        "open" => {
            // SAFETY: open(2) with a NUL-terminated path; a descriptor we
            // get stays open until exit.
            let r = unsafe { libc::syscall(libc::SYS_open, c"/proc/self/status".as_ptr(), 0) };
            let e = std::io::Error::last_os_error();
            assert_eq!((r, e.raw_os_error()), (-1, Some(libc::EACCES)), "{e}");
        }
        "heap-trim" => {
            // Only a thread's own arena (not the main one) reads the
            // overcommit mode when it shrinks: on the main thread of a
            // daemon, do it on a new thread.
            if worker {
                heap_trim();
            } else {
                std::thread::spawn(heap_trim).join().unwrap();
            }
            // And the process goes on.
            let v = vec![3u8; 1 << 20];
            eprintln!("after the trim ({} bytes)", v.len());
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

/// Fills 64 blocks of 60 KiB (under malloc's mmap threshold: in this
/// thread's arena, one after the other) and frees them: they merge into
/// a free block of almost 4 MiB at the arena's top, which glibc trims.
fn heap_trim() {
    let blocks: Vec<Vec<u8>> = (1..=64u8).map(|i| vec![i; 60 << 10]).collect();
    let sum: u64 = blocks.iter().map(|b| u64::from(b[b.len() - 1])).sum();
    assert_eq!(sum, 64 * 65 / 2);
    drop(blocks);
}

/// An anonymous read-write mapping, for madvise.
struct Mapping(*mut libc::c_void, usize);

impl Mapping {
    fn new(len: usize) -> Mapping {
        // SAFETY: an anonymous private mapping; unmapped in drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mapping(p, len)
    }

    fn advise(&self, advice: libc::c_int) -> libc::c_int {
        // SAFETY: advice on our own mapping, which nothing else uses.
        unsafe { libc::madvise(self.0, self.1, advice) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new, not used after this.
        unsafe { libc::munmap(self.0, self.1) };
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
        // Like the VMM's threads: started before the filter, which they
        // wait for; they never create threads ("allowed" as a worker's).
        // (Past its start-up, which the C library does on the new thread:
        // rseq, robust futex list.)
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let name2 = name.clone();
        let t = std::thread::spawn(move || {
            started_tx.send(()).unwrap();
            wait.recv().unwrap();
            call(&name2, true, &efd, &kvm);
        });
        started.recv().unwrap();
        rimg_vmm::seccomp::filter(vm.as_raw_fd(), &[vcpu.as_raw_fd()], None)
            .install(action)
            .expect("install filter");
        go.send(()).unwrap();
        t.join().unwrap();
        survived();
        return;
    }
    let (daemon, worker) = match kind.strip_suffix("-worker") {
        Some(d) => (d, true),
        None => (kind.as_str(), false),
    };
    let sandbox = match daemon {
        "blk" => rimg_vhost_blk::seccomp::sandbox(false),
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
