//! The inflight region's memory and its two vhost-user messages:
//! GET_INFLIGHT_FD creates a sealed memfd, SET_INFLIGHT_FD maps the one
//! the frontend hands (back) and attaches it to the connection's queues.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use super::{stride, QueueLog, RegionMem, MAX_QUEUE_SIZE};

/// Seals every region this daemon creates carries: its size is fixed, so
/// that no one can shrink it under a mapping (SIGBUS), and no seal can be
/// added later.
const SEALS: i32 = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
/// A larger region than any valid description needs is refused.
const MAX_MMAP: u64 = 64 << 20;

/// What the frontend's GET/SET_INFLIGHT_FD carries (24 bytes: sizes, then
/// the counts and 4 bytes of padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Description {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl Description {
    pub const LEN: usize = 24;

    pub fn decode(b: &[u8]) -> Option<Description> {
        let b = b.get(..20)?;
        Some(Description {
            mmap_size: u64::from_ne_bytes(b[0..8].try_into().ok()?),
            mmap_offset: u64::from_ne_bytes(b[8..16].try_into().ok()?),
            num_queues: u16::from_ne_bytes(b[16..18].try_into().ok()?),
            queue_size: u16::from_ne_bytes(b[18..20].try_into().ok()?),
        })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&self.mmap_size.to_ne_bytes());
        b[8..16].copy_from_slice(&self.mmap_offset.to_ne_bytes());
        b[16..18].copy_from_slice(&self.num_queues.to_ne_bytes());
        b[18..20].copy_from_slice(&self.queue_size.to_ne_bytes());
        b
    }

    /// Bytes the described queues need.
    fn needed(&self) -> u64 {
        u64::from(self.num_queues) * stride(self.queue_size) as u64
    }
}

/// Why a GET or SET_INFLIGHT_FD is refused.
#[derive(Debug, thiserror::Error)]
pub enum RegionSetError {
    #[error("{queues} queues of {queue_size} entries (the device has {max} queues, at most {MAX_QUEUE_SIZE} entries)")]
    Geometry {
        queues: u16,
        queue_size: u16,
        max: usize,
    },
    #[error("payload of {0} bytes")]
    Payload(usize),
    #[error("{0} descriptors with the message, one expected")]
    Fds(usize),
    #[error("cannot create the region's memfd: {0}")]
    Memfd(std::io::Error),
    #[error("cannot seal the region's memfd: {0}")]
    Seal(std::io::Error),
    #[error("the region's file is not sealed against shrinking (seals {0:#x})")]
    Unsealed(i32),
    #[error(
        "region of {size} bytes at offset {offset} in a file of {file} bytes, {needed} needed"
    )]
    Size {
        size: u64,
        offset: u64,
        file: u64,
        needed: u64,
    },
    #[error("cannot map the region: {0}")]
    Map(std::io::Error),
}

/// A mapped inflight region, shared with the frontend.
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, accessed only through
// atomics (`RegionMem`); it stays mapped until the Region drops.
unsafe impl Send for Region {}
// SAFETY: as above: concurrent accesses are atomic.
unsafe impl Sync for Region {}

impl Region {
    /// A fresh region for `d`: a sealed memfd of `stride * queues` zero
    /// bytes (version 0: every queue starts clean).
    pub fn create(d: &Description) -> Result<File, RegionSetError> {
        // SAFETY: a NUL-terminated name and flags; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"rimg-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(RegionSetError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: memfd_create just returned this descriptor; we own it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(d.needed()).map_err(RegionSetError::Memfd)?;
        // SAFETY: fcntl on a descriptor we own, with an int argument.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } != 0 {
            return Err(RegionSetError::Seal(std::io::Error::last_os_error()));
        }
        Ok(file)
    }

    /// Maps the region `d` describes in `file`, which must be sealed
    /// against shrinking (or the frontend could truncate it under the
    /// mapping, and the daemon's next access would be a SIGBUS) and long
    /// enough.
    pub fn map(file: &File, d: &Description) -> Result<Region, RegionSetError> {
        // SAFETY: fcntl on a descriptor we hold; no pointer argument.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(RegionSetError::Unsealed(seals));
        }
        let file_len = file.metadata().map_err(RegionSetError::Map)?.len();
        let size_err = || RegionSetError::Size {
            size: d.mmap_size,
            offset: d.mmap_offset,
            file: file_len,
            needed: d.needed(),
        };
        let page = 4096;
        let fits = d
            .mmap_offset
            .checked_add(d.mmap_size)
            .is_some_and(|end| end <= file_len);
        if !fits
            || d.mmap_size < d.needed()
            || d.mmap_size > MAX_MMAP
            || !d.mmap_offset.is_multiple_of(page)
            || d.mmap_offset > i64::MAX as u64
        {
            return Err(size_err());
        }
        let len = d.mmap_size as usize;
        // SAFETY: a new shared mapping of a range of `file` checked above
        // to lie within it; the file cannot shrink (sealed), so every page
        // stays backed. The result is checked; the mapping is ours and
        // unmapped once, in Drop. A frontend writing into it at any time
        // can only change values that every read validates.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                d.mmap_offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(RegionSetError::Map(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(size_err)?;
        Ok(Region { ptr, len })
    }

    /// The atomic of type `A` at byte `at`.
    fn field<A>(&self, at: usize) -> &A {
        let size = std::mem::size_of::<A>();
        assert!(
            at.is_multiple_of(size) && at + size <= self.len,
            "field {at} of {size}"
        );
        // SAFETY: in bounds and naturally aligned (checked: the mapping is
        // page-aligned); atomics may alias memory other processes write,
        // and the mapping lives as long as `self`.
        unsafe { &*self.ptr.as_ptr().add(at).cast::<A>() }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; no reference
        // into it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl RegionMem for Region {
    fn len(&self) -> usize {
        self.len
    }
    fn load8(&self, at: usize) -> u8 {
        self.field::<AtomicU8>(at).load(Ordering::Acquire)
    }
    fn load16(&self, at: usize) -> u16 {
        self.field::<AtomicU16>(at).load(Ordering::Acquire)
    }
    fn load64(&self, at: usize) -> u64 {
        self.field::<AtomicU64>(at).load(Ordering::Acquire)
    }
    fn store8(&self, at: usize, v: u8) {
        self.field::<AtomicU8>(at).store(v, Ordering::Release)
    }
    fn store16(&self, at: usize, v: u16) {
        self.field::<AtomicU16>(at).store(v, Ordering::Release)
    }
    fn store64(&self, at: usize, v: u64) {
        self.field::<AtomicU64>(at).store(v, Ordering::Release)
    }
}

