//! Readiness for service managers (systemd's `Type=notify`, sd_notify(3)):
//! when the environment names a datagram socket (`NOTIFY_SOCKET`, a path
//! or, with a leading `@`, an abstract name), the daemon sends
//! `READY=1` once it serves, and `STOPPING=1` when it begins to stop. The
//! socket is made when the daemon starts, before its seccomp filter; the
//! filters allow the `sendto` that the messages take.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    /// Read before the filter, which does not allow getpid.
    pid: u32,
}

impl Notifier {
    /// The service manager's socket, if one asked. The variable stays:
    /// the daemons start no programs that could inherit it (their
    /// filters forbid exec).
    pub fn from_env() -> Option<Notifier> {
        let name = std::env::var_os("NOTIFY_SOCKET")?;
        let name = name.to_str()?.to_string();
        let addr = match name.strip_prefix('@') {
            Some(abs) => SocketAddr::from_abstract_name(abs.as_bytes()),
            None => SocketAddr::from_pathname(&name),
        };
        let addr = match addr {
            Ok(a) => a,
            Err(e) => {
                log::warn!("NOTIFY_SOCKET={name}: {e}");
                return None;
            }
        };
        match UnixDatagram::unbound() {
            Ok(sock) => Some(Notifier {
                sock,
                addr,
                pid: std::process::id(),
            }),
            Err(e) => {
                log::warn!("NOTIFY_SOCKET: {e}");
                None
            }
        }
    }

    /// Serving: the manager starts what waits for this daemon.
    pub fn ready(&self) {
        self.send(&format!("READY=1\nMAINPID={}", self.pid));
    }

    /// Stopping (SIGTERM or `quit`): the manager knows it was asked.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    fn send(&self, msg: &str) {
        // A manager that went away is no reason to stop serving.
        if let Err(e) = self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
            log::warn!("NOTIFY_SOCKET: {e}");
        }
    }
}
