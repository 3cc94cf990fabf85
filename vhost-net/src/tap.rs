//! The TAP device (Documentation/networking/tuntap.rst): one
//! `/dev/net/tun` file per queue pair, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
//! (and IFF_MULTI_QUEUE for several pairs). Every frame crossing it is
//! preceded by a 12-byte virtio_net_hdr_v1 (TUNSETVNETHDRSZ), which
//! carries checksum and segmentation offload state both ways.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The vnet header length used on the TAP side, whatever the guest uses.
pub const TAP_HDR_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("TAP name '{0}' is empty or longer than 15 bytes")]
    Name(String),
    #[error("cannot open /dev/net/tun: {0}")]
    Open(std::io::Error),
    #[error("TAP {0}: {1} failed: {2}")]
    Ioctl(String, &'static str, std::io::Error),
}

/// An open TAP device with one file per queue.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<File>,
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    r
}

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl Tap {
    /// Opens (or creates, if no device has that name) the TAP `name` with
    /// `queues` queues. A device created here lives as long as its files.
    pub fn open(name: &str, queues: usize) -> Result<Tap, Error> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(Error::Name(name.into()));
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut files = Vec::new();
        for _ in 0..queues.max(1) {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .map_err(Error::Open)?;
            let mut r = ifreq(name);
            r.ifr_ifru.ifru_flags = flags as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which
            // lives across the call.
            if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut r) } < 0 {
                return Err(Error::Ioctl(name.into(), "TUNSETIFF", last_err()));
            }
            let sz: libc::c_int = TAP_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
            if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETVNETHDRSZ, &sz) } < 0 {
                return Err(Error::Ioctl(name.into(), "TUNSETVNETHDRSZ", last_err()));
            }
            files.push(f);
        }
        Ok(Tap {
            name: name.into(),
            queues: files,
        })
    }

    /// A stand-in whose queue files are `queues`, for tests that never
    /// use the device.
    #[cfg(test)]
    pub(crate) fn from_files(name: &str, queues: Vec<File>) -> Tap {
        Tap {
            name: name.into(),
            queues,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The file of queue `q`.
    pub fn queue_fd(&self, q: usize) -> RawFd {
        self.queues[q].as_raw_fd()
    }

    /// Sets the offloads the kernel may hand us (TUN_F_* flags): only what
    /// the guest accepted.
    pub fn set_offload(&self, flags: u32) -> Result<(), Error> {
        for f in &self.queues {
            // SAFETY: TUNSETOFFLOAD takes the flags by value.
            if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) }
                < 0
            {
                return Err(Error::Ioctl(self.name.clone(), "TUNSETOFFLOAD", last_err()));
            }
        }
        Ok(())
    }

    /// Attaches or detaches queue `q` (multi-queue devices): the kernel
    /// steers received frames only to attached queues.
    pub fn set_queue_attached(&self, q: usize, attached: bool) -> Result<(), Error> {
        if self.queues.len() < 2 {
            return Ok(());
        }
        let mut r = ifreq("");
        r.ifr_ifru.ifru_flags = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        } as libc::c_short;
        // SAFETY: TUNSETQUEUE reads the ifreq we pass.
        if unsafe { libc::ioctl(self.queues[q].as_raw_fd(), libc::TUNSETQUEUE, &mut r) } < 0 {
            return Err(Error::Ioctl(self.name.clone(), "TUNSETQUEUE", last_err()));
        }
        Ok(())
    }

    /// Sets the MTU and brings the link up (for a device the daemon
    /// created).
    pub fn configure_link(&self, mtu: Option<u16>) -> Result<(), Error> {
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(Error::Ioctl(self.name.clone(), "socket", last_err()));
        }
        // SAFETY: s is a fresh descriptor nobody else owns.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        if let Some(m) = mtu {
            let mut r = ifreq(&self.name);
            r.ifr_ifru.ifru_mtu = libc::c_int::from(m);
            // SAFETY: SIOCSIFMTU reads the ifreq we pass.
            if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFMTU, &mut r) } < 0 {
                return Err(Error::Ioctl(self.name.clone(), "SIOCSIFMTU", last_err()));
            }
        }
        let mut r = ifreq(&self.name);
        // SAFETY: SIOCGIFFLAGS fills the ifreq we pass.
        if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut r) } < 0 {
            return Err(Error::Ioctl(self.name.clone(), "SIOCGIFFLAGS", last_err()));
        }
        // SAFETY: reading the flags member SIOCGIFFLAGS just wrote.
        let fl = unsafe { r.ifr_ifru.ifru_flags };
        r.ifr_ifru.ifru_flags = fl | libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads the ifreq we pass.
        if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut r) } < 0 {
            return Err(Error::Ioctl(self.name.clone(), "SIOCSIFFLAGS", last_err()));
        }
        Ok(())
    }
}
