//! Decoding a virtio-blk request from a descriptor chain (virtio 1.2,
//! section 5.2.6). The chain is treated as a byte stream, as ANY_LAYOUT
//! allows: the first 16 device-readable bytes are the header, the last
//! device-writable byte is the status, and the bytes between are the data.
//! A chain whose last descriptor is device-readable has no status byte
//! and is returned unanswered: nothing is written into readable memory.
//! Everything the guest controls is checked here, once: descriptor order,
//! a chain cut short by the walk's bounds, addresses inside guest memory, the data direction, sector alignment and
//! the range against the capacity. Later stages trust a [`Request`].

use std::ops::Deref;

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

/// Request types the device executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// Why a chain cannot be executed. With a status byte the request
/// completes with `status()`; without one it is returned unanswered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// No device-writable byte to put the status in: the chain has no
    /// device-writable descriptor, ends with a device-readable one
    /// (whose memory the device must not write), or with one that
    /// wraps around the address space.
    NoStatus,
    /// Any other defect: complete with this status and log the reason.
    Status(u8, String),
}

/// A validated request: the data is `segs`, a list of guest ranges in
/// stream order, `len` bytes in all.
#[derive(Debug, Default)]
pub struct Request {
    pub head: u16,
    pub kind: Option<Kind>,
    /// Byte offset on the disk (sector * 512) for In/Out.
    pub offset: u64,
    pub len: u64,
    pub segs: Vec<(GuestAddress, u32)>,
    pub status: GuestAddress,
    /// Readable or writable descriptors of the chain, as (addr, len, write).
    descs: Vec<(GuestAddress, u32, bool)>,
}

const HEADER_LEN: u64 = 16;

impl Request {
    /// Decodes `chain` into `self` (reusing its buffers). `capacity` is
    /// the disk size in bytes.
    pub fn parse<M, T>(
        &mut self,
        chain: DescriptorChain<M>,
        mem: &T,
        capacity: u64,
        readonly: bool,
    ) -> Result<(), Invalid>
    where
        M: Deref<Target = T>,
        T: GuestMemory + GuestMemoryBackend,
    {
        self.parse_descs(chain.head_index(), chain, mem, capacity, readonly)
    }

