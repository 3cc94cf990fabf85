//! Linux guests for tests: a Debian 6.1 cloud kernel with a busybox
//! initramfs, booted by QEMU 7.2 under TCG (this machine's KVM cannot boot
//! Linux, see shared/TESTBED.md), with vhost-user devices pointing at our
//! daemons.
//!
//! Nothing is installed on the host: the Debian packages (QEMU's system
//! emulator and the libraries the host lacks, the kernel, busybox-static)
//! are fetched with `apt-get download` and unpacked with `dpkg-deb -x`
//! into `target/guest-cache/root` once; later runs reuse them.
//!
//! A guest runs one shell script. The init wrapper mounts /proc, /sys and
//! /dev, loads the requested kernel modules (dependencies first, read from
//! each module's `depends=` modinfo string), runs the script with `sh -e`,
//! prints `RIMG-GUEST-EXIT <status>` and powers off. [`GuestOutput`]
//! carries the console text and that status.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Packages unpacked into the cache root. QEMU's libraries that a Debian
/// host usually lacks are added by [`missing_libraries`].
const BASE_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
    "ipxe-qemu",
    "busybox-static",
];

/// Marker the init wrapper prints with the script's exit status.
const EXIT_MARK: &str = "RIMG-GUEST-EXIT ";

/// The unpacked guest kit: QEMU, kernel, modules, busybox.
#[derive(Debug)]
pub struct Kit {
    root: PathBuf,
    kernel: PathBuf,
    modules: PathBuf,
    /// Module name (underscores) -> path of its `.ko`.
    module_index: HashMap<String, PathBuf>,
}

/// The kit, fetched on first use (serialised across test processes by a
/// lock file, so parallel test binaries share one download).
pub fn kit() -> &'static Kit {
    static KIT: OnceLock<Kit> = OnceLock::new();
    KIT.get_or_init(|| Kit::fetch().unwrap_or_else(|e| panic!("guest kit: {e}")))
}

fn cache_dir() -> PathBuf {
    crate::target_dir().join("guest-cache")
}

