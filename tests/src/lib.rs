//! Shared helpers for the workspace-level integration tests. The judge is
//! always the real QEMU tooling on the machine (qemu-img, qemu-io).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs a command and returns its output; panics with the command line
/// if it cannot be started at all (a missing tool is a test failure, not
/// a skip).
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} {args:?}: {e}"))
}

/// Runs qemu-img and returns its output.
pub fn qemu_img(args: &[&str]) -> Output {
    run("qemu-img", args)
}

/// Runs the workspace's `rimg` binary and returns its output.
pub fn rimg(args: &[&str]) -> Output {
    Command::new(workspace_bin("rimg"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rimg {args:?}: {e}"))
}

/// Runs `name` with `args`: "rimg" is the workspace's binary, any other
/// name a program on PATH (qemu-img for the same step by QEMU).
pub fn tool(name: &str, args: &[&str]) -> Output {
    match name {
        "rimg" => rimg(args),
        _ => run(name, args),
    }
}

/// Asserts that a command exited 0 (its output in the message if not);
/// returns its stdout.
pub fn ok(o: Output) -> String {
    ok_as(o, "command").stdout_text()
}

/// As [`ok`], naming `what` ran in the message; returns the output.
pub fn ok_as(o: Output, what: &str) -> Output {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Runs `cmd`, asserts that it succeeded; returns its stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    ok_as(run(cmd, args), &format!("{cmd} {args:?}")).stdout_text()
}

/// A command's output as text (lossy UTF-8).
pub trait OutputText {
    fn stdout_text(&self) -> String;
    fn stderr_text(&self) -> String;
}

impl OutputText for Output {
    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Creates a qcow2 image with qemu-img (`opts` passed as `-o` unless
/// empty); asserts success.
pub fn qemu_create(img: impl AsRef<Path>, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([img.as_ref().to_str().unwrap(), size]);
    ok_as(qemu_img(&args), &format!("qemu-img {args:?}"));
}

/// As [`qemu_create`], over the backing file `backing` of format
/// `backing_fmt` (named as given: absolute, or relative to `img`'s
/// directory; `size` may be empty for the backing file's).
pub fn qemu_create_backed(img: &Path, opts: &str, backing: &Path, backing_fmt: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend(["-F", backing_fmt, "-b", backing.to_str().unwrap()]);
    args.push(img.to_str().unwrap());
    if !size.is_empty() {
        args.push(size);
    }
    ok_as(qemu_img(&args), &format!("qemu-img {args:?}"));
}

/// The VDI images `fixtures/make-foreign.sh` makes (see the script).
pub const FOREIGN_VDI: &[&str] = &[
    "vdi-dynamic.vdi",
    "vdi-static.vdi",
    "vdi-odd.vdi",
    "vdi-empty.vdi",
];

/// The VHD images `fixtures/make-foreign.sh` makes (see the script). The
/// fixed ones probe as raw, as in QEMU: open them with format vpc.
pub const FOREIGN_VPC: &[&str] = &[
    "vpc-dynamic.vhd",
    "vpc-dynamic-force.vhd",
    "vpc-fixed.vhd",
    "vpc-fixed-force.vhd",
    "vpc-dynamic-6m.vhd",
    "vpc-win.vhd",
    "vpc-vpc.vhd",
    "vpc-diff.vhd",
    "vpc-empty.vhd",
];

/// The VMDK images `fixtures/make-foreign.sh` makes (see the script).
/// vmdk-6g.vmdk is 6 GiB: read it in ranges, not whole.
pub const FOREIGN_VMDK: &[&str] = &[
    "vmdk-sparse.vmdk",
    "vmdk-zeroed.vmdk",
    "vmdk-odd.vmdk",
    "vmdk-6g.vmdk",
    "vmdk-empty.vmdk",
    "vmdk-stream.vmdk",
    "vmdk-stream-end.vmdk",
];

/// The VHDX images of make-foreign.sh (vhdx-diff.vhdx, a differencing
/// disk QEMU refuses, apart).
pub const FOREIGN_VHDX: &[&str] = &[
    "vhdx-dynamic.vhdx",
    "vhdx-np.vhdx",
    "vhdx-fixed.vhdx",
    "vhdx-fixed-zero.vhdx",
    "vhdx-default.vhdx",
    "vhdx-log2m.vhdx",
    "vhdx-b256.vhdx",
    "vhdx-eio.vhdx",
    "vhdx-off0.vhdx",
];

/// The VMDK text descriptors of make-foreign.sh (their extent files are
/// beside them, some of 2 GiB, mostly holes).
pub const FOREIGN_VMDK_DESCRIPTORS: &[&str] = &[
    "vmdk-flat.vmdk",
    "vmdk-2gflat.vmdk",
    "vmdk-2gsparse.vmdk",
    "vmdk-vmfs.vmdk",
    "vmdk-multi.vmdk",
];

/// The read-only commands the foreign-format tests compare with
/// qemu-img's on image `name` of format `fmt`: info (human, JSON, the
/// format named), map (human, JSON, a window), check (human, JSON, both
/// repairs) and measure.
pub fn read_only_commands<'a>(name: &'a str, fmt: &'a str) -> Vec<Vec<&'a str>> {
    vec![
        vec!["info", name],
        vec!["info", "--output=json", name],
        vec!["info", "-f", fmt, name],
        vec!["map", name],
        vec!["map", "--output=json", name],
        vec![
            "map",
            "--output=json",
            "--start-offset=1000",
            "--max-length=2500001",
            name,
        ],
        vec!["check", name],
        vec!["check", "--output=json", name],
        vec!["check", "-r", "all", name],
        vec!["check", "-r", "leaks", name],
        vec!["measure", "-O", "qcow2", name],
    ]
}

/// Runs `args` with qemu-img and with rimg in `dir` and asserts the same
/// exit code, stdout and stderr (rimg's error prefix read as qemu-img's);
/// returns qemu-img's exit code, stdout and stderr.
pub fn same_as_qemu(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let run = |prog: &Path| {
        let o = Command::new(prog)
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).replace("rimg:", "qemu-img:");
        (o.status.code(), text(&o.stdout), text(&o.stderr))
    };
    let q = run(Path::new("qemu-img"));
    let r = run(&workspace_bin("rimg"));
    assert_eq!(q, r, "{args:?}: qemu-img (left) and rimg (right) differ");
    q
}

/// Runs rimg with `args` in `dir`: exit code, stdout, stderr.
pub fn rimg_in(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(workspace_bin("rimg"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A copy of `from` named `to` in `dir`, with `bytes` written at each
/// offset; returns `to`.
pub fn patched_copy(dir: &Path, from: &str, to: &str, edits: &[(u64, Vec<u8>)]) -> String {
    use std::os::unix::fs::FileExt;
    let p = dir.join(to);
    std::fs::copy(dir.join(from), &p).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    for (off, b) in edits {
        f.write_all_at(b, *off).unwrap();
    }
    to.to_string()
}

/// Recomputes the checksum of each VHD footer in `img` (the one at its
/// start and the one in its last 512 bytes, where they say `conectix`):
/// the one's complement of the byte sum, the checksum field read as 0.
pub fn seal_vhd_footers(img: &mut [u8]) {
    let len = img.len();
    if len < 512 {
        return;
    }
    for at in [0, len - 512] {
        let f = &mut img[at..at + 512];
        if &f[..8] != b"conectix" {
            continue;
        }
        f[64..68].fill(0);
        let sum = f.iter().fold(0u32, |s, &b| s.wrapping_add(b as u32));
        f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    }
}

/// A little-endian u32 field's bytes, for [`patched_copy`].
pub fn le32(v: u32) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// A little-endian u64 field's bytes, for [`patched_copy`].
pub fn le64(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// A temporary directory holding make-foreign.sh's images.
pub fn foreign_fixtures() -> tempfile::TempDir {
    let d = tempdir();
    make_foreign(d.path());
    d
}

/// Runs `cmd` with `args` in `dir`.
pub fn run_in(cmd: &str, dir: &Path, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

/// Runs qemu-img with `args` in `dir` and asserts it succeeds.
pub fn qemu_img_in(dir: &Path, args: &[&str]) {
    let o = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "qemu-img {args:?}: {o:?}");
}

/// Makes the foreign-format images of `fixtures/make-foreign.sh` in
/// `dir` (with qemu-img and qemu-io; nothing binary is committed).
pub fn make_foreign(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/make-foreign.sh");
    let o = run("bash", &[script.to_str().unwrap(), dir.to_str().unwrap()]);
    ok_as(o, "fixtures/make-foreign.sh");
}

/// Runs qemu-io with one `-c` per command on `img`; asserts success.
pub fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = Vec::new();
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(img.to_str().unwrap());
    let o = run("qemu-io", &args);
    assert!(
        o.status.success(),
        "qemu-io {cmds:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Creates a qcow2 overlay `top` on the qcow2 image named `backing`
/// (relative to top's directory, as QEMU resolves it), with extra `-o`
/// options if any; asserts success.
pub fn qemu_overlay(top: &Path, backing: &str, opts: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    for o in opts {
        args.extend(["-o", o]);
    }
    args.extend(["-b", backing, "-F", "qcow2", top.to_str().unwrap()]);
    let o = qemu_img(&args);
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Asserts that `image` reads as `want` through `read_at`: in chunks of
/// each of `chunks` bytes (the 511-byte ones from offset 7), crossing
/// sectors, clusters and tables at odd places, then in one read.
pub fn assert_reads_as(image: &dyn qcow2::Image, want: &[u8], name: &str, chunks: &[usize]) {
    for &chunk in chunks {
        let mut off = if chunk == 511 { 7 } else { 0 };
        let mut buf = vec![0u8; chunk];
        while off < want.len() {
            let n = chunk.min(want.len() - off);
            image.read_at(&mut buf[..n], off as u64).unwrap();
            if buf[..n] != want[off..off + n] {
                let i = (0..n).find(|&i| buf[i] != want[off + i]).unwrap();
                panic!("{name}: byte {} differs (chunk {chunk})", off + i);
            }
            off += n;
        }
    }
    let mut all = vec![0u8; want.len()];
    image.read_at(&mut all, 0).unwrap();
    assert!(all == want, "{name}: whole-disk read differs");
}

/// The guest content of `img` as qemu-img reads it (`convert -O raw`
/// into `scratch`, then read back).
pub fn qemu_raw_content(img: &Path, scratch: &Path) -> Vec<u8> {
    let o = qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        scratch.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(scratch).unwrap()
}

/// `qemu-img map --output=json` of `img` without host offsets (the
/// tools compared may place clusters differently).
pub fn qemu_map_without_offsets(img: &Path) -> Vec<serde_json::Value> {
    let out = run_ok("qemu-img", &["map", "--output=json", img.to_str().unwrap()]);
    let mut v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    for e in &mut v {
        e.as_object_mut().unwrap().remove("offset");
    }
    v
}

/// Asserts that `qemu-img check` finds neither errors nor leaks.
pub fn assert_qemu_check_clean(path: &Path) {
    let p = path.to_str().unwrap();
    let out = qemu_img(&["check", "--output=json", p]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img check {p} exited {:?}\nstdout: {text}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).expect("qemu-img check json");
    for key in ["corruptions", "leaks", "check-errors"] {
        let n = v.get(key).and_then(|x| x.as_u64()).unwrap_or(0);
        assert_eq!(n, 0, "qemu-img check {p}: {key} = {n}\n{text}");
    }
}

/// Writes a raw image of `size` bytes at `path` whose content mixes what
/// convert must tell apart, in pieces of 4 KiB to 192 KiB that straddle
/// any format's blocks: random data, zeros written out, half data and
/// half zeros, and holes. The same `seed` gives the same file.
pub fn write_mixed_raw(path: &Path, size: u64, seed: u64) {
    use rand::{Rng, SeedableRng};
    use std::os::unix::fs::FileExt;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut off = 0u64;
    while off < size {
        let len = (rng.random_range(1..=48u64) * 4096).min(size - off);
        let mut piece = vec![0u8; len as usize];
        match rng.random_range(0..20) {
            0..=9 => rng.fill(&mut piece[..]),
            10..=12 => {}
            13..=14 => rng.fill(&mut piece[..len as usize / 2]),
            _ => {
                off += len;
                continue;
            }
        }
        f.write_all_at(&piece, off).unwrap();
        off += len;
    }
}

/// Asserts that `qemu-img compare` finds the two images' contents equal.
pub fn assert_qemu_compare_equal(a: &Path, b: &Path) {
    let out = qemu_img(&["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Installs Debian's package `pkg` unless program `bin` is on PATH
/// already (once per test process and program): tests that need a tool
/// install it rather than skip.
pub fn ensure_tool(bin: &str, pkg: &str) {
    static DONE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(|p| p.into_inner());
    if done.iter().any(|b| b == bin) {
        return;
    }
    let on_path = |b: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(b).is_file()))
    };
    if !on_path(bin) {
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "-q", pkg])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .output()
                .expect("apt-get")
        };
        let mut o = install();
        if !o.status.success() {
            // Stale or missing package lists: refresh once and retry.
            let _ = Command::new("apt-get").args(["update", "-q"]).output();
            o = install();
        }
        assert!(
            o.status.success() && on_path(bin),
            "installing {pkg} for {bin}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    done.push(bin.to_string());
}

/// Path of a binary built from this workspace (target/<profile>/NAME),
/// building it first if needed (once per test process and name).
pub fn workspace_bin(name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = built.iter().find(|(n, _)| n == name) {
        return p.clone();
    }
    let p = build_workspace_bin(name);
    built.push((name.to_string(), p.clone()));
    p
}

fn build_workspace_bin(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let bin = target_dir().join(profile).join(name);
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(&root)
        .args(["build", "--quiet", "--bin", name]);
    if profile == "release" {
        cmd.arg("--release");
    }
    let st = cmd.status().expect("cargo build");
    assert!(st.success(), "building {name} failed");
    bin
}

/// What a watched child process left behind.
pub struct Watched {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// None when it was killed by the watchdog.
    pub status: Option<std::process::ExitStatus>,
    pub timed_out: bool,
}

/// Runs `cmd` (stdin null, output captured) and waits for it; after
/// `timeout` a watchdog kills it and the run is reported as timed out.
pub fn run_watched(cmd: Command, timeout: std::time::Duration) -> Watched {
    spawn_watched(cmd, std::process::Stdio::null()).wait(timeout)
}

/// A running child whose output is being captured (see
/// [`spawn_watched`]); killed (SIGKILL) if dropped before [`wait`].
///
/// [`wait`]: WatchedChild::wait
pub struct WatchedChild {
    pid: u32,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::sync::Arc<Collected>,
    out_t: Option<std::thread::JoinHandle<()>>,
    err_t: Option<std::thread::JoinHandle<Vec<u8>>>,
    waiter: Option<std::thread::JoinHandle<std::io::Result<std::process::ExitStatus>>>,
    exited: std::sync::mpsc::Receiver<()>,
}

/// A child's stdout as it comes, and a signal for each new piece.
#[derive(Default)]
struct Collected {
    bytes: std::sync::Mutex<Vec<u8>>,
    more: std::sync::Condvar,
}

impl Collected {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts `cmd` with `stdin` (with `Stdio::piped()` the pipe stays open
/// until [`WatchedChild::wait`]) and its output captured.
pub fn spawn_watched(mut cmd: Command, stdin: std::process::Stdio) -> WatchedChild {
    use std::io::Read;
    use std::process::Stdio;
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let collected = std::sync::Arc::new(Collected::default());
    let sink = collected.clone();
    let out_t = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    sink.lock().extend_from_slice(&buf[..n]);
                    sink.more.notify_all();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let pid = child.id();
    let stdin = child.stdin.take();
    let (tx, exited) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let st = child.wait();
        let _ = tx.send(());
        st
    });
    WatchedChild {
        pid,
        stdin,
        stdout: collected,
        out_t: Some(out_t),
        err_t: Some(err_t),
        waiter: Some(waiter),
        exited,
    }
}

impl WatchedChild {
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Waits until the child's stdout so far contains `needle`; false if
    /// `timeout` passes first.
    pub fn wait_for_stdout(&self, needle: &str, timeout: std::time::Duration) -> bool {
        let end = std::time::Instant::now() + timeout;
        let mut out = self.stdout.lock();
        loop {
            if String::from_utf8_lossy(&out).contains(needle) {
                return true;
            }
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            out = self
                .stdout
                .more
                .wait_timeout(out, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Writes `bytes` to the child's stdin (piped, see [`spawn_watched`]).
    pub fn write_stdin(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin piped and open");
        stdin.write_all(bytes).expect("write the child's stdin");
        stdin.flush().expect("flush the child's stdin");
    }

    /// What the child wrote on stdout so far.
    pub fn stdout_so_far(&self) -> Vec<u8> {
        self.stdout.lock().clone()
    }

    /// Closes the child's stdin and waits for its exit; after `timeout`
    /// a watchdog kills it and the run is reported as timed out.
    pub fn wait(mut self, timeout: std::time::Duration) -> Watched {
        drop(self.stdin.take());
        let timed_out = self.exited.recv_timeout(timeout).is_err();
        if timed_out {
            self.kill();
        }
        let status = self
            .waiter
            .take()
            .and_then(|w| w.join().ok())
            .and_then(|r| r.ok());
        if let Some(t) = self.out_t.take() {
            let _ = t.join();
        }
        Watched {
            stdout: std::mem::take(&mut *self.stdout.lock()),
            stderr: self
                .err_t
                .take()
                .and_then(|t| t.join().ok())
                .unwrap_or_default(),
            status: if timed_out { None } else { status },
            timed_out,
        }
    }

    fn kill(&self) {
        // SAFETY: kill(2) on our child, not yet reaped (the waiter thread
        // has not reported its exit), so the pid is ours.
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
    }
}

impl Drop for WatchedChild {
    fn drop(&mut self) {
        if let Some(w) = self.waiter.take() {
            if self.exited.try_recv().is_err() {
                self.kill();
            }
            let _ = w.join();
        }
    }
}

pub mod bitmaps;
pub mod blk;
pub mod btrfs;
pub mod control;
pub mod crash;
pub mod daemon;
pub mod guest;
pub mod image;
pub mod mutate;
pub mod nbd;
pub mod nested;
pub mod nested_restart;
pub mod net;
pub mod qsd;
pub mod rings;
pub mod torture;
pub mod twins;
pub mod vmm;

/// The workspace's cargo target directory (`CARGO_TARGET_DIR` or
/// `<workspace>/target`), where built binaries and downloaded test kits
/// live.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap()
                .join("target")
        })
}

/// A fresh temporary directory, removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("rimg-test-")
        .tempdir()
        .expect("tempdir")
}

/// Waits (at most `timeout`) until no process holds any of QEMU's lock
/// bytes on `path` (rimg's and qemu's image locks), by asking the kernel
/// for an exclusive lock over all of them and blocking until it is given
/// (then letting it go). A killed process's locks can outlive it for a
/// moment: files its io_uring requests hold are released by the kernel's
/// ring teardown, which runs after the process has been reaped.
///
/// Our own lock is released before this returns: the caller's next
/// command (qemu-nbd, qemu-img check, a daemon) takes the same bytes and
/// would fail on it ("Failed to lock byte 100").
pub fn wait_unlocked(path: &Path, timeout: std::time::Duration) {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: flock is a plain C struct; all-zero is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = 100;
        fl.l_len = 200;
        // SAFETY: fcntl reads the flock struct we own; the descriptor
        // stays open (owned by `f`) for the duration of the call.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLKW, &fl) };
        let got = if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        };
        // Let go of the lock before the caller is told to go on, not when
        // this thread drops `f` afterwards (it may not run again before
        // the caller's next command locks the image). Unlocked explicitly
        // rather than by closing `f`: a child another thread is forking
        // holds the open file, and so the lock, until it executes.
        fl.l_type = libc::F_UNLCK as i16;
        // SAFETY: as above.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        let _ = tx.send(got);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("waiting for the locks on {}: {e}", path.display()),
        Err(_) => panic!(
            "{} still locked by another process after {timeout:?}",
            path.display()
        ),
    }
}

/// The first word after `tag` on the console line that starts with it
/// (a guest script's "tag value" report); panics with the console if
/// there is none.
pub fn console_field(console: &str, tag: &str) -> String {
    console
        .lines()
        .find_map(|l| l.strip_prefix(tag))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {tag} line:\n{console}"))
        .to_string()
}
