//! Frame generator for benches/vhost-net-bench.sh (the RX direction: TAP
//! -> backend -> guest): sends one Ethernet/IPv4/UDP frame of a given size
//! out through a network interface, as fast as the kernel takes it, until
//! killed (SIGTERM/SIGINT) or for a given time, then prints what it sent.
//!
//! `net_gen IFACE SIZE [SECONDS]`
//!
//! Run it inside the benchmark's network namespace: the frames go to that
//! interface only (for a TAP: to the TAP's reader, the backend under test).
//!
//! How: an AF_PACKET socket bound to the interface with
//! PACKET_QDISC_BYPASS (the frame goes straight to the driver's xmit, as
//! with pktgen), `sendmmsg` of 64 frames per call. A TAP whose queue is
//! full drops the frame (its `tx_dropped`) and the send reports ENOBUFS:
//! the generator then sleeps 50 us before trying again, so that the
//! backend it shares a core with gets the CPU to drain the queue (a yield
//! would give it a whole scheduler slice). The rate the backend achieves
//! is what the guest counts, not what this sends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const BATCH: usize = 64;
/// How long to leave the CPU to others when the TAP's queue is full.
const BACKOFF: Duration = Duration::from_micros(50);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn die(what: &str) -> ! {
    eprintln!("net_gen: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(1)
}

/// Internet checksum of `b`.
fn csum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Broadcast-free unicast frame: locally administered MACs, 10.99.0.1 ->
/// 10.99.0.2 UDP port 9 (discard), zero payload, total `size` bytes.
fn frame(size: usize) -> Vec<u8> {
    let mut f = vec![0u8; size];
    f[0..6].copy_from_slice(&[0x52, 0x54, 0x00, 0x99, 0x00, 0x02]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0x00, 0x99, 0x00, 0x01]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (size - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 99, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 99, 0, 2]);
    let c = csum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&1234u16.to_be_bytes());
    udp[2..4].copy_from_slice(&9u16.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    // UDP checksum 0: none (IPv4).
    f
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 3 || a.len() > 4 {
        eprintln!("usage: net_gen IFACE SIZE [SECONDS]");
        std::process::exit(2);
    }
    let size: usize = a[2].parse().expect("SIZE");
    assert!((60..=9000).contains(&size), "SIZE must be 60..=9000");
    let until = a
        .get(3)
        .map(|s| Instant::now() + Duration::from_secs_f64(s.parse().expect("SECONDS")));
    // SAFETY: prctl with integer arguments: precise short sleeps.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0, 0, 0) };
    let name = std::ffi::CString::new(a[1].as_str()).unwrap();

    // SAFETY: plain libc calls on values we own; results checked.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        die("socket");
    }
    // SAFETY: a NUL-terminated name that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        die("no such interface");
    }
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one int.
    if unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    } < 0
    {
        die("PACKET_QDISC_BYPASS");
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    // Protocol 0: the socket is bound to the interface for sending and
    // receives nothing (no packet tap is installed).
    sa.sll_protocol = 0;
    sa.sll_ifindex = ifindex as i32;
    // SAFETY: bind reads the sockaddr_ll we pass, of the given size.
    if unsafe {
        libc::bind(
            fd,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    } < 0
    {
        die("bind");
    }
    let f = frame(size);
    let mut iov = [libc::iovec {
        iov_base: f.as_ptr() as *mut libc::c_void,
        iov_len: f.len(),
    }; BATCH];
    // SAFETY: mmsghdr is plain data; all-zero is valid.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    let (mut sent, mut full) = (0u64, 0u64);
    let start = Instant::now();
    while !STOP.load(Ordering::Relaxed) {
        if until.is_some_and(|u| Instant::now() >= u) {
            break;
        }
        // SAFETY: msgs/iov point at `f`, which outlives the call.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                // The TAP's queue is full (the frame was dropped), or a
                // signal.
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                _ => die("sendmmsg"),
            }
        } else {
            sent += n as u64;
        }
        if n < BATCH as i32 {
            full += 1;
            std::thread::sleep(BACKOFF);
        }
    }
    let t = start.elapsed().as_secs_f64();
    println!(
        "sent={sent} secs={t:.3} pps={:.0} queue_full={full}",
        sent as f64 / t
    );
}
