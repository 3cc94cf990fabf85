//! Inflight tracking in rimg-vhost-blk (INFLIGHT_SHMFD), driven through
//! the hand-written ring driver: the state a killed daemon leaves behind
//! (marks, a used ring published or not, a torn batch) is crafted in the
//! region and the rings, then a new connection (a fresh device, as a
//! restarted daemon gets) must run every request taken and not returned
//! exactly once, and nothing returned again. Hostile regions (unsealed or
//! short files, wrong sizes, loops, heads outside the ring) must neither
//! crash nor hang the daemon: an invalid SET_INFLIGHT_FD closes the
//! connection, a region that makes no sense is reset with a warning.
//! Daemons run with the default seccomp filter (kill).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rimg_tests::blk::Daemon;
use rimg_tests::rings::{
    inflight_stride, Driver, InflightRegion, DATA, F_WRITE, INFLIGHT_USED_IDX,
};
use rimg_tests::{assert_qemu_check_clean, qemu_create, tempdir, workspace_bin};
use tempfile::TempDir;

const MEM: usize = 16 << 20;
const QS: u16 = 32;
const T: Duration = Duration::from_secs(10);

/// rimg-vhost-blk on `img`, logging at info (its restart lines).
fn daemon(sock: &Path, img: &Path) -> Daemon {
    let mut cmd = Command::new(workspace_bin("rimg-vhost-blk"));
    cmd.arg("--socket")
        .arg(sock)
        .arg("--image")
        .arg(img)
        .args(["--num-queues", "2"])
        .env("RUST_LOG", "info");
    Daemon::spawn(cmd, sock).expect("daemon")
}

/// A fresh 16 MiB qcow2 image served by [`daemon`]: the directory
/// holding both, the image, the socket, the daemon.
fn setup() -> (TempDir, PathBuf, PathBuf, Daemon) {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    qemu_create(&img, "", "16M");
    let sock = dir.path().join("blk.sock");
    let daemon = daemon(&sock, &img);
    (dir, img, sock, daemon)
}

/// Ends the daemon: a clean exit, no panic, a clean image.
fn finish(daemon: Daemon, img: &Path) {
    let (st, log) = daemon.terminate();
    assert!(st.success() && !log.contains("panicked"), "{st}\n{log}");
    assert_qemu_check_clean(img);
}

/// Request `k` of queue `q`: its chain at head `3k` (header, one 4 KiB
/// buffer, status), its memory apart from every other request's.
struct Req {
    q: usize,
    head: u16,
    hdr: u64,
    buf: u64,
    status: u64,
}

fn req(q: usize, k: u16) -> Req {
    let at = DATA + 0x10_0000 * q as u64 + 0x2000 * u64::from(k);
    Req {
        q,
        head: 3 * k,
        hdr: at,
        buf: at + 0x1000,
        status: at + 0x10,
    }
}

/// Writes request `r`'s chain: a 4 KiB write of `fill` at `sector`, or a
/// read of it (fill None).
fn prepare(d: &Driver, r: &Req, sector: u64, fill: Option<u8>) {
    let mut h = [0u8; 16];
    h[0] = u8::from(fill.is_some());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    d.shm.write(r.hdr, &h);
    d.shm.write(r.status, &[0xff]);
    let dir = match fill {
        Some(b) => {
            d.shm.write(r.buf, &[b; 4096]);
            0
        }
        None => F_WRITE,
    };
    d.write_chain(
        r.q,
        r.head,
        &[(r.hdr, 16, 0), (r.buf, 4096, dir), (r.status, 1, F_WRITE)],
    );
}

/// Reads 4 KiB at `sector` through queue `q` (request slot 9).
fn read(d: &mut Driver, q: usize, sector: u64) -> Vec<u8> {
    let r = req(q, 9);
    prepare(d, &r, sector, None);
    d.submit_head(q, r.head);
    assert_eq!(d.shm.read(r.status, 1)[0], 0, "read status");
    d.shm.read(r.buf, 4096)
}

/// Writes a used element (head, len) at used index `idx` of queue `q` and
/// publishes `idx + 1`, as a daemon that completed it.
fn fake_used(d: &mut Driver, q: usize, idx: u16, head: u16) {
    let qu = &d.queues[q];
    let e = qu.used + 4 + 8 * u64::from(idx % qu.size);
    d.shm.write(e, &u32::from(head).to_le_bytes());
    d.shm.write(e + 4, &1u32.to_le_bytes());
    d.shm.write(qu.used + 2, &idx.wrapping_add(1).to_le_bytes());
}

/// Ends the connection and waits until the daemon has torn it down (the
/// `n`th disconnect): nothing of it touches the rings any more.
fn disconnect(daemon: &Daemon, d: Driver, n: usize) -> Driver {
    d.hang_up();
    assert!(
        daemon.wait_for_log_count("frontend disconnected", n, T),
        "{}",
        daemon.log()
    );
    d
}

