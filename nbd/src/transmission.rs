//! The transmission phase, server side (§Transmission, §Request types):
//! requests read and answered on the engine, one at a time by [`serve`]
//! (over TLS), by [`crate::concurrent`]'s workers, or on a connection's
//! io_uring ([`crate::uring`], which answers with the same `Exec` what
//! its split data path does not). Requests
//! are checked before anything is done: a bad range, flag or length is
//! an error reply; only a request that breaks the framing (bad magic, a
//! payload beyond the limit) ends the connection.

use std::io::{self, BufReader, Read, Write};

use qcow2::pagebuf::PageBuf;

use nbd_proto::consts::{chunk, cmd, cmd_flags, errno, reply_flags};
use nbd_proto::reply;
use nbd_proto::request::{Headers, Request};
use nbd_proto::{WireError, MAX_PAYLOAD};

use crate::export::Export;
use crate::handshake::Session;
use crate::status;

#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed request: {0}")]
    Wire(#[from] WireError),
    #[error("request payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLong(u64),
}

/// How a request failed: the error value sent, and a message for humans
/// (sent only in structured and extended replies).
#[derive(Debug)]
pub(crate) struct Failure {
    errno: u32,
    msg: String,
    /// The engine refused to wait for another request's allocation
    /// ([`qcow2::sync::without_blocking`]): nothing is sent, the request
    /// runs again when woken.
    would_block: bool,
}

impl Failure {
    pub(crate) fn new(errno: u32, msg: impl Into<String>) -> Failure {
        Failure {
            errno,
            msg: msg.into(),
            would_block: false,
        }
    }

    /// A data read or write on the host file that failed with `errno`.
    pub(crate) fn host_io(what: &str, errno: i32) -> Failure {
        let e = match errno {
            libc::ENOSPC | libc::EDQUOT => errno::ENOSPC,
            _ => errno::EIO,
        };
        let msg = format!("{what}: {}", io::Error::from_raw_os_error(errno));
        Failure::new(e, msg)
    }
}

fn fail<T>(errno: u32, msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure::new(errno, msg))
}

impl From<qcow2::Error> for Failure {
    fn from(e: qcow2::Error) -> Failure {
        use qcow2::Error as E;
        let errno = match &e {
            E::ReadOnly | E::ReadOnlyFormat(_) | E::FirstSectorFormat => errno::EPERM,
            E::OutOfRange { .. } | E::InvalidArgument(_) => errno::EINVAL,
            E::NotSupportedByFormat(_) => errno::ENOTSUP,
            E::Io { source, .. }
                if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
            {
                errno::ENOSPC
            }
            _ => errno::EIO,
        };
        Failure {
            errno,
            msg: e.to_string(),
            would_block: matches!(e, E::WouldBlock),
        }
    }
}

/// What a connection may do beyond the export's own flags, and how it
/// is served.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// TRIM and WRITE_ZEROES without NO_HOLE free space (qemu-nbd's
    /// `--discard=unmap`); otherwise TRIM is a no-op.
    pub unmap: bool,
    /// How a plain connection's requests run (TLS ones run one at a
    /// time whatever this says).
    pub aio: Aio,
}

/// qemu-nbd's `--aio`: how a connection's requests are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aio {
    /// On an io_uring driven by the connection's thread
    /// ([`crate::uring`]); `native` is taken as this.
    IoUring,
    /// By worker threads ([`crate::concurrent`]).
    Threads,
}

/// Serves requests on `s` until the client disconnects (`NBD_CMD_DISC`
/// or closing its end), one at a time (TLS streams; sockets go through
/// [`crate::concurrent`]).
pub fn serve<S: Read + Write>(
    s: S,
    session: &Session,
    policy: Policy,
) -> Result<(), TransmissionError> {
    let mut r = BufReader::with_capacity(256 << 10, s);
    let mut data = PageBuf::new();
    let mut exec = Exec::new(session, policy);
    while let Some(req) = next_request(&mut r, session.headers, &mut data, |_| {})? {
        exec.answer(&req, &data);
        r.get_mut().write_all(&exec.out)?;
        exec.trim();
        trim_payload(&mut data);
    }
    Ok(())
}

/// Buffer capacity kept between requests.
const KEEP: usize = 4 << 20;
/// A payload is read (and its buffer grown) this much at a time.
const PIECE: u64 = 1 << 20;

