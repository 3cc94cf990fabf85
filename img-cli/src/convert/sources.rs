//! The sources of a conversion, read as one disk, one after the other.
//!
//! Everything is read through the engine, into the worker's buffer. (A
//! read-only mapping of the files, populated per extent, was tried: on
//! Linux 6.18 filling its page tables cost more than the copy it saved,
//! 10-15 % of a 1 GiB convert's time, and unmapping them at exit more.)

use std::sync::{Arc, Mutex};

use qcow2::storage::Storage;
use qcow2::{chain_status, ChainStatus, Image, Mapping};

use crate::CliError;

pub(super) struct Sources {
    parts: Vec<Part>,
    pub(super) size: u64,
    /// The last run [from, to) that status found, whole: a qcow2 target
    /// asks once per target cluster, inside the same run each time (for a
    /// raw source two lseeks per ask, 32k per GiB with 64 KiB clusters).
    /// The sources are not written during a conversion.
    last: Mutex<Option<(u64, u64, ChainStatus)>>,
    /// `--salvage`: read errors are reported (unless quiet) and read as
    /// zeros, sector by sector, as qemu-img's convert does.
    salvage: Option<Salvage>,
}

#[derive(Clone, Copy)]
struct Salvage {
    quiet: bool,
}

/// The unit a salvaging read retries in (qemu-img's BDRV_SECTOR_SIZE).
const SECTOR: u64 = 512;

struct Part {
    /// First byte of this image in the concatenation.
    start: u64,
    img: Arc<dyn Image>,
    /// The image's data is in clear in a file, read without injected
    /// faults: copies of it may bypass the engine (offloaded, -C).
    clear: bool,
}

impl Sources {
    pub(super) fn new(images: Vec<Arc<dyn Image>>) -> Sources {
        let mut parts = Vec::with_capacity(images.len());
        let mut size = 0;
        for img in images {
            let n = img.size();
            // Injected faults (blkdebug) apply to reads through the file.
            let faults = img.storage().has_faults() || img.data_storage().has_faults();
            let clear = img.data_in_clear() && !faults;
            parts.push(Part {
                start: size,
                img,
                clear,
            });
            size += n;
        }
        Sources {
            parts,
            size,
            last: Mutex::new(None),
            salvage: None,
        }
    }

    /// Turns on `--salvage`.
    pub(super) fn salvage(&mut self, quiet: bool) {
        self.salvage = Some(Salvage { quiet });
    }

    /// A failure `--salvage` carries on after, reported as qemu-img
    /// words it: the system's text of an I/O error, else EIO's (the
    /// errno QEMU's drivers give a corrupt image; one line a sector, the
    /// engine's own account would repeat on each).
    fn warn(&self, what: &str, at: u64, e: &qcow2::Error) {
        if self.salvage.is_some_and(|s| !s.quiet) {
            let text = match e {
                qcow2::Error::Io { .. } => crate::common::os_error_text(e),
                _ => std::io::Error::from_raw_os_error(libc::EIO).to_string(),
            };
            eprintln!(
                "{}: warning: error while reading {what}{at}: {}",
                crate::prog_name(),
                qcow2::error::without_os_code(text)
            );
        }
    }

    /// The part holding byte `pos`, the offset in it, and how far it
    /// goes from there.
    fn part(&self, pos: u64) -> (&Part, u64, u64) {
        let i = self.parts.partition_point(|p| p.start <= pos) - 1;
        let p = &self.parts[i];
        (p, pos - p.start, p.start + p.img.size() - pos)
    }

