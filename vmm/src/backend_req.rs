//! The vhost-user backend request channel (protocol feature
//! BACKEND_REQ): a socket pair whose other end the backend received with
//! SET_BACKEND_REQ_FD, on which it sends requests to the VMM. The VMM
//! serves one request, CONFIG_CHANGE_MSG (the device's configuration space
//! changed, e.g. a disk was resized); see [`serve`] for the exact wire
//! behaviour.
//!
//! The parser is the VMM's own rather than the vhost crate's
//! `FrontendReqHandler`: that one rejects a request code it does not know
//! before reading its body (so it can neither answer it nor stay in step
//! with the stream) and reports an unknown request and a broken framing
//! with the same error, while this channel must answer the first, skip it
//! and carry on, and close on the second.

use std::io::{ErrorKind, Read, Write};

/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
pub const CONFIG_CHANGE_MSG: u32 = 2;
/// Header: request, flags, payload size (u32 each, little-endian).
const HEADER_LEN: usize = 12;
/// The protocol version, in the flags' low two bits.
const VERSION: u32 = 1;
const VERSION_MASK: u32 = 0x3;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// Largest payload skipped for a request the VMM does not serve: the
/// specified backend requests carry at most a few dozen bytes. More is
/// taken for a broken stream.
const MAX_SKIPPED: u32 = 4096;

/// Why the VMM stopped serving a channel (it then closes it).
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("reading a request: {0}")]
    Read(std::io::Error),
    #[error("sending the reply to request {request}: {source}")]
    Reply {
        request: u32,
        source: std::io::Error,
    },
    #[error("message cut short: {got} of {want} bytes, then end of stream")]
    Truncated { got: usize, want: usize },
    #[error("request {request} with protocol version {version} (expected 1)")]
    Version { request: u32, version: u32 },
    #[error("request {request} has the REPLY flag (a reply where a request belongs)")]
    UnexpectedReply { request: u32 },
    #[error("CONFIG_CHANGE_MSG with a {size}-byte payload (expected none)")]
    ConfigChangeSize { size: u32 },
    #[error("request {request} with a {size}-byte payload (more than {MAX_SKIPPED})")]
    TooLarge { request: u32, size: u32 },
}

/// One request off the channel (its payload already consumed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Request {
    request: u32,
    need_reply: bool,
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_upto(ch: &mut impl Read, buf: &mut [u8]) -> Result<usize, ChannelError> {
    let mut got = 0;
    while got < buf.len() {
        match ch.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(ChannelError::Read(e)),
        }
    }
    Ok(got)
}

/// The next request, validated and with its payload consumed (none for
/// CONFIG_CHANGE_MSG; skipped for others); `None` when the backend
/// closed its end. Descriptors a backend attaches are never received:
/// `read` on a Unix socket leaves them to the kernel, which closes them.
fn next_request(ch: &mut impl Read) -> Result<Option<Request>, ChannelError> {
    let mut h = [0u8; HEADER_LEN];
    match read_upto(ch, &mut h)? {
        0 => return Ok(None),
        HEADER_LEN => {}
        got => {
            return Err(ChannelError::Truncated {
                got,
                want: HEADER_LEN,
            })
        }
    }
    let field = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let (request, flags, size) = (field(0), field(4), field(8));
    if flags & VERSION_MASK != VERSION {
        return Err(ChannelError::Version {
            request,
            version: flags & VERSION_MASK,
        });
    }
    if flags & FLAG_REPLY != 0 {
        return Err(ChannelError::UnexpectedReply { request });
    }
    if request == CONFIG_CHANGE_MSG && size != 0 {
        return Err(ChannelError::ConfigChangeSize { size });
    }
    if size > MAX_SKIPPED {
        return Err(ChannelError::TooLarge { request, size });
    }
    let mut payload = [0u8; MAX_SKIPPED as usize];
    let payload = &mut payload[..size as usize];
    let got = read_upto(ch, payload)?;
    if got < payload.len() {
        return Err(ChannelError::Truncated {
            got: HEADER_LEN + got,
            want: HEADER_LEN + payload.len(),
        });
    }
    Ok(Some(Request {
        request,
        need_reply: flags & FLAG_NEED_REPLY != 0,
    }))
}

/// The REPLY_ACK answer to `request`: a u64, 0 for success, 1 for
/// failure (as QEMU answers), in one write.
fn reply(ch: &mut impl Write, request: u32, ok: bool) -> std::io::Result<()> {
    let mut m = [0u8; HEADER_LEN + 8];
    m[0..4].copy_from_slice(&request.to_le_bytes());
    m[4..8].copy_from_slice(&(VERSION | FLAG_REPLY).to_le_bytes());
    m[8..12].copy_from_slice(&8u32.to_le_bytes());
    m[12..].copy_from_slice(&u64::from(!ok).to_le_bytes());
    ch.write_all(&m)
}

