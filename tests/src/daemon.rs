//! A daemon under test (rimg-vhost-blk, rimg-vhost-net): started, waited
//! for until it listens, stopped with SIGTERM; its log is kept. And what
//! /proc shows of a process's threads.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What the daemon logged so far, and a signal for each new line (and
/// for the end of its stderr).
#[derive(Default)]
struct Log {
    text: Mutex<String>,
    more: Condvar,
    /// Its stderr reached its end (set under `text`'s lock).
    ended: std::sync::atomic::AtomicBool,
}

/// How long a daemon may take to say it serves: a daemon that never says
/// so is a failure with its log, not a test stuck for ever.
const SERVING_DEADLINE: Duration = Duration::from_secs(60);

/// A running daemon; killed (SIGKILL) if dropped without `terminate`.
pub struct DaemonProcess {
    pub child: Child,
    pub socket: PathBuf,
    log: Arc<Log>,
    stderr: Option<std::thread::JoinHandle<()>>,
}

impl DaemonProcess {
    /// Spawns `cmd` and waits for its "serving" line on stderr: the
    /// daemons print it only once the socket is bound (warnings may come
    /// first; they stay in the log). An exit before it, or no such line
    /// within [`SERVING_DEADLINE`], is the error (with the log).
    pub fn spawn(mut cmd: Command, socket: &Path) -> Result<DaemonProcess, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {cmd:?}: {e}"))?;
        let mut rd = BufReader::new(child.stderr.take().unwrap());
        // Keeps draining stderr so the daemon never blocks on a full pipe.
        let log = Arc::new(Log::default());
        let sink = log.clone();
        let stderr = std::thread::spawn(move || {
            let mut line = String::new();
            while rd.read_line(&mut line).unwrap_or(0) > 0 {
                sink.text
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&line);
                sink.more.notify_all();
                line.clear();
            }
            let _held = sink.text.lock().unwrap_or_else(|p| p.into_inner());
            sink.ended.store(true, std::sync::atomic::Ordering::Relaxed);
            sink.more.notify_all();
        });
        let d = DaemonProcess {
            child,
            socket: socket.to_path_buf(),
            log,
            stderr: Some(stderr),
        };
        if d.wait_for_log("serving", SERVING_DEADLINE) {
            return Ok(d);
        }
        let (st, log) = d.kill();
        Err(format!(
            "daemon did not say it serves within {SERVING_DEADLINE:?} (exit {st}): {log}"
        ))
    }

    /// Waits until the daemon's log contains `needle`; false if `timeout`
    /// passes first.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_log_count(needle, 1, timeout)
    }

    /// Waits until the daemon's log contains `needle` at least `n` times;
    /// false if `timeout` passes first.
    pub fn wait_for_log_count(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let mut text = self.log.text.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if text.matches(needle).count() >= n {
                return true;
            }
            let left = end.saturating_duration_since(Instant::now());
            // Nothing more can come once stderr ended.
            if left.is_zero() || self.log.ended.load(std::sync::atomic::Ordering::Relaxed) {
                return false;
            }
            text = self
                .log
                .more
                .wait_timeout(text, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        self.log
            .text
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends SIGTERM and waits for the exit; returns the status and what
    /// the daemon logged.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on our own child's pid, which has not been
        // reaped yet (we still hold the Child), so it cannot be reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let st = self.child.wait().expect("wait daemon");
        let _ = self.stderr.take().unwrap().join();
        (st, self.log())
    }
}