fn sh(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `Depends:` of a package (first alternative of each), or an error if apt
/// does not know it.
fn apt_depends(pkg: &str) -> Result<Vec<String>, String> {
    let text =
        sh(Command::new("apt-cache").args(["depends", "--no-recommends", "--no-suggests", pkg]))?;
    let mut deps = Vec::new();
    for line in text.lines() {
        // Alternatives are written "|Depends: a" then "  Depends: b": the
        // first one suffices.
        let l = line.trim_start();
        if let Some(d) = l.strip_prefix("Depends: ") {
            if !d.starts_with('<') {
                deps.push(d.trim().to_string());
            }
        } else if let Some(d) = l.strip_prefix("|Depends: ") {
            if !d.starts_with('<') {
                deps.push(d.trim().to_string());
            }
        }
    }
    Ok(deps)
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Shared libraries the emulator needs that the host does not have
/// installed, followed transitively (they are unpacked, not installed).
fn missing_libraries(roots: &[String]) -> Result<Vec<String>, String> {
    let mut seen: BTreeMap<String, ()> = BTreeMap::new();
    let mut todo: Vec<String> = roots.to_vec();
    while let Some(p) = todo.pop() {
        for d in apt_depends(&p)? {
            let d = d.split(':').next().unwrap_or(&d).to_string();
            if d.starts_with("lib") && !seen.contains_key(&d) && !installed(&d) {
                seen.insert(d.clone(), ());
                todo.push(d);
            }
        }
    }
    Ok(seen.into_keys().collect())
}

/// The versioned kernel image package behind linux-image-cloud-amd64.
fn kernel_package() -> Result<String, String> {
    apt_depends("linux-image-cloud-amd64")?
        .into_iter()
        .find(|d| d.starts_with("linux-image-") && d.ends_with("-cloud-amd64"))
        .ok_or_else(|| "linux-image-cloud-amd64 names no kernel package".into())
}

struct LockFile(fs::File);

impl LockFile {
    fn take(path: &Path) -> Result<LockFile, String> {
        use std::os::fd::AsRawFd;
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor we own; released when the file
        // is closed (on drop).
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if r != 0 {
            return Err(format!("flock: {}", std::io::Error::last_os_error()));
        }
        Ok(LockFile(f))
    }
}

impl Kit {
    fn fetch() -> Result<Kit, String> {
        let cache = cache_dir();
        fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
        let _lock = LockFile::take(&cache.join(".lock"))?;
        let root = cache.join("root");
        if !root.join(".complete").exists() {
            Self::download(&cache, &root)?;
        }
        let _ = &_lock.0;
        Self::from_root(root)
    }

    fn download(cache: &Path, root: &Path) -> Result<(), String> {
        // A machine whose package lists are stale or absent needs them
        // once; try without first (no root needed, no network write).
        let kpkg = match kernel_package() {
            Ok(k) => k,
            Err(_) => {
                sh(Command::new("apt-get").args(["update", "-q"]))?;
                kernel_package()?
            }
        };
        let mut pkgs: Vec<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
        pkgs.extend(missing_libraries(&["qemu-system-x86".to_string()])?);
        pkgs.push(kpkg);
        let debs = cache.join("debs");
        let _ = fs::remove_dir_all(&debs);
        fs::create_dir_all(&debs).map_err(|e| e.to_string())?;
        let download = || {
            sh(Command::new("apt-get")
                .current_dir(&debs)
                .args(["download", "-q"])
                .args(&pkgs))
        };
        // Stale package lists name versions the mirror no longer has.
        if download().is_err() {
            sh(Command::new("apt-get").args(["update", "-q"]))?;
            download()?;
        }
        let tmp = cache.join("root.tmp");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
        for e in fs::read_dir(&debs).map_err(|e| e.to_string())? {
            let p = e.map_err(|e| e.to_string())?.path();
            if p.extension().is_some_and(|x| x == "deb") {
                sh(Command::new("dpkg-deb").arg("-x").arg(&p).arg(&tmp))?;
            }
        }
        // QEMU looks for firmware in one directory (-L).
        let fw = tmp.join("usr/share/qemu");
        for src in ["usr/share/seabios", "usr/lib/ipxe/qemu"] {
            for e in fs::read_dir(tmp.join(src)).map_err(|e| format!("{src}: {e}"))? {
                let p = e.map_err(|e| e.to_string())?.path();
                let dst = fw.join(p.file_name().unwrap());
                if !dst.exists() {
                    fs::copy(&p, &dst).map_err(|e| format!("{}: {e}", p.display()))?;
                }
            }
        }
        fs::write(tmp.join(".complete"), b"").map_err(|e| e.to_string())?;
        let _ = fs::remove_dir_all(root);
        fs::rename(&tmp, root).map_err(|e| e.to_string())?;
        let _ = fs::remove_dir_all(&debs);
        Ok(())
    }

    fn from_root(root: PathBuf) -> Result<Kit, String> {
        let boot = root.join("boot");
        let kernel = fs::read_dir(&boot)
            .map_err(|e| format!("{}: {e}", boot.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .ok_or("no vmlinuz in the kernel package")?;
        let version = kernel.file_name().unwrap().to_str().unwrap()["vmlinuz-".len()..].to_string();
        let modules = root.join("lib/modules").join(&version).join("kernel");
        let mut module_index = HashMap::new();
        index_modules(&modules, &mut module_index)?;
        Ok(Kit {
            root,
            kernel,
            modules,
            module_index,
        })
    }

    /// The bzImage.
    pub fn kernel(&self) -> &Path {
        &self.kernel
    }

    /// The kernel as an uncompressed ELF vmlinux, unpacked once from the
    /// bzImage's payload (boot.rst, "payload_offset"/"payload_length";
    /// Debian compresses it with LZ4 in the legacy frame format) and
    /// cached next to the kit. VMMs that load ELF kernels skip the
    /// in-guest decompressor with it.
    pub fn vmlinux(&self) -> PathBuf {
        static P: OnceLock<PathBuf> = OnceLock::new();
        P.get_or_init(|| {
            let name = self.kernel.file_name().unwrap().to_string_lossy();
            let out = self
                .root
                .parent()
                .unwrap()
                .join(name.replace("vmlinuz", "vmlinux"));
            if !out.exists() {
                let bz = fs::read(&self.kernel).expect("read bzImage");
                let elf = unpack_bzimage_lz4(&bz).unwrap_or_else(|e| panic!("{e}"));
                let tmp = out.with_extension(format!("tmp{}", std::process::id()));
                fs::write(&tmp, elf).unwrap();
                fs::rename(&tmp, &out).unwrap();
            }
            out
        })
        .clone()
    }

    /// The static busybox binary.
    pub fn busybox(&self) -> PathBuf {
        self.root.join("bin/busybox")
    }

    /// A `Command` for the unpacked qemu-system-x86_64, with its libraries
    /// and firmware directory set.
    pub fn qemu(&self) -> Command {
        let mut c = Command::new(self.root.join("usr/bin/qemu-system-x86_64"));
        let lib = format!(
            "{}:{}",
            self.root.join("usr/lib/x86_64-linux-gnu").display(),
            self.root.join("lib/x86_64-linux-gnu").display()
        );
        c.env("LD_LIBRARY_PATH", lib)
            .arg("-L")
            .arg(self.root.join("usr/share/qemu"));
        c
    }

    /// The `.ko` files for `names` and everything they depend on,
    /// dependencies first, each once.
    pub fn modules_in_load_order(&self, names: &[&str]) -> Result<Vec<(String, PathBuf)>, String> {
        let mut order = Vec::new();
        let mut done = HashMap::new();
        for n in names {
            self.visit_module(&n.replace('-', "_"), &mut done, &mut order, 0)?;
        }
        Ok(order)
    }

    fn visit_module(
        &self,
        name: &str,
        done: &mut HashMap<String, ()>,
        order: &mut Vec<(String, PathBuf)>,
        depth: usize,
    ) -> Result<(), String> {
        if done.contains_key(name) {
            return Ok(());
        }
        if depth > 32 {
            return Err(format!("module dependency cycle at {name}"));
        }
        let path = self
            .module_index
            .get(name)
            .ok_or_else(|| format!("no module {name} under {}", self.modules.display()))?
            .clone();
        let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        for dep in modinfo_depends(&bytes) {
            self.visit_module(&dep, done, order, depth + 1)?;
        }
        done.insert(name.to_string(), ());
        order.push((name.to_string(), path));
        Ok(())
    }
}

fn index_modules(dir: &Path, out: &mut HashMap<String, PathBuf>) -> Result<(), String> {
    for e in fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let e = e.map_err(|e| e.to_string())?;
        let p = e.path();
        if e.file_type().map_err(|e| e.to_string())?.is_dir() {
            index_modules(&p, out)?;
        } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
            if let Some(stem) = n.strip_suffix(".ko") {
                out.insert(stem.replace('-', "_"), p.clone());
            }
        }
    }
    Ok(())
}

/// The module names in a `.ko`'s `depends=` modinfo string (NUL-separated
/// key=value strings in its .modinfo section).
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(pos) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &ko[pos + KEY.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// A newc ("070701") cpio archive, the format the kernel unpacks as an
/// initramfs. Directories must precede their contents.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            write!(self.buf, "{f:08x}").unwrap();
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }

    pub fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100000 | perm, data, (0, 0));
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes(), (0, 0));
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, &[], (major, minor));
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.buf
    }
}

