//! TLS for the server, as qemu-nbd sets it up, from QEMU's `--object`:
//! `tls-creds-x509`, X.509 credentials from a directory with QEMU's file
//! names (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`), client
//! certificates checked against the CA unless `verify-peer=off`; or
//! `tls-creds-psk`, pre-shared keys from the directory's `keys.psk`
//! (OpenSSL's TLS-PSK: see `qcow2::nbd::tls`). With credentials the
//! server is in FORCEDTLS mode (§TLS support): no export is reached,
//! listed or described before `NBD_OPT_STARTTLS`.

use std::path::PathBuf;
use std::sync::Arc;

use openssl::ssl::SslContext;
use qcow2::nbd::tls::{provider, psk_server, read_certs, read_key, read_psk_keys, roots};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

/// Loaded server credentials.
#[derive(Debug, Clone)]
pub enum TlsCreds {
    X509 {
        config: Arc<ServerConfig>,
        /// `--tls-authz`: the only subject admitted, when client
        /// certificates are checked (see `authz`).
        authz: Option<String>,
    },
    Psk(SslContext),
}

/// QEMU's `tls-creds-x509` or `tls-creds-psk` object, as parsed from
/// `--object`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredsObject {
    pub id: String,
    pub dir: PathBuf,
    pub kind: Kind,
    /// `endpoint=client` (QEMU's default): credentials for `--list`;
    /// a server needs `endpoint=server`.
    pub client: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    X509 {
        verify_peer: bool,
    },
    /// `username` is the client's identity (QEMU's default `qemu`); a
    /// server takes every identity of its `keys.psk`.
    Psk {
        username: String,
    },
}

impl CredsObject {
    /// `tls-creds-x509,id=ID,dir=DIR[,endpoint=server|client][,verify-peer=on|off]`
    /// or `tls-creds-psk,id=ID,dir=DIR[,endpoint=...][,username=NAME]`.
    pub fn parse(spec: &str) -> Result<CredsObject, String> {
        let mut parts = spec.split(',');
        let psk = match parts.next() {
            Some("tls-creds-x509") => false,
            Some("tls-creds-psk") => true,
            other => {
                return Err(format!(
                    "--object {}: only tls-creds-x509 and tls-creds-psk objects are known",
                    other.unwrap_or("")
                ))
            }
        };
        let (mut id, mut dir, mut verify_peer, mut client) = (None, None, true, true);
        let mut username = None;
        for kv in parts {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--object: '{kv}' is not KEY=VALUE"))?;
            match k {
                "id" => id = Some(v.to_string()),
                "dir" => dir = Some(PathBuf::from(v)),
                "endpoint" => {
                    client = match v {
                        "server" => false,
                        "client" => true,
                        _ => {
                            return Err(format!(
                                "--object: endpoint={v}: expected server or client"
                            ))
                        }
                    }
                }
                "username" if psk => username = Some(v.to_string()),
                "verify-peer" => {
                    verify_peer = match v {
                        "on" | "yes" | "true" => true,
                        "off" | "no" | "false" => false,
                        _ => return Err(format!("--object: verify-peer={v}: expected on or off")),
                    }
                }
                _ => return Err(format!("--object: unknown key '{k}'")),
            }
        }
        let what = if psk {
            "tls-creds-psk"
        } else {
            "tls-creds-x509"
        };
        Ok(CredsObject {
            id: id.ok_or(format!("--object {what} needs id="))?,
            dir: dir.ok_or(format!("--object {what} needs dir="))?,
            kind: match psk {
                true => Kind::Psk {
                    username: username.unwrap_or_else(|| "qemu".into()),
                },
                false => Kind::X509 { verify_peer },
            },
            client,
        })
    }

