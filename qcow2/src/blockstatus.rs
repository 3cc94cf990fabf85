//! An image as QEMU's block layer presents it: its length (raw files in
//! whole sectors, [`qemu_len`]), reads of that padded tail
//! ([`read_padded`]), and block status as qemu-img map and compare and
//! QEMU's NBD server report it: the BDRV_BLOCK_* flags per layer and through the backing
//! chain, with the lengths QEMU's drivers answer. `map` prints these flags
//! and `compare -s` compares them, so they follow QEMU's rules closely:
//!
//! - qcow2: data clusters are DATA with a host offset (OFFSET_VALID),
//!   compressed ones DATA|COMPRESSED without one, zero clusters ZERO (with
//!   the offset of a preallocated cluster), unallocated ones nothing;
//! - raw: the host file's data and holes (SEEK_DATA/SEEK_HOLE), always
//!   with an offset;
//! - the layer's answer is ALLOCATED when it said DATA or ZERO; an
//!   unallocated range reads as ZERO when there is no backing file or it
//!   lies past the backing file's end;
//! - EOF when the answer reaches the end of the layer;
//! - a qcow2 image that looks metadata-preallocated also asks its host
//!   file, and data clusters that are holes there become DATA|ZERO;
//! - vdi: allocated blocks are DATA with an offset, holes ZERO (not
//!   unallocated: QEMU's vdi driver says ZERO); a static image's data asks
//!   its host file as above (the engine's `Extent::recurse`);
//! - vpc: a dynamic disk as vdi (runs of unallocated blocks are one ZERO
//!   answer, as QEMU's vpc driver gives them); a fixed disk is DATA with
//!   an offset over its whole range, recursing into the host file;
//! - vmdk (sparse): one grain per answer, DATA with an offset, ZERO for a
//!   zeroed grain, and unallocated grains as qcow2's (the layer below, or
//!   zeros).

use std::sync::Arc;

use crate::image::{ExtentKind, Format, Image};
use crate::storage::Storage;

pub const DATA: u32 = 0x01;
pub const ZERO: u32 = 0x02;
pub const OFFSET_VALID: u32 = 0x04;
pub const ALLOCATED: u32 = 0x10;
pub const EOF: u32 = 0x20;
pub const COMPRESSED: u32 = 0x80;

/// Status of the first `len` bytes of a queried range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub flags: u32,
    pub len: u64,
    /// Host offset of the first byte (with OFFSET_VALID).
    pub offset: Option<u64>,
    /// The layer's file the offset is in (`Image::data_file`).
    pub file: u32,
}

impl Status {
    pub fn has(&self, f: u32) -> bool {
        self.flags & f != 0
    }
}

#[derive(Debug)]
struct Layer {
    img: Arc<dyn Image>,
    len: u64,
    /// Every data extent asks the host file (a qcow2 layer that looks
    /// metadata-preallocated); otherwise only those the engine marks.
    recurse_all: bool,
}

/// An image and its backing chain, top first.
#[derive(Debug)]
pub struct Chain {
    layers: Vec<Layer>,
}

impl Chain {
    pub fn new(top: &Arc<dyn Image>) -> crate::Result<Chain> {
        let mut layers = Vec::new();
        let mut cur = Some(top.clone());
        while let Some(img) = cur {
            cur = img.backing().cloned();
            // A check that fails (an unreadable refcount block) is taken
            // as a no, as QEMU takes it: the image still reads.
            let recurse_all = match img.as_qcow2() {
                Some(q) => q.metadata_preallocation_detected().unwrap_or(false),
                None => false,
            };
            layers.push(Layer {
                len: qemu_len(img.as_ref()),
                img,
                recurse_all,
            });
        }
        Ok(Chain { layers })
    }

