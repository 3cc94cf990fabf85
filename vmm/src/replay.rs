//! Giving a backend the device as the driver set it up: at DRIVER_OK,
//! and again, through the same [`Backend::apply`], to a backend that
//! came back after the previous one went away (reconnect.rs). The VMM
//! keeps everything the backend needs: the acked features, the memory
//! table, the started rings and their eventfds (the same kick ioeventfds
//! and call irqfd stay registered with KVM, so the guest's notifications
//! wait in their counters during the outage), which rings are enabled,
//! and the inflight region.
//!
//! The order is QEMU's (hw/virtio/vhost.c, hw/block/vhost-user-blk.c):
//! SET_FEATURES, GET_INFLIGHT_FD (once per device reset) and
//! SET_INFLIGHT_FD, SET_MEM_TABLE, then per ring NUM, ADDR, BASE, CALL,
//! KICK, then SET_VRING_ENABLE.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::handshake::handshake;
use crate::memory::{Mem, Region};
use crate::mmio::QUEUE_MAX;
use crate::vhost_user::{vhost_err, Backend, RingAddrs, NET_F_CTRL_VQ, PROTOCOL_FEATURES};

/// Where the backend takes up the rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// A fresh start: index 0.
    Zero,
    /// After a reconnect: the guest's used index, as QEMU's
    /// `virtio_queue_restore_last_avail_idx` does when the old backend
    /// cannot say where it stopped. Every request taken and not returned
    /// sits between it and the avail index; a backend with an inflight
    /// region knows which of them it finished (and overrides this).
    GuestUsed,
}

/// The device as the driver set it up, all a backend needs to run it.
pub struct Desired<'a> {
    pub driver_features: u64,
    pub regions: &'a [Region],
    pub memfd: i32,
    /// Guest RAM, for the rings' used indexes.
    pub mem: &'a Mem,
    /// The started rings (index, addresses).
    pub rings: &'a [(usize, RingAddrs)],
    /// Of those, the ones enabled.
    pub enabled: &'a [usize],
    pub kicks: &'a [EventFd],
    pub call: &'a EventFd,
    pub base: Base,
}

impl Backend {
    /// Starts the device on the current connection: the features the
    /// driver accepted, the inflight region, the memory table and each
    /// started ring with its kick (ioeventfd) and call (irqfd)
    /// descriptors, then enables the rings in `d.enabled`.
    pub fn apply(&mut self, d: &Desired) -> Result<()> {
        let s = self.socket.clone();
        let s = s.as_path();
        // Only what the backend itself offered: CTRL_VQ belongs to the VMM
        // (the backend never sees the control queue), and bits the VMM adds
        // (MAC, RO) are the VMM's promise, not the backend's.
        let acked = (d.driver_features & self.features & self.backend_features & !NET_F_CTRL_VQ)
            | (self.backend_features & PROTOCOL_FEATURES);
        self.fe
            .set_features(acked)
            .map_err(vhost_err(s, "SET_FEATURES"))?;
        self.set_inflight()?;
        let table: Vec<VhostUserMemoryRegionInfo> = d
            .regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.guest,
                memory_size: r.size,
                userspace_addr: r.host,
                mmap_offset: r.offset,
                mmap_handle: d.memfd,
            })
            .collect();
        self.fe
            .set_mem_table(&table)
            .map_err(vhost_err(s, "SET_MEM_TABLE"))?;
        let host = |gpa: u64| -> Result<u64> {
            d.regions
                .iter()
                .find(|r| gpa >= r.guest && gpa < r.guest + r.size)
                .map(|r| r.host + (gpa - r.guest))
                .ok_or_else(|| Error::Vhost {
                    socket: s.into(),
                    what: "SET_VRING_ADDR",
                    msg: format!("ring address {gpa:#x} is outside guest memory"),
                })
        };
        for &(i, r) in d.rings {
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
            let base = match d.base {
                Base::Zero => 0,
                Base::GuestUsed => guest_used_idx(d.mem, &r)?,
            };
            self.fe
                .set_vring_base(i, base)
                .map_err(vhost_err(s, "SET_VRING_BASE"))?;
            self.fe
                .set_vring_call(i, d.call)
                .map_err(vhost_err(s, "SET_VRING_CALL"))?;
            self.fe
                .set_vring_kick(i, &d.kicks[i])
                .map_err(vhost_err(s, "SET_VRING_KICK"))?;
        }
        self.set_rings_enabled(d.enabled, true)
    }

    /// The inflight region for the rings about to start: asked for once
    /// (GET_INFLIGHT_FD; the backend creates it), then given to every
    /// backend that starts them (SET_INFLIGHT_FD), so a backend that
    /// replaces a dead one finds the requests that one took and did not
    /// finish. Only with INFLIGHT_SHMFD negotiated (disks).
    fn set_inflight(&mut self) -> Result<()> {
        if !self.tracks_inflight() {
            return Ok(());
        }
        let s = self.socket.clone();
        if self.inflight.is_none() {
            let want = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: self.queues as u16,
                queue_size: QUEUE_MAX,
            };
            let (got, file) = self
                .fe
                .get_inflight_fd(&want)
                .map_err(vhost_err(&s, "GET_INFLIGHT_FD"))?;
            if got.mmap_size == 0 {
                return Err(Error::Vhost {
                    socket: s,
                    what: "GET_INFLIGHT_FD",
                    msg: "the backend made no inflight region".into(),
                });
            }
            self.inflight = Some((got, file));
        }
        let (info, file) = self.inflight.as_ref().expect("made above");
        self.fe
            .set_inflight_fd(info, file.as_raw_fd())
            .map_err(vhost_err(&s, "SET_INFLIGHT_FD"))
    }

    /// Forgets the inflight region: the driver reset the device, so no
    /// request of the old rings is pending (QEMU frees it at reset too).
    pub fn drop_inflight(&mut self) {
        self.inflight = None;
    }

    /// Takes a new connection to a backend that replaces the one that
    /// went away: the handshake, checked against what the first one
    /// settled, with the same request channel. Returns whether the config
    /// space changed meanwhile. The rings are the caller's to replay
    /// ([`Self::apply`]).
    pub fn reconnect(&mut self, stream: UnixStream) -> Result<bool> {
        let settled = self.settled();
        let s = handshake(
            self.kind,
            &self.socket,
            stream,
            Some(&settled),
            self.channel.as_ref(),
        )?;
        self.fe = s.fe;
        let config = self.device_config(s.config);
        let changed = config != self.config;
        self.config = config;
        Ok(changed)
    }
}

/// A ring's used index as the guest sees it (le16 at `used + 2`).
fn guest_used_idx(mem: &Mem, r: &RingAddrs) -> Result<u16> {
    let idx: u16 = mem
        .read_obj(GuestAddress(r.used.wrapping_add(2)))
        .map_err(|e| Error::Memory(format!("used ring at {:#x}: {e}", r.used)))?;
    Ok(u16::from_le(idx))
}

#[cfg(test)]
mod tests;
