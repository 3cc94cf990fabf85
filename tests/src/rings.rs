//! A vhost-user driver written by hand, for hostile-frontend tests: guest
//! memory is a shared memfd, split virtqueues are laid out in it by the
//! test, and the connection is the vhost crate's `Frontend`. Descriptors,
//! avail entries and indexes are whatever the test writes, valid or not.
//!
//! Layout: queue `q`'s rings live at `q * RING_STRIDE` (descriptor table
//! at +0, avail ring at +0x1000, used ring at +0x2000); data buffers go at
//! [`DATA`] and above. Up to 4 queues of up to 256 entries.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// Distance between two queues' rings in guest memory.
pub const RING_STRIDE: u64 = 0x4000;
/// First guest address past the rings, for data buffers.
pub const DATA: u64 = 0x10000;

/// A descriptor: (guest address, length, flags).
pub type Desc = (u64, u32, u16);

/// Guest memory: a shared memfd mapping.
pub struct Shm {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

impl Shm {
    pub fn new(len: usize) -> Shm {
        // SAFETY: memfd_create with a valid C string; the fd is checked.
        let raw = unsafe { libc::memfd_create(c"guest".as_ptr(), 0) };
        assert!(raw >= 0);
        // SAFETY: `raw` is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        assert_eq!(unsafe { libc::ftruncate(raw, len as i64) }, 0);
        // SAFETY: a fresh shared mapping of `len` bytes of our memfd; the
        // result is checked and unmapped only when Shm is dropped.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                raw,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Shm {
            fd,
            ptr: ptr.cast(),
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn write(&self, gpa: u64, b: &[u8]) {
        assert!(gpa as usize + b.len() <= self.len);
        // SAFETY: in bounds (checked); the daemon only touches memory the
        // ring hands it, and races on it are the point of a shared ring.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.add(gpa as usize), b.len()) };
    }

    pub fn read(&self, gpa: u64, n: usize) -> Vec<u8> {
        assert!(gpa as usize + n <= self.len);
        let mut v = vec![0; n];
        // SAFETY: in bounds (checked).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(gpa as usize), v.as_mut_ptr(), n) };
        v
    }

    pub fn u16_at(&self, gpa: u64) -> u16 {
        u16::from_le_bytes(self.read(gpa, 2).try_into().unwrap())
    }

    pub fn u32_at(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.read(gpa, 4).try_into().unwrap())
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in new().
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One split virtqueue as the driver sees it.
pub struct Queue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: EventFd,
    pub call: EventFd,
    /// The avail index the driver last published.
    pub avail_idx: u16,
    /// Published heads the device cannot return (outside the queue): the
    /// used index is expected to stay this far behind.
    pub unreturnable: u16,
}

/// A connected driver with its guest memory and queues.
pub struct Driver {
    pub shm: Shm,
    pub fe: Frontend,
    pub queues: Vec<Queue>,
    /// The inflight region the driver set (see [`Driver::connect_inflight`]).
    pub inflight: Option<InflightRegion>,
    /// The virtio features acked, replayed by [`Driver::reconnect`].
    pub acked: u64,
    /// The connection's socket, for [`Driver::hang_up`].
    conn: std::os::unix::net::UnixStream,
}

impl Driver {
    /// Connects to `sock` with `mem_len` bytes of guest memory at guest
    /// address 0 and sets up and enables `nq` queues of `qs` entries.
    /// `features` picks the acked virtio features from the offered ones;
    /// protocol features are CONFIG, MQ and REPLY_ACK where offered.
    pub fn connect(
        sock: &Path,
        mem_len: usize,
        nq: usize,
        qs: u16,
        features: impl FnOnce(u64) -> u64,
    ) -> Driver {
        assert!(nq <= 4 && qs <= 256 && qs.is_power_of_two());
        let queues = new_queues(nq, qs);
        Driver::open(
            sock,
            Shm::new(mem_len),
            queues,
            Acked::Pick(Box::new(features)),
            Inflight::Off,
        )
        .expect("connect")
    }