/// One large request does not keep its buffer for good.
fn trim(b: &mut Vec<u8>) {
    if b.capacity() > KEEP {
        *b = Vec::with_capacity(KEEP);
    }
}

/// As `trim`, for a payload buffer.
fn trim_payload(b: &mut PageBuf) {
    if b.capacity() > KEEP {
        *b = PageBuf::new();
    }
}

/// Reads the next request and its payload (into `data`); None when the
/// client has gone (`NBD_CMD_DISC`, or its end closed between requests).
/// `before_payload` sees the request before its payload is read.
pub(crate) fn next_request<R: Read>(
    r: &mut R,
    h: Headers,
    data: &mut PageBuf,
    before_payload: impl FnOnce(&Request),
) -> Result<Option<Request>, TransmissionError> {
    let mut hdr = [0u8; 32];
    let hdr = &mut hdr[..h.request_len()];
    match r.read_exact(hdr) {
        Ok(()) => {}
        // The client closed between requests: a disconnect.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let req = Request::parse(hdr, h)?;
    let plen = req.payload_len(h);
    if plen > MAX_PAYLOAD as u64 {
        return Err(TransmissionError::PayloadTooLong(plen));
    }
    before_payload(&req);
    // Taken as it arrives, a piece at a time: a header that announces
    // 32 MiB and sends nothing commits nothing. Page-aligned, as the
    // engine's own buffers: a write that a kill cuts short ends on a
    // sector (`qcow2::pagebuf`).
    data.resize(0);
    while (data.len() as u64) < plen {
        let at = data.len();
        data.resize(at + (plen - at as u64).min(PIECE) as usize);
        r.read_exact(&mut data[at..])?;
    }
    Ok((req.kind != cmd::DISC).then_some(req))
}

/// Answers requests of one session: each answer is left in `out`.
pub(crate) struct Exec<'a> {
    pub(crate) out: Vec<u8>,
    session: &'a Session,
    policy: Policy,
}

