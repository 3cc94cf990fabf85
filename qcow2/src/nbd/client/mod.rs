//! The NBD client under the engine's files: one connection to one export,
//! opened with the fixed newstyle handshake (extended headers, else
//! structured replies, with `base:allocation` for block status), and
//! requests answered in order under one lock. A reply that breaks the
//! framing or the request's bounds poisons the connection: every later
//! call fails, rather than read someone else's data.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use nbd_proto::consts::{
    client, cmd, cmd_flags, handshake, info, opt, rep, state, tflags, IHAVEOPT, NBDMAGIC,
};
use nbd_proto::option::{Info, InfoRequest, MetaRequest, OptionHeader, ReplyHeader};
use nbd_proto::request::{Headers, Request};
use nbd_proto::{Cursor, MAX_PAYLOAD};

use super::uri::{Address, Server};

mod receive;
#[cfg(test)]
mod tests;

/// The longest option reply accepted from a server, and the most bytes
/// of replies kept for one option.
const MAX_OPTION_REPLY: u32 = 1 << 20;
const MAX_OPTION_REPLIES: usize = 4 << 20;
/// How long connecting and the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A byte stream to a server other than a socket (the fuzzing target's
/// replay of a server's bytes).
pub trait Duplex: Read + Write + Send + std::fmt::Debug {}

#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Other(Box<dyn Duplex>),
    /// Inside TLS, over one of the above.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Stream>>),
    /// Between the two during the upgrade.
    Closed,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "NBD connection closed")
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
            Stream::Other(s) => s.read(b),
            Stream::Tls(s) => s.read(b),
            Stream::Closed => Err(closed()),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
            Stream::Other(s) => s.write(b),
            Stream::Tls(s) => s.write(b),
            Stream::Closed => Err(closed()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tls(s) => s.sock.set_timeout(t),
            Stream::Other(_) | Stream::Closed => Ok(()),
        }
    }
}

#[derive(Debug)]
struct Conn {
    s: Stream,
    h: Headers,
    cookie: u64,
    /// A reply broke the protocol: nothing more is sent.
    poisoned: bool,
    buf: Vec<u8>,
}

/// A connected export.
#[derive(Debug)]
pub struct Client {
    conn: Mutex<Conn>,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Largest request payload the server takes.
    pub max_payload: u32,
    /// The server's minimum block size: requests start and end on it
    /// (the client asked for it, so it must honour it).
    min_block: u32,
    /// Unaligned writes read, patch and write whole blocks: exclusive
    /// against every other write, so that none is lost in between.
    rmw: RwLock<()>,
    /// The id of `base:allocation`, when the server offers it.
    allocation: Option<u32>,
}

