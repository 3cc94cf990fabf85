//! A raw image served or written without its format given (so probed)
//! keeps probing as raw: a client may not turn its first sector into
//! another format's header, which the next probe would open with a
//! backing file or extents of the client's choosing (QEMU's guard for
//! probed raw images, CVE-2008-2004). Judged against qemu-nbd through
//! QEMU's own client, through libblkio against rimg-vhost-blk, and
//! against qemu-img's warning.

use std::path::Path;

use rimg_tests::blk::{Client, Daemon};
use rimg_tests::nbd::{self, QemuNbd};
use rimg_tests::{qemu_img, rimg, tempdir};

/// qemu-io writes that build a qcow2 header's first 8 bytes one at a
/// time (each a read-modify-write of the first sector at the server),
/// with checks in between; the last byte completes the magic. Then a
/// QED magic whose last byte only a zeroing would write.
const BUILD_A_HEADER: &[&str] = &[
    "write -P 0x03 7 1",
    "write -P 0x51 0 1",
    "write -P 0x46 1 1",
    "write -P 0x49 2 1",
    "write -P 0xfb 3 1",
    "write -P 0x51 512 512",
    "read -P 0 3 1",
    "read -P 0x49 2 1",
    // "QEDx", then zeroing the x would complete QED's magic.
    "write -P 0x45 1 1",
    "write -P 0x78 3 1",
    "write -P 0x44 2 1",
    "write -z 3 1",
    "read -P 0x78 3 1",
];

/// What qemu-io printed, without its timing lines.
fn qemu_io_over(uri: &str) -> String {
    let mut args = vec!["-f", "raw"];
    for c in BUILD_A_HEADER {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let o = rimg_tests::run("qemu-io", &args);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    text.lines()
        .filter(|l| !l.contains(" ops; "))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn raw_file(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    p
}

fn probed_format(p: &Path) -> String {
    let o = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("qemu-img info json");
    v["format"].as_str().unwrap().to_string()
}

#[test]
fn nbd_clients_cannot_write_a_header_as_with_qemu_nbd() {
    let d = tempdir();
    let ours = raw_file(d.path(), "rimg.raw");
    let theirs = raw_file(d.path(), "qemu.raw");
    let (s1, s2) = (d.path().join("rimg.sock"), d.path().join("qemu.sock"));
    let server = nbd::serve(&s1, &[ours.to_str().unwrap()]);
    let got = qemu_io_over(&nbd::unix_uri(&s1, ""));
    let log = nbd::stop(server);
    let (peer, warned) = QemuNbd::start_warning(&s2, &[theirs.to_str().unwrap()]);
    let want = qemu_io_over(&nbd::unix_uri(&s2, ""));
    drop(peer);
    // The magic's last byte, then the zeroing that would complete QED's.
    assert_eq!(
        want.matches("Operation not permitted").count(),
        2,
        "qemu-nbd:\n{want}"
    );
    assert_eq!(got, want, "rimg-nbd and qemu-nbd differ");
    // The same three lines.
    assert_eq!(
        warned.replace(theirs.to_str().unwrap(), "IMG"),
        warning_lines(&log).replace(ours.to_str().unwrap(), "IMG"),
    );
    assert_eq!(probed_format(&ours), "raw");
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap()
    );
}

#[test]
fn an_nbd_export_of_a_given_format_is_not_guarded() {
    let d = tempdir();
    let img = raw_file(d.path(), "given.raw");
    let sock = d.path().join("nbd.sock");
    let server = nbd::serve(&sock, &["-f", "raw", img.to_str().unwrap()]);
    let out = qemu_io_over(&nbd::unix_uri(&sock, ""));
    let log = nbd::stop(server);
    assert!(!out.contains("not permitted"), "{out}");
    assert!(!log.contains("WARNING"), "{log}");
    // Every write landed: the magic byte, then QED's, zeroed last.
    assert_eq!(&std::fs::read(&img).unwrap()[..8], b"QED\0\0\0\0\x03");
}

/// The warning's three lines in a daemon's log.
fn warning_lines(log: &str) -> String {
    let start = log
        .find("WARNING")
        .unwrap_or_else(|| panic!("no warning:\n{log}"));
    log[start..]
        .lines()
        .take(3)
        .map(|l| format!("{l}\n"))
        .collect()
}

/// QEMU's three lines for a probed raw image opened for writing.
fn qemu_warning(p: &Path) -> String {
    format!(
        "WARNING: Image format was not specified for '{}' and probing guessed raw.",
        p.display()
    )
}

#[test]
fn a_guest_cannot_write_a_header_through_the_block_daemon() {
    let d = tempdir();
    let img = raw_file(d.path(), "guest.raw");
    let sock = d.path().join("blk.sock");
    let daemon = Daemon::start(&sock, &img, &["--num-queues", "2"]).expect("daemon");
    let mut c = Client::connect(&sock, 2, false).expect("connect");
    let mut header = vec![0u8; 4096];
    header[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
    // Refused on either queue, in one write or with the sector in it.
    assert!(c.write(0, 0, &header[..512]).is_err());
    assert!(c.write(1, 0, &header).is_err());
    header[..4].copy_from_slice(b"QED\0");
    assert!(c.write(1, 0, &header).is_err());
    // Other data goes to the first sector, and a header anywhere else.
    let mbr = vec![0x55u8; 512];
    c.write(0, 0, &mbr).expect("an ordinary first sector");
    c.write(1, 512, &header).expect("past the first sector");
    assert_eq!(c.read(0, 0, 512).unwrap(), mbr);
    drop(c);
    let (st, log) = daemon.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    assert!(log.contains(&qemu_warning(&img)), "{log}");
    assert_eq!(probed_format(&img), "raw");
}

#[test]
fn the_cli_warns_as_qemu_img_does() {
    let d = tempdir();
    let a = raw_file(d.path(), "a.raw");
    let b = raw_file(d.path(), "b.raw");
    let ours = rimg(&["resize", a.to_str().unwrap(), "+1M"]);
    let theirs = qemu_img(&["resize", b.to_str().unwrap(), "+1M"]);
    assert!(ours.status.success() && theirs.status.success());
    let strip = |o: &std::process::Output, p: &Path| {
        String::from_utf8_lossy(&o.stderr).replace(p.to_str().unwrap(), "IMG")
    };
    assert!(strip(&theirs, &b).starts_with("WARNING: Image format was not specified"));
    assert_eq!(strip(&ours, &a), strip(&theirs, &b));
    // Given, no warning.
    let quiet = rimg(&["resize", "-f", "raw", a.to_str().unwrap(), "+1M"]);
    assert!(quiet.stderr.is_empty(), "{quiet:?}");
}
