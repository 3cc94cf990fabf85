//! The virtio-net control virtqueue (virtio 1.2, section 5.1.6.5
//! "Control Virtqueue"), run by the VMM: vhost-user leaves it to the
//! frontend, and the backend serves the data queues only.
//!
//! The one command implemented is VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
//! (5.1.6.5.5 "Automatic receive steering in multiqueue mode"); every
//! other class or command is answered VIRTIO_NET_ERR. The guest is not
//! trusted: each chain is checked (order of readable and writable
//! descriptors, sizes, guest addresses, chains cut short by a loop or a
//! bad index) and a bad one is answered ERR when it has somewhere to put
//! the answer, or returned unused (length 0) when it has not, with a log
//! line either way. Nothing a guest writes makes this code panic or loop
//! for longer than one pass over the ring.

use rimg_vhost_server::avail::{self, AvailError};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR as ERR, VIRTIO_NET_OK as OK,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::memory::Mem;
use crate::vhost_user::RingAddrs;

/// `ack` values (5.1.6.5).
pub const VIRTIO_NET_OK: u8 = OK as u8;
pub const VIRTIO_NET_ERR: u8 = ERR as u8;
/// `class` VIRTIO_NET_CTRL_MQ and its command VQ_PAIRS_SET (5.1.6.5.5).
const CLASS_MQ: u8 = VIRTIO_NET_CTRL_MQ as u8;
const MQ_VQ_PAIRS_SET: u8 = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
/// Readable bytes kept for decoding: class, command and the largest
/// command-specific data decoded here (VQ_PAIRS_SET's le16). Longer
/// commands are still measured and their memory checked.
const PREFIX: usize = 16;
/// Log lines per control queue between resets: a guest that keeps
/// sending garbage cannot flood the VMM's stderr.
const MAX_WARNINGS: u32 = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetupError {
    #[error("queue size {0} is not a power of two up to 256")]
    Size(u16),
    #[error("ring addresses are not usable: {0}")]
    Address(String),
    #[error("rings are not inside guest memory")]
    Outside,
}

/// Why a chain could not be decoded as a command.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ChainError {
    #[error("empty chain (head index out of the table, or a bad first descriptor)")]
    Empty,
    #[error("chain cut short (a loop, a next index past the table, or an unreadable descriptor)")]
    Truncated,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("no device-writable byte for the ack")]
    NoAck,
    #[error("{0} readable bytes, less than class and command")]
    Short(u64),
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    Outside { addr: u64, len: u32 },
}

/// A decoded chain: the readable bytes (first `PREFIX` of them, and the
/// total length) and where the ack goes.
struct Command {
    prefix: [u8; PREFIX],
    len: u64,
    ack: GuestAddress,
}

impl Command {
    fn class(&self) -> u8 {
        self.prefix[0]
    }
    fn command(&self) -> u8 {
        self.prefix[1]
    }
    /// Length of the command-specific data.
    fn data_len(&self) -> u64 {
        self.len - 2
    }
}

/// One chain's outcome: the ack written (OK or ERR), or nothing written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ack(u8),
    Dropped,
}

pub struct CtrlQueue {
    queue: Queue,
    /// Queue pairs a VQ_PAIRS_SET may ask for (max_virtqueue_pairs).
    max_pairs: u16,
    /// VIRTIO_NET_F_MQ was negotiated: without it the MQ class is an
    /// error (the control queue exists for CTRL_VQ alone).
    mq: bool,
    warnings: u32,
}

