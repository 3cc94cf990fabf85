//! The client against scripted servers: replies that break the rules
//! the client enforces (found by an outside review) are errors, never
//! data.

use std::io::{self, Read, Write};

use super::{Client, Duplex};

#[derive(Debug)]
struct Script {
    input: Vec<u8>,
    at: usize,
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.input.len() - self.at);
        buf[..n].copy_from_slice(&self.input[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Duplex for Script {}

fn rep(o: u32, t: u32, d: &[u8]) -> Vec<u8> {
    let mut v = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    v.extend(o.to_be_bytes());
    v.extend(t.to_be_bytes());
    v.extend((d.len() as u32).to_be_bytes());
    v.extend(d);
    v
}

/// A server that refuses extended headers, takes structured replies,
/// has no contexts, and exports `size` bytes; then `replies`.
fn server(size: u64, replies: &[u8]) -> Vec<u8> {
    let mut v = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
    v.extend(0x4948_4156_454f_5054u64.to_be_bytes());
    v.extend(3u16.to_be_bytes());
    v.extend(rep(11, (1 << 31) + 1, b""));
    v.extend(rep(8, 1, b""));
    v.extend(rep(10, 1, b""));
    let mut info = 0u16.to_be_bytes().to_vec();
    info.extend(size.to_be_bytes());
    info.extend(0x0001u16.to_be_bytes());
    v.extend(rep(7, 3, &info));
    v.extend(rep(7, 1, b""));
    v.extend(replies);
    v
}

/// A structured chunk answering request `cookie`.
fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = 0x668e_33efu32.to_be_bytes().to_vec();
    v.extend(flags.to_be_bytes());
    v.extend(kind.to_be_bytes());
    v.extend(cookie.to_be_bytes());
    v.extend((payload.len() as u32).to_be_bytes());
    v.extend(payload);
    v
}

fn data(off: u64, bytes: &[u8]) -> Vec<u8> {
    let mut p = off.to_be_bytes().to_vec();
    p.extend(bytes);
    p
}

fn read_with(replies: &[u8]) -> io::Result<Vec<u8>> {
    let s = Box::new(Script {
        input: server(1 << 20, replies),
        at: 0,
    });
    let c = Client::over_stream(s, "", false)?;
    let mut buf = vec![0x77u8; 8192];
    c.read(&mut buf, 0)?;
    Ok(buf)
}

#[test]
fn reads_must_be_covered_once_and_whole() {
    // Whole: two data chunks.
    let ok = [
        chunk(0, 1, 1, &data(0, &[1; 4096])),
        chunk(1, 1, 1, &data(4096, &[2; 4096])),
    ]
    .concat();
    let buf = read_with(&ok).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 1) && buf[4096..].iter().all(|&b| b == 2));
    // Half, then done: stale bytes must not pass for data.
    let half = [chunk(0, 1, 1, &data(0, &[1; 4096])), chunk(1, 0, 1, b"")].concat();
    assert!(read_with(&half)
        .unwrap_err()
        .to_string()
        .contains("covered 4096 of 8192"));
    // Overlapping chunks.
    let overlap = [
        chunk(0, 1, 1, &data(0, &[1; 4096])),
        chunk(1, 1, 1, &data(2048, &[2; 6144])),
    ]
    .concat();
    assert!(read_with(&overlap).is_err());
    // A simple reply to a read once structured replies are agreed.
    let mut simple = 0x6744_6698u32.to_be_bytes().to_vec();
    simple.extend(0u32.to_be_bytes());
    simple.extend(1u64.to_be_bytes());
    simple.extend([0u8; 8192]);
    assert!(read_with(&simple).is_err());
    // NONE without DONE.
    let none = [chunk(0, 0, 1, b""), chunk(1, 1, 1, &data(0, &[1; 8192]))].concat();
    assert!(read_with(&none).is_err());
}

#[test]
fn an_export_too_large_for_a_file_offset_is_refused() {
    let s = Box::new(Script {
        input: server(u64::MAX, b""),
        at: 0,
    });
    let e = Client::over_stream(s, "", false).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EFBIG));
}
