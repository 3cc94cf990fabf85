//! rimg's NBD client (the engine's `nbd://` and `nbd+unix://` files)
//! against qemu-nbd, qemu-storage-daemon's NBD export and rimg-nbd: info,
//! map, compare and convert in and out say what qemu-img says through the
//! same servers; a qcow2 image whose bytes are on an NBD server checks
//! as the file does; an overlay whose backing file is an NBD URL reads
//! through it.

use std::path::Path;

use rimg_tests::nbd::{self, unix_uri, QemuNbd};
use rimg_tests::qsd::Qsd;
use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, rimg_in, run, run_ok, same_as_qemu,
    tempdir, write_mixed_raw,
};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A qcow2 image with data, zero clusters and holes, and its raw twin.
fn sample(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let img = dir.join("disk.qcow2");
    let raw = dir.join("disk.raw");
    write_mixed_raw(&raw, 24 << 20, 11);
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&img)],
    );
    rimg_tests::qemu_io(&img, &["write -z 1M 512k"]);
    rimg_tests::qemu_io(&raw, &["write -z 1M 512k"]);
    (img, raw)
}

/// The read-only commands give what qemu-img gives through the same
/// server, for each server.
#[test]
fn read_only_commands_match_qemu_img_through_each_server() {
    let d = tempdir();
    let (img, raw) = sample(d.path());
    let q = QemuNbd::start(&d.path().join("q.sock"), &["-r", "-f", "qcow2", s(&img)]);
    let qsd_sock = d.path().join("qsd.sock");
    let qsd = Qsd::start_nbd(&img, &qsd_sock, "disk", false);
    let rs = d.path().join("r.sock");
    let r = nbd::serve(&rs, &["-e", "0", "-r", s(&img)]);
    for u in [
        unix_uri(&q.socket, ""),
        unix_uri(&qsd_sock, "disk"),
        unix_uri(&rs, ""),
    ] {
        let dir = d.path();
        same_as_qemu(dir, &["info", "-f", "raw", &u]);
        same_as_qemu(dir, &["info", "--output=json", "-f", "raw", &u]);
        same_as_qemu(dir, &["map", "--output=json", "-f", "raw", &u]);
        same_as_qemu(dir, &["map", "-f", "raw", &u]);
        same_as_qemu(dir, &["compare", "-f", "raw", "-F", "raw", &u, s(&raw)]);
        same_as_qemu(dir, &["compare", "-f", "raw", "-F", "qcow2", &u, s(&img)]);
        // A sparse copy out: block status keeps the holes.
        let out = d.path().join("out.qcow2");
        let (code, _, err) = rimg_in(dir, &["convert", "-f", "raw", "-O", "qcow2", &u, s(&out)]);
        assert_eq!(code, Some(0), "{err}");
        assert_qemu_check_clean(&out);
        assert_qemu_compare_equal(&out, &raw);
        let twin = d.path().join("twin.qcow2");
        run_ok(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "qcow2", &u, s(&twin)],
        );
        let len = |p: &Path| std::fs::metadata(p).unwrap().len();
        assert_eq!(
            len(&out),
            len(&twin),
            "{u}: not as sparse as qemu-img's copy"
        );
    }
    let (st, _) = qsd.quit();
    assert!(st.success());
    nbd::stop(r);
}

/// Converting into an NBD export (`-n`, the export exists) through
/// qemu-nbd and through rimg-nbd: the export's image checks clean and
/// holds the source.
#[test]
fn convert_writes_into_exports() {
    let d = tempdir();
    let (_, raw) = sample(d.path());
    for server in ["qemu", "rimg"] {
        let target = d.path().join(format!("{server}-target.qcow2"));
        run_ok("qemu-img", &["create", "-f", "qcow2", s(&target), "24M"]);
        let sock = d.path().join(format!("{server}.sock"));
        let u = unix_uri(&sock, "");
        let dir = d.path();
        let convert = ["convert", "-n", "-f", "raw", "-O", "raw", s(&raw), &u];
        if server == "qemu" {
            let q = QemuNbd::start(&sock, &["-f", "qcow2", s(&target)]);
            let (code, _, err) = rimg_in(dir, &convert);
            assert_eq!(code, Some(0), "{err}");
            drop(q);
        } else {
            let r = nbd::serve(&sock, &["-f", "qcow2", s(&target)]);
            let (code, _, err) = rimg_in(dir, &convert);
            assert_eq!(code, Some(0), "{err}");
            nbd::stop(r);
        }
        assert_qemu_check_clean(&target);
        assert_qemu_compare_equal(&target, &raw);
    }
}

