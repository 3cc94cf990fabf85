//! Test support for rimg-vmm: the freestanding probe guest (built here
//! with the host's rustc) and a watched VMM run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// Builds tests/guests/virtio_probe.rs into an ELF the VMM loads as its
/// kernel: no_std, linked at 2 MiB, entered in long mode.
pub fn probe_guest() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/virtio_probe.rs");
        let dir = crate::target_dir().join("vmm-guests");
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join(format!("virtio_probe-{}.elf", std::process::id()));
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
            .arg(&out)
            .output()
            .expect("run rustc");
        assert!(
            o.status.success(),
            "building the probe guest failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    })
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

/// Runs `rimg-vmm ARGS` to completion (killed after `timeout`).
pub fn run_vmm(args: &[&str], timeout: Duration) -> VmmRun {
    let mut cmd = Command::new(crate::workspace_bin("rimg-vmm"));
    cmd.args(args);
    let w = crate::run_watched(cmd, timeout);
    VmmRun {
        console: String::from_utf8_lossy(&w.stdout).replace('\r', ""),
        stderr: String::from_utf8_lossy(&w.stderr).into_owned(),
        code: w.status.and_then(|s| s.code()),
        timed_out: w.timed_out,
    }
}

/// rimg-vmm, rimg-vhost-blk and rimg-vhost-net linked statically (for the
/// outer TCG guest, which has no libraries), built under
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
            .args(["build", "--quiet", "--target", triple])
            .args(["-p", "rimg-vmm", "-p", "rimg-vhost-blk", "-p", "rimg-vhost-net"])
            .status()
            .expect("cargo build");
        assert!(st.success(), "static build failed");
        target.join(triple).join("debug")
    })
}
