//! The queue side: taking request chains from the virtqueue, handling
//! the ring's completions, retrying parked requests, and notifying the
//! driver of used entries.

use std::sync::Arc;

use log::debug;
use rimg_vhost_server::avail::{self, AvailError};
use rimg_vhost_server::used::signal_used;
use vhost_user_backend::VringT;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestAddressSpace;

use super::{Mem, Vring, Worker};

/// The next request chain of `q`, or why the ring cannot be read: an
/// available index more than the queue size ahead of the device, or
/// unreadable. (Unlike `pop_descriptor_chain`, which logs such errors
/// itself, on every call.)
fn next_chain(
    q: &mut virtio_queue::Queue,
    mem: &Arc<Mem>,
) -> Result<Option<DescriptorChain<Arc<Mem>>>, virtio_queue::Error> {
    Ok(q.iter(mem.clone())?.next())
}

impl Worker {
    /// Handles a kick: takes every available request from the queue,
    /// then polls for more (`--poll-us`).
    pub fn handle_kick(&mut self, vring: &Vring) {
        let _awake = self.cfg.poll.wake();
        // The framework kicks a ring once when it starts (a new
        // connection, or after stop): the inflight region is read then.
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
            self.resubmit(vring);
        }
        self.take_requests(vring);
        self.poll(vring);
    }

    /// Takes every available request from the queue and issues it.
    pub(super) fn take_requests(&mut self, vring: &Vring) {
        let mut mem = self.mem.memory().into_inner();
        let (capacity, readonly) = (self.cfg.capacity(), self.cfg.readonly);
        loop {
            if self.event_idx {
                if let Err(e) = vring.get_mut().get_queue_mut().disable_notification(&*mem) {
                    self.warnings
                        .warn(format_args!("disable_notification: {e}"));
                }
            }
            let mut unreadable = None;
            while let Some(idx) = self.free.last().copied() {
                let chain = match next_chain(vring.get_mut().get_queue_mut(), &mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => {
                        self.stalled = false;
                        break;
                    }
                    Err(e) => {
                        unreadable = Some(e);
                        break;
                    }
                };
                self.stalled = false;
                self.free.pop();
                let slot = &mut self.slots[idx];
                slot.busy = true;
                slot.started = Some(std::time::Instant::now());
                let mut r = slot.req.parse(chain, &*mem, capacity, readonly);
                if r.is_err() {
                    // The frontend may have added memory (ADD_MEM_REG,
                    // SET_MEM_TABLE) and then published this request after
                    // `mem` was loaded: before refusing the request, take
                    // it again against the current map.
                    let fresh = self.mem.memory().into_inner();
                    if !Arc::ptr_eq(&fresh, &mem) {
                        mem = fresh;
                        let mut g = vring.get_mut();
                        let q = g.get_queue_mut();
                        let next = q.next_avail();
                        q.set_next_avail(next.wrapping_sub(1));
                        match next_chain(q, &mem) {
                            Ok(Some(chain)) => {
                                debug!("request taken again with the current memory map");
                                r = slot.req.parse(chain, &*mem, capacity, readonly);
                            }
                            // The ring cannot be read now: the first
                            // answer stands, the entry stays consumed.
                            _ => q.set_next_avail(next),
                        }
                    }
                }
                slot.mem = Some(mem.clone());
                // Marked before it starts (see "Inflight tracking").
                if let Some(log) = &mut self.log {
                    log.take(slot.req.head);
                }
                self.start(idx, r);
            }
            if let Some(e) = unreadable {
                self.ring_unreadable(vring, &mem, e);
                break;
            }
            if !self.event_idx || self.free.is_empty() {
                break;
            }
            match vring.get_mut().get_queue_mut().enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.warnings.warn(format_args!("enable_notification: {e}"));
                    break;
                }
            }
        }
        self.ring.submit();
        // What the kernel completed during the submission (reads from the
        // page cache) is answered now, not after the completion eventfd's
        // round through epoll (which then finds nothing left to reap).
        self.reap();
        self.signal();
    }

    /// The driver's available ring cannot be read: its index is more than
    /// the queue size ahead of the device (virtio-queue refuses to walk
    /// it), or it lies outside guest memory. Nothing is taken from the
    /// queue until the driver repairs it; kicks meanwhile are ignored
    /// quietly (one warning per episode, within the worker's budget).
    /// With EVENT_IDX, notifications stay on so the repair is kicked.
    fn ring_unreadable(&mut self, vring: &Vring, mem: &Mem, e: virtio_queue::Error) {
        if !self.stalled {
            self.stalled = true;
            // Why, from the avail index (virtio-queue's error does not say
            // how far ahead it is); other refusals as they came.
            let why = match e {
                virtio_queue::Error::InvalidAvailRingIndex => {
                    avail::available(vring.get_ref().get_queue(), mem).err()
                }
                _ => None,
            };
            let why = why.unwrap_or(AvailError::Unreadable(e));
            self.warnings.warn(format_args!(
                "{why}: ignoring the queue until the driver repairs it"
            ));
        }
        if self.event_idx {
            let _ = vring.get_mut().get_queue_mut().enable_notification(mem);
        }
    }

    /// Handles the ring's completion eventfd.
    pub fn handle_completions(&mut self) {
        let _awake = self.cfg.poll.wake();
        let _ = self.efd.read();
        self.completions();
        // A kick that found no free slot left requests in the ring.
        if let Some(v) = self.vring.clone() {
            if !self.free.is_empty() {
                self.take_requests(&v);
            }
            self.poll(&v);
        }
    }

    /// Reaps the ring, retries parked requests, answers.
    pub(super) fn completions(&mut self) {
        self.reap();
        self.run_parked();
        self.ring.submit();
        self.signal();
    }

    /// Whether the driver made requests available that are not taken.
    pub(super) fn avail_pending(&self, vring: &Vring) -> bool {
        let mem = self.mem.memory();
        avail::available(vring.get_ref().get_queue(), &*mem).is_ok_and(|n| n > 0)
    }

    /// Retries parked writes (their blocker may be gone; one that is
    /// refused again is parked again, with the waker registered anew).
    pub(super) fn run_parked(&mut self) {
        for _ in 0..self.parked.len() {
            let Some(idx) = self.parked.pop_front() else {
                break;
            };
            self.retry(idx);
        }
    }

    pub(super) fn signal(&mut self) {
        if !self.need_signal {
            return;
        }
        self.need_signal = false;
        let Some(v) = &self.vring else { return };
        signal_used(v, &self.mem.memory());
    }
}
