//! Reading one request's reply: simple or structured (or extended)
//! chunks, each checked against the request it answers; a read's content
//! chunks must cover every byte once. A reply that breaks these rules is
//! an `Err` (the caller closes the connection); an error the server
//! reports is the `Ok(Some(..))` it is.

use std::io::{self, Read};

use nbd_proto::consts::{chunk, cmd, reply_flags};
use nbd_proto::reply::{self, ReplyHeader as Rh};
use nbd_proto::request::Request;
use nbd_proto::{Cursor, MAX_PAYLOAD};

use super::transport::Reader;
use super::{bad, errno_error};

impl Reader<'_> {
    /// Reads the reply to `r`: a read's data (checked to lie within the
    /// request), a block status's first extent. Returns the error the
    /// server reported, if any; an `Err` is a transport or framing
    /// failure.
    pub(super) fn reply(
        &mut self,
        r: &Request,
        mut into: Option<&mut [u8]>,
        mut status: Option<(u32, &mut Option<(u64, u32)>)>,
    ) -> io::Result<Option<io::Error>> {
        let mut error: Option<io::Error> = None;
        // The read's bytes the content chunks have covered (start -> end,
        // relative to the buffer): every byte once, all of them by DONE.
        let mut covered = std::collections::BTreeMap::<u64, u64>::new();
        let mut cover = |start: u64, n: u64| -> io::Result<()> {
            let end = start + n;
            let before = covered
                .range(..=start)
                .next_back()
                .is_some_and(|(_, &e)| e > start);
            let after = covered.range(start..).next().is_some_and(|(&s, _)| s < end);
            if n == 0 || before || after {
                return Err(bad("NBD read reply chunks overlap or are empty"));
            }
            covered.insert(start, end);
            Ok(())
        };
        loop {
            let hdr = self.next_header(r.cookie)?;
            match hdr {
                Rh::Simple { error: e, .. } => {
                    if r.kind == cmd::READ && self.headers().structured() {
                        return Err(bad("NBD simple reply to a read after structured replies"));
                    }
                    if e != 0 {
                        return Ok(Some(errno_error(e, "")));
                    }
                    if r.kind == cmd::READ {
                        let buf = into.ok_or_else(|| bad("read without a buffer"))?;
                        self.stream().read_exact(buf)?;
                    }
                    return Ok(None);
                }
                Rh::Chunk {
                    flags, kind, len, ..
                } => {
                    if len > MAX_PAYLOAD as u64 + 64 {
                        return Err(bad(format!("NBD reply chunk of {len} bytes")));
                    }
                    match kind {
                        chunk::OFFSET_DATA if r.kind == cmd::READ => {
                            let mut o = [0u8; 8];
                            if len < 9 {
                                return Err(bad("short NBD data chunk"));
                            }
                            self.stream().read_exact(&mut o)?;
                            let at = u64::from_be_bytes(o);
                            let n = len - 8;
                            let buf = into.as_deref_mut().ok_or_else(|| bad("no buffer"))?;
                            let start = at
                                .checked_sub(r.offset)
                                .filter(|s| s.checked_add(n).is_some_and(|e| e <= buf.len() as u64))
                                .ok_or_else(|| bad("NBD data chunk outside the read"))?;
                            cover(start, n)?;
                            self.stream()
                                .read_exact(&mut buf[start as usize..(start + n) as usize])?;
                        }
                        chunk::OFFSET_HOLE if r.kind == cmd::READ && len == 12 => {
                            let mut p = [0u8; 12];
                            self.stream().read_exact(&mut p)?;
                            let at = u64::from_be_bytes(p[..8].try_into().unwrap());
                            let n = u32::from_be_bytes(p[8..].try_into().unwrap()) as u64;
                            let buf = into.as_deref_mut().ok_or_else(|| bad("no buffer"))?;
                            let start = at
                                .checked_sub(r.offset)
                                .filter(|s| s.checked_add(n).is_some_and(|e| e <= buf.len() as u64))
                                .ok_or_else(|| bad("NBD hole chunk outside the read"))?;
                            cover(start, n)?;
                            buf[start as usize..(start + n) as usize].fill(0);
                        }
                        chunk::BLOCK_STATUS | chunk::BLOCK_STATUS_EXT
                            if r.kind == cmd::BLOCK_STATUS =>
                        {
                            let mut p = vec![0u8; len as usize];
                            self.stream().read_exact(&mut p)?;
                            let ext = kind == chunk::BLOCK_STATUS_EXT;
                            let mut c = Cursor::new(&p);
                            let bad_chunk = |_| bad("malformed NBD block status chunk");
                            let id = c.u32().map_err(bad_chunk)?;
                            if ext {
                                c.u32().map_err(bad_chunk)?;
                            }
                            let (n, f) = match ext {
                                true => (
                                    c.u64().map_err(bad_chunk)?,
                                    c.u64().map_err(bad_chunk)? as u32,
                                ),
                                false => (
                                    c.u32().map_err(bad_chunk)? as u64,
                                    c.u32().map_err(bad_chunk)?,
                                ),
                            };
                            if n == 0 {
                                return Err(bad("NBD block status extent of length 0"));
                            }
                            if let Some((want, slot)) = status.as_mut() {
                                if id == *want && slot.is_none() {
                                    **slot = Some((n, f));
                                }
                            }
                        }
                        chunk::NONE if len == 0 && flags & reply_flags::DONE != 0 => {}
                        k if chunk::is_error(k) => {
                            let mut p = vec![0u8; len as usize];
                            self.stream().read_exact(&mut p)?;
                            let (e, msg) =
                                reply::parse_error(&p).map_err(|e| bad(e.to_string()))?;
                            error.get_or_insert(errno_error(e, &msg));
                        }
                        _ => return Err(bad(format!("unexpected NBD reply chunk type {kind}"))),
                    }
                    if flags & reply_flags::DONE != 0 {
                        let want = into.as_deref().map_or(0, |b| b.len() as u64);
                        let got: u64 = covered.iter().map(|(s, e)| e - s).sum();
                        if r.kind == cmd::READ && error.is_none() && got != want {
                            return Err(bad(format!(
                                "NBD read reply covered {got} of {want} bytes"
                            )));
                        }
                        return Ok(error);
                    }
                }
            }
        }
    }
}
