//! NBD addresses as QEMU accepts them for a filename: the URI forms
//! `nbd://HOST[:PORT]/EXPORT`, `nbd+tcp://...` and
//! `nbd+unix:///EXPORT?socket=PATH`, and the legacy
//! `nbd:HOST:PORT[:exportname=NAME]` and `nbd:unix:PATH[:exportname=NAME]`.
//! With TLS, libnbd's forms: `nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR`
//! and `nbds+unix:///EXPORT?socket=PATH&tls-certificates=DIR`, where DIR
//! holds `ca-cert.pem` (and `client-cert.pem`, `client-key.pem` for a
//! server that asks for a client certificate), QEMU's and libnbd's file
//! names; `tls-hostname=NAME` sets the name the server's certificate
//! must carry (by default the host; over a UNIX socket none, and only
//! the chain is checked), and `tls-verify-peer=false` trusts any server.

use std::path::PathBuf;

use nbd_proto::consts::DEFAULT_PORT;

/// Where an NBD export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub server: Server,
    pub export: String,
    /// TLS (an `nbds` scheme), with what it needs.
    pub tls: Option<TlsParams>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub creds: Credentials,
    /// The name the server's certificate must carry; `None` checks its
    /// chain only (QEMU's client over a UNIX socket).
    pub hostname: Option<String>,
    /// Whether the server's certificate is checked at all (QEMU's
    /// `verify-peer`, libnbd's `tls-verify-peer`).
    pub verify_peer: bool,
}

