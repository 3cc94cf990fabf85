//! `--object`: the user-creatable objects qemu-img takes. rimg knows
//! `secret` (passwords of encrypted images: `data=` or `file=`, with
//! `format=raw|base64`); other types are refused by name.

use std::collections::HashMap;
use std::sync::OnceLock;

use qcow2::crypto::{CipherMode, HashAlg, IvGen};
use qcow2::encrypt::{EncryptFormat, Secret};
use qcow2::luks::LuksParams;

use crate::CliError;

static SECRETS: OnceLock<HashMap<String, Vec<u8>>> = OnceLock::new();

/// Parses every `--object` definition and records the secrets.
pub fn init(defs: &[String]) -> Result<(), CliError> {
    let mut map = HashMap::new();
    for d in defs {
        let (id, value) = parse_secret(d)?;
        if map.insert(id.clone(), value).is_some() {
            return Err(CliError::new(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
    }
    let _ = SECRETS.set(map);
    Ok(())
}

/// The bytes of secret `id` (QEMU's wording when there is none).
pub fn secret(id: &str) -> Result<Vec<u8>, CliError> {
    SECRETS
        .get()
        .and_then(|m| m.get(id))
        .cloned()
        .ok_or_else(|| CliError::new(format!("No secret with id '{id}'")))
}

/// The secret with id `id` as a passphrase: UTF-8, as QEMU's encryption
/// drivers (LUKS, and qcow's AES) take every key.
pub fn passphrase(id: &str) -> Result<Vec<u8>, CliError> {
    let s = secret(id)?;
    if std::str::from_utf8(&s).is_err() {
        return Err(CliError::new(format!(
            "Data from secret {id} is not valid UTF-8"
        )));
    }
    Ok(s)
}

fn parse_secret(def: &str) -> Result<(String, Vec<u8>), CliError> {
    let mut kind = None;
    let mut props: HashMap<String, String> = HashMap::new();
    for (i, part) in split_opts(def).into_iter().enumerate() {
        match part.split_once('=') {
            Some(("qom-type", v)) => kind = Some(v.to_string()),
            Some((k, v)) => {
                props.insert(k.to_string(), v.to_string());
            }
            None if i == 0 => kind = Some(part),
            None => return Err(CliError::new(format!("Invalid parameter '{part}'"))),
        }
    }
    let kind = kind.ok_or_else(|| CliError::new("Parameter 'qom-type' is missing"))?;
    if kind != "secret" {
        return Err(CliError::new(format!(
            "object type '{kind}' is not supported by rimg (only 'secret')"
        )));
    }
    let id = props
        .remove("id")
        .ok_or_else(|| CliError::new("Parameter 'id' is missing"))?;
    let format = props.remove("format").unwrap_or_else(|| "raw".into());
    let raw = match (props.remove("data"), props.remove("file")) {
        (Some(_), Some(_)) => {
            return Err(CliError::new("'data' and 'file' are mutually exclusive"))
        }
        (Some(d), None) => d.into_bytes(),
        (None, Some(f)) => std::fs::read(&f).map_err(|e| {
            CliError::new(format!(
                "Unable to read {f}: {}",
                crate::common::strerror(&e)
            ))
        })?,
        (None, None) => return Err(CliError::new("Either 'file' or 'data' must be provided")),
    };
    if let Some(k) = props.keys().next() {
        return Err(CliError::new(format!(
            "Property 'secret.{k}' not found (rimg supports no encrypted secrets)"
        )));
    }
    let value = match format.as_str() {
        "raw" => raw,
        "base64" => base64_decode(&raw)
            .ok_or_else(|| CliError::new("Unable to decode base64 secret data"))?,
        f => {
            return Err(CliError::new(format!(
                "Parameter 'format' does not accept value '{f}'"
            )))
        }
    };
    Ok((id, value))
}

/// Encryption options in the order qemu-img lists (and echoes) them,
/// after `prefix` ("encrypt." in qcow2, "" for the luks format).
const ENCRYPT_KEYS: &[&str] = &[
    "format",
    "key-secret",
    "cipher-alg",
    "cipher-mode",
    "ivgen-alg",
    "ivgen-hash-alg",
    "hash-alg",
    "iter-time",
];

/// Whether `k` is an option of the luks format's (they are qcow2's
/// `encrypt.*` options, unprefixed, less `format`).
pub fn is_luks_option(k: &str) -> bool {
    k != "format" && ENCRYPT_KEYS.contains(&k)
}

/// " encryption=on encrypt.format=luks ..." for the Formatting line.
pub fn echo_encrypt(given: &[(String, String)], prefix: &str) -> String {
    let mut s = String::new();
    let find = |k: &str| given.iter().rev().find(|(g, _)| g == k).map(|(_, v)| v);
    if let Some(v) = find("encryption") {
        s += &format!(" encryption={v}");
    }
    for k in ENCRYPT_KEYS {
        let full = format!("{prefix}{k}");
        if let Some(v) = find(&full) {
            s += &format!(" {full}={v}");
        }
    }
    s
}

/// Builds the encryption of a new image from its options (`prefix` as
/// in [`echo_encrypt`]); None when none was asked for.
pub fn encryption(
    given: &[(String, String)],
    prefix: &str,
) -> Result<Option<(EncryptFormat, Secret)>, String> {
    let find = |k: &str| {
        given
            .iter()
            .rev()
            .find(|(g, _)| g.strip_prefix(prefix) == Some(k))
            .map(|(_, v)| v.as_str())
    };
    let legacy = given.iter().rev().find(|(g, _)| g == "encryption");
    let format = match (find("format"), legacy) {
        (Some(f), _) => Some(f),
        (None, Some((_, v))) if matches!(v.as_str(), "on" | "yes" | "true") => Some("aes"),
        (None, Some((_, v))) if matches!(v.as_str(), "off" | "no" | "false") => None,
        (None, Some((_, v))) => {
            return Err(format!(
                "Parameter 'encryption' expects 'on' or 'off', got '{v}'"
            ))
        }
        (None, None) if prefix.is_empty() => Some("luks"),
        (None, None) => None,
    };
    if let Some((g, _)) = given.iter().find(|(g, _)| {
        g != "encryption"
            && !g
                .strip_prefix(prefix)
                .is_some_and(|k| ENCRYPT_KEYS.contains(&k))
    }) {
        return Err(format!("Invalid parameter '{g}'"));
    }
    let Some(format) = format else {
        return Ok(None);
    };
    let key = find("key-secret")
        .ok_or_else(|| format!("Parameter '{prefix}key-secret' is required for cipher"))?;
    let secret = Secret(passphrase(key).map_err(|e| e.msg)?);
    match format {
        "aes" => {
            // The legacy format has no parameters beyond its key.
            for k in &ENCRYPT_KEYS[2..] {
                if find(k).is_some() {
                    return Err(format!("Parameter '{prefix}{k}' is unexpected"));
                }
            }
            Ok(Some((EncryptFormat::Aes, secret)))
        }
        "luks" => {
            let mut p = LuksParams::default();
            if let Some(c) = find("cipher-alg") {
                let bytes = match c {
                    "aes-128" => 16,
                    "aes-192" => 24,
                    "aes-256" => 32,
                    _ => {
                        return Err(format!(
                            "Parameter '{prefix}cipher-alg' does not accept value '{c}'"
                        ))
                    }
                };
                p.key_bytes = bytes;
            }
            if let Some(m) = find("cipher-mode") {
                p.mode = CipherMode::from_name(m).ok_or_else(|| {
                    format!("Parameter '{prefix}cipher-mode' does not accept value '{m}'")
                })?;
            }
            if p.mode == CipherMode::Xts {
                p.key_bytes *= 2;
            }
            if let Some(g) = find("ivgen-alg") {
                p.ivgen = IvGen::from_name(g).ok_or_else(|| {
                    format!("Parameter '{prefix}ivgen-alg' does not accept value '{g}'")
                })?;
            }
            let hash = |k: &str, v: &str| {
                HashAlg::from_name(v)
                    .ok_or_else(|| format!("Parameter '{prefix}{k}' does not accept value '{v}'"))
            };
            if let Some(h) = find("ivgen-hash-alg") {
                p.ivhash = Some(hash("ivgen-hash-alg", h)?);
            }
            if p.ivgen == IvGen::Essiv && p.ivhash.is_none() {
                p.ivhash = Some(HashAlg::Sha256);
            }
            if let Some(h) = find("hash-alg") {
                p.hash = hash("hash-alg", h)?;
            }
            if let Some(t) = find("iter-time") {
                p.iter_time_ms = t
                    .parse()
                    .map_err(|_| format!("Parameter '{prefix}iter-time' expects a number"))?;
            }
            Ok(Some((EncryptFormat::Luks(p), secret)))
        }
        f => Err(format!(
            "Parameter '{prefix}format' does not accept value '{f}'"
        )),
    }
}

/// Splits at commas; ",," is a literal comma (QEMU's option syntax).
fn split_opts(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().unwrap().push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().unwrap().push(c);
        }
    }
    out
}

fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s: Vec<u8> = s
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::new();
    for q in s.chunks(4) {
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 {
            return None;
        }
        let mut n = 0u32;
        for &c in &q[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_parse() {
        assert_eq!(
            parse_secret("secret,id=s,data=a,,b").unwrap(),
            ("s".into(), b"a,b".to_vec())
        );
        assert_eq!(
            parse_secret("secret,id=s,data=MTIzNDU2,format=base64")
                .unwrap()
                .1,
            b"123456".to_vec()
        );
        assert!(parse_secret("tls-creds-x509,id=t").is_err());
        assert!(parse_secret("secret,id=s").is_err());
    }
}
