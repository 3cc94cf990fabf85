//! Test support for NBD: `rimg-nbd` started as it runs in production
//! (seccomp in kill mode, stopped with SIGTERM), qemu-nbd as the peer,
//! and libnbd's tools (installed when missing).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::daemon::DaemonProcess;

/// A running `rimg-nbd`.
pub type Server = DaemonProcess;

/// `rimg-nbd` logging its "serving" line (info level: silent by
/// default, as qemu-nbd).
pub fn command() -> Command {
    let mut cmd = Command::new(crate::workspace_bin("rimg-nbd"));
    cmd.env("RUST_LOG", "info");
    cmd
}

/// Starts `rimg-nbd` with `args` and waits for its "serving" line.
pub fn start(socket: &Path, args: &[&str]) -> Server {
    let mut cmd = command();
    cmd.args(args);
    DaemonProcess::spawn(cmd, socket).unwrap_or_else(|e| panic!("rimg-nbd {args:?}: {e}"))
}

/// Starts a persistent `rimg-nbd` (`-t`) on the UNIX socket `socket`
/// with `args`.
pub fn serve(socket: &Path, args: &[&str]) -> Server {
    let path = socket.to_str().expect("UTF-8 socket path");
    let all: Vec<&str> = ["-k", path, "-t"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    start(socket, &all)
}

/// Stops a server with SIGTERM and asserts it exits 0 within 10 s.
pub fn stop(s: Server) -> String {
    let (st, log) = s.terminate_within(Duration::from_secs(10));
    let st = st.unwrap_or_else(|| panic!("rimg-nbd did not exit after SIGTERM:\n{log}"));
    assert!(st.success(), "rimg-nbd exited {st}:\n{log}");
    log
}

/// The NBD URI of `export` on the UNIX socket `socket`.
pub fn unix_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// Installs libnbd's tools (nbdinfo, nbdcopy) if missing.
pub fn ensure_libnbd() {
    crate::ensure_tool("nbdinfo", "libnbd-bin");
    crate::ensure_tool("nbdcopy", "libnbd-bin");
}

/// A qemu-nbd serving one image on a UNIX socket (forked: it is ready
/// when the command returns); killed and waited for when dropped.
pub struct QemuNbd {
    pid: i32,
    pub socket: PathBuf,
}

impl QemuNbd {
    /// `qemu-nbd --fork -t -e 0 -k SOCKET ARGS...` (ARGS end with the
    /// image).
    pub fn start(socket: &Path, args: &[&str]) -> QemuNbd {
        let (q, status, err) = Self::spawn(socket, args);
        assert!(status.success(), "qemu-nbd {args:?}: {err}");
        q
    }

    /// As [`start`](Self::start), for a server that warns as it starts
    /// (a probed raw image): `qemu-nbd --fork` then exits 1 though its
    /// server runs, as any message of the child counts as a failure
    /// there. Returns what it printed; the server must have written its
    /// pid file and be running.
    pub fn start_warning(socket: &Path, args: &[&str]) -> (QemuNbd, String) {
        let (q, _, err) = Self::spawn(socket, args);
        assert!(
            Path::new(&format!("/proc/{}", q.pid)).exists(),
            "qemu-nbd {args:?} is not running: {err}"
        );
        (q, err)
    }

    fn spawn(socket: &Path, args: &[&str]) -> (QemuNbd, std::process::ExitStatus, String) {
        let pidfile = socket.with_extension("pid");
        let o = Command::new("qemu-nbd")
            .arg("--fork")
            .arg("--pid-file")
            .arg(&pidfile)
            .args(["-t", "-e", "0", "-k"])
            .arg(socket)
            .args(args)
            .output()
            .expect("qemu-nbd");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("qemu-nbd {args:?}: no pid file ({e}): {err}"));
        let q = QemuNbd {
            pid: pid.trim().parse().expect("pid"),
            socket: socket.to_path_buf(),
        };
        (q, o.status, err)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid qemu-nbd wrote for itself; it is not
        // our child, so we poll until it is gone (it releases its image
        // locks on exit, which the next step of a test needs).
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{}", self.pid)).exists() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
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
