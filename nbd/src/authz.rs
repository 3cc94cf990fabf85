//! QEMU's `--tls-authz`: which clients a TLS server admits, beyond
//! holding credentials. With an `authz-simple` object
//! (`--object authz-simple,id=ID,identity=NAME`), an X.509 client whose
//! certificate is checked (`verify-peer`, the default) is admitted only
//! if its certificate's subject, as the string GnuTLS makes of it for
//! QEMU (`gnutls_x509_crt_get_dn`: RFC 4514's escaping, in the
//! certificate's order, `CN=client,O=Example,C=GB` for a certificate
//! that lists CN first), is NAME.
//! As in QEMU, pre-shared-key sessions and `verify-peer=off` are not
//! checked.

/// QEMU's `authz-simple` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzObject {
    pub id: String,
    pub identity: String,
}

/// `KEY=VALUE,...` as QEMU's option parser splits it: `,,` is a comma
/// inside a value.
pub fn qemu_opts(spec: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                if let Some(last) = out.last_mut() {
                    last.push(',');
                }
            }
            ',' => out.push(String::new()),
            c => {
                if let Some(last) = out.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    out
}

impl AuthzObject {
    /// `authz-simple,id=ID,identity=NAME`; None for another object type.
    pub fn parse(spec: &str) -> Result<Option<AuthzObject>, String> {
        let parts = qemu_opts(spec);
        if parts.first().map(String::as_str) != Some("authz-simple") {
            return Ok(None);
        }
        let (mut id, mut identity) = (None, None);
        for kv in &parts[1..] {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--object: '{kv}' is not KEY=VALUE"))?;
            match k {
                "id" => id = Some(v.to_string()),
                "identity" => identity = Some(v.to_string()),
                _ => return Err(format!("--object authz-simple: unknown key '{k}'")),
            }
        }
        Ok(Some(AuthzObject {
            id: id.ok_or("--object authz-simple needs id=")?,
            identity: identity.ok_or("--object authz-simple needs identity=")?,
        }))
    }
}

/// A DER value: its tag and contents, from the front of `b`.
fn der(b: &mut &[u8]) -> Option<(u8, Vec<u8>)> {
    let (&tag, rest) = b.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = match first {
        n if n < 0x80 => n as usize,
        0x81..=0x84 => {
            let n = (first & 0x7f) as usize;
            let (l, r) = rest.split_at_checked(n)?;
            rest = r;
            l.iter().fold(0usize, |a, &x| a << 8 | x as usize)
        }
        _ => return None,
    };
    let (content, rest) = rest.split_at_checked(len)?;
    *b = rest;
    Some((tag, content.to_vec()))
}

/// The contents of the next value, which must have tag `tag`.
fn expect(b: &mut &[u8], tag: u8) -> Option<Vec<u8>> {
    der(b).filter(|(t, _)| *t == tag).map(|(_, c)| c)
}

/// A dotted OID from its DER contents.
fn oid(c: &[u8]) -> Option<String> {
    let (&first, rest) = c.split_first()?;
    let mut parts = vec![
        (first / 40).min(2) as u64,
        first as u64 - 40 * (first / 40).min(2) as u64,
    ];
    let mut v = 0u64;
    for &x in rest {
        v = v.checked_mul(128)? | (x & 0x7f) as u64;
        if x & 0x80 == 0 {
            parts.push(v);
            v = 0;
        }
    }
    Some(
        parts
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// RFC 4514's short names, as GnuTLS prints them.
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.42" => "GN",
        "2.5.4.43" => "initials",
        "2.5.4.44" => "generationQualifier",
        "2.5.4.46" => "dnQualifier",
        "2.5.4.65" => "pseudonym",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "EMAIL",
        _ => return None,
    })
}

