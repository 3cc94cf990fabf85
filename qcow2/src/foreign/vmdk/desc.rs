//! Text descriptors: the createType, the CIDs, the parent's name and the
//! extent lines, found as QEMU's vmdk driver finds them (with `strstr`
//! and `sscanf` over a C string), so that a descriptor reads the same in
//! rimg as in qemu-img, quirks included.

use std::path::PathBuf;

use super::refuse;
use crate::error::Result;

/// The create types QEMU opens from a text descriptor.
pub(super) const DESCRIPTOR_TYPES: &[&[u8]] = &[
    b"monolithicFlat",
    b"vmfs",
    b"vmfsSparse",
    b"seSparse",
    b"twoGbMaxExtentSparse",
    b"twoGbMaxExtentFlat",
];

/// The bytes before the first NUL (a C string's).
pub(super) fn until_nul(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

pub(super) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The value of the first `createType`, as QEMU finds it: two bytes
/// after the key (its `="`), up to the next `"`, at most 127 bytes.
pub(super) fn create_type(text: &[u8]) -> Option<Vec<u8>> {
    let start = find(text, b"createType")? + b"createType".len() + 2;
    if start >= text.len() {
        return None;
    }
    let len = text[start..].iter().position(|&c| c == b'"')?;
    (len < 128).then(|| text[start..start + len].to_vec())
}

/// The create type of descriptor `text`, if QEMU opens a descriptor of
/// that type; QEMU's refusal otherwise.
pub(super) fn check_create_type(text: &[u8]) -> Result<String> {
    match create_type(text) {
        None => Err(refuse("invalid VMDK image descriptor")),
        Some(t) if !DESCRIPTOR_TYPES.contains(&t.as_slice()) => Err(refuse(format!(
            "Unsupported image type '{}'",
            String::from_utf8_lossy(&t)
        ))),
        Some(t) => Ok(String::from_utf8_lossy(&t).into_owned()),
    }
}

/// The hex number after the first `key` and one more byte (its `=`) in
/// descriptor bytes `desc` (QEMU's 10 KiB, its last byte made a NUL), as
/// vmdk_read_cid finds it: the key in the C string, the number read by
/// sscanf("%x") from there, even past a NUL the skip stepped over
/// (blanks skipped, a sign, an optional 0x, at least one digit; too large
/// saturates, as strtoul does).
pub(super) fn cid_after(desc: &[u8], key: &[u8]) -> Option<u32> {
    let last = desc.len().saturating_sub(1);
    let desc = &desc[..last];
    let start = find(until_nul(desc), key)? + key.len() + 1;
    let mut p = desc.get(start..).unwrap_or(&[]);
    while let Some((c, rest)) = p.split_first() {
        if !c.is_ascii_whitespace() {
            break;
        }
        p = rest;
    }
    let neg = p.first() == Some(&b'-');
    if matches!(p.first(), Some(b'-' | b'+')) {
        p = &p[1..];
    }
    if p.len() > 2 && p[0] == b'0' && matches!(p[1], b'x' | b'X') && p[2].is_ascii_hexdigit() {
        p = &p[2..];
    }
    let digits = p.iter().take_while(|c| c.is_ascii_hexdigit()).count();
    if digits == 0 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in &p[..digits] {
        let d = (c as char).to_digit(16).unwrap() as u64;
        v = v
            .checked_mul(16)
            .and_then(|v| v.checked_add(d))
            .unwrap_or(u64::MAX);
        if v == u64::MAX {
            break;
        }
    }
    let v = if neg { v.wrapping_neg() } else { v };
    Some(v as u32)
}

/// The parent's name in descriptor bytes `desc` (QEMU's 10 KiB, NULs
/// and all), as vmdk_parent_open takes it: 20 bytes after the first
/// `parentFileNameHint` (its `="`) up to the next `"`; None when there
/// is none or it is empty. Err (QEMU's EINVAL) when no `"` ends it before
/// a NUL, or it is longer than 4095 bytes.
pub(super) fn parent_hint(desc: &[u8]) -> std::result::Result<Option<Vec<u8>>, ()> {
    const KEY: &[u8] = b"parentFileNameHint";
    let Some(at) = find(until_nul(desc), KEY) else {
        return Ok(None);
    };
    let rest = desc.get(at + KEY.len() + 2..).unwrap_or(&[]);
    let end = rest
        .iter()
        .position(|&c| c == b'"' || c == 0)
        .filter(|&i| rest[i] == b'"')
        .ok_or(())?;
    if end > 4095 {
        return Err(());
    }
    Ok((end > 0).then(|| rest[..end].to_vec()))
}

/// The kinds of extent QEMU reads from a descriptor line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Flat,
    Vmfs,
    Sparse,
    VmfsSparse,
    SeSparse,
}

