//! A hostile vhost-user-blk frontend: requests with bad descriptors,
//! directions, lengths, types and ranges, written by hand into a split
//! ring in shared memory (vhost crate frontend). Each must complete with
//! IOERR or UNSUPP (or be returned unanswered when it has no status byte);
//! the daemon must keep serving, never write outside a request's range,
//! and exit cleanly with a consistent image. An avail index far ahead of
//! the device stalls the queue until the driver repairs it, with one log
//! line however often the driver kicks.

use std::time::Duration;

use rimg_tests::blk::Daemon;
use rimg_tests::rings::{Desc as D, Driver, DATA, F_INDIRECT, F_NEXT, F_WRITE};
use rimg_tests::{assert_qemu_check_clean, assert_qemu_compare_equal, qemu_img, tempdir};

const MEM: usize = 16 << 20;
const QS: u16 = 16;
const DISK: u64 = 16 << 20;

/// A hostile case: name, request header, chain, expected status (None:
/// returned unanswered).
type Case = (&'static str, Vec<u8>, Vec<D>, Option<u8>);

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
    // No EVENT_IDX, so every completion signals.
    let mut r = Driver::connect(&sock, MEM, 1, QS, |f| f & !(1 << 29));
    let mut model = vec![0u8; DISK as usize];

    let run = |r: &mut Driver, name: &str, hdr: Option<Vec<u8>>, descs: &[D], want: Option<u8>| {
        if let Some(h) = hdr {
            r.shm.write(HDR, &h);
        }
        r.shm.write(STATUS, &[0xff]);
        let used = r.submit(0, descs);
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
            // The chain ends readable: there is no device-writable status
            // byte, and the readable one must not be written to.
            "status descriptor device-readable",
            header(0, 0),
            vec![(HDR, 16, 0), (BUF, 512, F_WRITE), (STATUS, 1, 0)],
            None,
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
            "status descriptor wrapping the address space",
            header(0, 0),
            vec![(HDR, 16, 0), (u64::MAX - 4, 16, F_WRITE)],
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

    // Readable data after the status byte: the chain's last byte is
    // device-readable, so nothing may be written there (nor anywhere).
    r.shm.write(HDR, &header(1, 0));
    r.shm.write(STATUS, &[0xff]);
    r.shm.write(BUF, &[0xee; 512]);
    let used = r.submit(0, &[(HDR, 16, 0), (STATUS, 1, F_WRITE), (BUF, 512, 0)]);
    assert_eq!(used, 0, "readable after status: returned unanswered");
    assert_eq!(r.shm.read(STATUS, 1)[0], 0xff, "readable after status");
    assert_eq!(
        r.shm.read(BUF, 512),
        vec![0xee; 512],
        "device-readable buffer written"
    );

    // A descriptor loop (next points back at itself) and an indirect
    // table outside memory: returned unanswered, the daemon goes on.
    r.shm.write(HDR, &header(0, 0));
    r.write_desc(0, 0, (HDR, 16, F_NEXT), 0);
    assert_eq!(r.submit_head(0, 0), 0, "descriptor loop");
    r.write_desc(0, 0, (1 << 40, 64, F_INDIRECT), 0);
    assert_eq!(r.submit_head(0, 0), 0, "indirect table outside memory");
    // A loop over a writable descriptor, walked as the header, one byte
    // and the buffer 14 times (the queue size bounds the walk): whole
    // sectors, but cut short. Refused with IOERR in the last byte walked,
    // no data read into the buffers.
    r.shm.write(HDR, &header(0, 8));
    r.shm.write(STATUS, &[0xff]);
    r.shm.write(BUF, &[0u8; 512]);
    r.write_desc(0, 0, (HDR, 16, F_NEXT), 1);
    r.write_desc(0, 1, (STATUS, 1, F_WRITE | F_NEXT), 2);
    r.write_desc(0, 2, (BUF, 512, F_WRITE | F_NEXT), 2);
    assert_eq!(r.submit_head(0, 0), 1, "writable descriptor loop");
    assert_eq!(r.shm.read(BUF + 511, 1)[0], ioerr, "writable loop status");
    assert_eq!(r.shm.read(STATUS, 1)[0], 0xff, "looped chain read into");
    assert_eq!(r.shm.read(BUF, 511), vec![0; 511], "looped chain read into");

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

/// Kicks a driver makes while its avail index is far ahead.
const KICKS: usize = 200;
const WAIT: Duration = Duration::from_secs(10);

/// A driver that publishes an avail index more than the queue size ahead
/// of the device and keeps kicking: the daemon leaves the queue alone and
/// says so once per episode, not once per kick (its log does not grow
/// with the kicks), and serves again as soon as the index is repaired.
/// With and without EVENT_IDX (with it, re-enabling notifications on such
/// a ring must not make the worker spin).
#[test]
fn far_ahead_avail_index_is_logged_once_and_the_queue_serves_after_repair() {
    for event_idx in [false, true] {
        let d = tempdir();
        let img = d.path().join("disk.qcow2");
        assert!(
            qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"])
                .status
                .success()
        );
        let sock = d.path().join("a.sock");
        let daemon = Daemon::start(&sock, &img, &[]).expect("daemon");
        let mut r = Driver::connect(&sock, MEM, 1, QS, |f| {
            if event_idx {
                f
            } else {
                f & !(1 << 29)
            }
        });
        let rw = |r: &mut Driver, write: bool, sector: u64, fill: u8| -> u8 {
            r.shm.write(HDR, &header(u32::from(write), sector));
            r.shm.write(STATUS, &[0xff]);
            let flags = if write {
                r.shm.write(BUF, &[fill; 4096]);
                0
            } else {
                r.shm.write(BUF, &[0; 4096]);
                F_WRITE
            };
            r.submit(0, &[(HDR, 16, 0), (BUF, 4096, flags), (STATUS, 1, F_WRITE)]);
            r.shm.read(STATUS, 1)[0]
        };
        assert_eq!(rw(&mut r, true, 0, 0x11), 0, "write before");
        for episode in 1..=2usize {
            let good = r.queues[0].avail_idx;
            r.set_avail_idx(0, good.wrapping_add(QS + 3));
            assert!(
                daemon.wait_for_log_count("entries ahead of the device", episode, WAIT),
                "event_idx {event_idx}: bogus index not logged: {}",
                daemon.log()
            );
            let before = daemon.log().lines().count();
            for k in 0..KICKS {
                assert!(
                    r.kick_taken(0, WAIT),
                    "event_idx {event_idx}: kick {k} not taken: worker stuck"
                );
            }
            // Nothing was taken from the ring meanwhile.
            assert_eq!(r.used_idx(0), good, "event_idx {event_idx}");
            // Repaired: the queue serves again, data intact.
            r.set_avail_idx(0, good);
            let sector = 8 * episode as u64;
            assert_eq!(
                rw(&mut r, true, sector, episode as u8),
                0,
                "write after repair"
            );
            assert_eq!(rw(&mut r, false, sector, 0), 0, "read after repair");
            assert_eq!(r.shm.read(BUF, 4096), vec![episode as u8; 4096]);
            // The request above completed after every kick was handled:
            // whatever they logged is in the log by now, bar the pipe.
            let after = daemon.log().lines().count();
            assert!(
                after <= before + 1,
                "event_idx {event_idx}: {KICKS} kicks logged {} lines: {}",
                after - before,
                daemon.log()
            );
        }
        assert_eq!(rw(&mut r, false, 0, 0), 0);
        assert_eq!(r.shm.read(BUF, 4096), vec![0x11; 4096]);
        drop(r);
        let (st, log) = daemon.terminate();
        assert!(st.success(), "daemon exit {st}: {log}");
        // One line per episode, nothing per kick (virtio-queue's own
        // "Iterator error" included).
        assert_eq!(
            log.matches("entries ahead of the device").count(),
            2,
            "event_idx {event_idx}: {log}"
        );
        assert!(
            log.lines().count() <= 4,
            "event_idx {event_idx}: log grew with the kicks:\n{log}"
        );
        assert!(!log.contains("Iterator error"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
        assert_qemu_check_clean(&img);
    }
}
