//! The daemons' and the VMM's seccomp filters: a process with a daemon's
//! filter still does what the daemon does (threads, eventfds,
//! allocations, logs) and what the C library and std do on their own
//! during a long run (a heap trim's `openat`, answered EACCES; clocks,
//! CPU affinity, `madvise`), and dies by SIGSYS on a call outside the
//! list; a
//! thread that entered the vring workers' filter may do less; the VMM's
//! filter allows its KVM ioctls on its own descriptors only and no new
//! thread; `log` lets the call through. A running daemon has the filter on
//! every thread, its vring workers one more, and none with `--seccomp
//! off`; so has a running VMM. (That the daemons serve guests and the VMM
//! runs them with the filter on is what the rest of the vhost and VMM
//! tests check: it is on by default.)

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use rimg_tests::blk::{Client, Daemon};
use rimg_tests::daemon::thread_seccomp;
use rimg_tests::net::{NetDaemon, Netns};
use rimg_tests::vmm::{guest_frame, packet_socket, probe_guest, send_frame, VmmProcess};
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
    for d in ["blk", "net", "blk-worker", "net-worker"] {
        assert_survives(d, "kill", "allowed");
    }
    // The net daemon's TAP ioctls are allowed, in its workers too; the
    // block daemon has none.
    assert_survives("net", "kill", "tun-ioctl");
    assert_survives("net-worker", "kill", "tun-ioctl");
    assert_killed("blk", "tun-ioctl");
    assert_killed("blk-worker", "tun-ioctl");
    // The process may open UNIX sockets and io_urings (each connection
    // does), its vring workers may not.
    for d in ["blk", "net"] {
        assert_survives(d, "kill", "unix-socket");
        assert_survives(d, "kill", "io-uring-setup");
        let w = format!("{d}-worker");
        assert_killed(&w, "unix-socket");
        assert_killed(&w, "io-uring-setup");
    }
}

#[test]
fn forbidden_calls_kill_the_process() {
    for d in ["blk", "net", "blk-worker", "net-worker"] {
        for call in [
            "inet-socket",
            "fork",
            "exec-mmap",
            "tty-ioctl",
            "madvise-bad",
        ] {
            assert_killed(d, call);
        }
    }
}

const KINDS: [&str; 5] = ["blk", "net", "blk-worker", "net-worker", "vmm"];

/// What the C library and std may do on any thread at any moment of a
/// long run is allowed or answered with an errno they handle, in kill
/// mode, on every kind of thread: clock_gettime as a syscall,
/// sched_getaffinity, madvise hints; open and openat fail with EACCES
/// (the probe checks the errno) and the process goes on.
#[test]
fn runtime_calls_and_open_do_not_kill() {
    for d in KINDS {
        for call in ["runtime", "openat", "open"] {
            assert_survives(d, "kill", call);
        }
    }
}

/// Installs strace if the machine lacks it.
fn ensure_strace() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if Command::new("strace").arg("-V").output().is_ok() {
            return;
        }
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "-q", "strace"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .output()
                .expect("apt-get")
        };
        let mut o = install();
        if !o.status.success() {
            let _ = Command::new("apt-get").args(["update", "-q"]).output();
            o = install();
        }
        assert!(o.status.success(), "installing strace: {o:?}");
    });
}

