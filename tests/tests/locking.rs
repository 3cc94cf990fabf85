//! Image locks compatible with QEMU's: a writer excludes other writers and
//! consistent readers across rimg, qemu-img and qemu-io; -U (force share)
//! reads anyway.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use qcow2::{open, Error, OpenOptions};
use rimg_tests::{qemu_img, run, tempdir, workspace_bin};

#[test]
fn rimg_writer_excludes_qemu_and_rimg() {
    let dir = tempdir();
    let img = dir.path().join("l.qcow2");
    let p = img.to_str().unwrap();
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", p, "16M"])
        .status
        .success());
    let w = open(
        &img,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    w.write_at(&[1u8; 4096], 0).unwrap();

    let info = qemu_img(&["info", p]);
    assert!(!info.status.success(), "qemu-img info while rimg writes");
    assert!(String::from_utf8_lossy(&info.stderr).contains("lock"));
    let io = run("qemu-io", &["-c", "write 0 4k", p]);
    assert!(
        String::from_utf8_lossy(&io.stderr).contains("\"write\" lock"),
        "qemu-io write while rimg writes"
    );
    assert!(
        qemu_img(&["info", "-U", p]).status.success(),
        "-U reads anyway"
    );

    match open(
        &img,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    ) {
        Err(Error::Locked(m)) => assert!(m.contains("\"write\" lock"), "{m}"),
        other => panic!("second writer: {other:?}"),
    }
    drop(w);
    assert!(
        qemu_img(&["check", p]).status.success(),
        "free again after close"
    );
}

#[test]
fn qemu_writer_excludes_rimg() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    let img = dir.path().join("q.qcow2");
    let p = img.to_str().unwrap();
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", p, "16M"])
        .status
        .success());
    // qemu-io keeps the image open (read-write) while its stdin is open.
    let mut child = Command::new("qemu-io")
        .arg(p)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    // Wait until it has opened the image: its answer to a command.
    writeln!(stdin, "write -P 7 0 4k").unwrap();
    let mut line = String::new();
    while !line.contains("wrote") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "qemu-io exited early"
        );
    }
    for args in [
        vec!["info", p],
        vec!["check", "-r", "all", p],
        vec!["snapshot", "-c", "s", p],
        vec!["bench", "-w", "-c", "1", p],
    ] {
        let r = run(rimg, &args);
        assert_eq!(
            r.status.code(),
            Some(1),
            "rimg {args:?} while qemu-io writes"
        );
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("lock"), "{err}");
    }
    assert!(
        run(rimg, &["info", "-U", p]).status.success(),
        "rimg info -U"
    );
    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    assert!(child.wait().unwrap().success());
    assert!(
        run(rimg, &["check", p]).status.success(),
        "free again after qemu-io quit"
    );
}
