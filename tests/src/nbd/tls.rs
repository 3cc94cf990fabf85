//! TLS for NBD tests: credentials made per test (X.509 in QEMU's
//! directory layouts, PSK key files as psktool writes them) and the ways
//! each client names them: QEMU's `--object`/`--image-opts`, libnbd's
//! (and rimg's) `nbds` URIs.

use std::path::{Path, PathBuf};
use std::process::Output;

/// Credentials as a `tls-creds-*` object (always `id=tls0`) names them.
#[derive(Clone, Copy, Debug)]
pub enum Creds<'a> {
    /// A directory in QEMU's X.509 layout (see [`TlsDirs`]).
    X509(&'a Path),
    /// A directory holding `keys.psk`, and the identity a client gives
    /// (None: QEMU's default, `qemu`).
    Psk(&'a Path, Option<&'a str>),
}

impl Creds<'_> {
    /// QEMU's `--object` text for `endpoint` (`server` or `client`).
    pub fn object(&self, endpoint: &str) -> String {
        match self {
            Creds::X509(dir) => format!(
                "tls-creds-x509,id=tls0,dir={},endpoint={endpoint}",
                dir.display()
            ),
            Creds::Psk(dir, user) => {
                let mut o = format!(
                    "tls-creds-psk,id=tls0,dir={},endpoint={endpoint}",
                    dir.display()
                );
                if let (Some(u), "client") = (user, endpoint) {
                    o.push_str(&format!(",username={u}"));
                }
                o
            }
        }
    }

    /// qemu-io or qemu-img arguments that reach the default export on
    /// the UNIX socket `sock` as a client with these credentials (an
    /// X.509 client checks the server's name, `localhost`).
    pub fn target(&self, sock: &Path) -> Vec<String> {
        let hostname = match self {
            Creds::X509(_) => ",file.tls-hostname=localhost",
            Creds::Psk(..) => "",
        };
        vec![
            "--object".into(),
            self.object("client"),
            "--image-opts".into(),
            format!(
                "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},\
                 file.tls-creds=tls0{hostname}",
                sock.display()
            ),
        ]
    }

    /// libnbd's URI (rimg's client takes it too) for the default export
    /// on `sock`; a PSK identity is the URI's user.
    pub fn uri(&self, sock: &Path) -> String {
        match self {
            Creds::X509(dir) => format!(
                "nbds+unix:///?socket={}&tls-certificates={}",
                sock.display(),
                dir.display()
            ),
            Creds::Psk(dir, user) => format!(
                "nbds+unix://{}@/?socket={}&tls-psk-file={}",
                user.unwrap_or("qemu"),
                sock.display(),
                dir.join("keys.psk").display()
            ),
        }
    }

    /// qemu-io running `cmds` on the export on `sock` with these
    /// credentials (its output, whatever its status).
    pub fn qemu_io<S: AsRef<str>>(&self, sock: &Path, cmds: &[S]) -> Output {
        let mut args: Vec<String> = Vec::new();
        for c in cmds {
            args.extend(["-c".into(), c.as_ref().to_string()]);
        }
        args.extend(self.target(sock));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::run("qemu-io", &args)
    }
}

/// A PSK of `n` bytes in hex, different for each `seed`.
pub fn psk_key(seed: u8, n: usize) -> String {
    (0..n)
        .map(|i| format!("{:02x}", (i as u8).wrapping_mul(31) ^ seed))
        .collect()
}

/// `parent/name`, a credentials directory holding `keys.psk` with
/// `entries` (identity, hex key), psktool's format.
pub fn psk_dir(parent: &Path, name: &str, entries: &[(&str, &str)]) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let text: String = entries.iter().map(|(u, k)| format!("{u}:{k}\n")).collect();
    std::fs::write(dir.join("keys.psk"), text).unwrap();
    dir
}