    /// Connects as [`connect`](Self::connect) does, with inflight tracking
    /// (INFLIGHT_SHMFD) as QEMU does it: `region` set (SET_INFLIGHT_FD)
    /// before the rings start, or with None, a region asked of the daemon
    /// (GET_INFLIGHT_FD) first. An error where the daemon refused.
    pub fn connect_inflight(
        sock: &Path,
        mem_len: usize,
        nq: usize,
        qs: u16,
        features: impl FnOnce(u64) -> u64,
        region: Option<InflightRegion>,
    ) -> Result<Driver, String> {
        assert!(nq <= 4 && qs <= 256 && qs.is_power_of_two());
        let queues = new_queues(nq, qs);
        let inflight = region.map_or(Inflight::Get, Inflight::Set);
        Driver::open(
            sock,
            Shm::new(mem_len),
            queues,
            Acked::Pick(Box::new(features)),
            inflight,
        )
    }

    /// A new connection to `sock` (the same daemon, or one started after
    /// this one's daemon died) over the same guest memory, rings and
    /// eventfds: the features acked, the inflight region (if any) set
    /// again, each ring's base its used index (as QEMU does).
    pub fn reconnect(self, sock: &Path) -> Result<Driver, String> {
        let inflight = self.inflight.map_or(Inflight::Off, Inflight::Set);
        Driver::open(
            sock,
            self.shm,
            self.queues,
            Acked::Exactly(self.acked),
            inflight,
        )
    }

