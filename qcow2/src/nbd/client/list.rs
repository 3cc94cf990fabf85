//! Listing a server's exports, as `qemu-nbd --list` does: NBD_OPT_LIST,
//! then NBD_OPT_INFO and (with structured replies)
//! NBD_OPT_LIST_META_CONTEXT for each export, then NBD_OPT_ABORT.

use std::io::{self, Write};

use nbd_proto::consts::{info, opt, rep};
use nbd_proto::option::{Info, InfoRequest, MetaRequest, OptionHeader};
use nbd_proto::request::Headers;
use nbd_proto::Cursor;

use super::{bad, Conn};

/// What a server says of one of its exports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub description: String,
    /// Size and transmission flags, when NBD_OPT_INFO answered.
    pub export: Option<(u64, u16)>,
    /// Minimum, preferred and maximum block sizes, when sent.
    pub block: Option<(u32, u32, u32)>,
    /// Extended headers were negotiated (64-bit transactions).
    pub extended: bool,
    /// The metadata contexts it offers.
    pub contexts: Vec<String>,
}

impl Conn {
    /// The exports, after [`Conn::start`].
    pub(super) fn list(&mut self) -> io::Result<Vec<Listed>> {
        let replies = self.option(opt::LIST, &[])?;
        // A server that does not list has none to show (QEMU's client
        // prints "exports available: 0").
        if replies.last().is_some_and(|r| r.0 == rep::ERR_UNSUP) {
            let _ = self.s.write_all(&OptionHeader::encode(opt::ABORT, &[]));
            return Ok(Vec::new());
        }
        if let Some((t, msg)) = replies.last().filter(|r| r.0 != rep::ACK) {
            return Err(super::negotiate::refused(opt::LIST, *t, msg));
        }
        let mut list = Vec::new();
        for (_, d) in replies.iter().filter(|r| r.0 == rep::SERVER) {
            let mut c = Cursor::new(d);
            let n = c.u32().map_err(|e| bad(format!("NBD_REP_SERVER: {e}")))? as usize;
            if n > c.remaining() {
                return Err(bad("NBD_REP_SERVER: the name is longer than the reply"));
            }
            let name = String::from_utf8_lossy(&d[4..4 + n]).into_owned();
            let description = String::from_utf8_lossy(&d[4 + n..]).into_owned();
            list.push(Listed {
                name,
                description,
                extended: self.h == Headers::Extended,
                ..Default::default()
            });
        }
        for l in &mut list {
            // As QEMU's client: an export NBD_OPT_INFO fails for ends the
            // queries (the rest would most likely fail too).
            if !self.info(l)? {
                break;
            }
            if self.h.structured() {
                let m = MetaRequest {
                    export: l.name.clone(),
                    queries: Vec::new(),
                };
                for (t, d) in self.option(opt::LIST_META_CONTEXT, &m.encode())? {
                    if t == rep::META_CONTEXT && d.len() >= 4 {
                        l.contexts
                            .push(String::from_utf8_lossy(&d[4..]).into_owned());
                    }
                }
            }
        }
        // A courtesy before hanging up; its reply is not waited for.
        let _ = self.s.write_all(&OptionHeader::encode(opt::ABORT, &[]));
        Ok(list)
    }

    /// NBD_OPT_INFO for `l`; false if the server refused it.
    fn info(&mut self, l: &mut Listed) -> io::Result<bool> {
        let req = InfoRequest {
            name: l.name.clone(),
            items: vec![info::BLOCK_SIZE],
        };
        let replies = self.option(opt::INFO, &req.encode())?;
        if replies.last().is_none_or(|r| r.0 != rep::ACK) {
            return Ok(false);
        }
        for (_, d) in replies.iter().filter(|r| r.0 == rep::INFO) {
            match Info::parse(d).map_err(|e| bad(format!("NBD_REP_INFO: {e}")))? {
                Info::Export { size, flags } => l.export = Some((size, flags)),
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => l.block = Some((min, preferred, max)),
                Info::Description(d) => l.description = d,
                Info::Name(_) | Info::Other(_) => {}
            }
        }
        Ok(true)
    }
}