/// One guest run: script, modules, extra files and QEMU arguments.
pub struct Guest {
    script: String,
    modules: Vec<String>,
    /// Module name -> parameters given to its insmod.
    module_params: HashMap<String, String>,
    files: Vec<(String, Vec<u8>, u32)>,
    qemu_args: Vec<String>,
    memory_mib: u32,
    cpus: u32,
    timeout: Duration,
    cmdline: String,
}

/// What a guest printed and how its script ended.
#[derive(Debug)]
pub struct GuestOutput {
    /// Everything on the serial console, `\r` removed.
    pub console: String,
    /// The script's exit status, `None` if the guest never reported one
    /// (kernel panic, QEMU error, timeout).
    pub status: Option<i32>,
    /// True when the watchdog had to kill QEMU.
    pub timed_out: bool,
}

impl GuestOutput {
    /// Panics with the console text unless the script exited 0.
    pub fn assert_success(&self) {
        assert!(
            self.status == Some(0) && !self.timed_out,
            "guest script failed (status {:?}, timed out {}):\n{}",
            self.status,
            self.timed_out,
            self.console
        );
    }
}

impl Guest {
    /// A guest that runs `script` (busybox sh, `-e`) after boot.
    pub fn new(script: &str) -> Guest {
        Guest {
            script: script.to_string(),
            modules: Vec::new(),
            module_params: HashMap::new(),
            files: Vec::new(),
            qemu_args: Vec::new(),
            memory_mib: 256,
            cpus: 2,
            timeout: Duration::from_secs(300),
            cmdline: "console=ttyS0 quiet panic=-1".into(),
        }
    }

    /// Loads `name` (and its dependencies) before the script runs.
    pub fn module(mut self, name: &str) -> Guest {
        self.modules.push(name.to_string());
        self
    }