/// Connects to the first address of `host` that answers within the
/// connect timeout.
fn connect_tcp(host: &str, port: u16) -> io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host}: no address"));
    for a in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Export sizes a file offset can hold (QEMU refuses larger ones with
/// "File too large").
fn check_size(size: u64) -> io::Result<()> {
    match size <= i64::MAX as u64 {
        true => Ok(()),
        false => Err(io::Error::from_raw_os_error(libc::EFBIG)),
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A server's message, printable: control characters (a terminal's
/// escape sequences) become '?'.
fn printable(msg: &str) -> String {
    msg.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// An NBD error value as the errno it names (the protocol uses Linux's
/// numbers); unknown ones are EIO.
fn errno_error(e: u32, msg: &str) -> io::Error {
    let msg = printable(msg);
    use nbd_proto::consts::errno::*;
    let n = match e {
        EPERM | EIO | ENOMEM | EINVAL | ENOSPC | EOVERFLOW | ENOTSUP | ESHUTDOWN => e as i32,
        _ => libc::EIO,
    };
    let os = io::Error::from_raw_os_error(n);
    match msg.is_empty() {
        true => os,
        false => io::Error::new(os.kind(), format!("{os}: {msg}")),
    }
}

impl Client {
    /// Connects to `addr` and enters transmission; `writable` asks for
    /// a writable export (a read-only one is an error then).
    pub fn connect(addr: &Address, writable: bool) -> io::Result<Client> {
        let s = match &addr.server {
            Server::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
            Server::Tcp { host, port } => {
                let s = connect_tcp(host, *port)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        Client::over(s, &addr.export, writable, addr.tls.as_ref())
    }

    /// A client on a stream that speaks for a server (fuzzing).
    pub fn over_stream(s: Box<dyn Duplex>, export: &str, writable: bool) -> io::Result<Client> {
        Client::over(Stream::Other(s), export, writable, None)
    }

    fn over(
        s: Stream,
        export: &str,
        writable: bool,
        tls: Option<&super::uri::TlsParams>,
    ) -> io::Result<Client> {
        s.set_timeout(Some(CONNECT_TIMEOUT))?;
        let mut c = Conn {
            s,
            h: Headers::Compact { structured: false },
            cookie: 1,
            poisoned: false,
            buf: Vec::new(),
        };
        let (size, flags, max_payload, min_block, allocation) = c.handshake(export, tls)?;
        c.s.set_timeout(None)?;
        let client = Client {
            conn: Mutex::new(c),
            size,
            flags,
            max_payload,
            min_block,
            rmw: RwLock::new(()),
            allocation,
        };
        if writable && flags & tflags::READ_ONLY != 0 {
            // Dropped: NBD_CMD_DISC ends the connection properly.
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("export '{export}' is read-only"),
            ));
        }
        Ok(client)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Conn) -> io::Result<T>) -> io::Result<T> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if c.poisoned {
            return Err(bad("the NBD connection was closed after a protocol error"));
        }
        f(&mut c)
    }

    /// The whole blocks around [off, off + len), when that range is not
    /// aligned to the server's minimum block.
    fn widen(&self, off: u64, len: usize) -> Option<(u64, usize)> {
        let a = self.min_block as u64;
        let end = off + len as u64;
        if a <= 1 || (off.is_multiple_of(a) && end.is_multiple_of(a)) {
            return None;
        }
        let start = off - off % a;
        Some((start, (end.next_multiple_of(a) - start) as usize))
    }

    /// Reads `buf.len()` bytes at `off`.
    pub fn read(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if let Some((start, n)) = self.widen(off, buf.len()) {
            let mut tmp = vec![0u8; n];
            self.read_aligned(&mut tmp, start)?;
            let at = (off - start) as usize;
            buf.copy_from_slice(&tmp[at..at + buf.len()]);
            return Ok(());
        }
        self.read_aligned(buf, off)
    }

    fn read_aligned(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let step = self.max_payload as usize;
        for (i, piece) in buf.chunks_mut(step).enumerate() {
            let at = off + (i * step) as u64;
            self.with(|c| c.request(cmd::READ, 0, at, piece.len() as u64, &[], Some(piece)))?;
        }
        Ok(())
    }

    pub fn write(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if let Some((start, n)) = self.widen(off, buf.len()) {
            let _only = self.rmw.write().unwrap_or_else(|p| p.into_inner());
            let mut tmp = vec![0u8; n];
            self.read_aligned(&mut tmp, start)?;
            let at = (off - start) as usize;
            tmp[at..at + buf.len()].copy_from_slice(buf);
            return self.write_aligned(&tmp, start);
        }
        let _shared = self.rmw.read().unwrap_or_else(|p| p.into_inner());
        self.write_aligned(buf, off)
    }

    fn write_aligned(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let step = self.max_payload as usize;
        for (i, piece) in buf.chunks(step).enumerate() {
            let at = off + (i * step) as u64;
            self.with(|c| c.request(cmd::WRITE, 0, at, piece.len() as u64, piece, None))?;
        }
        Ok(())
    }

    /// Makes [off, off + len) read as zeros; `may_unmap` lets the server
    /// free the space.
    pub fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if self.flags & tflags::SEND_WRITE_ZEROES == 0 {
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64) as usize;
                self.write(&zeros[..n], off + done)?;
                done += n as u64;
            }
            return Ok(());
        }
        // Partial blocks at the edges are written as zeros.
        let a = self.min_block as u64;
        let (mut off, mut len) = (off, len);
        if a > 1 && len > 0 {
            let head = (a - off % a) % a;
            if head > 0 {
                let n = head.min(len);
                self.write(&vec![0u8; n as usize], off)?;
                (off, len) = (off + n, len - n);
            }
            let tail = len % a;
            if tail > 0 {
                self.write(&vec![0u8; tail as usize], off + len - tail)?;
                len -= tail;
            }
            if len == 0 {
                return Ok(());
            }
        }
        let flags = if may_unmap { 0 } else { cmd_flags::NO_HOLE };
        let _shared = self.rmw.read().unwrap_or_else(|p| p.into_inner());
        self.chunked(off, len, |c, at, n| {
            c.request(cmd::WRITE_ZEROES, flags, at, n, &[], None)
        })
    }

    /// A discard hint (TRIM), where the server takes one.
    pub fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        if self.flags & tflags::SEND_TRIM == 0 {
            return Ok(());
        }
        // A hint: only the whole blocks inside the range.
        let a = self.min_block as u64;
        let start = off.next_multiple_of(a.max(1));
        let end = (off + len) - (off + len) % a.max(1);
        if end <= start {
            return Ok(());
        }
        let (off, len) = (start, end - start);
        self.chunked(off, len, |c, at, n| {
            c.request(cmd::TRIM, 0, at, n, &[], None)
        })
    }

    pub fn flush(&self) -> io::Result<()> {
        if self.flags & tflags::SEND_FLUSH == 0 {
            return Ok(());
        }
        self.with(|c| c.request(cmd::FLUSH, 0, 0, 0, &[], None))
    }

    /// Ranges without a payload, cut to what a compact header holds.
    fn chunked(
        &self,
        off: u64,
        len: u64,
        f: impl Fn(&mut Conn, u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let step = 1u64 << 30;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step);
            self.with(|c| f(c, off + done, n))?;
            done += n;
        }
        Ok(())
    }

    /// Whether [off, ...) holds data (false: a hole that reads as zeros),
    /// and for how many of `len` bytes that stays so: `base:allocation`,
    /// or all data when the server offers no block status.
    pub fn data_at(&self, off: u64, len: u64) -> io::Result<(bool, u64)> {
        let Some(id) = self.allocation else {
            return Ok((true, len));
        };
        let len = len.min(u32::MAX as u64 & !0xfff).max(1);
        let (n, flags) = self.with(|c| c.block_status(id, off, len))?;
        // A hole that does not read as zeros is data to a reader.
        let zero = flags & state::ZERO != 0;
        Ok((!zero, n.min(len)))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let c = self.conn.get_mut().unwrap_or_else(|p| p.into_inner());
        if !c.poisoned {
            let mut b = Vec::new();
            Request {
                flags: 0,
                kind: cmd::DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            }
            .encode(c.h, &mut b);
            let _ = c.s.write_all(&b);
        }
    }
}

