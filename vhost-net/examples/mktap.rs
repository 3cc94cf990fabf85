//! Creates a persistent multi-queue TAP device with vnet headers, the
//! kind `rimg-vhost-net --tap NAME` attaches to and that outlives a
//! daemon restart (what `ip tuntap add NAME mode tap multi_queue
//! vnet_hdr` makes, for systems without iproute2, such as the tests'
//! outer guest).
//!
//! Usage: mktap NAME

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        eprintln!("usage: mktap NAME (1 to 15 bytes)");
        std::process::exit(2);
    }
    if let Err(e) = create(&name) {
        eprintln!("mktap {name}: {e}");
        std::process::exit(1);
    }
}

fn create(name: &str) -> std::io::Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;
    r.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which lives
    // across the call.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut r) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes an integer argument by value.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
