//! 4 KiB random I/O load generator on libblkio, for benches/vhost-blk-bench.sh.
//!
//! `blk_bench DRIVER PATH read|write QD QUEUES SECONDS`
//! DRIVER is `virtio-blk-vhost-user` (PATH = socket) or `io_uring` (PATH =
//! file). Each queue runs in its own thread keeping QD requests in flight
//! at random aligned offsets. Prints one line:
//! `iops=N p50_us=X p99_us=Y`.

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use rand::{Rng, SeedableRng};

const BS: usize = 4096;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 7 {
        eprintln!("usage: blk_bench DRIVER PATH read|write QD QUEUES SECONDS");
        std::process::exit(2);
    }
    let (driver, path, write) = (&a[1], &a[2], a[3] == "write");
    let qd: usize = a[4].parse().expect("QD");
    let nq: usize = a[5].parse().expect("QUEUES");
    let secs: f64 = a[6].parse().expect("SECONDS");

    let e = |e: blkio::Error| -> ! {
        eprintln!("blkio: {}", e.message());
        std::process::exit(1)
    };
    let mut b = Blkio::new(driver).unwrap_or_else(|x| e(x));
    b.set_str("path", path).unwrap_or_else(|x| e(x));
    if driver == "io_uring" {
        b.set_bool("direct", false).ok();
    }
    b.connect().unwrap_or_else(|x| e(x));
    b.set_i32("num-queues", nq as i32).unwrap_or_else(|x| e(x));
    let out = b.start().unwrap_or_else(|x| e(x));
    let cap = b.get_u64("capacity").unwrap_or_else(|x| e(x));
    let align = b.get_u64("mem-region-alignment").unwrap_or(4096) as usize;
    let per_q = (qd * BS).next_multiple_of(align);
    let region = b.alloc_mem_region(per_q * nq).unwrap_or_else(|x| e(x));
    b.map_mem_region(&region).unwrap_or_else(|x| e(x));
    let base = region.addr;

    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut handles = Vec::new();
    for (t, mut q) in out.queues.into_iter().enumerate() {
        handles.push(std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64 + 1);
            let mut lat = Vec::with_capacity(1 << 20);
            let mut started = vec![Instant::now(); qd];
            let buf = base + t * per_q;
            let blocks = cap / BS as u64;
            let mut submit = |q: &mut blkio::Blkioq, i: usize, started: &mut Vec<Instant>| {
                let off = rng.random_range(0..blocks) * BS as u64;
                let p = buf + i * BS;
                started[i] = Instant::now();
                if write {
                    q.write(off, p as *const u8, BS, i, ReqFlags::empty());
                } else {
                    q.read(off, p as *mut u8, BS, i, ReqFlags::empty());
                }
            };
            for i in 0..qd {
                submit(&mut q, i, &mut started);
            }
            let mut inflight = qd;
            let mut c: [MaybeUninit<Completion>; 64] = [const { MaybeUninit::uninit() }; 64];
            while inflight > 0 {
                let n = q.do_io(&mut c, 1, None, None).expect("do_io");
                let now = Instant::now();
                let stop = now >= deadline;
                for x in c.iter().take(n) {
                    // SAFETY: do_io initialised the first n completions.
                    let x = unsafe { x.assume_init_read() };
                    assert_eq!(x.ret, 0, "request failed");
                    lat.push((now - started[x.user_data]).as_nanos() as u64);
                    if stop {
                        inflight -= 1;
                    } else {
                        submit(&mut q, x.user_data, &mut started);
                    }
                }
            }
            lat
        }));
    }
    let t0 = Instant::now();
    let mut lat: Vec<u64> = Vec::new();
    for h in handles {
        lat.extend(h.join().expect("worker"));
    }
    let el = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!(
        "iops={:.0} p50_us={:.1} p99_us={:.1}",
        lat.len() as f64 / el,
        pct(0.50),
        pct(0.99)
    );
}