impl Conn {
    /// The handshake: returns size, flags, largest payload, minimum block
    /// size and the `base:allocation` context id.
    fn handshake(
        &mut self,
        export: &str,
        tls: Option<&super::uri::TlsParams>,
    ) -> io::Result<(u64, u16, u32, u32, Option<u32>)> {
        let mut hello = [0u8; 18];
        self.s.read_exact(&mut hello)?;
        let mut c = Cursor::new(&hello);
        let magic = c.u64().map_err(|e| bad(e.to_string()))?;
        let opt_magic = c.u64().map_err(|e| bad(e.to_string()))?;
        let hflags = c.u16().map_err(|e| bad(e.to_string()))?;
        if magic != NBDMAGIC || opt_magic != IHAVEOPT {
            return Err(bad("not an NBD server speaking the newstyle handshake"));
        }
        if hflags & handshake::FIXED_NEWSTYLE == 0 {
            return Err(bad("the NBD server does not speak fixed newstyle"));
        }
        let no_zeroes = hflags & handshake::NO_ZEROES != 0;
        let cflags = client::FIXED_NEWSTYLE | if no_zeroes { client::NO_ZEROES } else { 0 };
        self.s.write_all(&cflags.to_be_bytes())?;
        if let Some(p) = tls {
            self.start_tls(p)?;
        }
        if self
            .option(opt::EXTENDED_HEADERS, &[])?
            .last()
            .is_some_and(|r| r.0 == rep::ACK)
        {
            self.h = Headers::Extended;
        } else if self
            .option(opt::STRUCTURED_REPLY, &[])?
            .last()
            .is_some_and(|r| r.0 == rep::ACK)
        {
            self.h = Headers::Compact { structured: true };
        }
        let mut allocation = None;
        if self.h.structured() {
            let m = MetaRequest {
                export: export.into(),
                queries: vec!["base:allocation".into()],
            };
            let replies = self.option(opt::SET_META_CONTEXT, &m.encode())?;
            if replies.last().is_some_and(|r| r.0 == rep::ACK) {
                for (t, d) in &replies {
                    if *t == rep::META_CONTEXT && d.len() >= 4 && &d[4..] == b"base:allocation" {
                        allocation = Some(u32::from_be_bytes(d[..4].try_into().unwrap()));
                    }
                }
            }
        }
        let go = InfoRequest {
            name: export.into(),
            items: vec![info::BLOCK_SIZE],
        };
        let replies = self.option(opt::GO, &go.encode())?;
        let (last, msg) = replies
            .last()
            .cloned()
            .unwrap_or((rep::ERR_UNSUP, Vec::new()));
        if last == rep::ERR_UNSUP && self.h != Headers::Extended {
            // An old server: the name alone, and no way to hear an error.
            self.s
                .write_all(&OptionHeader::encode(opt::EXPORT_NAME, export.as_bytes()))?;
            let mut b = [0u8; 10];
            self.s.read_exact(&mut b)?;
            if !no_zeroes {
                let mut z = [0u8; 124];
                self.s.read_exact(&mut z)?;
            }
            let size = u64::from_be_bytes(b[..8].try_into().unwrap());
            let flags = u16::from_be_bytes(b[8..].try_into().unwrap());
            check_size(size)?;
            return Ok((size, flags, MAX_PAYLOAD, 1, allocation));
        }
        if last != rep::ACK {
            let text = printable(&String::from_utf8_lossy(&msg));
            return Err(io::Error::new(
                match last {
                    rep::ERR_UNKNOWN => io::ErrorKind::NotFound,
                    _ => io::ErrorKind::Other,
                },
                format!("NBD server refused export '{export}': {text}"),
            ));
        }
        let (mut size, mut flags, mut max, mut min) = (None, 0, MAX_PAYLOAD, 1);
        for (t, d) in &replies {
            if *t != rep::INFO {
                continue;
            }
            match Info::parse(d).map_err(|e| bad(format!("NBD_REP_INFO: {e}")))? {
                Info::Export { size: s, flags: f } => {
                    size = Some(s);
                    flags = f;
                }
                Info::BlockSize { min: n, max: m, .. } => {
                    // The spec's bounds: a power of two up to 64 KiB.
                    if !n.is_power_of_two() || n > 65536 {
                        return Err(bad(format!("NBD minimum block size {n}")));
                    }
                    min = n;
                    max = m.clamp(512, MAX_PAYLOAD);
                }
                _ => {}
            }
        }
        let size = size.ok_or_else(|| bad("the NBD server sent no export size"))?;
        check_size(size)?;
        // Payloads in whole blocks.
        let max = (max - max % min).max(min);
        Ok((size, flags, max, min, allocation))
    }