/// An attribute value as text, where GnuTLS takes its type for text:
/// a country only as a PrintableString, a domain component or e-mail
/// address only as an IA5String, the rest as any directory string;
/// None (then hex) otherwise.
fn text(oid: &str, tag: u8, c: &[u8]) -> Option<String> {
    let allowed = match oid {
        "2.5.4.6" | "2.5.4.5" | "2.5.4.46" => tag == 0x13,
        "0.9.2342.19200300.100.1.25" | "1.2.840.113549.1.9.1" => tag == 0x16,
        _ => matches!(tag, 0x0c | 0x13 | 0x14 | 0x1e | 0x16 | 0x1a),
    };
    if !allowed {
        return None;
    }
    match tag {
        // UTF8String, PrintableString, IA5String, VisibleString.
        0x0c | 0x13 | 0x16 | 0x1a => String::from_utf8(c.to_vec()).ok(),
        // TeletexString: taken as Latin-1.
        0x14 => Some(c.iter().map(|&b| b as char).collect()),
        // BMPString: UTF-16BE.
        0x1e => {
            let units: Vec<u16> = c
                .chunks_exact(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

/// RFC 4514's escaping of an attribute value.
fn escape(v: &str) -> String {
    let n = v.chars().count();
    let mut out = String::new();
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if c == '\0' {
            out.push_str("\\00");
            continue;
        }
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The subject of the DER certificate `cert` as GnuTLS prints it for
/// QEMU: RDNs in the certificate's order, `,` between them and `+`
/// between an RDN's attributes, values escaped as RFC 4514 says, or as
/// `#` and their DER in hex where their type is not text for their
/// attribute; None if the certificate does not parse.
pub fn subject_dn(cert: &[u8]) -> Option<String> {
    let mut b = cert;
    let c = expect(&mut b, 0x30)?;
    let mut c = c.as_slice();
    let tbs = expect(&mut c, 0x30)?;
    let mut t = tbs.as_slice();
    // [0] version, serial, signature algorithm, issuer, validity, subject.
    if t.first() == Some(&0xa0) {
        der(&mut t)?;
    }
    expect(&mut t, 0x02)?;
    expect(&mut t, 0x30)?;
    expect(&mut t, 0x30)?;
    expect(&mut t, 0x30)?;
    let subject = expect(&mut t, 0x30)?;
    let mut s = subject.as_slice();
    let mut rdns = Vec::new();
    while !s.is_empty() {
        let set = expect(&mut s, 0x31)?;
        let mut set = set.as_slice();
        let mut atvs = Vec::new();
        while !set.is_empty() {
            let atv = expect(&mut set, 0x30)?;
            let mut atv = atv.as_slice();
            let o = oid(&expect(&mut atv, 0x06)?)?;
            let (tag, value) = der(&mut atv)?;
            let value = match (short_name(&o), text(&o, tag, &value)) {
                (Some(name), Some(v)) => format!("{name}={}", escape(&v)),
                // The value's DER in hex (RFC 4514), after the short
                // name or else the dotted OID.
                (name, _) => {
                    let mut enc = vec![tag];
                    enc.extend(der_length(value.len()));
                    enc.extend(&value);
                    let hex: String = enc.iter().map(|x| format!("{x:02x}")).collect();
                    format!("{}=#{hex}", name.unwrap_or(&o))
                }
            };
            atvs.push(value);
        }
        rdns.push(atvs.join("+"));
    }
    Some(rdns.join(","))
}

fn der_length(n: usize) -> Vec<u8> {
    if n < 0x80 {
        return vec![n as u8];
    }
    let bytes: Vec<u8> = n
        .to_be_bytes()
        .into_iter()
        .skip_while(|&x| x == 0)
        .collect();
    let mut out = vec![0x80 | bytes.len() as u8];
    out.extend(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_with_commas_as_qemu_escapes_them() {
        let o = AuthzObject::parse("authz-simple,id=a0,identity=CN=x,,O=Big,, Inc.,,C=GB");
        assert_eq!(
            o.unwrap().unwrap(),
            AuthzObject {
                id: "a0".into(),
                identity: "CN=x,O=Big, Inc.,C=GB".into(),
            }
        );
        assert_eq!(
            AuthzObject::parse("tls-creds-psk,id=t,dir=d").unwrap(),
            None
        );
        assert!(AuthzObject::parse("authz-simple,id=a").is_err());
        assert!(AuthzObject::parse("authz-simple,identity=x").is_err());
    }

    #[test]
    fn values_are_escaped_as_rfc_4514_says() {
        assert_eq!(escape("Cthulu, Dark+Lord"), "Cthulu\\, Dark\\+Lord");
        assert_eq!(escape(" #lead"), "\\ #lead");
        assert_eq!(escape("#x"), "\\#x");
        assert_eq!(escape("trail "), "trail\\ ");
        assert_eq!(escape("R'lyeh"), "R'lyeh");
    }

    #[test]
    fn hostile_der_is_none_not_a_panic() {
        for b in [
            &[][..],
            &[0x30],
            &[0x30, 0x85, 0, 0, 0, 0, 1],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x03, 0x30, 0x01],
        ] {
            assert_eq!(subject_dn(b), None);
        }
    }
}
