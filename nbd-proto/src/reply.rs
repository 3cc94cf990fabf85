//! Transmission replies (§Simple reply message, §Structured reply chunk
//! message, §Extended reply chunk message, §Structured reply types).
//! Encoders append a header to a buffer; the caller appends the payload
//! it announced.

use crate::consts::{chunk, EXTENDED_REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};
use crate::request::Headers;
use crate::wire::{Cursor, Put, WireError};

/// A simple reply's 16 bytes (no payload follows but a read's data).
pub fn simple(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.put32(SIMPLE_REPLY_MAGIC);
    out.put32(error);
    out.put64(cookie);
}

/// The header of one reply chunk with a payload of `len` bytes: a
/// structured chunk, or an extended one (which repeats the request's
/// `offset`).
pub fn chunk_header(
    out: &mut Vec<u8>,
    h: Headers,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) {
    match h {
        Headers::Extended => {
            out.put32(EXTENDED_REPLY_MAGIC);
            out.put16(flags);
            out.put16(kind);
            out.put64(cookie);
            out.put64(offset);
            out.put64(len);
        }
        Headers::Compact { .. } => {
            debug_assert!(h.structured());
            debug_assert!(len <= u32::MAX as u64);
            out.put32(STRUCTURED_REPLY_MAGIC);
            out.put16(flags);
            out.put16(kind);
            out.put64(cookie);
            out.put32(len as u32);
        }
    }
}

/// The payload of an error chunk: errno and a message for humans.
pub fn error_payload(out: &mut Vec<u8>, error: u32, msg: &str) {
    let mut end = msg.len().min(crate::MAX_STRING);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    out.put32(error);
    out.put16(end as u16);
    out.extend_from_slice(&msg.as_bytes()[..end]);
}

/// A block status chunk's payload for one context: `extents` as
/// (length, flags) descriptors, 32-bit or (extended) 64-bit.
pub fn block_status_payload(out: &mut Vec<u8>, h: Headers, context: u32, extents: &[(u64, u32)]) {
    out.put32(context);
    match h {
        Headers::Extended => {
            out.put32(extents.len() as u32);
            for &(len, flags) in extents {
                out.put64(len);
                out.put64(flags.into());
            }
        }
        Headers::Compact { .. } => {
            for &(len, flags) in extents {
                debug_assert!(len <= u32::MAX as u64);
                out.put32(len as u32);
                out.put32(flags);
            }
        }
    }
}

/// A decoded reply header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        /// The payload length that follows.
        len: u64,
    },
}

impl ReplyHeader {
    /// How many bytes to read first: a simple reply and a structured
    /// chunk share their first 16, which tell which one it is.
    pub fn first_len(h: Headers) -> usize {
        match h {
            Headers::Extended => 32,
            Headers::Compact { .. } => 16,
        }
    }

    /// Decodes `b` (of `first_len` bytes); returns the header, or for a
    /// structured chunk how many more header bytes to read and pass to
    /// [`ReplyHeader::structured_rest`].
    pub fn parse(b: &[u8], h: Headers) -> Result<Result<ReplyHeader, usize>, WireError> {
        let mut c = Cursor::new(b);
        let magic = c.u32()?;
        match (magic, h) {
            (EXTENDED_REPLY_MAGIC, Headers::Extended) => {
                let flags = c.u16()?;
                let kind = c.u16()?;
                let cookie = c.u64()?;
                let _offset = c.u64()?;
                let len = c.u64()?;
                Ok(Ok(ReplyHeader::Chunk {
                    flags,
                    kind,
                    cookie,
                    len,
                }))
            }
            (SIMPLE_REPLY_MAGIC, Headers::Compact { .. }) => Ok(Ok(ReplyHeader::Simple {
                error: c.u32()?,
                cookie: c.u64()?,
            })),
            (STRUCTURED_REPLY_MAGIC, Headers::Compact { structured: true }) => Ok(Err(4)),
            _ => Err(WireError::Magic {
                what: "reply",
                got: magic.into(),
            }),
        }
    }

    /// A structured chunk from its 20 header bytes.
    pub fn structured(b: &[u8; 20]) -> Result<ReplyHeader, WireError> {
        let mut c = Cursor::new(b);
        let _magic = c.u32()?;
        Ok(ReplyHeader::Chunk {
            flags: c.u16()?,
            kind: c.u16()?,
            cookie: c.u64()?,
            len: c.u32()?.into(),
        })
    }
}

/// An error chunk's payload: errno and message.
pub fn parse_error(payload: &[u8]) -> Result<(u32, String), WireError> {
    let mut c = Cursor::new(payload);
    let err = c.u32()?;
    let len = c.u16()? as usize;
    let msg = String::from_utf8_lossy(c.bytes(len)?).into_owned();
    Ok((err, msg))
}

/// Whether a chunk type is one the spec lets a client skip as an error.
pub fn is_error_chunk(kind: u16) -> bool {
    chunk::is_error(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_headers_have_their_lengths() {
        let mut b = Vec::new();
        chunk_header(&mut b, Headers::Compact { structured: true }, 1, 0, 7, 0, 0);
        assert_eq!(b.len(), 20);
        b.clear();
        chunk_header(&mut b, Headers::Extended, 1, 0, 7, 4096, 0);
        assert_eq!(b.len(), 32);
        assert_eq!(
            ReplyHeader::parse(&b, Headers::Extended),
            Ok(Ok(ReplyHeader::Chunk {
                flags: 1,
                kind: 0,
                cookie: 7,
                len: 0
            }))
        );
    }

    #[test]
    fn error_payloads_round_trip() {
        let mut b = Vec::new();
        error_payload(&mut b, 5, "read failed");
        assert_eq!(parse_error(&b), Ok((5, "read failed".into())));
        assert!(parse_error(&b[..b.len() - 1]).is_err());
    }
}
