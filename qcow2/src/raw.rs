//! Raw images: guest offset = file offset.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::datapath::{check_write_len, Fence, Mapping, PendingWrite, WriteEnd};
use crate::error::{Error, Result};
use crate::image::{Extent, ExtentKind, Format, Image};
use crate::storage::Storage;
use crate::sync::AllocWaker;
use crate::units::{GuestOffset, HostOffset};

/// What QEMU's raw driver prints (stderr) when it opens a probed raw
/// image for writing; for `path` as given.
pub fn probed_warning(path: &Path) -> String {
    format!(
        "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
         Specify the 'raw' format explicitly to remove the restrictions.",
        path.display()
    )
}

/// The bytes a probe reads, guarded in a probed raw image.
const FIRST_SECTOR: u64 = crate::foreign::probe::PROBE_LEN as u64;

#[derive(Debug)]
pub struct Raw {
    st: Storage,
    size: AtomicU64,
    /// Where abandoned writes may still land: no change goes there.
    fence: Fence,
    /// Some: the format was probed, not given, and the image is
    /// writable. Changes to the first sector then take this lock, and a
    /// write that would make it look like another format is refused.
    first_sector: Option<Mutex<()>>,
}

impl Raw {
    /// Opens a raw image whose format was given.
    pub fn open(st: Storage) -> Result<Raw> {
        Self::open_as(st, false)
    }

    /// Opens a raw image; `probed`: its format was guessed from its
    /// content (QEMU's `bs->probed`), so that its first sector must
    /// keep probing as raw (see [`Image::guards_first_sector`]).
    pub fn open_as(st: Storage, probed: bool) -> Result<Raw> {
        let size = st.len()?;
        let first_sector = (probed && st.writable()).then(|| Mutex::new(()));
        Ok(Raw {
            st,
            size: AtomicU64::new(size),
            fence: Fence::default(),
            first_sector,
        })
    }