#[test]
fn taken_requests_run_once_after_a_restart() {
    let (_dir, img, sock, daemon) = setup();
    let mut d = Driver::connect_inflight(&sock, MEM, 2, QS, |f| f & !(1 << 29), None).unwrap();
    // Tracked: marks come and go, the used index is logged.
    let r0 = req(1, 0);
    prepare(&d, &r0, 0, Some(0x11));
    d.submit_head(1, r0.head);
    let r5 = req(1, 5);
    prepare(&d, &r5, 0, Some(0x11));
    d.submit_head(1, r5.head);
    let region = d.inflight.as_ref().unwrap();
    assert_eq!(region.header(1), [1, QS, r5.head, 2]);
    assert_eq!(region.header(0)[0], 1, "queue 0 started too");
    assert_eq!((region.mark(1, r0.head), region.mark(1, r5.head)), (0, 0));
    assert_eq!(region.counter(1, r5.head), 1, "marked when taken");

    // What a killed daemon leaves: two requests taken (marked, the later
    // head first), not returned.
    let mut d = disconnect(&daemon, d, 1);
    let (a, b) = (req(1, 1), req(1, 2));
    prepare(&d, &a, 8, Some(0xaa));
    prepare(&d, &b, 16, Some(0xbb));
    d.publish(1, &[a.head, b.head]);
    let region = d.inflight.as_ref().unwrap();
    region.set_mark(1, b.head, 1, 7);
    region.set_mark(1, a.head, 1, 8);
    let mut d = d.reconnect(&sock).unwrap();
    assert!(d.wait_used(1, 4, T), "{}", daemon.log());
    assert!(daemon.wait_for_log("queue 1: resubmitting 2 requests", T));
    assert!(daemon.wait_for_log("queue 0: resubmitting 0 requests", T));
    let ids: Vec<u32> = (2..4).map(|i| d.used_elem(1, i).0).collect();
    assert!(ids.contains(&3) && ids.contains(&6), "{ids:?}");
    let region = d.inflight.as_ref().unwrap();
    assert_eq!((region.mark(1, a.head), region.mark(1, b.head)), (0, 0));
    assert_eq!(region.u16_at(1, INFLIGHT_USED_IDX), 4);
    // The avail ring goes on after them: a new request is the next used
    // entry, nothing ran twice.
    assert_eq!(read(&mut d, 1, 8), vec![0xaa; 4096]);
    assert_eq!(d.used_idx(1), 5);
    assert_eq!(read(&mut d, 0, 16), vec![0xbb; 4096]);
    drop(d);
    finish(daemon, &img);
}

#[test]
fn returned_requests_do_not_run_again() {
    let (_dir, img, sock, daemon) = setup();
    let d = Driver::connect_inflight(&sock, MEM, 1, QS, |f| f & !(1 << 29), None).unwrap();
    let mut d = disconnect(&daemon, d, 1);

    // Published, mark not cleared: used index 1, the region's 0, the
    // batch list at the head. Running it again would write 0xee.
    let a = req(0, 1);
    prepare(&d, &a, 8, Some(0xee));
    d.publish(0, &[a.head]);
    fake_used(&mut d, 0, 0, a.head);
    let region = d.inflight.as_ref().unwrap();
    region.set_mark(0, a.head, 1, 0);
    region.set_header(0, [1, QS, a.head, 0]);
    let d = d.reconnect(&sock).unwrap();
    // The second start's line (the first connection's came before).
    assert!(daemon.wait_for_log_count("queue 0: resubmitting 0 requests", 2, T));
    let region = d.inflight.as_ref().unwrap();
    assert_eq!((region.mark(0, a.head), region.header(0)[3]), (0, 1));
    let mut d = disconnect(&daemon, d, 2);

    // A torn batch of three published (b, c, e), one taken and not
    // published (f): only f runs.
    let (b, c, e, f) = (req(0, 2), req(0, 3), req(0, 4), req(0, 5));
    for (r, s) in [(&b, 16), (&c, 24), (&e, 32)] {
        prepare(&d, r, s, Some(0xee));
    }
    prepare(&d, &f, 40, Some(0xf0));
    d.publish(0, &[b.head, c.head, f.head, e.head]);
    fake_used(&mut d, 0, 1, c.head);
    fake_used(&mut d, 0, 2, b.head);
    fake_used(&mut d, 0, 3, e.head);
    let region = d.inflight.as_ref().unwrap();
    for (i, r) in [&b, &c, &f, &e].into_iter().enumerate() {
        region.set_mark(0, r.head, 1, 10 + i as u64);
    }
    region.set_next(0, c.head, a.head);
    region.set_next(0, b.head, c.head);
    region.set_next(0, e.head, b.head);
    region.set_header(0, [1, QS, e.head, 1]);
    let mut d = d.reconnect(&sock).unwrap();
    assert!(d.wait_used(0, 5, T), "{}", daemon.log());
    assert!(daemon.wait_for_log("queue 0: resubmitting 1 requests", T));
    assert_eq!(d.used_elem(0, 4).0, u32::from(f.head));
    assert_eq!(read(&mut d, 0, 40), vec![0xf0; 4096]);
    for s in [8, 16, 24, 32] {
        assert_eq!(
            read(&mut d, 0, s),
            vec![0; 4096],
            "sector {s} written again"
        );
    }
    assert_eq!(d.used_idx(0), 10, "one used entry per request");
    drop(d);
    finish(daemon, &img);
}

