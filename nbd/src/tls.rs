//! TLS for the server, as qemu-nbd sets it up: X.509 credentials from a
//! directory with QEMU's file names (`ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`), given as QEMU's `--object tls-creds-x509,...`, and
//! client certificates checked against the CA unless `verify-peer=off`.
//! With credentials the server is in FORCEDTLS mode (§TLS support): no
//! export is reached, listed or described before `NBD_OPT_STARTTLS`.
//!
//! Pre-shared keys (QEMU's `tls-creds-psk`) are not offered: rustls has
//! no TLS-PSK.

use std::path::PathBuf;
use std::sync::Arc;

use qcow2::nbd::tls::{provider, read_certs, read_key, roots};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

/// Loaded server credentials.
#[derive(Debug, Clone)]
pub struct TlsCreds {
    pub config: Arc<ServerConfig>,
}

/// QEMU's `tls-creds-x509` object, as parsed from `--object`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Object {
    pub id: String,
    pub dir: PathBuf,
    pub verify_peer: bool,
    /// `endpoint=client` (QEMU's default): credentials for `--list`;
    /// a server needs `endpoint=server`.
    pub client: bool,
}

impl X509Object {
    /// `tls-creds-x509,id=ID,dir=DIR[,endpoint=server|client][,verify-peer=on|off]`.
    pub fn parse(spec: &str) -> Result<X509Object, String> {
        let mut parts = spec.split(',');
        match parts.next() {
            Some("tls-creds-x509") => {}
            Some("tls-creds-psk") => {
                return Err("tls-creds-psk: pre-shared keys are not supported (rustls has no TLS-PSK); use tls-creds-x509".into())
            }
            other => {
                return Err(format!(
                    "--object {}: only tls-creds-x509 objects are known",
                    other.unwrap_or("")
                ))
            }
        }
        let (mut id, mut dir, mut verify_peer, mut client) = (None, None, true, true);
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
        Ok(X509Object {
            id: id.ok_or("--object tls-creds-x509 needs id=")?,
            dir: dir.ok_or("--object tls-creds-x509 needs dir=")?,
            verify_peer,
            client,
        })
    }

    /// The object named `id` among `objects`, for the endpoint `client`
    /// or server (QEMU's messages).
    pub fn find<'a>(
        objects: &'a [X509Object],
        id: &str,
        client: bool,
    ) -> Result<&'a X509Object, String> {
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
    /// Loads the server's certificate chain and key from `o.dir`, and
    /// with `verify_peer` the CA that client certificates must chain to.
    pub fn load(o: &X509Object) -> Result<TlsCreds, String> {
        let provider = Arc::new(provider());
        let chain = read_certs(&o.dir.join("server-cert.pem"))?;
        let key_path = o.dir.join("server-key.pem");
        let key = read_key(&key_path)?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = if o.verify_peer {
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
        Ok(TlsCreds {
            config: Arc::new(config),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_as_qemu_writes_them() {
        let o =
            X509Object::parse("tls-creds-x509,id=tls0,dir=/etc/pki/nbd,endpoint=server").unwrap();
        assert_eq!(
            o,
            X509Object {
                id: "tls0".into(),
                dir: "/etc/pki/nbd".into(),
                verify_peer: true,
                client: false,
            }
        );
        let o = X509Object::parse("tls-creds-x509,id=t,dir=d,endpoint=server,verify-peer=off");
        assert!(!o.unwrap().verify_peer);
        // QEMU's default endpoint is the client's.
        assert!(
            X509Object::parse("tls-creds-x509,id=t,dir=d,endpoint=client")
                .unwrap()
                .client
        );
        assert!(
            X509Object::parse("tls-creds-x509,id=t,dir=d")
                .unwrap()
                .client
        );
        assert!(X509Object::parse("tls-creds-x509,id=t,dir=d,endpoint=x").is_err());
        let both = [
            X509Object::parse("tls-creds-x509,id=c,dir=d").unwrap(),
            X509Object::parse("tls-creds-x509,id=s,dir=d,endpoint=server").unwrap(),
        ];
        assert_eq!(X509Object::find(&both, "s", false).unwrap().id, "s");
        assert!(X509Object::find(&both, "c", false)
            .unwrap_err()
            .contains("a server endpoint"));
        assert!(X509Object::find(&both, "s", true)
            .unwrap_err()
            .contains("a client endpoint"));
        assert!(X509Object::find(&both, "x", true)
            .unwrap_err()
            .contains("No TLS credentials"));
        assert!(X509Object::parse("tls-creds-psk,id=t,dir=d")
            .unwrap_err()
            .contains("PSK"));
        assert!(X509Object::parse("secret,id=s,data=x").is_err());
        assert!(X509Object::parse("tls-creds-x509,dir=d").is_err());
    }
}
