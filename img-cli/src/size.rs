//! Sizes as qemu-img reads and prints them.

/// Parses a size with an optional binary suffix (k/K, M, G, T, P, E, or B
/// for bytes), accepting decimals ("1.5G"), as qemu-img's qemu_strtosz.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    // Plain hex, as qemu_strtosz takes it (no suffix, no fraction).
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let v = u64::from_str_radix(h, 16).ok()?;
        return (v <= i64::MAX as u64).then_some(v);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() {
        return None;
    }
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return None,
    };
    if num.contains('.') {
        let v: f64 = num.parse().ok()?;
        let bytes = v * (1u64 << shift) as f64;
        if !bytes.is_finite()
            || bytes >= 9.223_372_036_854_775e18
            || (shift == 0 && v.fract() != 0.0)
        {
            return None;
        }
        Some(bytes as u64)
    } else {
        let v: u64 = num.parse().ok()?;
        let bytes = v.checked_mul(1u64 << shift)?;
        (bytes <= i64::MAX as u64).then_some(bytes)
    }
}

/// Parses a number with qemu-img's cvtnum rules (qemu_strtosz: a size
/// with optional suffix, or plain hex with "0x"; leading blanks allowed)
/// within [min, max]; the error is qemu-img's message.
pub fn cvtnum(name: &str, s: &str, min: u64, max: u64) -> Result<u64, String> {
    let range = || format!("Invalid {name} specified. Must be between {min} and {max}.");
    let invalid = || format!("Invalid {name} specified: '{s}'.");
    let t = s.trim_start();
    let (neg, body) = match t.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, t),
    };
    let value = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        // Hex takes no suffix and no fraction.
        if h.is_empty() || !h.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        u64::from_str_radix(h, 16).ok()
    } else {
        let split = body
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(body.len());
        let (num, suffix) = body.split_at(split);
        let well_formed = match num.split_once('.') {
            None => !num.is_empty(),
            // A fraction needs a unit larger than bytes.
            Some((i, f)) => {
                !i.is_empty()
                    && !f.is_empty()
                    && !f.contains('.')
                    && !matches!(suffix, "" | "b" | "B")
            }
        };
        if !well_formed || parse_size(&format!("1{suffix}")).is_none() || suffix.trim() != suffix {
            return Err(invalid());
        }
        parse_size(body)
    };
    match value {
        Some(v) if !neg && v <= i64::MAX as u64 && (min..=max).contains(&v) => Ok(v),
        _ => Err(range()),
    }
}

/// Parses a plain integer as qemu-img's cvtnum_full does for counts
/// (qemu_strtoi64 with base 0: leading blanks, a sign, "0x" hex, a
/// leading "0" for octal, no suffix) within [min, max]; the error is
/// qemu-img's message.
pub fn cvtint(name: &str, s: &str, min: i64, max: i64) -> Result<i64, String> {
    let invalid = || format!("Invalid {name} specified: '{s}'.");
    let t = s.trim_start();
    let (neg, body) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) =
        if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
            (16, h)
        } else if body.len() > 1 && body.starts_with('0') {
            (8, &body[1..])
        } else {
            (10, body)
        };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(invalid());
    }
    // Out of i64's range reads as a range error, as ERANGE does in qemu.
    let v = i128::from_str_radix(digits, radix)
        .ok()
        .map(|v| if neg { -v } else { v })
        .filter(|v| (i64::MIN as i128..=i64::MAX as i128).contains(v));
    match v {
        Some(v) if (min as i128..=max as i128).contains(&v) => Ok(v as i64),
        _ => Err(format!(
            "Invalid {name} specified. Must be between {min} and {max}."
        )),
    }
}

/// C's "%0.3g" for the values size_to_str prints.
fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let e = v.abs().log10().floor() as i32;
    // Rounding to 3 significant digits may bump the exponent (999.5).
    let rounded = format!("{:.*e}", 2, v);
    let exp: i32 = rounded
        .split('e')
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(e);
    if !(-4..3).contains(&exp) {
        let (mant, _) = rounded.split_once('e').unwrap();
        let mant = mant.trim_end_matches('0').trim_end_matches('.');
        return format!("{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// qemu's size_to_str: "1 GiB", "332 KiB", "1.5 GiB", "0 B".
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // Switch to the next unit once the value would print as >= 1000.
    let scaled = val as f64 / (1000.0 / 1024.0);
    let i = if scaled < 1.0 {
        0
    } else {
        let exp = scaled.log2().floor() as i32 + 1; // frexp's exponent
        ((exp - 1) / 10) as usize
    };
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(val as f64 / div), SUFFIXES[i.min(6)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_qemu() {
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("12x"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999E"), None);
    }

    #[test]
    fn cvtnum_like_qemu() {
        let r = |s: &str| cvtnum("x", s, 0, i64::MAX as u64);
        assert_eq!(r("1M"), Ok(1 << 20));
        assert_eq!(r(" 7"), Ok(7));
        assert_eq!(r("0x100000"), Ok(1 << 20));
        assert_eq!(r("1.5k"), Ok(1536));
        let range = Err("Invalid x specified. Must be between 0 and 9223372036854775807.".into());
        for bad in ["-1", "-0", "99999999999E", "0xffffffffffffffffff", "8E"] {
            assert_eq!(r(bad), range, "{bad}");
        }
        for bad in [
            "1.5", "1.5b", "0x", "0x10k", "1.5e3", "7 ", "1kB", "abc", "",
        ] {
            assert_eq!(
                r(bad),
                Err(format!("Invalid x specified: '{bad}'.")),
                "{bad}"
            );
        }
    }

    #[test]
    fn cvtint_like_qemu() {
        let r = |s: &str| cvtint("request count", s, 1, i32::MAX as i64);
        assert_eq!(r("5"), Ok(5));
        assert_eq!(r(" +5"), Ok(5));
        assert_eq!(r("010"), Ok(8));
        assert_eq!(r("0x10"), Ok(16));
        assert_eq!(
            r("0"),
            Err("Invalid request count specified. Must be between 1 and 2147483647.".into())
        );
        assert_eq!(r("-5"), r("0"));
        assert_eq!(r("3000000000"), r("0"));
        assert_eq!(r("99999999999999999999999"), r("0"));
        for bad in ["1k", "5.0", "abc", "", "0x", "09", "5 "] {
            assert_eq!(
                r(bad),
                Err(format!("Invalid request count specified: '{bad}'.")),
                "{bad}"
            );
        }
    }

    #[test]
    fn prints_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(1_610_612_736), "1.5 GiB");
        assert_eq!(size_to_str(339_968), "332 KiB");
        assert_eq!(size_to_str(197_120), "192 KiB");
        assert_eq!(size_to_str(459_264), "448 KiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(999), "999 B");
    }
}
