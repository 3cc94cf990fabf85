//! Socket activation (sd_listen_fds(3), one socket): a service manager
//! that made the listening socket passes it as descriptor 3, with
//! LISTEN_PID naming the daemon and LISTEN_FDS=1. [`take_from_env`] reads
//! and clears the variables at start-up (`cli::run` for the vhost-user
//! daemons, rimg-nbd's main); [`passed`] hands the descriptor to the
//! server, which checks it with [`take_listener`] before owning it.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// The descriptor passed, -1 when none (or already taken).
static PASSED: AtomicI32 = AtomicI32::new(-1);

/// The listening socket systemd passed, if it passed one to this process:
/// LISTEN_PID names this process and LISTEN_FDS is 1; the socket is
/// descriptor 3. The variables are removed so that nothing started later
/// takes them for its own. Call it before the process has other threads
/// (it changes the environment).
pub fn take_from_env() -> Result<Option<RawFd>, String> {
    let (Some(pid), Some(fds)) = (
        std::env::var_os("LISTEN_PID"),
        std::env::var_os("LISTEN_FDS"),
    ) else {
        return Ok(None);
    };
    if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(None);
    }
    // SAFETY: callers run this first thing, before any other thread
    // exists, so nothing reads the environment while it changes.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    match fds.to_str() {
        Some("1") => {
            PASSED.store(3, Ordering::SeqCst);
            Ok(Some(3))
        }
        _ => Err(format!(
            "socket activation: LISTEN_FDS={}, expected one listening socket",
            fds.to_string_lossy()
        )),
    }
}

/// The descriptor [`take_from_env`] found, once: the server that
/// listens takes it.
pub fn passed() -> Option<RawFd> {
    let fd = PASSED.swap(-1, Ordering::SeqCst);
    (fd >= 0).then_some(fd)
}

/// Owns `fd` once it is known to be a listening socket: a descriptor that
/// is not may belong to something else in this process.
pub fn take_listener(fd: RawFd) -> io::Result<OwnedFd> {
    if !listening(fd) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening socket",
        ));
    }
    // SAFETY: the descriptor was handed to this process to own
    // (LISTEN_FDS), is a listening socket, and is taken once, here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `fd` is a socket that listens (SO_ACCEPTCONN).
fn listening(fd: RawFd) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, which we own.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0 && v == 1
}

pub fn family(fd: RawFd) -> io::Result<i32> {
    // SAFETY: sockaddr_storage is plain data; getsockname writes at most
    // `len` bytes into it.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: as above; `fd` is open for the call.
    let r = unsafe { libc::getsockname(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ss.ss_family.into())
}