    /// NBD_OPT_STARTTLS, then the TLS handshake: everything after it
    /// travels inside TLS.
    fn start_tls(&mut self, p: &super::uri::TlsParams) -> io::Result<()> {
        let config = super::tls::client_config(p).map_err(io::Error::other)?;
        let replies = self.option(opt::STARTTLS, &[])?;
        if let Some((t, msg)) = replies.last().filter(|r| r.0 != rep::ACK) {
            return Err(io::Error::other(format!(
                "the NBD server refused TLS ({t:#x}): {}",
                String::from_utf8_lossy(msg)
            )));
        }
        let name = rustls::pki_types::ServerName::try_from(p.hostname.clone())
            .map_err(|e| io::Error::other(format!("tls-hostname {}: {e}", p.hostname)))?;
        let conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
        let raw = std::mem::replace(&mut self.s, Stream::Closed);
        let mut tls = rustls::StreamOwned::new(conn, raw);
        // The TLS handshake now, so that a refusal is reported here.
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        self.s = Stream::Tls(Box::new(tls));
        Ok(())
    }

    /// Sends an option; returns its replies, the final one last.
    fn option(&mut self, o: u32, data: &[u8]) -> io::Result<Vec<(u32, Vec<u8>)>> {
        self.s.write_all(&OptionHeader::encode(o, data))?;
        let mut v = Vec::new();
        let mut kept = 0usize;
        loop {
            let mut h = [0u8; ReplyHeader::LEN];
            self.s.read_exact(&mut h)?;
            let h = ReplyHeader::parse(&h).map_err(|e| bad(e.to_string()))?;
            kept += h.len as usize;
            let misplaced = h.reply == rep::SERVER && o != opt::LIST;
            if h.option != o || h.len > MAX_OPTION_REPLY || kept > MAX_OPTION_REPLIES || misplaced {
                return Err(bad("the NBD server's option reply does not fit the option"));
            }
            let mut d = vec![0u8; h.len as usize];
            self.s.read_exact(&mut d)?;
            let last = h.reply == rep::ACK || rep::is_error(h.reply);
            v.push((h.reply, d));
            if last {
                return Ok(v);
            }
        }
    }

