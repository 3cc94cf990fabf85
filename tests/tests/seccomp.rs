//! The daemons' seccomp filters: a process with a daemon's filter still
//! does what the daemon does (threads, eventfds, allocations, logs), and
//! dies by SIGSYS on a call outside the list; `log` lets the call through.
//! A running daemon has the filter on every thread, and none with
//! `--seccomp off`. (That the daemons serve guests with the filter on is
//! what the rest of the vhost tests check: it is on by default.)

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use rimg_tests::blk::Daemon;
use rimg_tests::{qemu_img, tempdir, workspace_bin};

fn probe(daemon: &str, action: &str, call: &str) -> std::process::Output {
    Command::new(workspace_bin("seccomp-probe"))
        .args([daemon, action, call])
        .output()
        .expect("run seccomp-probe")
}

fn assert_survives(daemon: &str, action: &str, call: &str) {
    let o = probe(daemon, action, call);
    assert!(
        o.status.success() && o.stdout == b"survived\n",
        "{daemon} {action} {call}: {:?} {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

fn assert_killed(daemon: &str, call: &str) {
    let o = probe(daemon, "kill", call);
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGSYS),
        "{daemon} {call}: {:?}, stdout {:?}, stderr {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn allowed_calls_work_under_the_filters() {
    for d in ["blk", "net"] {
        assert_survives(d, "kill", "allowed");
    }
    // The net daemon's TAP ioctls are allowed; the block daemon has none.
    assert_survives("net", "kill", "tun-ioctl");
    assert_killed("blk", "tun-ioctl");
}

#[test]
fn forbidden_calls_kill_the_process() {
    for d in ["blk", "net"] {
        for call in ["openat", "inet-socket", "fork", "exec-mmap", "tty-ioctl"] {
            assert_killed(d, call);
        }
    }
}

#[test]
fn log_mode_lets_forbidden_calls_through() {
    for call in ["openat", "inet-socket", "fork"] {
        assert_survives("blk", "log", call);
    }
}

/// The Seccomp line of every thread of `pid`: the mode (2 = filter).
fn thread_seccomp_modes(pid: u32) -> Vec<String> {
    let mut modes = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .expect("Seccomp line")
            .trim()
            .to_string();
        modes.push(mode);
    }
    modes
}

#[test]
fn running_daemon_has_the_filter_on_every_thread() {
    let d = tempdir();
    let img = d.path().join("disk.raw");
    assert!(
        qemu_img(&["create", "-q", "-f", "raw", img.to_str().unwrap(), "1M"])
            .status
            .success()
    );
    for (args, want) in [(&[][..], "2"), (&["--seccomp", "off"][..], "0")] {
        let sock = d.path().join("s.sock");
        let daemon = Daemon::start(&sock, &img, args).expect("daemon");
        let modes = thread_seccomp_modes(daemon.child.id());
        // The main thread and the signal thread at least.
        assert!(modes.len() >= 2, "{modes:?}");
        assert!(modes.iter().all(|m| m == want), "{args:?}: {modes:?}");
        let (st, log) = daemon.terminate();
        assert!(st.success(), "{args:?}: exit {st}: {log}");
        assert!(!sock.exists(), "socket left behind");
    }
    let o = Command::new(workspace_bin("rimg-vhost-blk"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("--seccomp <kill|log|off>"), "{help}");
    let o = Command::new(workspace_bin("rimg-vhost-net"))
        .args([
            "--socket",
            "/nonexistent/x",
            "--tap",
            "x",
            "--seccomp",
            "maybe",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected kill, log or off"));
}
