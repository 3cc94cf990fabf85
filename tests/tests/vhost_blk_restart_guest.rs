//! A Linux guest (QEMU 7.2, vhost-user-blk-pci with two queues, its
//! chardev reconnecting every second) runs a verifying O_DIRECT load: four
//! writers, each writing random 256 KiB blocks into its own slots and
//! reading every one back. Meanwhile the host SIGKILLs rimg-vhost-blk
//! (seccomp kill mode) ten times and starts a new one each time: QEMU
//! hands the new daemon the inflight region, which resubmits what the
//! killed one had taken. Pass: every block reads back as written (also
//! once more at the end); the guest's kernel logs no I/O error, no
//! timeout, no used entry for a head it did not have out ("not a head");
//! at least one restart resubmitted requests; the image checks clean
//! (after `rimg check -r leaks`, should a kill have leaked a cluster).
//!
//! The host tells the guest to stop by writing STOP into a small second
//! disk that QEMU serves itself.
//!
//! The image grows as the load writes (no preallocation): a write that
//! allocated a cluster and was answered before a kill must read back
//! from the next daemon, which holds because rimg-vhost-blk writes
//! metadata changes to the file before it answers (the engine's
//! `MetadataPersistence::ProcessDeath`, DESIGN.md). Inflight tracking
//! covers the other half: requests taken and not yet answered.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rimg_tests::blk::Daemon;
use rimg_tests::daemon::proc_threads;
use rimg_tests::guest::Guest;
use rimg_tests::{assert_qemu_check_clean, qemu_create, tempdir, wait_unlocked, workspace_bin};

const KILLS: usize = 10;
/// How long a restarted daemon may take until QEMU has restarted its
/// rings on it (QEMU retries the socket every second).
const RESTART: Duration = Duration::from_secs(60);