impl Kind {
    fn from_word(w: &[u8]) -> Option<Kind> {
        Some(match w {
            b"FLAT" => Kind::Flat,
            b"VMFS" => Kind::Vmfs,
            b"SPARSE" => Kind::Sparse,
            b"VMFSSPARSE" => Kind::VmfsSparse,
            b"SESPARSE" => Kind::SeSparse,
            _ => return None,
        })
    }

    /// The type word qemu-img info shows for the extent.
    pub(super) fn word(self) -> &'static str {
        match self {
            Kind::Flat => "FLAT",
            Kind::Vmfs => "VMFS",
            Kind::Sparse => "SPARSE",
            Kind::VmfsSparse => "VMFSSPARSE",
            Kind::SeSparse => "SESPARSE",
        }
    }
}

/// One extent line: `RW <sectors> <TYPE> "<file>" [<offset>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Line<'a> {
    /// As written (positive); a sparse extent's size is its header's.
    pub sectors: u64,
    pub kind: Kind,
    /// The file's name as written (no CR, LF or `"` in it).
    pub name: &'a [u8],
    /// Where a FLAT extent starts in its file, in sectors (0 for VMFS).
    pub offset: u64,
}

/// C's isspace in the C locale.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The conversions of `sscanf(p, "%10s %ld %10s \"%511[^\n\r\"]\" %ld")`
/// over a C string: each one skips blanks *and newlines* (the pattern's
/// spaces do too), so a line may borrow from the lines after it.
struct Scan<'a> {
    b: &'a [u8],
}

impl<'a> Scan<'a> {
    fn skip_space(&mut self) {
        let n = self.b.iter().take_while(|&&c| is_space(c)).count();
        self.b = &self.b[n..];
    }

    /// `%Ns`: at most `max` bytes up to a blank.
    fn word(&mut self, max: usize) -> Option<&'a [u8]> {
        self.skip_space();
        let n = self
            .b
            .iter()
            .take(max)
            .take_while(|&&c| !is_space(c))
            .count();
        (n > 0).then(|| {
            let (w, rest) = self.b.split_at(n);
            self.b = rest;
            w
        })
    }

    /// `%ld`: a sign and decimal digits, saturating as strtol does.
    fn long(&mut self) -> Option<i64> {
        self.skip_space();
        let neg = self.b.first() == Some(&b'-');
        if matches!(self.b.first(), Some(b'-' | b'+')) {
            self.b = &self.b[1..];
        }
        let n = self.b.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        let mut v: i128 = 0;
        for &c in &self.b[..n] {
            v = (v * 10 + (c - b'0') as i128).min(i64::MAX as i128 + 1);
        }
        self.b = &self.b[n..];
        let v = if neg { -v } else { v };
        Some(v.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
    }

    /// A literal byte of the pattern.
    fn literal(&mut self, c: u8) -> bool {
        match self.b.split_first() {
            Some((&x, rest)) if x == c => {
                self.b = rest;
                true
            }
            _ => false,
        }
    }

    /// `%511[^\n\r"]`: one to 511 bytes that are none of those.
    fn name(&mut self) -> Option<&'a [u8]> {
        let n = self
            .b
            .iter()
            .take(511)
            .take_while(|&&c| !matches!(c, b'\n' | b'\r' | b'"'))
            .count();
        (n > 0).then(|| {
            let (w, rest) = self.b.split_at(n);
            self.b = rest;
            w
        })
    }
}

