//! The vhost-user frontend side of one device: connects to a backend
//! (rimg-vhost-blk, rimg-vhost-net, qemu-storage-daemon, ...), learns its
//! features, queues and config space, and hands it the rings when the
//! guest driver starts the device. Data never passes through the VMM.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::memory::Region;

/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit, never shown to the
/// guest.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Transport bits the VMM passes through: INDIRECT_DESC, EVENT_IDX,
/// VERSION_1 (and ANY_LAYOUT). Packed rings, IOMMU and notification data
/// are not offered: this transport does not implement them.
const TRANSPORT_BITS: u64 = (1 << 27) | (1 << 28) | (1 << 29) | (1 << 32);
/// Device-specific feature bits 0..24 pass through.
const DEVICE_BITS: u64 = (1 << 24) - 1;
const VERSION_1: u64 = 1 << 32;
/// virtio-net bits 17, 18, 19, 21, 22, 23.
const NET_CTRL_BITS: u64 = (1 << 17) | (1 << 18) | (1 << 19) | (1 << 21) | (1 << 22) | (1 << 23);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Block,
    Net,
}

impl Kind {
    pub fn device_id(self) -> u32 {
        match self {
            Kind::Block => 2,
            Kind::Net => 1,
        }
    }

    /// Config space size asked from the backend.
    fn config_len(self) -> u32 {
        match self {
            // struct virtio_blk_config up to write_zeroes_may_unmap.
            Kind::Block => 60,
            // mac, status, max_virtqueue_pairs, mtu.
            Kind::Net => 12,
        }
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

pub struct Backend {
    pub kind: Kind,
    pub socket: PathBuf,
    fe: Frontend,
    backend_features: u64,
    /// Features offered to the guest.
    pub features: u64,
    pub queues: usize,
    pub config: Vec<u8>,
}

fn vhost_err(socket: &Path, what: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    let socket = socket.to_path_buf();
    move |e| Error::Vhost {
        socket,
        what,
        msg: e.to_string(),
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
        let fe = Frontend::connect(socket, 1).map_err(|e| Error::Vhost {
            socket: socket.into(),
            what: "connect",
            msg: format!("{e} (is the {} backend listening?)", kind.name()),
        })?;
        fe.set_owner().map_err(vhost_err(socket, "SET_OWNER"))?;
        let backend_features = fe
            .get_features()
            .map_err(vhost_err(socket, "GET_FEATURES"))?;
        if backend_features & VERSION_1 == 0 {
            return Err(Error::Vhost {
                socket: socket.into(),
                what: "GET_FEATURES",
                msg: "backend does not offer VIRTIO_F_VERSION_1".into(),
            });
        }
        let mut fe = fe;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if backend_features & PROTOCOL_FEATURES != 0 {
            let offered = fe
                .get_protocol_features()
                .map_err(vhost_err(socket, "GET_PROTOCOL_FEATURES"))?;
            protocol = offered
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK);
            fe.set_protocol_features(protocol)
                .map_err(vhost_err(socket, "SET_PROTOCOL_FEATURES"))?;
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
            return Err(Error::Vhost {
                socket: socket.into(),
                what: "GET_QUEUE_NUM",
                msg: format!("unusable queue count {queues}"),
            });
        }
        let config = if protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let len = kind.config_len();
            let (_, data) = fe
                .get_config(
                    0,
                    len,
                    VhostUserConfigFlags::WRITABLE,
                    &vec![0; len as usize],
                )
                .map_err(vhost_err(socket, "GET_CONFIG"))?;
            data
        } else {
            vec![0; kind.config_len() as usize]
        };
        let mut features =
            (backend_features & (TRANSPORT_BITS | DEVICE_BITS)) | (extra & DEVICE_BITS);
        if kind == Kind::Net {
            // The control queue is the frontend's job in vhost-user (the
            // backend serves data queues only) and this VMM does not
            // implement one: no CTRL_VQ, and so none of the features that
            // need it (CTRL_RX, CTRL_VLAN, GUEST_ANNOUNCE, MQ,
            // CTRL_MAC_ADDR). One queue pair.
            features &= !NET_CTRL_BITS;
        }
        Ok(Backend {
            kind,
            socket: socket.into(),
            fe,
            backend_features,
            features,
            queues,
            config,
        })
    }

    pub fn raw_fd(&self) -> i32 {
        self.fe.as_raw_fd()
    }

    /// Starts the device: the features the driver accepted, the memory
    /// table and each ready ring with its kick (ioeventfd) and call
    /// (irqfd) descriptors, in the order QEMU uses.
    pub fn start(
        &mut self,
        driver_features: u64,
        regions: &[Region],
        memfd: i32,
        rings: &[(usize, RingAddrs)],
        kicks: &[EventFd],
        call: &EventFd,
    ) -> Result<()> {
        let s = self.socket.clone();
        let s = s.as_path();
        let acked = (driver_features & self.features) | (self.backend_features & PROTOCOL_FEATURES);
        self.fe
            .set_features(acked)
            .map_err(vhost_err(s, "SET_FEATURES"))?;
        let table: Vec<VhostUserMemoryRegionInfo> = regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.guest,
                memory_size: r.size,
                userspace_addr: r.host,
                mmap_offset: r.offset,
                mmap_handle: memfd,
            })
            .collect();
        self.fe
            .set_mem_table(&table)
            .map_err(vhost_err(s, "SET_MEM_TABLE"))?;
        let host = |gpa: u64| -> Result<u64> {
            regions
                .iter()
                .find(|r| gpa >= r.guest && gpa < r.guest + r.size)
                .map(|r| r.host + (gpa - r.guest))
                .ok_or_else(|| Error::Vhost {
                    socket: s.into(),
                    what: "SET_VRING_ADDR",
                    msg: format!("ring address {gpa:#x} is outside guest memory"),
                })
        };
        for &(i, r) in rings {
            self.fe
                .set_vring_num(i, r.size)
                .map_err(vhost_err(s, "SET_VRING_NUM"))?;
            self.fe
                .set_vring_addr(
                    i,
                    &VringConfigData {
                        queue_max_size: r.size,
                        queue_size: r.size,
                        flags: 0,
                        desc_table_addr: host(r.desc)?,
                        used_ring_addr: host(r.used)?,
                        avail_ring_addr: host(r.avail)?,
                        log_addr: None,
                    },
                )
                .map_err(vhost_err(s, "SET_VRING_ADDR"))?;
            self.fe
                .set_vring_base(i, 0)
                .map_err(vhost_err(s, "SET_VRING_BASE"))?;
            self.fe
                .set_vring_call(i, call)
                .map_err(vhost_err(s, "SET_VRING_CALL"))?;
            self.fe
                .set_vring_kick(i, &kicks[i])
                .map_err(vhost_err(s, "SET_VRING_KICK"))?;
        }
        if self.backend_features & PROTOCOL_FEATURES != 0 {
            for &(i, _) in rings {
                self.fe
                    .set_vring_enable(i, true)
                    .map_err(vhost_err(s, "SET_VRING_ENABLE"))?;
            }
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