/// What the client proves itself and the server with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// X.509: the directory of `ca-cert.pem` (and a client certificate).
    Certificates(PathBuf),
    /// A pre-shared key: QEMU's `keys.psk` file (libnbd's
    /// `tls-psk-file`), and the identity whose key is used.
    Psk { file: PathBuf, username: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// The name QEMU gives the export at `name` once opened (its nbd
/// driver's refresh_filename): the port always, the export only when it
/// has one. A name that does not parse is shown as given.
pub fn display_name(name: &str) -> String {
    match parse(name) {
        Ok(Address {
            server: Server::Unix(p),
            export,
            tls: None,
        }) => match export.is_empty() {
            true => format!("nbd+unix://?socket={}", p.display()),
            false => format!("nbd+unix:///{export}?socket={}", p.display()),
        },
        Ok(Address {
            server: Server::Tcp { host, port },
            export,
            tls: None,
        }) => match export.is_empty() {
            true => format!("nbd://{host}:{port}"),
            false => format!("nbd://{host}:{port}/{export}"),
        },
        // QEMU has no nbds names: shown as given.
        _ => name.to_string(),
    }
}

/// Whether `name` is meant as an NBD address rather than a file.
pub fn is_nbd(name: &str) -> bool {
    [
        "nbd:",
        "nbd+tcp:",
        "nbd+unix:",
        "nbds:",
        "nbds+tcp:",
        "nbds+unix:",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// The user's login name ($LOGNAME, else $USER), libnbd's default
/// TLS-PSK identity.
fn login_name() -> Option<String> {
    ["LOGNAME", "USER"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|n| !n.is_empty()))
}

/// Parses an NBD address; the error says what is wrong with it.
pub fn parse(name: &str) -> Result<Address, String> {
    let tls = name.starts_with("nbds");
    let query_of = |q: &str, key: &str| -> Result<Option<String>, String> {
        q.split('&')
            .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(percent_decode)
            .transpose()
    };
    // `user` is the URI's user info (libnbd's TLS-PSK username).
    let tls_params =
        |q: &str, host: Option<&str>, user: Option<&str>| -> Result<Option<TlsParams>, String> {
            if !tls {
                return Ok(None);
            }
            // libnbd's keys: a PSK file with the URI's username (the login
            // name without one), else a certificate directory.
            let creds = match (
                query_of(q, "tls-psk-file")?,
                query_of(q, "tls-certificates")?,
            ) {
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "{name}: tls-psk-file and tls-certificates exclude each other"
                    ))
                }
                (Some(file), None) => Credentials::Psk {
                    file: file.into(),
                    username: match user {
                        Some(u) => percent_decode(u)?,
                        None => login_name().ok_or_else(|| {
                            format!("{name}: tls-psk-file needs a USER@ in the URI")
                        })?,
                    },
                },
                (None, Some(dir)) => Credentials::Certificates(dir.into()),
                (None, None) => {
                    return Err(format!(
                        "{name}: nbds needs tls-certificates=DIR or tls-psk-file=FILE"
                    ))
                }
            };
            let verify_peer = match query_of(q, "tls-verify-peer")?.as_deref() {
                None | Some("true" | "on" | "1") => true,
                Some("false" | "off" | "0") => false,
                Some(v) => {
                    return Err(format!(
                        "{name}: tls-verify-peer={v}: expected true or false"
                    ))
                }
            };
            Ok(Some(TlsParams {
                creds,
                hostname: query_of(q, "tls-hostname")?.or_else(|| host.map(str::to_string)),
                verify_peer,
            }))
        };
    if let Some(rest) = name
        .strip_prefix("nbd+unix://")
        .or_else(|| name.strip_prefix("nbds+unix://"))
    {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        // An authority (nothing, or a user's `USER@`) before the path.
        let (auth, export) = path.split_once('/').unwrap_or(("", path));
        let user = auth.strip_suffix('@');
        if !auth.is_empty() && user.is_none_or(|u| u.contains('@')) {
            return Err(format!("{name}: nbd+unix takes no host"));
        }
        let socket = query_of(query, "socket")?
            .ok_or_else(|| format!("{name}: nbd+unix needs ?socket=PATH"))?;
        return Ok(Address {
            server: Server::Unix(socket.into()),
            export: percent_decode(export)?,
            tls: tls_params(query, None, user)?,
        });
    }
    if let Some(rest) = ["nbd://", "nbd+tcp://", "nbds://", "nbds+tcp://"]
        .iter()
        .find_map(|p| name.strip_prefix(p))
    {
        let (auth, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        if !tls && !query.is_empty() {
            return Err(format!("{name}: nbd over TCP takes no query"));
        }
        let (user, auth) = match auth.rsplit_once('@') {
            Some((u, a)) => (Some(u), a),
            None => (None, auth),
        };
        let (host, port) = host_port(auth).ok_or_else(|| format!("{name}: bad host or port"))?;
        let tls = tls_params(query, Some(&host), user)?;
        return Ok(Address {
            server: Server::Tcp { host, port },
            export: percent_decode(path)?,
            tls,
        });
    }
    if let Some(rest) = name.strip_prefix("nbd:") {
        let (main, export) = match rest.split_once(":exportname=") {
            Some((m, e)) => (m, e.to_string()),
            None => (rest, String::new()),
        };
        if let Some(path) = main.strip_prefix("unix:") {
            return Ok(Address {
                server: Server::Unix(path.into()),
                export,
                tls: None,
            });
        }
        let (host, port) = host_port(main).ok_or_else(|| format!("{name}: bad host or port"))?;
        return Ok(Address {
            server: Server::Tcp { host, port },
            export,
            tls: None,
        });
    }
    Err(format!("{name}: not an NBD address"))
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(r) = s.strip_prefix('[') {
        let (h, after) = r.split_once(']')?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return None,
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => DEFAULT_PORT,
    };
    Some((host.to_string(), port))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in '{s}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> Address {
        Address {
            server: Server::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
            tls: None,
        }
    }

    #[test]
    fn the_forms_qemu_accepts() {
        assert_eq!(parse("nbd://localhost/"), Ok(tcp("localhost", 10809, "")));
        assert_eq!(parse("nbd://h:1234/disk"), Ok(tcp("h", 1234, "disk")));
        assert_eq!(parse("nbd+tcp://[::1]:99/a%20b"), Ok(tcp("::1", 99, "a b")));
        assert_eq!(parse("nbd:h:77:exportname=x"), Ok(tcp("h", 77, "x")));
        assert_eq!(
            parse("nbd+unix:///golden?socket=/run/n.sock"),
            Ok(Address {
                server: Server::Unix("/run/n.sock".into()),
                export: "golden".into(),
                tls: None
            })
        );
        assert_eq!(
            parse("nbd:unix:/tmp/s:exportname=e"),
            Ok(Address {
                server: Server::Unix("/tmp/s".into()),
                export: "e".into(),
                tls: None
            })
        );
        assert!(is_nbd("nbd+unix:///?socket=x") && !is_nbd("nbd.qcow2"));
        let a = parse("nbds://h:5/e?tls-certificates=/pki").unwrap();
        assert_eq!(
            a.tls,
            Some(TlsParams {
                creds: Credentials::Certificates("/pki".into()),
                hostname: Some("h".into()),
                verify_peer: true,
            })
        );
        let a = parse("nbds+unix:///e?socket=/s&tls-certificates=/p&tls-hostname=srv").unwrap();
        assert_eq!(a.server, Server::Unix("/s".into()));
        assert_eq!(a.tls.unwrap().hostname.as_deref(), Some("srv"));
        let a = parse("nbds+unix:///?socket=/s&tls-certificates=/p&tls-verify-peer=false");
        let tls = a.unwrap().tls.unwrap();
        assert_eq!((tls.hostname, tls.verify_peer), (None, false));
        let a = parse("nbds://alice@h:5/e?tls-psk-file=/k.psk").unwrap();
        assert_eq!(
            (a.server, a.tls.unwrap().creds),
            (
                Server::Tcp {
                    host: "h".into(),
                    port: 5
                },
                Credentials::Psk {
                    file: "/k.psk".into(),
                    username: "alice".into()
                }
            )
        );
        let a = parse("nbds+unix://b%40b@/e?socket=/s&tls-psk-file=/k").unwrap();
        assert_eq!(a.export, "e");
        assert!(
            matches!(a.tls.unwrap().creds, Credentials::Psk { username, .. } if username == "b@b")
        );
    }

    #[test]
    fn bad_addresses_say_why() {
        for bad in [
            "nbd+unix:///x",
            "nbd://:80/x",
            "nbd://h:port/x",
            "nbd://h/x?socket=y",
            "nbds://h/x",
            "nbds+unix:///x?socket=/s",
            "nbds+unix:///x?socket=/s&tls-certificates=/p&tls-verify-peer=maybe",
            "nbds://h/x?tls-certificates=/p&tls-psk-file=/k",
            "nbd+unix://host/x?socket=/s",
            "nbd://h/%zz",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
