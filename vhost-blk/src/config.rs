//! The virtio-blk device: offered features and the configuration space
//! (virtio 1.2, section 5.2.4), encoded little-endian as the guest reads it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Largest data segment the device accepts, advertised as SIZE_MAX.
pub const SEG_SIZE_MAX: u32 = 1 << 20;
/// Sectors one DISCARD or WRITE_ZEROES segment may cover.
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;
/// Segments per DISCARD or WRITE_ZEROES request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Size of the configuration space we expose (up to and including
/// `write_zeroes_may_unmap` and its padding).
pub const CONFIG_LEN: usize = 60;

/// What the daemon was started with; fixed for the daemon's life but for
/// the capacity, which the control socket's `resize` grows.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Virtual disk size in bytes (rounded down to sectors for the guest).
    pub capacity: Arc<AtomicU64>,
    pub num_queues: u16,
    pub queue_size: u16,
    pub readonly: bool,
    /// GET_ID answer, at most 20 bytes.
    pub serial: Vec<u8>,
    /// Preferred I/O size hint for the guest (the cluster size of qcow2).
    pub opt_io_size: u32,
    /// Logical block size announced with BLK_SIZE.
    pub blk_size: u32,
    /// Busy polling (`--poll-us`), shared by the queues' workers.
    pub poll: Arc<crate::worker::Polling>,
}

impl DeviceConfig {
    /// The disk's size in bytes, as requests are checked against it now.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// virtio feature bits offered to the driver.
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_F_VERSION_1)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.num_queues > 1 {
            f |= 1 << VIRTIO_BLK_F_MQ;
        }
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// The configuration space with the cache mode `writeback`.
    pub fn encode(&self, writeback: bool) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &(self.capacity() >> 9).to_le_bytes());
        put(8, &SEG_SIZE_MAX.to_le_bytes());
        // Leave room for the header and status descriptors.
        put(
            12,
            &(u32::from(self.queue_size).saturating_sub(2)).to_le_bytes(),
        );
        put(20, &self.blk_size.to_le_bytes());
        // topology: physical_block_exp, alignment_offset, min_io_size
        // (in logical blocks), opt_io_size (in logical blocks).
        put(24, &[0, 0]);
        put(26, &1u16.to_le_bytes());
        put(28, &(self.opt_io_size / self.blk_size).to_le_bytes());
        put(32, &[u8::from(writeback)]);
        put(34, &self.num_queues.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &1u32.to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_DISCARD_SEG.to_le_bytes());
        put(56, &[1]);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout() {
        let d = DeviceConfig {
            capacity: Arc::new(AtomicU64::new(1 << 30)),
            num_queues: 2,
            queue_size: 128,
            readonly: false,
            serial: b"x".to_vec(),
            opt_io_size: 65536,
            blk_size: 512,
            poll: crate::worker::Polling::new(std::time::Duration::ZERO),
        };
        let c = d.encode(true);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2 << 20);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(c[28..32].try_into().unwrap()), 128);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        let f = d.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    }
}
