//! Model checking of the NBD client's pipelining with shuttle
//! (`qcow2/src/nbd/client/transport.rs`): threads share one connection
//! to a scripted server that answers every read in two chunks,
//! interleaved across requests and in reverse order. Shuttle explores
//! the interleavings of the client threads and the server; a lost
//! wake-up is a deadlock it reports, a payload read by the wrong thread
//! is wrong data. Run with
//! `cargo test -p rimg-qcow2 --features shuttle --test nbd_model`.
//!
//! The pipes hold 64 bytes, so writers block until the other side
//! reads, as on a socket whose buffers are full; a write request's
//! payload and every read reply outgrow them.
//!
//! - `interleaved_replies_reach_their_readers`: the stream split (as a
//!   socket is): requests go out while other threads read replies; two
//!   readers and a writer (answered with a simple reply) per run.
//! - `an_unsplit_stream_serializes_without_hanging`: one handle for both
//!   directions (as TLS is), against a server that answers in order and
//!   reads no request while its reply is unread (as rimg-nbd's): a
//!   reader and a writer.
//! - `a_reply_for_no_request_fails_every_waiter`: a stray cookie
//!   poisons the connection; every thread gets the protocol error, none
//!   hangs.
#![cfg(feature = "shuttle")]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::Arc;

use qcow2::nbd::client::{Client, Duplex, Sink};
use rimg_model::{explore, schedules};
use shuttle::sync::{Condvar, Mutex};

const SIZE: u64 = 1 << 20;
const LEN: usize = 1024;
/// What a pipe holds before its writer blocks.
const CAP: usize = 64;

/// One direction of a connection: bytes in order, blocking reads and
/// writes; once closed (the client gone), writes are dropped and reads
/// at the end return nothing.
#[derive(Default)]
struct Pipe {
    buf: Mutex<(VecDeque<u8>, bool)>,
    cv: Condvar,
}

impl Pipe {
    fn put(&self, mut b: &[u8]) {
        let mut g = self.buf.lock().unwrap();
        while !b.is_empty() && !g.1 {
            while g.0.len() >= CAP && !g.1 {
                g = self.cv.wait(g).unwrap();
            }
            let n = b.len().min(CAP - g.0.len());
            g.0.extend(&b[..n]);
            b = &b[n..];
            self.cv.notify_all();
        }
    }

    fn get(&self, out: &mut [u8]) -> usize {
        let mut g = self.buf.lock().unwrap();
        while g.0.is_empty() && !g.1 {
            g = self.cv.wait(g).unwrap();
        }
        let n = out.len().min(g.0.len());
        for (o, b) in out.iter_mut().zip(g.0.drain(..n)) {
            *o = b;
        }
        self.cv.notify_all();
        n
    }

    fn close(&self) {
        self.buf.lock().unwrap().1 = true;
        self.cv.notify_all();
    }

    fn take(&self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        let mut at = 0;
        while at < n {
            let got = self.get(&mut v[at..]);
            assert!(got > 0, "the client closed mid-message");
            at += got;
        }
        v
    }
}

/// The client's end.
struct End {
    from_server: Arc<Pipe>,
    to_server: Arc<Pipe>,
    split: bool,
}

impl std::fmt::Debug for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("End")
    }
}

impl Drop for End {
    fn drop(&mut self) {
        self.from_server.close();
        self.to_server.close();
    }
}

impl Read for End {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        Ok(self.from_server.get(b))
    }
}

