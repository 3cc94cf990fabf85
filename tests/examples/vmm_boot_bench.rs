//! Boot-time and memory benchmark for rimg-vmm (benches/vmm-bench.sh).
//!
//! In the nested setup (outer QEMU TCG guest with kvm_amd, see
//! shared/TESTBED.md), boots the Debian 6.1 cloud kernel with a busybox
//! initramfs whose init prints a marker first, with rimg-vmm and with
//! QEMU's `microvm` machine (ACPI on, virtio-mmio, -kernel), both 2 vCPUs
//! and 256 MiB, ROUNDS times each, alternating. rimg-vmm boots the ELF
//! vmlinux unpacked from the bzImage (loaded directly, so the guest skips
//! its decompressor) and, for comparison, the bzImage itself; QEMU boots
//! the bzImage (see below for its PVH form). Reports the median time
//! from starting the VMM to the marker line, rimg-vmm (ELF) against
//! QEMU, and rimg-vmm's resident memory outside guest RAM
//! (every resident page except those of the guest-RAM memfd mapping)
//! sampled when the marker appears.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rimg_tests::guest::{kit, Guest};
use rimg_tests::nested::static_bins;

const CMDLINE: &str = "console=ttyS0 quiet panic=-1 reboot=k";

/// The QEMU binary's shared libraries (and the dynamic loader), for an
/// outer guest that has none.
fn qemu_libs(k: &rimg_tests::guest::Kit) -> Vec<PathBuf> {
    let q = k.qemu();
    let bin = PathBuf::from(q.get_program());
    let env: Vec<_> = q
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
        .collect();
    let o = Command::new("ldd")
        .arg(&bin)
        .envs(env)
        .output()
        .expect("ldd");
    let text = String::from_utf8_lossy(&o.stdout);
    let mut libs = BTreeSet::new();
    for l in text.lines() {
        let path = match l.split_once("=>") {
            Some((_, r)) => r.split_whitespace().next(),
            None => l.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.insert(PathBuf::from(p));
        }
    }
    assert!(!libs.is_empty(), "ldd found no libraries: {text}");
    libs.into_iter().collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One way of booting: a label and the command the outer guest runs.
struct Variant {
    label: &'static str,
    rimg: bool,
    cmd: String,
    ms: Vec<f64>,
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let k = kit();
    let bins = static_bins();
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    let bench_initrd = Guest::new("echo FIRST-LINE\n").initramfs_image();
    let qemu = k.qemu();
    let qemu_bin = PathBuf::from(qemu.get_program());
    let fw = qemu_bin
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("share/qemu");
    let rimg = |kernel: &str| {
        format!(
            "first_line FIRST-LINE rimg-vmm --kernel {kernel} --initrd /bench.cpio \
             --memory 256M --cpus 2 --cmdline '{CMDLINE}'"
        )
    };
    // QEMU boots the bzImage through its linuxboot option ROM. It can
    // also boot the ELF vmlinux through PVH (the kernel has the PVH entry
    // note), but that was slower here in every run (10.0 s against 9.5 s,
    // 14.9 s against 13.3 s) and once stalled the outer guest for minutes,
    // so the bzImage is QEMU's form.
    let microvm = |kernel: &str| {
        format!(
            "first_line FIRST-LINE /lib/ld-linux-x86-64.so.2 --library-path /lib \
             /bin/qemu-system-x86_64 -L /lib -M microvm,acpi=on -accel kvm -cpu host \
             -m 256 -smp 2 -nodefaults -no-user-config -display none -serial stdio \
             -kernel {kernel} -initrd /bench.cpio -append '{CMDLINE}'"
        )
    };
    let mut variants = [
        ("rimg-vmm, ELF vmlinux", true, rimg("/vmlinux")),
        ("rimg-vmm, bzImage", true, rimg("/vmlinuz")),
        ("qemu microvm, bzImage", false, microvm("/vmlinuz")),
    ]
    .map(|(label, rimg, cmd)| Variant {
        label,
        rimg,
        cmd,
        ms: Vec::new(),
    });
    // The "host" lets shared memory use transparent huge pages when a
    // program asks (shmem_enabled=advise): rimg-vmm's guest RAM is a
    // memfd, so that vhost-user backends can map it, and asks for them.
    // QEMU's RAM here is anonymous memory, which gets huge pages under
    // the default `enabled=[always]` printed below; the knob does not
    // change it.
    let setup = "ls -l /dev/kvm\n\
         echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled\n\
         echo \"thp enabled: $(cat /sys/kernel/mm/transparent_hugepage/enabled)\"\n\
         echo \"thp shmem_enabled: $(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled)\"\n";
    // One round boots each way once; round r starts with way r (mod the
    // number of ways), so that none is always first in a fresh outer guest.
    let cmds: Vec<String> = variants.iter().map(|v| v.cmd.clone()).collect();
    let guest = |first: usize| {
        let mut script = String::from(setup);
        for j in 0..cmds.len() {
            let v = (first + j) % cmds.len();
            script.push_str(&format!(
                "echo 'run {v}'\n{} | grep -E '^(first-line|rss|exit)'\n",
                cmds[v]
            ));
        }
        let mut g = Guest::new(&script)
            .module("kvm_amd")
            .memory_mib(1024)
            .cpus(2)
            .timeout(Duration::from_secs(420))
            .file("/vmlinuz", read(k.kernel()), 0o644)
            .file("/vmlinux", read(&k.vmlinux()), 0o644)
            .file("/bench.cpio", bench_initrd.clone(), 0o644)
            .file("/bin/rimg-vmm", read(&bins.join("rimg-vmm")), 0o755)
            .file(
                "/bin/first_line",
                read(&bins.join("examples/first_line")),
                0o755,
            )
            .file("/bin/qemu-system-x86_64", read(&qemu_bin), 0o755);
        for lib in qemu_libs(k) {
            let name = lib.file_name().unwrap().to_str().unwrap().to_string();
            g = g.file(&format!("/lib/{name}"), read(&lib), 0o755);
        }
        for f in [
            "bios-microvm.bin",
            "linuxboot_dma.bin",
            "kvmvapic.bin",
            "pvh.bin",
        ] {
            if fw.join(f).exists() {
                g = g.file(&format!("/lib/{f}"), read(&fw.join(f)), 0o644);
            }
        }
        g
    };
    // Each round runs in a fresh outer guest. The outer guest's KVM is
    // nested under TCG, and now and then the outer kernel itself dies
    // (seen: a stack-guard-page BUG in its exception entry, and a silent
    // stop), whichever VMM is booting: such a round is reported and run
    // again, up to MAX_LOST times in all.
    const MAX_LOST: usize = 3;
    let mut rss = Vec::new();
    let mut lost = 0;
    let mut out = None;
    let mut i = 0;
    while i < rounds {
        let o = guest(i % cmds.len()).run();
        let mut ms = vec![None; variants.len()];
        let mut round_rss = Vec::new();
        let mut cur = None;
        for l in o.console.lines() {
            if let Some(r) = l.strip_prefix("run ") {
                cur = r.trim().parse::<usize>().ok();
            } else if let Some(m) = l.strip_prefix("first-line-ms ") {
                if let (Some(v), Ok(m)) = (cur, m.trim().parse::<f64>()) {
                    ms[v] = Some(m);
                }
            } else if let Some(r) = l.strip_prefix("rss-kib ") {
                if cur.is_some_and(|v| variants[v].rimg) {
                    let kib = |k: &str| -> f64 {
                        r.split_whitespace()
                            .find_map(|f| f.strip_prefix(k))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0.0)
                    };
                    round_rss.push(kib("vmm=") / 1024.0);
                }
            }
        }
        if ms.iter().any(Option::is_none) {
            lost += 1;
            let tail: Vec<&str> = o.console.lines().rev().take(15).collect();
            eprintln!(
                "round {i}: the outer guest did not finish (status {:?}, timed out {}); last lines:",
                o.status, o.timed_out
            );
            for l in tail.iter().rev() {
                eprintln!("  {l}");
            }
            if lost > MAX_LOST {
                eprintln!("benchmark failed: {lost} rounds lost");
                std::process::exit(1);
            }
            continue;
        }
        for (var, m) in variants.iter_mut().zip(ms) {
            var.ms.push(m.unwrap());
        }
        rss.extend(round_rss);
        out = Some(o);
        i += 1;
    }
    let out = out.expect("at least one round");
    for l in out.console.lines().filter(|l| l.starts_with("thp ")) {
        println!("outer guest (the host): {l}");
    }
    println!(
        "boot to init's first line (nested KVM, 2 vCPUs, 256 MiB, median of {rounds}; \
         rounds lost to the outer guest and run again: {lost}):"
    );
    let mut med = Vec::new();
    for v in variants.iter_mut() {
        let m = median(&mut v.ms);
        println!("  {:30} {m:8.0} ms   runs {:?}", v.label, v.ms);
        med.push((v.rimg, m));
    }
    let best = |rimg: bool| {
        med.iter()
            .filter(|(r, _)| *r == rimg)
            .map(|(_, m)| *m)
            .fold(f64::INFINITY, f64::min)
    };
    println!(
        "  ratio rimg-vmm (ELF) / qemu          {:.2}x  (target <= 0.5x)",
        med[0].1 / best(false)
    );
    println!(
        "  ratio, bzImage on both               {:.2}x",
        med[1].1 / med[2].1
    );
    let m = median(&mut rss);
    println!(
        "rimg-vmm resident memory outside guest RAM: {m:.2} MiB median (target <= 5 MiB), samples {rss:.2?}"
    );
}
