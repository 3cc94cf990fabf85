//! The whole stack in the nested setup (shared/TESTBED.md): an outer
//! QEMU TCG guest with AMD SVM loads kvm_amd and becomes the host of
//! static builds of the daemons and rimg-vmm, which boots a Linux guest.
//! One run per call; the scripts the guests run are here too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::guest::{kit, Guest, GuestOutput};

/// rimg-vmm, rimg-vhost-blk, rimg-vhost-net and rimg (and the aids
/// `first_line`, for the boot benchmark, and `mktap`) linked statically (for the outer TCG guest, which has
/// no libraries), built under
/// target/static; returns the directory holding them.
pub fn static_bins() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let target = crate::target_dir().join("static");
        let triple = "x86_64-unknown-linux-gnu";
        let st = Command::new(env!("CARGO"))
            .current_dir(root)
            .env("CARGO_TARGET_DIR", &target)
            .env(
                "RUSTFLAGS",
                "-C target-feature=+crt-static -C debuginfo=0 -C strip=symbols",
            )
            .args(["build", "--quiet", "--target", triple, "--bins"])
            .args(["--example", "first_line", "--example", "mktap"])
            .args([
                "-p",
                "rimg-vmm",
                "-p",
                "rimg-vhost-blk",
                "-p",
                "rimg-vhost-net",
                "-p",
                "rimg",
            ])
            .status()
            .expect("cargo build");
        assert!(st.success(), "static build failed");
        target.join(triple).join("debug")
    })
}

/// The inner Linux guest's script (on rimg-vmm): filesystem on the qcow2
/// disk verified across a remount, the disk grown online (`rimg resize`
/// on the outer side, cued by the guest's own line with the old size)
/// and written past its old end, ping and TCP both ways to the
/// TAP side.
pub const INNER: &str = r#"
if grep -q rimg_reboot /proc/cmdline; then echo INNER-REBOOT; reboot -f; fi
echo "inner-cpus $(grep -c ^processor /proc/cpuinfo)"
mke2fs -q /dev/vda
mount /dev/vda /mnt
dd if=/dev/urandom of=/mnt/f bs=1M count=4 2>/dev/null
sha256sum /mnt/f > /tmp/sum
umount /mnt
mount /dev/vda /mnt
sha256sum -c /tmp/sum
umount /mnt
echo "inner-size-before $(cat /sys/block/vda/size)"
i=0
while [ "$(cat /sys/block/vda/size)" = 131072 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
echo "inner-size-after $(cat /sys/block/vda/size)"
dmesg | grep "capacity change" || true
dd if=/dev/urandom of=/tmp/tail bs=64k count=4 2>/dev/null
dd if=/tmp/tail of=/dev/vda bs=64k seek=1600 oflag=direct conv=notrunc 2>/dev/null
dd if=/dev/vda of=/tmp/tail2 bs=64k skip=1600 count=4 iflag=direct 2>/dev/null
cmp /tmp/tail /tmp/tail2
echo inner-grown-ok
echo "virtio devices: $(cat /sys/bus/virtio/devices/*/device | tr '\n' ' ')"
ip link set eth0 up
ip addr add 10.0.0.2/24 dev eth0
echo "eth0 queues: $(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
ping -c 2 -W 10 10.0.0.1
dd if=/dev/urandom of=/tmp/out bs=1M count=4 2>/dev/null
echo "inner-out $(sha256sum /tmp/out)"
# One flow per vCPU: each CPU transmits on its own queue pair (XPS) and
# the TAP steers each flow's replies to the queue it came from, so both
# pairs carry frames both ways.
taskset 1 nc 10.0.0.1 5001 < /tmp/out
# The receiving side keeps its stdin open (busybox nc half-closes at
# stdin EOF).
mkfifo /tmp/hold
exec 3<>/tmp/hold
taskset 2 nc 10.0.0.1 5002 < /tmp/hold > /tmp/in
echo "inner-in $(sha256sum /tmp/in)"
echo INNER-PASS
"#;

/// The outer TCG guest's script: the "host" running the daemons and the
/// inner VMM under nested KVM (`@RUN_INNER@`, `@REBOOT_RUN@`: see
/// [`InnerVmm`]); it sends the image back on /dev/vda.
pub const OUTER: &str = r#"
ls -l /dev/kvm
ip link set lo up
export RIMG_RUNTIME_DIR=/tmp/rimg-run
rimg-vhost-blk --socket /tmp/blk.sock --image /disk.qcow2 --control /tmp/blk.ctl @QUEUE_SIZE@ > /tmp/blk.log 2>&1 &
BLK=$!
RUST_LOG=info rimg-vhost-net --socket /tmp/net.sock --tap-create tap0 --num-queue-pairs 2 @QUEUE_SIZE@ \
  > /tmp/net.log 2>&1 &
NET=$!
until grep -q serving /tmp/blk.log && grep -q serving /tmp/net.log; do usleep 20000; done
echo "outer-step daemons-serving at $(cut -d' ' -f1 /proc/uptime) s"
ip addr add 10.0.0.1/24 dev tap0
dd if=/dev/urandom of=/tmp/blob bs=1M count=4 2>/dev/null
echo "outer-blob $(sha256sum /tmp/blob)"
mkfifo /tmp/hold
exec 3<>/tmp/hold
nc -l -p 5001 < /tmp/hold > /tmp/recv &
RECV=$!
nc -l -p 5002 < /tmp/blob &
until netstat -ltn | grep -q ':5001 ' && netstat -ltn | grep -q ':5002 '; do usleep 20000; done
# Each step's time since boot: a round that stalls shows where.
step() { echo "outer-step $1 at $(cut -d' ' -f1 /proc/uptime) s"; }
step inner-vmm
# The disk grows by 64 MiB once the inner guest has read its size (its
# "inner-size-before" line, seen as the console passes by): rimg resize
# finds the daemon through the link it published and asks it.
grow() {
  rc=0; rimg resize /disk.qcow2 +64M > /tmp/resize.log 2>&1 || rc=$?
  echo "resize-rc $rc" >> /tmp/resize.log
  step resized
}
# The inner VMM's output goes to the console as it comes (a hang shows
# how far the guest got) and to /tmp/inner.log.
# A hang is ended well before the test's deadline, so the dumps and the
# daemons' logs still come out: SIGUSR1 first (rimg-vmm dumps every
# vCPU's state and runs on), SIGKILL 5 s later.
# (The script runs under sh -e: the status is taken with ||, or a failing
# VMM would end the subshell before it is printed.)
( rc=0; timeout -s USR1 -k 5 150 @RUN_INNER@ 2>&1 || rc=$?; echo "inner-vmm-rc $rc" ) | tee /tmp/inner.log |
  while IFS= read -r l; do
    echo "inner| $l"
    case "$l" in "inner-size-before "*) grow ;; esac
  done
