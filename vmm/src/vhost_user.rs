//! The vhost-user frontend side of one device: connects to a backend
//! (rimg-vhost-blk, rimg-vhost-net, qemu-storage-daemon, ...), learns its
//! features, queues and config space, and hands it the rings when the
//! guest driver starts the device. Data never passes through the VMM.
//! A backend offering BACKEND_REQ also gets a request channel, on which
//! it announces configuration changes (backend_req.rs).
//!
//! The handshake of a connection is handshake.rs; starting the rings,
//! at DRIVER_OK and again for a backend that came back, replay.rs.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::virtio_blk_config;
use virtio_bindings::virtio_config::{VIRTIO_F_ANY_LAYOUT, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_NET};
use virtio_bindings::virtio_net::{
    virtio_net_config, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MQ,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::error::{Error, Result};
use crate::handshake::{backend_config, handshake, Settled};

/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit, never shown to the
/// guest.
pub(crate) const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
const fn bit(b: u32) -> u64 {
    1 << b
}
/// Transport bits the VMM passes through: INDIRECT_DESC, EVENT_IDX,
/// VERSION_1 (and ANY_LAYOUT). Packed rings, IOMMU and notification data
/// are not offered: this transport does not implement them.
const TRANSPORT_BITS: u64 = bit(VIRTIO_F_ANY_LAYOUT)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | VERSION_1;
/// Device-specific feature bits 0 to 23 (virtio 1.2, 6 "Reserved Feature
/// Bits": 24 to 41 are the transport's) pass through.
const DEVICE_BITS: u64 = bit(DEVICE_FEATURES_END) - 1;
/// The first feature bit past the device-specific ones (virtio 1.2, 6;
/// virtio-bindings only knows Linux's VIRTIO_TRANSPORT_F_START, 28).
const DEVICE_FEATURES_END: u32 = 24;
pub(crate) const VERSION_1: u64 = bit(VIRTIO_F_VERSION_1);
/// The control virtqueue, run by the VMM.
pub const NET_F_CTRL_VQ: u64 = bit(VIRTIO_NET_F_CTRL_VQ);
/// Several queue pairs, chosen with VQ_PAIRS_SET on the control queue.
pub const NET_F_MQ: u64 = bit(VIRTIO_NET_F_MQ);
/// virtio-net bits that need the control queue (virtio 1.2, 5.1.3.1).
/// Masked from what the backend offers; CTRL_VQ and MQ come back when
/// multiqueue is usable.
const NET_CTRL_BITS: u64 = bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
    | NET_F_CTRL_VQ
    | bit(VIRTIO_NET_F_CTRL_RX)
    | bit(VIRTIO_NET_F_CTRL_VLAN)
    | bit(VIRTIO_NET_F_GUEST_ANNOUNCE)
    | NET_F_MQ
    | bit(VIRTIO_NET_F_CTRL_MAC_ADDR);
/// Offset of `max_virtqueue_pairs` (le16) in struct virtio_net_config.
const NET_CONFIG_MAX_PAIRS: usize = std::mem::offset_of!(virtio_net_config, max_virtqueue_pairs);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Block,
    Net,
}

impl Kind {
    pub fn device_id(self) -> u32 {
        match self {
            Kind::Block => VIRTIO_ID_BLOCK,
            Kind::Net => VIRTIO_ID_NET,
        }
    }

    /// Config space size asked from the backend.
    pub(crate) fn config_len(self) -> u32 {
        let len = match self {
            // struct virtio_blk_config up to write_zeroes_may_unmap and
            // its padding.
            Kind::Block => std::mem::offset_of!(virtio_blk_config, max_secure_erase_sectors),
            // mac, status, max_virtqueue_pairs, mtu.
            Kind::Net => std::mem::offset_of!(virtio_net_config, speed),
        };
        len as u32
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Block => "disk",
            Kind::Net => "net",
        }
    }
}