/// TLS credentials made for a test, in QEMU's directory layouts.
pub struct TlsDirs {
    /// ca-cert.pem, server-cert.pem, server-key.pem.
    pub server: PathBuf,
    /// ca-cert.pem, client-cert.pem, client-key.pem.
    pub client: PathBuf,
    /// The same, signed by another CA (and trusting only it).
    pub rogue: PathBuf,
    /// The server's CA only: no client certificate.
    pub anonymous: PathBuf,
    /// A server's, signed by the CA but naming another host only
    /// (`nbd.invalid`).
    pub elsewhere: PathBuf,
    /// A client's, signed by the CA, whose subject has several
    /// attributes and characters RFC 4514 escapes (C=SP, L=R'lyeh,
    /// O="Cthulu, Dark+Lord", CN=client a), for `--tls-authz`.
    pub named: PathBuf,
}

/// Makes a CA, a server certificate (localhost, 127.0.0.1) and client
/// certificates under `dir`.
pub fn tls_dirs(dir: &Path) -> TlsDirs {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        (cert, key)
    };
    let leaf = |ca: &(rcgen::Certificate, KeyPair), names: Vec<String>, server: bool| {
        let key = KeyPair::generate().unwrap();
        // The common name is the first name (a server's host).
        let cn = names[0].clone();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = p.signed_by(&key, &ca.0, &ca.1).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let named = |ca: &(rcgen::Certificate, KeyPair)| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        for (t, v) in [
            (DnType::CountryName, "SP"),
            (DnType::LocalityName, "R'lyeh"),
            (DnType::OrganizationName, "Cthulu, Dark+Lord"),
            (DnType::CommonName, "client a"),
        ] {
            p.distinguished_name.push(t, v);
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &ca.0, &ca.1).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let good = ca("rimg test CA");
    let bad = ca("another CA");
    let write = |sub: &str, files: &[(&str, &str)]| {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).unwrap();
        for (name, text) in files {
            std::fs::write(d.join(name), text).unwrap();
        }
        d
    };
    let (sc, sk) = leaf(&good, vec!["localhost".into(), "127.0.0.1".into()], true);
    let (ec, ek) = leaf(&good, vec!["nbd.invalid".into()], true);
    let (cc, ck) = leaf(&good, vec!["client".into()], false);
    let (rc, rk) = leaf(&bad, vec!["client".into()], false);
    let (nc, nk) = named(&good);
    let ca_pem = good.0.pem();
    TlsDirs {
        server: write(
            "tls-server",
            &[
                ("ca-cert.pem", &ca_pem),
                ("server-cert.pem", &sc),
                ("server-key.pem", &sk),
            ],
        ),
        client: write(
            "tls-client",
            &[
                ("ca-cert.pem", &ca_pem),
                ("client-cert.pem", &cc),
                ("client-key.pem", &ck),
            ],
        ),
        rogue: write(
            "tls-rogue",
            &[
                ("ca-cert.pem", &bad.0.pem()),
                ("client-cert.pem", &rc),
                ("client-key.pem", &rk),
            ],
        ),
        anonymous: write("tls-anonymous", &[("ca-cert.pem", &ca_pem)]),
        elsewhere: write(
            "tls-elsewhere",
            &[
                ("ca-cert.pem", &ca_pem),
                ("server-cert.pem", &ec),
                ("server-key.pem", &ek),
            ],
        ),
        named: write(
            "tls-named",
            &[
                ("ca-cert.pem", &ca_pem),
                ("client-cert.pem", &nc),
                ("client-key.pem", &nk),
            ],
        ),
    }
}

/// For qemu-nbd and then rimg-nbd: a new qcow2 of `size` at
/// `dir/WHICH.qcow2`, served over TLS with the `server` credentials (and
/// `extra` arguments) on `dir/WHICH.sock` while `f(which, sock)` runs;
/// the image checks clean once the server has stopped.
fn each_peer(
    dir: &Path,
    server: Creds,
    size: &str,
    extra: &[&str],
    f: &mut dyn FnMut(&str, &Path),
) {
    let obj = server.object("server");
    for which in super::Peer::BOTH {
        let img = dir.join(format!("{which}.qcow2"));
        let img_s = img.to_str().unwrap();
        crate::run_ok("qemu-img", &["create", "-f", "qcow2", img_s, size]);
        let sock = dir.join(format!("{which}.sock"));
        let mut args = vec!["--object", &obj, "--tls-creds", "tls0", "-f", "qcow2"];
        args.extend(extra);
        args.push(img_s);
        let peer = super::Peer::start(which, &sock, &args);
        f(which, &sock);
        peer.stop();
        crate::assert_qemu_check_clean(&img);
    }
}

