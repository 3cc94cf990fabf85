//! What a daemon knows of its current frontend, for the control socket:
//! whether one is connected, and the backend request channel it gave
//! (SET_BACKEND_REQ_FD), on which the daemon tells it that the device's
//! configuration changed.
//!
//! The vhost crate (0.18) keeps that channel to itself and has no
//! message for a configuration change, so the relay (see `relay`) keeps a
//! duplicate of the descriptor as it passes and the daemon writes the one
//! message it needs itself (vhost-user spec, "Back-end message types",
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG). The crate never writes to the
//! channel: it would only for shared objects and shared memory, which the
//! daemons do not offer.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
const CONFIG_CHANGE_MSG: u32 = 2;
/// The protocol version in a message's flags.
const FLAG_VERSION: u32 = 0x1;

/// The current frontend, shared by the connection loop (which opens and
/// ends it), the relay (which fills in the channel) and the control
/// socket (which reads it). Cheap to clone.
#[derive(Clone, Default)]
pub struct Frontend(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    connected: bool,
    /// Frontends served since the daemon started, the current one
    /// included.
    connections: u64,
    /// Our duplicate of the backend request channel, once given.
    channel: Option<UnixStream>,
}

impl Frontend {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A frontend connected.
    pub(crate) fn connected(&self) {
        let mut s = self.lock();
        s.connected = true;
        s.connections += 1;
        s.channel = None;
    }

    /// The frontend went away: its channel with it.
    pub(crate) fn disconnected(&self) {
        let mut s = self.lock();
        s.connected = false;
        s.channel = None;
    }

    /// The relay saw SET_BACKEND_REQ_FD: `channel` is our duplicate.
    pub(crate) fn set_channel(&self, channel: UnixStream) {
        self.lock().channel = Some(channel);
    }

    pub fn is_connected(&self) -> bool {
        self.lock().connected
    }

    pub fn connections(&self) -> u64 {
        self.lock().connections
    }

    /// Tells the frontend to read the configuration space again. Sent
    /// without NEED_REPLY: no answer is read, so a frontend that stopped
    /// reading its channel cannot block the daemon (12 bytes fit in any
    /// socket buffer; a full one fails the send instead). Ok(false) when
    /// there is no frontend or it gave no channel (it then sees the
    /// change the next time it reads the configuration).
    pub fn config_changed(&self) -> std::io::Result<bool> {
        let mut s = self.lock();
        let Some(ch) = s.channel.as_mut() else {
            return Ok(false);
        };
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&FLAG_VERSION.to_le_bytes());
        // SAFETY: send(2) on a descriptor `ch` owns, from a buffer that
        // outlives the call. MSG_DONTWAIT: never block on a frontend that
        // stopped reading; MSG_NOSIGNAL: a closed peer is an error, not a
        // SIGPIPE.
        let n = unsafe {
            libc::send(
                ch.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n == msg.len() as isize {
            return Ok(true);
        }
        let e = match n {
            n if n < 0 => std::io::Error::last_os_error(),
            _ => std::io::Error::other("message cut short"),
        };
        // A message cut short would garble the channel: drop it.
        s.channel = None;
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn config_change_is_one_header_without_reply() {
        let f = Frontend::default();
        assert!(!f.config_changed().unwrap());
        f.connected();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        f.set_channel(ours);
        assert!(f.config_changed().unwrap());
        let mut got = [0u8; 12];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(got, [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        f.disconnected();
        assert!(!f.config_changed().unwrap());
        assert_eq!((f.is_connected(), f.connections()), (false, 1));
    }
}
