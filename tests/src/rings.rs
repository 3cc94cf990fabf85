//! A vhost-user driver written by hand, for hostile-frontend tests: guest
//! memory is a shared memfd, split virtqueues are laid out in it by the
//! test, and the connection is the vhost crate's `Frontend`. Descriptors,
//! avail entries and indexes are whatever the test writes, valid or not.
//!
//! Layout: queue `q`'s rings live at `q * RING_STRIDE` (descriptor table
//! at +0, avail ring at +0x1000, used ring at +0x2000); data buffers go at
//! [`DATA`] and above. Up to 4 queues of up to 256 entries.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
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
        let shm = Shm::new(mem_len);
        let mut fe = Frontend::connect(sock, nq as u64).expect("connect");
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        fe.set_features(features(offered)).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        // REPLY_ACK makes every message synchronous: when a call returns,
        // the daemon has applied it.
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK),
        )
        .unwrap();
        if pf.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let base = shm.ptr as u64;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem_len as u64,
            userspace_addr: base,
            mmap_offset: 0,
            mmap_handle: shm.fd.as_raw_fd(),
        }])
        .unwrap();
        let mut queues = Vec::new();
        for q in 0..nq {
            let at = q as u64 * RING_STRIDE;
            let queue = Queue {
                size: qs,
                desc: at,
                avail: at + 0x1000,
                used: at + 0x2000,
                kick: EventFd::new(0).unwrap(),
                call: EventFd::new(0).unwrap(),
                avail_idx: 0,
                unreturnable: 0,
            };
            fe.set_vring_num(q, qs).unwrap();
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
            .unwrap();
            fe.set_vring_base(q, 0).unwrap();
            fe.set_vring_call(q, &queue.call).unwrap();
            fe.set_vring_kick(q, &queue.kick).unwrap();
            queues.push(queue);
        }
        for q in 0..nq {
            fe.set_vring_enable(q, true).unwrap();
        }
        Driver { shm, fe, queues }
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
