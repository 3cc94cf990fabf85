//! TLS with pre-shared keys: rimg-nbd with QEMU's `tls-creds-psk`
//! against qemu-io, qemu-img and nbdinfo (GnuTLS clients), and rimg's
//! client (`nbds://USER@HOST/EXPORT?tls-psk-file=FILE`, libnbd's form)
//! against qemu-nbd and rimg-nbd. Clients with the right key get what
//! they get in clear and what qemu-nbd gives them; a wrong key, an
//! unknown identity or no TLS at all is refused and learns nothing.

use std::path::{Path, PathBuf};

use rimg_tests::nbd::{self, QemuNbd};
use rimg_tests::{assert_qemu_check_clean, assert_qemu_compare_equal, run, run_ok, tempdir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A key of `n` bytes, different for each `seed`.
fn key(seed: u8, n: usize) -> String {
    (0..n)
        .map(|i| format!("{:02x}", (i as u8).wrapping_mul(31) ^ seed))
        .collect()
}

/// A credentials directory holding `keys.psk` with `entries`
/// (identity, hex key).
fn keys_dir(parent: &Path, name: &str, entries: &[(&str, &str)]) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let text: String = entries.iter().map(|(u, k)| format!("{u}:{k}\n")).collect();
    std::fs::write(dir.join("keys.psk"), text).unwrap();
    dir
}

/// The server's keys: alice's and qemu's (QEMU's default identity).
fn server_keys(parent: &Path) -> PathBuf {
    keys_dir(
        parent,
        "server",
        &[("alice", &key(1, 32)), ("qemu", &key(2, 48))],
    )
}

fn server_object(dir: &Path) -> String {
    format!("tls-creds-psk,id=tls0,dir={},endpoint=server", s(dir))
}

/// qemu-io or qemu-img arguments that reach the export on `sock` over
/// TLS as `user` with the keys in `dir`.
fn psk_target(sock: &Path, dir: &Path, user: &str) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-psk,id=tls0,dir={},endpoint=client,username={user}",
            s(dir)
        ),
        "--image-opts".into(),
        format!(
            "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},\
             file.tls-creds=tls0",
            s(sock)
        ),
    ]
}

fn qemu_io_psk(sock: &Path, dir: &Path, user: &str, cmds: &[&str]) -> std::process::Output {
    let mut args: Vec<String> = Vec::new();
    for c in cmds {
        args.extend(["-c".into(), c.to_string()]);
    }
    args.extend(psk_target(sock, dir, user));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &args)
}

