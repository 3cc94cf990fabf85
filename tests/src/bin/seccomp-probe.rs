//! Installs a daemon's seccomp filter in this process, then makes one
//! system call, for tests/tests/seccomp.rs:
//!
//!     seccomp-probe blk|net kill|log CALL
//!
//! CALL is `allowed` (what a daemon does all day: a thread, an eventfd,
//! an allocation, a write to stderr) or a call outside the list:
//! `openat`, `inet-socket`, `fork`, `exec-mmap`, `tty-ioctl`; or
//! `tun-ioctl`, one of the net daemon's allowed ioctls. Prints "survived"
//! and exits 0 if the process is still alive after the call.

use std::io::Write;

use rimg_vhost_server::SeccompAction;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, daemon, action, call] = &args[..] else {
        eprintln!("usage: seccomp-probe blk|net kill|log CALL");
        std::process::exit(2);
    };
    let list = match daemon.as_str() {
        "blk" => rimg_vhost_blk::seccomp::syscalls(),
        "net" => rimg_vhost_net::seccomp::syscalls(),
        _ => panic!("unknown daemon {daemon}"),
    };
    let action: SeccompAction = action.parse().unwrap();
    // Like a daemon, which starts its signal thread before the filter:
    // the C library sets up its thread machinery (a signal handler) on
    // the first thread a process creates.
    std::thread::spawn(|| ()).join().unwrap();
    list.install(action).expect("install filter");
    match call.as_str() {
        "allowed" => {
            let t = std::thread::spawn(|| {
                let e = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
                e.write(1).unwrap();
                e.read().unwrap()
            });
            assert_eq!(t.join().unwrap(), 1);
            let v = vec![7u8; 1 << 20];
            eprintln!("allowed calls work ({} bytes)", v.len());
        }
        "openat" => {
            let _ = std::fs::File::open("/proc/self/status");
        }
        "inet-socket" => {
            let _ = std::net::UdpSocket::bind("127.0.0.1:0");
        }
        "fork" => {
            // SAFETY: fork in a single-threaded process; the child exits
            // at once without touching any state.
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
            let mut ws: libc::winsize = libc::winsize {
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
            let r = unsafe { libc::ioctl(-1, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) };
            assert_eq!(r, -1);
        }
        _ => panic!("unknown call {call}"),
    }
    let mut out = std::io::stdout();
    out.write_all(b"survived\n").unwrap();
    out.flush().unwrap();
}
