//! The copy itself: each worker claims the next part of the sources
//! ([`Claims`]), plans what the target gets (data runs, zero runs) and
//! carries it out.
//!
//! Without -W the target is written in guest order, so that a fresh
//! image's clusters lie in guest order as qemu-img's do. Where the target
//! takes the split data path (data in clear, no compression), workers
//! still copy in parallel: they map their writes (allocating clusters)
//! one claim after the other, in turn ([`Turn`]), and move the data and
//! commit outside the turn. A raw target's offsets are fixed, but its
//! workers reserve the file space of their writes in turn (see
//! [`Job::reserve`]), so that the file's blocks lie in guest order too.
//! Elsewhere (foreign formats, encrypted images) the workers plan in
//! parallel and write in turn; with -W or -c they write as they go.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use qcow2::{chain_status, ChainStatus, Image, PendingWrite};

use super::sources::Sources;
use super::sparse::sparse_runs;
use super::turn::{Ticket, Turn};
use super::CHUNK;
use crate::common::is_zero;
use crate::progress::Progress;
use crate::CliError;

pub(super) struct Job<'a> {
    pub(super) target: &'a Arc<dyn Image>,
    /// The target's cluster size; None for a raw target.
    pub(super) cluster: Option<u64>,
    pub(super) compress: bool,
    /// -S: zero runs shorter than this are written as data; 0 allocates
    /// everything.
    pub(super) sparse: u64,
    pub(super) target_zero: bool,
    /// -n without -B: zero regions are written whatever the target holds.
    pub(super) overwrite_zeros: bool,
    pub(super) progress: Progress,
    /// Count the data of each claim (for progress or the rate limit).
    pub(super) count_data: bool,
    /// Progress is shown, and counts data (the total is the data to
    /// copy); otherwise it counts guest bytes.
    pub(super) progress_data: bool,
    /// -r: data copied per second.
    pub(super) limit: Option<crate::rate::Limit>,
    /// Writes are mapped in guest order, turn by turn (see the module
    /// docs); None: each worker writes as it goes.
    pub(super) turn: Option<Turn>,
    /// The target maps writes (`begin_write`); without, a claim's turn
    /// covers its whole writes.
    pub(super) split_writes: bool,
    /// -C: data runs are copied by the kernel (see `offload`), until a
    /// pair of files refuses.
    pub(super) offload: AtomicBool,
    pub(super) failed: AtomicBool,
    /// Reserving a raw target's space failed once: not tried again.
    pub(super) no_reserve: AtomicBool,
    /// The error of the earliest claim that failed: the one qemu-img
    /// reports (it stops at the first), whichever worker came to it last.
    pub(super) error: Mutex<Option<(u64, CliError)>>,
}

/// What a claim's plan asks of the target, in guest order.
enum Op<'b> {
    Write(u64, &'b [u8]),
    Zeroes(u64, u64),
    /// -C: the source's bytes there, not read (see `offload`).
    Copy(u64, u64),
}

/// What a mapped write puts in place.
enum Payload<'b> {
    Bytes(&'b [u8]),
    /// The source's bytes from this offset on (-C).
    Source(u64),
}

/// A claim's writes mapped in its turn, in guest order, data not yet
/// written; dropped unfinished, they roll back.
#[derive(Default)]
struct Mapped<'b> {
    writes: Vec<(PendingWrite, Payload<'b>)>,
    /// Guest offset where the last one ends.
    end: u64,
}

/// Hands out disjoint, increasing parts of a chunk's buffer, so that the
/// runs planned from it can be borrowed all at once.
struct Carve<'b> {
    rest: &'b mut [u8],
    /// Source offset of `rest[0]`.
    at: u64,
}

impl<'b> Carve<'b> {
    fn take(&mut self, from: u64, to: u64) -> &'b mut [u8] {
        let rest = std::mem::take(&mut self.rest);
        let (_, rest) = rest.split_at_mut((from - self.at) as usize);
        let (part, rest) = rest.split_at_mut((to - from) as usize);
        self.rest = rest;
        self.at = to;
        part
    }
}