#[test]
fn a_fresh_region_on_a_running_ring_resubmits_nothing() {
    let (_dir, img, sock, daemon) = setup();
    // Untracked at first.
    let mut d = Driver::connect(&sock, MEM, 1, QS, |f| f & !(1 << 29));
    read(&mut d, 0, 0);
    read(&mut d, 0, 8);
    let mut d = disconnect(&daemon, d, 1);
    let a = req(0, 1);
    prepare(&d, &a, 8, Some(0x5a));
    d.publish(0, &[a.head]);
    d.inflight = Some(InflightRegion::memfd(
        inflight_stride(QS) as u64,
        true,
        1,
        QS,
    ));
    let mut d = d.reconnect(&sock).unwrap();
    assert!(d.wait_used(0, 3, T), "{}", daemon.log());
    assert!(daemon.wait_for_log("queue 0: resubmitting 0 requests", T));
    assert_eq!(d.inflight.as_ref().unwrap().header(0), [1, QS, a.head, 3]);
    assert_eq!(read(&mut d, 0, 8), vec![0x5a; 4096]);
    drop(d);
    finish(daemon, &img);
}

#[test]
fn hostile_regions_neither_crash_nor_hang() {
    let (_dir, img, sock, daemon) = setup();
    let mut disconnects = 0;
    let stride = inflight_stride(QS) as u64;
    let features = |f| f & !(1 << 29);

    // Refused at SET_INFLIGHT_FD (the connection closes): a file that is
    // not sealed, one shorter than the region, more queues than the
    // device has, an offset that is not page-aligned.
    let unsealed = InflightRegion::memfd(stride, false, 1, QS);
    let mut short = InflightRegion::memfd(stride, true, 1, QS);
    short.desc.mmap_size = 2 * stride;
    let mut many = InflightRegion::memfd(8 * stride, true, 1, QS);
    many.desc.num_queues = 8;
    let mut offset = InflightRegion::memfd(8192, true, 1, QS);
    offset.desc.mmap_offset = 100;
    for (what, r) in [
        ("unsealed", unsealed),
        ("short", short),
        ("queues", many),
        ("offset", offset),
    ] {
        let e = Driver::connect_inflight(&sock, MEM, 1, QS, features, Some(r));
        assert!(e.is_err(), "{what}: accepted");
        disconnects += 1;
        assert!(
            daemon.wait_for_log_count("frontend disconnected", disconnects, T),
            "{what}: {}",
            daemon.log()
        );
    }
    assert!(daemon.wait_for_log_count("SET_INFLIGHT_FD refused", 4, T));

    // Regions that make no sense once a ring starts: reset, nothing
    // resubmitted, the ring works. The region tracks 64 entries, the
    // ring has 32.
    type Spoil = fn(&InflightRegion, u16);
    let spoils: [(&str, Spoil); 5] = [
        ("desc_num", |r, u| r.set_header(0, [1, 7, 0, u])),
        ("version", |r, u| r.set_header(0, [9, 64, 0, u])),
        ("next loop", |r, u| {
            r.set_header(0, [1, 64, 3, u.wrapping_sub(2)]);
            r.set_next(0, 3, 3);
        }),
        ("head outside the ring", |r, u| {
            r.set_header(0, [1, 64, 0, u]);
            r.set_mark(0, 40, 1, 0);
        }),
        ("batch longer than the ring", |r, u| {
            r.set_header(0, [1, 64, 0, u.wrapping_sub(40)])
        }),
    ];
    let region = InflightRegion::memfd(inflight_stride(64) as u64, true, 1, 64);
    let mut d = Driver::connect_inflight(&sock, MEM, 1, QS, features, Some(region)).unwrap();
    for (n, (what, spoil)) in spoils.into_iter().enumerate() {
        read(&mut d, 0, 0);
        disconnects += 1;
        d = disconnect(&daemon, d, disconnects);
        let used = d.used_idx(0);
        spoil(d.inflight.as_ref().unwrap(), used);
        d = d.reconnect(&sock).unwrap();
        assert_eq!(read(&mut d, 0, 8), vec![0; 4096], "{what}");
        assert!(
            daemon.wait_for_log_count("inflight region ignored", n + 1, T),
            "{what}: {}",
            daemon.log()
        );
    }
    drop(d);
    finish(daemon, &img);
}
