//! The device's identity: offered features and the virtio-net config
//! space (virtio 1.2, section 5.1.4).

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl std::str::FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Mac, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("'{s}' is not a MAC address (aa:bb:cc:dd:ee:ff)"));
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            m[i] = u8::from_str_radix(p, 16)
                .ok()
                .filter(|_| p.len() == 2)
                .ok_or_else(|| format!("'{s}' is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
        }
        if m[0] & 1 != 0 {
            return Err(format!("{s} is a multicast address"));
        }
        Ok(Mac(m))
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Mac {
    /// A locally administered address in QEMU's 52:54:00 range, the last
    /// bytes from the process id and clock (unique enough on one host).
    pub fn random() -> Mac {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let x = t ^ std::process::id().rotate_left(13);
        Mac([0x52, 0x54, 0x00, (x >> 16) as u8, (x >> 8) as u8, x as u8])
    }
}

/// What a connection's device looks like to the guest.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub mac: Mac,
    pub queue_pairs: u16,
    pub queue_size: u16,
    pub mtu: Option<u16>,
}

/// Length of the config space we expose: mac, status, max_virtqueue_pairs,
/// mtu.
pub const CONFIG_LEN: usize = 12;

const fn bit(b: u32) -> u64 {
    1u64 << b
}

impl NetConfig {
    /// Offered feature bits. The control queue is the frontend's (QEMU and
    /// DPDK's virtio-user handle it and turn VQ_PAIRS_SET into
    /// SET_VRING_ENABLE), so the backend's queues are the data pairs only.
    pub fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN)
            | bit(VIRTIO_NET_F_GUEST_UFO)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_ECN)
            | bit(VIRTIO_NET_F_HOST_UFO)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_CTRL_VQ)
            | bit(VIRTIO_NET_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.mtu.is_some() {
            f |= bit(VIRTIO_NET_F_MTU);
        }
        f
    }

    /// The config space: mac, status (link up), max_virtqueue_pairs, mtu.
    pub fn encode(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac.0);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&self.queue_pairs.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.unwrap_or(1500).to_le_bytes());
        c
    }
}

/// What the guest accepted, as the data path needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// Length of the guest's virtio_net_hdr: 12 with VERSION_1 or
    /// MRG_RXBUF (it has num_buffers), 10 for legacy drivers without.
    pub hdr_len: usize,
    pub mrg_rxbuf: bool,
    /// TUNSETOFFLOAD flags matching the guest's receive offloads.
    pub tap_offloads: u32,
}

impl Negotiated {
    pub fn from_features(acked: u64) -> Negotiated {
        let has = |b: u32| acked & bit(b) != 0;
        let mrg = has(VIRTIO_NET_F_MRG_RXBUF);
        let hdr_len = if has(VIRTIO_F_VERSION_1) || mrg {
            12
        } else {
            10
        };
        // GUEST_* say what the guest can receive, so they decide what the
        // TAP may hand us. TSO and UFO frames need partial checksums.
        let mut off = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            off |= libc::TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                off |= libc::TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                off |= libc::TUN_F_TSO6;
            }
            if has(VIRTIO_NET_F_GUEST_ECN)
                && (has(VIRTIO_NET_F_GUEST_TSO4) || has(VIRTIO_NET_F_GUEST_TSO6))
            {
                off |= libc::TUN_F_TSO_ECN;
            }
            if has(VIRTIO_NET_F_GUEST_UFO) {
                off |= libc::TUN_F_UFO;
            }
        }
        Negotiated {
            hdr_len,
            mrg_rxbuf: mrg,
            tap_offloads: off,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parse_and_print() {
        let m: Mac = "52:54:00:12:ab:ff".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:12:ab:ff");
        assert!("52:54:00:12:ab".parse::<Mac>().is_err());
        assert!("01:00:00:00:00:00".parse::<Mac>().is_err());
        assert!("52:54:00:12:ab:zz".parse::<Mac>().is_err());
        assert!("52:54:00:12:ab:1".parse::<Mac>().is_err());
    }

    #[test]
    fn offloads_follow_guest_features() {
        let all = NetConfig {
            mac: Mac::random(),
            queue_pairs: 1,
            queue_size: 256,
            mtu: None,
        }
        .features();
        let n = Negotiated::from_features(all);
        assert_eq!(n.hdr_len, 12);
        assert!(n.mrg_rxbuf);
        assert_eq!(
            n.tap_offloads,
            libc::TUN_F_CSUM
                | libc::TUN_F_TSO4
                | libc::TUN_F_TSO6
                | libc::TUN_F_TSO_ECN
                | libc::TUN_F_UFO
        );
        // TSO without checksum offload is not allowed on a TAP.
        let n = Negotiated::from_features(bit(VIRTIO_NET_F_GUEST_TSO4));
        assert_eq!(n.tap_offloads, 0);
        assert_eq!(n.hdr_len, 10);
    }

    #[test]
    fn config_space_layout() {
        let c = NetConfig {
            mac: "52:54:00:01:02:03".parse().unwrap(),
            queue_pairs: 2,
            queue_size: 256,
            mtu: Some(9000),
        };
        let e = c.encode();
        assert_eq!(&e[..6], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(u16::from_le_bytes([e[6], e[7]]), 1);
        assert_eq!(u16::from_le_bytes([e[8], e[9]]), 2);
        assert_eq!(u16::from_le_bytes([e[10], e[11]]), 9000);
        assert!(c.features() & bit(VIRTIO_NET_F_MTU) != 0);
    }
}
