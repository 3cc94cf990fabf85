//! Installs a daemon's seccomp filters in this process, then makes one
//! system call, for tests/tests/seccomp.rs:
//!
//!     seccomp-probe blk|net|blk-worker|net-worker kill|log CALL
//!
//! `blk` and `net` make the call on the main thread under the daemon's
//! process filter; the `-worker` kinds make it on a thread that has also
//! entered the vring workers' filter, as a daemon's queue threads do.
//! CALL is `allowed` (what such a thread does all day: eventfds, an
//! allocation, a write to stderr, and on the main thread a new thread) or
//! a call outside the list: `openat`, `inet-socket`, `fork`, `exec-mmap`,
//! `tty-ioctl`; `unix-socket` and `io-uring-setup` (allowed in the process,
//! not in a worker); or `tun-ioctl`, one of the net daemon's allowed
//! ioctls. Prints "survived" and exits 0 if the process is still alive
//! after the call.

use std::io::Write;

use rimg_vhost_server::{SeccompAction, SyscallList};
use vmm_sys_util::eventfd::EventFd;

fn call(name: &str, worker: bool, efd: &EventFd) {
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
        eprintln!("usage: seccomp-probe blk|net|blk-worker|net-worker kill|log CALL");
        std::process::exit(2);
    };
    let (daemon, worker) = match kind.strip_suffix("-worker") {
        Some(d) => (d, true),
        None => (kind.as_str(), false),
    };
    let sandbox = match daemon {
        "blk" => rimg_vhost_blk::seccomp::sandbox(),
        "net" => rimg_vhost_net::seccomp::sandbox(),
        _ => panic!("unknown daemon {daemon}"),
    };
    let action: SeccompAction = action.parse().unwrap();
    // Like a daemon, which starts its signal thread before the filter:
    // the C library sets up its thread machinery (a signal handler) on
    // the first thread a process creates.
    std::thread::spawn(|| ()).join().unwrap();
    let efd = EventFd::new(0).unwrap();
    sandbox
        .install(action, &SyscallList::new())
        .expect("install filter");
    if worker {
        let name = name.clone();
        std::thread::spawn(move || {
            rimg_vhost_server::seccomp::enter_vring_worker();
            call(&name, true, &efd);
        })
        .join()
        .unwrap();
    } else {
        call(name, false, &efd);
    }
    let mut out = std::io::stdout();
    out.write_all(b"survived\n").unwrap();
    out.flush().unwrap();
}