impl DaemonProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the daemon (not yet reaped, so the pid is ours).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid, which has not been
        // reaped yet (we still hold the Child), so it cannot be reused.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Whether the daemon has exited (a zombie not yet reaped counts).
    pub fn exited(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()));
        // The state follows the parenthesised command name.
        stat.map_or(true, |s| {
            s.rsplit_once(')')
                .is_none_or(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
    }

    /// SIGKILLs the daemon and reaps it; returns the status and the log.
    pub fn kill(mut self) -> (ExitStatus, String) {
        let _ = self.child.kill();
        let st = self.child.wait().expect("wait daemon");
        let _ = self.stderr.take().unwrap().join();
        (st, self.log())
    }

    /// Sends SIGTERM and waits at most `timeout` for the exit, then
    /// SIGKILLs it. Returns the status (None if it had to be killed) and
    /// the whole log.
    pub fn terminate_within(self, timeout: Duration) -> (Option<ExitStatus>, String) {
        self.signal(libc::SIGTERM);
        self.exit_within(timeout)
    }

    /// Waits for the daemon to exit by itself (no signal sent); if it has
    /// not within `timeout`, its state dump and threads join the log and
    /// it is killed (None).
    pub fn exit_within(mut self, timeout: Duration) -> (Option<ExitStatus>, String) {
        let end = Instant::now() + timeout;
        let st = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) if Instant::now() < end => {
                    // Polls the exit with a deadline (a pidfd would need
                    // more code for the same result).
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => break None,
            }
        };
        let mut threads = String::new();
        if st.is_none() {
            // Stuck: its own state dump, then where each thread waits.
            self.signal(libc::SIGUSR1);
            self.wait_for_log("state dump end", Duration::from_secs(2));
            threads = proc_threads(self.pid());
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = self.stderr.take().unwrap().join();
        (st, self.log() + &threads)
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(h) = self.stderr.take() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = h.join();
            if std::thread::panicking() {
                eprintln!("daemon log:\n{}", self.log());
            }
        }
    }
}

/// Each thread of `pid`: name, wait channel and kernel stack (the stack
/// needs root).
pub fn proc_threads(pid: u32) -> String {
    let mut out = String::from("--- threads (/proc) ---\n");
    let mut tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    tids.sort();
    for t in tids {
        let rd = |f: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{t}/{f}"))
                .map(|s| s.trim_end().to_string())
                .unwrap_or_else(|e| format!("<{e}>"))
        };
        out.push_str(&format!(
            "tid {t} comm={} wchan={}\n",
            rd("comm"),
            rd("wchan")
        ));
        let stack = rd("stack");
        if !stack.starts_with('<') {
            for l in stack.lines() {
                out.push_str(&format!("    {l}\n"));
            }
        }
    }
    out
}

/// For every thread of `pid`: its name, seccomp mode (2 = filter) and
/// number of filters.
pub fn thread_seccomp(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        // A thread that ended since the listing (a connection's worker)
        // has no filter left to check.
        let Ok(status) = std::fs::read_to_string(t.unwrap().path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} line"))
                .trim()
                .to_string()
        };
        out.push((field("Name:"), field("Seccomp:"), field("Seccomp_filters:")));
    }
    out
}

/// `cmd` run as systemd runs a socket-activated service: `bin ARGS`
/// under `sh`, which sets LISTEN_PID to its own pid and LISTEN_FDS=1 and
/// then becomes the daemon, with `listener` on descriptor 3.
pub fn socket_activated(
    bin: &Path,
    args: &[&std::ffi::OsStr],
    listener: &std::os::unix::net::UnixListener,
) -> Command {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$@\"")
        .arg("sh")
        .arg(bin)
        .args(args);
    // SAFETY: between fork and exec only dup2 and fcntl run, which are
    // async-signal-safe; they put the listener on descriptor 3 without
    // close-on-exec (cleared explicitly: when the listener already is
    // descriptor 3, dup2 does nothing).
    unsafe {
        cmd.pre_exec(move || {
            if fd != 3 && libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// The ids `user` (a name) has on this machine: (uid, primary gid).
pub fn account_ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| {
        let o = Command::new("id").args([flag, user]).output().unwrap();
        assert!(o.status.success(), "id {flag} {user}: {o:?}");
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    (id("-u"), id("-g"))
}

/// Asserts that every thread of `pid` runs as `uid`/`gid` (real,
/// effective, saved and file-system ids), with `gid` as its only
/// supplementary group and no capability left.
pub fn assert_runs_as(pid: u32, uid: u32, gid: u32) {
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .collect();
    assert!(!tasks.is_empty());
    for t in tasks {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {status}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            field("Uid:"),
            format!("{uid} {uid} {uid} {uid}"),
            "{status}"
        );
        assert_eq!(
            field("Gid:"),
            format!("{gid} {gid} {gid} {gid}"),
            "{status}"
        );
        assert_eq!(field("Groups:"), gid.to_string(), "{status}");
        assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
        assert_eq!(field("CapPrm:"), "0000000000000000", "{status}");
    }
}
