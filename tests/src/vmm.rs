//! Test support for rimg-vmm: the freestanding probe guest (built here
//! with the host's rustc) and a watched VMM run.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Builds tests/guests/virtio_probe.rs into an ELF the VMM loads as its
/// kernel: no_std, linked at 2 MiB, entered in long mode.
pub fn probe_guest() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| build_guest("virtio_probe"))
}

/// Builds tests/guests/cpu_probe.rs (CPUID as the vCPUs see it, an
/// application processor started by INIT/SIPI, and on request a triple
/// fault) the same way.
pub fn cpu_guest() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| build_guest("cpu_probe"))
}

fn build_guest(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("guests/{name}.rs"));
    let dir = crate::target_dir().join("vmm-guests");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("{name}.elf"));
    let tmp = dir.join(format!("{name}-{}.elf", std::process::id()));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let o = Command::new(rustc)
        .args(["--edition", "2021", "--crate-type", "bin"])
        .args(["-C", "panic=abort", "-C", "opt-level=2"])
        .args(["-C", "relocation-model=static", "-C", "target-cpu=x86-64"])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .args(["-C", "link-arg=-static", "-C", "link-arg=-no-pie"])
        .args(["-C", "link-arg=-Wl,--image-base=0x200000"])
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .arg(&src)
        .arg("-o")
        .arg(&tmp)
        .output()
        .expect("run rustc");
    assert!(
        o.status.success(),
        "building the {name} guest failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Renamed into place: concurrent test processes never see a
    // half-written file.
    std::fs::rename(&tmp, &out).unwrap();
    out
}

/// A finished VMM run.
pub struct VmmRun {
    pub console: String,
    pub stderr: String,
    pub code: Option<i32>,
    pub timed_out: bool,
}

impl VmmRun {
    pub fn assert_clean_exit(&self) {
        assert!(
            !self.timed_out && self.code == Some(0),
            "rimg-vmm exit {:?} (timed out: {})\n--- console ---\n{}\n--- stderr ---\n{}",
            self.code,
            self.timed_out,
            self.console,
            self.stderr
        );
    }
}

impl From<crate::Watched> for VmmRun {
    fn from(w: crate::Watched) -> VmmRun {
        VmmRun {
            console: String::from_utf8_lossy(&w.stdout).replace('\r', ""),
            stderr: String::from_utf8_lossy(&w.stderr).into_owned(),
            code: w.status.and_then(|s| s.code()),
            timed_out: w.timed_out,
        }
    }
}

/// Runs `rimg-vmm ARGS` to completion (killed after `timeout`).
pub fn run_vmm(args: &[&str], timeout: Duration) -> VmmRun {
    let mut cmd = Command::new(crate::workspace_bin("rimg-vmm"));
    cmd.args(args);
    crate::run_watched(cmd, timeout).into()
}

/// A running rimg-vmm, for tests that look at the process while its
/// guest runs. Its stdin is a pipe held open until [`VmmProcess::finish`],
/// so its console-input thread stays too.
pub struct VmmProcess(crate::WatchedChild);

impl VmmProcess {
    pub fn spawn(args: &[&str]) -> VmmProcess {
        let mut cmd = Command::new(crate::workspace_bin("rimg-vmm"));
        cmd.args(args);
        VmmProcess(crate::spawn_watched(cmd, std::process::Stdio::piped()))
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Waits until the guest's console so far contains `needle`; false if
    /// `timeout` passes first.
    pub fn wait_for_console(&self, needle: &str, timeout: Duration) -> bool {
        self.0.wait_for_stdout(needle, timeout)
    }

    /// Types `bytes` on the guest's console (the UART's input).
    pub fn send_console(&mut self, bytes: &[u8]) {
        self.0.write_stdin(bytes)
    }

    /// The guest's console so far.
    pub fn console_so_far(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout_so_far()).replace('\r', "")
    }

    /// Closes its stdin and waits for the exit (killed after `timeout`).
    pub fn finish(self, timeout: Duration) -> VmmRun {
        self.0.wait(timeout).into()
    }
}

/// A packet socket on `dev`, in the network namespace of the calling
/// thread (see `Netns::run_in`), with a 200 ms receive timeout.
pub fn packet_socket(dev: &str) -> OwnedFd {
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        )
    };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is fresh and ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex > 0, "no interface {dev}");
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: bind with a sockaddr_ll of the size passed.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: setsockopt with a timeval of the size passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    fd
}

/// Waits (up to `timeout`) for the probe guest's frame (ethertype
/// 0x88b5) on `pkt`.
pub fn guest_frame(pkt: &OwnedFd, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        assert!(
            Instant::now() < deadline,
            "no frame from the guest on the TAP"
        );
        // SAFETY: recv into our buffer of the length passed.
        let n = unsafe { libc::recv(pkt.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 14 && buf[12..14] == [0x88, 0xb5] {
            return buf[..n as usize].to_vec();
        }
    }
}

/// Sends `frame` out of `pkt`.
pub fn send_frame(pkt: &OwnedFd, frame: &[u8]) {
    // SAFETY: send from our buffer of the length passed.
    let n = unsafe { libc::send(pkt.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(
        n,
        frame.len() as isize,
        "send: {}",
        std::io::Error::last_os_error()
    );
}

/// The frame the tests write into the TAP for the probe guest: to `mac`,
/// ethertype 0x88b6, payload "RIMG-VMM-RX", padded to the 60-byte minimum.
pub fn frame_to_guest(mac: [u8; 6]) -> [u8; 60] {
    let mut out = [0u8; 60];
    out[..6].copy_from_slice(&mac);
    out[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    out[12..14].copy_from_slice(&[0x88, 0xb6]);
    out[14..25].copy_from_slice(b"RIMG-VMM-RX");
    out
}