/// `writes` (qemu-io commands) through qemu-nbd and then rimg-nbd, each
/// serving a new 32 MiB qcow2 with the `server` credentials to a client
/// with `client`'s: qemu-io succeeds, `qemu-img map` and nbdinfo then
/// report the same through both, the images check clean, and rimg-nbd's
/// holds what the same writes put in a raw model.
pub fn same_service_as_qemu_nbd(dir: &Path, server: Creds, client: Creds, writes: &[&str]) {
    use crate::{assert_qemu_compare_equal, run_ok};
    super::ensure_libnbd();
    let mut seen = Vec::new();
    each_peer(
        dir,
        server,
        "32M",
        &["--discard=unmap"],
        &mut |which, sock| {
            let o = client.qemu_io(sock, writes);
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success() && !text.contains("failed"),
                "{which}-nbd: {text}{}",
                String::from_utf8_lossy(&o.stderr)
            );
            let mut map = vec!["map".to_string(), "--output=json".into()];
            map.extend(client.target(sock));
            let map: Vec<&str> = map.iter().map(String::as_str).collect();
            let json = run_ok("nbdinfo", &["--json", &client.uri(sock)]);
            let sock_s = sock.to_str().unwrap();
            seen.push((run_ok("qemu-img", &map), json.replace(sock_s, "SOCKET")));
        },
    );
    assert!(
        seen[0].1.contains("\"export-size\": 33554432"),
        "{}",
        seen[0].1
    );
    assert_eq!(
        seen[1], seen[0],
        "over TLS: rimg-nbd (left), qemu-nbd (right)"
    );
    let model = dir.join("model.raw");
    std::fs::write(&model, vec![0u8; 32 << 20]).unwrap();
    let mut args = vec!["-f", "raw"];
    for c in writes {
        args.extend(["-c", c]);
    }
    args.push(model.to_str().unwrap());
    run_ok("qemu-io", &args);
    assert_qemu_compare_equal(&dir.join("rimg.qcow2"), &model);
}

/// rimg's client through qemu-nbd and then rimg-nbd, each serving a new
/// 8 MiB qcow2 with the `server` credentials: `src` (8 MiB raw) converted
/// in, converted back out, `info`; both images check clean and equal
/// `src`. `also(which, sock)` adds checks while each server runs.
pub fn rimg_copies_through_both(
    dir: &Path,
    server: Creds,
    client: Creds,
    src: &Path,
    also: &dyn Fn(&str, &Path),
) {
    use crate::{assert_qemu_compare_equal, rimg_in};
    let src_s = src.to_str().unwrap();
    each_peer(dir, server, "8M", &[], &mut |which, sock| {
        let u = client.uri(sock);
        let convert_in = ["convert", "-n", "-f", "raw", "-O", "raw", src_s, &u];
        let (code, _, err) = rimg_in(dir, &convert_in);
        assert_eq!(code, Some(0), "{which}-nbd: convert in: {err}");
        let out = dir.join(format!("{which}-out.qcow2"));
        let convert_out = [
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &u,
            out.to_str().unwrap(),
        ];
        let (code, _, err) = rimg_in(dir, &convert_out);
        assert_eq!(code, Some(0), "{which}-nbd: convert out: {err}");
        assert_qemu_compare_equal(&out, src);
        let (code, info, err) = rimg_in(dir, &["info", "-f", "raw", &u]);
        assert_eq!(code, Some(0), "{which}-nbd: {err}");
        assert!(info.contains("virtual size: 8 MiB"), "{info}");
        also(which, sock);
    });
    for which in super::Peer::BOTH {
        assert_qemu_compare_equal(&dir.join(format!("{which}.qcow2")), src);
    }
}