rc=$(sed -n 's/^inner-vmm-rc //p' /tmp/inner.log)
echo "vmm-exit ${rc:-none (killed by the watchdog?)}"
if [ "$rc" != 0 ]; then
  # What the daemons hold (requests taken, in flight, parked): a guest
  # waiting on a request the backend lost shows here.
  kill -USR1 $BLK $NET
  n=0
  until grep -q 'state dump end' /tmp/blk.log && grep -q 'state dump end' /tmp/net.log || [ $n -ge 250 ]; do
    usleep 20000; n=$((n+1))
  done
  cat /tmp/blk.log /tmp/net.log
  exit 1
fi
if [ -f /tmp/resize.log ]; then sed 's/^/resize| /' /tmp/resize.log; else echo "resize| never ran"; fi
grep -q INNER-PASS /tmp/inner.log
@REBOOT_RUN@wait $RECV
echo "outer-recv $(sha256sum /tmp/recv)"
kill -TERM $BLK $NET
wait $BLK
wait $NET
cat /tmp/blk.log /tmp/net.log
dd if=/disk.qcow2 of=/dev/vda bs=64k conv=fsync 2>/dev/null
echo "disk-size $(stat -c %s /disk.qcow2)"
"#;

/// The VMM the outer guest runs for the inner Linux guest: rimg-vmm, or
/// for comparison QEMU's microvm machine (`-M microvm,acpi=on -cpu
/// host`, virtio-mmio devices described in its DSDT, like rimg-vmm's) on
/// the same kernel, initramfs, backends and load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InnerVmm {
    Rimg,
    QemuMicrovm,
}

const RIMG_INNER: &str = "rimg-vmm --kernel /vmlinuz --initrd /inner.cpio --memory 256M --cpus 2 \\
  --cmdline \"console=ttyS0 quiet panic=-1 reboot=k\" \\
  --disk socket=/tmp/blk.sock --net socket=/tmp/net.sock,mac=52:54:00:12:34:56";

/// A guest reboot (reboot=k: the i8042 reset) also ends rimg-vmm with 0.
const RIMG_REBOOT: &str = r#"rc=0
rimg-vmm --kernel /vmlinuz --initrd /inner.cpio --memory 128M \
  --cmdline "console=ttyS0 quiet panic=-1 reboot=k rimg_reboot" > /tmp/reboot.log 2>&1 || rc=$?
sed 's/^/reboot| /' /tmp/reboot.log
echo "reboot-exit $rc"
"#;