    /// The lock on the first sector, if guarded and [off, off + len)
    /// touches it.
    fn first_sector_lock(&self, off: u64) -> Option<std::sync::MutexGuard<'_, ()>> {
        let lock = self.first_sector.as_ref().filter(|_| off < FIRST_SECTOR)?;
        Some(lock.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The first sector as `change` would leave its part [off, off +
    /// len) (bytes past a short file read as zeros, as a probe reads
    /// them), and where that part ends; refused if a format would claim
    /// it. Called with the first sector's lock held.
    fn checked_sector(
        &self,
        off: u64,
        len: u64,
        change: impl FnOnce(&mut [u8]),
    ) -> Result<([u8; FIRST_SECTOR as usize], usize)> {
        let in_file = FIRST_SECTOR.min(self.size()) as usize;
        let end = in_file.min((off + len) as usize);
        let mut sector = [0u8; FIRST_SECTOR as usize];
        self.st.read_at(&mut sector[..in_file], 0)?;
        change(&mut sector[off as usize..end]);
        if crate::foreign::probe::claimed_by_a_format(&sector) {
            return Err(Error::FirstSectorFormat);
        }
        Ok((sector, end))
    }

    /// Zeroing (or discarding) [off, off + len) of a guarded image: the
    /// lock, held until the zeros are down, once the sector as it would
    /// become is checked. A zero can complete a magic ("QED\0") or turn
    /// a line of text into a comment's end (a VMDK descriptor), so a
    /// partial zeroing is checked as a write is.
    fn zero_first_sector(
        &self,
        off: u64,
        len: u64,
    ) -> Result<Option<std::sync::MutexGuard<'_, ()>>> {
        let Some(held) = self.first_sector_lock(off) else {
            return Ok(None);
        };
        self.checked_sector(off, len, |part| part.fill(0))?;
        Ok(Some(held))
    }

    /// A write touching the first sector of a guarded image: what gets
    /// written there is the checked private copy (the caller's buffer
    /// may be guest memory that changes meanwhile, as QEMU's raw driver
    /// reasons).
    fn write_first_sector(&self, buf: &[u8], off: u64) -> Result<()> {
        let _held = self.first_sector_lock(off);
        let len = buf.len() as u64;
        let (sector, end) =
            self.checked_sector(off, len, |part| part.copy_from_slice(&buf[..part.len()]))?;
        let start = off as usize;
        self.st.debug_event("write_aio");
        self.st.write_at(&sector[start..end], off)?;
        if buf.len() > end - start {
            self.st.write_at(&buf[end - start..], end as u64)?;
        }
        Ok(())
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        crate::image::check_range(off, len, self.size())
    }

    /// A change to [off, off + len): in range, writable, not fenced.
    fn check_change(&self, off: u64, len: u64) -> Result<()> {
        self.check_range(off, len)?;
        if !self.st.writable() {
            return Err(Error::ReadOnly);
        }
        self.fence.check(off, len)
    }
}

impl Image for Raw {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn storage(&self) -> &Storage {
        &self.st
    }
    fn format(&self) -> Format {
        Format::Raw
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn path(&self) -> &Path {
        self.st.path()
    }
    fn is_writable(&self) -> bool {
        self.st.writable()
    }
    fn backing(&self) -> Option<&Arc<dyn Image>> {
        None
    }
    // The blkdebug events QEMU's raw driver reports for its data I/O.
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        self.st.debug_event("read_aio");
        self.st.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_change(off, buf.len() as u64)?;
        if self.guards_first_sector() && off < FIRST_SECTOR {
            return self.write_first_sector(buf, off);
        }
        self.st.debug_event("write_aio");
        self.st.write_at(buf, off)
    }
    fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_change(off, len)?;
        let _held = self.zero_first_sector(off, len)?;
        if unmap {
            self.st.punch_hole(off, len)
        } else {
            self.st.write_zeroes(off, len)
        }
    }
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_change(off, len)?;
        let _held = self.zero_first_sector(off, len)?;
        self.st.punch_hole(off, len)
    }
    fn guards_first_sector(&self) -> bool {
        self.first_sector.is_some()
    }
    fn flush(&self) -> Result<()> {
        self.st.sync()
    }
    fn block_status(&self, off: u64, len: u64) -> Result<Extent> {
        self.check_range(off, len)?;
        let end = off + len;
        let data = |len| Extent {
            len,
            kind: ExtentKind::Data,
            offset: None,
            file: 0,
            compressed: false,
            recurse: false,
        };
        // SEEK_DATA/SEEK_HOLE, or an NBD export's base:allocation.
        let (is_data, n) = self.st.try_data_at(off, end - off)?;
        Ok(match is_data {
            true => Extent {
                offset: Some(off),
                ..data(n)
            },
            false => Extent {
                kind: ExtentKind::Zero,
                ..data(n)
            },
        })
    }
    fn resize(&self, new_size: u64) -> Result<()> {
        if !self.st.writable() {
            return Err(Error::ReadOnly);
        }
        // A late write into a cut range would bring it back on growth.
        let size = self.size();
        if new_size < size {
            self.fence.check(new_size, size - new_size)?;
        }
        self.st.set_len(new_size)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    // The identity mapping: guest offset = file offset, nothing allocated,
    // nothing to end.
    fn map_read(&self, off: u64, len: u64) -> Result<(Mapping, u64)> {
        self.check_range(off, len)?;
        Ok((Mapping::Data(HostOffset::identity(GuestOffset(off))), len))
    }
    fn read_mapped(&self, mapping: Mapping, buf: &mut [u8], off: u64) -> Result<()> {
        match mapping {
            Mapping::Data(host) => {
                self.st.debug_event("read_aio");
                self.st.read_at(buf, host.0)
            }
            Mapping::Zero(_) | Mapping::Unallocated => {
                buf.fill(0);
                Ok(())
            }
            // A raw image maps nothing compressed: read what is there.
            Mapping::Compressed(_) => self.read_at(buf, off),
        }
    }
    fn begin_write(self: Arc<Self>, off: u64, len: usize) -> Result<PendingWrite> {
        check_write_len(len)?;
        self.check_change(off, len as u64)?;
        // The caller would write bytes the engine never sees.
        if self.guards_first_sector() && off < FIRST_SECTOR {
            return Err(Error::InvalidArgument(
                "a write to the first sector of a probed raw image goes through write_at".into(),
            ));
        }
        let host = HostOffset::identity(GuestOffset(off));
        Ok(PendingWrite::new(
            host,
            len,
            Box::new(RawWrite {
                img: self,
                off,
                len,
            }),
        ))
    }
    fn try_begin_write(
        self: Arc<Self>,
        off: u64,
        len: usize,
        _waker: &Arc<dyn AllocWaker>,
    ) -> Result<Option<PendingWrite>> {
        self.begin_write(off, len).map(Some)
    }
}

/// How a raw write ends: nothing to commit or give back; abandoned, its
/// range is fenced off (the late write can land nowhere else).
struct RawWrite {
    img: Arc<Raw>,
    off: u64,
    len: usize,
}

impl WriteEnd for RawWrite {
    fn commit(self: Box<Self>) -> Result<()> {
        Ok(())
    }
    fn rollback(self: Box<Self>) {}
    fn abandon(self: Box<Self>) {
        self.img.fence.add(self.off, self.len as u64);
    }
}
