//! Test support for the net daemon: network namespaces the tests create
//! and delete (no packet ever leaves loopback and these namespaces),
//! `rimg-vhost-net` started inside one, and DPDK's testpmd as a real
//! vhost-user-net frontend (virtio-user port, no VM).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates a namespace with a unique name and loopback up.
    pub fn new(tag: &str) -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "rimg-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let o = crate::run("ip", &["netns", "add", &name]);
        assert!(
            o.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip ARGS` inside the namespace; asserts success.
    pub fn ip(&self, args: &[&str]) {
        let mut a = vec!["netns", "exec", &self.name, "ip"];
        a.extend_from_slice(args);
        let o = crate::run("ip", &a);
        assert!(
            o.status.success(),
            "ip {args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// A command that runs `prog` inside the namespace.
    pub fn command(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(prog);
        c
    }

    /// A counter of interface `dev` (`/sys/class/net/DEV/statistics/NAME`)
    /// as seen inside the namespace.
    pub fn counter(&self, dev: &str, name: &str) -> u64 {
        let path = format!("/sys/class/net/{dev}/statistics/{name}");
        let o = self.command("cat").arg(&path).output().expect("cat");
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{path} in {}: {:?}", self.name, o))
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it
    /// opens live there) and waits for it.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_in(f).join().expect("netns thread")
    }

    /// Starts `f` on a new thread inside the namespace.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            use std::os::fd::AsRawFd;
            // SAFETY: setns(2) on a namespace fd we hold open; it changes
            // only this (fresh, private) thread's network namespace.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = crate::run("ip", &["netns", "del", &self.name]);
    }
}

/// Polls `cond` until it holds or `timeout` passes (for counters that
/// other processes move; there is no event to wait on).
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A running `rimg-vhost-net`.
pub type NetDaemon = crate::daemon::DaemonProcess;

impl NetDaemon {
    /// Starts the daemon inside `ns` with `args` after --socket, and waits
    /// until it listens. (`ip netns exec` execs the daemon, so the child
    /// is the daemon itself and SIGTERM reaches it.)
    pub fn start_in(ns: &Netns, socket: &Path, args: &[&str]) -> Result<NetDaemon, String> {
        let mut cmd = ns.command(crate::workspace_bin("rimg-vhost-net"));
        cmd.arg("--socket").arg(socket).args(args).env(
            "RUST_LOG",
            std::env::var("RIMG_NET_LOG").unwrap_or_else(|_| "info".into()),
        );
        crate::daemon::DaemonProcess::spawn(cmd, socket)
    }
}

/// Per-pair counters from the daemon's disconnect log lines, in order of
/// appearance: (tx frames, tx gso, rx frames, rx gso) for each pair index,
/// for connections that moved frames.
pub fn pair_stats(log: &str) -> Vec<(usize, [u64; 4])> {
    let mut out = Vec::new();
    for l in log.lines() {
        let Some(rest) = l.split("pair ").nth(1) else {
            continue;
        };
        let nums: Vec<u64> = rest
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse().ok())
            .collect();
        // Connections that moved nothing are skipped.
        if nums.len() == 7 && nums[1..].iter().any(|&n| n != 0) {
            out.push((nums[0] as usize, [nums[1], nums[2], nums[4], nums[5]]));
        }
    }
    out
}

/// Installs DPDK's testpmd if the machine lacks it.
pub fn ensure_testpmd() {
    crate::ensure_tool("dpdk-testpmd", "dpdk-dev");
}

/// A running testpmd (non-interactive: it forwards until a line arrives
/// on its stdin, then prints its statistics and exits).
pub struct Testpmd {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Option<std::thread::JoinHandle<String>>,
    started: std::sync::mpsc::Receiver<()>,
    /// Its DPDK --file-prefix, unique to this run.
    prefix: String,
}

/// Forwarding statistics testpmd printed at exit (all ports).
#[derive(Debug, Default, Clone, Copy)]
pub struct PmdStats {
    pub rx: u64,
    pub tx: u64,
}

impl Testpmd {
    /// Starts testpmd inside `ns` with EAL args `eal` and application
    /// args `app` (after `--`), without hugepages. `tag` starts its DPDK
    /// file prefix, which is made unique (process id and a counter): DPDK
    /// keeps a runtime directory per prefix and refuses a second primary
    /// process on one, and tests run in parallel, here and in other
    /// checkouts on the same machine.
    pub fn start(ns: &Netns, tag: &str, eal: &[&str], app: &[&str]) -> Testpmd {
        ensure_testpmd();
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "rimg-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        // Line-buffered stdout, so "Press enter to exit" arrives when
        // printed rather than at exit.
        let mut c = ns.command("stdbuf");
        c.args(["-oL", "dpdk-testpmd"]);
        c.args(["-l", "0,1", "--no-huge", "-m", "1024", "--no-pci"])
            .arg(format!("--file-prefix={prefix}"))
            .arg("--single-file-segments")
            .args(eal)
            .arg("--")
            .args(app)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = c.spawn().expect("spawn dpdk-testpmd");
        let stdin = child.stdin.take();
        let so = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let mut rd = BufReader::new(so);
            let mut line = String::new();
            while rd.read_line(&mut line).unwrap_or(0) > 0 {
                if line.contains("Press enter to exit") {
                    let _ = tx.send(());
                }
                s.push_str(&line);
                line.clear();
            }
            s
        });
        Testpmd {
            child,
            stdin,
            out: Some(out),
            started: rx,
            prefix,
        }
    }

    /// DPDK's runtime directory for this testpmd (root's: the net tests
    /// run as root).
    fn runtime_dir(&self) -> std::path::PathBuf {
        Path::new("/var/run/dpdk").join(&self.prefix)
    }

    /// A counter of port `port` (`ipackets`, `opackets`, ...) read live
    /// through testpmd's telemetry socket; None if it cannot be read (not
    /// started yet, or gone).
    pub fn port_stat(&self, port: u16, key: &str) -> Option<u64> {
        let reply = telemetry(
            &self.runtime_dir().join("dpdk_telemetry.v2"),
            &format!("/ethdev/stats,{port}"),
        )?;
        reply.get("/ethdev/stats")?.get(key)?.as_u64()
    }

    /// Waits until testpmd has started forwarding (its ports are up, so
    /// the vhost-user rings are live); false if it exited or timed out.
    pub fn wait_started(&self, timeout: Duration) -> bool {
        self.started.recv_timeout(timeout).is_ok()
    }

    /// Stops forwarding, waits for the exit and returns the accumulated
    /// statistics and the full output.
    pub fn stop(mut self) -> (PmdStats, String) {
        if let Some(mut i) = self.stdin.take() {
            let _ = i.write_all(b"\n");
        }
        let _ = self.child.wait();
        let out = self.out.take().unwrap().join().unwrap_or_default();
        let _ = std::fs::remove_dir_all(self.runtime_dir());
        (parse_pmd_stats(&out), out)
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(self.runtime_dir());
        }
    }
}

/// One request to a DPDK telemetry socket (a SOCK_SEQPACKET socket that
/// greets with a JSON line, then answers each command with one JSON
/// object).
fn telemetry(path: &Path, cmd: &str) -> Option<serde_json::Value> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: socket(2) with constant arguments; checked below.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let p = path.as_os_str().as_bytes();
    if p.len() >= sa.sun_path.len() {
        return None;
    }
    for (d, s) in sa.sun_path.iter_mut().zip(p) {
        *d = *s as libc::c_char;
    }
    // SAFETY: connect reads the sockaddr_un we pass, of the given size.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as u32,
        )
    };
    if r != 0 {
        return None;
    }
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads one timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let mut buf = vec![0u8; 1 << 16];
    let recv = |buf: &mut [u8]| -> Option<usize> {
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n > 0).then_some(n as usize)
    };
    recv(&mut buf)?; // the greeting
                     // SAFETY: send reads cmd, which outlives the call.
    let n = unsafe { libc::send(fd.as_raw_fd(), cmd.as_ptr().cast(), cmd.len(), 0) };
    if n != cmd.len() as isize {
        return None;
    }
    let n = recv(&mut buf)?;
    serde_json::from_slice(&buf[..n]).ok()
}

fn parse_pmd_stats(out: &str) -> PmdStats {
    // The block after "Accumulated forward statistics for all ports".
    let Some(i) = out.find("Accumulated forward statistics") else {
        return PmdStats::default();
    };
    let block = &out[i..];
    let num = |key: &str| -> u64 {
        block
            .find(key)
            .and_then(|p| {
                block[p + key.len()..]
                    .split_whitespace()
                    .next()
                    .and_then(|s| s.parse().ok())
            })
            .unwrap_or(0)
    };
    PmdStats {
        rx: num("RX-packets:"),
        tx: num("TX-packets:"),
    }
}

/// A raw packet socket (AF_PACKET) on one interface inside a namespace:
/// it sees the frames the interface receives (for a TAP: what its reader,
/// the daemon, wrote) and sends frames out through it (to the TAP's
/// reader). Frames go nowhere else.
pub struct PacketSocket {
    fd: std::os::fd::OwnedFd,
}

impl PacketSocket {
    pub fn open(ns: &Netns, dev: &str) -> PacketSocket {
        use std::os::fd::FromRawFd;
        let name = std::ffi::CString::new(dev).unwrap();
        ns.run_in(move || {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: socket(2) with constant arguments; checked below.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(proto),
                )
            };
            assert!(
                raw >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: a fresh descriptor nobody else owns.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
            // SAFETY: a NUL-terminated name that outlives the call.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(ifindex > 0, "no interface {name:?}");
            // SAFETY: sockaddr_ll is plain data; all-zero is valid.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_protocol = proto;
            sa.sll_ifindex = ifindex as i32;
            // SAFETY: bind reads the sockaddr_ll we pass, of the given size.
            let r = unsafe {
                libc::bind(
                    raw,
                    (&sa as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            PacketSocket { fd }
        })
    }

    /// Sends `frame` (a whole Ethernet frame) out through the interface.
    pub fn send(&self, frame: &[u8]) {
        use std::os::fd::AsRawFd;
        // SAFETY: send reads `frame`, which outlives the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame the interface received with EtherType `ethertype`
    /// (frames it sent are skipped); None if `timeout` passes first.
    pub fn recv(&self, ethertype: u16, timeout: Duration) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let end = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536 + 64];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as i32) } <= 0 {
                continue;
            }
            // SAFETY: sockaddr_ll is plain data; all-zero is valid.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut sl = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: recvfrom writes at most buf.len() bytes into buf and
            // at most `sl` bytes into sa, both ours.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut sa as *mut libc::sockaddr_ll).cast(),
                    &mut sl,
                )
            };
            if n < 14 || sa.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let f = &buf[..n as usize];
            if u16::from_be_bytes([f[12], f[13]]) == ethertype {
                return Some(f.to_vec());
            }
        }
    }
}
