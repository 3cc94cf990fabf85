//! The daemons' seccomp filter holds for the life of the process, not
//! only for the calls their own code makes: what the C library does on
//! its own on a long-running thread must not kill them.
//!
//! The case found: glibc's malloc opens /proc/sys/vm/overcommit_memory
//! the first time it shrinks a thread arena (heap trim), which may be on
//! a queue thread mid-service or on the main thread as it frees the
//! image's metadata cache at exit. The filter answers that `openat` with
//! EACCES (glibc then assumes the default overcommit mode) instead of
//! killing the process.
//!
//! When glibc trims depends on thresholds that adapt to the process's
//! history, so a short run may never get there. The daemon runs here with
//! the thresholds fixed low (GLIBC_TUNABLES: trim whatever is free at the
//! top of an arena, keep allocations up to 32 MiB in the arenas), so the
//! first large free on one of its threads trims, deterministically; the
//! code path is glibc's own, in the daemon's own threads.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rimg_tests::blk::{Client, Daemon, Req};
use rimg_tests::{
    assert_qemu_check_clean, qemu_img, qemu_io, qemu_overlay, qemu_raw_content, tempdir,
    workspace_bin,
};

const SIZE: u64 = 64 << 20;
/// One L2 table of a 512-byte-cluster image maps 64 clusters.
const L2_SPAN: u64 = 64 * 512;

const TUNABLES: &str =
    "glibc.malloc.trim_threshold=0:glibc.malloc.top_pad=0:glibc.malloc.mmap_threshold=33554432";

fn start(sock: &Path, img: &Path) -> Daemon {
    // In kill mode, the default.
    let mut cmd = std::process::Command::new(workspace_bin("rimg-vhost-blk"));
    cmd.arg("--socket")
        .arg(sock)
        .arg("--image")
        .arg(img)
        .args(["--num-queues", "2"])
        .env("GLIBC_TUNABLES", TUNABLES);
    rimg_tests::daemon::DaemonProcess::spawn(cmd, sock).expect("daemon")
}

/// Writes 4 KiB at the start of every L2 table's span (so the queue
/// threads allocate thousands of tables), 32 requests in flight per
/// queue, and reads a sample back.
fn load(c: &mut Client, model: &mut [u8], rng: &mut StdRng) {
    let offs: Vec<u64> = (0..SIZE / L2_SPAN).map(|i| i * L2_SPAN).collect();
    for (round, chunk) in offs.chunks(64).enumerate() {
        let data: Vec<u8> = (0..chunk.len() * 4096).map(|_| rng.random()).collect();
        let reqs: Vec<(usize, Req<'_>)> = chunk
            .iter()
            .enumerate()
            .map(|(i, &o)| (i % 2, Req::Write(o, &data[i * 4096..(i + 1) * 4096])))
            .collect();
        let r = c.batch(&reqs);
        assert!(r.iter().all(|&x| x == 0), "round {round}: {r:?}");
        for (i, &o) in chunk.iter().enumerate() {
            model[o as usize..o as usize + 4096].copy_from_slice(&data[i * 4096..(i + 1) * 4096]);
        }
    }
    for q in 0..2 {
        // Partly written here, partly from the backing file.
        let len = rng.random_range(1..=4096u64) * 512;
        let off = rng.random_range(0..(SIZE - len) / 512) * 512;
        let got = c.read(q, off, len as usize).expect("read");
        assert!(
            got[..] == model[off as usize..(off + len) as usize],
            "queue {q}: read at {off}+{len} differs"
        );
    }
}

/// A qcow2 image with 512-byte clusters over a backing file, served on
/// two queues to two clients one after the other (the first one's queue
/// threads end and free their buffers), then SIGTERM: the daemon exits 0
/// after its final flush and the image is clean and holds what was
/// written.
#[test]
fn small_clusters_over_backing_file_outlive_heap_trims() {
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    let b = base.to_str().unwrap();
    let o = qemu_img(&["create", "-q", "-f", "qcow2", b, &SIZE.to_string()]);
    assert!(o.status.success(), "{o:?}");
    qemu_io(&base, &["write -P 0x5a 0 12M", "write -P 0xa5 20M 4M"]);
    let img = d.path().join("top.qcow2");
    qemu_overlay(&img, "base.qcow2", &["cluster_size=512"]);
    let mut model = qemu_raw_content(&img, &d.path().join("initial.raw"));
    assert_eq!(model.len() as u64, SIZE);

    let sock = d.path().join("blk.sock");
    let daemon = start(&sock, &img);
    let mut rng = StdRng::seed_from_u64(0x5ecc);
    for client in 0..2 {
        let mut c = Client::connect(&sock, 2, false)
            .unwrap_or_else(|e| panic!("client {client}: {e}; daemon: {}", daemon.log()));
        load(&mut c, &mut model, &mut rng);
        drop(c);
    }
    let (st, log) = daemon.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    assert!(!sock.exists(), "socket left behind");
    assert_qemu_check_clean(&img);
    let got = qemu_raw_content(&img, &d.path().join("final.raw"));
    assert!(got == model, "image content differs from what was written");
}
