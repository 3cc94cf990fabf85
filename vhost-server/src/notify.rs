//! Readiness for service managers (systemd's `Type=notify`, sd_notify(3)):
//! when the environment names a datagram socket (`NOTIFY_SOCKET`, a path
//! or, with a leading `@`, an abstract name), the daemon sends
//! `READY=1` once it serves, and `STOPPING=1` when it begins to stop
//! (the manager knows the sender's pid from the socket). [`take_from_env`]
//! reads and clears the variable at start-up (`cli::run`), so that it is
//! not left for anything else; the socket is made and connected before
//! the daemon gives up root (`--user`: a manager's socket may be root's)
//! and before the seccomp filter, which allows the `sendto` that the
//! messages take.

use std::ffi::OsString;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Mutex;

/// NOTIFY_SOCKET as [`take_from_env`] found it, until a server takes it.
static NAME: Mutex<Option<OsString>> = Mutex::new(None);

/// Reads and clears NOTIFY_SOCKET. Call it before the process has other
/// threads (it changes the environment).
pub fn take_from_env() {
    if let Some(v) = std::env::var_os("NOTIFY_SOCKET") {
        // SAFETY: callers run this first thing, before any other thread
        // exists, so nothing reads the environment while it changes.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        *NAME.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
    }
}

pub struct Notifier {
    /// Connected: the permission to write to the manager's socket is
    /// checked once, here.
    sock: UnixDatagram,
}

impl Notifier {
    /// The service manager's socket, if one asked ([`take_from_env`]).
    pub fn from_env() -> Option<Notifier> {
        let name = NAME.lock().unwrap_or_else(|p| p.into_inner()).take()?;
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
        match UnixDatagram::unbound().and_then(|sock| sock.connect_addr(&addr).map(|()| sock)) {
            Ok(sock) => Some(Notifier { sock }),
            Err(e) => {
                log::warn!("NOTIFY_SOCKET={name}: {e}");
                None
            }
        }
    }

    /// Serving: the manager starts what waits for this daemon.
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// Stopping (SIGTERM or `quit`): the manager knows it was asked.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    fn send(&self, msg: &str) {
        // A manager that went away is no reason to stop serving.
        if let Err(e) = self.sock.send(msg.as_bytes()) {
            log::warn!("NOTIFY_SOCKET: {e}");
        }
    }
}