impl CtrlQueue {
    /// The control queue as the driver set it up; checked against guest
    /// memory once here, as the data queues are by their backend.
    pub fn new(
        ring: RingAddrs,
        event_idx: bool,
        mem: &Mem,
        max_pairs: u16,
        mq: bool,
    ) -> Result<CtrlQueue, SetupError> {
        let mut queue = Queue::new(crate::mmio::QUEUE_MAX)
            .map_err(|_| SetupError::Size(crate::mmio::QUEUE_MAX))?;
        queue
            .try_set_size(ring.size)
            .map_err(|_| SetupError::Size(ring.size))?;
        let addr = |e: virtio_queue::Error| SetupError::Address(e.to_string());
        queue
            .try_set_desc_table_address(GuestAddress(ring.desc))
            .map_err(addr)?;
        queue
            .try_set_avail_ring_address(GuestAddress(ring.avail))
            .map_err(addr)?;
        queue
            .try_set_used_ring_address(GuestAddress(ring.used))
            .map_err(addr)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(SetupError::Outside);
        }
        Ok(CtrlQueue {
            queue,
            max_pairs,
            mq,
            warnings: 0,
        })
    }

    fn warn(&mut self, msg: std::fmt::Arguments<'_>) {
        if self.warnings < MAX_WARNINGS {
            self.warnings += 1;
            eprintln!("rimg-vmm: net control queue: {msg}");
            if self.warnings == MAX_WARNINGS {
                eprintln!("rimg-vmm: net control queue: further warnings suppressed");
            }
        }
    }

    /// Answers every command the driver made available (the QueueNotify
    /// handler). `set_pairs(n)` applies a valid VQ_PAIRS_SET and says
    /// whether it worked. Returns whether the driver should be
    /// interrupted (used buffers were added and it asked to be told).
    pub fn process(&mut self, mem: &Mem, mut set_pairs: impl FnMut(u16) -> bool) -> bool {
        let mut added = false;
        // Each pass handles at most one ring's worth of chains, and
        // another pass runs only if the driver added more meanwhile: a
        // driver racing us from another vCPU is served a few times over,
        // then waits for its next notification.
        for _ in 0..4 {
            if !self.avail_sane(mem) {
                break;
            }
            for _ in 0..self.queue.size() {
                let Some(chain) = self.queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                let outcome = self.handle(mem, chain, &mut set_pairs);
                let len = match outcome {
                    Outcome::Ack(_) => 1,
                    Outcome::Dropped => 0,
                };
                match self.queue.add_used(mem, head, len) {
                    Ok(()) => added = true,
                    Err(e) => self.warn(format_args!("chain {head} not returned: {e}")),
                }
            }
            // With EVENT_IDX this publishes avail_event = next_avail, so
            // the driver notifies again for its next command.
            match self.queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.warn(format_args!("avail ring unreadable: {e}"));
                    break;
                }
            }
        }
        added && self.queue.needs_notification(mem).unwrap_or(true)
    }

    /// The driver's avail index may run at most a ring ahead of us;
    /// virtio-queue yields nothing from a ring that does not, and the
    /// queue is left alone until the driver repairs it.
    fn avail_sane(&mut self, mem: &Mem) -> bool {
        match avail::available(&self.queue, mem) {
            Ok(_) => true,
            Err(AvailError::TooFarAhead { avail, ahead, size }) => {
                self.warn(format_args!(
                    "avail index {avail} is {ahead} entries ahead (queue size {size}): ignored"
                ));
                false
            }
            Err(AvailError::Unreadable(e)) => {
                self.warn(format_args!("avail ring unreadable: {e}"));
                false
            }
        }
    }

    fn handle(
        &mut self,
        mem: &Mem,
        chain: DescriptorChain<&Mem>,
        set_pairs: &mut impl FnMut(u16) -> bool,
    ) -> Outcome {
        let head = chain.head_index();
        let (at, ack) = match decode(mem, chain) {
            Ok(c) => (c.ack, self.execute(&c, set_pairs)),
            Err((e, at)) => {
                self.warn(format_args!("chain {head}: {e}"));
                match at {
                    Some(at) => (at, VIRTIO_NET_ERR),
                    None => return Outcome::Dropped,
                }
            }
        };
        match mem.write_obj(ack, at) {
            Ok(()) => Outcome::Ack(ack),
            Err(e) => {
                self.warn(format_args!("chain {head}: ack not written: {e}"));
                Outcome::Dropped
            }
        }
    }

    /// Runs a well-formed command; its ack.
    fn execute(&mut self, c: &Command, set_pairs: &mut impl FnMut(u16) -> bool) -> u8 {
        match (c.class(), c.command()) {
            (CLASS_MQ, MQ_VQ_PAIRS_SET) => {
                if !self.mq {
                    self.warn(format_args!("VQ_PAIRS_SET without VIRTIO_NET_F_MQ"));
                    return VIRTIO_NET_ERR;
                }
                // struct virtio_net_ctrl_mq { le16 virtqueue_pairs; }
                if c.data_len() != 2 {
                    self.warn(format_args!(
                        "VQ_PAIRS_SET with {} bytes of data instead of 2",
                        c.data_len()
                    ));
                    return VIRTIO_NET_ERR;
                }
                let n = u16::from_le_bytes([c.prefix[2], c.prefix[3]]);
                // 5.1.6.5.5: VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN (1) to
                // max_virtqueue_pairs.
                let max = self.max_pairs;
                if n == 0 || n > max {
                    self.warn(format_args!("VQ_PAIRS_SET {n} outside 1..={max}"));
                    return VIRTIO_NET_ERR;
                }
                if set_pairs(n) {
                    VIRTIO_NET_OK
                } else {
                    VIRTIO_NET_ERR
                }
            }
            (class, command) => {
                self.warn(format_args!(
                    "class {class} command {command} not supported"
                ));
                VIRTIO_NET_ERR
            }
        }
    }
}

