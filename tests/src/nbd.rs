//! Test support for NBD: `rimg-nbd` started as it runs in production
//! (seccomp in kill mode, stopped with SIGTERM), qemu-nbd as the peer,
//! and libnbd's tools (installed when missing).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::daemon::DaemonProcess;

mod tls;
pub use tls::{
    psk_dir, psk_key, rimg_copies_through_both, same_service_as_qemu_nbd, tls_dirs, Creds, TlsDirs,
};

/// A running `rimg-nbd`.
pub type Server = DaemonProcess;

/// `rimg-nbd` logging its "serving" line (info level: silent by
/// default, as qemu-nbd).
pub fn command() -> Command {
    let mut cmd = Command::new(crate::workspace_bin("rimg-nbd"));
    cmd.env("RUST_LOG", "info");
    cmd
}

/// Starts `rimg-nbd` with `args` and waits for its "serving" line.
pub fn start(socket: &Path, args: &[&str]) -> Server {
    let mut cmd = command();
    cmd.args(args);
    DaemonProcess::spawn(cmd, socket).unwrap_or_else(|e| panic!("rimg-nbd {args:?}: {e}"))
}

/// Starts a persistent `rimg-nbd` (`-t`) on the UNIX socket `socket`
/// with `args`.
pub fn serve(socket: &Path, args: &[&str]) -> Server {
    let path = socket.to_str().expect("UTF-8 socket path");
    let all: Vec<&str> = ["-k", path, "-t"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    start(socket, &all)
}

/// Stops a server with SIGTERM and asserts it exits 0 within 10 s.
pub fn stop(s: Server) -> String {
    let (st, log) = s.terminate_within(Duration::from_secs(10));
    let st = st.unwrap_or_else(|| panic!("rimg-nbd did not exit after SIGTERM:\n{log}"));
    assert!(st.success(), "rimg-nbd exited {st}:\n{log}");
    log
}

/// The loopback address (`127.0.0.1:PORT`) a TCP server says it serves
/// on.
pub fn loopback_address(s: &Server) -> String {
    let log = s.log();
    log.split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no loopback address in: {log}"))
        .to_string()
}

/// The NBD URI of `export` on the UNIX socket `socket`.
pub fn unix_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// Installs libnbd's tools (nbdinfo, nbdcopy) if missing.
pub fn ensure_libnbd() {
    crate::ensure_tool("nbdinfo", "libnbd-bin");
    crate::ensure_tool("nbdcopy", "libnbd-bin");
}

/// A qemu-nbd serving one image on a UNIX socket (forked: it is ready
/// when the command returns); killed and waited for when dropped.
pub struct QemuNbd {
    pid: i32,
    pub socket: PathBuf,
}

impl QemuNbd {
    /// `qemu-nbd --fork -t -e 0 -k SOCKET ARGS...` (ARGS end with the
    /// image).
    pub fn start(socket: &Path, args: &[&str]) -> QemuNbd {
        let (q, status, err) = Self::spawn(socket, args);
        assert!(status.success(), "qemu-nbd {args:?}: {err}");
        q
    }

    /// As [`start`](Self::start), for a server that warns as it starts
    /// (a probed raw image): `qemu-nbd --fork` then exits 1 though its
    /// server runs, as any message of the child counts as a failure
    /// there. Returns what it printed; the server must have written its
    /// pid file and be running.
    pub fn start_warning(socket: &Path, args: &[&str]) -> (QemuNbd, String) {
        let (q, _, err) = Self::spawn(socket, args);
        assert!(
            Path::new(&format!("/proc/{}", q.pid)).exists(),
            "qemu-nbd {args:?} is not running: {err}"
        );
        (q, err)
    }

    fn spawn(socket: &Path, args: &[&str]) -> (QemuNbd, std::process::ExitStatus, String) {
        let pidfile = socket.with_extension("pid");
        let o = Command::new("qemu-nbd")
            .arg("--fork")
            .arg("--pid-file")
            .arg(&pidfile)
            .args(["-t", "-e", "0", "-k"])
            .arg(socket)
            .args(args)
            .output()
            .expect("qemu-nbd");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("qemu-nbd {args:?}: no pid file ({e}): {err}"));
        let q = QemuNbd {
            pid: pid.trim().parse().expect("pid"),
            socket: socket.to_path_buf(),
        };
        (q, o.status, err)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid qemu-nbd wrote for itself; it is not
        // our child, so we poll until it is gone (it releases its image
        // locks on exit, which the next step of a test needs).
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{}", self.pid)).exists() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// One of the two servers on a UNIX socket, for tests that judge
/// rimg-nbd by qemu-nbd: both persistent (`-t`) with `-e 0`.
pub enum Peer {
    Qemu(QemuNbd),
    Rimg(Server),
}

impl Peer {
    /// The servers' names, qemu-nbd's first (the reference).
    pub const BOTH: [&'static str; 2] = ["qemu", "rimg"];

    /// Starts `which` ("qemu" or "rimg") on `socket` with `args`, which
    /// end with the image.
    pub fn start(which: &str, socket: &Path, args: &[&str]) -> Peer {
        match which {
            "qemu" => Peer::Qemu(QemuNbd::start(socket, args)),
            "rimg" => {
                let all: Vec<&str> = ["-e", "0"].iter().chain(args).copied().collect();
                Peer::Rimg(serve(socket, &all))
            }
            _ => panic!("no NBD server called {which}"),
        }
    }

    /// Stops it (rimg-nbd must exit 0 on SIGTERM, see [`stop`]); returns
    /// rimg-nbd's log, nothing for qemu-nbd.
    pub fn stop(self) -> String {
        match self {
            Peer::Qemu(q) => {
                drop(q);
                String::new()
            }
            Peer::Rimg(r) => stop(r),
        }
    }
}