impl Write for End {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.to_server.put(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Half(Arc<Pipe>);

impl std::fmt::Debug for Half {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Half")
    }
}

impl Write for Half {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.put(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Duplex for End {
    fn split(&self) -> Option<Box<dyn Sink>> {
        self.split
            .then(|| Box::new(Half(self.to_server.clone())) as Box<dyn Sink>)
    }
}

fn option_reply(o: u32, t: u32, d: &[u8]) -> Vec<u8> {
    let mut v = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    v.extend(o.to_be_bytes());
    v.extend(t.to_be_bytes());
    v.extend((d.len() as u32).to_be_bytes());
    v.extend(d);
    v
}

/// The greeting: fixed newstyle, no zeroes.
fn greeting() -> Vec<u8> {
    let mut v = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
    v.extend(0x4948_4156_454f_5054u64.to_be_bytes());
    v.extend(3u16.to_be_bytes());
    v
}

/// The reply to option `o`: no extended headers, structured replies, no
/// contexts, an export of SIZE bytes.
fn answer(o: u32) -> Vec<u8> {
    match o {
        11 => option_reply(11, (1 << 31) + 1, b""),
        7 => {
            let mut info = 0u16.to_be_bytes().to_vec();
            info.extend(SIZE.to_be_bytes());
            info.extend(0x0001u16.to_be_bytes());
            let mut v = option_reply(7, 3, &info);
            v.extend(option_reply(7, 1, b""));
            v
        }
        o => option_reply(o, 1, b""),
    }
}

/// A byte of the export: what every read must return.
fn byte(off: u64) -> u8 {
    (off % 251) as u8
}

fn data_chunk(cookie: u64, off: u64, n: usize, done: bool) -> Vec<u8> {
    let mut v = 0x668e_33efu32.to_be_bytes().to_vec();
    v.extend((done as u16).to_be_bytes());
    v.extend(1u16.to_be_bytes());
    v.extend(cookie.to_be_bytes());
    v.extend(((8 + n) as u32).to_be_bytes());
    v.extend(off.to_be_bytes());
    v.extend((off..off + n as u64).map(byte));
    v
}

/// The server: reads the client's handshake, then `reads` read
/// requests in batches of `batch`, and answers each batch in two chunks
/// per request: every request's first half (last request first), then
/// every second half. With `stray`, a chunk for a cookie never sent
/// comes before the first batch's answers.
fn serve(from_client: Arc<Pipe>, to_client: Arc<Pipe>, reads: usize, batch: usize, stray: bool) {
    to_client.put(&greeting());
    from_client.take(4);
    loop {
        let h = from_client.take(16);
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        from_client.take(len as usize);
        to_client.put(&answer(opt));
        if opt == 7 {
            break;
        }
    }
    let mut left = reads;
    let mut stray = stray;
    while left > 0 {
        let mut reqs = Vec::new();
        let mut writes = Vec::new();
        for _ in 0..batch.min(left) {
            let r = from_client.take(28);
            let kind = u16::from_be_bytes(r[6..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
            let off = u64::from_be_bytes(r[16..24].try_into().unwrap());
            let len = u32::from_be_bytes(r[24..28].try_into().unwrap()) as usize;
            left -= 1;
            if kind == 1 {
                let data = from_client.take(len);
                assert!(
                    data.iter().zip(off..).all(|(&b, o)| b == byte(o)),
                    "a write's payload arrived changed"
                );
                writes.push(cookie);
            } else {
                reqs.push((cookie, off, len));
            }
        }
        if std::mem::take(&mut stray) {
            to_client.put(&data_chunk(999, 0, 8, true));
        }
        for cookie in writes {
            let mut v = 0x6744_6698u32.to_be_bytes().to_vec();
            v.extend(0u32.to_be_bytes());
            v.extend(cookie.to_be_bytes());
            to_client.put(&v);
        }
        let half = LEN / 2;
        for &(cookie, off, _) in reqs.iter().rev() {
            to_client.put(&data_chunk(cookie, off, half, false));
        }
        for &(cookie, off, len) in &reqs {
            to_client.put(&data_chunk(cookie, off + half as u64, len - half, true));
        }
    }
}

/// `threads` threads over one connection, the first a writer and the
/// others readers, each of LEN bytes at its own offset; returns each
/// one's error (the data of reads that succeeded is checked). An
/// unsplit stream gets its replies request by request, as servers that
/// answer in order give them.
fn run(threads: usize, split: bool, stray: bool) -> Vec<Option<String>> {
    let batch = if split { threads } else { 1 };
    let from_server = Arc::new(Pipe::default());
    let to_server = Arc::new(Pipe::default());
    let server = {
        let (a, b) = (to_server.clone(), from_server.clone());
        shuttle::thread::spawn(move || serve(a, b, threads, batch, stray))
    };
    let end = End {
        from_server,
        to_server,
        split,
    };
    let c = Arc::new(Client::over_stream(Box::new(end), "", false).expect("handshake"));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let c = c.clone();
            shuttle::thread::spawn(move || {
                let off = (i * 4 * LEN) as u64 + 3;
                let want: Vec<u8> = (off..off + LEN as u64).map(byte).collect();
                if i == 0 {
                    return c.write(&want, off).err().map(|e| e.to_string());
                }
                let mut buf = vec![0u8; LEN];
                let r = c.read(&mut buf, off);
                if r.is_ok() {
                    assert!(buf == want, "reader {i} got another request's data");
                }
                r.err().map(|e| e.to_string())
            })
        })
        .collect();
    let errors = handles.into_iter().map(|t| t.join().unwrap()).collect();
    // The connection closes: a server still writing replies nobody
    // reads (after a poisoning) ends.
    drop(c);
    server.join().unwrap();
    errors
}

fn all_ok(errors: Vec<Option<String>>) {
    assert!(errors.iter().all(Option::is_none), "{errors:?}");
}

#[test]
fn interleaved_replies_reach_their_readers() {
    explore(|| all_ok(run(3, true, false)), 2000, 1000);
}

#[test]
fn an_unsplit_stream_serializes_without_hanging() {
    explore(|| all_ok(run(2, false, false)), 1000, 500);
}

#[test]
fn a_reply_for_no_request_fails_every_waiter() {
    shuttle::check_random(
        || {
            for e in run(3, true, true) {
                let e = e.expect("a call succeeded on a poisoned connection");
                assert!(
                    e.contains("never sent") || e.contains("protocol error"),
                    "{e}"
                );
            }
        },
        schedules(1000),
    );
}