    /// As [`chain_status`], within one part.
    pub(super) fn status(&self, pos: u64, len: u64) -> Result<(ChainStatus, u64), CliError> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((from, to, st)) = *last {
            if (from..to).contains(&pos) {
                return Ok((st, (to - pos).min(len)));
            }
        }
        let (p, at, left) = self.part(pos);
        let status = chain_status(p.img.as_ref(), at, left);
        if let (Err(e), Some(_)) = (&status, self.salvage) {
            // Then read it: one sector taken for data.
            self.warn("block status at offset ", at, e);
            return Ok((ChainStatus::Data, SECTOR.min(len)));
        }
        let (st, n) = status.map_err(|e| match e {
            // A format's block status that fails with an errno (vmdk):
            // qemu-img's words.
            qcow2::Error::Io { .. } => CliError::new(format!(
                "error while reading block status at offset {pos}: {}",
                crate::common::os_error_text(&e)
            )),
            e => e.into(),
        })?;
        *last = Some((pos, pos + n, st));
        Ok((st, n.min(len)))
    }

    /// How many bytes from `pos` (at most `max`) read as zeros, by block
    /// status; 0 on any error, unreported: a hint for claiming spans,
    /// whose errors the copy itself meets and reports.
    pub(super) fn zero_run(&self, pos: u64, max: u64) -> u64 {
        let (p, at, left) = self.part(pos);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((from, to, st)) = *last {
            if (from..to).contains(&pos) {
                return if st == ChainStatus::Zero {
                    (to - pos).min(max)
                } else {
                    0
                };
            }
        }
        match chain_status(p.img.as_ref(), at, left) {
            Ok((st, n)) => {
                *last = Some((pos, pos + n, st));
                if st == ChainStatus::Zero {
                    n.min(max)
                } else {
                    0
                }
            }
            Err(_) => 0,
        }
    }

    /// Bytes of [from, to) some layer stores data for (what qemu-img's
    /// progress counts).
    pub(super) fn data_bytes(&self, from: u64, to: u64) -> Result<u64, CliError> {
        let mut n = 0;
        let mut pos = from;
        while pos < to {
            let (st, len) = self.status(pos, to - pos)?;
            if st == ChainStatus::Data {
                n += len;
            }
            pos += len;
        }
        Ok(n)
    }

    /// The bytes [pos, pos + buf.len()), read into `buf`.
    pub(super) fn bytes<'a>(&self, pos: u64, buf: &'a mut [u8]) -> Result<&'a [u8], CliError> {
        self.read_at(buf, pos)?;
        Ok(buf)
    }

    /// Where a layer's file holds the bytes from `pos` on in clear, as
    /// they are (for a copy the kernel makes, -C): Ok((that file, the
    /// offset there, how many bytes, at most `len`)). Otherwise Err(how
    /// many bytes from `pos` are something else: zeros, a backing
    /// layer's, compressed or encrypted data, behind injected faults).
    pub(super) fn in_file(&self, pos: u64, len: u64) -> Result<(&Storage, u64, u64), u64> {
        let (p, at, left) = self.part(pos);
        let len = len.min(left);
        if !p.clear {
            return Err(len);
        }
        match p.img.map_read(at, len) {
            Ok((Mapping::Data(host), n)) => Ok((p.img.data_storage(), host.0, n)),
            Ok((_, n)) => Err(n.clamp(1, len)),
            Err(_) => Err(len),
        }
    }

    fn read_at(&self, buf: &mut [u8], pos: u64) -> Result<(), CliError> {
        let mut done = 0;
        while done < buf.len() {
            let (p, at, left) = self.part(pos + done as u64);
            let n = (left as usize).min(buf.len() - done);
            let part = &mut buf[done..done + n];
            match p.img.read_at(part, at) {
                Ok(()) => {}
                Err(_) if self.salvage.is_some() => self.salvage_read(p, part, at),
                Err(e) => return Err(read_error(pos, e)),
            }
            done += n;
        }
        Ok(())
    }

    /// Reads `buf` from `p` at `at` a sector at a time; a sector that
    /// fails is reported and reads as zeros.
    fn salvage_read(&self, p: &Part, buf: &mut [u8], at: u64) {
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let off = at + i as u64 * SECTOR;
            if let Err(e) = p.img.read_at(sector, off) {
                self.warn("offset ", off, &e);
                sector.fill(0);
            }
        }
    }
}

/// A failed source read, as qemu-img reports it (where the read began,
/// the system's text of the error).
fn read_error(pos: u64, e: qcow2::Error) -> CliError {
    match e {
        qcow2::Error::Io { .. } => CliError::new(format!(
            "error while reading at byte {pos}: {}",
            crate::common::os_error_text(&e)
        )),
        e => e.into(),
    }
}
