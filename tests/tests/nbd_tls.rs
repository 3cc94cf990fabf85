//! rimg-nbd with TLS (X.509 credentials as qemu-nbd takes them):
//! clients with the right credentials get the same service as in clear,
//! and the same answers qemu-nbd gives with the same credentials; clients
//! without them (no TLS, another CA, no client certificate) are refused
//! and learn nothing about the exports.

use std::path::Path;

use rimg_tests::nbd::{self, tls_dirs, QemuNbd};
use rimg_tests::{assert_qemu_check_clean, assert_qemu_compare_equal, run, run_ok, tempdir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn creds_object(dir: &Path, endpoint: &str) -> String {
    format!("tls-creds-x509,id=tls0,dir={},endpoint={endpoint}", s(dir))
}

/// qemu-io or qemu-img arguments that reach the export on `sock` over
/// TLS with the client credentials in `dir`.
fn tls_target(sock: &Path, dir: &Path) -> Vec<String> {
    vec![
        "--object".into(),
        creds_object(dir, "client"),
        "--image-opts".into(),
        format!(
            "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},\
             file.tls-creds=tls0,file.tls-hostname=localhost",
            s(sock)
        ),
    ]
}

fn qemu_io_tls(sock: &Path, dir: &Path, cmds: &[&str]) -> std::process::Output {
    let mut args: Vec<String> = Vec::new();
    for c in cmds {
        args.extend(["-c".into(), c.to_string()]);
    }
    args.extend(tls_target(sock, dir));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &args)
}

fn nbds_uri(sock: &Path, dir: &Path) -> String {
    format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        s(sock),
        s(dir)
    )
}

const WRITES: [&str; 6] = [
    "write -P 0x11 0 1M",
    "write -P 0x33 3000 5000",
    "write -f -P 0x44 8M 192k",
    "write -z 512k 256k",
    "discard 1M 64k",
    "aio_write -P 0x66 20M 64k",
];

#[test]
fn tls_clients_get_what_qemu_nbd_gives_them() {
    nbd::ensure_libnbd();
    let d = tempdir();
    let t = tls_dirs(d.path());
    let model = d.path().join("model.raw");
    std::fs::write(&model, vec![0u8; 32 << 20]).unwrap();
    let mut maps = Vec::new();
    for server in ["qemu", "rimg"] {
        let img = d.path().join(format!("{server}.qcow2"));
        run_ok("qemu-img", &["create", "-f", "qcow2", s(&img), "32M"]);
        let sock = d.path().join(format!("{server}.sock"));
        let obj = creds_object(&t.server, "server");
        let common = [
            "--object",
            &obj,
            "--tls-creds",
            "tls0",
            "--discard=unmap",
            "-f",
            "qcow2",
        ];
        let report = |sock: &Path| {
            let o = qemu_io_tls(sock, &t.client, &WRITES);
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            assert!(o.status.success() && !text.contains("failed"), "{text}");
            let mut map_args = vec!["map".to_string(), "--output=json".into()];
            map_args.extend(tls_target(sock, &t.client));
            let map_args: Vec<&str> = map_args.iter().map(String::as_str).collect();
            let json = run_ok("nbdinfo", &["--json", &nbds_uri(sock, &t.client)]);
            (
                run_ok("qemu-img", &map_args),
                json.replace(s(sock), "SOCKET"),
            )
        };
        if server == "qemu" {
            let mut args: Vec<&str> = common.to_vec();
            args.push(s(&img));
            let q = QemuNbd::start(&sock, &args);
            maps.push(report(&q.socket));
        } else {
            let mut args = vec!["-k", s(&sock), "-t", "-e", "0"];
            args.extend(common);
            args.push(s(&img));
            let r = nbd::start(&sock, &args);
            maps.push(report(&sock));
            nbd::stop(r);
        }
        assert_qemu_check_clean(&img);
    }
    assert_eq!(
        maps[1], maps[0],
        "over TLS: rimg-nbd (left), qemu-nbd (right)"
    );
    let mut args = vec!["-f", "raw"];
    for c in WRITES {
        args.extend(["-c", c]);
    }
    args.push(s(&model));
    run_ok("qemu-io", &args);
    assert_qemu_compare_equal(&d.path().join("rimg.qcow2"), &model);
}

