//! Raw images: guest offset = file offset.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::datapath::{check_write_len, Fence, Mapping, PendingWrite, WriteEnd};
use crate::error::{Error, Result};
use crate::image::{Extent, ExtentKind, Format, Image};
use crate::storage::Storage;
use crate::sync::AllocWaker;
use crate::units::{GuestOffset, HostOffset};

#[derive(Debug)]
pub struct Raw {
    st: Storage,
    size: AtomicU64,
    /// Where abandoned writes may still land: no change goes there.
    fence: Fence,
}

impl Raw {
    pub fn open(st: Storage) -> Result<Raw> {
        let size = st.len()?;
        Ok(Raw {
            st,
            size: AtomicU64::new(size),
            fence: Fence::default(),
        })
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
        self.st.debug_event("write_aio");
        self.st.write_at(buf, off)
    }
    fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_change(off, len)?;
        if unmap {
            self.st.punch_hole(off, len)
        } else {
            self.st.write_zeroes(off, len)
        }
    }
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_change(off, len)?;
        self.st.punch_hole(off, len)
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
