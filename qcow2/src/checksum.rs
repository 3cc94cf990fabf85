//! The checksum of an image's guest-visible content (`rimg checksum`,
//! and the block daemon's `checksum` control command): the same whatever
//! the format, cluster size, compression, allocation or backing chain
//! that holds the content.
//!
//! # The algorithm
//! The content is the disk as a guest reads it, of the size qemu-img
//! reports ([`Chain::len`]; `qemu-img convert -O raw` writes the same
//! bytes). It is cut into blocks of 64 KiB ([`BLOCK`]), the last one
//! shorter when the size is not a multiple. The checksum is the SHA-256
//! of the blocks' SHA-256 digests (32 bytes each) concatenated in order;
//! a disk of size 0 has the SHA-256 of nothing. With coreutils and xxd,
//! on a raw copy:
//!
//! ```text
//! qemu-img convert -O raw IMAGE disk.raw
//! split -b 64K --filter='sha256sum | head -c 64 | xxd -r -p' disk.raw | sha256sum
//! ```
//!
//! (A raw file's size counts rounded up to 512-byte sectors, as QEMU
//! shows it to a guest: run the pipeline on QEMU's copy, or on the file
//! padded with zeros to a multiple of 512.)
//!
//! # Why it is fast
//! Blocks are independent: ranges of [`UNIT`] bytes are hashed by
//! several threads and their digests joined in order. Ranges that block
//! status reports as reading zeros (holes, zero clusters, unallocated
//! ranges without a backing file) are not read: a whole zero block's
//! digest is computed once. Data that turns out to be zeros is found by
//! a scan, cheaper than hashing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};

use crate::blockstatus::{read_padded, Chain, ZERO};

/// The size of the blocks whose digests make the checksum; part of the
/// algorithm, never changed.
pub const BLOCK: u64 = 64 << 10;
/// Bytes one thread claims at a time.
const UNIT: u64 = 64 * BLOCK;
/// Units hashed between two joins: bounds the digests held in memory.
const BATCH: u64 = 256;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// What failed, where.
#[derive(Debug, thiserror::Error)]
pub enum ChecksumError {
    #[error("block status failed at offset {offset}: {source}")]
    Status { offset: u64, source: crate::Error },
    #[error("error while reading offset {offset}: {source}")]
    Read { offset: u64, source: crate::Error },
    /// The caller's cancel flag was set.
    #[error("cancelled")]
    Cancelled,
}

fn sha256(b: &[u8]) -> Digest {
    Sha256::digest(b).into()
}

