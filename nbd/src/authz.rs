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

/// A DER value: its tag and contents, from the front of `b`. Lengths
/// must be in DER's shortest form.
fn der(b: &mut &[u8]) -> Option<(u8, Vec<u8>)> {
    let (&tag, rest) = b.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = match first {
        n if n < 0x80 => n as usize,
        0x81..=0x84 => {
            let n = (first & 0x7f) as usize;
            let (l, r) = rest.split_at_checked(n)?;
            rest = r;
            let len = l.iter().fold(0usize, |a, &x| a << 8 | x as usize);
            // Shortest form: no leading zero byte, no long form below 128.
            if l[0] == 0 || len < 0x80 {
                return None;
            }
            len
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

/// A dotted OID from its DER contents; None unless well formed (every
/// subidentifier minimal and finished).
fn oid(c: &[u8]) -> Option<String> {
    let mut subs = Vec::new();
    let mut v = 0u64;
    let mut fresh = true;
    for &x in c {
        if fresh && x == 0x80 {
            return None;
        }
        v = v.checked_mul(128)? | (x & 0x7f) as u64;
        fresh = x & 0x80 == 0;
        if fresh {
            subs.push(v);
            v = 0;
        }
    }
    if !fresh || subs.is_empty() {
        return None;
    }
    let first = subs[0].min(80) / 40;
    let mut parts = vec![first, subs[0] - 40 * first];
    parts.extend(&subs[1..]);
    Some(
        parts
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// What GnuTLS takes as text for an attribute.
#[derive(Clone, Copy)]
enum Kind {
    /// DirectoryString: Teletex, Printable, Universal, UTF8 or BMP.
    Directory,
    Printable,
    Ia5,
}

/// GnuTLS's names for the attributes it knows (lib/x509/common.c), and
/// what it prints as text for each.
fn attribute(oid: &str) -> Option<(&'static str, Kind)> {
    use Kind::*;
    Some(match oid {
        "2.5.4.3" => ("CN", Directory),
        "2.5.4.4" => ("surName", Directory),
        "2.5.4.5" => ("serialNumber", Printable),
        "2.5.4.6" => ("C", Printable),
        "2.5.4.7" => ("L", Directory),
        "2.5.4.8" => ("ST", Directory),
        "2.5.4.9" => ("street", Directory),
        "2.5.4.10" => ("O", Directory),
        "2.5.4.11" => ("OU", Directory),
        "2.5.4.12" => ("title", Directory),
        "2.5.4.13" => ("description", Directory),
        "2.5.4.15" => ("businessCategory", Directory),
        "2.5.4.17" => ("postalCode", Directory),
        "2.5.4.20" => ("telephoneNumber", Printable),
        "2.5.4.41" => ("name", Directory),
        "2.5.4.42" => ("givenName", Directory),
        "2.5.4.43" => ("initials", Directory),
        "2.5.4.44" => ("generationQualifier", Directory),
        "2.5.4.46" => ("dnQualifier", Printable),
        "2.5.4.65" => ("pseudonym", Directory),
        "0.9.2342.19200300.100.1.1" => ("UID", Directory),
        "0.9.2342.19200300.100.1.25" => ("DC", Ia5),
        "1.2.840.113549.1.9.1" => ("EMAIL", Ia5),
        _ => return None,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// How GnuTLS shows a value: Some(text, already escaped or not), or
/// None for its DER in hex.
enum Shown {
    Text(String),
    /// Content bytes GnuTLS could not take for text: `\#` and hex.
    Raw(String),
}

fn shown(kind: Kind, tag: u8, c: &[u8]) -> Option<Shown> {
    let ok = match kind {
        Kind::Directory => matches!(tag, 0x14 | 0x13 | 0x1c | 0x0c | 0x1e),
        Kind::Printable => tag == 0x13,
        Kind::Ia5 => tag == 0x16,
    };
    // A NUL in an 8-bit string: GnuTLS shows the DER instead.
    if !ok || (!matches!(tag, 0x1c | 0x1e) && c.contains(&0)) {
        return None;
    }
    Some(match tag {
        // Teletex: text only if it is printable ASCII.
        0x14 if !c.iter().all(|b| (0x20..0x7f).contains(b)) => Shown::Raw(hex(c)),
        0x1c => Shown::Raw(hex(c)),
        0x1e => {
            let c = c.strip_suffix(&[0, 0]).unwrap_or(c);
            let units: Vec<u16> = c
                .chunks_exact(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]))
                .collect();
            match String::from_utf16(&units) {
                Ok(t) => Shown::Text(t),
                Err(_) => Shown::Raw(hex(c)),
            }
        }
        // What is not UTF-8 GnuTLS passes as bytes, which no identity
        // written as text matches: refused.
        _ => Shown::Text(String::from_utf8(c.to_vec()).ok()?),
    })
}

/// RFC 4514's escaping of an attribute value, as GnuTLS does it.
fn escape(v: &str) -> String {
    let n = v.chars().count();
    let mut out = String::new();
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
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
/// attribute. None (so: refused) if the certificate does not parse as
/// DER, or its subject is empty or has an empty value, as GnuTLS fails.
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
            if !atv.is_empty() || value.is_empty() {
                return None;
            }
            let known = attribute(&o);
            let text = known.and_then(|(_, kind)| shown(kind, tag, &value));
            let name = known.map_or(o.as_str(), |(n, _)| n);
            atvs.push(match text {
                Some(Shown::Text(v)) => format!("{name}={}", escape(&v)),
                Some(Shown::Raw(h)) => format!("{name}=\\#{h}"),
                // The value's DER in hex (RFC 4514).
                None => {
                    let mut enc = vec![tag];
                    enc.extend(der_length(value.len()));
                    enc.extend(&value);
                    format!("{name}=#{}", hex(&enc))
                }
            });
        }
        if !atvs.is_empty() {
            rdns.push(atvs.join("+"));
        }
    }
    if rdns.is_empty() {
        return None;
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

    /// A certificate whose subject is `subject` (a DER Name's contents),
    /// the rest placeholders: only its shape is read.
    fn cert(subject: &[u8]) -> Vec<u8> {
        let tlv = |tag: u8, c: &[u8]| {
            let mut v = vec![tag];
            v.extend(der_length(c.len()));
            v.extend(c);
            v
        };
        let mut tbs = tlv(0xa0, &tlv(0x02, &[2]));
        tbs.extend(tlv(0x02, &[1]));
        tbs.extend(tlv(0x30, &[]));
        tbs.extend(tlv(0x30, &[]));
        tbs.extend(tlv(0x30, &[]));
        tbs.extend(tlv(0x30, subject));
        tlv(0x30, &tlv(0x30, &tbs))
    }

    /// One RDN of one attribute.
    fn rdn(oid: &[u8], tag: u8, v: &[u8]) -> Vec<u8> {
        let mut atv = vec![0x06, oid.len() as u8];
        atv.extend(oid);
        atv.extend([tag, v.len() as u8]);
        atv.extend(v);
        let mut seq = vec![0x30, atv.len() as u8];
        seq.extend(atv);
        let mut set = vec![0x31, seq.len() as u8];
        set.extend(seq);
        set
    }

    #[test]
    fn subjects_read_as_gnutls_prints_them() {
        const CN: &[u8] = &[0x55, 4, 3];
        const C: &[u8] = &[0x55, 4, 6];
        const SN: &[u8] = &[0x55, 4, 4];
        let mut s = rdn(CN, 0x0c, b"a, b+c");
        s.extend(rdn(C, 0x0c, b"SP"));
        s.extend(rdn(SN, 0x13, b" lead"));
        s.extend(rdn(&[0x2a, 3], 0x0c, b"x"));
        assert_eq!(
            subject_dn(&cert(&s)).unwrap(),
            "CN=a\\, b\\+c,C=#0c025350,surName=\\ lead,1.2.3=#0c0178"
        );
        // Teletex beyond ASCII, UniversalString: GnuTLS's \# and hex.
        let mut s = rdn(CN, 0x14, b"jos\xe9");
        s.extend(rdn(CN, 0x1c, &[0, 0, 0, 0x41]));
        assert_eq!(
            subject_dn(&cert(&s)).unwrap(),
            "CN=\\#6a6f73e9,CN=\\#00000041"
        );
        // BMPString: UTF-16.
        assert_eq!(
            subject_dn(&cert(&rdn(CN, 0x1e, &[0, b'h', 0, b'i']))).unwrap(),
            "CN=hi"
        );
        // IA5String is not a directory string (GnuTLS 3.7.4 on).
        assert_eq!(
            subject_dn(&cert(&rdn(CN, 0x16, b"x"))).unwrap(),
            "CN=#160178"
        );
    }

    #[test]
    fn malformed_subjects_are_refused() {
        const CN: &[u8] = &[0x55, 4, 3];
        for bad in [
            // Empty subject, empty value, NUL-free but padded OIDs.
            vec![],
            rdn(CN, 0x0c, b""),
            rdn(&[0x55, 4, 0x80, 3], 0x0c, b"x"),
            rdn(&[0x55, 4, 3, 0x80], 0x0c, b"x"),
        ] {
            assert_eq!(subject_dn(&cert(&bad)), None, "{bad:02x?}");
        }
        // A long-form length that fits the short form.
        let mut c = cert(&rdn(CN, 0x0c, b"x"));
        c.splice(1..2, [0x81, c[1]]);
        assert_eq!(subject_dn(&c), None);
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