const SCRIPT: &str = r#"
D= C=
for b in /sys/block/vd*; do
  n=${b##*/}
  if [ "$(cat $b/size)" = 131072 ]; then D=/dev/$n; else C=/dev/$n; fi
done
echo "disk $D, control $C"
test -n "$D" && test -n "$C"
q=$(ls /sys/block/${D#/dev/}/mq | wc -l)
test "$q" = 2
stopped() {
  [ "$(dd if=$C bs=4k count=1 iflag=direct 2>/dev/null | head -c 4)" = STOP ]
}
worker() {
  w=$1; i=0
  while :; do
    s=$((i % 16)); off=$((16 + w * 64 + s * 4))
    dd if=/dev/urandom of=/tmp/p$w bs=64k count=4 2>/dev/null
    dd if=/tmp/p$w of=$D bs=64k seek=$off count=4 oflag=direct conv=notrunc 2>/dev/null \
      || { echo "W$w: write $i failed"; return 1; }
    dd if=$D of=/tmp/r$w bs=64k skip=$off count=4 iflag=direct 2>/dev/null \
      || { echo "W$w: read $i failed"; return 1; }
    cmp -s /tmp/p$w /tmp/r$w || { echo "W$w: round $i read back other data"; return 1; }
    mv /tmp/p$w /tmp/s$w.$s
    i=$((i + 1))
    if [ $((i % 4)) = 0 ] && stopped; then break; fi
  done
  echo "W$w: $i rounds"
  n=$i; if [ $n -gt 16 ]; then n=16; fi
  s=0
  while [ $s -lt $n ]; do
    off=$((16 + w * 64 + s * 4))
    dd if=$D of=/tmp/r$w bs=64k skip=$off count=4 iflag=direct 2>/dev/null \
      || { echo "W$w: final read failed"; return 1; }
    cmp -s /tmp/s$w.$s /tmp/r$w || { echo "W$w: slot $s lost its data"; return 1; }
    s=$((s + 1))
  done
}
echo LOAD-START
pids=
for w in 0 1 2 3; do worker $w > /tmp/log$w 2>&1 & pids="$pids $!"; done
fail=0
for p in $pids; do wait $p || fail=1; done
cat /tmp/log0 /tmp/log1 /tmp/log2 /tmp/log3
if dmesg | grep -i -e "I/O error" -e "timed out" -e "blk_update_request" -e "not a head"; then
  echo "guest kernel reported errors"; fail=1
fi
test $fail = 0
echo GUEST-OK
"#;

/// rimg-vhost-blk on `img` (two queues, seccomp kill, logging at info),
/// retried while the killed one's image lock is still held.
fn start(sock: &Path, img: &Path) -> Daemon {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let mut cmd = Command::new(workspace_bin("rimg-vhost-blk"));
        cmd.arg("--socket")
            .arg(sock)
            .arg("--image")
            .arg(img)
            .args(["--num-queues", "2", "--seccomp", "kill"])
            .env("RUST_LOG", "info");
        match Daemon::spawn(cmd, sock) {
            Ok(d) => return d,
            Err(e) if e.contains("lock") && Instant::now() < end => {
                wait_unlocked(img, Duration::from_secs(10));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// The inflight region QEMU and the daemons share, mapped read-only by
/// the test (through the daemon's mapping of it: /proc/PID/map_files,
/// root only), to kill a daemon while it holds requests.
struct Peek {
    ptr: *const u8,
    len: usize,
}

impl Peek {
    fn new(pid: u32) -> Peek {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let line = maps
            .lines()
            .find(|l| l.contains("memfd:rimg-inflight"))
            .unwrap_or_else(|| panic!("no inflight region mapped:\n{maps}"));
        let range = line.split_whitespace().next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let len =
            (u64::from_str_radix(b, 16).unwrap() - u64::from_str_radix(a, 16).unwrap()) as usize;
        let f = std::fs::File::open(format!("/proc/{pid}/map_files/{range}")).unwrap();
        // SAFETY: a new read-only shared mapping of the region's memfd
        // (sealed against shrinking by the daemon that made it); checked,
        // never unmapped while the test runs (leaked at its end).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Peek { ptr: p.cast(), len }
    }

    fn u8_at(&self, at: usize) -> u8 {
        assert!(at < self.len);
        // SAFETY: in bounds; shared memory other processes write, read
        // atomically.
        unsafe { (*self.ptr.add(at).cast::<std::sync::atomic::AtomicU8>()).load(Ordering::Acquire) }
    }

    /// Whether a head of either queue is marked taken right now.
    fn any_marked(&self) -> bool {
        let qs = u16::from_ne_bytes([self.u8_at(10), self.u8_at(11)]) as usize;
        let stride = (16 + 16 * qs).next_multiple_of(64);
        (0..2).any(|q| (0..qs).any(|h| self.u8_at(q * stride + 16 + 16 * h) == 1))
    }

    /// Waits (at most `t`) until a head is marked.
    fn wait_marked(&self, t: Duration) -> bool {
        let end = Instant::now() + t;
        while Instant::now() < end {
            if self.any_marked() {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }
}

/// The counts of the "resubmitting N requests" lines in `log`.
fn resubmitted(log: &str) -> Vec<usize> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split_once("resubmitting ")?.1;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

#[test]
fn guest_io_survives_daemon_kills() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    // Growing: every first write to a cluster allocates (module docs).
    qemu_create(&img, "", "64M");
    let ctl = dir.path().join("ctl.raw");
    std::fs::write(&ctl, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("blk.sock");
    let mut daemon = start(&sock, &img);

    let guest = Guest::new(SCRIPT)
        .vhost_user_blk_reconnecting(&sock, 2, 1)
        .qemu_args([
            "-drive".to_string(),
            format!("file={},format=raw,if=none,id=ctl", ctl.display()),
            "-device".to_string(),
            "virtio-blk-pci,drive=ctl".to_string(),
        ])
        .timeout(Duration::from_secs(600));
    let (done_tx, done) = mpsc::channel();
    let g = std::thread::spawn(move || {
        let out = guest.run();
        let _ = done_tx.send(());
        out
    });

    // Both rings started: the guest's driver is up, its load follows.
    let started = |d: &Daemon| d.wait_for_log_count("resubmitting", 2, RESTART);
    assert!(started(&daemon), "no ring start:\n{}", daemon.log());
    let peek = Peek::new(daemon.pid());
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let mut logs = Vec::new();
    let mut caught = 0;
    for kill in 0..KILLS {
        // Lets the load build up between kills; nothing depends on it.
        let pause = Duration::from_millis(rng.random_range(500..2000));
        if done.recv_timeout(pause).is_ok() {
            let out = g.join().unwrap();
            panic!("guest ended before kill {kill}:\n{}", out.console);
        }
        // Killed while it holds a request, if that comes soon (the
        // guest spends most of its time outside the disk under TCG).
        caught += usize::from(peek.wait_marked(Duration::from_secs(3)));
        daemon.child.kill().unwrap();
        // Reaped before the next one starts: the kernel has cancelled and
        // waited for the killed one's io_uring requests by then.
        daemon.child.wait().unwrap();
        logs.push(daemon.log());
        drop(daemon);
        wait_unlocked(&img, Duration::from_secs(30));
        daemon = start(&sock, &img);
        if !started(&daemon) {
            daemon.signal(libc::SIGUSR1);
            daemon.wait_for_log("state dump end", Duration::from_secs(5));
            panic!(
                "restart {kill}: QEMU did not restart the rings:\n{}\n{}",
                daemon.log(),
                proc_threads(daemon.pid())
            );
        }
    }
    std::fs::write(&ctl, b"STOP").unwrap();
    let out = g.join().unwrap();
    let (st, log) = daemon.terminate();
    logs.push(log);
    let counts: Vec<Vec<usize>> = logs.iter().map(|l| resubmitted(l)).collect();
    println!("resubmitted per daemon and ring start: {counts:?} ({caught} kills with marks)");
    out.assert_success();
    assert!(out.console.contains("GUEST-OK"), "{}", out.console);
    for l in out.console.lines().filter(|l| l.starts_with('W')) {
        println!("guest: {l}");
    }
    assert!(st.success(), "last daemon: {st}\n{}", logs.last().unwrap());
    assert!(
        counts[1..].iter().flatten().any(|&n| n > 0),
        "no restart found requests to resubmit: {counts:?}"
    );
    for l in &logs {
        assert!(
            !l.contains("panicked") && !l.contains("inflight region ignored"),
            "{l}"
        );
    }

    // A killed daemon leaves the image dirty (marked at its open; the
    // clusters it had reserved, if any, leaked); the next one repairs it
    // at open, and the last one closed cleanly: nothing is left for a
    // check to find.
    assert!(
        logs[1..].iter().any(|l| l.contains("not closed cleanly")),
        "no restarted daemon repaired the image it found dirty"
    );
    assert_qemu_check_clean(&img);
}