/// `d` as lowercase hex, as sha256sum prints it.
pub fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The checksum of `chain`'s content, hashed by `threads` threads (1:
/// on the caller's thread alone); `progress` is told of each range
/// done, in bytes. Setting `cancel` ends it within a unit per thread (a
/// daemon stopping must not wait for a disk's worth of hashing).
pub fn checksum(
    chain: &Chain,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
    cancel: &AtomicBool,
) -> Result<Digest, ChecksumError> {
    let size = chain.len();
    let zero = sha256(&[0u8; BLOCK as usize]);
    let units = size.div_ceil(UNIT);
    let mut outer = Sha256::new();
    let mut first = 0;
    while first < units {
        let end = (first + BATCH).min(units);
        let digests: Vec<Mutex<Vec<Digest>>> =
            (first..end).map(|_| Mutex::new(Vec::new())).collect();
        let next = AtomicU64::new(first);
        let failed = AtomicBool::new(false);
        // The error of the earliest unit that failed, whichever thread
        // came to it last: the same image fails the same way every run.
        let error = Mutex::new(None::<(u64, ChecksumError)>);
        let fail = |u: u64, e: ChecksumError| {
            failed.store(true, Ordering::Relaxed);
            let mut first = lock(&error);
            if first.as_ref().is_none_or(|(f, _)| u < *f) {
                *first = Some((u, e));
            }
        };
        let work = || {
            let mut buf = Vec::new();
            while !failed.load(Ordering::Relaxed) {
                if cancel.load(Ordering::Relaxed) {
                    fail(u64::MAX, ChecksumError::Cancelled);
                    break;
                }
                let u = next.fetch_add(1, Ordering::Relaxed);
                if u >= end {
                    break;
                }
                let start = u * UNIT;
                let len = UNIT.min(size - start);
                match hash_unit(chain, start, len, &zero, &mut buf) {
                    Ok(d) => {
                        *lock(&digests[(u - first) as usize]) = d;
                        progress(len);
                    }
                    Err(e) => fail(u, e),
                }
            }
        };
        match threads.min((end - first) as usize) {
            0 | 1 => work(),
            n => std::thread::scope(|s| {
                for _ in 0..n {
                    s.spawn(work);
                }
            }),
        }
        if let Some((_, e)) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        for d in digests {
            for b in d.into_inner().unwrap_or_else(|p| p.into_inner()) {
                outer.update(b);
            }
        }
        first = end;
    }
    Ok(outer.finalize().into())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The digests of the blocks in [start, start + len), `start` a
/// multiple of [`BLOCK`].
fn hash_unit(
    chain: &Chain,
    start: u64,
    len: u64,
    zero: &Digest,
    buf: &mut Vec<u8>,
) -> Result<Vec<Digest>, ChecksumError> {
    let end = start + len;
    let blocks = len.div_ceil(BLOCK) as usize;
    // Which blocks read as zeros whole, by block status.
    let mut known_zero = vec![true; blocks];
    let mut off = start;
    while off < end {
        let s = chain
            .status_above(off, end - off)
            .map_err(|source| ChecksumError::Status {
                offset: off,
                source,
            })?;
        if s.len == 0 {
            return Err(ChecksumError::Status {
                offset: off,
                source: crate::Error::Io {
                    context: "block status".into(),
                    source: std::io::Error::other("no progress"),
                },
            });
        }
        let run = s.len.min(end - off);
        if !s.has(ZERO) {
            let a = ((off - start) / BLOCK) as usize;
            let b = ((off + run - 1 - start) / BLOCK) as usize;
            known_zero[a..=b].fill(false);
        }
        off += run;
    }
    let mut out = Vec::with_capacity(blocks);
    let mut i = 0;
    while i < blocks {
        let block_len = |i: usize| BLOCK.min(end - (start + i as u64 * BLOCK));
        if known_zero[i] {
            let n = block_len(i);
            out.push(if n == BLOCK {
                *zero
            } else {
                sha256(&vec![0u8; n as usize])
            });
            i += 1;
            continue;
        }
        // A run of blocks to read: one read for all of them.
        let j = (i..blocks).find(|&j| known_zero[j]).unwrap_or(blocks);
        let from = start + i as u64 * BLOCK;
        let n = (start + j as u64 * BLOCK).min(end) - from;
        buf.resize(n as usize, 0);
        if let Err(source) = read_padded(chain.top(), buf, from) {
            return Err(failed_read(chain, from, n, source));
        }
        for b in buf.chunks(BLOCK as usize) {
            out.push(if b.len() == BLOCK as usize && crate::zeros::is_zero(b) {
                *zero
            } else {
                sha256(b)
            });
        }
        i = j;
    }
    Ok(out)
}

/// The error of a failed read of [from, from + len), at the first block
/// that fails on its own: the offset names where the damage is, not
/// where the read began.
fn failed_read(chain: &Chain, from: u64, len: u64, first: crate::Error) -> ChecksumError {
    let mut b = vec![0u8; BLOCK.min(len) as usize];
    let mut off = from;
    while off < from + len {
        let n = BLOCK.min(from + len - off) as usize;
        if let Err(source) = read_padded(chain.top(), &mut b[..n], off) {
            return ChecksumError::Read {
                offset: off,
                source,
            };
        }
        off += n as u64;
    }
    ChecksumError::Read {
        offset: from,
        source: first,
    }
}