    /// Like [`Guest::module`], with `params` ("name=value ...") for its
    /// insmod.
    pub fn module_with(mut self, name: &str, params: &str) -> Guest {
        self.module_params
            .insert(name.replace('-', "_"), params.to_string());
        self.module(name)
    }

    /// Adds a file to the initramfs (absolute guest path, parents must be
    /// among the standard directories or added before).
    pub fn file(mut self, path: &str, data: Vec<u8>, perm: u32) -> Guest {
        self.files.push((path.to_string(), data, perm));
        self
    }

    pub fn qemu_args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Guest {
        self.qemu_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// A vhost-user-blk-pci disk served on `socket`.
    pub fn vhost_user_blk(self, socket: &Path, num_queues: u32) -> Guest {
        self.vhost_user_blk_chardev(socket, num_queues, "")
    }

    /// A vhost-user-blk-pci disk served on `socket` whose connection QEMU
    /// re-establishes (every `reconnect` seconds) when the daemon goes
    /// away, passing the inflight region back to the new one.
    pub fn vhost_user_blk_reconnecting(
        self,
        socket: &Path,
        num_queues: u32,
        reconnect: u32,
    ) -> Guest {
        self.vhost_user_blk_chardev(socket, num_queues, &format!(",reconnect={reconnect}"))
    }

    /// A vhost-user-blk-pci disk whose socket chardev has `opts` added.
    fn vhost_user_blk_chardev(self, socket: &Path, num_queues: u32, opts: &str) -> Guest {
        let id = format!("blk{}", self.qemu_args.len());
        self.qemu_args([
            "-chardev".to_string(),
            format!("socket,id={id},path={}{opts}", socket.display()),
            "-device".to_string(),
            format!("vhost-user-blk-pci,chardev={id},num-queues={num_queues}"),
        ])
        .module("virtio_pci")
        .module("virtio_blk")
    }

    /// A virtio-net-pci NIC on a vhost-user netdev served on `socket`.
    /// QEMU 7.2 under TCG crashes starting vhost-user-net with MSI-X
    /// (shared/TESTBED.md), hence `vectors=0`; `romfile=` skips iPXE.
    pub fn vhost_user_net(self, socket: &Path, queue_pairs: u32, mac: &str) -> Guest {
        let id = format!("net{}", self.qemu_args.len());
        let mq = if queue_pairs > 1 { ",mq=on" } else { "" };
        self.qemu_args([
            "-chardev".to_string(),
            format!("socket,id={id}c,path={}", socket.display()),
            "-netdev".to_string(),
            format!("vhost-user,id={id},chardev={id}c,queues={queue_pairs}"),
            "-device".to_string(),
            format!("virtio-net-pci,netdev={id},mac={mac},vectors=0,romfile={mq}"),
        ])
        .module("virtio_pci")
        .module("virtio_net")
    }

    pub fn memory_mib(mut self, mib: u32) -> Guest {
        self.memory_mib = mib;
        self
    }

    pub fn cpus(mut self, n: u32) -> Guest {
        self.cpus = n;
        self
    }

    pub fn timeout(mut self, t: Duration) -> Guest {
        self.timeout = t;
        self
    }

    /// This guest's initramfs (init, busybox, modules, files, script), e.g.
    /// to boot it with another VMM.
    pub fn initramfs_image(&self) -> Vec<u8> {
        self.initramfs(kit()).expect("initramfs")
    }

    fn initramfs(&self, kit: &Kit) -> Result<Vec<u8>, String> {
        let mods: Vec<&str> = self.modules.iter().map(String::as_str).collect();
        let order = kit.modules_in_load_order(&mods)?;
        let mut init = String::from(
            "#!/bin/busybox sh\n\
             /bin/busybox --install -s /bin\n\
             mount -t proc proc /proc\n\
             mount -t sysfs sysfs /sys\n\
             mount -t devtmpfs devtmpfs /dev\n",
        );
        for (name, _) in &order {
            let params = self.module_params.get(name).map_or("", String::as_str);
            init.push_str(&format!(
                "insmod /lib/modules/{name}.ko {params} || echo 'RIMG-GUEST: insmod {name} failed'\n"
            ));
        }
        init.push_str(&format!(
            "sh -e /test.sh\necho \"{EXIT_MARK}$?\"\npoweroff -f\n"
        ));
        let mut c = Cpio::default();
        for d in [
            "bin",
            "dev",
            "proc",
            "sys",
            "tmp",
            "mnt",
            "lib",
            "lib/modules",
        ] {
            c.dir(d);
        }
        c.char_dev("dev/console", 5, 1);
        c.char_dev("dev/null", 1, 3);
        let bb = fs::read(kit.busybox()).map_err(|e| format!("busybox: {e}"))?;
        c.file("bin/busybox", &bb, 0o755);
        c.symlink("bin/sh", "busybox");
        for (name, path) in &order {
            let ko = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            c.file(&format!("lib/modules/{name}.ko"), &ko, 0o644);
        }
        c.file("init", init.as_bytes(), 0o755);
        c.file("test.sh", self.script.as_bytes(), 0o755);
        for (path, data, perm) in &self.files {
            c.file(path.trim_start_matches('/'), data, *perm);
        }
        Ok(c.finish())
    }

    /// Boots the guest and waits for it to power off (or for the timeout,
    /// after which QEMU is killed).
    pub fn run(&self) -> GuestOutput {
        let kit = kit();
        let dir = crate::tempdir();
        let initrd = dir.path().join("initrd.cpio");
        fs::write(&initrd, self.initramfs(kit).expect("initramfs")).unwrap();
        let mut cmd = kit.qemu();
        cmd.args(["-M", "pc", "-accel", "tcg", "-cpu", "max"])
            .args(["-m", &format!("{}M", self.memory_mib)])
            .args(["-smp", &self.cpus.to_string()])
            .args(["-nodefaults", "-no-reboot", "-display", "none"])
            .args(["-serial", "stdio"])
            .arg("-kernel")
            .arg(kit.kernel())
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &self.cmdline])
            // Guest RAM in a shared memfd so vhost-user backends can map it.
            .args([
                "-object",
                &format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    self.memory_mib
                ),
                "-numa",
                "node,memdev=mem",
            ])
            .args(&self.qemu_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let w = crate::run_watched(cmd, self.timeout);
        let (out, err, timed_out) = (w.stdout, w.stderr, w.timed_out);
        let mut console = String::from_utf8_lossy(&out).replace('\r', "");
        if !err.is_empty() {
            console.push_str("\n--- qemu stderr ---\n");
            console.push_str(&String::from_utf8_lossy(&err));
        }
        let status = console
            .lines()
            .filter_map(|l| l.trim().strip_prefix(EXIT_MARK))
            .next_back()
            .and_then(|s| s.trim().parse().ok());
        GuestOutput {
            console,
            status,
            timed_out,
        }
    }
}

