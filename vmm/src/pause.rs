//! Pausing the guest (the control socket's `pause` and `resume`): every
//! vCPU thread parks between two KVM_RUNs until resumed. A vCPU inside
//! KVM_RUN is brought out by the kick signal (the run returns EINTR),
//! sent again until all have parked, because a signal that lands while a
//! vCPU is between runs does not stop the next one.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::diag::Kick;

/// How long `pause` waits for every vCPU to park.
const PATIENCE: Duration = Duration::from_secs(5);

pub struct Pause {
    state: Mutex<State>,
    cv: Condvar,
    vcpus: usize,
}

#[derive(Default)]
struct State {
    wanted: bool,
    parked: usize,
}

impl Pause {
    pub fn new(vcpus: usize) -> Pause {
        Pause {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            vcpus,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_paused(&self) -> bool {
        self.lock().wanted
    }

    /// Stops every vCPU; returns once all are parked, or an error after
    /// [`PATIENCE`] (the guest stays paused as far as it got: `resume`
    /// undoes it).
    pub fn pause(&self, kick: &Kick) -> Result<(), String> {
        let deadline = Instant::now() + PATIENCE;
        let mut s = self.lock();
        s.wanted = true;
        while s.parked < self.vcpus {
            drop(s);
            kick.kick_vcpus();
            s = self.lock();
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} of {} vCPUs stopped in {PATIENCE:?}",
                    s.parked, self.vcpus
                ));
            }
            s = self
                .cv
                .wait_timeout(s, Duration::from_millis(20))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    pub fn resume(&self) {
        self.lock().wanted = false;
        self.cv.notify_all();
    }

    /// Called by each vCPU thread before it enters the guest: parks while
    /// a pause is wanted.
    pub fn park_if_paused(&self) {
        let mut s = self.lock();
        if !s.wanted {
            return;
        }
        s.parked += 1;
        self.cv.notify_all();
        while s.wanted {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
    }
}
