//! -C, copy offloading: data runs go from the source's file to the
//! target's inside the kernel (copy_file_range(2): a reflink on file
//! systems that share extents, a server-side copy over NFS), never read
//! into this process. What cannot go that way goes through memory, as
//! qemu-img falls back to reading and writing: zeros inside a run, a
//! backing layer's data, compressed or encrypted clusters, and every run
//! once a pair of files has refused (another file system, one that does
//! not copy).

use std::sync::atomic::Ordering;

use super::copy::Job;
use super::sources::Sources;
use super::CHUNK;
use crate::CliError;

impl Job<'_> {
    /// Whether data runs are planned as copies (-C, not yet refused).
    pub(super) fn offloading(&self) -> bool {
        self.offload.load(Ordering::Relaxed)
    }

    /// Puts the source's bytes [at, at + len) at the same offset of the
    /// target now: mapped piece by piece, each copied, then committed.
    pub(super) fn copy_now(&self, src: &Sources, at: u64, len: u64) -> Result<(), CliError> {
        // Offloading is planned only where the target maps its writes.
        debug_assert!(self.split_writes);
        let _epoch = self.target.io_epoch();
        let mut buf = Vec::new();
        let mut done = 0;
        while done < len {
            let pos = at + done;
            let w = self
                .target
                .clone()
                .begin_write(pos, (len - done) as usize)?;
            let n = w.len() as u64;
            // As the engine's own writes do (blkdebug rules).
            self.target.storage().debug_event("write_aio");
            self.copy_into(src, w.host().0, pos, n, &mut buf)?;
            w.commit()?;
            done += n;
        }
        Ok(())
    }

    /// Fills [host, host + len) of the target's data file with the
    /// source's bytes from `pos` on: by the kernel where a source layer
    /// holds them in clear in a file, through `buf` elsewhere.
    pub(super) fn copy_into(
        &self,
        src: &Sources,
        host: u64,
        pos: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), CliError> {
        let file = self.target.data_storage();
        let mut done = 0;
        while done < len {
            let (p, h, left) = (pos + done, host + done, len - done);
            let other = match src.in_file(p, left) {
                Ok((from, at, n)) if self.offloading() => {
                    match file.copy_range_from(from, at, h, n)? {
                        Some(k) if k > 0 => {
                            done += k;
                            continue;
                        }
                        // Past the end of the source's file: zeros, read.
                        Some(_) => n,
                        None => {
                            self.offload.store(false, Ordering::Relaxed);
                            n
                        }
                    }
                }
                Ok((_, _, n)) | Err(n) => n,
            };
            let n = other.min(CHUNK);
            buf.resize(n as usize, 0);
            let b = src.bytes(p, buf)?;
            file.write_data_at(b, h)?;
            done += n;
        }
        Ok(())
    }
}
