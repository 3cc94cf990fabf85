//! rimg-nbd with TLS (X.509 credentials as qemu-nbd takes them):
//! clients with the right credentials get the same service as in clear,
//! and the same answers qemu-nbd gives with the same credentials; clients
//! without them (no TLS, another CA, no client certificate) are refused
//! and learn nothing about the exports.

use std::path::Path;

use rimg_tests::nbd::{self, tls_dirs, Creds, Peer};
use rimg_tests::{run, run_ok, tempdir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
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
    let d = tempdir();
    let t = tls_dirs(d.path());
    nbd::same_service_as_qemu_nbd(
        d.path(),
        Creds::X509(&t.server),
        Creds::X509(&t.client),
        &WRITES,
    );
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
    let obj = Creds::X509(&t.server).object("server");
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
        let o = run("nbdinfo", &[&Creds::X509(dir).uri(&sock)]);
        assert!(!o.status.success(), "{}: must be refused", dir.display());
        let o = Creds::X509(dir).qemu_io(&sock, &["read 0 4k"]);
        assert!(
            !o.status.success(),
            "{}: qemu-io must be refused",
            dir.display()
        );
    }
    // The right credentials still work after all that.
    let o = Creds::X509(&t.client).qemu_io(&sock, &["read -P 0x42 0 64k"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    nbd::stop(r);
    // verify-peer=off: a client without a certificate of its own is
    // served (it still checks the server's).
    let obj = format!(
        "{},verify-peer=off",
        Creds::X509(&t.server).object("server")
    );
    let r = nbd::serve(
        &sock,
        &["--object", &obj, "--tls-creds", "tls0", "-r", s(&img)],
    );
    let o = run("nbdinfo", &[&Creds::X509(&t.anonymous).uri(&sock)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A client that trusts another CA does not trust this server (qemu
    // checks the server's name and chain; libnbd over a UNIX socket
    // skips the check).
    let o = Creds::X509(&t.rogue).qemu_io(&sock, &["read 0 4k"]);
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
    let obj = Creds::X509(&t.server).object("server");
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
    let addr = nbd::loopback_address(&r);
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
    let rogue = |which: &str, sock: &Path| {
        let u = Creds::X509(&t.rogue).uri(sock);
        let (code, _, err) = rimg_tests::rimg_in(d.path(), &["info", &u]);
        assert_eq!(code, Some(1), "{which}-nbd: another CA's credentials");
        assert!(!err.is_empty());
    };
    nbd::rimg_copies_through_both(
        d.path(),
        Creds::X509(&t.server),
        Creds::X509(&t.client),
        &src,
        &rogue,
    );
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
    let server_obj = Creds::X509(&t.server).object("server");
    let list = |prog: &str, sock: &Path, creds: &Path, endpoint: &str| {
        let object = Creds::X509(creds).object(endpoint);
        let l = list_with(prog, &["-k", s(sock)], &object, Some("localhost"));
        (l.ok, l.stdout)
    };
    let args = [
        "-x",
        "disk",
        "--object",
        &server_obj,
        "--tls-creds",
        "tls0",
        "-f",
        "raw",
        s(&img),
    ];
    let sock = d.path().join("rimg.sock");
    let r = Peer::start("rimg", &sock, &args);
    let ours = list("rimg", &sock, &t.client, "client");
    let theirs = list("qemu", &sock, &t.client, "client");
    assert!(ours.0 && ours.1.contains(" export: 'disk'"), "{ours:?}");
    assert_eq!(ours, theirs, "through rimg-nbd");
    assert!(!list("rimg", &sock, &t.rogue, "client").0, "another CA's");
    assert!(!list("qemu", &sock, &t.rogue, "client").0, "another CA's");
    assert!(!list("rimg", &sock, &t.client, "server").0, "a server's");
    r.stop();

    let qsock = d.path().join("qemu.sock");
    let q = Peer::start("qemu", &qsock, &args);
    let ours = list("rimg", &qsock, &t.client, "client");
    let theirs = list("qemu", &qsock, &t.client, "client");
    q.stop();
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
    let obj = format!(
        "{},verify-peer=off",
        Creds::X509(&t.elsewhere).object("server")
    );
    let sock = d.path().join("elsewhere.sock");
    let common = ["-r", "-t", "-e", "0", "-x", "disk", "--object", &obj];
    let common = [&common[..], &["--tls-creds", "tls0", "-f", "raw", s(&img)]].concat();
    let unix = nbd::start(&sock, &[&["-k", s(&sock)], &common[..]].concat());
    let tcp = nbd::start(&img, &[&["-p", "0"], &common[..]].concat());
    let addr = nbd::loopback_address(&tcp);
    let port = addr.trim_start_matches("127.0.0.1:");
    let k = ["-k", s(&sock)];
    let b = ["-b", "127.0.0.1", "-p", port];
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
        let object = format!("{}{extra}", Creds::X509(creds).object("client"));
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
