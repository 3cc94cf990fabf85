//! The client's fuzzing entry point (`fuzz_targets::nbd_client`): the
//! input is everything a server sends, from its greeting on; the client
//! does its handshake and a few requests of each kind against it. A
//! hostile server must get errors, never a panic, a hang, or an
//! allocation beyond the client's bounds.

use std::io::{self, Read, Write};

use super::client::{Client, Duplex};

/// A server made of the fuzzer's bytes; what the client sends is
/// discarded.
#[derive(Debug)]
struct Replay {
    input: Vec<u8>,
    at: usize,
}

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.input.len() - self.at);
        buf[..n].copy_from_slice(&self.input[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Write for Replay {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Duplex for Replay {}

/// One client session against a server whose whole output is `data`,
/// then a listing of its exports (`rimg-nbd --list`) against the same
/// bytes.
pub fn client(data: &[u8]) {
    let listing = Box::new(Replay {
        input: data.to_vec(),
        at: 0,
    });
    let _ = super::client::list_over_stream(listing);
    let s = Box::new(Replay {
        input: data.to_vec(),
        at: 0,
    });
    let Ok(c) = Client::over_stream(s, "disk", false) else {
        return;
    };
    let mut buf = vec![0u8; 8192.min(c.size as usize)];
    let _ = c.read(&mut buf, 0);
    let _ = c.data_at(0, c.size.max(1));
    let _ = c.write(&buf, 0);
    let _ = c.write_zeroes(0, 4096, true);
    let _ = c.trim(0, 4096);
    let _ = c.flush();
    let tail = c.size.saturating_sub(buf.len() as u64);
    let _ = c.read(&mut buf, tail);
}
