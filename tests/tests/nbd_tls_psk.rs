//! TLS with pre-shared keys: rimg-nbd with QEMU's `tls-creds-psk`
//! against qemu-io, qemu-img and nbdinfo (GnuTLS clients), and rimg's
//! client (`nbds://USER@HOST/EXPORT?tls-psk-file=FILE`, libnbd's form)
//! against qemu-nbd and rimg-nbd. Clients with the right key get what
//! they get in clear and what qemu-nbd gives them; a wrong key, an
//! unknown identity or no TLS at all is refused and learns nothing.

use std::path::{Path, PathBuf};

use rimg_tests::nbd::{self, psk_dir, psk_key as key, Creds, Peer};
use rimg_tests::{assert_qemu_check_clean, assert_qemu_compare_equal, run, run_ok, tempdir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The server's keys: alice's and qemu's (QEMU's default identity).
fn server_keys(parent: &Path) -> PathBuf {
    psk_dir(
        parent,
        "server",
        &[("alice", &key(1, 32)), ("qemu", &key(2, 48))],
    )
}

fn server_object(dir: &Path) -> String {
    Creds::Psk(dir, None).object("server")
}

/// A client as `user` with the keys in `dir`.
fn alias<'a>(dir: &'a Path, user: &'a str) -> Creds<'a> {
    Creds::Psk(dir, Some(user))
}

const WRITES: [&str; 5] = [
    "write -P 0x11 0 1M",
    "write -P 0x33 3000 5000",
    "write -f -P 0x44 8M 192k",
    "write -z 512k 256k",
    "discard 1M 64k",
];

/// The same writes, map and nbdinfo report through rimg-nbd as through
/// qemu-nbd, both with PSK credentials; the image checks clean and
/// holds what the writes put there.
#[test]
fn psk_clients_get_what_qemu_nbd_gives_them() {
    let d = tempdir();
    let keys = server_keys(d.path());
    // The client's file may hold other identities' keys too.
    let client = psk_dir(
        d.path(),
        "client",
        &[("bob", &key(9, 16)), ("alice", &key(1, 32))],
    );
    nbd::same_service_as_qemu_nbd(
        d.path(),
        Creds::Psk(&keys, None),
        alias(&client, "alice"),
        &WRITES,
    );
}

