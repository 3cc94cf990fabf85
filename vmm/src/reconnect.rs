//! A device's link to its backend, and the thread that watches it.
//!
//! The link is `Up`, `Reconnecting` or `Failed`. When the backend's
//! socket closes, a device without `reconnect=SECS` is marked failed at
//! once, as it always was: NEEDS_RESET in its status and a
//! configuration-change interrupt. With `reconnect=SECS` it is
//! `Reconnecting` instead, which the guest does not see: its
//! notifications wait in the kick eventfds, its register writes are
//! recorded (mmio.rs) and sent to nobody. The watcher connects to the
//! same socket path again with backoff (50 ms, doubling to 1 s) until
//! a backend answers, then, under the device's lock, gives it the
//! device as the driver set it up, through the path of the first start
//! (replay.rs), and signals the device's interrupt once, for completions
//! the old backend published without signalling them. A backend that
//! does not come back within SECS, or comes back without what the first
//! one offered, fails the device as above.
//!
//! The watcher runs under the VMM's seccomp filter: it connects with
//! `socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)` and `connect`, and
//! sleeps in `poll` (the filter has no nanosleep).

use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::config::Reconnect;
use crate::mmio::{config_interrupt, MmioDevice};

/// A device's link to its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Link {
    Up = 0,
    /// The backend went away; the watcher waits for it to come back.
    Reconnecting = 1,
    /// For good: NEEDS_RESET.
    Failed = 2,
}

impl Link {
    pub fn name(self) -> &'static str {
        match self {
            Link::Up => "up",
            Link::Reconnecting => "reconnecting",
            Link::Failed => "failed",
        }
    }
}

/// What the watcher, the transport and the control socket share of a
/// device.
pub struct Health {
    link: AtomicU8,
    /// Backends that came back and took the device over.
    pub reconnects: AtomicU64,
    /// The VMM's own InterruptStatus bits (the configuration change).
    pub interrupt_status: AtomicU32,
    /// How long the device waits for a backend that went away.
    pub reconnect: Reconnect,
    /// Whether the backend tracks the requests it takes in an inflight
    /// region (INFLIGHT_SHMFD), so a backend that replaces it finishes
    /// them; without, requests in flight when one goes away are lost.
    pub inflight: bool,
}

impl Health {
    pub fn new(reconnect: Reconnect, inflight: bool) -> Health {
        Health {
            link: AtomicU8::new(Link::Up as u8),
            reconnects: AtomicU64::new(0),
            interrupt_status: AtomicU32::new(0),
            reconnect,
            inflight,
        }
    }

    pub fn link(&self) -> Link {
        match self.link.load(Ordering::Acquire) {
            0 => Link::Up,
            1 => Link::Reconnecting,
            _ => Link::Failed,
        }
    }

    pub fn failed(&self) -> bool {
        self.link() == Link::Failed
    }

