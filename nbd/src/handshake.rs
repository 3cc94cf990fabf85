//! The handshake, server side (§Fixed newstyle negotiation): the greeting,
//! then options until the client picks an export (`NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`) or leaves. Every option is answered with what
//! the spec allows; a client that breaks the framing (bad magic, an
//! option too long to read, flags never offered) is disconnected.

use std::io::{self, Read, Write};
use std::sync::Arc;

use nbd_proto::consts::{client, handshake, info, opt, rep, IHAVEOPT, NBDMAGIC};
use nbd_proto::option::{InfoRequest, MetaRequest, OptionHeader, Replies};
use nbd_proto::request::Headers;
use nbd_proto::{WireError, MAX_PAYLOAD, MAX_STRING};

use crate::export::{Context, Export, Exports};

/// The longest option data read; longer options end the connection
/// (the longest valid one, a context query list, needs far less).
pub const MAX_OPTION_LEN: u32 = 1 << 20;

/// What a finished handshake agreed on.
#[derive(Debug)]
pub struct Session {
    pub export: Arc<Export>,
    pub headers: Headers,
    /// The selected metadata contexts, with the ids given to them.
    pub contexts: Vec<(u32, Context)>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed message: {0}")]
    Wire(#[from] WireError),
    #[error("client flags {0:#x} include ones the server did not offer")]
    ClientFlags(u32),
    #[error("client option {option} has {len} bytes of data (limit {MAX_OPTION_LEN})")]
    OptionTooLong { option: u32, len: u32 },
    #[error("client asked for export '{0}', which does not exist")]
    UnknownExport(String),
    #[error("client sent NBD_OPT_EXPORT_NAME after agreeing on extended headers")]
    ExportNameAfterExtended,
    #[error("client ended the handshake")]
    Aborted,
    #[error("client sent NBD_OPT_EXPORT_NAME before starting TLS, which this server requires")]
    TlsRequired,
    #[error("client asked for TLS, which this server does not offer")]
    NoTls,
}

/// Where a connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// The server has no credentials (NOTLS mode).
    Off,
    /// The server requires TLS and it has not started (FORCEDTLS mode).
    Required,
    /// TLS is up: options now travel inside it.
    Active,
}

/// How option haggling ended.
#[derive(Debug)]
pub enum Outcome {
    Session(Session),
    /// The client sent NBD_OPT_STARTTLS and it was acknowledged: the
    /// caller runs the TLS handshake, then haggles again inside it.
    StartTls,
}

/// The smallest, preferred and largest request sizes the server gives
/// in `NBD_INFO_BLOCK_SIZE`: any byte range is served (the engine does
/// read-modify-write itself), 4 KiB is the page and sector most images
/// align to, and payloads are capped at the protocol's default.
pub const BLOCK_SIZE: (u32, u32, u32) = (1, 4096, MAX_PAYLOAD);

/// Runs the handshake on `s` with no TLS and returns the session it
/// agrees on.
pub fn negotiate<S: Read + Write>(s: &mut S, exports: &Exports) -> Result<Session, HandshakeError> {
    let no_zeroes = greet(s)?;
    match options(s, exports, no_zeroes, Tls::Off)? {
        Outcome::Session(session) => Ok(session),
        Outcome::StartTls => Err(HandshakeError::NoTls),
    }
}

/// The greeting and the client's flags; returns whether the client
/// asked for no zeroes after NBD_OPT_EXPORT_NAME.
pub fn greet<S: Read + Write>(s: &mut S) -> Result<bool, HandshakeError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut f = [0u8; 4];
    s.read_exact(&mut f)?;
    let flags = u32::from_be_bytes(f);
    if flags & !(client::FIXED_NEWSTYLE | client::NO_ZEROES) != 0 {
        return Err(HandshakeError::ClientFlags(flags));
    }
    Ok(flags & client::NO_ZEROES != 0)
}