/// Serves a backend's request channel until the backend closes it
/// (`Ok`) or breaks the protocol (`Err`: the caller logs it and drops
/// the channel, which closes it; the device itself carries on).
///
/// On the wire:
/// - CONFIG_CHANGE_MSG (2), no payload: `config_changed` runs (it fetches
///   the config space with GET_CONFIG and tells the driver); then, if the
///   message has NEED_REPLY, the reply: same request code, flags
///   VERSION 1 | REPLY, a u64 payload, 0 if `config_changed` succeeded
///   and 1 if not. The reply is sent whether or not REPLY_ACK was
///   negotiated (the backend asked for it), and only after GET_CONFIG:
///   a backend that waits for it must go on serving its main socket.
/// - Any other request with a payload of at most 4096 bytes: logged and
///   skipped; with NEED_REPLY, the reply carries 1.
/// - A header that is not version 1, has REPLY set, a CONFIG_CHANGE_MSG
///   with a payload, a larger payload, or a stream that ends inside a
///   message: `Err`.
///
/// `name` names the backend in the log.
pub fn serve<C: Read + Write, E: std::fmt::Display>(
    ch: &mut C,
    name: &str,
    mut config_changed: impl FnMut() -> Result<(), E>,
) -> Result<(), ChannelError> {
    while let Some(req) = next_request(ch)? {
        let ok = match req.request {
            CONFIG_CHANGE_MSG => match config_changed() {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("rimg-vmm: backend {name}: configuration change: {e}");
                    false
                }
            },
            other => {
                eprintln!("rimg-vmm: backend {name}: request {other} not supported; ignored");
                false
            }
        };
        if req.need_reply {
            reply(ch, req.request, ok).map_err(|source| ChannelError::Reply {
                request: req.request,
                source,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn msg(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    /// Serves `input` (then end of stream) with a handler answering
    /// `handler_ok`; returns the result, the handler's calls and what the
    /// VMM wrote back.
    fn run(input: &[u8], handler_ok: bool) -> (Result<(), ChannelError>, usize, Vec<u8>) {
        let (mut vmm, mut backend) = UnixStream::pair().unwrap();
        backend.write_all(input).unwrap();
        backend.shutdown(std::net::Shutdown::Write).unwrap();
        let mut calls = 0;
        let r = serve(&mut vmm, "test", || {
            calls += 1;
            if handler_ok {
                Ok(())
            } else {
                Err("GET_CONFIG failed")
            }
        });
        drop(vmm);
        let mut out = Vec::new();
        // A channel closed with a request still unread is reset.
        if let Err(e) = backend.read_to_end(&mut out) {
            assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        }
        (r, calls, out)
    }

    fn ack(request: u32, value: u64) -> Vec<u8> {
        msg(request, 0x5, &value.to_le_bytes())
    }

    #[test]
    fn config_change_runs_the_handler_and_answers_only_when_asked() {
        let (r, calls, out) = run(&msg(2, 1, &[]), true);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!((calls, out), (1, vec![]));
        let mut two = msg(2, 1 | 8, &[]);
        two.extend(msg(2, 1 | 8, &[]));
        let (r, calls, out) = run(&two, true);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(calls, 2);
        assert_eq!(out, [ack(2, 0), ack(2, 0)].concat());
        // The handler failed: 1 in the reply, and the channel stays.
        let mut fail = msg(2, 1 | 8, &[]);
        fail.extend(msg(2, 1, &[]));
        let (r, calls, out) = run(&fail, false);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!((calls, out), (2, ack(2, 1)));
    }

    #[test]
    fn other_requests_are_skipped_and_refused_when_a_reply_is_asked() {
        // IOTLB_MSG with a payload, an unknown code, then a config change.
        let mut m = msg(1, 1 | 8, &[7; 64]);
        m.extend(msg(0xdead, 1, &[1; 3]));
        m.extend(msg(99, 1 | 8, &[]));
        m.extend(msg(2, 1 | 8, &[]));
        let (r, calls, out) = run(&m, true);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(calls, 1);
        assert_eq!(out, [ack(1, 1), ack(99, 1), ack(2, 0)].concat());
    }

    #[test]
    fn malformed_messages_end_the_channel() {
        let cases: [(Vec<u8>, &str); 7] = [
            (msg(2, 0, &[]), "protocol version 0"),
            (msg(2, 2 | 8, &[]), "protocol version 2"),
            (msg(2, 1 | 4, &[]), "REPLY flag"),
            (msg(2, 1 | 8, &[0; 8]), "8-byte payload"),
            (msg(5, 1, &[0; 4097]), "4097-byte payload"),
            (msg(2, 1, &[])[..7].to_vec(), "7 of 12 bytes"),
            (msg(3, 1, &[0; 40])[..30].to_vec(), "30 of 52 bytes"),
        ];
        for (input, want) in cases {
            let (r, calls, out) = run(&input, true);
            let e = r.expect_err(want).to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
            assert_eq!((calls, out), (0, vec![]), "{want}");
        }
        // What came before the bad message was served.
        let mut m = msg(2, 1 | 8, &[]);
        m.extend(msg(2, 3, &[]));
        m.extend(msg(2, 1 | 8, &[]));
        let (r, calls, out) = run(&m, true);
        assert!(r.is_err());
        assert_eq!((calls, out), (1, ack(2, 0)));
    }

    #[test]
    fn reply_layout_is_the_vhost_user_one() {
        let mut out = Vec::new();
        reply(&mut out, 2, true).unwrap();
        assert_eq!(
            out,
            [2, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