/// A qcow2 file exported as its raw bytes: rimg probes it as qcow2 on
/// the server, checks it as qemu-img does, and reads its content.
#[test]
fn a_qcow2_file_on_an_nbd_server_opens_as_qcow2() {
    let d = tempdir();
    let (img, raw) = sample(d.path());
    let q = QemuNbd::start(&d.path().join("q.sock"), &["-r", "-f", "raw", s(&img)]);
    let u = unix_uri(&q.socket, "");
    same_as_qemu(d.path(), &["info", &u]);
    same_as_qemu(d.path(), &["check", &u]);
    same_as_qemu(d.path(), &["check", "--output=json", &u]);
    same_as_qemu(d.path(), &["compare", "-F", "raw", &u, s(&raw)]);
}

/// A golden image served read-only by rimg-nbd, and an overlay whose
/// backing file is the NBD URL: rimg reads the chain through the server
/// (info, map, compare as qemu-img), and a convert of the overlay holds
/// the golden data under the overlay's own.
#[test]
fn an_overlay_backed_by_an_nbd_url() {
    let d = tempdir();
    let (golden, raw) = sample(d.path());
    let sock = d.path().join("golden.sock");
    let r = nbd::serve(&sock, &["-e", "0", "-r", "-x", "golden", s(&golden)]);
    let u = unix_uri(&sock, "golden");
    let top = d.path().join("top.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-b", &u, "-F", "raw", s(&top)],
    );
    rimg_tests::qemu_io(&top, &["write -P 0x77 4M 64k"]);
    let dir = d.path();
    same_as_qemu(dir, &["info", "--backing-chain", s(&top)]);
    same_as_qemu(dir, &["map", "--output=json", s(&top)]);
    let out = d.path().join("flat.raw");
    let (code, _, err) = rimg_in(dir, &["convert", "-O", "raw", s(&top), s(&out)]);
    assert_eq!(code, Some(0), "{err}");
    rimg_tests::qemu_io(&raw, &["write -P 0x77 4M 64k"]);
    assert_qemu_compare_equal(&out, &raw);
    nbd::stop(r);
}

/// Errors name the problem: an export the server does not have, a
/// server that is not there, an address that does not parse.
#[test]
fn bad_addresses_and_exports_are_clear_errors() {
    let d = tempdir();
    let (img, _) = sample(d.path());
    let sock = d.path().join("r.sock");
    let r = nbd::serve(&sock, &["-r", "-x", "a", s(&img)]);
    let cases = [
        (unix_uri(&sock, "b"), "export 'b' not present"),
        (
            unix_uri(&d.path().join("nope.sock"), ""),
            "No such file or directory",
        ),
        ("nbd+unix:///a".to_string(), "socket"),
        ("nbds://localhost/a".to_string(), "tls-certificates"),
    ];
    for (u, want) in cases {
        let (code, _, err) = rimg_in(d.path(), &["info", "-f", "raw", &u]);
        assert_eq!(code, Some(1), "{u}: {err}");
        assert!(err.contains(want), "{u}: {err}");
    }
    nbd::stop(r);
}

/// `rimg-nbd --list` prints what `qemu-nbd --list` prints, through
/// rimg-nbd (several exports, descriptions, read-only, every context
/// kind) and through qemu-nbd, and fails as it does without a server.
#[test]
fn list_prints_what_qemu_nbd_list_prints() {
    let d = tempdir();
    let (img, raw) = sample(d.path());
    rimg_tests::qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    let list = |prog: &str, sock: &Path| {
        let bin = match prog {
            "rimg" => rimg_tests::workspace_bin("rimg-nbd"),
            _ => "qemu-nbd".into(),
        };
        let o = rimg_tests::run(bin.to_str().unwrap(), &["-L", "-k", s(sock)]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            err,
        )
    };
    let sock = d.path().join("rimg.sock");
    let spec = format!("name=two,file={},format=raw,readonly=on", s(&raw));
    // The same first export from both servers.
    let one = ["-A", "-B", "b0", "-x", "one", "-D", "the first"];
    let mut args = vec!["-e", "0", "--export", &spec];
    args.extend(one);
    args.push(s(&img));
    let srv = nbd::serve(&sock, &args);
    let ours = list("rimg", &sock);
    let theirs = list("qemu", &sock);
    nbd::stop(srv);
    assert_eq!(ours, theirs, "through rimg-nbd");
    assert!(ours.1.contains("exports available: 2"), "{}", ours.1);

    let qsock = d.path().join("qemu.sock");
    let mut args = vec!["-f", "qcow2"];
    args.extend(one);
    args.push(s(&img));
    let peer = QemuNbd::start(&qsock, &args);
    let ours = list("rimg", &qsock);
    let theirs = list("qemu", &qsock);
    drop(peer);
    assert_eq!(ours, theirs, "through qemu-nbd");
    assert!(ours.1.contains("qemu:dirty-bitmap:b0"), "{}", ours.1);

    let gone = d.path().join("gone.sock");
    let (ours, theirs) = (list("rimg", &gone), list("qemu", &gone));
    assert_eq!(ours.0, theirs.0);
    assert_eq!(
        ours.2.replacen("rimg-nbd", "qemu-nbd", 1),
        theirs.2,
        "without a server"
    );
}