    /// Length of the top image as QEMU sees it.
    pub fn len(&self) -> u64 {
        self.layers[0].len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn top(&self) -> &dyn Image {
        self.layers[0].img.as_ref()
    }

    /// Name of the file of layer `depth` (0 = top) that an offset in
    /// `file` points into, as opened: the image file, a qcow2 image's
    /// external data file, a VMDK extent file.
    pub fn file_name(&self, depth: usize, file: u32) -> String {
        let img = &self.layers[depth].img;
        let name = match (img.as_qcow2(), file) {
            (None, 0) => img.path(),
            _ => img.data_file(file).path(),
        };
        // An NBD export by the name QEMU gives it once open.
        match img.data_file(file).nbd() {
            Some(_) => crate::nbd::display_name(&name.to_string_lossy()),
            None => name.display().to_string(),
        }
    }

    /// Status of one layer (bdrv_co_do_block_status): a prefix of
    /// [off, off + bytes); length 0 with EOF past the layer's end.
    fn layer_status(&self, depth: usize, off: u64, bytes: u64) -> crate::Result<Status> {
        let l = &self.layers[depth];
        if off >= l.len {
            return Ok(Status {
                flags: EOF,
                len: 0,
                offset: None,
                file: 0,
            });
        }
        let bytes = bytes.min(l.len - off);
        let mut s = match l.img.format() {
            Format::Raw => file_status(l.img.as_ref(), l.len, off, bytes)?,
            // All data, no offset: the payload is encrypted (QEMU's
            // crypto driver has no block status of its own), or the
            // format has none (vhdx).
            Format::Luks | Format::Vhdx => Status {
                flags: DATA,
                len: bytes,
                offset: None,
                file: 0,
            },
            Format::Qcow2 | Format::Vdi | Format::Vpc | Format::Vmdk => {
                let e = l.img.block_status(off, bytes)?;
                match e.kind {
                    ExtentKind::Data if e.compressed => Status {
                        flags: DATA | COMPRESSED,
                        len: e.len,
                        offset: None,
                        file: 0,
                    },
                    ExtentKind::Data => {
                        let s = Status {
                            flags: DATA | OFFSET_VALID,
                            len: e.len,
                            offset: e.offset,
                            file: e.file,
                        };
                        match e.offset {
                            Some(at) if l.recurse_all || e.recurse => {
                                recurse(l.img.data_file(e.file), s, at)?
                            }
                            _ => s,
                        }
                    }
                    ExtentKind::Zero => Status {
                        flags: ZERO | if e.offset.is_some() { OFFSET_VALID } else { 0 },
                        len: e.len,
                        offset: e.offset,
                        file: e.file,
                    },
                    ExtentKind::Unallocated => Status {
                        flags: 0,
                        len: e.len,
                        offset: None,
                        file: 0,
                    },
                }
            }
        };
        if s.has(DATA | ZERO) {
            s.flags |= ALLOCATED;
        } else {
            match self.layers.get(depth + 1) {
                Some(b) if off < b.len => {}
                // Nothing below, or past the end of what is below.
                _ => s.flags |= ZERO,
            }
        }
        if off + s.len == l.len {
            s.flags |= EOF;
        }
        Ok(s)
    }

    /// Status through the whole chain (bdrv_block_status_above with no
    /// base), as compare asks for it: ALLOCATED when any layer stores the
    /// range.
    pub fn status_above(&self, off: u64, bytes: u64) -> crate::Result<Status> {
        let mut s = self.layer_status(0, off, bytes)?;
        if s.len == 0 || s.has(ALLOCATED) || self.layers.len() == 1 {
            return Ok(s);
        }
        let eof = s.has(EOF).then_some(off + s.len);
        let mut bytes = s.len;
        for depth in 1..self.layers.len() {
            let b = self.layer_status(depth, off, bytes)?;
            if b.len == 0 {
                // Past the end of a shorter backing image: its zeros count
                // as allocated there.
                s = Status {
                    flags: ZERO | ALLOCATED,
                    len: bytes,
                    offset: None,
                    file: 0,
                };
                break;
            }
            s = b;
            if s.has(ALLOCATED) {
                s.flags &= !EOF;
                break;
            }
            bytes = s.len;
        }
        if Some(off + s.len) == eof {
            s.flags |= EOF;
        }
        Ok(s)
    }

    /// Status as `map` asks for it: layer by layer from the top until one
    /// decides (DATA or ZERO); returns the status and that layer's depth.
    pub fn map_status(&self, off: u64, bytes: u64) -> crate::Result<(Status, usize)> {
        let mut bytes = bytes;
        let mut depth = 0;
        loop {
            let s = self.layer_status(depth, off, bytes)?;
            if s.has(DATA | ZERO) || depth + 1 == self.layers.len() {
                return Ok((s, depth));
            }
            bytes = s.len;
            depth += 1;
        }
    }
}

/// Status of a host file (file-posix): data or hole from SEEK_DATA and
/// SEEK_HOLE, always with an offset; `len` is the file's length as QEMU
/// sees it (rounded up to a sector), past the real end is a hole.
fn file_status(f: &dyn Image, len: u64, off: u64, bytes: u64) -> crate::Result<Status> {
    let real = f.size();
    let bytes = bytes.min(len.saturating_sub(off));
    if off >= real {
        return Ok(Status {
            flags: ZERO | OFFSET_VALID,
            len: bytes,
            offset: Some(off),
            file: 0,
        });
    }
    let e = f.block_status(off, bytes.min(real - off))?;
    Ok(Status {
        flags: if e.kind == ExtentKind::Data {
            DATA
        } else {
            ZERO
        } | OFFSET_VALID,
        len: e.len,
        offset: Some(off),
        file: 0,
    })
}

/// QEMU's BDRV_BLOCK_RECURSE: asks the host file whether the data at host
/// offset `at` is a hole. A hole (or the range past the file's end) makes
/// the range read as zeros; the answer is cut where the host file's status
/// changes, except at its end (in whole sectors, as QEMU sees the file).
fn recurse(host: &Storage, s: Status, at: u64) -> crate::Result<Status> {
    let real = host.len()?;
    let host_len = real.next_multiple_of(512);
    let mut s = s;
    if at >= host_len {
        s.flags |= ZERO;
        return Ok(s);
    }
    let bytes = s.len.min(host_len - at);
    // The sector-rounded tail past the real end is a hole.
    let (data, n) = match at < real {
        true => host.data_at(at, bytes.min(real - at)),
        false => (false, bytes),
    };
    if !data {
        s.flags |= ZERO;
    }
    // A hole that reaches the file's end covers the whole answer.
    if data || at + n != host_len {
        s.len = n;
    }
    Ok(s)
}

/// The length QEMU gives an image: raw files count in whole 512-byte
/// sectors (the block layer rounds their length up), the other formats'
/// sizes are exact.
pub fn qemu_len(img: &dyn Image) -> u64 {
    match img.format() {
        Format::Raw => img.size().next_multiple_of(512),
        Format::Qcow2 | Format::Luks | Format::Vdi | Format::Vpc | Format::Vmdk | Format::Vhdx => {
            img.size()
        }
    }
}

/// Reads `buf.len()` bytes at `off` within [`qemu_len`]: bytes past the
/// end of a raw file (its last partial sector) read as zeros, as in QEMU.
pub fn read_padded(img: &dyn Image, buf: &mut [u8], off: u64) -> crate::Result<()> {
    let real = img.size();
    let n = real.saturating_sub(off).min(buf.len() as u64) as usize;
    if n > 0 {
        img.read_at(&mut buf[..n], off)?;
    }
    buf[n..].fill(0);
    Ok(())
}