/// Through a shared pointer: the workers' logs share the connection's
/// region, the model tests their recording memory.
impl<R: RegionMem + ?Sized> RegionMem for Arc<R> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn load8(&self, at: usize) -> u8 {
        (**self).load8(at)
    }
    fn load16(&self, at: usize) -> u16 {
        (**self).load16(at)
    }
    fn load64(&self, at: usize) -> u64 {
        (**self).load64(at)
    }
    fn store8(&self, at: usize, v: u8) {
        (**self).store8(at, v)
    }
    fn store16(&self, at: usize, v: u16) {
        (**self).store16(at, v)
    }
    fn store64(&self, at: usize, v: u64) {
        (**self).store64(at, v)
    }
}

/// The mapped region and what it describes.
type Attached = (Arc<Region>, Description);

/// A connection's inflight region, as the relay attaches it and the queue
/// workers find it (one handle, cloned).
#[derive(Clone)]
pub struct Inflight {
    queues: usize,
    attached: Arc<Mutex<Option<Attached>>>,
}

impl Inflight {
    /// For a device of `queues` queues; nothing attached.
    pub fn new(queues: usize) -> Inflight {
        Inflight {
            queues,
            attached: Arc::default(),
        }
    }

    fn check(&self, d: &Description) -> Result<(), RegionSetError> {
        if d.num_queues == 0
            || usize::from(d.num_queues) > self.queues
            || d.queue_size == 0
            || d.queue_size > MAX_QUEUE_SIZE
        {
            return Err(RegionSetError::Geometry {
                queues: d.num_queues,
                queue_size: d.queue_size,
                max: self.queues,
            });
        }
        Ok(())
    }

    /// GET_INFLIGHT_FD: the reply's description and the new region's fd.
    pub fn get(&self, payload: &[u8]) -> Result<(Description, File), RegionSetError> {
        let d = Description::decode(payload).ok_or(RegionSetError::Payload(payload.len()))?;
        self.check(&d)?;
        let reply = Description {
            mmap_size: d.needed(),
            mmap_offset: 0,
            ..d
        };
        Ok((reply, Region::create(&reply)?))
    }

    /// SET_INFLIGHT_FD: maps and attaches the region; the queues started
    /// from now on use it.
    pub fn set(&self, payload: &[u8], fds: &[File]) -> Result<(), RegionSetError> {
        let d = Description::decode(payload).ok_or(RegionSetError::Payload(payload.len()))?;
        self.check(&d)?;
        let [file] = fds else {
            return Err(RegionSetError::Fds(fds.len()));
        };
        let region = Region::map(file, &d)?;
        *self.attached.lock().unwrap_or_else(|p| p.into_inner()) = Some((Arc::new(region), d));
        Ok(())
    }

    /// Queue `q`'s log in the attached region; None without a region, or
    /// if the region has no part for `q`.
    pub fn queue(&self, q: usize) -> Option<QueueLog<Arc<Region>>> {
        let g = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        let (region, d) = g.as_ref()?;
        if q >= usize::from(d.num_queues) {
            return None;
        }
        QueueLog::new(region.clone(), q * stride(d.queue_size), d.queue_size)
    }
}
