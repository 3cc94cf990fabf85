//! Command-line values: memory sizes and `--disk` / `--net` specs.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// A size like `256M`, `1G`, `65536` (bytes) or `512K`.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || {
        Error::Usage(format!(
            "invalid size '{s}': expected a number with K, M or G"
        ))
    };
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(bad()),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

/// `socket=PATH[,readonly][,reconnect=SECS]`
#[derive(Debug, Clone, PartialEq)]
pub struct DiskSpec {
    pub socket: PathBuf,
    pub readonly: bool,
    pub reconnect: Reconnect,
}

/// `socket=PATH[,mac=MAC][,reconnect=SECS]`
#[derive(Debug, Clone, PartialEq)]
pub struct NetSpec {
    pub socket: PathBuf,
    pub mac: Option<[u8; 6]>,
    pub reconnect: Reconnect,
}

/// How long a device waits for its backend to come back after the
/// connection broke (`reconnect=SECS`); 0, the default, marks the device
/// failed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reconnect(pub u32);

impl Reconnect {
    pub fn enabled(self) -> bool {
        self.0 > 0
    }

    fn parse(spec: &str, v: &str) -> Result<Reconnect> {
        v.parse::<u32>()
            .ok()
            .filter(|&n| n <= 24 * 3600)
            .map(Reconnect)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "'{spec}': reconnect={v}: expected seconds, 0 to 86400"
                ))
            })
    }
}

fn fields(s: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    s.split(',')
        .filter(|f| !f.is_empty())
        .map(|f| match f.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (f, None),
        })
}

pub fn parse_disk(s: &str) -> Result<DiskSpec> {
    let mut socket = None;
    let mut readonly = false;
    let mut reconnect = Reconnect::default();
    for (k, v) in fields(s) {
        match (k, v) {
            ("socket", Some(p)) => socket = Some(PathBuf::from(p)),
            ("readonly", None | Some("on") | Some("true")) => readonly = true,
            ("readonly", Some("off") | Some("false")) => readonly = false,
            ("reconnect", Some(n)) => reconnect = Reconnect::parse(s, n)?,
            _ => {
                return Err(Error::Usage(format!(
                    "--disk '{s}': unknown field '{k}' (expected socket=PATH[,readonly][,reconnect=SECS])"
                )))
            }
        }
    }
    let socket =
        socket.ok_or_else(|| Error::Usage(format!("--disk '{s}': socket=PATH is required")))?;
    Ok(DiskSpec {
        socket,
        readonly,
        reconnect,
    })
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bad = || Error::Usage(format!("invalid MAC address '{s}'"));
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

pub fn parse_net(s: &str) -> Result<NetSpec> {
    let mut socket = None;
    let mut mac = None;
    let mut reconnect = Reconnect::default();
    for (k, v) in fields(s) {
        match (k, v) {
            ("socket", Some(p)) => socket = Some(PathBuf::from(p)),
            ("mac", Some(m)) => mac = Some(parse_mac(m)?),
            ("reconnect", Some(n)) => reconnect = Reconnect::parse(s, n)?,
            _ => {
                return Err(Error::Usage(format!(
                    "--net '{s}': unknown field '{k}' (expected socket=PATH[,mac=MAC][,reconnect=SECS])"
                )))
            }
        }
    }
    let socket =
        socket.ok_or_else(|| Error::Usage(format!("--net '{s}': socket=PATH is required")))?;
    Ok(NetSpec {
        socket,
        mac,
        reconnect,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn specs() {
        assert_eq!(
            parse_disk("socket=/a/b,readonly").unwrap(),
            DiskSpec {
                socket: "/a/b".into(),
                readonly: true,
                reconnect: Reconnect(0),
            }
        );
        let r = parse_disk("socket=/a,reconnect=30").unwrap();
        assert_eq!(r.reconnect, Reconnect(30));
        assert!(r.reconnect.enabled() && !Reconnect::default().enabled());
        assert!(parse_disk("socket=/a,reconnect=-1").is_err());
        assert!(parse_disk("socket=/a,reconnect=1s").is_err());
        assert!(parse_disk("socket=/a,reconnect").is_err());
        assert_eq!(
            parse_net("socket=/s,reconnect=2").unwrap().reconnect,
            Reconnect(2)
        );
        assert!(parse_disk("readonly").is_err());
        assert!(parse_disk("socket=/x,size=3").is_err());
        let n = parse_net("socket=/s,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert!(parse_net("socket=/s,mac=52:54:00:12:34").is_err());
        assert!(parse_net("socket=/s,mac=52:54:00:12:34:5g").is_err());
    }
}