/// Decodes one chain (5.1.6.5): `u8 class; u8 command; u8 data[];`
/// device-readable, then `u8 ack;` device-writable. On error, the ack
/// address if the chain has a usable one.
fn decode(
    mem: &Mem,
    chain: DescriptorChain<&Mem>,
) -> Result<Command, (ChainError, Option<GuestAddress>)> {
    let mut prefix = [0u8; PREFIX];
    let mut len: u64 = 0;
    let mut ack = None;
    let mut error = None;
    let mut seen = 0usize;
    let mut writable_seen = false;
    let mut last_has_next = false;
    for d in chain {
        seen += 1;
        last_has_next = d.has_next();
        if d.is_write_only() {
            writable_seen = true;
            // The ack is the first writable byte; it must be guest RAM.
            if ack.is_none() && d.len() >= 1 && mem.check_range(d.addr(), 1, Permissions::Write) {
                ack = Some(d.addr());
            }
            continue;
        }
        if writable_seen {
            error.get_or_insert(ChainError::ReadableAfterWritable);
            continue;
        }
        if !mem.check_range(d.addr(), d.len() as usize, Permissions::Read) {
            error.get_or_insert(ChainError::Outside {
                addr: d.addr().0,
                len: d.len(),
            });
            continue;
        }
        // Keep the first PREFIX bytes (the range was checked above).
        let at = usize::try_from(len).unwrap_or(PREFIX).min(PREFIX);
        let take = (PREFIX - at).min(d.len() as usize);
        if take > 0
            && mem
                .read_slice(&mut prefix[at..at + take], d.addr())
                .is_err()
        {
            error.get_or_insert(ChainError::Outside {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        len += u64::from(d.len());
    }
    // The chain iterator stops quietly on a loop (after a ring's worth of
    // descriptors), an index past the table or an unreadable descriptor:
    // the last one it gave still pointing onwards means the chain was cut.
    if seen == 0 {
        error = Some(ChainError::Empty);
    } else if last_has_next {
        error = Some(ChainError::Truncated);
    }
    if error.is_none() && len < 2 {
        error = Some(ChainError::Short(len));
    }
    match (error, ack) {
        (Some(e), a) => Err((e, a)),
        (None, None) => Err((ChainError::NoAck, None)),
        (None, Some(ack)) => Ok(Command { prefix, len, ack }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;
    const SIZE: u16 = 8;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const BUF: u64 = 0x8000;
    const MEM: usize = 0x10000;

    struct Driver {
        mem: Mem,
        avail: u16,
        used: u16,
    }

    impl Driver {
        fn new() -> Driver {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            Driver {
                mem,
                avail: 0,
                used: 0,
            }
        }

        fn ctrl(&self, max_pairs: u16, mq: bool, event_idx: bool) -> CtrlQueue {
            let ring = RingAddrs {
                size: SIZE,
                desc: DESC,
                avail: AVAIL,
                used: USED,
            };
            CtrlQueue::new(ring, event_idx, &self.mem, max_pairs, mq).unwrap()
        }

        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let d = DESC + u64::from(i) * 16;
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }

        fn push(&mut self, head: u16) {
            let slot = AVAIL + 4 + u64::from(self.avail % SIZE) * 2;
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail = self.avail.wrapping_add(1);
            self.mem
                .write_obj(self.avail, GuestAddress(AVAIL + 2))
                .unwrap();
        }

        /// The next used entry, if any: (id, len).
        fn pop(&mut self) -> Option<(u32, u32)> {
            let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            if idx == self.used {
                return None;
            }
            let e = USED + 4 + u64::from(self.used % SIZE) * 8;
            self.used = self.used.wrapping_add(1);
            Some((
                self.mem.read_obj(GuestAddress(e)).unwrap(),
                self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
            ))
        }

        /// A well-formed command at descriptors 0..=2: header, data, ack.
        fn command(&mut self, class: u8, cmd: u8, data: &[u8]) {
            self.mem
                .write_slice(&[class, cmd], GuestAddress(BUF))
                .unwrap();
            self.mem
                .write_slice(data, GuestAddress(BUF + 0x10))
                .unwrap();
            self.mem
                .write_obj(0xffu8, GuestAddress(BUF + 0x20))
                .unwrap();
            self.desc(0, BUF, 2, F_NEXT, 1);
            self.desc(1, BUF + 0x10, data.len() as u32, F_NEXT, 2);
            self.desc(2, BUF + 0x20, 1, F_WRITE, 0);
            self.push(0);
        }

        fn ack(&self) -> u8 {
            self.mem.read_obj(GuestAddress(BUF + 0x20)).unwrap()
        }
    }

    /// Runs the queue; (interrupt wanted, pairs set calls).
    fn run(d: &Driver, q: &mut CtrlQueue, result: bool) -> (bool, Vec<u16>) {
        let mut calls = Vec::new();
        let irq = q.process(&d.mem, |n| {
            calls.push(n);
            result
        });
        (irq, calls)
    }

    #[test]
    fn vq_pairs_set_in_range_is_applied() {
        let mut d = Driver::new();
        let mut q = d.ctrl(4, true, false);
        d.command(CLASS_MQ, MQ_VQ_PAIRS_SET, &3u16.to_le_bytes());
        assert_eq!(run(&d, &mut q, true), (true, vec![3]));
        assert_eq!(d.pop(), Some((0, 1)));
        assert_eq!(d.ack(), VIRTIO_NET_OK);
        // The backend refusing is an ERR for the driver.
        d.command(CLASS_MQ, MQ_VQ_PAIRS_SET, &1u16.to_le_bytes());
        assert_eq!(run(&d, &mut q, false), (true, vec![1]));
        assert_eq!(d.pop(), Some((0, 1)));
        assert_eq!(d.ack(), VIRTIO_NET_ERR);
    }

    #[test]
    fn bad_commands_are_answered_err() {
        let mut d = Driver::new();
        let mut q = d.ctrl(2, true, false);
        for (class, cmd, data) in [
            (CLASS_MQ, MQ_VQ_PAIRS_SET, &0u16.to_le_bytes()[..]),
            (CLASS_MQ, MQ_VQ_PAIRS_SET, &3u16.to_le_bytes()[..]),
            (CLASS_MQ, MQ_VQ_PAIRS_SET, &[2u8][..]),
            (CLASS_MQ, MQ_VQ_PAIRS_SET, &[2u8, 0, 0][..]),
            // RSS_CONFIG, never offered.
            (CLASS_MQ, 1, &[0u8; 8][..]),
            // CTRL_RX promisc, CTRL_MAC, unknown class.
            (0, 0, &[1u8][..]),
            (1, 1, &[0u8; 6][..]),
            (0x7f, 0x7f, &[][..]),
        ] {
            d.command(class, cmd, data);
            assert_eq!(run(&d, &mut q, true), (true, vec![]), "{class} {cmd}");
            assert_eq!(d.pop(), Some((0, 1)));
            assert_eq!(d.ack(), VIRTIO_NET_ERR, "{class} {cmd} {data:?}");
        }
        // The MQ class needs VIRTIO_NET_F_MQ.
        let mut d = Driver::new();
        let mut q = d.ctrl(2, false, false);
        d.command(CLASS_MQ, MQ_VQ_PAIRS_SET, &1u16.to_le_bytes());
        assert_eq!(run(&d, &mut q, true), (true, vec![]));
        assert_eq!(d.pop(), Some((0, 1)));
        assert_eq!(d.ack(), VIRTIO_NET_ERR);
    }

    #[test]
    fn malformed_chains_are_err_or_dropped() {
        let mut d = Driver::new();
        let mut q = d.ctrl(2, true, false);
        let pairs = 2u16.to_le_bytes();
        let bad = 0x7f_0000_0000u64;

        // Data outside guest memory: ERR.
        d.command(CLASS_MQ, MQ_VQ_PAIRS_SET, &pairs);
        d.desc(1, bad, 2, F_NEXT, 2);
        assert_eq!(run(&d, &mut q, true), (true, vec![]));
        assert_eq!(d.pop(), Some((0, 1)));
        assert_eq!(d.ack(), VIRTIO_NET_ERR);

        // Header straddling the end of guest memory: ERR.
        d.command(CLASS_MQ, MQ_VQ_PAIRS_SET, &pairs);
        d.desc(0, MEM as u64 - 1, 2, F_NEXT, 1);
        assert_eq!(run(&d, &mut q, true), (true, vec![]));
        assert_eq!(d.pop(), Some((0, 1)));
        assert_eq!(d.ack(), VIRTIO_NET_ERR);

        // Only one readable byte: ERR.
        d.command(CLASS_MQ, MQ_VQ_PAIRS_SET, &pairs);
        d.desc(0, BUF, 1, F_NEXT, 2);
        assert_eq!(run(&d, &mut q, true), (true, vec![]));
        assert_eq!(d.pop(), Some((0, 1)));
        assert_eq!(d.ack(), VIRTIO_NET_ERR);

        // Readable data after the writable ack: ERR in the ack.
        d.command(CLASS_MQ, MQ_VQ_PAIRS_SET, &pairs);
        d.desc(0, BUF, 2, F_NEXT, 2);
        d.desc(2, BUF + 0x20, 1, F_WRITE | F_NEXT, 1);
        d.desc(1, BUF + 0x10, 2, 0, 0);
        assert_eq!(run(&d, &mut q, true), (true, vec![]));
        assert_eq!(d.pop(), Some((0, 1)));
        assert_eq!(d.ack(), VIRTIO_NET_ERR);

        // No writable descriptor: returned unused, nothing written.
        d.command(CLASS_MQ, MQ_VQ_PAIRS_SET, &pairs);
        d.desc(2, BUF + 0x20, 1, 0, 0);
        assert_eq!(run(&d, &mut q, true), (true, vec![]));
        assert_eq!(d.pop(), Some((0, 0)));
        assert_eq!(d.ack(), 0xff);

        // A zero-length or out-of-memory ack: returned unused.
        for (addr, len) in [(BUF + 0x20, 0), (bad, 1)] {
            d.command(CLASS_MQ, MQ_VQ_PAIRS_SET, &pairs);
            d.desc(2, addr, len, F_WRITE, 0);
            assert_eq!(run(&d, &mut q, true), (true, vec![]));
            assert_eq!(d.pop(), Some((0, 0)));
            assert_eq!(d.ack(), 0xff);
        }

        // A loop (ack before it, so the ERR has a place): cut short.
        d.command(CLASS_MQ, MQ_VQ_PAIRS_SET, &pairs);
        d.desc(0, BUF + 0x20, 1, F_WRITE | F_NEXT, 1);
        d.desc(1, BUF + 0x10, 2, F_WRITE | F_NEXT, 1);
        assert_eq!(run(&d, &mut q, true), (true, vec![]));
        assert_eq!(d.pop(), Some((0, 1)));
        assert_eq!(d.ack(), VIRTIO_NET_ERR);

        // A next index past the table: cut short, no ack seen: dropped.
        d.command(CLASS_MQ, MQ_VQ_PAIRS_SET, &pairs);
        d.desc(1, BUF + 0x10, 2, F_NEXT, 200);
        assert_eq!(run(&d, &mut q, true), (true, vec![]));
        assert_eq!(d.pop(), Some((0, 0)));

        // An indirect table outside memory: nothing decodable, dropped.
        d.command(CLASS_MQ, MQ_VQ_PAIRS_SET, &pairs);
        d.desc(0, bad, 48, F_INDIRECT, 0);
        assert_eq!(run(&d, &mut q, true), (true, vec![]));
        assert_eq!(d.pop(), Some((0, 0)));

        // A head index past the ring cannot be returned: skipped, and
        // the next command is still served.
        d.push(200);
        d.command(CLASS_MQ, MQ_VQ_PAIRS_SET, &pairs);
        assert_eq!(run(&d, &mut q, true), (true, vec![2]));
        assert_eq!(d.pop(), Some((0, 1)));
        assert_eq!(d.pop(), None);
        assert_eq!(d.ack(), VIRTIO_NET_OK);
    }

    #[test]
    fn indirect_command_is_served() {
        let mut d = Driver::new();
        let mut q = d.ctrl(2, true, false);
        let table = BUF + 0x100;
        d.mem
            .write_slice(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 2, 0], GuestAddress(BUF))
            .unwrap();
        for (i, (addr, len, flags)) in [
            (BUF, 2u32, F_NEXT),
            (BUF + 2, 2, F_NEXT),
            (BUF + 0x20, 1, F_WRITE),
        ]
        .into_iter()
        .enumerate()
        {
            let e = table + i as u64 * 16;
            d.mem.write_obj(addr, GuestAddress(e)).unwrap();
            d.mem.write_obj(len, GuestAddress(e + 8)).unwrap();
            d.mem.write_obj(flags, GuestAddress(e + 12)).unwrap();
            d.mem.write_obj(i as u16 + 1, GuestAddress(e + 14)).unwrap();
        }
        d.desc(3, table, 48, F_INDIRECT, 0);
        d.push(3);
        assert_eq!(run(&d, &mut q, true), (true, vec![2]));
        assert_eq!(d.pop(), Some((3, 1)));
        assert_eq!(d.ack(), VIRTIO_NET_OK);
    }

    #[test]
    fn runaway_avail_index_is_ignored_until_repaired() {
        let mut d = Driver::new();
        let mut q = d.ctrl(2, true, false);
        d.command(CLASS_MQ, MQ_VQ_PAIRS_SET, &2u16.to_le_bytes());
        d.mem
            .write_obj(d.avail.wrapping_add(100), GuestAddress(AVAIL + 2))
            .unwrap();
        assert_eq!(run(&d, &mut q, true), (false, vec![]));
        assert_eq!(d.pop(), None);
        d.mem.write_obj(d.avail, GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(run(&d, &mut q, true), (true, vec![2]));
        assert_eq!(d.pop(), Some((0, 1)));
    }

    #[test]
    fn several_commands_in_one_notification() {
        let mut d = Driver::new();
        let mut q = d.ctrl(8, true, true);
        for (i, n) in [2u16, 5, 9].into_iter().enumerate() {
            let b = BUF + 0x100 * i as u64;
            let h = 2 * i as u16;
            d.mem
                .write_slice(&[CLASS_MQ, MQ_VQ_PAIRS_SET], GuestAddress(b))
                .unwrap();
            d.mem.write_obj(n, GuestAddress(b + 2)).unwrap();
            d.desc(h, b, 4, F_NEXT, h + 1);
            d.desc(h + 1, b + 4, 1, F_WRITE, 0);
            d.push(h);
        }
        let (_, calls) = run(&d, &mut q, true);
        assert_eq!(calls, vec![2, 5]);
        for (i, want) in [VIRTIO_NET_OK, VIRTIO_NET_OK, VIRTIO_NET_ERR]
            .into_iter()
            .enumerate()
        {
            assert_eq!(d.pop(), Some((2 * i as u32, 1)));
            let b = BUF + 0x100 * i as u64 + 4;
            assert_eq!(d.mem.read_obj::<u8>(GuestAddress(b)).unwrap(), want);
        }
        // EVENT_IDX: avail_event (after the used ring's entries) tells
        // the driver to notify for its next command.
        let avail_event: u16 = d
            .mem
            .read_obj(GuestAddress(USED + 4 + u64::from(SIZE) * 8))
            .unwrap();
        assert_eq!(avail_event, 3);
    }

    #[test]
    fn rings_outside_memory_are_refused() {
        let d = Driver::new();
        let ring = |desc| RingAddrs {
            size: SIZE,
            desc,
            avail: AVAIL,
            used: USED,
        };
        assert!(matches!(
            CtrlQueue::new(ring(MEM as u64 - 16), false, &d.mem, 2, true),
            Err(SetupError::Outside)
        ));
        assert!(CtrlQueue::new(ring(DESC), false, &d.mem, 2, true).is_ok());
        let mut odd = ring(DESC);
        odd.size = 6;
        assert!(matches!(
            CtrlQueue::new(odd, false, &d.mem, 2, true),
            Err(SetupError::Size(6))
        ));
    }
}