/// QEMU 7.2 (the guest kit's, its libraries and firmware in the outer
/// guest's /lib) as the inner VMM. Its guest reboots by triple fault
/// (`reboot=t`), which ends QEMU (`-no-reboot`): microvm has no keyboard
/// controller, and Linux's next fallback (the BIOS reset vector) would
/// boot the guest again. `vhost-user-blk` and `virtio-net-device` are the
/// virtio-mmio forms of the devices.
const QEMU_INNER: &str = "env LD_LIBRARY_PATH=/lib /lib/ld-linux-x86-64.so.2 \\
  /bin/qemu-system-x86_64 -L /lib \\
  -M microvm,acpi=on,memory-backend=mem -accel kvm -cpu host -smp 2 -m 256M \\
  -object memory-backend-memfd,id=mem,size=256M,share=on \\
  -global virtio-mmio.force-legacy=false \\
  -nodefaults -no-reboot -display none -monitor none -serial stdio \\
  -kernel /vmlinuz -initrd /inner.cpio -append \"console=ttyS0 quiet panic=-1 reboot=t\" \\
  -chardev socket,id=blk,path=/tmp/blk.sock -device vhost-user-blk,chardev=blk,num-queues=1 \\
  -chardev socket,id=net,path=/tmp/net.sock -netdev vhost-user,id=n,chardev=net,queues=2 \\
  -device virtio-net-device,netdev=n,mac=52:54:00:12:34:56,mq=on < /dev/null";

impl InnerVmm {
    /// `RIMG_NESTED_INNER`: `rimg` (the default) or `qemu-microvm`.
    pub fn from_env() -> InnerVmm {
        match std::env::var("RIMG_NESTED_INNER").as_deref() {
            Err(_) | Ok("") | Ok("rimg") => InnerVmm::Rimg,
            Ok("qemu-microvm") => InnerVmm::QemuMicrovm,
            Ok(other) => panic!("RIMG_NESTED_INNER={other:?}: rimg or qemu-microvm"),
        }
    }

    fn outer_script(self) -> String {
        // QEMU's virtio-mmio offers the driver 1024-entry rings whatever
        // the backend takes; the daemons' default maximum is 256.
        let (run, reboot, queue_size) = match self {
            InnerVmm::Rimg => (RIMG_INNER, RIMG_REBOOT, ""),
            InnerVmm::QemuMicrovm => (QEMU_INNER, "", "--queue-size 1024"),
        };
        OUTER
            .replace("@RUN_INNER@", run)
            .replace("@REBOOT_RUN@", reboot)
            .replace("@QUEUE_SIZE@", queue_size)
    }
}

/// The guest kit's QEMU for the outer guest's initramfs: the binary,
/// the dynamic loader and every library it links (as resolved with the
/// kit's library path), and the firmware a microvm machine loading a
/// kernel needs.
fn qemu_files() -> Vec<(String, Vec<u8>, u32)> {
    let cmd = kit().qemu();
    let bin = PathBuf::from(cmd.get_program());
    let args: Vec<_> = cmd.get_args().map(PathBuf::from).collect();
    let fw = args
        .iter()
        .skip_while(|a| a.as_os_str() != "-L")
        .nth(1)
        .cloned()
        .expect("the kit's QEMU command names its firmware directory");
    let mut ldd = Command::new("ldd");
    ldd.arg(&bin);
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            ldd.env(k, v);
        }
    }
    let o = ldd.output().expect("run ldd");
    assert!(o.status.success(), "ldd {}", bin.display());
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    // The initramfs has /bin and /lib (no other directory can be added).
    let mut files = vec![("/bin/qemu-system-x86_64".to_string(), read(&bin), 0o755)];
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        // "libz.so.1 => /path (0x...)", or the loader's own "/lib64/ld-... (0x...)".
        let path = match line.split_once("=>") {
            Some((_, r)) => r.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let name = Path::new(path).file_name().unwrap().to_string_lossy();
        files.push((format!("/lib/{name}"), read(Path::new(path)), 0o755));
    }
    assert!(
        files.iter().any(|f| f.0 == "/lib/ld-linux-x86-64.so.2"),
        "no dynamic loader in ldd's answer:\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    for f in ["bios-microvm.bin", "linuxboot_dma.bin", "kvmvapic.bin"] {
        files.push((format!("/lib/{f}"), read(&fw.join(f)), 0o644));
    }
    files
}