/// One ring as the guest driver set it up.
#[derive(Debug, Clone, Copy, Default)]
pub struct RingAddrs {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The VMM's one handle on a backend's vhost-user connection. Every
/// message goes through `&mut self` and the `Backend` is owned by its
/// device, which lives in a `Mutex` (`vmm.rs`, `Bus::devices`): the vCPU
/// threads (register writes that start, reset or reconfigure the device),
/// the request-channel thread (a configuration change's GET_CONFIG) and
/// the reconnecting watcher (reconnect.rs) all hold that lock for a whole
/// exchange, so neither messages nor multi-message sequences such as
/// [`Self::apply`] interleave on the socket.
pub struct Backend {
    pub kind: Kind,
    pub socket: PathBuf,
    pub(crate) fe: Frontend,
    /// What the first backend offered; a returning one must offer what
    /// the VMM relies on of it (`settled`).
    pub(crate) backend_features: u64,
    pub(crate) protocol: VhostUserProtocolFeatures,
    /// Features offered to the guest.
    pub features: u64,
    /// Queues the backend serves (for a multiqueue NIC: 2 * max pairs).
    pub queues: usize,
    /// A multiqueue NIC's number of queue pairs (> 1): the device then
    /// has one more queue, the control queue, which the VMM runs.
    pub max_pairs: Option<u16>,
    /// The config space the guest reads: the backend's, with the VMM's
    /// own values applied (`max_virtqueue_pairs`, a `--net mac=`).
    pub config: Vec<u8>,
    /// A MAC address given on the command line, which replaces the
    /// backend's.
    mac: Option<[u8; 6]>,
    /// The VMM's end of the backend request channel, until
    /// [`Self::take_request_channel`].
    requests: Option<UnixStream>,
    /// The backend's end of the request channel, kept: each backend that
    /// connects gets it again (SET_BACKEND_REQ_FD), so the VMM's end never
    /// sees the end of the stream when one goes away.
    pub(crate) channel: Option<UnixStream>,
    /// The inflight region (INFLIGHT_SHMFD) a backend created for this
    /// device, given to every backend that starts the rings until the
    /// driver resets the device (replay.rs).
    pub(crate) inflight: Option<(VhostUserInflight, File)>,
}

/// A vhost crate error as the VMM's: a broken connection is
/// [`Error::BackendLost`], anything else a refusal.
pub(crate) fn vhost_err(socket: &Path, what: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    let socket = socket.to_path_buf();
    move |e| {
        let msg = e.to_string();
        if connection_lost(&e) {
            Error::BackendLost { socket, what, msg }
        } else {
            Error::Vhost { socket, what, msg }
        }
    }
}

fn connection_lost(e: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as U;
    let io_lost = |e: &std::io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
        )
    };
    match e {
        vhost::Error::VhostUserProtocol(
            U::Disconnected | U::PartialMessage | U::SocketBroken(_),
        ) => true,
        vhost::Error::VhostUserProtocol(U::SocketError(e)) | vhost::Error::IOError(e) => io_lost(e),
        _ => false,
    }
}

impl Backend {
    /// Connects and negotiates what can be negotiated before the guest
    /// runs. `extra` are device feature bits the VMM adds (e.g. RO, MAC).
    pub fn connect(kind: Kind, socket: &Path, extra: u64) -> Result<Backend> {
        if !socket.exists() {
            return Err(Error::Vhost {
                socket: socket.into(),
                what: "connect",
                msg: "no such socket (is the backend running?)".into(),
            });
        }
        // Not `Frontend::connect`, which retries with thread::sleep: the
        // reconnecting watcher connects the same way, under the seccomp
        // filter.
        let stream = UnixStream::connect(socket).map_err(|e| Error::Vhost {
            socket: socket.into(),
            what: "connect",
            msg: format!("{e} (is the {} backend listening?)", kind.name()),
        })?;
        let s = handshake(kind, socket, stream, None, None)?;
        let (requests, channel) = s.new_channel.unzip();
        let mut queues = s.queues;
        let mut features =
            (s.backend_features & (TRANSPORT_BITS | DEVICE_BITS)) | (extra & DEVICE_BITS);
        let mut max_pairs = None;
        if kind == Kind::Net {
            // The control queue is the frontend's job in vhost-user (the
            // backend serves data queues only). This VMM runs it for
            // VQ_PAIRS_SET alone (net_ctrl.rs), so the features that need
            // other commands stay hidden: CTRL_RX, CTRL_VLAN,
            // GUEST_ANNOUNCE, CTRL_MAC_ADDR, CTRL_GUEST_OFFLOADS.
            features &= !NET_CTRL_BITS;
            let pairs = net_max_pairs(s.backend_features, s.protocol, queues, &s.config);
            if pairs > 1 {
                // Multiqueue: CTRL_VQ + MQ, 2 * pairs data queues, and
                // max_virtqueue_pairs as the VMM will honour it (never more
                // pairs than the backend has queues for).
                features |= NET_F_CTRL_VQ | NET_F_MQ;
                queues = 2 * usize::from(pairs);
                max_pairs = Some(pairs);
            }
        }
        let mut b = Backend {
            kind,
            socket: socket.into(),
            fe: s.fe,
            backend_features: s.backend_features,
            protocol: s.protocol,
            features,
            queues,
            max_pairs,
            config: Vec::new(),
            mac: None,
            requests,
            channel,
            inflight: None,
        };
        b.config = b.device_config(s.config);
        Ok(b)
    }

