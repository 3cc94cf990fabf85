//! Names as qemu-img takes and prints them: the `file:` protocol prefix
//! (a filename with a colon, iotest 126) and the program name at the start
//! of error messages (argv[0], so rimg installed as qemu-img says
//! "qemu-img:").

use std::process::Command;

use rimg_tests::{assert_qemu_check_clean, tempdir, workspace_bin};

fn in_dir(dir: &std::path::Path, cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

#[test]
fn file_prefix_names_the_host_file() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    let d = dir.path();
    for tool in [rimg, "qemu-img"] {
        let o = in_dir(
            d,
            tool,
            &["create", "-q", "-f", "qcow2", "file:image:top.qcow2", "1M"],
        );
        assert!(
            o.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(d.join("image:top.qcow2").exists(), "{tool}");
        assert_qemu_check_clean(&d.join("image:top.qcow2"));
        std::fs::remove_file(d.join("image:top.qcow2")).unwrap();
    }
    let o = in_dir(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
    );
    assert!(o.status.success());
    let o = in_dir(
        d,
        rimg,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "file:image:top.qcow2",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // info shows the name as qemu-img does ("./image:top.qcow2", and the
    // backing file's path relative to it).
    let info = |tool| {
        let o = in_dir(d, tool, &["info", "file:image:top.qcow2"]);
        assert!(
            o.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("image:") || l.starts_with("backing file:"))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let mine = info(rimg);
    assert_eq!(mine, info("qemu-img"));
    assert_eq!(mine[0], "image: ./image:top.qcow2");
}

#[test]
fn messages_start_with_the_name_run_as() {
    let rimg = workspace_bin("rimg");
    let dir = tempdir();
    let link = dir.path().join("qemu-img");
    std::os::unix::fs::symlink(&rimg, &link).unwrap();
    let missing = dir.path().join("missing.qcow2");
    let m = missing.to_str().unwrap();
    for (prog, prefix) in [
        (link.to_str().unwrap(), "qemu-img: "),
        (rimg.to_str().unwrap(), "rimg: "),
    ] {
        let o = in_dir(dir.path(), prog, &["info", m]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            err.starts_with(&format!("{prefix}Could not open '{m}'")),
            "{err}"
        );
    }
}
