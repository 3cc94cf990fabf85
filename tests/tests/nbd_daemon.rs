//! rimg-nbd as a long-lived daemon under abuse (seccomp in kill mode, as
//! in production): stopped and resumed, clients that announce huge
//! payloads and send nothing, clients that trickle their handshake, a
//! descriptor limit reached; after each the server still serves, and
//! SIGTERM ends it with status 0.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nbd_proto::consts::{cmd, opt};
use nbd_proto::option::{InfoRequest, OptionHeader};
use nbd_proto::request::{Headers, Request};
use rimg_tests::daemon::DaemonProcess;
use rimg_tests::nbd::{self, unix_uri};
use rimg_tests::{run_ok, tempdir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A raw client that has finished the handshake on `sock` (export "").
fn connected(sock: &Path) -> UnixStream {
    let mut c = UnixStream::connect(sock).unwrap();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let go = InfoRequest {
        name: String::new(),
        items: vec![],
    };
    c.write_all(&OptionHeader::encode(opt::GO, &go.encode()))
        .unwrap();
    // NBD_REP_INFO (export) and NBD_REP_ACK, then INFO (block size).
    let mut reply = [0u8; 20];
    loop {
        c.read_exact(&mut reply).unwrap();
        let len = u32::from_be_bytes(reply[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        c.read_exact(&mut d).unwrap();
        if u32::from_be_bytes(reply[12..16].try_into().unwrap()) == 1 {
            return c;
        }
    }
}

/// The server's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// CPU time the server used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn reads_back(sock: &Path) {
    let out = run_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x42 0 64k",
            &unix_uri(sock, ""),
        ],
    );
    assert!(out.contains("read 65536/65536"), "{out}");
}

#[test]
fn stop_and_continue_and_hostile_payload_headers() {
    let d = tempdir();
    let img = d.path().join("disk.raw");
    std::fs::write(&img, vec![0x42u8; 4 << 20]).unwrap();
    let sock = d.path().join("nbd.sock");
    let srv = nbd::serve(&sock, &["-e", "0", "-f", "raw", s(&img)]);
    // Job control: the accept loop's poll resumes through
    // restart_syscall, which the filter must allow.
    srv.signal(libc::SIGSTOP);
    srv.signal(libc::SIGCONT);
    reads_back(&sock);
    assert!(!srv.exited(), "SIGSTOP/SIGCONT killed the server");
    // 24 clients each announce a 32 MiB write and send nothing: the
    // server commits memory as payload arrives, not as announced.
    let before = rss_kib(srv.pid());
    let mut held = Vec::new();
    for i in 0..24 {
        let mut c = connected(&sock);
        let mut b = Vec::new();
        Request {
            flags: 0,
            kind: cmd::WRITE,
            cookie: i,
            offset: 0,
            len: 32 << 20,
        }
        .encode(Headers::Compact { structured: false }, &mut b);
        c.write_all(&b).unwrap();
        c.write_all(&[0x42; 100]).unwrap();
        held.push(c);
    }
    reads_back(&sock);
    let grown = rss_kib(srv.pid()).saturating_sub(before);
    assert!(
        grown < 64 << 10,
        "24 announced payloads grew RSS by {grown} KiB"
    );
    drop(held);
    reads_back(&sock);
    nbd::stop(srv);
}

/// With the default single client slot, a client that trickles its
/// handshake is cut off at the handshake limit (a deadline, not a
/// per-read timeout), and the next client is served.
#[test]
fn a_trickling_handshake_is_cut_off_at_the_limit() {
    let d = tempdir();
    let img = d.path().join("disk.raw");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    let sock = d.path().join("nbd.sock");
    let srv = nbd::serve(&sock, &["--handshake-limit", "1", "-f", "raw", s(&img)]);
    let mut c = UnixStream::connect(&sock).unwrap();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    let start = Instant::now();
    // One byte of the client flags every 200 ms: each read succeeds.
    let mut cut = false;
    for i in 0..25 {
        if c.write_all(&[[0, 0, 0, 3][i % 4]]).is_err() {
            cut = true;
            break;
        }
        // The client's own pace, not synchronization: it trickles.
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut rest = Vec::new();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let closed = cut || c.read_to_end(&mut rest).is_ok();
    assert!(closed, "the trickling client was never disconnected");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "cut off after {:?}, limit 1 s",
        start.elapsed()
    );
    reads_back(&sock);
    nbd::stop(srv);
}

