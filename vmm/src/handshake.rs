//! One connection's handshake with a vhost-user backend, the same at
//! boot and after a reconnect: SET_OWNER, GET_FEATURES,
//! GET/SET_PROTOCOL_FEATURES, SET_BACKEND_REQ_FD, GET_QUEUE_NUM,
//! GET_CONFIG. At boot the VMM chooses the protocol features from the
//! offer; a backend that comes back must offer at least what the first
//! one settled (the guest already saw the features, the queues and the
//! config space that came of it), and gets the same protocol set.

use std::os::unix::net::UnixStream;
use std::path::Path;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

use crate::error::{Error, Result};
use crate::vhost_user::{vhost_err, Kind, PROTOCOL_FEATURES, VERSION_1};

/// What a first connection settled, which a returning backend must
/// honour.
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    /// The backend's feature bits the VMM relies on (offered to the
    /// guest, or PROTOCOL_FEATURES).
    pub features: u64,
    /// The protocol features negotiated: sent again as they are.
    pub protocol: VhostUserProtocolFeatures,
    /// Backend queues the device uses.
    pub queues: usize,
}

/// What one handshake learnt.
pub struct Session {
    pub fe: Frontend,
    pub backend_features: u64,
    pub protocol: VhostUserProtocolFeatures,
    /// Queues the backend serves (GET_QUEUE_NUM, or the device type's
    /// default without protocol MQ).
    pub queues: usize,
    /// The backend's config space (zeros without protocol CONFIG).
    pub config: Vec<u8>,
    /// A new backend request channel (the VMM's end, then the backend's),
    /// made at the first handshake that negotiates BACKEND_REQ.
    pub new_channel: Option<(UnixStream, UnixStream)>,
}

/// The protocol features the VMM uses from an `offered` set. INFLIGHT_SHMFD
/// only for a disk: QEMU's vhost-user-net never uses it, and net
/// backends that rewind to the used index need no region.
fn chosen_protocol(kind: Kind, offered: VhostUserProtocolFeatures) -> VhostUserProtocolFeatures {
    let mut p = offered
        & (VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK);
    // The request channel serves configuration changes only: of use with
    // CONFIG alone.
    let channel = VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::CONFIG;
    if offered.contains(channel) {
        p |= VhostUserProtocolFeatures::BACKEND_REQ;
    }
    if kind == Kind::Block {
        p |= offered & VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    p
}

fn refused(socket: &Path, what: &'static str, msg: String) -> Error {
    Error::Vhost {
        socket: socket.into(),
        what,
        msg,
    }
}

/// The handshake on a fresh connection `stream` to `socket`. `settled`:
/// what a first connection settled (a reconnect), checked against the new
/// offer. `channel`: the backend's end of the request channel, if one
/// exists already, sent again.
pub fn handshake(
    kind: Kind,
    socket: &Path,
    stream: UnixStream,
    settled: Option<&Settled>,
    channel: Option<&UnixStream>,
) -> Result<Session> {
    let mut fe = Frontend::from_stream(stream, 1);
    fe.set_owner().map_err(vhost_err(socket, "SET_OWNER"))?;
    let backend_features = fe
        .get_features()
        .map_err(vhost_err(socket, "GET_FEATURES"))?;
    if backend_features & VERSION_1 == 0 {
        return Err(refused(
            socket,
            "GET_FEATURES",
            "backend does not offer VIRTIO_F_VERSION_1".into(),
        ));
    }
    if let Some(s) = settled {
        let missing = s.features & !backend_features;
        if missing != 0 {
            return Err(refused(
                socket,
                "GET_FEATURES",
                format!("the backend no longer offers feature bits {missing:#x}"),
            ));
        }
    }
    let mut protocol = VhostUserProtocolFeatures::empty();
    if backend_features & PROTOCOL_FEATURES != 0 {
        let offered = fe
            .get_protocol_features()
            .map_err(vhost_err(socket, "GET_PROTOCOL_FEATURES"))?;
        protocol = match settled {
            Some(s) if !offered.contains(s.protocol) => {
                return Err(refused(
                    socket,
                    "GET_PROTOCOL_FEATURES",
                    format!(
                        "the backend no longer offers protocol features {:#x}",
                        (s.protocol - offered).bits()
                    ),
                ))
            }
            Some(s) => s.protocol,
            None => chosen_protocol(kind, offered),
        };
        fe.set_protocol_features(protocol)
            .map_err(vhost_err(socket, "SET_PROTOCOL_FEATURES"))?;
    } else if settled.is_some_and(|s| !s.protocol.is_empty()) {
        return Err(refused(
            socket,
            "GET_FEATURES",
            "the backend no longer offers protocol features".into(),
        ));
    }
    let mut new_channel = None;
    if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
        let theirs = match channel {
            Some(theirs) => theirs,
            None => {
                let pair = UnixStream::pair().map_err(|e| {
                    refused(socket, "SET_BACKEND_REQ_FD", format!("socketpair: {e}"))
                })?;
                &new_channel.insert(pair).1
            }
        };
        fe.set_backend_request_fd(theirs)
            .map_err(vhost_err(socket, "SET_BACKEND_REQ_FD"))?;
    }
    let queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
        fe.get_queue_num()
            .map_err(vhost_err(socket, "GET_QUEUE_NUM"))? as usize
    } else {
        match kind {
            Kind::Block => 1,
            Kind::Net => 2,
        }
    };
    if queues == 0 || queues > 64 {
        return Err(refused(
            socket,
            "GET_QUEUE_NUM",
            format!("unusable queue count {queues}"),
        ));
    }
    if let Some(s) = settled.filter(|s| queues < s.queues) {
        return Err(refused(
            socket,
            "GET_QUEUE_NUM",
            format!("{queues} queues, the device uses {}", s.queues),
        ));
    }
    let config = backend_config(&mut fe, kind, protocol, socket)?;
    Ok(Session {
        fe,
        backend_features,
        protocol,
        queues,
        config,
        new_channel,
    })
}

/// The backend's config space (GET_CONFIG), or zeros without the CONFIG
/// protocol feature.
pub fn backend_config(
    fe: &mut Frontend,
    kind: Kind,
    protocol: VhostUserProtocolFeatures,
    socket: &Path,
) -> Result<Vec<u8>> {
    let len = kind.config_len();
    if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
        return Ok(vec![0; len as usize]);
    }
    let (_, data) = fe
        .get_config(
            0,
            len,
            VhostUserConfigFlags::WRITABLE,
            &vec![0; len as usize],
        )
        .map_err(vhost_err(socket, "GET_CONFIG"))?;
    if data.len() != len as usize {
        return Err(refused(
            socket,
            "GET_CONFIG",
            format!("{} bytes of config space, expected {len}", data.len()),
        ));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflight_only_for_disks_and_the_channel_only_with_config() {
        type P = VhostUserProtocolFeatures;
        let all = P::MQ | P::CONFIG | P::REPLY_ACK | P::BACKEND_REQ | P::INFLIGHT_SHMFD;
        assert_eq!(chosen_protocol(Kind::Block, all), all);
        assert_eq!(chosen_protocol(Kind::Net, all), all - P::INFLIGHT_SHMFD);
        assert_eq!(
            chosen_protocol(Kind::Block, P::BACKEND_REQ | P::MQ | P::LOG_SHMFD),
            P::MQ
        );
        // VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD is bit 12.
        assert_eq!(P::INFLIGHT_SHMFD.bits(), 1 << 12);
    }
}
