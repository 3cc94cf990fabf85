//! Clients that break the rules, against the server's handshake and
//! transmission code over a socket pair (requests served one at a time,
//! and on a connection's io_uring): each breach gets the reply the
//! spec gives it, or ends that connection when the framing is lost, and
//! nothing a client sends makes the server allocate by its word, panic or
//! reach outside the exported set.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use nbd_proto::consts::{chunk, cmd, cmd_flags, errno, opt, rep, tflags, IHAVEOPT, NBDMAGIC};
use nbd_proto::option::{InfoRequest, MetaRequest, OptionHeader, ReplyHeader};
use nbd_proto::reply::{self, ReplyHeader as Rh};
use nbd_proto::request::{Headers, Request};
use rimg_nbd::handshake::{self, HandshakeError};
use rimg_nbd::transmission::{self, TransmissionError};
use rimg_nbd::{Aio, Export, Exports, Policy};

/// A 1 MiB raw image exported as "disk" (and read-only as "ro").
fn exports(dir: &std::path::Path) -> Arc<Exports> {
    let p = dir.join("disk.raw");
    std::fs::write(&p, vec![0xabu8; 1 << 20]).unwrap();
    let open = |w: bool| {
        qcow2::open(
            &p,
            &qcow2::OpenOptions {
                writable: w,
                force_share: true,
                format: Some(qcow2::Format::Raw),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let mut e = Exports::default();
    e.list.push(Arc::new(
        Export::new("disk".into(), String::new(), open(true), false, false).unwrap(),
    ));
    e.list.push(Arc::new(
        Export::new("ro".into(), String::new(), open(false), true, false).unwrap(),
    ));
    Arc::new(e)
}

type Served = JoinHandle<Result<(), String>>;

/// A server thread on one end of a socket pair: the handshake, then
/// transmission; its result says how the connection ended.
fn serve(ex: Arc<Exports>) -> (UnixStream, Served) {
    serve_on(ex, false)
}

/// As [`serve`], with requests served on a connection's io_uring
/// (`rimg_nbd::uring`) when `uring`, else one at a time (the path TLS
/// connections take).
fn serve_on(ex: Arc<Exports>, uring: bool) -> (UnixStream, Served) {
    let (c, mut s) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let session = handshake::negotiate(&mut s, &ex).map_err(|e| match e {
            HandshakeError::Io(_) => "io".to_string(),
            e => format!("handshake: {e}"),
        })?;
        let aio = if uring { Aio::IoUring } else { Aio::Threads };
        let policy = Policy { unmap: true, aio };
        let served = match uring {
            true => {
                let ring = rimg_nbd::uring::Ring::new().map_err(|e| format!("ring: {e}"))?;
                let s = qcow2::nbd::Socket::Unix(s);
                rimg_nbd::uring::serve(&s, &session, policy, ring)
            }
            false => transmission::serve(s, &session, policy),
        };
        served.map_err(|e| match e {
            TransmissionError::Io(_) => "io".to_string(),
            e => format!("transmission: {e}"),
        })
    });
    (c, t)
}

struct Client {
    s: UnixStream,
    h: Headers,
}

impl Client {
    fn greet(mut s: UnixStream, flags: u32) -> Client {
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(u64::from_be_bytes(hello[..8].try_into().unwrap()), NBDMAGIC);
        assert_eq!(
            u64::from_be_bytes(hello[8..16].try_into().unwrap()),
            IHAVEOPT
        );
        s.write_all(&flags.to_be_bytes()).unwrap();
        Client {
            s,
            h: Headers::Compact { structured: false },
        }
    }

    /// Sends an option; returns its replies up to the final one.
    fn option(&mut self, o: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.s.write_all(&OptionHeader::encode(o, data)).unwrap();
        let mut v = Vec::new();
        loop {
            let mut h = [0u8; ReplyHeader::LEN];
            self.s.read_exact(&mut h).unwrap();
            let h = ReplyHeader::parse(&h).unwrap();
            assert_eq!(h.option, o);
            let mut d = vec![0u8; h.len as usize];
            self.s.read_exact(&mut d).unwrap();
            let last = h.reply == rep::ACK || rep::is_error(h.reply);
            v.push((h.reply, d));
            if last {
                return v;
            }
        }
    }

    /// Enters transmission on `name`; returns its transmission flags.
    fn go(&mut self, name: &str) -> u16 {
        let r = InfoRequest {
            name: name.into(),
            items: vec![],
        };
        let replies = self.option(opt::GO, &r.encode());
        assert_eq!(replies.last().unwrap().0, rep::ACK, "GO {name}");
        let export = replies
            .iter()
            .find(|(t, d)| *t == rep::INFO && d[..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        u16::from_be_bytes(export.1[10..12].try_into().unwrap())
    }

    fn send(&mut self, req: Request, payload: &[u8]) {
        let mut b = Vec::new();
        req.encode(self.h, &mut b);
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// Sends a request; returns the error value (0 on success) and a
    /// read's data.
    fn request(&mut self, req: Request, payload: &[u8]) -> (u32, Vec<u8>) {
        self.send(req, payload);
        let mut data = Vec::new();
        let mut err = 0;
        loop {
            let mut first = vec![0u8; Rh::first_len(self.h)];
            self.s.read_exact(&mut first).unwrap();
            let hdr = match Rh::parse(&first, self.h).unwrap() {
                Ok(h) => h,
                Err(more) => {
                    let mut full = [0u8; 20];
                    full[..16].copy_from_slice(&first);
                    self.s.read_exact(&mut full[16..16 + more]).unwrap();
                    Rh::structured(&full).unwrap()
                }
            };
            match hdr {
                Rh::Simple { error, cookie } => {
                    assert_eq!(cookie, req.cookie);
                    if error == 0 && req.kind == cmd::READ {
                        data = vec![0u8; req.len as usize];
                        self.s.read_exact(&mut data).unwrap();
                    }
                    return (error, data);
                }
                Rh::Chunk {
                    flags,
                    kind,
                    cookie,
                    len,
                } => {
                    assert_eq!(cookie, req.cookie);
                    let mut p = vec![0u8; len as usize];
                    self.s.read_exact(&mut p).unwrap();
                    if chunk::is_error(kind) {
                        err = reply::parse_error(&p).unwrap().0;
                    } else if kind == chunk::OFFSET_DATA {
                        // A content chunk describes at least one byte.
                        assert!(p.len() >= 9, "OFFSET_DATA chunk of {} bytes", p.len());
                        data.extend_from_slice(&p[8..]);
                    }
                    if flags & 1 != 0 {
                        return (err, data);
                    }
                }
            }
        }
    }
}

fn req(kind: u16, flags: u16, offset: u64, len: u64) -> Request {
    Request {
        flags,
        kind,
        cookie: 0x5eed ^ offset,
        offset,
        len,
    }
}

#[test]
fn handshake_breaches_get_the_specs_answers() {
    let dir = tempfile::tempdir().unwrap();
    let ex = exports(dir.path());

    // Client flags the server never offered: disconnected.
    let (c, t) = serve(ex.clone());
    let _cl = Client::greet(c, 1 << 7);
    assert!(t.join().unwrap().unwrap_err().contains("client flags"));

    // An option too long to read: disconnected before any allocation.
    let (c, t) = serve(ex.clone());
    let mut cl = Client::greet(c, 3);
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&opt::GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    cl.s.write_all(&h).unwrap();
    assert!(t.join().unwrap().unwrap_err().contains("4294967295 bytes"));

    // Malformed INFO, unknown exports (one shaped like a path), contexts
    // before structured replies: error replies, and the handshake goes on.
    let (c, t) = serve(ex.clone());
    let mut cl = Client::greet(c, 3);
    let mut lie = InfoRequest {
        name: "disk".into(),
        items: vec![],
    }
    .encode();
    lie[..4].copy_from_slice(&100u32.to_be_bytes());
    assert_eq!(cl.option(opt::INFO, &lie)[0].0, rep::ERR_INVALID);
    for name in ["nope", "../disk", "disk\0"] {
        let r = InfoRequest {
            name: name.into(),
            items: vec![],
        };
        assert_eq!(
            cl.option(opt::GO, &r.encode())[0].0,
            rep::ERR_UNKNOWN,
            "{name}"
        );
    }
    let m = MetaRequest {
        export: "disk".into(),
        queries: vec!["base:allocation".into()],
    };
    assert_eq!(
        cl.option(opt::SET_META_CONTEXT, &m.encode())[0].0,
        rep::ERR_INVALID
    );
    assert_eq!(cl.option(opt::LIST, b"x")[0].0, rep::ERR_INVALID);
    assert_eq!(cl.option(99, &[1, 2, 3])[0].0, rep::ERR_UNSUP);
    let listed = cl.option(opt::LIST, &[]);
    assert_eq!(listed.len(), 3, "two exports and the ack");
    assert_eq!(cl.option(opt::STRUCTURED_REPLY, &[])[0].0, rep::ACK);
    let set = cl.option(opt::SET_META_CONTEXT, &m.encode());
    assert_eq!(
        set.iter().map(|r| r.0).collect::<Vec<_>>(),
        [rep::META_CONTEXT, rep::ACK]
    );
    cl.go("disk");
    drop(cl);
    assert_eq!(t.join().unwrap(), Ok(()));

    // NBD_OPT_EXPORT_NAME cannot return an error: an unknown name ends
    // the connection.
    let (c, t) = serve(ex);
    let mut cl = Client::greet(c, 3);
    cl.s.write_all(&OptionHeader::encode(opt::EXPORT_NAME, b"../disk"))
        .unwrap();
    assert!(t.join().unwrap().unwrap_err().contains("does not exist"));
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let ex = exports(dir.path());
    for (structured, uring) in [(false, false), (true, false), (false, true), (true, true)] {
        let (c, t) = serve_on(ex.clone(), uring);
        let mut cl = Client::greet(c, 3);
        if structured {
            assert_eq!(cl.option(opt::STRUCTURED_REPLY, &[])[0].0, rep::ACK);
            cl.h = Headers::Compact { structured: true };
        }
        let flags = cl.go("disk");
        // DF means something only with structured replies.
        assert_eq!(flags & tflags::SEND_DF != 0, structured, "{flags:#x}");
        let size = 1u64 << 20;
        let mut expect = |r: Request, payload: &[u8], want: u32| {
            assert_eq!(
                cl.request(r, payload).0,
                want,
                "{r:?}, structured {structured}, uring {uring}"
            );
        };
        expect(req(cmd::READ, 0, size - 512, 1024), &[], errno::EINVAL);
        expect(req(cmd::READ, 0, u64::MAX - 10, 100), &[], errno::EINVAL);
        expect(req(cmd::WRITE, 0, size - 2, 4), &[1; 4], errno::ENOSPC);
        expect(req(cmd::WRITE_ZEROES, 0, size, 1), &[], errno::ENOSPC);
        expect(req(42, 0, 0, 1), &[], errno::EINVAL);
        expect(req(cmd::READ, 1 << 9, 0, 1), &[], errno::EINVAL);
        expect(req(cmd::READ, 0, 0, 64 << 20), &[], errno::EOVERFLOW);
        // Block status needs a selected context.
        expect(req(cmd::BLOCK_STATUS, 0, 0, 4096), &[], errno::EINVAL);
        // A raw file's range is zeroed with one fallocate: fast.
        expect(
            req(cmd::WRITE_ZEROES, cmd_flags::FAST_ZERO, 0, 4096),
            &[],
            0,
        );
        // The connection still works: a write and its read-back.
        expect(req(cmd::WRITE, cmd_flags::FUA, 4096, 8), &[7; 8], 0);
        let (e, d) = cl.request(req(cmd::READ, 0, 4092, 16), &[]);
        assert_eq!(e, 0);
        // The fast zeroing above reached 4096.
        assert_eq!(d, [&[0; 4][..], &[7; 8], &[0xab; 4]].concat());
        let (e, d) = cl.request(req(cmd::READ, 0, 0, 0), &[]);
        assert_eq!((e, d.len()), (0, 0));
        // NBD_CMD_DISC has no reply: the server ends the connection.
        cl.send(req(cmd::DISC, 0, 0, 0), &[]);
        assert_eq!(
            t.join().unwrap(),
            Ok(()),
            "structured {structured}, uring {uring}"
        );
    }
}

#[test]
fn read_only_exports_refuse_writes_after_taking_their_payload() {
    let dir = tempfile::tempdir().unwrap();
    let ex = exports(dir.path());
    for uring in [false, true] {
        ro_refuses(&ex, uring);
    }
}

fn ro_refuses(ex: &Arc<Exports>, uring: bool) {
    let (c, t) = serve_on(ex.clone(), uring);
    let mut cl = Client::greet(c, 3);
    cl.go("ro");
    assert_eq!(
        cl.request(req(cmd::WRITE, 0, 0, 4096), &[1; 4096]).0,
        errno::EPERM
    );
    assert_eq!(cl.request(req(cmd::TRIM, 0, 0, 4096), &[]).0, errno::EPERM);
    assert_eq!(
        cl.request(req(cmd::WRITE_ZEROES, 0, 0, 4096), &[]).0,
        errno::EPERM
    );
    let (e, d) = cl.request(req(cmd::READ, 0, 0, 4096), &[]);
    assert_eq!((e, d), (0, vec![0xab; 4096]));
    drop(cl);
    assert_eq!(t.join().unwrap(), Ok(()));
}

#[test]
fn framing_breaches_end_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ex = exports(dir.path());
    for uring in [false, true] {
        // A payload over the 32 MiB limit: not read, the connection ends.
        let (c, t) = serve_on(ex.clone(), uring);
        let mut cl = Client::greet(c, 3);
        cl.go("disk");
        cl.send(req(cmd::WRITE, 0, 0, (32 << 20) + 1), &[]);
        assert!(t.join().unwrap().unwrap_err().contains("over the"));
        // A bad magic: the stream cannot be followed any more.
        let (c, t) = serve_on(ex.clone(), uring);
        let mut cl = Client::greet(c, 3);
        cl.go("disk");
        cl.s.write_all(&[0x55; 28]).unwrap();
        assert!(t.join().unwrap().unwrap_err().contains("magic"));
    }
}
