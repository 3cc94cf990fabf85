//! A daemon under test (rimg-vhost-blk, rimg-vhost-net): started, waited
//! for until it listens, stopped with SIGTERM; its log is kept.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

/// A running daemon; killed (SIGKILL) if dropped without `terminate`.
pub struct DaemonProcess {
    pub child: Child,
    pub socket: PathBuf,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl DaemonProcess {
    /// Spawns `cmd` and waits for its first stderr line: the daemons print
    /// their "serving" line only once the socket is bound. Anything else
    /// (an error message, an exit) is returned as the error.
    pub fn spawn(mut cmd: Command, socket: &Path) -> Result<DaemonProcess, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {cmd:?}: {e}"))?;
        let mut rd = BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        rd.read_line(&mut first).map_err(|e| e.to_string())?;
        if !first.contains("serving") {
            let mut rest = String::new();
            let _ = rd.read_to_string(&mut rest);
            let st = child.wait().map_err(|e| e.to_string())?;
            return Err(format!("daemon exited {st}: {first}{rest}"));
        }
        // Keep draining stderr so the daemon never blocks on a full pipe.
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = rd.read_to_string(&mut s);
            s
        });
        Ok(DaemonProcess {
            child,
            socket: socket.to_path_buf(),
            stderr: Some(stderr),
        })
    }

    /// Sends SIGTERM and waits for the exit; returns the status and what
    /// the daemon logged.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on our own child's pid, which has not been
        // reaped yet (we still hold the Child), so it cannot be reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let st = self.child.wait().expect("wait daemon");
        let log = self.stderr.take().unwrap().join().unwrap_or_default();
        (st, log)
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(h) = self.stderr.take() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if std::thread::panicking() {
                eprintln!("daemon log:\n{}", h.join().unwrap_or_default());
            }
        }
    }
}
