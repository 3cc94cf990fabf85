//! The fuzzing entry point (`fuzz/fuzz_targets/nbd_server.rs`, and a
//! smoke test here): the input is everything one client sends, from its
//! flags on; the server's handshake and transmission code answer it into
//! a sink, on a small raw export (writable, and read-only under "ro").
//! Whatever the bytes, the server must end the connection cleanly: no
//! panic, no hang, no allocation beyond its fixed bounds.

use std::io::{self, Read, Write};
use std::sync::{Arc, OnceLock};

use crate::export::{Export, Exports};
use crate::handshake;
use crate::transmission::{self, Policy};

/// A client stream made of the fuzzer's bytes; replies are discarded.
struct Replay<'a> {
    input: &'a [u8],
}

impl Read for Replay<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Replay<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn exports() -> &'static Arc<Exports> {
    static E: OnceLock<Arc<Exports>> = OnceLock::new();
    E.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("rimg-nbd-fuzz-{}.raw", std::process::id()));
        std::fs::write(&p, vec![0x5a; 1 << 20]).expect("fuzz export file");
        let open = |writable| {
            qcow2::open(
                &p,
                &qcow2::OpenOptions {
                    writable,
                    force_share: true,
                    format: Some(qcow2::Format::Raw),
                    ..Default::default()
                },
            )
            .expect("fuzz export")
        };
        let (rw, ro) = (open(true), open(false));
        // Open: the file needs no name any more.
        let _ = std::fs::remove_file(&p);
        let mut e = Exports::default();
        for (name, img, readonly) in [("", rw, false), ("ro", ro, true)] {
            let x =
                Export::new(name.into(), "fuzz".into(), img, readonly, true).expect("fuzz export");
            e.list.push(Arc::new(x));
        }
        Arc::new(e)
    })
}

/// Serves one client whose whole stream is `data`.
pub fn server(data: &[u8]) {
    let mut s = Replay { input: data };
    if let Ok(session) = handshake::negotiate(&mut s, exports()) {
        let _ = transmission::serve(
            s,
            &session,
            Policy {
                unmap: true,
                aio: crate::Aio::Threads,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_proto::consts::{cmd, opt};
    use nbd_proto::option::{InfoRequest, MetaRequest, OptionHeader};
    use nbd_proto::request::{Headers, Request};

    /// A valid session (extended headers, both contexts, every command),
    /// then the same bytes cut and flipped: the fuzz body's smoke test.
    #[test]
    fn sessions_and_their_mutations_end_cleanly() {
        let mut s = 3u32.to_be_bytes().to_vec();
        s.extend(OptionHeader::encode(opt::EXTENDED_HEADERS, &[]));
        let m = MetaRequest {
            export: String::new(),
            queries: vec!["base:allocation".into(), "qemu:allocation-depth".into()],
        };
        s.extend(OptionHeader::encode(opt::SET_META_CONTEXT, &m.encode()));
        let go = InfoRequest {
            name: String::new(),
            items: vec![3],
        };
        s.extend(OptionHeader::encode(opt::GO, &go.encode()));
        for (kind, len) in [
            (cmd::WRITE, 4096u64),
            (cmd::READ, 8192),
            (cmd::BLOCK_STATUS, 1 << 20),
            (cmd::WRITE_ZEROES, 65536),
            (cmd::TRIM, 4096),
            (cmd::FLUSH, 0),
            (cmd::CACHE, 4096),
        ] {
            let r = Request {
                flags: 0,
                kind,
                cookie: 1,
                offset: 4096,
                len,
            };
            r.encode(Headers::Extended, &mut s);
            if kind == cmd::WRITE {
                s.extend(vec![1u8; len as usize]);
            }
        }
        server(&s);
        let mut x = 0x9e37_79b9u32;
        for i in 0..2000 {
            let mut m = s.clone();
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let at = x as usize % m.len();
            if i % 3 == 0 {
                m.truncate(at);
            } else {
                m[at] ^= (x >> 8) as u8 | 1;
            }
            server(&m);
        }
    }
}