/// The ELF inside a bzImage whose payload is LZ4 (legacy frame: magic,
/// then blocks of `u32` compressed length + data, each at most 8 MiB
/// decompressed; the kernel build appends the total size after them).
fn unpack_bzimage_lz4(bz: &[u8]) -> Result<Vec<u8>, String> {
    const LEGACY_MAGIC: u32 = 0x184c_2102;
    const BLOCK_MAX: usize = 8 << 20;
    let u32_at =
        |o: usize| -> Option<u32> { Some(u32::from_le_bytes(bz.get(o..o + 4)?.try_into().ok()?)) };
    let setup_sects = *bz.get(0x1f1).ok_or("bzImage too short")? as usize;
    let pm = (setup_sects.max(4) + 1) * 512;
    let off = pm + u32_at(0x248).ok_or("no payload_offset")? as usize;
    let len = u32_at(0x24c).ok_or("no payload_length")? as usize;
    let payload = bz.get(off..off + len).ok_or("payload outside the file")?;
    if payload.get(..4) != Some(&LEGACY_MAGIC.to_le_bytes()[..]) {
        return Err("bzImage payload is not LZ4 (legacy frame)".into());
    }
    let mut out = Vec::new();
    let mut p = 4;
    while p + 4 <= payload.len() {
        let n = u32::from_le_bytes(payload[p..p + 4].try_into().unwrap()) as usize;
        if n == LEGACY_MAGIC as usize {
            p += 4;
            continue;
        }
        // The trailing size word, or the end: no further block.
        let Some(block) = payload.get(p + 4..p + 4 + n).filter(|_| n > 0) else {
            break;
        };
        let start = out.len();
        out.resize(start + BLOCK_MAX, 0);
        let got = lz4_flex::block::decompress_into(block, &mut out[start..])
            .map_err(|e| format!("LZ4 block at {p}: {e}"))?;
        out.truncate(start + got);
        p += 4 + n;
    }
    if out.get(..4) != Some(&b"\x7fELF"[..]) {
        return Err("unpacked payload is not an ELF".into());
    }
    Ok(out)
}
