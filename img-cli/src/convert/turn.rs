//! Claims taking turns, in the order they were claimed: the claim whose
//! turn it is maps (or reserves) its writes, then passes the turn to the
//! next one. A claim with nothing to do in turn (a run of zeros on a
//! target that needs none written) steps out of the order without
//! waiting for its turn, so that the claims after it do not wait for it
//! either. With the `shuttle` feature the locks are shuttle's, and the
//! model below explores the interleavings.

#[cfg(feature = "shuttle")]
use shuttle::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(feature = "shuttle"))]
use std::sync::{Condvar, Mutex, MutexGuard};

use std::collections::BTreeSet;

#[derive(Default)]
pub(super) struct Turn {
    state: Mutex<TurnState>,
    cv: Condvar,
}

#[derive(Default)]
struct TurnState {
    /// The claim whose turn it is.
    next: u64,
    /// Claims after `next` that stepped out: the turn skips them.
    skipped: BTreeSet<u64>,
    /// Workers waiting for their turn: a pass wakes them only if there
    /// are any (a notify is a system call even with no waiter, and most
    /// claims find their turn has come).
    waiting: usize,
}

impl TurnState {
    /// The turn moves past `claim`, and past the claims after it that
    /// stepped out.
    fn advance(&mut self, claim: u64) {
        self.next = claim + 1;
        while self.skipped.remove(&self.next) {
            self.next += 1;
        }
    }
}

/// A claim's place in the turn order, taken when it is claimed. Dropped
/// without having passed the turn on or stepped out (an error, a panic),
/// it waits for the turn and passes it: every claim takes its turn or
/// steps out, so none waits for one that never comes.
pub(super) struct Ticket<'t> {
    turn: &'t Turn,
    claim: u64,
    passed: bool,
}