/// The most a claim takes of a run that reads as zeros.
const MAX_SPAN: u64 = 64 * CHUNK;

/// Hands out the sources' bytes in claims, in order: a chunk, or where
/// the sources read as zeros a span of whole chunks (up to
/// [`MAX_SPAN`]), so that a sparse image's holes cost a claim (and a
/// turn) per span rather than per chunk. Claims are numbered in order,
/// the numbers turns are taken by; a number is handed out only with its
/// claim, whose ticket then holds it (see `turn`).
pub(super) struct Claims {
    /// (next offset, next claim's number).
    next: Mutex<(u64, u64)>,
    /// Spans over zeros (not with -S 0, which writes zeros as data).
    spans: bool,
}

/// A claimed part of the sources: its number, offset and length, and
/// whether it is a span known to read as zeros.
struct Claim {
    seq: u64,
    off: u64,
    len: u64,
    zeros: bool,
}

impl Claims {
    pub(super) fn new(spans: bool) -> Claims {
        Claims {
            next: Mutex::new((0, 0)),
            spans,
        }
    }

    /// The next claim, None once the sources are all claimed.
    fn take(&self, src: &Sources) -> Option<Claim> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let (off, seq) = *next;
        if off >= src.size {
            return None;
        }
        let chunk = CHUNK.min(src.size - off);
        let run = match self.spans && chunk == CHUNK {
            true => src.zero_run(off, MAX_SPAN.min(src.size - off)),
            false => 0,
        };
        // Whole chunks: claims stay aligned to them.
        let (len, zeros) = match run >= CHUNK {
            true => (run - run % CHUNK, true),
            false => (chunk, false),
        };
        *next = (off + len, seq + 1);
        Some(Claim {
            seq,
            off,
            len,
            zeros,
        })
    }
}