    /// Whether the backend keeps an inflight region (INFLIGHT_SHMFD).
    pub fn tracks_inflight(&self) -> bool {
        self.protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    /// What this connection settled, for the handshake with a backend
    /// that replaces it.
    pub(crate) fn settled(&self) -> Settled {
        Settled {
            features: self.backend_features & (self.features | PROTOCOL_FEATURES),
            protocol: self.protocol,
            queues: self.queues,
        }
    }

    /// The backend's config space as the guest sees it: with the number
    /// of queue pairs the VMM honours and the command line's MAC.
    pub(crate) fn device_config(&self, mut config: Vec<u8>) -> Vec<u8> {
        if let Some(pairs) = self.max_pairs {
            config[NET_CONFIG_MAX_PAIRS..NET_CONFIG_MAX_PAIRS + 2]
                .copy_from_slice(&pairs.to_le_bytes());
        }
        if let Some(mac) = self.mac {
            config[..6].copy_from_slice(&mac);
        }
        config
    }

    /// A NIC's MAC address from the command line, in place of the
    /// backend's (now and after every configuration change).
    pub fn set_mac(&mut self, mac: [u8; 6]) {
        self.mac = Some(mac);
        let config = std::mem::take(&mut self.config);
        self.config = self.device_config(config);
    }

    /// The VMM's end of the backend request channel, if BACKEND_REQ was
    /// negotiated (once: whoever takes it serves it).
    pub fn take_request_channel(&mut self) -> Option<UnixStream> {
        self.requests.take()
    }

    /// Fetches the config space again (GET_CONFIG), after the backend
    /// announced a change; the VMM's own values stay applied.
    pub fn refresh_config(&mut self) -> Result<()> {
        let raw = backend_config(&mut self.fe, self.kind, self.protocol, &self.socket)?;
        self.config = self.device_config(raw);
        Ok(())
    }

    /// Queues the guest sees: the backend's, plus a multiqueue NIC's
    /// control queue (the last one, index 2 * max pairs).
    pub fn device_queues(&self) -> usize {
        self.queues + usize::from(self.max_pairs.is_some())
    }

    pub fn raw_fd(&self) -> i32 {
        self.fe.as_raw_fd()
    }

    /// Enables or disables rings that `apply` set up
    /// (SET_VRING_ENABLE). Without PROTOCOL_FEATURES rings run as soon as
    /// they have a kick fd and cannot be disabled: nothing to send.
    pub fn set_rings_enabled(&mut self, rings: &[usize], enable: bool) -> Result<()> {
        if self.backend_features & PROTOCOL_FEATURES == 0 {
            return Ok(());
        }
        for &i in rings {
            self.fe
                .set_vring_enable(i, enable)
                .map_err(vhost_err(&self.socket, "SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Stops the rings (device reset by the driver).
    pub fn stop(&mut self, rings: &[usize]) -> Result<()> {
        let s = self.socket.clone();
        for &i in rings {
            if self.backend_features & PROTOCOL_FEATURES != 0 {
                self.fe
                    .set_vring_enable(i, false)
                    .map_err(vhost_err(&s, "SET_VRING_ENABLE"))?;
            }
            self.fe
                .get_vring_base(i)
                .map_err(vhost_err(&s, "GET_VRING_BASE"))?;
        }
        Ok(())
    }
}

/// Queue pairs a vhost-user-net backend can run under this VMM: its
/// config space's `max_virtqueue_pairs` when it offers VIRTIO_NET_F_MQ,
/// capped by the queues it reported (GET_QUEUE_NUM, protocol MQ) and by
/// what the virtio-mmio device can number (`MAX_PAIRS`); 1 otherwise.
fn net_max_pairs(
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    queues: usize,
    config: &[u8],
) -> u16 {
    if backend_features & NET_F_MQ == 0
        || !protocol.contains(VhostUserProtocolFeatures::MQ)
        || !protocol.contains(VhostUserProtocolFeatures::CONFIG)
    {
        return 1;
    }
    let Some(b) = config.get(NET_CONFIG_MAX_PAIRS..NET_CONFIG_MAX_PAIRS + 2) else {
        return 1;
    };
    let offered = u16::from_le_bytes([b[0], b[1]]);
    let by_queues = u16::try_from(queues / 2).unwrap_or(u16::MAX);
    offered.min(by_queues).clamp(1, MAX_PAIRS)
}

/// Most queue pairs a NIC gets: 2 * 31 data queues and the control queue
/// stay within the 64 queues the VMM accepts from a backend.
const MAX_PAIRS: u16 = 31;

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: u16) -> Vec<u8> {
        let mut c = vec![0u8; 12];
        c[8..10].copy_from_slice(&pairs.to_le_bytes());
        c
    }

    #[test]
    fn feature_masks_are_the_spec_bits() {
        // virtio 1.2: ANY_LAYOUT 27, INDIRECT_DESC 28, EVENT_IDX 29,
        // VERSION_1 32; vhost-user: PROTOCOL_FEATURES 30; virtio-net
        // 5.1.3: the control-queue bits 2, 17, 18, 19, 21, 22, 23.
        assert_eq!(TRANSPORT_BITS, 0x1_3800_0000);
        assert_eq!(PROTOCOL_FEATURES, 0x4000_0000);
        assert_eq!(DEVICE_BITS, 0xff_ffff);
        assert_eq!(NET_CTRL_BITS, 0xee_0004);
    }

    #[test]
    fn ids_and_config_layout_are_the_spec_values() {
        // virtio 1.2, 5 "Device Types": net 1, block 2; the config spaces
        // asked for (5.1.4, 5.2.4) and max_virtqueue_pairs in net's.
        assert_eq!((Kind::Net.device_id(), Kind::Block.device_id()), (1, 2));
        assert_eq!((Kind::Net.config_len(), Kind::Block.config_len()), (12, 60));
        assert_eq!(NET_CONFIG_MAX_PAIRS, 8);
    }

    #[test]
    fn max_pairs_needs_mq_everywhere() {
        let p = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG;
        assert_eq!(net_max_pairs(NET_F_MQ, p, 4, &cfg(2)), 2);
        // Fewer queues than the config claims: the queues win.
        assert_eq!(net_max_pairs(NET_F_MQ, p, 4, &cfg(8)), 2);
        assert_eq!(net_max_pairs(NET_F_MQ, p, 5, &cfg(8)), 2);
        assert_eq!(net_max_pairs(NET_F_MQ, p, 64, &cfg(100)), MAX_PAIRS);
        // No MQ feature, no protocol MQ or CONFIG, short or zero config.
        assert_eq!(net_max_pairs(0, p, 4, &cfg(2)), 1);
        assert_eq!(
            net_max_pairs(NET_F_MQ, VhostUserProtocolFeatures::CONFIG, 4, &cfg(2)),
            1
        );
        assert_eq!(
            net_max_pairs(NET_F_MQ, VhostUserProtocolFeatures::MQ, 4, &cfg(2)),
            1
        );
        assert_eq!(net_max_pairs(NET_F_MQ, p, 4, &[0; 9]), 1);
        assert_eq!(net_max_pairs(NET_F_MQ, p, 4, &cfg(0)), 1);
    }
}
