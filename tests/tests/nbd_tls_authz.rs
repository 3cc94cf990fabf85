//! `--tls-authz` with an `authz-simple` object, as qemu-nbd takes it: an
//! X.509 client is admitted only if its certificate's subject, as the
//! string GnuTLS makes of it for QEMU, is the object's identity. The
//! reference string is qemu-nbd's own (from its denial message); then
//! rimg-nbd and qemu-nbd, given the same objects, must admit and refuse
//! the same clients, one of them with a subject of several attributes,
//! characters that need escaping and a country GnuTLS shows in hex.

use std::path::Path;

use rimg_tests::nbd::{tls_dirs, Creds, Peer};
use rimg_tests::{run, tempdir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// qemu-io reading the export on `sock` with the X.509 client
/// credentials in `dir`.
fn qemu_io_tls(sock: &Path, dir: &Path) -> std::process::Output {
    Creds::X509(dir).qemu_io(sock, &["read -P 0x42 0 64k"])
}

#[test]
fn tls_authz_admits_the_named_subject_only_as_qemu_nbd_does() {
    let d = tempdir();
    let t = tls_dirs(d.path());
    let img = d.path().join("disk.raw");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    let creds = Creds::X509(&t.server).object("server");
    // QEMU's option syntax: a comma in a value is doubled.
    let authz = |identity: &str| {
        format!(
            "authz-simple,id=authz0,identity={}",
            identity.replace(',', ",,")
        )
    };
    let dn = qemu_nbd_subject(d.path(), &img, &creds, &authz("nobody"), &t.named);
    // Four attributes, ',' and '+' escaped, the country (a UTF8String,
    // not text to GnuTLS there) in hex.
    assert_eq!(dn.matches('=').count(), 4, "{dn}");
    assert!(
        dn.contains("O=Cthulu\\, Dark\\+Lord") && dn.contains("C=#"),
        "{dn}"
    );
    for (identity, named_in, plain_in) in [
        (dn.clone(), true, false),
        ("CN=client".to_string(), false, true),
        ("CN=nobody".to_string(), false, false),
    ] {
        let object = authz(&identity);
        let args = [
            "--object",
            creds.as_str(),
            "--object",
            object.as_str(),
            "--tls-creds",
            "tls0",
            "--tls-authz",
            "authz0",
            "-f",
            "raw",
            s(&img),
        ];
        for server in Peer::BOTH {
            let sock = d.path().join(format!("{server}.sock"));
            let peer = Peer::start(server, &sock, &args);
            for (dir, admitted) in [(&t.named, named_in), (&t.client, plain_in)] {
                let o = qemu_io_tls(&sock, dir);
                assert_eq!(
                    o.status.success(),
                    admitted,
                    "{server}-nbd, identity {identity:?}, client {}: {}",
                    dir.display(),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            let log = peer.stop();
            if server == "rimg" && !named_in {
                assert!(
                    log.contains(&format!("authz check for {dn} is denied")),
                    "{log}"
                );
            }
        }
    }
    // Without --tls-creds, or naming no object: refused at the start.
    let bin = rimg_tests::workspace_bin("rimg-nbd");
    let object = authz(&dn);
    for (args, want) in [
        (
            vec!["--object", object.as_str(), "--tls-authz", "authz0"],
            "--tls-authz is not permitted without --tls-creds",
        ),
        (
            vec![
                "--object",
                creds.as_str(),
                "--tls-creds",
                "tls0",
                "--tls-authz",
                "authz9",
            ],
            "No authorization object with id 'authz9'",
        ),
    ] {
        let mut a = vec!["-k", "/nonexistent/x.sock"];
        a.extend(args);
        a.push(s(&img));
        let o = run(s(&bin), &a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{err}");
    }
}

/// The subject qemu-nbd sees in `client`'s certificate: it denies it
/// (its identity being another) and says whom.
fn qemu_nbd_subject(dir: &Path, img: &Path, creds: &str, authz: &str, client: &Path) -> String {
    let sock = dir.join("probe.sock");
    let log = dir.join("probe.log");
    let mut q = std::process::Command::new("qemu-nbd")
        .args(["-k", s(&sock), "-t", "-f", "raw", "-r", "--object", creds])
        .args([
            "--object",
            authz,
            "--tls-creds",
            "tls0",
            "--tls-authz",
            "authz0",
        ])
        .arg(img)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let up = std::time::Instant::now();
    // Listening once a connection goes through (-t: it stays up).
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(up.elapsed().as_secs() < 10, "qemu-nbd did not start");
        // Another process's socket: there is nothing to wait on.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = qemu_io_tls(&sock, client);
    assert!(!o.status.success(), "qemu-nbd must deny it");
    let _ = q.kill();
    let _ = q.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let (_, rest) = text
        .split_once("authz check for ")
        .unwrap_or_else(|| panic!("qemu-nbd's log: {text}"));
    rest.split(" is denied").next().unwrap().to_string()
}