    /// The object named `id` among `objects`, for the endpoint `client`
    /// or server (QEMU's messages).
    pub fn find<'a>(
        objects: &'a [CredsObject],
        id: &str,
        client: bool,
    ) -> Result<&'a CredsObject, String> {
        let o = objects
            .iter()
            .find(|o| o.id == id)
            .ok_or_else(|| format!("Failed to get TLS creds: No TLS credentials with id '{id}'"))?;
        if o.client != client {
            let want = if client { "client" } else { "server" };
            return Err(format!(
                "Failed to get TLS creds: Expecting TLS credentials with a {want} endpoint"
            ));
        }
        Ok(o)
    }
}

impl TlsCreds {
    /// Loads the server's credentials from `o.dir`: the keys of
    /// `keys.psk`, or the certificate chain and key, and with
    /// `verify_peer` the CA that client certificates must chain to.
    pub fn load(o: &CredsObject, authz: Option<String>) -> Result<TlsCreds, String> {
        let verify_peer = match o.kind {
            Kind::Psk { .. } => {
                let keys = read_psk_keys(&o.dir.join("keys.psk"))?;
                return Ok(TlsCreds::Psk(psk_server(keys)?));
            }
            Kind::X509 { verify_peer } => verify_peer,
        };
        let provider = Arc::new(provider());
        let chain = read_certs(&o.dir.join("server-cert.pem"))?;
        let key_path = o.dir.join("server-key.pem");
        let key = read_key(&key_path)?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = if verify_peer {
            let roots = roots(&o.dir.join("ca-cert.pem"))?;
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("client verifier: {e}"))?;
            builder.with_client_cert_verifier(v)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| format!("{}: {e}", o.dir.display()))?;
        Ok(TlsCreds::X509 {
            config: Arc::new(config),
            // As QEMU: checked only where certificates are.
            authz: authz.filter(|_| verify_peer),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_as_qemu_writes_them() {
        let o =
            CredsObject::parse("tls-creds-x509,id=tls0,dir=/etc/pki/nbd,endpoint=server").unwrap();
        assert_eq!(
            o,
            CredsObject {
                id: "tls0".into(),
                dir: "/etc/pki/nbd".into(),
                kind: Kind::X509 { verify_peer: true },
                client: false,
            }
        );
        let o = CredsObject::parse("tls-creds-x509,id=t,dir=d,endpoint=server,verify-peer=off");
        assert_eq!(o.unwrap().kind, Kind::X509 { verify_peer: false });
        // QEMU's default endpoint is the client's.
        assert!(
            CredsObject::parse("tls-creds-x509,id=t,dir=d,endpoint=client")
                .unwrap()
                .client
        );
        assert!(
            CredsObject::parse("tls-creds-x509,id=t,dir=d")
                .unwrap()
                .client
        );
        assert!(CredsObject::parse("tls-creds-x509,id=t,dir=d,endpoint=x").is_err());
        let both = [
            CredsObject::parse("tls-creds-x509,id=c,dir=d").unwrap(),
            CredsObject::parse("tls-creds-x509,id=s,dir=d,endpoint=server").unwrap(),
        ];
        assert_eq!(CredsObject::find(&both, "s", false).unwrap().id, "s");
        assert!(CredsObject::find(&both, "c", false)
            .unwrap_err()
            .contains("a server endpoint"));
        assert!(CredsObject::find(&both, "s", true)
            .unwrap_err()
            .contains("a client endpoint"));
        assert!(CredsObject::find(&both, "x", true)
            .unwrap_err()
            .contains("No TLS credentials"));
        let psk = |s: &str| CredsObject::parse(s).unwrap().kind;
        assert_eq!(
            psk("tls-creds-psk,id=t,dir=d"),
            Kind::Psk {
                username: "qemu".into()
            }
        );
        assert_eq!(
            psk("tls-creds-psk,id=t,dir=d,endpoint=client,username=alice"),
            Kind::Psk {
                username: "alice".into()
            }
        );
        assert!(CredsObject::parse("tls-creds-x509,id=t,dir=d,username=a").is_err());
        assert!(CredsObject::parse("secret,id=s,data=x").is_err());
        assert!(CredsObject::parse("tls-creds-x509,dir=d").is_err());
    }
}