impl Turn {
    /// The ticket of claim number `claim` (numbers are handed out from 0
    /// up, each once).
    pub(super) fn ticket(&self, claim: u64) -> Ticket<'_> {
        Ticket {
            turn: self,
            claim,
            passed: false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, TurnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Ticket<'_> {
    /// Waits until it is this claim's turn.
    pub(super) fn wait(&self) {
        let mut s = self.turn.lock();
        while s.next != self.claim {
            s.waiting += 1;
            s = self.turn.cv.wait(s).unwrap_or_else(|p| p.into_inner());
            s.waiting -= 1;
        }
    }

    /// Gives the turn to the next claim (after [`wait`](Self::wait)).
    pub(super) fn pass(&mut self) {
        let mut s = self.turn.lock();
        s.advance(self.claim);
        self.passed = true;
        if s.waiting > 0 {
            self.turn.cv.notify_all();
        }
    }

    /// Steps out of the order: this claim does nothing in turn. If its
    /// turn has come the turn moves on now; otherwise it skips this
    /// claim when it gets here.
    pub(super) fn step_out(&mut self) {
        let mut s = self.turn.lock();
        self.passed = true;
        if s.next != self.claim {
            // Its turn has not come (it cannot have passed: this ticket
            // holds it).
            debug_assert!(self.claim > s.next);
            s.skipped.insert(self.claim);
            return;
        }
        s.advance(self.claim);
        if s.waiting > 0 {
            self.turn.cv.notify_all();
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.passed {
            self.wait();
            self.pass();
        }
    }
}

/// The turn order under shuttle's scheduler: workers claim numbers from
/// a shared counter (as `Claims` does) and for each either step out,
/// work in turn (wait, record, pass), drop the ticket unpassed (an
/// error: then nobody claims more, as after a failed chunk), or work in
/// turn but pass only once the claims right after it that step out
/// have returned (a `step_out` that waited for its turn would deadlock
/// there). A lost wake-up is a deadlock shuttle reports; work in turn
/// must be exclusive and in claim order, and the turn must end past
/// every claim handed out. Run with
/// `cargo test -p rimg --features shuttle --bin rimg turn::model`.
#[cfg(all(test, feature = "shuttle"))]
mod model {
    use super::*;
    use shuttle::sync::Arc;

    const CLAIMS: u64 = 7;

    /// What a claim does.
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        StepOut,
        Work,
        Fail,
        /// Work, passing only when the step-outs right after it have
        /// returned.
        Hold,
    }
    use Kind::*;

    #[derive(Default)]
    struct Shared {
        /// (next claim, failed)
        next: Mutex<(u64, bool)>,
        /// Work done in turn, in order, and whether some is under way.
        done: Mutex<(Vec<u64>, bool)>,
        /// Step-outs returned, and a condition for `Hold`.
        stepped: Mutex<u64>,
        cv: Condvar,
    }

    /// How many claims right after `after` step out.
    fn step_outs(kinds: [Kind; CLAIMS as usize], after: u64) -> u64 {
        (after + 1..CLAIMS)
            .take_while(|&c| kinds[c as usize] == StepOut)
            .count() as u64
    }

    fn run(workers: usize, kinds: [Kind; CLAIMS as usize]) {
        let turn = Arc::new(Turn::default());
        let sh = Arc::new(Shared::default());
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (turn, sh) = (turn.clone(), sh.clone());
                shuttle::thread::spawn(move || loop {
                    let c = {
                        let mut n = sh.next.lock().unwrap();
                        if n.0 == CLAIMS || n.1 {
                            return;
                        }
                        n.0 += 1;
                        n.0 - 1
                    };
                    let mut t = turn.ticket(c);
                    let work = |t: &mut Ticket<'_>, hold: bool| {
                        t.wait();
                        {
                            let mut d = sh.done.lock().unwrap();
                            assert!(!d.1, "two claims in turn at once");
                            d.1 = true;
                        }
                        shuttle::thread::yield_now();
                        if hold {
                            let want = step_outs(kinds, c);
                            let mut n = sh.stepped.lock().unwrap();
                            while *n < want {
                                n = sh.cv.wait(n).unwrap();
                            }
                        }
                        let mut d = sh.done.lock().unwrap();
                        d.0.push(c);
                        d.1 = false;
                        drop(d);
                        t.pass();
                    };
                    match kinds[c as usize] {
                        StepOut => {
                            t.step_out();
                            *sh.stepped.lock().unwrap() += 1;
                            sh.cv.notify_all();
                        }
                        Work => work(&mut t, false),
                        Hold => work(&mut t, true),
                        Fail => {
                            sh.next.lock().unwrap().1 = true;
                            drop(t);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let claimed = sh.next.lock().unwrap().0;
        let done = sh.done.lock().unwrap().0.clone();
        let want: Vec<u64> = (0..claimed)
            .filter(|&c| matches!(kinds[c as usize], Work | Hold))
            .collect();
        assert_eq!(done, want, "work in turn out of claim order");
        assert_eq!(turn.lock().next, claimed, "the turn ends past every claim");
        assert!(turn.lock().skipped.is_empty());
    }

    #[test]
    fn turns_in_claim_order_with_steps_out() {
        let mixes: [[Kind; CLAIMS as usize]; 5] = [
            // Holes between data.
            [Work, StepOut, Work, StepOut, Work, StepOut, Work],
            // A claim that passes only after the step-outs behind it.
            [Hold, StepOut, StepOut, Work, StepOut, Hold, StepOut],
            // Data first, holes last.
            [Work, Work, StepOut, StepOut, StepOut, StepOut, StepOut],
            // An error among them: nobody claims after it.
            [Work, StepOut, Fail, StepOut, Work, StepOut, Work],
            [StepOut, Hold, StepOut, Fail, Work, StepOut, StepOut],
        ];
        for kinds in mixes {
            for workers in [2, 3] {
                rimg_model::explore(move || run(workers, kinds), 300, 300);
            }
        }
    }
}