/// What sscanf assigned, in order, and how many.
struct Fields<'a> {
    matches: usize,
    access: &'a [u8],
    sectors: i64,
    kind: &'a [u8],
    name: &'a [u8],
    offset: i64,
}

fn scan(p: &[u8]) -> Fields<'_> {
    let mut s = Scan { b: p };
    let mut f = Fields {
        matches: 0,
        access: b"",
        sectors: 0,
        kind: b"",
        name: b"",
        offset: -1,
    };
    let Some(access) = s.word(10) else { return f };
    (f.access, f.matches) = (access, 1);
    let Some(sectors) = s.long() else { return f };
    (f.sectors, f.matches) = (sectors, 2);
    let Some(kind) = s.word(10) else { return f };
    (f.kind, f.matches) = (kind, 3);
    s.skip_space();
    if !s.literal(b'"') {
        return f;
    }
    let Some(name) = s.name() else { return f };
    (f.name, f.matches) = (name, 4);
    if !s.literal(b'"') {
        return f;
    }
    if let Some(offset) = s.long() {
        (f.offset, f.matches) = (offset, 5);
    }
    f
}

/// Hands each extent line of descriptor `text` (a C string) to `take`,
/// as QEMU's vmdk_parse_extents takes them, one at a time (QEMU opens a
/// line's file before it reads the next line, so its errors come first):
/// a line is scanned from its start over the rest of the text; lines that
/// are not `RW` extents, or have no sectors, or an unknown type, are
/// passed over; a malformed `RW` line fails the open with QEMU's words.
pub(super) fn for_each_extent_line<'a>(
    text: &'a [u8],
    mut take: impl FnMut(Line<'a>) -> Result<()>,
) -> Result<()> {
    let mut p = text;
    while !p.is_empty() {
        let f = scan(p);
        let line_end = p.iter().position(|&c| c == b'\n');
        let next = line_end.map_or(&p[p.len()..], |i| &p[i + 1..]);
        if f.matches < 4 || f.access != b"RW" {
            p = next;
            continue;
        }
        let kind = Kind::from_word(f.kind);
        let offset = match kind {
            Some(Kind::Flat) if f.matches != 5 || f.offset < 0 => None,
            Some(Kind::Flat) => Some(f.offset as u64),
            Some(Kind::Vmfs) if f.matches == 4 => Some(0),
            _ if f.matches != 4 => None,
            _ => Some(0),
        };
        let Some(offset) = offset else {
            let line = &p[..line_end.unwrap_or(p.len())];
            return Err(refuse(format!(
                "Invalid extent line: {}",
                String::from_utf8_lossy(line)
            )));
        };
        if let (Some(kind), true) = (kind, f.sectors > 0) {
            take(Line {
                sectors: f.sectors as u64,
                kind,
                name: f.name,
                offset,
            })?;
        }
        p = next;
    }
    Ok(())
}