    /// Up to Reconnecting (a failed device stays failed).
    pub fn lost(&self) {
        let _ = self.link.compare_exchange(
            Link::Up as u8,
            Link::Reconnecting as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Reconnecting to Up, counted; the number of reconnects so far.
    pub fn restored(&self) -> u64 {
        let r = self.link.compare_exchange(
            Link::Reconnecting as u8,
            Link::Up as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if r.is_ok() {
            self.reconnects.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.reconnects.load(Ordering::Acquire)
        }
    }

    pub fn fail(&self) {
        self.link.store(Link::Failed as u8, Ordering::Release);
    }
}

/// First and longest pause between connection attempts.
const FIRST_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_secs(1);

/// One device's watcher.
pub struct Watcher {
    pub socket: PathBuf,
    pub health: Arc<Health>,
    /// The device's interrupt, to report a failure without its lock.
    pub call: EventFd,
}

impl Watcher {
    /// Watches the backend connection `fd` of the device `lock` gives,
    /// for the life of the device (returns once it failed).
    pub fn run<'a, L>(self, mut fd: RawFd, lock: L)
    where
        L: Fn() -> std::sync::MutexGuard<'a, MmioDevice>,
    {
        let name = self.socket.display().to_string();
        loop {
            if !hang_up(fd) {
                return;
            }
            let wait = self.health.reconnect;
            if !wait.enabled() || self.health.failed() {
                eprintln!("rimg-vmm: backend {name} disconnected; device marked failed");
                self.fail();
                return;
            }
            self.health.lost();
            eprintln!(
                "rimg-vmm: backend {name} disconnected; reconnecting (for up to {} s)",
                wait.0
            );
            match self.reconnect(&name, Duration::from_secs(wait.0.into()), &lock) {
                Some(new) => fd = new,
                None => return,
            }
        }
    }

    /// Connects until a backend takes the device over (its connection's
    /// descriptor) or the device failed (None).
    fn reconnect<'a, L>(&self, name: &str, wait: Duration, lock: &L) -> Option<RawFd>
    where
        L: Fn() -> std::sync::MutexGuard<'a, MmioDevice>,
    {
        let deadline = Instant::now() + wait;
        let mut delay = FIRST_DELAY;
        loop {
            // ENOENT or ECONNREFUSED while the backend restarts.
            if let Ok(stream) = UnixStream::connect(&self.socket) {
                let mut dev = lock();
                match dev.reconnect(stream) {
                    Ok(n) => {
                        let fd = dev.backend_fd();
                        drop(dev);
                        eprintln!("rimg-vmm: backend {name} reconnected ({n})");
                        return Some(fd);
                    }
                    // Gone again during the replay: wait for the next one.
                    Err(e) if e.backend_lost() => {
                        drop(dev);
                        eprintln!("rimg-vmm: {e}; reconnecting");
                    }
                    Err(e) => {
                        drop(dev);
                        eprintln!("rimg-vmm: {e}; device marked failed");
                        self.fail();
                        return None;
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                eprintln!(
                    "rimg-vmm: backend {name} did not come back within {} s; device marked failed",
                    wait.as_secs()
                );
                self.fail();
                return None;
            }
            sleep(delay.min(deadline - now));
            delay = (delay * 2).min(MAX_DELAY);
        }
    }

    fn fail(&self) {
        self.health.fail();
        config_interrupt(&self.health, &self.call);
    }
}

/// Waits until the peer of `fd` hangs up: true then, false if `fd`
/// cannot be polled.
fn hang_up(fd: RawFd) -> bool {
    loop {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd. `fd` is the connection the device
        // owns, replaced only by this thread (`MmioDevice::reconnect`),
        // so it stays open while polled.
        let r = unsafe { libc::poll(&mut p, 1, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            return p.revents & libc::POLLNVAL == 0;
        }
    }
}

/// Sleeps in `poll` with no descriptors: nanosleep is not in the VMM's
/// seccomp filter, poll is.
fn sleep(d: Duration) {
    let ms = d.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: no descriptors to read or write; poll only waits.
    unsafe { libc::poll(std::ptr::null_mut(), 0, ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_is_for_good_and_only_a_return_counts() {
        let h = Health::new(Reconnect(1), false);
        assert_eq!(h.link(), Link::Up);
        assert_eq!(h.restored(), 0);
        h.lost();
        assert_eq!(h.link(), Link::Reconnecting);
        assert_eq!(h.restored(), 1);
        assert_eq!(h.link(), Link::Up);
        h.lost();
        h.fail();
        h.lost();
        assert_eq!(h.restored(), 1);
        assert_eq!(h.link(), Link::Failed);
        assert!(h.failed());
    }

    #[test]
    fn sleeping_in_poll_sleeps() {
        let t = Instant::now();
        sleep(Duration::from_millis(30));
        assert!(t.elapsed() >= Duration::from_millis(25));
    }
}