impl<'a> Exec<'a> {
    pub(crate) fn new(session: &'a Session, policy: Policy) -> Exec<'a> {
        Exec {
            out: Vec::with_capacity(64 << 10),
            session,
            policy,
        }
    }

    fn headers(&self) -> Headers {
        self.session.headers
    }

    fn export(&self) -> &Export {
        &self.session.export
    }

    /// Does `req` (with its payload `data`) and leaves its reply, or its
    /// error reply, in `out`.
    pub(crate) fn answer(&mut self, req: &Request, data: &[u8]) {
        self.out.clear();
        if let Err(f) = self.execute(req, data) {
            self.out.clear();
            self.error_reply(req, &f);
        }
    }

    /// As [`answer`](Self::answer), in non-blocking mode: false (and
    /// nothing in `out`) when the engine would have waited for another
    /// request's allocation; the request is then run again when woken
    /// (every request the engine can refuse so is idempotent).
    pub(crate) fn try_answer(&mut self, req: &Request, data: &[u8]) -> bool {
        self.out.clear();
        if let Err(f) = self.execute(req, data) {
            self.out.clear();
            if f.would_block {
                return false;
            }
            self.error_reply(req, &f);
        }
        true
    }

    pub(crate) fn trim(&mut self) {
        trim(&mut self.out);
    }

    /// Checks a READ or WRITE whose data moves outside the engine's own
    /// reads and writes (see [`crate::uring`]) as [`execute`] would:
    /// an error here is the one `execute` would reply.
    ///
    /// [`execute`]: Self::execute
    pub(crate) fn check_data(&self, req: &Request) -> Result<(), Failure> {
        self.check_common(req)?;
        if req.kind == cmd::READ {
            self.check_read_len(req)?;
        }
        self.range(req, req.len)
    }

    /// The checks every command goes through.
    fn check_common(&self, req: &Request) -> Result<(), Failure> {
        let h = self.headers();
        let known = cmd_flags::FUA
            | cmd_flags::NO_HOLE
            | cmd_flags::DF
            | cmd_flags::REQ_ONE
            | cmd_flags::FAST_ZERO
            | if h == Headers::Extended {
                cmd_flags::PAYLOAD_LEN
            } else {
                0
            };
        if req.flags & !known != 0 {
            return fail(
                errno::EINVAL,
                format!("unknown command flags {:#x}", req.flags),
            );
        }
        if req.kind != cmd::WRITE && req.payload_len(h) > 0 {
            return fail(errno::EINVAL, "this command takes no payload");
        }
        let writes = matches!(req.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if writes && self.export().readonly {
            return fail(errno::EPERM, "the export is read-only");
        }
        Ok(())
    }

    /// Checks `req` and does it, leaving a successful reply in `out`.
    fn execute(&mut self, req: &Request, data: &[u8]) -> Result<(), Failure> {
        self.check_common(req)?;
        match req.kind {
            cmd::READ => self.read(req),
            cmd::WRITE => {
                self.range(req, req.len)?;
                let img = self.export().image.as_ref();
                if req.len > 0 {
                    // Into a raw file's padded last sector: the file grows
                    // to the size exported, as under qemu-nbd.
                    if req.offset + req.len > img.size() {
                        img.resize(self.export().size)?;
                    }
                    img.write_at(data, req.offset)?;
                }
                self.fua(req)?;
                self.ok(req);
                Ok(())
            }
            cmd::FLUSH => {
                self.export().image.flush()?;
                self.ok(req);
                Ok(())
            }
            cmd::TRIM => {
                self.range(req, req.len)?;
                // Not past the file's end (a raw file's padded sector).
                let img = self.export().image.as_ref();
                let len = req.len.min(img.size().saturating_sub(req.offset));
                if self.policy.unmap && len > 0 {
                    img.discard(req.offset, len)?;
                }
                self.fua(req)?;
                self.ok(req);
                Ok(())
            }
            cmd::WRITE_ZEROES => self.write_zeroes(req),
            cmd::CACHE => {
                // Nothing to warm: reads go through the host's page cache.
                self.range(req, req.len)?;
                self.ok(req);
                Ok(())
            }
            cmd::BLOCK_STATUS => self.block_status(req),
            _ => fail(errno::EINVAL, format!("unknown command {}", req.kind)),
        }
    }

    /// Refuses a range that does not lie within the export; writes past
    /// the end get ENOSPC, other commands EINVAL (§Request types).
    fn range(&self, req: &Request, len: u64) -> Result<(), Failure> {
        let size = self.export().size;
        if req.offset.checked_add(len).is_none_or(|end| end > size) {
            let e = match req.kind {
                cmd::WRITE | cmd::WRITE_ZEROES => errno::ENOSPC,
                _ => errno::EINVAL,
            };
            return fail(
                e,
                format!(
                    "range {}+{len} is past the end of the export ({size} bytes)",
                    req.offset
                ),
            );
        }
        Ok(())
    }

    pub(crate) fn fua(&self, req: &Request) -> Result<(), Failure> {
        if req.flags & cmd_flags::FUA != 0 {
            self.export().image.flush()?;
        }
        Ok(())
    }

    fn check_read_len(&self, req: &Request) -> Result<(), Failure> {
        if req.len > MAX_PAYLOAD as u64 {
            return fail(
                errno::EOVERFLOW,
                format!(
                    "read of {} bytes is over the {MAX_PAYLOAD}-byte limit",
                    req.len
                ),
            );
        }
        Ok(())
    }

    fn read(&mut self, req: &Request) -> Result<(), Failure> {
        self.check_read_len(req)?;
        self.range(req, req.len)?;
        let n = req.len as usize;
        if n == 0 {
            let h = self.headers();
            // No content chunk may describe nothing: a structured reply
            // (never a simple one, for a read) is then NONE alone.
            match h.structured() {
                true => reply::chunk_header(
                    &mut self.out,
                    h,
                    reply_flags::DONE,
                    chunk::NONE,
                    req.cookie,
                    req.offset,
                    0,
                ),
                false => reply::simple(&mut self.out, 0, req.cookie),
            }
            return Ok(());
        }
        let at = self.read_header(req);
        self.out.resize(at + n, 0);
        let img = self.session.export.image.as_ref();
        qcow2::blockstatus::read_padded(img, &mut self.out[at..], req.offset)?;
        Ok(())
    }

    /// Puts the header of a read's reply (with data to follow) in `out`;
    /// returns where the data goes.
    pub(crate) fn read_header(&mut self, req: &Request) -> usize {
        let h = self.headers();
        if h.structured() {
            reply::chunk_header(
                &mut self.out,
                h,
                reply_flags::DONE,
                chunk::OFFSET_DATA,
                req.cookie,
                req.offset,
                8 + req.len,
            );
            self.out.extend_from_slice(&req.offset.to_be_bytes());
        } else {
            reply::simple(&mut self.out, 0, req.cookie);
        }
        self.out.len()
    }

    fn write_zeroes(&mut self, req: &Request) -> Result<(), Failure> {
        self.range(req, req.len)?;
        let no_hole = req.flags & cmd_flags::NO_HOLE != 0;
        let unmap = self.policy.unmap && !no_hole;
        if req.flags & cmd_flags::FAST_ZERO != 0 && !self.zeroes_fast(req) {
            return fail(errno::ENOTSUP, "zeroing this range would not be fast");
        }
        if req.len > 0 {
            let img = self.export().image.as_ref();
            // A raw file's padded tail (QEMU's whole last sector) is not
            // in the file: nothing to zero there.
            let real = img.size();
            let len = req.len.min(real.saturating_sub(req.offset));
            if len > 0 {
                img.write_zeroes(req.offset, len, unmap)?;
            }
        }
        self.fua(req)?;
        self.ok(req);
        Ok(())
    }

    /// Whether zeroing the range changes only metadata or asks the file
    /// system to (`NBD_CMD_FLAG_FAST_ZERO`): a raw file's range is one
    /// fallocate; a qcow2 v3 image's whole clusters become zero clusters.
    fn zeroes_fast(&self, req: &Request) -> bool {
        let img = self.export().image.as_ref();
        match img.as_qcow2() {
            Some(q) => {
                let cs = q.cluster_size();
                let end = req.offset + req.len;
                q.header().version >= 3
                    && req.offset % cs == 0
                    && (end % cs == 0 || end == img.size())
            }
            None => img.format() == qcow2::Format::Raw,
        }
    }

    fn block_status(&mut self, req: &Request) -> Result<(), Failure> {
        let h = self.headers();
        if !h.structured() || self.session.contexts.is_empty() {
            return fail(errno::EINVAL, "no metadata context was selected");
        }
        let size = self.export().size;
        if req.offset >= size {
            return fail(
                errno::EINVAL,
                format!(
                    "offset {} is past the end of the export ({size} bytes)",
                    req.offset
                ),
            );
        }
        // The length is a hint: a range past the end is cut at it.
        let len = req.len.min(size - req.offset);
        if len == 0 {
            return fail(errno::EINVAL, "block status of an empty range");
        }
        let one = req.flags & cmd_flags::REQ_ONE != 0;
        let n = self.session.contexts.len();
        let mut payload = Vec::new();
        for (i, (id, ctx)) in self.session.contexts.iter().enumerate() {
            let ext = status::extents(self.export(), ctx, req.offset, len, one)?;
            payload.clear();
            reply::block_status_payload(&mut payload, h, *id, &ext);
            let kind = match h {
                Headers::Extended => chunk::BLOCK_STATUS_EXT,
                _ => chunk::BLOCK_STATUS,
            };
            let flags = if i + 1 == n { reply_flags::DONE } else { 0 };
            reply::chunk_header(
                &mut self.out,
                h,
                flags,
                kind,
                req.cookie,
                req.offset,
                payload.len() as u64,
            );
            self.out.extend_from_slice(&payload);
        }
        Ok(())
    }

    /// A successful reply without payload.
    pub(crate) fn ok(&mut self, req: &Request) {
        match self.headers() {
            Headers::Extended => reply::chunk_header(
                &mut self.out,
                Headers::Extended,
                reply_flags::DONE,
                chunk::NONE,
                req.cookie,
                req.offset,
                0,
            ),
            Headers::Compact { .. } => reply::simple(&mut self.out, 0, req.cookie),
        }
    }

    pub(crate) fn error_reply(&mut self, req: &Request, f: &Failure) {
        let h = self.headers();
        if !h.structured() {
            reply::simple(&mut self.out, f.errno, req.cookie);
            return;
        }
        let mut p = Vec::new();
        reply::error_payload(&mut p, f.errno, &f.msg);
        reply::chunk_header(
            &mut self.out,
            h,
            reply_flags::DONE,
            chunk::ERROR,
            req.cookie,
            req.offset,
            p.len() as u64,
        );
        self.out.extend_from_slice(&p);
    }
}