/// One run of the whole stack in the nested setup (shared/TESTBED.md):
/// an outer QEMU TCG guest with kvm_amd runs static rimg-vhost-blk,
/// rimg-vhost-net and rimg-vmm, which boots the 6.1 cloud kernel with 2
/// vCPUs, the qcow2 disk and a NIC with 2 queue pairs (the net daemon's
/// per-pair counters end up on the console when it stops).
pub struct StackRun {
    pub out: GuestOutput,
    /// The qcow2 image as the daemon left it (valid when the run passed).
    pub image: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn run_linux_stack(timeout: Duration) -> StackRun {
    run_linux_stack_on(InnerVmm::Rimg, timeout)
}

/// The static rimg-vmm the outer guest runs: this tree's, or the one
/// `RIMG_NESTED_VMM_BIN` names (to compare builds under the same load).
fn vmm_binary(bins: &Path) -> PathBuf {
    std::env::var_os("RIMG_NESTED_VMM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| bins.join("rimg-vmm"))
}

/// [`run_linux_stack`] with `vmm` as the inner VMM.
pub fn run_linux_stack_on(vmm: InnerVmm, timeout: Duration) -> StackRun {
    // QEMU's microvm machine does not power off on the guest's ACPI S5
    // request; a reset ends it (-no-reboot), so its guest resets on exit.
    let inner = match vmm {
        InnerVmm::Rimg => INNER.to_string(),
        InnerVmm::QemuMicrovm => format!("trap 'reboot -f' EXIT\n{INNER}"),
    };
    let extra = match vmm {
        InnerVmm::Rimg => Vec::new(),
        InnerVmm::QemuMicrovm => qemu_files(),
    };
    run_nested(&vmm.outer_script(), &inner, extra, timeout)
}

/// kvm_amd's parameters in the outer guest: the module's defaults, or
/// what `RIMG_NESTED_KVM_AMD` gives (e.g. `vgif=0`), to measure whether
/// an SVM feature QEMU's TCG emulates is behind the nested emulator's
/// own failures (issue 24). The parameters in force are on the console
/// (`outer-kvm-amd ...`). Measured so far: vgif=0 did not remove them
/// (an outer kernel crashed on a wrong GS base after a VM exit with
/// either setting).
fn kvm_amd_params() -> String {
    std::env::var("RIMG_NESTED_KVM_AMD").unwrap_or_default()
}

/// One outer guest running `outer` with the static binaries, the kernel,
/// the inner guest's initramfs (running `inner`), a fresh 64 MiB qcow2
/// image as /disk.qcow2 and `extra` files; the image comes back from the
/// outer script's "disk-size N" line (it copies the image to /dev/vda).
pub fn run_nested(
    outer: &str,
    inner: &str,
    extra: Vec<(String, Vec<u8>, u32)>,
    timeout: Duration,
) -> StackRun {
    let dir = crate::tempdir();
    let bins = static_bins();
    let img = dir.path().join("disk.qcow2");
    let o = crate::qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    assert!(o.status.success(), "qemu-img create");
    // The outer guest writes the image back here when done.
    let back = dir.path().join("back.raw");
    std::fs::File::create(&back)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let inner = Guest::new(inner)
        .module("virtio_mmio")
        .module("virtio_blk")
        .module("virtio_net")
        .initramfs_image();
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    // The outer KVM's module parameters, on the console for the record.
    let outer = format!(
        "echo \"outer-kvm-amd $(cd /sys/module/kvm_amd/parameters && \
         for f in *; do printf '%s=%s ' $f $(cat $f); done)\"\n{outer}"
    );
    let mut outer = Guest::new(&outer);
    for (path, data, perm) in extra {
        outer = outer.file(&path, data, perm);
    }
    let bin = |name: &str| read(&bins.join(name));
    let out = outer
        .module_with("kvm_amd", &kvm_amd_params())
        .module("tun")
        .module("virtio_pci")
        .module("virtio_blk")
        .memory_mib(1024)
        .cpus(2)
        .timeout(timeout)
        .file("/vmlinuz", read(kit().kernel()), 0o644)
        .file("/inner.cpio", inner, 0o644)
        .file("/disk.qcow2", read(&img), 0o644)
        .file("/bin/rimg-vmm", read(&vmm_binary(bins)), 0o755)
        .file("/bin/rimg-vhost-blk", bin("rimg-vhost-blk"), 0o755)
        .file("/bin/rimg-vhost-net", bin("rimg-vhost-net"), 0o755)
        .file("/bin/rimg", bin("rimg"), 0o755)
        .file("/bin/mktap", read(&bins.join("examples/mktap")), 0o755)
        .qemu_args([
            "-drive".to_string(),
            format!("file={},format=raw,if=virtio", back.display()),
        ])
        .run();
    if let Some(size) = out
        .console
        .lines()
        .find_map(|l| l.strip_prefix("disk-size "))
        .and_then(|s| s.trim().parse::<usize>().ok())
    {
        let data = std::fs::read(&back).unwrap();
        std::fs::write(&img, &data[..size.min(data.len())]).unwrap();
    }
    StackRun {
        out,
        image: img,
        _dir: dir,
    }
}