/// Out of descriptors: clients are turned away while the limit is
/// reached, the server neither exits nor spins, and it serves again once
/// clients leave.
#[test]
fn a_descriptor_limit_turns_clients_away_without_spinning() {
    let d = tempdir();
    let img = d.path().join("disk.raw");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    let sock = d.path().join("nbd.sock");
    let mut cmd = Command::new("prlimit");
    cmd.env("RUST_LOG", "info")
        .arg("--nofile=24")
        .arg(rimg_tests::workspace_bin("rimg-nbd"))
        .args(["-k", s(&sock), "-t", "-e", "0", "-f", "raw", s(&img)]);
    let srv = DaemonProcess::spawn(cmd, &sock).unwrap();
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(UnixStream::connect(&sock).unwrap());
    }
    let t0 = cpu_ticks(srv.pid());
    let start = Instant::now();
    // Time passing is what is measured here: CPU used over a second
    // while clients wait in the backlog.
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(srv.pid()) - t0;
    let elapsed_ticks = start.elapsed().as_millis() as u64 / 10;
    assert!(
        used * 5 < elapsed_ticks,
        "the server spun: {used} ticks of CPU in {elapsed_ticks}"
    );
    assert!(!srv.exited(), "the server exited at the descriptor limit");
    drop(held);
    reads_back(&sock);
    let log = nbd::stop(srv);
    assert!(
        log.matches("Too many open files").count() <= 4,
        "warnings were not rate-limited:\n{log}"
    );
}

/// Socket activation as systemd does it: a listening socket on
/// descriptor 3, LISTEN_PID naming the server and LISTEN_FDS=1. The
/// server serves on it and ends on SIGTERM with status 0.
#[test]
fn socket_activation() {
    let d = tempdir();
    let img = d.path().join("disk.raw");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    let sock = d.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let bin = rimg_tests::workspace_bin("rimg-nbd");
    let args: Vec<&std::ffi::OsStr> = ["-t", "-e", "0", "-f", "raw"]
        .iter()
        .map(std::ffi::OsStr::new)
        .chain([img.as_os_str()])
        .collect();
    let mut cmd = rimg_tests::daemon::socket_activated(&bin, &args, &listener);
    cmd.env("RUST_LOG", "info");
    let srv = DaemonProcess::spawn(cmd, &sock).unwrap();
    drop(listener);
    reads_back(&sock);
    assert!(srv.log().contains("activated.sock"), "{}", srv.log());
    nbd::stop(srv);
}

/// Whether process `pid` (not our child) has ended: gone, or a zombie
/// that nobody reaps.
fn ended(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(st) => st
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
    }
}