/// Where an extent's file is, as QEMU finds it: an absolute name as it
/// is; a relative one after the descriptor's name as opened, cut after
/// its last '/', joined as strings (`a//b` and `./b` stay as written).
pub(super) fn extent_path(descriptor: &std::path::Path, name: &[u8]) -> PathBuf {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    if name.first() == Some(&b'/') {
        return PathBuf::from(std::ffi::OsStr::from_bytes(name));
    }
    let base = descriptor.as_os_str().as_bytes();
    let dir = match base.iter().rposition(|&c| c == b'/') {
        Some(i) => &base[..=i],
        None => &[][..],
    };
    let mut joined = dir.to_vec();
    joined.extend_from_slice(name);
    PathBuf::from(std::ffi::OsString::from_vec(joined))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent_lines(t: &[u8]) -> Result<Vec<Line<'_>>> {
        let mut v = Vec::new();
        for_each_extent_line(t, |l| {
            v.push(l);
            Ok(())
        })?;
        Ok(v)
    }

    fn lines(t: &str) -> Vec<(u64, &'static str, String, u64)> {
        extent_lines(t.as_bytes())
            .unwrap()
            .into_iter()
            .map(|l| {
                (
                    l.sectors,
                    l.kind.word(),
                    String::from_utf8(l.name.to_vec()).unwrap(),
                    l.offset,
                )
            })
            .collect()
    }

    fn invalid(t: &str) -> String {
        extent_lines(t.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn extent_lines_as_sscanf_reads_them() {
        assert_eq!(
            lines("# x\nRW 8 FLAT \"a b.raw\" 3\r\nRW 16 SPARSE \"s.vmdk\"\n"),
            [
                (8, "FLAT", "a b.raw".into(), 3),
                (16, "SPARSE", "s.vmdk".into(), 0)
            ]
        );
        // Not RW, no sectors, an unknown type: passed over.
        assert_eq!(
            lines("RDONLY 8 FLAT \"a\" 0\nRW 0 FLAT \"a\" 0\nRW -5 VMFS \"a\"\nRW 9 ZERO \"a\"\nNOACCESS 1 FLAT \"a\" 0"),
            []
        );
        // A blank line reads the next one: the extent is there twice.
        assert_eq!(lines("\nRW 8 VMFS \"v\"\n").len(), 2);
        // The offset may be on the next line; a too long access word is
        // cut at 10 bytes and fails to be RW.
        assert_eq!(
            lines("RW 8 FLAT \"f\"\n  7\n"),
            [(8, "FLAT", "f".into(), 7)]
        );
        assert_eq!(lines("RWRWRWRWRWRW 8 FLAT \"f\" 0"), []);
        // An empty name or a missing quote: fewer than 4 conversions.
        assert_eq!(lines("RW 8 FLAT \"\" 0\nRW 8 FLAT f 0\n"), []);
        // Saturating numbers, as strtol.
        assert_eq!(
            lines("RW 99999999999999999999 FLAT \"f\" 0"),
            [(i64::MAX as u64, "FLAT", "f".into(), 0)]
        );
    }

    #[test]
    fn malformed_rw_lines_fail_with_qemus_words() {
        assert_eq!(
            invalid("RW 8 FLAT \"f\"\n"),
            "Invalid extent line: RW 8 FLAT \"f\""
        );
        assert_eq!(
            invalid("x\nRW 8 FLAT \"f\" -1\r\nRW 1 FLAT \"g\" 0"),
            "Invalid extent line: RW 8 FLAT \"f\" -1\r"
        );
        assert_eq!(
            invalid("RW 8 VMFS \"v\" 0"),
            "Invalid extent line: RW 8 VMFS \"v\" 0"
        );
        assert_eq!(
            invalid("RW 8 SPARSE \"s\" 0"),
            "Invalid extent line: RW 8 SPARSE \"s\" 0"
        );
        // The type is checked after the match count.
        assert_eq!(
            invalid("RW 100 ZERO \"f\" 0"),
            "Invalid extent line: RW 100 ZERO \"f\" 0"
        );
        // A SPARSE line followed by a line starting with a number takes
        // it as an offset.
        assert!(invalid("RW 8 SPARSE \"s\"\n12 x\n").starts_with("Invalid"));
    }

    #[test]
    fn extent_paths_join_as_strings() {
        use std::path::Path;
        let p = |d: &str, n: &str| extent_path(Path::new(d), n.as_bytes());
        assert_eq!(p("a.vmdk", "f.raw"), Path::new("f.raw"));
        assert_eq!(p("vx//a.vmdk", "f.raw").to_str(), Some("vx//f.raw"));
        assert_eq!(p("./a.vmdk", "f.raw").to_str(), Some("./f.raw"));
        assert_eq!(p("/x/a.vmdk", "/abs/f").to_str(), Some("/abs/f"));
        assert_eq!(p("/x/a.vmdk", "sub/f").to_str(), Some("/x/sub/f"));
    }

    #[test]
    fn cids_as_sscanf_reads_them() {
        // The last byte of the 10 KiB is made a NUL: pad with one.
        let c = |t: &[u8], k: &[u8]| cid_after(&[t, b"!"].concat(), k);
        assert_eq!(c(b"CID=836df646\n", b"CID"), Some(0x836df646));
        assert_eq!(c(b"parentCID=ffffffff", b"CID"), Some(0xffff_ffff));
        assert_eq!(c(b"CID= \t0x1F", b"CID"), Some(0x1f));
        assert_eq!(c(b"CID=-1", b"CID"), Some(0xffff_ffff));
        assert_eq!(c(b"CID=123456789abcdef01", b"CID"), Some(u32::MAX));
        assert_eq!(c(b"CID=zz", b"CID"), None);
        assert_eq!(c(b"CID", b"CID"), None);
        assert_eq!(c(b"XID=1", b"CID"), None);
        assert_eq!(c(b"CID=12\0CID=34", b"CID"), Some(0x12));
        // The skip steps over a NUL; the key must be before it.
        assert_eq!(c(b"parentCID\x001234abcd", b"parentCID"), Some(0x1234abcd));
        assert_eq!(c(b"x\0CID=1", b"CID"), None);
        // The last byte never counts.
        assert_eq!(cid_after(b"CID=12", b"CID"), Some(1));
        assert_eq!(until_nul(b"ab\0CID=1"), b"ab");
    }

    #[test]
    fn parent_hints_as_qemu_takes_them() {
        let h = |t: &[u8]| parent_hint(t);
        assert_eq!(
            h(b"x\nparentFileNameHint=\"b.vmdk\"\n"),
            Ok(Some(b"b.vmdk".to_vec()))
        );
        assert_eq!(h(b"parentFileNameHint=\"\""), Ok(None));
        assert_eq!(h(b"none"), Ok(None));
        // The value runs to the next quote, across lines; only the first
        // key counts.
        assert_eq!(
            h(b"parentFileNameHint=\"a\nb\"parentFileNameHint=\"c\""),
            Ok(Some(b"a\nb".to_vec()))
        );
        assert_eq!(h(b"parentFileNameHint=\"open"), Err(()));
        assert_eq!(h(b"parentFileNameHint=\"a\0b\""), Err(()));
        assert_eq!(h(b"parentFileNameHint"), Err(()));
        // Two bytes skipped whatever they are, a NUL among them.
        assert_eq!(h(b"parentFileNameHint=\0\"x"), Ok(None));
        let long = [
            b"parentFileNameHint=\"".to_vec(),
            vec![b'a'; 4096],
            b"\"".to_vec(),
        ]
        .concat();
        assert_eq!(h(&long), Err(()));
        let longest = [
            b"parentFileNameHint=\"".to_vec(),
            vec![b'a'; 4095],
            b"\"".to_vec(),
        ]
        .concat();
        assert_eq!(h(&longest), Ok(Some(vec![b'a'; 4095])));
    }

    #[test]
    fn create_types_as_strstr_finds_them() {
        assert_eq!(create_type(b"createType=\"\""), Some(vec![]));
        assert_eq!(create_type(b"createType="), None);
        let long = format!("createType=\"{}\"", "a".repeat(128));
        assert_eq!(create_type(long.as_bytes()), None);
    }
}