    /// One request and its whole reply; a read's data lands in `into`.
    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
        into: Option<&mut [u8]>,
    ) -> io::Result<()> {
        let r = self.send(kind, flags, offset, len, payload);
        let r = self.poison_on_err(r)?;
        let res = self.receive(&r, into, None);
        match self.poison_on_err(res)? {
            None => Ok(()),
            Some(server_error) => Err(server_error),
        }
    }

    fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> io::Result<Request> {
        let r = Request {
            flags: if self.h == Headers::Extended && !payload.is_empty() {
                flags | cmd_flags::PAYLOAD_LEN
            } else {
                flags
            },
            kind,
            cookie: self.cookie,
            offset,
            len,
        };
        self.cookie += 1;
        self.buf.clear();
        r.encode(self.h, &mut self.buf);
        if payload.len() < 64 << 10 {
            self.buf.extend_from_slice(payload);
            self.s.write_all(&self.buf)?;
        } else {
            self.s.write_all(&self.buf)?;
            self.s.write_all(payload)?;
        }
        Ok(r)
    }

    /// A failed send, or a reply that could not be read whole, leaves
    /// the stream mid-message: the connection is not used again.
    fn poison_on_err<T>(&mut self, res: io::Result<T>) -> io::Result<T> {
        if res.is_err() {
            self.poisoned = true;
        }
        res
    }

    fn block_status(&mut self, id: u32, offset: u64, len: u64) -> io::Result<(u64, u32)> {
        let r = self.send(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, offset, len, &[]);
        let r = self.poison_on_err(r)?;
        let mut first = None;
        let res = self.receive(&r, None, Some((id, &mut first)));
        if let Some(server_error) = self.poison_on_err(res)? {
            return Err(server_error);
        }
        first.ok_or_else(|| {
            self.poisoned = true;
            bad("the NBD server's block status had no extent for base:allocation")
        })
    }
}
