//! A hostile vhost-user-blk frontend: requests with bad descriptors,
//! directions, lengths, types and ranges, written by hand into a split
//! ring in shared memory (vhost crate frontend). Each must complete with
//! IOERR or UNSUPP (or be returned unanswered when it has no status byte);
//! the daemon must keep serving, never write outside a request's range,
//! and exit cleanly with a consistent image.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};

use rimg_tests::blk::Daemon;
use rimg_tests::{assert_qemu_check_clean, assert_qemu_compare_equal, qemu_img, tempdir};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 16 << 20;
const QS: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const DATA: u64 = 0x10000;
const DISK: u64 = 16 << 20;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Guest memory: a shared memfd mapping.
struct Shm {
    fd: OwnedFd,
    ptr: *mut u8,
}

impl Shm {
    fn new() -> Shm {
        // SAFETY: memfd_create with a valid C string; the fd is checked.
        let raw = unsafe { libc::memfd_create(c"guest".as_ptr(), 0) };
        assert!(raw >= 0);
        // SAFETY: `raw` is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        assert_eq!(unsafe { libc::ftruncate(raw, MEM as i64) }, 0);
        // SAFETY: a fresh shared mapping of MEM bytes of our memfd; the
        // result is checked and unmapped only when Shm is dropped.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM,
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
        }
    }
    fn write(&self, gpa: u64, b: &[u8]) {
        assert!(gpa as usize + b.len() <= MEM);
        // SAFETY: in bounds (checked); the daemon only touches memory the
        // ring hands it, and races on it are the point of a shared ring.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.add(gpa as usize), b.len()) };
    }
    fn read(&self, gpa: u64, n: usize) -> Vec<u8> {
        assert!(gpa as usize + n <= MEM);
        let mut v = vec![0; n];
        // SAFETY: in bounds (checked).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(gpa as usize), v.as_mut_ptr(), n) };
        v
    }
    fn u16_at(&self, gpa: u64) -> u16 {
        u16::from_le_bytes(self.read(gpa, 2).try_into().unwrap())
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in new().
        unsafe { libc::munmap(self.ptr.cast(), MEM) };
    }
}

/// A descriptor: (guest address, length, flags).
type D = (u64, u32, u16);
/// A hostile case: name, request header, chain, expected status (None:
/// returned unanswered).
type Case = (&'static str, Vec<u8>, Vec<D>, Option<u8>);

struct Ring {
    shm: Shm,
    /// Keeps the vhost-user connection open.
    _fe: Frontend,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
}

impl Ring {
    fn connect(sock: &std::path::Path) -> Ring {
        let shm = Shm::new();
        let mut fe = Frontend::connect(sock, 1).expect("connect");
        fe.set_owner().unwrap();
        let feats = fe.get_features().unwrap();
        // VERSION_1 | PROTOCOL_FEATURES | INDIRECT_DESC | the blk features;
        // no EVENT_IDX, so every completion signals.
        fe.set_features(feats & !(1 << 29)).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ),
        )
        .unwrap();
        let base = shm.ptr as u64;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: base,
            mmap_offset: 0,
            mmap_handle: shm.fd.as_raw_fd(),
        }])
        .unwrap();
        fe.set_vring_num(0, QS).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QS,
                queue_size: QS,
                flags: 0,
                desc_table_addr: base + DESC,
                used_ring_addr: base + USED,
                avail_ring_addr: base + AVAIL,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, 0).unwrap();
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(0).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        Ring {
            shm,
            _fe: fe,
            kick,
            call,
            avail_idx: 0,
        }
    }

    /// Writes `descs` as a chain at table slots 0.., submits it and waits
    /// for its used entry; returns the used length.
    fn submit(&mut self, descs: &[D]) -> u32 {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let next = if i + 1 < descs.len() { i as u16 + 1 } else { 0 };
            let flags = if i + 1 < descs.len() {
                flags | F_NEXT
            } else {
                flags
            };
            self.write_desc(DESC, i as u16, (addr, len, flags), next);
        }
        self.submit_head(0)
    }

    fn write_desc(&self, table: u64, i: u16, (addr, len, flags): D, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.shm.write(table + 16 * u64::from(i), &d);
    }

    fn submit_head(&mut self, head: u16) -> u32 {
        let slot = self.avail_idx % QS;
        self.shm
            .write(AVAIL + 4 + 2 * u64::from(slot), &head.to_le_bytes());
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.shm.write(AVAIL + 2, &self.avail_idx.to_le_bytes());
        fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();
        let want = self.avail_idx;
        loop {
            if self.shm.u16_at(USED + 2) == want {
                break;
            }
            let mut p = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut p, 1, 10_000) };
            assert!(n > 0, "no completion within 10 s: daemon hung");
            let _ = self.call.read();
        }
        let e = USED + 4 + 8 * u64::from(want.wrapping_sub(1) % QS);
        let v = self.shm.read(e, 8);
        assert_eq!(
            u32::from_le_bytes(v[0..4].try_into().unwrap()),
            u32::from(head)
        );
        u32::from_le_bytes(v[4..8].try_into().unwrap())
    }
}