impl Job<'_> {
    pub(super) fn worker(&self, src: &Sources, claims: &Claims) {
        let mut buf = super::buffer::ChunkBuf::new(CHUNK as usize);
        let mut cmp = Vec::new();
        loop {
            if self.failed.load(Ordering::Relaxed) {
                return;
            }
            let Some(Claim {
                seq,
                off,
                len,
                zeros,
            }) = claims.take(src)
            else {
                return;
            };
            let mut ops = Vec::new();
            let ticket = self.turn.as_ref().map(|t| t.ticket(seq));
            let planned = match zeros {
                // Known to read as zeros: no data, nothing to read.
                true => self.zeros(off, len, &mut ops).map(|()| 0),
                false => self.plan(src, off, len, &mut buf, &mut cmp, &mut ops),
            };
            let r = match planned {
                Ok(data) if ops.is_empty() => {
                    // Nothing to write (zeros the target needs none for):
                    // the claims after this one need not wait for it.
                    if let Some(mut t) = ticket {
                        t.step_out();
                    }
                    Ok(data)
                }
                Ok(data) => self.apply(src, ticket, ops).map(|()| data),
                Err(e) => {
                    // Others stop claiming now, not once this one's
                    // turn (which its ticket waits for) has come.
                    self.failed.store(true, Ordering::Relaxed);
                    drop(ticket);
                    Err(e)
                }
            };
            match r {
                Ok(data) => {
                    if let Some(l) = &self.limit {
                        l.take(data);
                    }
                    // Without -p the figure (SIGUSR1's) is of the guest
                    // bytes passed, as the total is.
                    self.progress
                        .add(if self.progress_data { data } else { len })
                }
                Err(e) => {
                    self.failed.store(true, Ordering::Relaxed);
                    let mut first = self.error.lock().unwrap();
                    if first.as_ref().is_none_or(|(s, _)| seq < *s) {
                        *first = Some((seq, e));
                    }
                    return;
                }
            }
        }
    }

    /// Carries out a claim's plan. In turn, the zeroing and the mapping of
    /// each write (allocation happens here); then, as other claims take
    /// their turns, the data and the commits.
    fn apply(
        &self,
        src: &Sources,
        ticket: Option<Ticket<'_>>,
        ops: Vec<Op<'_>>,
    ) -> Result<(), CliError> {
        let ticket = match ticket {
            // No split write path: the writes themselves, in turn.
            Some(mut t) if !self.split_writes => {
                t.wait();
                if self.cluster.is_none() {
                    // A raw-like target (a fixed VHD): reserved as raw.
                    self.reserve(&ops);
                }
                for op in ops {
                    match op {
                        Op::Write(at, b) => self.write(at, b)?,
                        Op::Zeroes(at, len) => self.target.write_zeroes(at, len, true)?,
                        Op::Copy(at, len) => self.copy_now(src, at, len)?,
                    }
                }
                t.pass();
                return Ok(());
            }
            // Raw: reserve in turn, write as the others take theirs.
            Some(mut t) if self.cluster.is_none() => {
                t.wait();
                self.reserve(&ops);
                t.pass();
                None
            }
            None if self.cluster.is_none() => {
                self.reserve(&ops);
                None
            }
            t => t,
        };
        let Some(mut ticket) = ticket else {
            for op in ops {
                match op {
                    Op::Write(at, b) => self.write(at, b)?,
                    Op::Zeroes(at, len) => self.target.write_zeroes(at, len, true)?,
                    Op::Copy(at, len) => self.copy_now(src, at, len)?,
                }
            }
            return Ok(());
        };
        let _epoch = self.target.io_epoch();
        let mut mapped = Mapped::default();
        ticket.wait();
        for op in ops {
            match op {
                Op::Write(at, b) => self.map(src, &mut mapped, at, b.len(), |d, n| {
                    Payload::Bytes(&b[d..d + n])
                })?,
                Op::Copy(at, len) => self.map(src, &mut mapped, at, len as usize, |d, _| {
                    Payload::Source(at + d as u64)
                })?,
                Op::Zeroes(at, len) => {
                    self.unshare(src, &mut mapped, at)?;
                    self.target.write_zeroes(at, len, true)?;
                }
            }
        }
        ticket.pass();
        self.finish(src, &mut mapped)
    }

    /// Maps the write of `len` bytes at `at`, in as many pieces as the
    /// target takes; `payload(done, n)` is what the piece at `at + done`
    /// puts in place.
    fn map<'b>(
        &self,
        src: &Sources,
        mapped: &mut Mapped<'b>,
        at: u64,
        len: usize,
        payload: impl Fn(usize, usize) -> Payload<'b>,
    ) -> Result<(), CliError> {
        let mut done = 0;
        while done < len {
            let pos = at + done as u64;
            self.unshare(src, mapped, pos)?;
            let w = self.target.clone().begin_write(pos, len - done)?;
            let n = w.len();
            mapped.writes.push((w, payload(done, n)));
            mapped.end = pos + n as u64;
            done += n;
        }
        Ok(())
    }

    /// Reserves the file space a raw target's writes are about to fill
    /// (the blocks they would allocate anyway): the buffered writes then
    /// find their blocks allocated and skip the file system's per-block
    /// delayed allocation, a fifth of the copy's time on ext4. Reserved in
    /// guest order (in turn), the blocks lie in guest order, the file
    /// system leaving room where the holes are (reserved as the workers
    /// come, they would be scattered). Only an optimization: where the
    /// file cannot (a block device, a file system without fallocate) it
    /// is not tried again, and the writes report any real lack of space.
    fn reserve(&self, ops: &[Op<'_>]) {
        for op in ops {
            let (at, len) = match *op {
                Op::Write(at, b) => (at, b.len() as u64),
                Op::Copy(at, len) => (at, len),
                Op::Zeroes(..) => continue,
            };
            // Never past the end: a write there fails, a reservation
            // would grow the file.
            if self.no_reserve.load(Ordering::Relaxed) || at + len > self.target.size() {
                return;
            }
            if self.target.storage().allocate(at, len).is_err() {
                self.no_reserve.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Before the claim maps or zeroes from `at`: the cluster holding
    /// `at` may be one its last mapped write allocates, in flight until
    /// committed, which the engine would wait for (for good: the commit
    /// is this thread's). Then the writes mapped so far are finished
    /// first.
    fn unshare(&self, src: &Sources, mapped: &mut Mapped<'_>, at: u64) -> Result<(), CliError> {
        let Some(cs) = self.cluster else {
            return Ok(()); // Raw: nothing is ever in flight.
        };
        if !mapped.writes.is_empty() && (mapped.end - 1) / cs == at / cs {
            self.finish(src, mapped)?;
        }
        Ok(())
    }

    /// Writes the data of the mapped writes and commits them.
    fn finish(&self, src: &Sources, mapped: &mut Mapped<'_>) -> Result<(), CliError> {
        let file = self.target.data_storage();
        let mut buf = Vec::new();
        for (w, payload) in mapped.writes.drain(..) {
            // As the engine's own writes do (blkdebug rules).
            self.target.storage().debug_event("write_aio");
            match payload {
                Payload::Bytes(b) => file.write_data_at(b, w.host().0)?,
                Payload::Source(pos) => {
                    self.copy_into(src, w.host().0, pos, w.len() as u64, &mut buf)?
                }
            }
            w.commit()?;
        }
        Ok(())
    }

    /// Plans source bytes [off, off + len) for the same target offset;
    /// returns how many of them were data (read from the source), or all
    /// of them with -S 0.
    fn plan<'b>(
        &self,
        src: &'b Sources,
        off: u64,
        len: u64,
        buf: &'b mut [u8],
        cmp: &mut Vec<u8>,
        ops: &mut Vec<Op<'b>>,
    ) -> Result<u64, CliError> {
        let end = off + len;
        // Claims that are not zero spans are at most a chunk, the buffer.
        debug_assert!(len <= buf.len() as u64);
        let mut carve = Carve { rest: buf, at: off };
        if self.sparse == 0 {
            // -S 0: everything is written, zeros included.
            let b = src.bytes(off, carve.take(off, end))?;
            ops.push(Op::Write(off, b));
            return Ok(len);
        }
        let mut data_bytes = 0;
        let Some(g) = self.cluster else {
            // Raw target: copy data regions, leave holes.
            let mut pos = off;
            while pos < end {
                let (st, n) = src.status(pos, end - pos)?;
                match st {
                    ChainStatus::Zero => self.zeros(pos, n, ops)?,
                    ChainStatus::Data if self.offloading() => {
                        ops.push(Op::Copy(pos, n));
                        data_bytes += n;
                    }
                    ChainStatus::Data => {
                        let b = src.bytes(pos, carve.take(pos, pos + n))?;
                        self.data(pos, b, cmp, ops)?;
                        data_bytes += n;
                    }
                }
                pos += n;
            }
            return Ok(data_bytes);
        };
        // qcow2 target: decide per target cluster, so that a cluster whose
        // source has both data and holes is written whole (and can be
        // compressed whole).
        let mut pos = off;
        let mut runs: Vec<(u64, u64, bool)> = Vec::new(); // (from, to, is_data)
        while pos < end {
            let w_end = ((pos / g + 1) * g).min(end);
            let mut data = false;
            let mut p = pos;
            while p < w_end {
                let (st, n) = src.status(p, w_end - p)?;
                if st == ChainStatus::Data {
                    data = true;
                    break;
                }
                p += n;
            }
            match runs.last_mut() {
                Some((_, to, d)) if *d == data => *to = w_end,
                _ => runs.push((pos, w_end, data)),
            }
            pos = w_end;
        }
        for (from, to, data) in runs {
            if data && self.offloading() {
                ops.push(Op::Copy(from, to - from));
            } else if data {
                let b = src.bytes(from, carve.take(from, to))?;
                self.data(from, b, cmp, ops)?;
            } else {
                self.zeros(from, to - from, ops)?;
            }
        }
        if self.count_data {
            data_bytes = src.data_bytes(off, end)?;
        }
        Ok(data_bytes)
    }

    fn zeros(&self, at: u64, len: u64, ops: &mut Vec<Op<'_>>) -> Result<(), CliError> {
        if self.target_zero {
            return Ok(());
        }
        if self.overwrite_zeros {
            // -n: qemu-img assumes nothing of the target and writes zeros
            // over every zero region.
            ops.push(Op::Zeroes(at, len));
            return Ok(());
        }
        if let Some(b) = self.target.backing() {
            // Unallocated target clusters read from the backing file:
            // only where that reads as zeros may they stay unallocated.
            if at < b.size() {
                let mut pos = at;
                let end = at + len;
                while pos < end.min(b.size()) {
                    let (st, n) = chain_status(b.as_ref(), pos, end.min(b.size()) - pos)?;
                    if st == ChainStatus::Data {
                        ops.push(Op::Zeroes(pos, n));
                    }
                    pos += n;
                }
            }
            return Ok(());
        }
        ops.push(Op::Zeroes(at, len));
        Ok(())
    }

    /// Plans one run of source data at target offset `at`, leaving out
    /// zeros (and, over a backing file, what the backing file already has).
    fn data<'b>(
        &self,
        at: u64,
        b: &'b [u8],
        cmp: &mut Vec<u8>,
        ops: &mut Vec<Op<'b>>,
    ) -> Result<(), CliError> {
        // Granularity: whole target clusters for qcow2 (a cluster with any
        // data is allocated anyway), the -S size for raw.
        let gran = self.cluster.unwrap_or(self.sparse);
        let backing = self.target.backing().cloned();
        if backing.is_none() && !self.compress {
            // -S decides which zero runs become holes (with -c only whole
            // zero clusters do, as in qemu-img).
            for (from, to, data) in sparse_runs(b, at, self.sparse) {
                if data {
                    ops.push(Op::Write(at + from as u64, &b[from..to]));
                } else if !self.target_zero {
                    ops.push(Op::Zeroes(at + from as u64, (to - from) as u64));
                }
            }
            return Ok(());
        }
        let mut i = 0usize;
        let mut run_start: Option<usize> = None;
        while i < b.len() {
            // Piece up to the next granularity boundary in target space.
            let g_end = ((at + i as u64) / gran + 1) * gran;
            let j = ((g_end - at) as usize).min(b.len());
            let piece = &b[i..j];
            let skip = if let Some(bk) = &backing {
                // Same as what the backing file shows there: not needed.
                let pos = at + i as u64;
                cmp.resize(piece.len(), 0);
                if pos + piece.len() as u64 <= bk.size() {
                    bk.read_at(cmp, pos)?;
                    cmp[..] == *piece
                } else {
                    false
                }
            } else {
                is_zero(piece) && (self.target_zero || self.cluster.is_some())
            };
            if skip {
                if let Some(s) = run_start.take() {
                    ops.push(Op::Write(at + s as u64, &b[s..i]));
                }
                if backing.is_none() && !self.target_zero {
                    // A zero piece over data the target may hold.
                    ops.push(Op::Zeroes(at + i as u64, piece.len() as u64));
                }
            } else if run_start.is_none() {
                run_start = Some(i);
            }
            i = j;
        }
        if let Some(s) = run_start {
            ops.push(Op::Write(at + s as u64, &b[s..]));
        }
        Ok(())
    }

    pub(super) fn write(&self, at: u64, data: &[u8]) -> Result<(), CliError> {
        if !self.compress {
            return Ok(self.target.write_at(data, at)?);
        }
        let t = self.target;
        let cs = self.cluster.expect("compression needs clusters") as usize;
        let mut k = 0;
        while k < data.len() {
            let pos = at + k as u64;
            let n = (cs - (pos % cs as u64) as usize).min(data.len() - k);
            let whole = pos.is_multiple_of(cs as u64) && (n == cs || pos + n as u64 == t.size());
            // The source's last bytes, short of the target's end (which
            // is rounded up to a sector): a stream's last grain, padded
            // (it takes nothing else).
            let last = pos.is_multiple_of(cs as u64)
                && pos + cs as u64 >= t.size()
                && t.compressed_writes_only();
            if whole {
                t.write_compressed(pos, &data[k..k + n])?;
            } else if last && k + n == data.len() {
                let mut padded = data[k..k + n].to_vec();
                padded.resize((t.size() - pos) as usize, 0);
                t.write_compressed(pos, &padded)?;
            } else {
                t.write_at(&data[k..k + n], pos)?;
            }
            k += n;
        }
        Ok(())
    }
}