/// Option haggling, from the first option (or the first inside TLS).
pub fn options<S: Read + Write>(
    s: &mut S,
    exports: &Exports,
    no_zeroes: bool,
    tls: Tls,
) -> Result<Outcome, HandshakeError> {
    let mut st = State {
        exports,
        no_zeroes,
        tls,
        headers: Headers::Compact { structured: false },
        meta: None,
    };
    loop {
        let mut h = [0u8; OptionHeader::LEN];
        s.read_exact(&mut h)?;
        let h = OptionHeader::parse(&h)?;
        if h.len > MAX_OPTION_LEN {
            return Err(HandshakeError::OptionTooLong {
                option: h.option,
                len: h.len,
            });
        }
        let mut data = vec![0u8; h.len as usize];
        s.read_exact(&mut data)?;
        let mut out = Replies::default();
        let done = st.option(h.option, &data, &mut out)?;
        s.write_all(&out.buf)?;
        match done {
            Next::More => {}
            Next::StartTls => return Ok(Outcome::StartTls),
            Next::Abort => return Err(HandshakeError::Aborted),
            Next::Go(export) => {
                return Ok(Outcome::Session(st.session(export)));
            }
            Next::ExportName(export) => {
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&export.size.to_be_bytes());
                b.extend_from_slice(&export.flags(st.headers.structured()).to_be_bytes());
                if !st.no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b)?;
                return Ok(Outcome::Session(st.session(export)));
            }
        }
    }
}

enum Next {
    More,
    Abort,
    StartTls,
    Go(Arc<Export>),
    ExportName(Arc<Export>),
}

/// An option's parsed data, or an `NBD_REP_ERR_INVALID` reply saying
/// what is wrong with it.
fn parsed<T>(o: u32, r: Result<T, WireError>, out: &mut Replies) -> Option<T> {
    r.map_err(|e| out.error(o, rep::ERR_INVALID, &e.to_string()))
        .ok()
}

struct State<'a> {
    exports: &'a Exports,
    no_zeroes: bool,
    tls: Tls,
    headers: Headers,
    /// The last `NBD_OPT_SET_META_CONTEXT`: its export and selection.
    meta: Option<(String, Vec<(u32, Context)>)>,
}

impl<'a> State<'a> {
    /// The session on `export`: its contexts are the last selection, if
    /// it was made for that export.
    fn session(&mut self, export: Arc<Export>) -> Session {
        let contexts = match self.meta.take() {
            Some((name, c)) if name == export.name => c,
            _ => Vec::new(),
        };
        Session {
            export,
            headers: self.headers,
            contexts,
        }
    }

