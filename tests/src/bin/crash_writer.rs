//! Test support for `tests/crash_consistency.rs`: runs the seeded crash
//! workload (`rimg_tests::crash`) until it is killed.
//!
//! `crash_writer lib IMAGE SEED ROUND THREADS`: through the qcow2 library,
//! each batch's requests spread over THREADS threads.
//! `crash_writer blk SOCKET SEED ROUND QUEUES`: through a libblkio
//! virtio-blk-vhost-user client (rimg-vhost-blk on the other end), each
//! batch's requests in flight at once, spread over QUEUES queues.
//!
//! Prints `ready` once the image is open, then `F <batch>` after each
//! batch's flush completed: everything the batches up to it wrote is then
//! guaranteed. Any failed request ends the process with a message and
//! exit code 1 (the test expects to kill it, never to see it exit).
//!
//! With a last argument `noflush`, batches are not flushed and `C <batch>`
//! follows each batch's completion instead (the library then persists
//! metadata as rimg-vhost-blk does, `MetadataPersistence::ProcessDeath`):
//! a killed process must still have lost none of it.

use std::io::Write;
use std::path::Path;

use qcow2::pagebuf::PageBuf;
use qcow2::{Image, MetadataPersistence, OpenOptions, Qcow2Options};
use rimg_tests::blk::{Client, Req};
use rimg_tests::crash::{Op, Workload, SECTOR};

fn die(what: String) -> ! {
    eprintln!("crash_writer: {what}");
    std::process::exit(1)
}

fn say(line: &str) {
    let mut o = std::io::stdout().lock();
    if writeln!(o, "{line}").and_then(|_| o.flush()).is_err() {
        // The test stopped listening: nothing left to do.
        std::process::exit(0);
    }
}

fn run_lib(image: &Path, seed: u64, round: u64, threads: usize, flush: bool) -> ! {
    let metadata_persistence = if flush {
        MetadataPersistence::Flush
    } else {
        MetadataPersistence::ProcessDeath
    };
    let img = qcow2::open(
        image,
        &OpenOptions {
            writable: true,
            qcow2: Qcow2Options {
                metadata_persistence,
                // As rimg-vhost-blk: copying writes go to the intent log.
                intent_log: !flush,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| die(format!("open {}: {e}", image.display())));
    let mut wl = Workload::new(seed, round, img.size() / SECTOR);
    say("ready");
    for b in 0u64.. {
        let ops = wl.next_batch();
        let img: &dyn Image = img.as_ref();
        std::thread::scope(|s| {
            for t in 0..threads {
                let ops = &ops;
                s.spawn(move || {
                    for op in ops.iter().skip(t).step_by(threads) {
                        let (sector, count) = op.range();
                        let (off, len) = (sector * SECTOR, count * SECTOR);
                        let r = match *op {
                            Op::Write { .. } => {
                                // Sector-aligned, as a guest's buffers:
                                // a kill then cuts only between sectors
                                // (`qcow2::pagebuf`).
                                let mut b = PageBuf::zeroed(len as usize);
                                b.copy_from_slice(&op.data());
                                img.write_at(&b, off)
                            }
                            Op::Zero { unmap, .. } => img.write_zeroes(off, len, unmap),
                            Op::Discard { .. } => img.discard(off, len),
                        };
                        if let Err(e) = r {
                            die(format!("batch {b}: {op:?}: {e}"));
                        }
                    }
                });
            }
        });
        done(b, flush, || img.flush().map_err(|e| e.to_string()));
    }
    unreachable!()
}

/// The end of batch `b`: flushed and said so, or only said complete.
fn done(b: u64, flush: bool, f: impl FnOnce() -> Result<(), String>) {
    if !flush {
        return say(&format!("C {b}"));
    }
    if let Err(e) = f() {
        die(format!("batch {b}: flush: {e}"));
    }
    say(&format!("F {b}"));
}

fn run_blk(socket: &Path, seed: u64, round: u64, queues: usize, flush: bool) -> ! {
    let mut c = Client::connect(socket, queues, false)
        .unwrap_or_else(|e| die(format!("connect {}: {e}", socket.display())));
    let mut wl = Workload::new(seed, round, c.capacity() / SECTOR);
    say("ready");
    for b in 0u64.. {
        let ops = wl.next_batch();
        let data: Vec<Vec<u8>> = ops.iter().map(Op::data).collect();
        let reqs: Vec<(usize, Req<'_>)> = ops
            .iter()
            .zip(&data)
            .enumerate()
            .map(|(i, (op, d))| {
                let (sector, count) = op.range();
                let (off, len) = (sector * SECTOR, count * SECTOR);
                let r = match *op {
                    Op::Write { .. } => Req::Write(off, d),
                    Op::Zero { unmap, .. } => Req::WriteZeroes(off, len, unmap),
                    Op::Discard { .. } => Req::Discard(off, len),
                };
                (i % queues, r)
            })
            .collect();
        for (op, r) in ops.iter().zip(c.batch(&reqs)) {
            if r != 0 {
                die(format!("batch {b}: {op:?}: error {r}"));
            }
        }
        done(b, flush, || c.flush(0).map_err(|r| format!("error {r}")));
    }
    unreachable!()
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let num = |i: usize| -> u64 {
        a.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| die(format!("argument {i}: a number expected")))
    };
    let flush = match a.get(6).map(String::as_str) {
        None => true,
        Some("noflush") if a.len() == 7 => false,
        _ => die("a last argument `noflush` or none expected".into()),
    };
    match a.get(1).map(String::as_str) {
        Some("lib") if a.len() >= 6 => {
            run_lib(Path::new(&a[2]), num(3), num(4), num(5).max(1) as usize, flush)
        }
        Some("blk") if a.len() >= 6 => {
            run_blk(Path::new(&a[2]), num(3), num(4), num(5).max(1) as usize, flush)
        }
        _ => die(
            "usage: crash_writer lib IMAGE SEED ROUND THREADS [noflush] | blk SOCKET SEED ROUND QUEUES [noflush]"
                .into(),
        ),
    }
}