/// libnbd's (and rimg's) URI for the export on `sock` as `user`.
fn psk_uri(sock: &Path, dir: &Path, user: &str) -> String {
    format!(
        "nbds+unix://{user}@/?socket={}&tls-psk-file={}",
        s(sock),
        s(&dir.join("keys.psk"))
    )
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
    nbd::ensure_libnbd();
    let d = tempdir();
    let keys = server_keys(d.path());
    // The client's file may hold other identities' keys too.
    let client = keys_dir(
        d.path(),
        "client",
        &[("bob", &key(9, 16)), ("alice", &key(1, 32))],
    );
    let model = d.path().join("model.raw");
    std::fs::write(&model, vec![0u8; 32 << 20]).unwrap();
    let obj = server_object(&keys);
    let mut seen = Vec::new();
    for server in ["qemu", "rimg"] {
        let img = d.path().join(format!("{server}.qcow2"));
        run_ok("qemu-img", &["create", "-f", "qcow2", s(&img), "32M"]);
        let sock = d.path().join(format!("{server}.sock"));
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
            let o = qemu_io_psk(sock, &client, "alice", &WRITES);
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                o.status.success() && !text.contains("failed"),
                "{server}: {text}{err}"
            );
            let mut map_args = vec!["map".to_string(), "--output=json".into()];
            map_args.extend(psk_target(sock, &client, "alice"));
            let map_args: Vec<&str> = map_args.iter().map(String::as_str).collect();
            let json = run_ok("nbdinfo", &["--json", &psk_uri(sock, &client, "alice")]);
            (
                run_ok("qemu-img", &map_args),
                json.replace(s(sock), "SOCKET"),
            )
        };
        if server == "qemu" {
            let mut args: Vec<&str> = common.to_vec();
            args.push(s(&img));
            let q = QemuNbd::start(&sock, &args);
            seen.push(report(&q.socket));
        } else {
            let mut args = vec!["-k", s(&sock), "-t", "-e", "0"];
            args.extend(common);
            args.push(s(&img));
            let r = nbd::start(&sock, &args);
            seen.push(report(&sock));
            nbd::stop(r);
        }
        assert_qemu_check_clean(&img);
    }
    assert!(
        seen[0].1.contains("\"export-size\": 33554432"),
        "{}",
        seen[0].1
    );
    assert_eq!(
        seen[1], seen[0],
        "over TLS-PSK: rimg-nbd (left), qemu-nbd (right)"
    );
    let mut args = vec!["-f", "raw"];
    for c in WRITES {
        args.extend(["-c", c]);
    }
    args.push(s(&model));
    run_ok("qemu-io", &args);
    assert_qemu_compare_equal(&d.path().join("rimg.qcow2"), &model);
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
    let wrong = keys_dir(d.path(), "wrong", &[("alice", &key(7, 32))]);
    let stranger = keys_dir(d.path(), "stranger", &[("mallory", &key(1, 32))]);
    for (dir, user) in [(&wrong, "alice"), (&stranger, "mallory")] {
        let o = qemu_io_psk(&sock, dir, user, &["read -P 0x42 0 64k"]);
        assert!(!o.status.success(), "qemu-io as {user} from {dir:?}");
        assert!(!String::from_utf8_lossy(&o.stdout).contains("read 65536"));
        let o = run("nbdinfo", &[&psk_uri(&sock, dir, user)]);
        assert!(!o.status.success(), "nbdinfo as {user} from {dir:?}");
        let (code, out, err) = rimg_tests::rimg_in(d.path(), &["info", &psk_uri(&sock, dir, user)]);
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
    let (code, _, err) = rimg_tests::rimg_in(d.path(), &["info", &psk_uri(&sock, &keys, "bob")]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no key for 'bob'"), "{err}");
    // The right key still works, under either of the server's identities,
    // in TLS 1.3 and (GnuTLS told to stop at 1.2) in TLS 1.2.
    for user in ["alice", "qemu"] {
        let o = qemu_io_psk(&sock, &keys, user, &["read -P 0x42 0 64k"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let mut args = vec!["-c".to_string(), "read -P 0x42 0 64k".into()];
    let mut target = psk_target(&sock, &keys, "alice");
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
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off",
        s(&t.server)
    );
    let common = ["--object", obj.as_str(), "--tls-creds", "tls0", "-f", "raw"];
    let refused = |sock: &Path| {
        let (code, out, err) =
            rimg_tests::rimg_in(d.path(), &["info", &psk_uri(sock, &keys, "alice")]);
        assert_eq!(code, Some(1), "a certificate instead of the key: {out}");
        assert!(err.contains("TLS handshake"), "{err}");
    };
    let sock = d.path().join("rimg.sock");
    let mut args = vec!["-k", s(&sock), "-t", "-e", "0"];
    args.extend(common);
    args.push(s(&img));
    let r = nbd::start(&sock, &args);
    refused(&sock);
    nbd::stop(r);
    let qsock = d.path().join("qemu.sock");
    let mut args: Vec<&str> = common.to_vec();
    args.push(s(&img));
    let q = QemuNbd::start(&qsock, &args);
    refused(&q.socket);
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
    let log = r.log();
    let addr = log
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("{log}"))
        .to_string();
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
    let obj = server_object(&keys);
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
            let u = psk_uri(sock, &keys, "qemu");
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

/// `rimg-nbd -L` with client PSK credentials lists what `qemu-nbd -L`
/// lists with the same object, against rimg-nbd; with a wrong key both
/// fail.
#[test]
fn list_over_psk_as_qemu_nbd() {
    let d = tempdir();
    let keys = server_keys(d.path());
    let wrong = keys_dir(d.path(), "wrong", &[("qemu", &key(5, 48))]);
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
        let object = format!("tls-creds-psk,id=tls0,dir={},endpoint=client", s(dir));
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
    let o = qemu_io_psk(&sock, &keys, "alice", &["read -P 0x42 0 64k"]);
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
        let (server, client, uri) = match kind {
            "x509" => (
                format!(
                    "tls-creds-x509,id=tls0,dir={},endpoint=server",
                    s(&t.server)
                ),
                format!(
                    "tls-creds-x509,id=tls0,dir={},endpoint=client",
                    s(&t.client)
                ),
                format!(
                    "nbds+unix:///?socket={}&tls-certificates={}",
                    s(&sock),
                    s(&t.client)
                ),
            ),
            _ => (
                server_object(&keys),
                format!("tls-creds-psk,id=tls0,dir={},endpoint=client", s(&keys)),
                psk_uri(&sock, &keys, "qemu"),
            ),
        };
        let srv = nbd::serve(
            &sock,
            &[
                "-e",
                "0",
                "--object",
                &server,
                "--tls-creds",
                "tls0",
                s(&img),
            ],
        );
        run_ok(
            "nbdcopy",
            &["--connections=4", "--requests=32", s(&src), &uri],
        );
        let back = d.path().join(format!("{kind}-back.raw"));
        run_ok("nbdcopy", &[&uri, s(&back)]);
        let conv = d.path().join(format!("{kind}-conv.qcow2"));
        let opts = format!(
            "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},\
             file.tls-creds=tls0,file.tls-hostname=localhost",
            s(&sock)
        );
        run_ok(
            "qemu-img",
            &[
                "convert",
                "--object",
                &client,
                "--image-opts",
                &opts,
                "-O",
                "qcow2",
                s(&conv),
            ],
        );
        nbd::stop(srv);
        assert_qemu_check_clean(&img);
        assert_qemu_check_clean(&conv);
        for out in [&img, &back, &conv] {
            assert_qemu_compare_equal(&src, out);
        }
    }
}