    fn open(
        sock: &Path,
        shm: Shm,
        queues: Vec<Queue>,
        acked: Acked,
        inflight: Inflight,
    ) -> Result<Driver, String> {
        let nq = queues.len();
        let stream = std::os::unix::net::UnixStream::connect(sock).map_err(e("connect"))?;
        let conn = stream.try_clone().map_err(e("connect"))?;
        let mut fe = Frontend::from_stream(stream, nq as u64);
        fe.set_owner().map_err(e("set_owner"))?;
        let offered = fe
            .get_features()
            .map_err(|e| format!("get_features: {e}"))?;
        let acked = match acked {
            Acked::Pick(f) => f(offered),
            Acked::Exactly(a) => a,
        };
        fe.set_features(acked).map_err(e("set_features"))?;
        let pf = fe
            .get_protocol_features()
            .map_err(e("get_protocol_features"))?;
        // REPLY_ACK makes every message synchronous: when a call returns,
        // the daemon has applied it.
        let mut want = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        if !matches!(inflight, Inflight::Off) {
            want |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        fe.set_protocol_features(pf & want)
            .map_err(e("set_protocol_features"))?;
        if pf.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let region = match inflight {
            Inflight::Off => None,
            Inflight::Get => {
                let ask = VhostUserInflight::new(0, 0, nq as u16, queues[0].size);
                let (d, file) = fe.get_inflight_fd(&ask).map_err(e("get_inflight_fd"))?;
                Some(InflightRegion::map(file, d))
            }
            Inflight::Set(r) => Some(r),
        };
        if let Some(r) = &region {
            fe.set_inflight_fd(&r.desc, r.file.as_raw_fd())
                .map_err(e("set_inflight_fd"))?;
        }
        let base = shm.ptr as u64;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: shm.len as u64,
            userspace_addr: base,
            mmap_offset: 0,
            mmap_handle: shm.fd.as_raw_fd(),
        }])
        .map_err(e("set_mem_table"))?;
        for (q, queue) in queues.iter().enumerate() {
            let qs = queue.size;
            fe.set_vring_num(q, qs).map_err(e("set_vring_num"))?;
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: qs,
                    queue_size: qs,
                    flags: 0,
                    desc_table_addr: base + queue.desc,
                    used_ring_addr: base + queue.used,
                    avail_ring_addr: base + queue.avail,
                    log_addr: None,
                },
            )
            .map_err(e("set_vring_addr"))?;
            fence(Ordering::SeqCst);
            let used = shm.u16_at(queue.used + 2);
            fe.set_vring_base(q, used).map_err(e("set_vring_base"))?;
            fe.set_vring_call(q, &queue.call)
                .map_err(e("set_vring_call"))?;
            fe.set_vring_kick(q, &queue.kick)
                .map_err(e("set_vring_kick"))?;
        }
        for q in 0..nq {
            fe.set_vring_enable(q, true)
                .map_err(e("set_vring_enable"))?;
        }
        Ok(Driver {
            shm,
            fe,
            queues,
            inflight: region,
            acked,
            conn,
        })
    }

    /// Ends the connection (the daemon sees the frontend go); the guest
    /// memory, rings and region stay, for [`reconnect`](Self::reconnect).
    pub fn hang_up(&self) {
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
    }

    /// Moves queue `q`'s used ring to guest address `used` (SET_VRING_ADDR
    /// again; before the queue carries anything). The daemon reads the
    /// used index there, so `used + 4` must lie in guest memory; the
    /// elements after it need not.
    pub fn set_used_ring(&mut self, q: usize, used: u64) {
        let base = self.shm.ptr as u64;
        let qu = &mut self.queues[q];
        qu.used = used;
        self.fe
            .set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: qu.size,
                    queue_size: qu.size,
                    flags: 0,
                    desc_table_addr: base + qu.desc,
                    used_ring_addr: base + used,
                    avail_ring_addr: base + qu.avail,
                    log_addr: None,
                },
            )
            .unwrap();
    }

    /// Writes descriptor `i` of the table at guest address `table`.
    pub fn write_desc_at(&self, table: u64, i: u16, (addr, len, flags): Desc, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.shm.write(table + 16 * u64::from(i), &d);
    }

    /// Writes descriptor `i` of queue `q`'s table.
    pub fn write_desc(&self, q: usize, i: u16, d: Desc, next: u16) {
        self.write_desc_at(self.queues[q].desc, i, d, next);
    }

    /// Writes `descs` as one chain into the table at `table`, entries
    /// `first..`, linked in order (NEXT added to all but the last).
    pub fn write_chain_at(&self, table: u64, first: u16, descs: &[Desc]) {
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = first + k as u16;
            let last = k + 1 == descs.len();
            let flags = if last { flags } else { flags | F_NEXT };
            let next = if last { 0 } else { i + 1 };
            self.write_desc_at(table, i, (addr, len, flags), next);
        }
    }

    /// Writes `descs` as one chain into queue `q`'s table from entry
    /// `first`.
    pub fn write_chain(&self, q: usize, first: u16, descs: &[Desc]) {
        self.write_chain_at(self.queues[q].desc, first, descs);
    }

    /// Puts `heads` in queue `q`'s avail ring, publishes the new index
    /// and kicks. With EVENT_IDX, used_event asks for a notification of
    /// the next used entry.
    pub fn publish(&mut self, q: usize, heads: &[u16]) {
        let used = self.used_idx(q);
        let qu = &self.queues[q];
        self.shm
            .write(qu.avail + 4 + 2 * u64::from(qu.size), &used.to_le_bytes());
        let mut idx = qu.avail_idx;
        for &h in heads {
            let slot = idx % qu.size;
            self.shm
                .write(qu.avail + 4 + 2 * u64::from(slot), &h.to_le_bytes());
            idx = idx.wrapping_add(1);
        }
        self.set_avail_idx(q, idx);
    }

    /// Publishes `idx` as queue `q`'s avail index, whatever it is, and
    /// kicks.
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        fence(Ordering::SeqCst);
        let qu = &mut self.queues[q];
        qu.avail_idx = idx;
        self.shm.write(qu.avail + 2, &idx.to_le_bytes());
        fence(Ordering::SeqCst);
        qu.kick.write(1).unwrap();
    }

    /// Kicks queue `q` and waits until the device has taken the kick (its
    /// eventfd read empty again; the device reads it before it looks at
    /// the ring, and takes the next kick only after it handled this one).
    /// False if `timeout` passes first: the device is stuck.
    pub fn kick_taken(&self, q: usize, timeout: Duration) -> bool {
        let kick = &self.queues[q].kick;
        kick.write(1).unwrap();
        let end = Instant::now() + timeout;
        loop {
            let mut p = libc::pollfd {
                fd: kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; zero timeout.
            let n = unsafe { libc::poll(&mut p, 1, 0) };
            if n == 0 {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Queue `q`'s used index as the device last wrote it.
    pub fn used_idx(&self, q: usize) -> u16 {
        fence(Ordering::SeqCst);
        self.shm.u16_at(self.queues[q].used + 2)
    }

    /// Used element number `n` (a used index, taken modulo the size) of
    /// queue `q`: (head id, length written).
    pub fn used_elem(&self, q: usize, n: u16) -> (u32, u32) {
        let qu = &self.queues[q];
        let e = qu.used + 4 + 8 * u64::from(n % qu.size);
        (self.shm.u32_at(e), self.shm.u32_at(e + 4))
    }

    /// Waits until queue `q`'s used index reaches `want` (woken by its
    /// call eventfd); false if `timeout` passes first.
    pub fn wait_used(&self, q: usize, want: u16, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let call = &self.queues[q].call;
        loop {
            // Reached or passed (the index wraps).
            if want.wrapping_sub(self.used_idx(q)) >= 0x8000 || self.used_idx(q) == want {
                return true;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut p = libc::pollfd {
                fd: call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as i32) };
            if n > 0 {
                let _ = call.read();
            }
        }
    }

    /// Publishes the chain starting at `head` of queue `q` and waits (10
    /// s at most, or the daemon hung) for its used entry; returns the
    /// length the device wrote.
    pub fn submit_head(&mut self, q: usize, head: u16) -> u32 {
        self.publish(q, &[head]);
        let qu = &self.queues[q];
        let want = qu.avail_idx.wrapping_sub(qu.unreturnable);
        assert!(
            self.wait_used(q, want, Duration::from_secs(10)),
            "queue {q}: no completion within 10 s: daemon hung"
        );
        let (id, len) = self.used_elem(q, want.wrapping_sub(1));
        assert_eq!(
            id,
            u32::from(head),
            "queue {q}: used entry for another head"
        );
        len
    }

    /// Writes `descs` as a chain at entries 0.. of queue `q`, submits it
    /// and waits for its used entry; returns the used length.
    pub fn submit(&mut self, q: usize, descs: &[Desc]) -> u32 {
        self.write_chain(q, 0, descs);
        self.submit_head(q, 0)
    }
}

/// An error of the vhost-user step `what`, as text.
fn e<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// Queue `q`'s rings at `q * RING_STRIDE`, with new eventfds.
fn new_queues(nq: usize, qs: u16) -> Vec<Queue> {
    (0..nq)
        .map(|q| {
            let at = q as u64 * RING_STRIDE;
            Queue {
                size: qs,
                desc: at,
                avail: at + 0x1000,
                used: at + 0x2000,
                kick: EventFd::new(0).unwrap(),
                call: EventFd::new(0).unwrap(),
                avail_idx: 0,
                unreturnable: 0,
            }
        })
        .collect()
}

/// The virtio features a connection acks.
enum Acked<'a> {
    /// Picked from the offered ones.
    Pick(Box<dyn FnOnce(u64) -> u64 + 'a>),
    Exactly(u64),
}

/// What a connection does about inflight tracking.
enum Inflight {
    Off,
    /// GET_INFLIGHT_FD, then SET_INFLIGHT_FD of what came.
    Get,
    Set(InflightRegion),
}

/// An inflight region as a frontend keeps it (vhost-user "Inflight I/O
/// tracking", split rings): the file, its description and a mapping the
/// test reads and writes (to craft what a killed daemon left behind).
pub struct InflightRegion {
    pub file: File,
    pub desc: VhostUserInflight,
    ptr: *mut u8,
    len: usize,
}

/// Fields of a queue's inflight region: the header's, then descriptor
/// state `i` at `INFLIGHT_DESCS + 16 * i` (`inflight` u8 @0, `next` u16
/// @6, `counter` u64 @8).
pub const INFLIGHT_VERSION: usize = 8;
pub const INFLIGHT_DESC_NUM: usize = 10;
pub const INFLIGHT_LAST_BATCH_HEAD: usize = 12;
pub const INFLIGHT_USED_IDX: usize = 14;
pub const INFLIGHT_DESCS: usize = 16;

/// Bytes of one queue's part of a region of `qs` entries.
pub fn inflight_stride(qs: u16) -> usize {
    (16 + 16 * usize::from(qs)).next_multiple_of(64)
}

impl InflightRegion {
    /// Maps `d.mmap_size` bytes of `file` from `d.mmap_offset` (which the
    /// file must hold).
    pub fn map(file: File, desc: VhostUserInflight) -> InflightRegion {
        let len = desc.mmap_size as usize;
        // SAFETY: a new shared mapping of our own file; the result is
        // checked and unmapped only when the region is dropped.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                desc.mmap_offset as libc::off_t,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap inflight region");
        InflightRegion {
            file,
            desc,
            ptr: ptr.cast(),
            len,
        }
    }

    /// A memfd of `len` bytes, sealed against shrinking and growing if
    /// `sealed`, described as `queues` queues of `qs` entries (a region
    /// the test makes itself, valid or not).
    pub fn memfd(len: u64, sealed: bool, queues: u16, qs: u16) -> InflightRegion {
        // SAFETY: memfd_create with a valid C string; the fd is checked.
        let raw = unsafe {
            libc::memfd_create(
                c"test-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(raw >= 0);
        // SAFETY: `raw` is a fresh fd we own.
        let file = unsafe { File::from_raw_fd(raw) };
        file.set_len(len).unwrap();
        if sealed {
            let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
            // SAFETY: fcntl on our own fd with an int argument.
            assert_eq!(unsafe { libc::fcntl(raw, libc::F_ADD_SEALS, seals) }, 0);
        }
        let map_len = len.min(inflight_stride(qs) as u64 * u64::from(queues));
        let mut r = InflightRegion::map(file, VhostUserInflight::new(map_len, 0, queues, qs));
        r.desc.mmap_size = inflight_stride(qs) as u64 * u64::from(queues);
        r
    }

    fn at(&self, q: usize, off: usize, n: usize) -> *mut u8 {
        let at = q * inflight_stride(self.desc.queue_size) + off;
        assert!(
            at + n <= self.len,
            "inflight offset {at} outside the mapping"
        );
        // SAFETY: in bounds (checked).
        unsafe { self.ptr.add(at) }
    }

    /// Writes `b` at byte `off` of queue `q`'s part.
    pub fn write(&self, q: usize, off: usize, b: &[u8]) {
        fence(Ordering::SeqCst);
        // SAFETY: in bounds (`at` checks); the daemon reads the region
        // with atomics, racing with the test only where a test wants it.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.at(q, off, b.len()), b.len()) };
        fence(Ordering::SeqCst);
    }

    pub fn read(&self, q: usize, off: usize, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        fence(Ordering::SeqCst);
        // SAFETY: in bounds (`at` checks).
        unsafe { std::ptr::copy_nonoverlapping(self.at(q, off, n), v.as_mut_ptr(), n) };
        v
    }

    pub fn u16_at(&self, q: usize, off: usize) -> u16 {
        u16::from_ne_bytes(self.read(q, off, 2).try_into().unwrap())
    }

    /// Queue `q`'s header: version, desc_num, last_batch_head, used_idx.
    pub fn header(&self, q: usize) -> [u16; 4] {
        [8, 10, 12, 14].map(|o| self.u16_at(q, o))
    }

    pub fn set_header(&self, q: usize, [version, desc_num, last, used]: [u16; 4]) {
        for (o, v) in [(8, version), (10, desc_num), (12, last), (14, used)] {
            self.write(q, o, &v.to_ne_bytes());
        }
    }

    /// Head `h`'s mark of queue `q`.
    pub fn mark(&self, q: usize, h: u16) -> u8 {
        self.read(q, INFLIGHT_DESCS + 16 * usize::from(h), 1)[0]
    }

    /// Head `h`'s counter (its take order) in queue `q`.
    pub fn counter(&self, q: usize, h: u16) -> u64 {
        let at = INFLIGHT_DESCS + 16 * usize::from(h) + 8;
        u64::from_ne_bytes(self.read(q, at, 8).try_into().unwrap())
    }

    /// Marks head `h` of queue `q` taken, with `counter` (its take order).
    pub fn set_mark(&self, q: usize, h: u16, mark: u8, counter: u64) {
        let at = INFLIGHT_DESCS + 16 * usize::from(h);
        self.write(q, at + 8, &counter.to_ne_bytes());
        self.write(q, at, &[mark]);
    }

    /// Head `h`'s link in the last batch's list.
    pub fn set_next(&self, q: usize, h: u16, next: u16) {
        self.write(
            q,
            INFLIGHT_DESCS + 16 * usize::from(h) + 6,
            &next.to_ne_bytes(),
        );
    }
}

// SAFETY: the mapping is plain shared memory owned by the region.
unsafe impl Send for InflightRegion {}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `map`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
