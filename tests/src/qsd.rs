//! qemu-storage-daemon as the reference vhost-user-blk backend: an image
//! exported on a socket, driven through its QMP monitor, which sits on
//! the daemon's stdin and stdout.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

/// How long a QMP command may take to answer.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running qemu-storage-daemon; killed (SIGKILL) if dropped without
/// [`Qsd::quit`].
pub struct Qsd {
    child: Child,
    qmp_in: Option<ChildStdin>,
    /// The monitor's output, one JSON text per line.
    qmp_out: Receiver<String>,
    stderr: Option<JoinHandle<String>>,
}

/// `path` as a QEMU option value (a comma is written twice).
fn opt_path(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").replace(',', ",,")
}

impl Qsd {
    /// Exports the qcow2 `image` (node `disk`) writable as vhost-user-blk
    /// on `socket`. Returns once the monitor's greeting came: the daemon
    /// handles its options in order, so the export, named before the
    /// monitor, listens by then (the same for [`Qsd::start_nbd`]).
    pub fn start_blk(image: &Path, socket: &Path) -> Qsd {
        Qsd::start(
            image,
            &[
                "--export".into(),
                format!(
                    "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},writable=on",
                    opt_path(socket)
                ),
            ],
            false,
        )
    }

    /// Exports the qcow2 `image` over NBD on the UNIX socket `socket` as
    /// export `name`, writable or not.
    pub fn start_nbd(image: &Path, socket: &Path, name: &str, writable: bool) -> Qsd {
        let on = if writable { "on" } else { "off" };
        Qsd::start(
            image,
            &[
                "--nbd-server".into(),
                format!("addr.type=unix,addr.path={}", opt_path(socket)),
                "--export".into(),
                format!("type=nbd,id=export,node-name=disk,name={name},writable={on}"),
            ],
            !writable,
        )
    }

    fn start(image: &Path, export: &[String], read_only: bool) -> Qsd {
        let ro = if read_only { ",read-only=on" } else { "" };
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file,filename={}{ro}",
                opt_path(image)
            ))
            .arg("--blockdev")
            .arg(format!("driver=qcow2,node-name=disk,file=file{ro}"))
            .args(export)
            .args(["--chardev", "stdio,id=qmp", "--monitor", "chardev=qmp"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, qmp_out) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let mut q = Qsd {
            qmp_in: child.stdin.take(),
            child,
            qmp_out,
            stderr: Some(stderr),
        };
        let greeting = q.next_line("the QMP greeting");
        assert!(greeting.get("QMP").is_some(), "not a greeting: {greeting}");
        q.qmp("qmp_capabilities", json!({}))
            .unwrap_or_else(|e| panic!("qmp_capabilities: {e}"));
        q
    }

    /// The monitor's next line, parsed; panics (with the daemon's
    /// stderr) after [`QMP_TIMEOUT`] or at its exit.
    fn next_line(&mut self, waiting_for: &str) -> Value {
        match self.qmp_out.recv_timeout(QMP_TIMEOUT) {
            Ok(line) => {
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP line {line:?}: {e}"))
            }
            Err(e) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let log = self.stderr.take().and_then(|t| t.join().ok());
                panic!(
                    "qemu-storage-daemon: no {waiting_for} ({e}); stderr:\n{}",
                    log.unwrap_or_default()
                )
            }
        }
    }

    /// Runs QMP command `execute` with `arguments`: its `return` value, or
    /// its `error` object. Events that come first are skipped.
    pub fn qmp(&mut self, execute: &str, arguments: Value) -> Result<Value, Value> {
        let cmd = json!({ "execute": execute, "arguments": arguments });
        let stdin = self.qmp_in.as_mut().expect("monitor open");
        writeln!(stdin, "{cmd}").expect("write to the QMP monitor");
        stdin.flush().expect("write to the QMP monitor");
        loop {
            let v = self.next_line(&format!("answer to {execute}"));
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e.clone());
            }
        }
    }

    /// Asks the daemon to quit (QMP `quit`) and waits for its exit;
    /// returns the status and its stderr.
    pub fn quit(mut self) -> (ExitStatus, String) {
        self.qmp("quit", json!({}))
            .unwrap_or_else(|e| panic!("quit: {e}"));
        drop(self.qmp_in.take());
        let st = self.child.wait().expect("wait for qemu-storage-daemon");
        let log = self.stderr.take().and_then(|t| t.join().ok());
        (st, log.unwrap_or_default())
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        if let Some(t) = self.stderr.take() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if let Ok(log) = t.join() {
                if std::thread::panicking() {
                    eprintln!("qemu-storage-daemon stderr:\n{log}");
                }
            }
        }
    }
}
