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

/// iotest 036: an image with an incompatible feature bit rimg does not
/// know is refused with qemu-img's message, naming the bits from the
/// image's feature name table (a short last entry included) and the rest
/// as one mask. rimg runs as `qemu-img` here: the lines must be equal.
#[test]
fn unknown_features_are_named_as_qemu_img_names_them() {
    use std::os::unix::fs::FileExt;
    let rimg = workspace_bin("rimg");
    let dir = tempdir();
    let link = dir.path().join("qemu-img");
    std::os::unix::fs::symlink(&rimg, &link).unwrap();
    let img = dir.path().join("t.qcow2");
    let p = img.to_str().unwrap();
    let o = in_dir(
        dir.path(),
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p, "64M"],
    );
    assert!(o.status.success());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let bits: u64 = (1 << 63) | (1 << 62) | (1 << 61);
    f.write_all_at(&bits.to_be_bytes(), 72).unwrap();
    let lines = |img_dir: &std::path::Path| {
        let a = in_dir(img_dir, link.to_str().unwrap(), &["info", p]);
        let b = in_dir(img_dir, "qemu-img", &["info", p]);
        assert_eq!(a.status.code(), Some(1));
        assert_eq!(b.status.code(), Some(1));
        let (a, b) = (
            String::from_utf8_lossy(&a.stderr),
            String::from_utf8_lossy(&b.stderr),
        );
        assert_eq!(a, b);
        a.into_owned()
    };
    let err = lines(dir.path());
    assert!(
        err.contains("Unknown incompatible feature: e000000000000000"),
        "{err}"
    );
    // Name bit 62 with a short entry appended to the feature name table:
    // rewrite the table extension (at the end of the header extensions).
    let mut hdr = vec![0u8; 4096];
    f.read_exact_at(&mut hdr, 0).unwrap();
    let mut off = 104usize; // after the version 3 header (+ compression type)
    off = u32::from_be_bytes(hdr[100..104].try_into().unwrap()).max(off as u32) as usize;
    loop {
        let kind = u32::from_be_bytes(hdr[off..off + 4].try_into().unwrap());
        let len = u32::from_be_bytes(hdr[off + 4..off + 8].try_into().unwrap()) as usize;
        if kind == 0 {
            panic!("no feature name table");
        }
        if kind == 0x6803_f857 {
            let mut ext = vec![0u8; 8];
            ext[..4].copy_from_slice(&kind.to_be_bytes());
            let mut data = hdr[off + 8..off + 8 + len].to_vec();
            data.extend_from_slice(b"\x00\x3eTest feature");
            ext[4..8].copy_from_slice(&(data.len() as u32).to_be_bytes());
            ext.extend_from_slice(&data);
            ext.resize(ext.len().next_multiple_of(8) + 8, 0); // end marker
            f.write_all_at(&ext, off as u64).unwrap();
            break;
        }
        off += 8 + len.next_multiple_of(8);
    }
    let err = lines(dir.path());
    assert!(
        err.contains("Test feature, Unknown incompatible feature: a000000000000000"),
        "{err}"
    );
}

/// Output into a pipe nobody reads (`rimg ... | head` after head exits)
/// ends rimg quietly by SIGPIPE, as it ends most Unix tools: no panic
/// message, whichever command prints (measure used to panic in println!).
#[test]
fn a_closed_pipe_ends_rimg_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    let dir = tempdir();
    let img = dir.path().join("a.qcow2");
    rimg_tests::qemu_create(&img, "", "1M");
    let img = img.to_str().unwrap();
    for args in [
        vec!["measure", "-O", "qcow2", img],
        vec!["info", img],
        vec!["map", "--output=json", img],
    ] {
        let mut fds = [0; 2];
        // SAFETY: pipe() fills both descriptors, each owned once below.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors from pipe(), not owned elsewhere.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // The reading end is gone before rimg writes anything.
        drop(read);
        let o = Command::new(workspace_bin("rimg"))
            .args(&args)
            .stdout(write)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.signal(), Some(libc::SIGPIPE), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}