    /// Decodes the chain of `head` whose descriptors are `chain` (from
    /// the avail ring, or walked from a head the inflight region gave:
    /// `rimg_vhost_server::chain`).
    pub fn parse_descs<T>(
        &mut self,
        head: u16,
        chain: impl Iterator<Item = Descriptor>,
        mem: &T,
        capacity: u64,
        readonly: bool,
    ) -> Result<(), Invalid>
    where
        T: GuestMemory + GuestMemoryBackend,
    {
        self.head = head;
        self.kind = None;
        self.segs.clear();
        self.descs.clear();
        self.len = 0;
        self.offset = 0;
        let (mut readable, mut writable) = (0u64, 0u64);
        let mut bad: Option<&str> = None;
        let mut cut_short = false;
        for d in chain {
            if d.is_write_only() {
                writable += u64::from(d.len());
            } else {
                readable += u64::from(d.len());
                if writable > 0 {
                    bad.get_or_insert("readable descriptor after a writable one");
                }
            }
            if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
                bad.get_or_insert("descriptor outside guest memory");
            }
            if d.len() > 0 {
                self.descs.push((d.addr(), d.len(), d.is_write_only()));
            }
            // virtio-queue (and `chain::at`) end the walk quietly after a
            // descriptor that still has NEXT when they hit a bound.
            cut_short = d.has_next();
        }
        if cut_short {
            bad.get_or_insert(
                "descriptor chain loops, is longer than the queue or has a bad next index",
            );
        }
        if writable == 0 {
            return Err(Invalid::NoStatus);
        }
        let (last_addr, last_len, last_writable) = *self.descs.last().expect("writable > 0");
        if !last_writable {
            // The status is the chain's last byte and must be writable;
            // virtio puts readable descriptors before writable ones.
            return Err(Invalid::NoStatus);
        }
        // A descriptor ending past the top of the address space has no
        // last byte to write.
        self.status = last_addr
            .checked_add(u64::from(last_len) - 1)
            .ok_or(Invalid::NoStatus)?;
        if let Some(why) = bad {
            // The status byte itself may be outside memory: the caller
            // checks the write and drops the request if it fails.
            return Err(ioerr(why));
        }
        if readable < HEADER_LEN {
            return Err(ioerr("request header shorter than 16 bytes"));
        }
        let mut hdr = [0u8; HEADER_LEN as usize];
        self.gather(mem, 0, &mut hdr)
            .map_err(|_| ioerr("header unreadable"))?;
        let typ = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        let data_out = readable - HEADER_LEN;
        let data_in = writable - 1;
        let kind = match typ {
            VIRTIO_BLK_T_IN => Kind::In,
            VIRTIO_BLK_T_OUT => Kind::Out,
            VIRTIO_BLK_T_FLUSH => Kind::Flush,
            VIRTIO_BLK_T_GET_ID => Kind::GetId,
            VIRTIO_BLK_T_DISCARD => Kind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Kind::WriteZeroes,
            t => {
                return Err(Invalid::Status(
                    VIRTIO_BLK_S_UNSUPP as u8,
                    format!("unsupported request type {t}"),
                ))
            }
        };
        let (start, len) = match kind {
            Kind::In | Kind::GetId => {
                if data_out != 0 {
                    return Err(ioerr("device-readable data in a read request"));
                }
                (readable, data_in)
            }
            Kind::Out | Kind::Discard | Kind::WriteZeroes => {
                if data_in != 0 {
                    return Err(ioerr("device-writable data in a write request"));
                }
                (HEADER_LEN, data_out)
            }
            Kind::Flush => (HEADER_LEN, 0),
        };
        if readonly && matches!(kind, Kind::Out | Kind::Discard | Kind::WriteZeroes) {
            return Err(ioerr("write to a read-only device"));
        }
        if matches!(kind, Kind::In | Kind::Out) {
            if len % 512 != 0 {
                return Err(ioerr("data length not a multiple of 512"));
            }
            let end = sector
                .checked_mul(512)
                .and_then(|o| o.checked_add(len))
                .filter(|&e| e <= capacity);
            if end.is_none() {
                return Err(ioerr("request past the end of the disk"));
            }
            self.offset = sector * 512;
        }
        if matches!(kind, Kind::Discard | Kind::WriteZeroes) && (len == 0 || len % 16 != 0) {
            return Err(ioerr("discard/write-zeroes payload not whole segments"));
        }
        if matches!(kind, Kind::Discard | Kind::WriteZeroes)
            && len / 16 > u64::from(crate::config::MAX_DISCARD_SEG)
        {
            return Err(ioerr("too many discard/write-zeroes segments"));
        }
        self.kind = Some(kind);
        self.len = len;
        self.slice_stream(start, len);
        Ok(())
    }

    /// Fills `segs` with the stream bytes [start, start + len).
    fn slice_stream(&mut self, start: u64, len: u64) {
        let mut pos = 0u64;
        let end = start + len;
        for &(addr, dlen, _) in &self.descs {
            let (a, b) = (pos, pos + u64::from(dlen));
            pos = b;
            let (s, e) = (a.max(start), b.min(end));
            if s < e {
                self.segs.push((addr.unchecked_add(s - a), (e - s) as u32));
            }
        }
    }

    /// Copies stream bytes starting at `start` into `out`.
    fn gather<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        start: u64,
        out: &mut [u8],
    ) -> vm_memory::GuestMemoryResult<()> {
        let mut pos = 0u64;
        let mut done = 0usize;
        for &(addr, dlen, _) in &self.descs {
            if done == out.len() {
                break;
            }
            let (a, b) = (pos, pos + u64::from(dlen));
            pos = b;
            let want = start + done as u64;
            if want >= b || want < a {
                continue;
            }
            let n = ((b - want) as usize).min(out.len() - done);
            mem.read_slice(&mut out[done..done + n], addr.unchecked_add(want - a))?;
            done += n;
        }
        Ok(())
    }

    /// Reads the request's data bytes [at, at + out.len()) (for the
    /// discard segments).
    pub fn read_data<M: GuestMemoryBackend>(&self, mem: &M, at: u64, out: &mut [u8]) -> bool {
        copy_segs(&self.segs, at, out.len(), |addr, range| {
            mem.read_slice(&mut out[range], addr).is_ok()
        })
    }

    /// Writes `data` into the request's data bytes at `at`.
    pub fn write_data<M: GuestMemoryBackend>(&self, mem: &M, at: u64, data: &[u8]) -> bool {
        copy_segs(&self.segs, at, data.len(), |addr, range| {
            mem.write_slice(&data[range], addr).is_ok()
        })
    }
}

/// Walks the parts of `segs` covering stream bytes [at, at + len), calling
/// `f(guest address, range in the caller's buffer)` for each.
fn copy_segs(
    segs: &[(GuestAddress, u32)],
    at: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> bool,
) -> bool {
    let mut pos = 0u64;
    let mut done = 0usize;
    for &(addr, slen) in segs {
        if done == len {
            break;
        }
        let (a, b) = (pos, pos + u64::from(slen));
        pos = b;
        let want = at + done as u64;
        if want >= b || want < a {
            continue;
        }
        let n = ((b - want) as usize).min(len - done);
        if !f(addr.unchecked_add(want - a), done..done + n) {
            return false;
        }
        done += n;
    }
    done == len
}

fn ioerr(why: &str) -> Invalid {
    Invalid::Status(VIRTIO_BLK_S_IOERR as u8, why.to_string())
}

/// One DISCARD / WRITE_ZEROES segment (virtio 1.2, 5.2.6: struct
/// virtio_blk_discard_write_zeroes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroSeg {
    pub sector: u64,
    pub num_sectors: u32,
    pub unmap: bool,
}

impl ZeroSeg {
    /// Decodes a segment; reserved flag bits make it invalid.
    pub fn decode(b: &[u8; 16]) -> Option<ZeroSeg> {
        let flags = u32::from_le_bytes(b[12..16].try_into().unwrap());
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return None;
        }
        Some(ZeroSeg {
            sector: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            num_sectors: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        })
    }

    /// The segment's byte offset and length on a disk of `capacity`
    /// bytes, or None when it reaches past the end (or overflows).
    pub fn byte_range(&self, capacity: u64) -> Option<(u64, u64)> {
        let len = u64::from(self.num_sectors) * 512;
        let off = self.sector.checked_mul(512)?;
        off.checked_add(len)
            .filter(|&e| e <= capacity)
            .map(|_| (off, len))
    }
}

#[cfg(test)]
mod tests;