    /// The export a client names, by its exact name; an unknown name is
    /// answered with `NBD_REP_ERR_UNKNOWN` to option `o`.
    fn export(&self, o: u32, name: &str, out: &mut Replies) -> Option<&'a Arc<Export>> {
        let e = self.exports.get(name);
        if e.is_none() {
            out.error(o, rep::ERR_UNKNOWN, &format!("export '{name}' not present"));
        }
        e
    }

    fn option(&mut self, o: u32, data: &[u8], out: &mut Replies) -> Result<Next, HandshakeError> {
        let no_data = |out: &mut Replies| {
            if data.is_empty() {
                true
            } else {
                out.error(o, rep::ERR_INVALID, "this option takes no data");
                false
            }
        };
        if self.tls == Tls::Required && !matches!(o, opt::STARTTLS | opt::ABORT) {
            // FORCEDTLS: nothing about any export before TLS.
            if o == opt::EXPORT_NAME {
                return Err(HandshakeError::TlsRequired);
            }
            // qemu-nbd's words (its clients print them).
            out.error(
                o,
                rep::ERR_TLS_REQD,
                &format!("Option {o:#x} not permitted before TLS"),
            );
            return Ok(Next::More);
        }
        match o {
            opt::EXPORT_NAME => {
                if self.headers == Headers::Extended {
                    return Err(HandshakeError::ExportNameAfterExtended);
                }
                let name = String::from_utf8_lossy(&data[..data.len().min(MAX_STRING)]);
                match self.exports.get(&name) {
                    Some(e) if data.len() <= MAX_STRING => {
                        return Ok(Next::ExportName(e.clone()));
                    }
                    _ => return Err(HandshakeError::UnknownExport(name.into_owned())),
                }
            }
            opt::ABORT => {
                out.ack(o);
                return Ok(Next::Abort);
            }
            opt::LIST => {
                if no_data(out) {
                    for e in &self.exports.list {
                        out.server(o, &e.name, &e.description);
                    }
                    out.ack(o);
                }
            }
            opt::STARTTLS => {
                if no_data(out) {
                    match self.tls {
                        Tls::Off => out.error(o, rep::ERR_POLICY, "TLS not configured"),
                        Tls::Required => {
                            out.ack(o);
                            return Ok(Next::StartTls);
                        }
                        Tls::Active => out.error(o, rep::ERR_INVALID, "TLS already enabled"),
                    }
                }
            }
            opt::INFO | opt::GO => {
                let Some(r) = parsed(o, InfoRequest::parse(data), out) else {
                    return Ok(Next::More);
                };
                let Some(e) = self.export(o, &r.name, out) else {
                    return Ok(Next::More);
                };
                out.info_export(o, e.size, e.flags(self.headers.structured()));
                if r.items.contains(&info::NAME) {
                    out.info_string(o, info::NAME, &e.name);
                }
                if r.items.contains(&info::DESCRIPTION) && !e.description.is_empty() {
                    out.info_string(o, info::DESCRIPTION, &e.description);
                }
                let (mut min, pref, max) = BLOCK_SIZE;
                // A probed raw image takes whole sectors, as QEMU's
                // (its first sector is checked whole).
                if e.image.guards_first_sector() {
                    min = 512;
                }
                out.info_block_size(o, min, pref, max);
                out.ack(o);
                if o == opt::GO {
                    return Ok(Next::Go(e.clone()));
                }
            }
            opt::STRUCTURED_REPLY => {
                if no_data(out) {
                    if self.headers == Headers::Extended {
                        out.error(
                            o,
                            rep::ERR_EXT_HEADER_REQD,
                            "extended headers are already in use",
                        );
                    } else {
                        self.headers = Headers::Compact { structured: true };
                        out.ack(o);
                    }
                }
            }
            opt::EXTENDED_HEADERS => {
                if no_data(out) {
                    self.headers = Headers::Extended;
                    out.ack(o);
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = o == opt::SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection even when it fails.
                    self.meta = None;
                }
                if !self.headers.structured() {
                    out.error(
                        o,
                        rep::ERR_INVALID,
                        "negotiate structured replies or extended headers first",
                    );
                    return Ok(Next::More);
                }
                let Some(r) = parsed(o, MetaRequest::parse(data), out) else {
                    return Ok(Next::More);
                };
                let Some(e) = self.export(o, &r.export, out) else {
                    return Ok(Next::More);
                };
                let offered = e.contexts();
                let mut chosen = Vec::new();
                for (i, c) in offered.into_iter().enumerate() {
                    let hit = match set {
                        true => r.queries.iter().any(|q| c.matches(q, false)),
                        false => {
                            r.queries.is_empty() || r.queries.iter().any(|q| c.matches(q, true))
                        }
                    };
                    if hit {
                        // Ids are per context kind; a list's are zero,
                        // as the spec asks.
                        let id = if set { i as u32 + 1 } else { 0 };
                        out.meta_context(o, id, &c.name());
                        chosen.push((id, c));
                    }
                }
                out.ack(o);
                if set {
                    self.meta = Some((r.export, chosen));
                }
            }
            _ => out.error(o, rep::ERR_UNSUP, &format!("option {o} is not supported")),
        }
        Ok(Next::More)
    }
}