#[test]
fn clients_without_the_right_credentials_are_refused() {
    nbd::ensure_libnbd();
    let d = tempdir();
    let t = tls_dirs(d.path());
    let img = d.path().join("disk.qcow2");
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&img), "16M"]);
    rimg_tests::qemu_io(&img, &["write -P 0x42 0 64k"]);
    let sock = d.path().join("tls.sock");
    let obj = creds_object(&t.server, "server");
    let r = nbd::serve(
        &sock,
        &["-e", "0", "--object", &obj, "--tls-creds", "tls0", s(&img)],
    );
    let plain = format!("nbd+unix:///?socket={}", s(&sock));
    // In clear: refused, and no export is listed or described.
    let o = run("qemu-io", &["-f", "raw", "-c", "read 0 4k", &plain]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("TLS"), "{err}");
    for args in [vec!["--list", plain.as_str()], vec![plain.as_str()]] {
        let o = run("nbdinfo", &args);
        assert!(!o.status.success(), "nbdinfo {args:?} in clear must fail");
        assert!(!String::from_utf8_lossy(&o.stdout).contains("export-size"));
    }
    // Another CA's certificate, and none at all: the TLS handshake fails.
    for dir in [&t.rogue, &t.anonymous] {
        let o = run("nbdinfo", &[&nbds_uri(&sock, dir)]);
        assert!(!o.status.success(), "{}: must be refused", dir.display());
        let o = qemu_io_tls(&sock, dir, &["read 0 4k"]);
        assert!(
            !o.status.success(),
            "{}: qemu-io must be refused",
            dir.display()
        );
    }
    // The right credentials still work after all that.
    let o = qemu_io_tls(&sock, &t.client, &["read -P 0x42 0 64k"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    nbd::stop(r);
    // verify-peer=off: a client without a certificate of its own is
    // served (it still checks the server's).
    let obj = format!("{},verify-peer=off", creds_object(&t.server, "server"));
    let r = nbd::serve(
        &sock,
        &["--object", &obj, "--tls-creds", "tls0", "-r", s(&img)],
    );
    let o = run("nbdinfo", &[&nbds_uri(&sock, &t.anonymous)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A client that trusts another CA does not trust this server (qemu
    // checks the server's name and chain; libnbd over a UNIX socket
    // skips the check).
    let o = qemu_io_tls(&sock, &t.rogue, &["read 0 4k"]);
    assert!(
        !o.status.success(),
        "a server signed by another CA must not be trusted"
    );
    nbd::stop(r);
}

/// TLS over TCP on loopback: the certificate names 127.0.0.1.
#[test]
fn tls_over_tcp() {
    nbd::ensure_libnbd();
    let d = tempdir();
    let t = tls_dirs(d.path());
    let img = d.path().join("disk.raw");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    let obj = creds_object(&t.server, "server");
    let r = nbd::start(
        &img,
        &[
            "-p",
            "0",
            "-t",
            "--object",
            &obj,
            "--tls-creds",
            "tls0",
            "-f",
            "raw",
            s(&img),
        ],
    );
    let log = r.log();
    let addr = log
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("{log}"))
        .to_string();
    let u = format!("nbds://{addr}/?tls-certificates={}", s(&t.client));
    let out = run_ok("nbdinfo", &["--json", &u]);
    assert!(out.contains("\"export-size\": 1048576"), "{out}");
    nbd::stop(r);
}

/// rimg's own client over TLS (`nbds+unix://...&tls-certificates=DIR`,
/// libnbd's form) against rimg-nbd and qemu-nbd: info and map as
/// qemu-img gives them in clear, a convert out and one back in; another
/// CA's credentials are refused.
#[test]
fn rimg_reads_and_writes_through_nbds() {
    let d = tempdir();
    let t = tls_dirs(d.path());
    let src = d.path().join("src.raw");
    rimg_tests::write_mixed_raw(&src, 8 << 20, 5);
    let obj = creds_object(&t.server, "server");
    for server in ["qemu", "rimg"] {
        let img = d.path().join(format!("{server}.qcow2"));
        run_ok("qemu-img", &["create", "-f", "qcow2", s(&img), "8M"]);
        let sock = d.path().join(format!("{server}.sock"));
        let common = [
            "--object",
            obj.as_str(),
            "--tls-creds",
            "tls0",
            "-f",
            "qcow2",
        ];
        let check = |sock: &Path| {
            let u = nbds_uri(sock, &t.client);
            let (code, _, err) = rimg_tests::rimg_in(
                d.path(),
                &["convert", "-n", "-f", "raw", "-O", "raw", s(&src), &u],
            );
            assert_eq!(code, Some(0), "{server}: convert in: {err}");
            let out = d.path().join(format!("{server}-out.qcow2"));
            let (code, _, err) = rimg_tests::rimg_in(
                d.path(),
                &["convert", "-f", "raw", "-O", "qcow2", &u, s(&out)],
            );
            assert_eq!(code, Some(0), "{server}: convert out: {err}");
            assert_qemu_compare_equal(&out, &src);
            let (code, info, err) = rimg_tests::rimg_in(d.path(), &["info", "-f", "raw", &u]);
            assert_eq!(code, Some(0), "{err}");
            assert!(info.contains("virtual size: 8 MiB"), "{info}");
            let (code, _, err) =
                rimg_tests::rimg_in(d.path(), &["info", &nbds_uri(sock, &t.rogue)]);
            assert_eq!(code, Some(1), "another CA's credentials must be refused");
            assert!(!err.is_empty());
        };
        if server == "qemu" {
            let mut args: Vec<&str> = common.to_vec();
            args.push(s(&img));
            let q = QemuNbd::start(&sock, &args);
            check(&q.socket);
        } else {
            let mut args = vec!["-k", s(&sock), "-t", "-e", "0"];
            args.extend(common);
            args.push(s(&img));
            let r = nbd::start(&sock, &args);
            check(&sock);
            nbd::stop(r);
        }
        assert_qemu_check_clean(&img);
        assert_qemu_compare_equal(&img, &src);
    }
}

/// What `rimg-nbd -L` or `qemu-nbd -L` did.
#[derive(Debug)]
struct Listed {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// `rimg-nbd -L` or `qemu-nbd -L` (`prog` "rimg" or "qemu") at `at` (`-k
/// SOCKET` or `-b ADDR -p PORT`) over TLS with the credentials `object`.
fn list_with(prog: &str, at: &[&str], object: &str, hostname: Option<&str>) -> Listed {
    let bin = match prog {
        "rimg" => rimg_tests::workspace_bin("rimg-nbd"),
        _ => "qemu-nbd".into(),
    };
    let mut args = vec!["-L", "--object", object, "--tls-creds", "tls0"];
    args.extend(at);
    if let Some(h) = hostname {
        args.extend(["--tls-hostname", h]);
    }
    let o = run(bin.to_str().unwrap(), &args);
    Listed {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).to_string(),
        stderr: String::from_utf8_lossy(&o.stderr).to_string(),
    }
}

/// `rimg-nbd --list` over TLS prints what `qemu-nbd --list` prints with
/// the same client credentials, through rimg-nbd and through qemu-nbd;
/// credentials of another CA are refused by both, and a server's
/// credentials are refused for listing as qemu-nbd refuses them.
#[test]
fn list_over_tls_as_qemu_nbd() {
    let d = tempdir();
    let t = tls_dirs(d.path());
    let img = d.path().join("disk.raw");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    let server_obj = creds_object(&t.server, "server");
    let list = |prog: &str, sock: &Path, creds: &Path, endpoint: &str| {
        let object = creds_object(creds, endpoint);
        let l = list_with(prog, &["-k", s(sock)], &object, Some("localhost"));
        (l.ok, l.stdout)
    };
    let common = ["--object", &server_obj, "--tls-creds", "tls0", "-f", "raw"];
    let sock = d.path().join("rimg.sock");
    let mut args = vec!["-k", s(&sock), "-t", "-e", "0", "-x", "disk"];
    args.extend(common);
    args.push(s(&img));
    let r = nbd::start(&sock, &args);
    let ours = list("rimg", &sock, &t.client, "client");
    let theirs = list("qemu", &sock, &t.client, "client");
    assert!(ours.0 && ours.1.contains(" export: 'disk'"), "{ours:?}");
    assert_eq!(ours, theirs, "through rimg-nbd");
    assert!(!list("rimg", &sock, &t.rogue, "client").0, "another CA's");
    assert!(!list("qemu", &sock, &t.rogue, "client").0, "another CA's");
    assert!(!list("rimg", &sock, &t.client, "server").0, "a server's");
    nbd::stop(r);

    let qsock = d.path().join("qemu.sock");
    let mut args = vec!["-x", "disk"];
    args.extend(common);
    args.push(s(&img));
    let q = QemuNbd::start(&qsock, &args);
    let ours = list("rimg", &qsock, &t.client, "client");
    let theirs = list("qemu", &qsock, &t.client, "client");
    drop(q);
    assert!(ours.0, "{ours:?}");
    assert_eq!(ours, theirs, "through qemu-nbd");
}

/// The server's certificate judged as QEMU's client judges it (its
/// chain and the name asked for, by default the address over TCP; over a
/// UNIX socket a name must be asked for; nothing with `verify-peer=off`
/// on the client's object): `rimg-nbd -L` against `qemu-nbd -L` with the
/// same objects on a server whose certificate names another host, over
/// a UNIX socket and TCP. Then rimg's `nbds` URIs, libnbd's form, where
/// over a UNIX socket no name means the chain only (libnbd checks
/// nothing there; QEMU has no such URI).
#[test]
fn server_certificates_judged_as_qemu_judges_them() {
    let d = tempdir();
    let t = tls_dirs(d.path());
    let img = d.path().join("disk.raw");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    // It asks for no client certificate: only the client's judgement of
    // the server is tested.
    let obj = format!("{},verify-peer=off", creds_object(&t.elsewhere, "server"));
    let sock = d.path().join("elsewhere.sock");
    let common = ["-r", "-t", "-e", "0", "-x", "disk", "--object", &obj];
    let common = [&common[..], &["--tls-creds", "tls0", "-f", "raw", s(&img)]].concat();
    let unix = nbd::start(&sock, &[&["-k", s(&sock)], &common[..]].concat());
    let tcp = nbd::start(&img, &[&["-p", "0"], &common[..]].concat());
    let log = tcp.log();
    let port = log
        .split_whitespace()
        .find_map(|w| w.strip_prefix("127.0.0.1:"))
        .unwrap_or_else(|| panic!("{log}"))
        .to_string();
    let k = ["-k", s(&sock)];
    let b = ["-b", "127.0.0.1", "-p", &port];
    let off = ",verify-peer=off";
    for (at, creds, extra, hostname, served) in [
        // No name to check over a UNIX socket: refused ("No hostname for
        // certificate validation") unless nothing is checked.
        (&k[..], &t.client, "", None, false),
        (&k, &t.client, off, None, true),
        (&k, &t.client, "", Some("nbd.invalid"), true),
        (&k, &t.client, "", Some("localhost"), false),
        (&k, &t.rogue, "", Some("nbd.invalid"), false),
        (&k, &t.rogue, off, None, true),
        (&k, &t.rogue, off, Some("localhost"), true),
        // Over TCP the name is the address unless one is asked for.
        (&b, &t.client, "", None, false),
        (&b, &t.client, "", Some("nbd.invalid"), true),
        (&b, &t.rogue, "", Some("nbd.invalid"), false),
        (&b, &t.rogue, off, None, true),
    ] {
        let object = format!("{}{extra}", creds_object(creds, "client"));
        let ours = list_with("rimg", at, &object, hostname);
        let theirs = list_with("qemu", at, &object, hostname);
        let case = format!("{at:?} {object} {hostname:?}: {ours:?} {theirs:?}");
        assert_eq!(
            (ours.ok, &ours.stdout),
            (theirs.ok, &theirs.stdout),
            "{case}"
        );
        assert_eq!(ours.ok, served, "{case}");
        if at == k && extra.is_empty() && hostname.is_none() {
            let why = "No hostname for certificate validation";
            assert!(
                ours.stderr.contains(why) && theirs.stderr.contains(why),
                "{case}"
            );
        }
    }
    let unix_uri = format!("nbds+unix:///disk?socket={}", s(&sock));
    let tcp_uri = format!("nbds://127.0.0.1:{port}/disk?");
    for (uri, creds, query, served) in [
        (&unix_uri, &t.client, "", true),
        (&unix_uri, &t.client, "&tls-hostname=localhost", false),
        (&unix_uri, &t.client, "&tls-hostname=nbd.invalid", true),
        (&unix_uri, &t.rogue, "", false),
        (&unix_uri, &t.rogue, "&tls-verify-peer=false", true),
        (&tcp_uri, &t.client, "", false),
        (&tcp_uri, &t.client, "&tls-hostname=nbd.invalid", true),
        (&tcp_uri, &t.rogue, "&tls-hostname=nbd.invalid", false),
        (&tcp_uri, &t.rogue, "&tls-verify-peer=false", true),
    ] {
        let u = format!("{uri}&tls-certificates={}{query}", s(creds));
        let (code, out, err) = rimg_tests::rimg_in(d.path(), &["info", "-f", "raw", &u]);
        let case = format!("{u}: {out}{err}");
        assert_eq!(code, Some(if served { 0 } else { 1 }), "{case}");
        assert_eq!(out.contains("virtual size: 1 MiB"), served, "{case}");
    }
    nbd::stop(unix);
    nbd::stop(tcp);
}
