//! TX chains go back to the guest in the order they were taken.
//!
//! A copied frame is done at once, one written in place from guest memory
//! when its TAP write completes, which for a write io_uring punted to a
//! kernel worker comes after later frames. Returning chains as they are
//! done would leave the used ring out of avail order, and a restarted
//! daemon could not tell what its predecessor returned: the frontend
//! restarts the queue at the guest's used index (vhost-user: without
//! inflight tracking, the last avail index is restored from the used
//! index), which is exact only if every chain before that point went
//! back and none after it. Kept in order, a daemon killed at any moment
//! leaves exactly the chains in avail slots `[used, avail)` unreturned,
//! and its successor takes them again (a TX frame may then be sent
//! twice, which the protocols above tolerate; none is lost).

use std::collections::VecDeque;

/// Sequence numbers of taken chains, as carried in io_uring user data.
pub(super) const SEQ_BITS: u32 = 24;
const SEQ_MASK: u32 = (1 << SEQ_BITS) - 1;

/// The TX chains taken and not yet returned, in take order.
#[derive(Default)]
pub(super) struct TxOrder {
    /// (head, done) per chain.
    chains: VecDeque<(u16, bool)>,
    /// Sequence number of `chains[0]`, modulo 2^SEQ_BITS.
    front: u32,
}

impl TxOrder {
    /// Records a chain taken from the avail ring; returns its sequence
    /// number for [`complete`](Self::complete) when it is not `done` yet.
    pub(super) fn take(&mut self, head: u16, done: bool) -> u32 {
        let seq = self.front.wrapping_add(self.chains.len() as u32) & SEQ_MASK;
        self.chains.push_back((head, done));
        seq
    }

    /// Marks the chain numbered `seq` done. A number that names no
    /// outstanding chain (none is issued twice while outstanding: fewer
    /// than 2^SEQ_BITS chains are, a queue holding at most 32768) is
    /// ignored.
    pub(super) fn complete(&mut self, seq: u32) {
        let i = (seq.wrapping_sub(self.front) & SEQ_MASK) as usize;
        if let Some(c) = self.chains.get_mut(i) {
            c.1 = true;
        }
    }

    /// Moves the heads of the done chains at the front, in order, to
    /// `out`; a chain not done yet holds back every one after it.
    pub(super) fn pop_done(&mut self, out: &mut Vec<u16>) {
        while let Some(&(head, true)) = self.chains.front() {
            out.push(head);
            self.chains.pop_front();
            self.front = self.front.wrapping_add(1) & SEQ_MASK;
        }
    }

    /// Forgets the chains whose writes will never complete (the ring that
    /// carried them wedged): they are not returned, and no longer hold
    /// back the ones after them.
    pub(super) fn abandon_pending(&mut self) {
        self.chains.retain(|c| c.1);
    }

    /// Chains taken and not yet returned.
    pub(super) fn len(&self) -> usize {
        self.chains.len()
    }

    pub(super) fn clear(&mut self) {
        self.chains.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn popped(o: &mut TxOrder) -> Vec<u16> {
        let mut v = Vec::new();
        o.pop_done(&mut v);
        v
    }

    #[test]
    fn chains_return_in_take_order_whatever_order_they_finish_in() {
        let mut o = TxOrder::default();
        let a = o.take(7, false);
        o.take(3, true);
        let c = o.take(9, false);
        o.take(1, true);
        assert!(popped(&mut o).is_empty(), "7 holds back the rest");
        o.complete(c);
        assert!(popped(&mut o).is_empty());
        o.complete(a);
        assert_eq!(popped(&mut o), [7, 3, 9, 1]);
        assert_eq!(o.len(), 0);
        // Unknown or repeated numbers change nothing.
        o.complete(a);
        o.complete(12345);
        let d = o.take(2, false);
        o.complete(d.wrapping_add(1));
        assert!(popped(&mut o).is_empty());
        o.complete(d);
        assert_eq!(popped(&mut o), [2]);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut o = TxOrder {
            front: SEQ_MASK - 1,
            ..TxOrder::default()
        };
        let a = o.take(1, false);
        let b = o.take(2, false);
        let c = o.take(3, false);
        assert_eq!((a, b, c), (SEQ_MASK - 1, SEQ_MASK, 0));
        o.complete(c);
        o.complete(b);
        assert!(popped(&mut o).is_empty());
        o.complete(a);
        assert_eq!(popped(&mut o), [1, 2, 3]);
        let d = o.take(4, false);
        assert_eq!(d, 1);
        o.complete(d);
        assert_eq!(popped(&mut o), [4]);
    }

    #[test]
    fn abandoned_writes_stop_holding_back_the_rest() {
        let mut o = TxOrder::default();
        o.take(5, false);
        o.take(6, true);
        let c = o.take(7, false);
        o.abandon_pending();
        assert_eq!(popped(&mut o), [6]);
        // A late number from before the abandon names nothing now.
        o.complete(c);
        let d = o.take(8, false);
        o.complete(d);
        assert_eq!(popped(&mut o), [8]);
    }
}