fn header(typ: u32, sector: u64) -> Vec<u8> {
    let mut h = vec![0u8; 16];
    h[0..4].copy_from_slice(&typ.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

const HDR: u64 = DATA;
const STATUS: u64 = DATA + 0x100;
const BUF: u64 = DATA + 0x1000;

#[test]
fn hostile_requests_are_refused() {
    let d = tempdir();
    let img = d.path().join("disk.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"])
            .status
            .success()
    );
    let sock = d.path().join("h.sock");
    let daemon = Daemon::start(&sock, &img, &[]).expect("daemon");
    let mut r = Ring::connect(&sock);
    let mut model = vec![0u8; DISK as usize];

    let run = |r: &mut Ring, name: &str, hdr: Option<Vec<u8>>, descs: &[D], want: Option<u8>| {
        if let Some(h) = hdr {
            r.shm.write(HDR, &h);
        }
        r.shm.write(STATUS, &[0xff]);
        let used = r.submit(descs);
        let st = r.shm.read(STATUS, 1)[0];
        match want {
            Some(s) => assert_eq!(st, s, "{name}: status {st}, used len {used}"),
            None => {
                assert_eq!(used, 0, "{name}: unanswered request has used len 0");
                assert_eq!(st, 0xff, "{name}: status written");
            }
        }
    };
    let ok = 0u8;
    let ioerr = 1u8;
    let unsupp = 2u8;

    // A valid write and read-back: the ring works.
    r.shm.write(BUF, &[0xabu8; 4096]);
    run(
        &mut r,
        "valid write",
        Some(header(1, 8)),
        &[(HDR, 16, 0), (BUF, 4096, 0), (STATUS, 1, F_WRITE)],
        Some(ok),
    );
    model[8 * 512..8 * 512 + 4096].fill(0xab);
    r.shm.write(BUF, &[0u8; 4096]);
    run(
        &mut r,
        "valid read",
        Some(header(0, 8)),
        &[(HDR, 16, 0), (BUF, 4096, F_WRITE), (STATUS, 1, F_WRITE)],
        Some(ok),
    );
    assert_eq!(r.shm.read(BUF, 4096), vec![0xab; 4096]);

    let sectors = DISK / 512;
    let cases: Vec<Case> = vec![
        (
            "unknown type",
            header(99, 0),
            vec![(HDR, 16, 0), (STATUS, 1, F_WRITE)],
            Some(unsupp),
        ),
        (
            "read past capacity",
            header(0, sectors),
            vec![(HDR, 16, 0), (BUF, 512, F_WRITE), (STATUS, 1, F_WRITE)],
            Some(ioerr),
        ),
        (
            "write straddling capacity",
            header(1, sectors - 1),
            vec![(HDR, 16, 0), (BUF, 1024, 0), (STATUS, 1, F_WRITE)],
            Some(ioerr),
        ),
        (
            "sector overflow",
            header(1, u64::MAX),
            vec![(HDR, 16, 0), (BUF, 512, 0), (STATUS, 1, F_WRITE)],
            Some(ioerr),
        ),
        (
            "data outside memory",
            header(1, 0),
            vec![(HDR, 16, 0), (1 << 40, 4096, 0), (STATUS, 1, F_WRITE)],
            Some(ioerr),
        ),
        (
            "data straddling memory end",
            header(1, 0),
            vec![
                (HDR, 16, 0),
                (MEM as u64 - 512, 4096, 0),
                (STATUS, 1, F_WRITE),
            ],
            Some(ioerr),
        ),
        (
            "write with device-writable data",
            header(1, 0),
            vec![(HDR, 16, 0), (BUF, 4096, F_WRITE), (STATUS, 1, F_WRITE)],
            Some(ioerr),
        ),
        (
            "read with device-readable data",
            header(0, 0),
            vec![(HDR, 16, 0), (BUF, 4096, 0), (STATUS, 1, F_WRITE)],
            Some(ioerr),
        ),
        (
            "readable after writable",
            header(0, 0),
            vec![
                (HDR, 16, 0),
                (BUF, 512, F_WRITE),
                (BUF + 512, 512, 0),
                (STATUS, 1, F_WRITE),
            ],
            Some(ioerr),
        ),
        (
            "short header",
            header(0, 0),
            vec![(HDR, 8, 0), (BUF, 512, F_WRITE), (STATUS, 1, F_WRITE)],
            Some(ioerr),
        ),
        (
            "length not sectors",
            header(1, 0),
            vec![(HDR, 16, 0), (BUF, 100, 0), (STATUS, 1, F_WRITE)],
            Some(ioerr),
        ),
        (
            "no status descriptor",
            header(1, 0),
            vec![(HDR, 16, 0), (BUF, 512, 0)],
            None,
        ),
        (
            "header in writable memory only",
            header(0, 0),
            vec![(HDR, 16, F_WRITE), (STATUS, 1, F_WRITE)],
            Some(ioerr),
        ),
        (
            "discard reserved flags",
            header(11, 0),
            vec![(HDR, 16, 0), (BUF + 0x800, 16, 0), (STATUS, 1, F_WRITE)],
            Some(unsupp),
        ),
        (
            "discard past capacity",
            header(11, 0),
            vec![(HDR, 16, 0), (BUF + 0x900, 16, 0), (STATUS, 1, F_WRITE)],
            Some(ioerr),
        ),
        (
            "discard partial segment",
            header(11, 0),
            vec![(HDR, 16, 0), (BUF + 0x900, 12, 0), (STATUS, 1, F_WRITE)],
            Some(ioerr),
        ),
        (
            "write-zeroes too many segments",
            header(13, 0),
            vec![(HDR, 16, 0), (BUF, 16 * 4000, 0), (STATUS, 1, F_WRITE)],
            Some(ioerr),
        ),
    ];
    // Discard segments: reserved flag bit 1; and a range past the end.
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&0u64.to_le_bytes());
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    seg[12..16].copy_from_slice(&2u32.to_le_bytes());
    r.shm.write(BUF + 0x800, &seg);
    seg[0..8].copy_from_slice(&(sectors - 4).to_le_bytes());
    seg[12..16].copy_from_slice(&0u32.to_le_bytes());
    r.shm.write(BUF + 0x900, &seg);
    for (name, h, descs, want) in cases {
        // Garbage in the data buffer: nothing of it may reach the disk.
        r.shm.write(BUF, &[0xee; 512]);
        run(&mut r, name, Some(h), &descs, want);
    }

    // A descriptor loop (next points back at itself) and an indirect
    // table outside memory: returned unanswered, the daemon goes on.
    r.shm.write(HDR, &header(0, 0));
    r.write_desc(DESC, 0, (HDR, 16, F_NEXT), 0);
    assert_eq!(r.submit_head(0), 0, "descriptor loop");
    r.write_desc(DESC, 0, (1 << 40, 64, F_INDIRECT), 0);
    assert_eq!(r.submit_head(0), 0, "indirect table outside memory");

    // Still serving, data intact.
    r.shm.write(BUF, &[0u8; 4096]);
    run(
        &mut r,
        "read after abuse",
        Some(header(0, 8)),
        &[(HDR, 16, 0), (BUF, 4096, F_WRITE), (STATUS, 1, F_WRITE)],
        Some(ok),
    );
    assert_eq!(r.shm.read(BUF, 4096), vec![0xab; 4096]);
    drop(r);

    let (st, log) = daemon.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_qemu_check_clean(&img);
    let raw = d.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    assert_qemu_compare_equal(&raw, &img);
}
