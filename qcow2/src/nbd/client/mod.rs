//! The NBD client under the engine's files: one connection to one export,
//! opened with the fixed newstyle handshake (extended headers, else
//! structured replies, with `base:allocation` for block status), with
//! the requests of many threads in flight at once ([`transport`]). A
//! reply that breaks the framing or the request's bounds poisons the
//! connection: every later call fails, rather than read someone else's
//! data.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::RwLock;
use std::time::Duration;

use nbd_proto::consts::{cmd, cmd_flags, state, tflags};
use nbd_proto::request::{Headers, Request};

use super::uri::{Address, Server};
use super::Socket;
pub use list::Listed;
pub use transport::Sink;
use transport::Transport;

mod list;
mod negotiate;
mod receive;
#[cfg(test)]
mod tests;
mod transport;

/// The longest option reply accepted from a server, and the most bytes
/// of replies kept for one option.
const MAX_OPTION_REPLY: u32 = 1 << 20;
const MAX_OPTION_REPLIES: usize = 4 << 20;
/// The most replies kept for one option (empty ones cost no bytes).
const MAX_OPTION_REPLY_COUNT: usize = 1 << 16;
/// How long connecting and the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A byte stream to a server other than a socket (the fuzzing target's
/// replay of a server's bytes).
pub trait Duplex: Read + Write + Send + std::fmt::Debug {
    /// A second handle that writes to the same peer, so that requests go
    /// out while another thread waits for replies ([`transport`]); None:
    /// this one handle does both.
    fn split(&self) -> Option<Box<dyn Sink>> {
        None
    }
}

#[derive(Debug)]
enum Stream {
    Socket(Socket),
    Other(Box<dyn Duplex>),
    /// Inside TLS, over one of the above.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Stream>>),
    /// Inside a TLS-PSK session (OpenSSL's: see `nbd::tls`).
    Psk(Box<openssl::ssl::SslStream<Stream>>),
    /// Between the two during the upgrade.
    Closed,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "NBD connection closed")
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Socket(s) => s.read(b),
            Stream::Other(s) => s.read(b),
            Stream::Tls(s) => s.read(b),
            Stream::Psk(s) => s.read(b),
            Stream::Closed => Err(closed()),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Socket(s) => s.write(b),
            Stream::Other(s) => s.write(b),
            Stream::Tls(s) => s.write(b),
            Stream::Psk(s) => s.write(b),
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
            Stream::Socket(s) => s.set_timeouts(t),
            Stream::Tls(s) => s.sock.set_timeout(t),
            Stream::Psk(s) => s.get_ref().set_timeout(t),
            Stream::Other(_) | Stream::Closed => Ok(()),
        }
    }
}

/// A connection in its handshake.
#[derive(Debug)]
struct Conn {
    s: Stream,
    h: Headers,
}

/// A connected export.
#[derive(Debug)]
pub struct Client {
    t: Transport,
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

/// A connection to `server`.
/// Connects to `server`; a failure says so in QEMU's words ("Failed to
/// connect to 'PATH or HOST:PORT': ...").
fn connect_stream(server: &Server) -> io::Result<Stream> {
    let (s, shown) = match server {
        Server::Unix(p) => (
            UnixStream::connect(p).map(|s| Stream::Socket(Socket::Unix(s))),
            p.display().to_string(),
        ),
        Server::Tcp { host, port } => (
            connect_tcp(host, *port).and_then(|s| {
                s.set_nodelay(true)?;
                Ok(Stream::Socket(Socket::Tcp(s)))
            }),
            format!("{host}:{port}"),
        ),
    };
    s.map_err(|e| {
        let text = crate::error::strerror(&e);
        io::Error::new(e.kind(), format!("Failed to connect to '{shown}': {text}"))
    })
}

/// The exports of `server`, as `qemu-nbd --list` asks for them.
pub fn list_exports(
    server: &Server,
    tls: Option<&super::uri::TlsParams>,
) -> io::Result<Vec<Listed>> {
    let s = connect_stream(server)?;
    s.set_timeout(Some(CONNECT_TIMEOUT))?;
    let mut c = Conn {
        s,
        h: Headers::Compact { structured: false },
    };
    c.start(tls)?;
    c.list()
}

/// [`list_exports`] on a stream that speaks for a server (fuzzing).
pub fn list_over_stream(s: Box<dyn Duplex>) -> io::Result<Vec<Listed>> {
    let mut c = Conn {
        s: Stream::Other(s),
        h: Headers::Compact { structured: false },
    };
    c.start(None)?;
    c.list()
}

impl Client {
    /// Connects to `addr` and enters transmission; `writable` asks for
    /// a writable export (a read-only one is an error then).
    pub fn connect(addr: &Address, writable: bool) -> io::Result<Client> {
        let s = connect_stream(&addr.server)?;
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
        };
        let (size, flags, max_payload, min_block, allocation) = c.handshake(export, tls)?;
        c.s.set_timeout(None)?;
        let client = Client {
            t: Transport::new(c),
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

    /// One request without payload and its reply.
    fn request(&self, kind: u16, flags: u16, offset: u64, len: u64) -> io::Result<()> {
        self.t.call(req(kind, flags, offset, len), &[], None, None)
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
            let r = req(cmd::READ, 0, at, piece.len() as u64);
            self.t.call(r, &[], Some(piece), None)?;
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
            let r = req(cmd::WRITE, 0, at, piece.len() as u64);
            self.t.call(r, piece, None, None)?;
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
        self.chunked(off, len, |at, n| {
            self.request(cmd::WRITE_ZEROES, flags, at, n)
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
        self.chunked(off, len, |at, n| self.request(cmd::TRIM, 0, at, n))
    }

    pub fn flush(&self) -> io::Result<()> {
        if self.flags & tflags::SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(cmd::FLUSH, 0, 0, 0)
    }

    /// Ranges without a payload, cut to what a compact header holds.
    fn chunked(
        &self,
        off: u64,
        len: u64,
        f: impl Fn(u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let step = 1u64 << 30;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step);
            f(off + done, n)?;
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
        let r = req(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, off, len);
        let mut first = None;
        self.t.call(r, &[], None, Some((id, &mut first)))?;
        let Some((n, flags)) = first else {
            // The context asked for is missing: nothing it says can be
            // trusted any more.
            self.t.poison();
            return Err(bad(
                "the NBD server's block status had no extent for base:allocation",
            ));
        };
        // A hole that does not read as zeros is data to a reader.
        let zero = flags & state::ZERO != 0;
        Ok((!zero, n.min(len)))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.t.disconnect();
    }
}

/// A request; its cookie is given when it is sent.
fn req(kind: u16, flags: u16, offset: u64, len: u64) -> Request {
    Request {
        flags,
        kind,
        cookie: 0,
        offset,
        len,
    }
}
