//! Transmission requests (§Request message): the compact 28-byte header,
//! or the 32-byte extended one once `NBD_OPT_EXTENDED_HEADERS` is agreed.

use crate::consts::{cmd, cmd_flags, EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC};
use crate::wire::{Cursor, Put, WireError};

/// Which header both sides use in the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Headers {
    /// Compact requests, and simple replies (or structured ones if
    /// `structured` was agreed).
    Compact { structured: bool },
    /// Extended requests and extended replies.
    Extended,
}

impl Headers {
    pub fn request_len(self) -> usize {
        match self {
            Headers::Compact { .. } => 28,
            Headers::Extended => 32,
        }
    }

    /// Replies may carry payloads (structured or extended).
    pub fn structured(self) -> bool {
        !matches!(self, Headers::Compact { structured: false })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    /// The effect length, or with a payload the payload's length.
    pub len: u64,
}

impl Request {
    /// Decodes a header of `h.request_len()` bytes.
    pub fn parse(b: &[u8], h: Headers) -> Result<Request, WireError> {
        if b.len() != h.request_len() {
            return Err(WireError::Invalid("request header of the wrong length"));
        }
        let mut c = Cursor::new(b);
        let magic = c.u32()?;
        let want = match h {
            Headers::Compact { .. } => REQUEST_MAGIC,
            Headers::Extended => EXTENDED_REQUEST_MAGIC,
        };
        if magic != want {
            return Err(WireError::Magic {
                what: "request",
                got: magic.into(),
            });
        }
        let flags = c.u16()?;
        let kind = c.u16()?;
        let cookie = c.u64()?;
        let offset = c.u64()?;
        let len = match h {
            Headers::Compact { .. } => c.u32()?.into(),
            Headers::Extended => c.u64()?,
        };
        Ok(Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        })
    }

    /// The bytes of payload that follow the header: a write's `len`
    /// bytes, and with extended headers any request's that says so.
    /// The spec has extended writes set `NBD_CMD_FLAG_PAYLOAD_LEN`, but
    /// QEMU's client leaves it clear and QEMU's server reads a write's
    /// payload regardless: so does this.
    pub fn payload_len(&self, h: Headers) -> u64 {
        match h {
            _ if self.kind == cmd::WRITE => self.len,
            Headers::Compact { .. } => 0,
            Headers::Extended if self.flags & cmd_flags::PAYLOAD_LEN != 0 => self.len,
            Headers::Extended => 0,
        }
    }

    pub fn encode(&self, h: Headers, out: &mut Vec<u8>) {
        match h {
            Headers::Compact { .. } => out.put32(REQUEST_MAGIC),
            Headers::Extended => out.put32(EXTENDED_REQUEST_MAGIC),
        }
        out.put16(self.flags);
        out.put16(self.kind);
        out.put64(self.cookie);
        out.put64(self.offset);
        match h {
            Headers::Compact { .. } => out.put32(self.len as u32),
            Headers::Extended => out.put64(self.len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_headers_round_trip() {
        let r = Request {
            flags: cmd_flags::FUA,
            kind: cmd::WRITE,
            cookie: 0x1122_3344_5566_7788,
            offset: 1 << 40,
            len: 4096,
        };
        for h in [Headers::Compact { structured: true }, Headers::Extended] {
            let mut b = Vec::new();
            r.encode(h, &mut b);
            assert_eq!(b.len(), h.request_len());
            assert_eq!(Request::parse(&b, h), Ok(r));
        }
    }

    #[test]
    fn a_compact_header_is_refused_after_extended_headers() {
        let r = Request {
            flags: 0,
            kind: cmd::READ,
            cookie: 1,
            offset: 0,
            len: 512,
        };
        let mut b = Vec::new();
        r.encode(Headers::Compact { structured: false }, &mut b);
        b.extend_from_slice(&[0; 4]);
        assert!(matches!(
            Request::parse(&b, Headers::Extended),
            Err(WireError::Magic { .. })
        ));
    }

    #[test]
    fn payloads_follow_the_negotiated_rules() {
        let mut r = Request {
            flags: 0,
            kind: cmd::WRITE,
            cookie: 1,
            offset: 0,
            len: 512,
        };
        assert_eq!(r.payload_len(Headers::Compact { structured: false }), 512);
        assert_eq!(r.payload_len(Headers::Extended), 512);
        r.kind = cmd::BLOCK_STATUS;
        assert_eq!(r.payload_len(Headers::Extended), 0);
        r.flags = cmd_flags::PAYLOAD_LEN;
        assert_eq!(r.payload_len(Headers::Extended), 512);
        r.kind = cmd::READ;
        r.flags = 0;
        assert_eq!(r.payload_len(Headers::Compact { structured: true }), 0);
    }
}