/// qemu-nbd's `--fork` and `--pid-file`: the command returns once the
/// server serves (its "serving" line, logged at info level, on the
/// command's stderr, and nothing there by default, as qemu-nbd; its
/// streams let go, so that reading the command's output to the end
/// returns), with the filter on in every thread; the pid file names the
/// server and stays locked (a second server given it fails), a server
/// that cannot open its image fails with the reason, and SIGTERM ends
/// the forked server, which removes its socket.
#[test]
fn fork_returns_once_serving_and_locks_its_pid_file() {
    let d = tempdir();
    let img = d.path().join("disk.raw");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    let sock = d.path().join("forked.sock");
    let other = d.path().join("other.sock");
    let pidfile = d.path().join("nbd.pid");
    let bin = rimg_tests::workspace_bin("rimg-nbd");
    let run = |args: &[&str]| {
        let o = Command::new(&bin)
            .env("RUST_LOG", "info")
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[
        "--fork",
        "--pid-file",
        s(&pidfile),
        "-t",
        "-k",
        s(&sock),
        "-f",
        "raw",
        s(&img),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("serving 1 export(s)"), "{err}");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    reads_back(&sock);
    for (name, mode, _) in rimg_tests::daemon::thread_seccomp(pid as u32) {
        assert_eq!(
            mode, "2",
            "thread {name} of the forked server has no filter"
        );
    }
    let (code, err) = run(&[
        "--fork",
        "--pid-file",
        s(&pidfile),
        "-k",
        s(&other),
        s(&img),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("Cannot lock pid file"), "{err}");
    // By default nothing on stderr, as qemu-nbd (scripts compare it).
    let quiet = (d.path().join("quiet.raw"), d.path().join("quiet.pid"));
    std::fs::write(&quiet.0, vec![0x42u8; 1 << 20]).unwrap();
    let o = Command::new(&bin)
        .env_remove("RUST_LOG")
        .args(["--fork", "--pid-file", s(&quiet.1), "-t", "-k", s(&other)])
        .args(["-f", "raw", s(&quiet.0)])
        .output()
        .unwrap();
    assert!(o.status.success() && o.stderr.is_empty(), "{o:?}");
    let quiet_pid: i32 = std::fs::read_to_string(&quiet.1)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    reads_back(&other);
    // SAFETY: kill(2) on the pid the server wrote for itself.
    assert_eq!(unsafe { libc::kill(quiet_pid, libc::SIGTERM) }, 0);
    let end = Instant::now() + Duration::from_secs(10);
    while !ended(quiet_pid) {
        assert!(Instant::now() < end, "the quiet server outlived SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    let missing = d.path().join("missing.raw");
    let (code, err) = run(&["--fork", "-k", s(&other), s(&missing)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("No such file"), "{err}");
    reads_back(&sock);
    // SAFETY: kill(2) on the pid the server wrote for itself.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let end = Instant::now() + Duration::from_secs(10);
    while !ended(pid) {
        assert!(
            Instant::now() < end,
            "the forked server outlived SIGTERM by 10 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!sock.exists(), "the socket outlived the server");
}

/// A client that pipelines requests and never reads a reply: the server
/// stops reading it once its queue's budget is spent (requests without
/// data count too), as a server that answers in order would, keeps
/// serving others, and ends on SIGTERM though that client's replies can
/// never be sent.
#[test]
fn a_client_that_never_reads_replies_is_held_back() {
    let d = tempdir();
    let img = d.path().join("disk.raw");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    let sock = d.path().join("nbd.sock");
    let srv = nbd::serve(&sock, &["-e", "0", "-f", "raw", s(&img)]);
    let mut c = connected(&sock);
    let mut b = Vec::new();
    for i in 0..500_000u64 {
        Request {
            flags: 0,
            kind: if i % 2 == 0 {
                cmd::FLUSH
            } else {
                cmd::BLOCK_STATUS
            },
            cookie: i,
            offset: 0,
            len: 0,
        }
        .encode(Headers::Compact { structured: false }, &mut b);
    }
    // Sent until the server has not read for 2 s.
    c.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut sent = 0;
    while sent < b.len() {
        match c.write(&b[sent..(sent + (64 << 10)).min(b.len())]) {
            Ok(n) => sent += n,
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "{e}"
                );
                break;
            }
        }
    }
    assert!(
        sent < 4 << 20,
        "the server read {sent} of {} bytes of requests whose replies nobody read",
        b.len()
    );
    reads_back(&sock);
    let log = nbd::stop(srv);
    drop(c);
    assert!(!log.contains("panicked"), "{log}");
}
