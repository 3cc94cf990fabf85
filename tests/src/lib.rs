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

/// Path of a binary built from this workspace (target/<profile>/NAME),
/// building it first if needed.
pub fn workspace_bin(name: &str) -> PathBuf {
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

pub mod blk;
pub mod daemon;
pub mod guest;
pub mod net;
pub mod rings;

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