/// A wrong key, an identity the server does not know and a client in
/// clear are all refused, by qemu's client, libnbd's and rimg's, and
/// read nothing; the server (seccomp in kill mode, the default) serves
/// the right key after all of them and exits cleanly on SIGTERM.
#[test]
fn clients_without_the_right_key_are_refused() {
    nbd::ensure_libnbd();
    let d = tempdir();
    let keys = server_keys(d.path());
    let img = d.path().join("disk.qcow2");
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&img), "16M"]);
    rimg_tests::qemu_io(&img, &["write -P 0x42 0 64k"]);
    let sock = d.path().join("psk.sock");
    let obj = server_object(&keys);
    let r = nbd::serve(
        &sock,
        &["-e", "0", "--object", &obj, "--tls-creds", "tls0", s(&img)],
    );
    let wrong = psk_dir(d.path(), "wrong", &[("alice", &key(7, 32))]);
    let stranger = psk_dir(d.path(), "stranger", &[("mallory", &key(1, 32))]);
    for (dir, user) in [(&wrong, "alice"), (&stranger, "mallory")] {
        let o = alias(dir, user).qemu_io(&sock, &["read -P 0x42 0 64k"]);
        assert!(!o.status.success(), "qemu-io as {user} from {dir:?}");
        assert!(!String::from_utf8_lossy(&o.stdout).contains("read 65536"));
        let o = run("nbdinfo", &[&alias(dir, user).uri(&sock)]);
        assert!(!o.status.success(), "nbdinfo as {user} from {dir:?}");
        let u = alias(dir, user).uri(&sock);
        let (code, out, err) = rimg_tests::rimg_in(d.path(), &["info", &u]);
        assert_eq!(code, Some(1), "rimg info as {user}: {out}");
        assert!(err.contains("TLS"), "{err}");
    }
    // In clear: refused before anything is described.
    let plain = format!("nbd+unix:///?socket={}", s(&sock));
    let o = run("qemu-io", &["-f", "raw", "-c", "read 0 4k", &plain]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("TLS"), "{err}");
    // A key file without the identity asked for: the client says so
    // before it connects.
    let u = alias(&keys, "bob").uri(&sock);
    let (code, _, err) = rimg_tests::rimg_in(d.path(), &["info", &u]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no key for 'bob'"), "{err}");
    // The right key still works, under either of the server's identities,
    // in TLS 1.3 and (GnuTLS told to stop at 1.2) in TLS 1.2.
    for user in ["alice", "qemu"] {
        let o = alias(&keys, user).qemu_io(&sock, &["read -P 0x42 0 64k"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let mut args = vec!["-c".to_string(), "read -P 0x42 0 64k".into()];
    let mut target = alias(&keys, "alice").target(&sock);
    target[1].push_str(",priority=NORMAL:-VERS-TLS1.3");
    args.extend(target);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run("qemu-io", &args);
    assert!(
        o.status.success(),
        "TLS 1.2: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    nbd::stop(r);
}

/// A server that answers a PSK client with a certificate instead of
/// using the key (TLS 1.3 lets it; here an X.509 server that asks for no
/// client certificate, rimg-nbd's and qemu-nbd's) is refused by rimg's
/// client: it would otherwise talk to whoever holds any certificate.
#[test]
fn a_psk_client_accepts_no_certificate() {
    let d = tempdir();
    let t = nbd::tls_dirs(d.path());
    let keys = server_keys(d.path());
    let img = d.path().join("disk.raw");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    let obj = format!(
        "{},verify-peer=off",
        Creds::X509(&t.server).object("server")
    );
    let args = [
        "--object",
        obj.as_str(),
        "--tls-creds",
        "tls0",
        "-f",
        "raw",
        s(&img),
    ];
    let refused = |sock: &Path| {
        let (code, out, err) =
            rimg_tests::rimg_in(d.path(), &["info", &alias(&keys, "alice").uri(sock)]);
        assert_eq!(code, Some(1), "a certificate instead of the key: {out}");
        assert!(err.contains("TLS handshake"), "{err}");
    };
    for which in Peer::BOTH {
        let sock = d.path().join(format!("{which}.sock"));
        let peer = Peer::start(which, &sock, &args);
        refused(&sock);
        peer.stop();
    }
}

/// PSK over TCP on loopback, with libnbd's URI (the identity as the
/// URI's user) for nbdinfo and rimg.
#[test]
fn psk_over_tcp() {
    nbd::ensure_libnbd();
    let d = tempdir();
    let keys = server_keys(d.path());
    let img = d.path().join("disk.raw");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    let obj = server_object(&keys);
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
    let file = keys.join("keys.psk");
    let u = format!("nbds://alice@{addr}/?tls-psk-file={}", s(&file));
    let out = run_ok("nbdinfo", &["--json", &u]);
    assert!(out.contains("\"export-size\": 1048576"), "{out}");
    let (code, info, err) = rimg_tests::rimg_in(d.path(), &["info", "-f", "raw", &u]);
    assert_eq!(code, Some(0), "{err}");
    assert!(info.contains("virtual size: 1 MiB"), "{info}");
    let u = format!("nbds://mallory@{addr}/?tls-psk-file={}", s(&file));
    let (code, _, err) = rimg_tests::rimg_in(d.path(), &["info", &u]);
    assert_eq!(code, Some(1), "{err}");
    nbd::stop(r);
}

/// rimg's client over TLS-PSK against qemu-nbd and rimg-nbd: a convert
/// in through the export, one back out, info; the image checks clean
/// and equals the source.
#[test]
fn rimg_reads_and_writes_through_psk() {
    let d = tempdir();
    let keys = server_keys(d.path());
    let src = d.path().join("src.raw");
    rimg_tests::write_mixed_raw(&src, 8 << 20, 5);
    let creds = Creds::Psk(&keys, None);
    nbd::rimg_copies_through_both(d.path(), creds, creds, &src, &|_, _| {});
}

/// `rimg-nbd -L` with client PSK credentials lists what `qemu-nbd -L`
/// lists with the same object, against rimg-nbd; with a wrong key both
/// fail.
#[test]
fn list_over_psk_as_qemu_nbd() {
    let d = tempdir();
    let keys = server_keys(d.path());
    let wrong = psk_dir(d.path(), "wrong", &[("qemu", &key(5, 48))]);
    let img = d.path().join("disk.raw");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    let obj = server_object(&keys);
    let sock = d.path().join("rimg.sock");
    let r = nbd::start(
        &sock,
        &[
            "-k",
            s(&sock),
            "-t",
            "-e",
            "0",
            "-x",
            "disk",
            "--object",
            &obj,
            "--tls-creds",
            "tls0",
            "-f",
            "raw",
            s(&img),
        ],
    );
    let list = |bin: &str, dir: &Path| {
        // No username: QEMU's default identity, "qemu".
        let object = Creds::Psk(dir, None).object("client");
        let o = run(
            bin,
            &[
                "-L",
                "-k",
                s(&sock),
                "--object",
                &object,
                "--tls-creds",
                "tls0",
            ],
        );
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
        )
    };
    let rimg_nbd = rimg_tests::workspace_bin("rimg-nbd");
    let rimg_nbd = s(&rimg_nbd);
    let ours = list(rimg_nbd, &keys);
    assert!(ours.0 && ours.1.contains(" export: 'disk'"), "{ours:?}");
    assert_eq!(ours, list("qemu-nbd", &keys));
    assert!(!list(rimg_nbd, &wrong).0, "a wrong key");
    assert!(!list("qemu-nbd", &wrong).0, "a wrong key");
    nbd::stop(r);
}

/// Hostile clients at the PSK handshake: one that asks for TLS and then
/// stalls is cut off at the handshake limit (and the log says so), one
/// that sends garbage for a ClientHello is dropped; the server serves a
/// right client after both and exits cleanly.
#[test]
fn stalled_and_garbage_tls_handshakes_are_cut_off() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};
    let d = tempdir();
    let keys = server_keys(d.path());
    let img = d.path().join("disk.raw");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    let sock = d.path().join("psk.sock");
    let obj = server_object(&keys);
    let r = nbd::serve(
        &sock,
        &[
            "-e",
            "0",
            "--handshake-limit",
            "1",
            "--object",
            &obj,
            "--tls-creds",
            "tls0",
            "-f",
            "raw",
            s(&img),
        ],
    );
    // The fixed newstyle greeting, then NBD_OPT_STARTTLS and its ACK.
    let start_tls = || {
        let mut c = UnixStream::connect(&sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).unwrap();
        c.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend(5u32.to_be_bytes());
        opt.extend(0u32.to_be_bytes());
        c.write_all(&opt).unwrap();
        let mut reply = [0u8; 20];
        c.read_exact(&mut reply).unwrap();
        assert_eq!(
            reply[12..16],
            1u32.to_be_bytes(),
            "STARTTLS not acknowledged"
        );
        c
    };
    let mut stalled = start_tls();
    let t0 = Instant::now();
    let mut rest = Vec::new();
    let closed = stalled.read_to_end(&mut rest);
    assert!(closed.is_ok(), "the stalled client was not disconnected");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "cut off after {:?}, limit 1 s",
        t0.elapsed()
    );
    let mut garbage = start_tls();
    let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let _ = garbage.write_all(&junk);
    let mut rest = Vec::new();
    let _ = garbage.read_to_end(&mut rest);
    let o = alias(&keys, "alice").qemu_io(&sock, &["read -P 0x42 0 64k"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = nbd::stop(r);
    assert!(log.contains("within the limit"), "{log}");
}

/// nbdcopy (4 connections, 32 requests in flight each) writes a mixed
/// raw file into an empty qcow2 export over TLS, X.509 and PSK; nbdcopy
/// and qemu-img convert read it back out the same way; everything
/// compares equal and the images check clean.
#[test]
fn nbdcopy_and_qemu_img_convert_copy_over_tls() {
    nbd::ensure_libnbd();
    let d = tempdir();
    let t = nbd::tls_dirs(d.path());
    let keys = server_keys(d.path());
    let src = d.path().join("src.raw");
    rimg_tests::write_mixed_raw(&src, 48 << 20, 11);
    for kind in ["x509", "psk"] {
        let img = d.path().join(format!("{kind}.qcow2"));
        run_ok("qemu-img", &["create", "-f", "qcow2", s(&img), "48M"]);
        let sock = d.path().join(format!("{kind}.sock"));
        let (server, client) = match kind {
            "x509" => (Creds::X509(&t.server), Creds::X509(&t.client)),
            _ => (Creds::Psk(&keys, None), Creds::Psk(&keys, None)),
        };
        let object = server.object("server");
        let args = ["--object", &object, "--tls-creds", "tls0", s(&img)];
        let srv = Peer::start("rimg", &sock, &args);
        let uri = client.uri(&sock);
        run_ok(
            "nbdcopy",
            &["--connections=4", "--requests=32", s(&src), &uri],
        );
        let back = d.path().join(format!("{kind}-back.raw"));
        run_ok("nbdcopy", &[&uri, s(&back)]);
        let conv = d.path().join(format!("{kind}-conv.qcow2"));
        let mut args = vec!["convert".to_string()];
        args.extend(client.target(&sock));
        args.extend(["-O".into(), "qcow2".into(), s(&conv).into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_ok("qemu-img", &args);
        srv.stop();
        assert_qemu_check_clean(&img);
        assert_qemu_check_clean(&conv);
        for out in [&img, &back, &conv] {
            assert_qemu_compare_equal(&src, out);
        }
    }
}
