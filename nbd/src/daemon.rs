//! qemu-nbd's `--fork` and `--pid-file`: the server runs in a child, and
//! the command returns once it serves (exit 0) or with the child's error
//! (exit 1), so that scripts can connect as soon as it has returned.
//!
//! Until it is ready the child's stderr is a pipe the parent copies to
//! its own; when ready it writes one byte on a second pipe and points
//! its standard streams at /dev/null, which closes the first pipe (so a
//! caller that reads the command's output to its end is not held by the
//! server). The parent reads the copied stderr to its end, then the
//! byte: without it the child failed.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// The child's side: what it does once it serves.
#[derive(Debug)]
pub struct Ready {
    signal: File,
    devnull: File,
}

impl Ready {
    /// Tells the parent the server is up, and leaves its streams.
    pub fn signal(mut self) {
        let _ = self.signal.write_all(b"1");
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which this
            // process owns; /dev/null stays open in `devnull` meanwhile.
            unsafe { libc::dup2(self.devnull.as_raw_fd(), fd) };
        }
    }
}

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned here alone.
    unsafe {
        Ok((
            File::from(OwnedFd::from_raw_fd(fds[0])),
            File::from(OwnedFd::from_raw_fd(fds[1])),
        ))
    }
}

/// Forks. Returns in the child (in a new session, stderr into the
/// parent); the parent never returns: it exits 0 once the child signals
/// [`Ready`], else 1 after copying the child's errors. Call before any
/// thread starts.
pub fn fork() -> Result<Ready, String> {
    let err = |what: &str, e: io::Error| format!("--fork: {what}: {e}");
    let devnull = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| err("/dev/null", e))?;
    let (mut log_r, log_w) = pipe().map_err(|e| err("pipe", e))?;
    let (mut ready_r, ready_w) = pipe().map_err(|e| err("pipe", e))?;
    // SAFETY: the process has one thread (the caller's contract), so the
    // child may run anything after fork.
    match unsafe { libc::fork() } {
        -1 => Err(err("fork", io::Error::last_os_error())),
        0 => {
            drop((log_r, ready_r));
            // SAFETY: setsid and dup2 on descriptors this process owns.
            unsafe {
                libc::setsid();
                libc::dup2(log_w.as_raw_fd(), 2);
            }
            drop(log_w);
            Ok(Ready {
                signal: ready_w,
                devnull,
            })
        }
        child => {
            drop((log_w, ready_w));
            let mut log = Vec::new();
            let _ = log_r.read_to_end(&mut log);
            let _ = io::stderr().write_all(&log);
            let mut b = [0u8; 1];
            if matches!(ready_r.read(&mut b), Ok(1)) {
                std::process::exit(0);
            }
            let mut status = 0;
            // SAFETY: waits for our own child.
            unsafe { libc::waitpid(child, &mut status, 0) };
            std::process::exit(1);
        }
    }
}

/// Writes this process's id to `path` under a write lock held for the
/// life of the process (as QEMU's pid files): a second server given the
/// same file fails.
pub fn pid_file(path: &Path) -> Result<(), String> {
    let err = |e: io::Error| format!("{}: {e}", path.display());
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(err)?;
    let lock = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK with a valid flock on an open descriptor.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &lock) } != 0 {
        return Err(format!(
            "Cannot lock pid file {}: {}",
            path.display(),
            io::Error::last_os_error()
        ));
    }
    f.set_len(0).map_err(err)?;
    writeln!(f, "{}", std::process::id()).map_err(err)?;
    // Kept open: the lock lasts as long as the process.
    std::mem::forget(f);
    Ok(())
}
