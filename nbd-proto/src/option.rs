//! The handshake's option haggling (§Fixed newstyle negotiation, §Option
//! types, §Option reply types): what each side sends, and decoders that
//! take a whole received message and refuse any that is short, long or
//! malformed.

use crate::consts::{info, rep, IHAVEOPT, OPTION_REPLY_MAGIC};
use crate::wire::{Cursor, Put, WireError};

/// The 16 bytes before each option's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    pub fn parse(b: &[u8; Self::LEN]) -> Result<OptionHeader, WireError> {
        let mut c = Cursor::new(b);
        let magic = c.u64()?;
        if magic != IHAVEOPT {
            return Err(WireError::Magic {
                what: "option",
                got: magic,
            });
        }
        Ok(OptionHeader {
            option: c.u32()?,
            len: c.u32()?,
        })
    }

    /// An option with its data, as a client sends it.
    pub fn encode(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::LEN + data.len());
        v.put64(IHAVEOPT);
        v.put32(option);
        v.put32(data.len() as u32);
        v.extend_from_slice(data);
        v
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// The `NBD_INFO_*` items asked for (at most 65535 of them, bounded
    /// by the message).
    pub items: Vec<u16>,
}

impl InfoRequest {
    pub fn parse(data: &[u8]) -> Result<InfoRequest, WireError> {
        let mut c = Cursor::new(data);
        let name = c.string32("export name")?;
        let n = c.u16()? as usize;
        if n * 2 != c.remaining() {
            return Err(WireError::Invalid(
                "information request count does not match the option's length",
            ));
        }
        let items = (0..n).map(|_| c.u16()).collect::<Result<_, _>>()?;
        Ok(InfoRequest { name, items })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.put32(self.name.len() as u32);
        v.extend_from_slice(self.name.as_bytes());
        v.put16(self.items.len() as u16);
        for &i in &self.items {
            v.put16(i);
        }
        v
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaRequest {
    pub fn parse(data: &[u8]) -> Result<MetaRequest, WireError> {
        let mut c = Cursor::new(data);
        let export = c.string32("export name")?;
        let n = c.u32()?;
        // Each query takes at least its 4-byte length: a count the
        // message cannot hold is refused before anything is reserved.
        if n as usize > c.remaining() / 4 {
            return Err(WireError::Invalid(
                "query count does not fit the option's length",
            ));
        }
        let queries = (0..n)
            .map(|_| c.string32("query"))
            .collect::<Result<_, _>>()?;
        c.finish()?;
        Ok(MetaRequest { export, queries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.put32(self.export.len() as u32);
        v.extend_from_slice(self.export.as_bytes());
        v.put32(self.queries.len() as u32);
        for q in &self.queries {
            v.put32(q.len() as u32);
            v.extend_from_slice(q.as_bytes());
        }
        v
    }
}

/// The 20 bytes before each option reply's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

impl ReplyHeader {
    pub const LEN: usize = 20;

    pub fn parse(b: &[u8; Self::LEN]) -> Result<ReplyHeader, WireError> {
        let mut c = Cursor::new(b);
        let magic = c.u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(WireError::Magic {
                what: "option reply",
                got: magic,
            });
        }
        Ok(ReplyHeader {
            option: c.u32()?,
            reply: c.u32()?,
            len: c.u32()?,
        })
    }
}

/// Builds option replies into one buffer, written with one call.
#[derive(Debug, Default)]
pub struct Replies {
    pub buf: Vec<u8>,
}

impl Replies {
    /// A reply of type `reply` to `option` with `data`.
    pub fn push(&mut self, option: u32, reply: u32, data: &[u8]) {
        self.buf.put64(OPTION_REPLY_MAGIC);
        self.buf.put32(option);
        self.buf.put32(reply);
        self.buf.put32(data.len() as u32);
        self.buf.extend_from_slice(data);
    }

    pub fn ack(&mut self, option: u32) {
        self.push(option, rep::ACK, &[]);
    }

    /// An error reply, with a message for humans (cut to the protocol's
    /// string limit).
    pub fn error(&mut self, option: u32, err: u32, msg: &str) {
        debug_assert!(rep::is_error(err));
        let msg = cut(msg);
        self.push(option, err, msg.as_bytes());
    }

    /// `NBD_REP_SERVER`: one export of a list.
    pub fn server(&mut self, option: u32, name: &str, description: &str) {
        let mut d = Vec::new();
        d.put32(name.len() as u32);
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(cut(description).as_bytes());
        self.push(option, rep::SERVER, &d);
    }

    /// `NBD_INFO_EXPORT`: size and transmission flags.
    pub fn info_export(&mut self, option: u32, size: u64, flags: u16) {
        let mut d = Vec::new();
        d.put16(info::EXPORT);
        d.put64(size);
        d.put16(flags);
        self.push(option, rep::INFO, &d);
    }

    /// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
    pub fn info_string(&mut self, option: u32, item: u16, s: &str) {
        let mut d = Vec::new();
        d.put16(item);
        d.extend_from_slice(cut(s).as_bytes());
        self.push(option, rep::INFO, &d);
    }

    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum sizes.
    pub fn info_block_size(&mut self, option: u32, min: u32, preferred: u32, max: u32) {
        let mut d = Vec::new();
        d.put16(info::BLOCK_SIZE);
        d.put32(min);
        d.put32(preferred);
        d.put32(max);
        self.push(option, rep::INFO, &d);
    }

    /// `NBD_REP_META_CONTEXT`: a context's id and name.
    pub fn meta_context(&mut self, option: u32, id: u32, name: &str) {
        let mut d = Vec::new();
        d.put32(id);
        d.extend_from_slice(name.as_bytes());
        self.push(option, rep::META_CONTEXT, &d);
    }
}

/// `s` cut to at most [`crate::MAX_STRING`] bytes, at a character edge.
fn cut(s: &str) -> &str {
    let mut end = s.len().min(crate::MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A decoded `NBD_REP_INFO` (client side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// An item this side does not know: ignored, as the spec asks.
    Other(u16),
}

impl Info {
    pub fn parse(data: &[u8]) -> Result<Info, WireError> {
        let mut c = Cursor::new(data);
        let item = c.u16()?;
        let i = match item {
            info::EXPORT => Info::Export {
                size: c.u64()?,
                flags: c.u16()?,
            },
            info::NAME => Info::Name(c.string(c.remaining(), "export name")?),
            info::DESCRIPTION => Info::Description(c.string(c.remaining(), "description")?),
            info::BLOCK_SIZE => Info::BlockSize {
                min: c.u32()?,
                preferred: c.u32()?,
                max: c.u32()?,
            },
            other => return Ok(Info::Other(other)),
        };
        c.finish()?;
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_requests_round_trip_and_refuse_bad_counts() {
        let r = InfoRequest {
            name: "disk".into(),
            items: vec![info::BLOCK_SIZE, info::NAME],
        };
        assert_eq!(InfoRequest::parse(&r.encode()), Ok(r.clone()));
        let mut long = r.encode();
        long.push(0);
        assert!(InfoRequest::parse(&long).is_err());
        let short = &r.encode()[..r.encode().len() - 1];
        assert!(InfoRequest::parse(short).is_err());
    }

    #[test]
    fn meta_requests_refuse_counts_the_message_cannot_hold() {
        let r = MetaRequest {
            export: "".into(),
            queries: vec!["base:allocation".into(), "qemu:".into()],
        };
        assert_eq!(MetaRequest::parse(&r.encode()), Ok(r.clone()));
        let mut lie = r.encode();
        lie[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            MetaRequest::parse(&lie),
            Err(WireError::Invalid(_))
        ));
    }

    #[test]
    fn replies_cut_long_strings_on_a_character_edge() {
        let mut r = Replies::default();
        let s = "é".repeat(3000);
        r.error(1, rep::ERR_INVALID, &s);
        let len = u32::from_be_bytes(r.buf[16..20].try_into().unwrap()) as usize;
        assert_eq!(len, 4096);
        assert!(std::str::from_utf8(&r.buf[20..]).is_ok());
    }
}