/// The case found by a long run: glibc shrinking a thread's malloc arena
/// for the first time reads /proc/sys/vm/overcommit_memory. Under every
/// filter, in kill mode, that `openat` (seen by strace) fails with EACCES
/// and the process goes on (allocates, prints "survived").
#[test]
fn heap_trim_open_is_answered_eacces() {
    ensure_strace();
    let d = tempdir();
    for kind in KINDS {
        let trace = d.path().join(format!("{kind}.trace"));
        let o = Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=openat,open", "-o"])
            .arg(&trace)
            .arg(workspace_bin("seccomp-probe"))
            .args([kind, "kill", "heap-trim"])
            .output()
            .expect("run strace");
        let t = std::fs::read_to_string(&trace).unwrap();
        assert!(
            o.status.success() && o.stdout == b"survived\n",
            "{kind}: {:?} {}\n{t}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        let line = t
            .lines()
            .find(|l| l.contains("/proc/sys/vm/overcommit_memory"))
            .unwrap_or_else(|| panic!("{kind}: glibc did not trim:\n{t}"));
        assert!(
            line.ends_with("= -1 EACCES (Permission denied)"),
            "{kind}: {line}"
        );
    }
}

#[test]
fn log_mode_lets_forbidden_calls_through() {
    for call in ["madvise-bad", "inet-socket", "fork"] {
        assert_survives("blk", "log", call);
    }
    for call in ["madvise-bad", "thread", "kvm-create-vcpu", "memfd"] {
        assert_survives("vmm", "log", call);
    }
}

#[test]
fn vmm_filter_allows_its_kvm_ioctls_and_nothing_else() {
    // What the running VMM does: eventfds, allocations, stderr; KVM_RUN
    // on a vCPU, irqfd registration on the VM.
    for call in ["allowed", "kvm-run", "kvm-irqfd"] {
        assert_survives("vmm", "kill", call);
    }
    for call in [
        "madvise-bad",
        "inet-socket",
        "unix-socket",
        "fork",
        "thread",
        "exec-mmap",
        "memfd",
        "io-uring-setup",
        "tty-ioctl",
        "tun-ioctl",
        // A vCPU request on the VM descriptor, a VM request the running
        // VMM never makes.
        "kvm-run-on-vm",
        "kvm-create-vcpu",
    ] {
        assert_killed("vmm", call);
    }
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
    // (mode, filters of most threads, filters of the vring workers): the
    // process has three (the list, the one answering clone3 ENOSYS and
    // the one answering open and openat EACCES); a vring worker adds its
    // own list when it first handles an event.
    for (args, want) in [
        (&["--num-queues", "2"][..], ("2", "3", "4")),
        (
            &["--num-queues", "2", "--seccomp", "off"][..],
            ("0", "0", "0"),
        ),
    ] {
        let sock = d.path().join("s.sock");
        let daemon = Daemon::start(&sock, &img, args).expect("daemon");
        let mut c = Client::connect(&sock, 2, false).expect("connect");
        for q in 0..2 {
            c.write(q, 0, &[q as u8; 4096]).expect("write");
            assert_eq!(c.read(q, 0, 4096).expect("read"), vec![q as u8; 4096]);
        }
        let threads = thread_seccomp(daemon.child.id());
        let workers = threads.iter().filter(|t| t.0 == "vring_worker").count();
        assert_eq!(workers, 2, "{threads:?}");
        // (io_uring's kernel workers, iou-*, are listed as threads too and
        // copy the state of the thread they work for.)
        for (name, mode, filters) in threads.iter().filter(|t| !t.0.starts_with("iou-")) {
            let f = if name == "vring_worker" {
                want.2
            } else {
                want.1
            };
            assert_eq!(
                (mode.as_str(), filters.as_str()),
                (want.0, f),
                "{args:?}: {threads:?}"
            );
        }
        drop(c);
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

/// rimg-vmm running the probe guest with a NIC served by rimg-vhost-net:
/// while the guest waits for a frame from the TAP, every thread of the
/// VMM (main, console input, backend watcher, vCPU) has the filter (two
/// programs: the list and the one answering open and openat EACCES), and
/// none has
/// it with `--seccomp off`. Both runs finish the guest's work.
#[test]
fn running_vmm_has_the_filter_on_every_thread() {
    const T: Duration = Duration::from_secs(60);
    // (--seccomp, (seccomp mode: 2 = filter, number of filters))
    for (mode, want) in [("kill", ("2", "2")), ("off", ("0", "0"))] {
        let ns = Netns::new("vmmsc");
        let d = tempdir();
        let sock = d.path().join("net.sock");
        let daemon = NetDaemon::start_in(&ns, &sock, &["--tap-create", "vs0"]).unwrap();
        ns.command("sysctl")
            .args(["-qw", "net.ipv6.conf.vs0.disable_ipv6=1"])
            .status()
            .unwrap();
        let pkt = ns.run_in(|| packet_socket("vs0"));
        let net = format!("socket={},mac=52:54:00:12:34:56", sock.display());
        let kernel = probe_guest().to_str().unwrap();
        let vmm = VmmProcess::spawn(&[
            "--kernel",
            kernel,
            "--memory",
            "64M",
            "--net",
            &net,
            "--seccomp",
            mode,
        ]);
        guest_frame(&pkt, T);
        // The guest sent its frame and now waits for one: the VM runs.
        // (KVM's own kernel worker, kvm-nx-lpage-recovery, is listed as
        // a thread of the process too.)
        let threads: Vec<_> = thread_seccomp(vmm.id())
            .into_iter()
            .filter(|t| !t.0.starts_with("kvm-"))
            .collect();
        let mut names: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            ["rimg-vmm", "stdin", "vcpu0", "vhost-watch"],
            "{mode}: {threads:?}"
        );
        for (name, seccomp, filters) in &threads {
            assert_eq!(
                (seccomp.as_str(), filters.as_str()),
                want,
                "{mode}: thread {name}: {threads:?}"
            );
        }
        let mut frame = [0u8; 60];
        frame[..6].copy_from_slice(&[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        frame[12..14].copy_from_slice(&[0x88, 0xb6]);
        frame[14..25].copy_from_slice(b"RIMG-VMM-RX");
        send_frame(&pkt, &frame);
        let r = vmm.finish(T);
        r.assert_clean_exit();
        assert!(
            r.console.contains("net: rx payload RIMG-VMM-RX") && r.console.contains("probe: PASS"),
            "{mode}: {}",
            r.console
        );
        let (st, log) = daemon.terminate();
        assert!(st.success(), "{mode}: daemon: {log}");
    }
    let o = Command::new(workspace_bin("rimg-vmm"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("--seccomp <kill|log|off>"), "{help}");
    let o = Command::new(workspace_bin("rimg-vmm"))
        .args(["--kernel", "/nonexistent", "--seccomp", "maybe"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected kill, log or off"));
}