/// Failures to reach or open an export read as qemu-img's and qemu-nbd's,
/// word for word (program name aside): an export the server does not
/// have (with the server's message), a socket that is not there, a TCP
/// port nobody listens on; `-L` against a server without TLS when asked
/// for TLS, and against one that requires it when not.
#[test]
fn open_errors_read_as_qemu_s() {
    let d = tempdir();
    let (img, _) = sample(d.path());
    let sock = d.path().join("r.sock");
    let r = nbd::serve(&sock, &["-r", "-x", "a", s(&img)]);
    // A port nobody listens on: one just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let absent = d.path().join("absent.sock");
    for u in [
        unix_uri(&sock, "b"),
        unix_uri(&absent, ""),
        format!("nbd://127.0.0.1:{port}/x"),
    ] {
        let (code, _, ours) = rimg_in(d.path(), &["info", &u]);
        let theirs = run("qemu-img", &["info", &u]);
        assert_eq!(code, Some(1), "{u}: {ours}");
        assert_eq!(
            ours.replacen("rimg: ", "", 1),
            String::from_utf8_lossy(&theirs.stderr).replacen("qemu-img: ", "", 1),
            "{u}"
        );
    }
    let psk = d.path().join("psk");
    std::fs::create_dir_all(&psk).unwrap();
    std::fs::write(psk.join("keys.psk"), "qemu:0011223344556677\n").unwrap();
    let tls_sock = d.path().join("tls.sock");
    let server = format!("tls-creds-psk,id=tls0,dir={},endpoint=server", s(&psk));
    let client = format!("tls-creds-psk,id=tls0,dir={},endpoint=client", s(&psk));
    let t = nbd::serve(
        &tls_sock,
        &["-r", "--object", &server, "--tls-creds", "tls0", s(&img)],
    );
    // The same servers' refusals from qemu-nbd, to judge what rimg-nbd
    // says as a server too.
    let q_sock = d.path().join("q.sock");
    let q = QemuNbd::start(&q_sock, &["-r", "-x", "a", s(&img)]);
    let q_tls_sock = d.path().join("qt.sock");
    let qt = QemuNbd::start(
        &q_tls_sock,
        &["-r", "--object", &server, "--tls-creds", "tls0", s(&img)],
    );
    let rimg_nbd = rimg_tests::workspace_bin("rimg-nbd");
    let text = |o: &std::process::Output, name: &str, at: &Path| {
        String::from_utf8_lossy(&o.stderr)
            .replace(&format!("{name}: "), "")
            .replace(s(at), "SOCK")
    };
    for (ours_at, theirs_at, tls) in [(&sock, &q_sock, true), (&tls_sock, &q_tls_sock, false)] {
        let args = |at: &Path| -> Vec<String> {
            let mut a: Vec<String> = vec!["-L".into(), "-k".into(), s(at).into()];
            if tls {
                a.extend([
                    "--object".into(),
                    client.clone(),
                    "--tls-creds".into(),
                    "tls0".into(),
                ]);
            }
            a
        };
        let (a, b) = (args(ours_at), args(theirs_at));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let b: Vec<&str> = b.iter().map(String::as_str).collect();
        let ours = run(s(&rimg_nbd), &a);
        let theirs = run("qemu-nbd", &b);
        assert!(!ours.status.success() && !theirs.status.success());
        assert_eq!(
            text(&ours, "rimg-nbd", ours_at),
            text(&theirs, "qemu-nbd", theirs_at),
            "{a:?}"
        );
    }
    // A missing export, as each server tells qemu-img.
    let ours = run("qemu-img", &["info", &unix_uri(&sock, "b")]);
    let theirs = run("qemu-img", &["info", &unix_uri(&q_sock, "b")]);
    assert_eq!(
        text(&ours, "qemu-img", &sock),
        text(&theirs, "qemu-img", &q_sock)
    );
    drop((q, qt));
    nbd::stop(t);
    nbd::stop(r);
}
