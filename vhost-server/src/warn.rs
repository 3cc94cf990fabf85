//! Warnings a guest driver can cause at will (malformed requests and
//! chains, a ring index far ahead of the device): logged at most a fixed
//! number of times per worker and connection, so that a driver cannot
//! flood the daemon's log or slow it down with logging.

use std::fmt;

/// Warnings logged per worker and connection, at most.
pub const MAX_WARNINGS: u32 = 64;

/// A budget of warnings for one worker, with the prefix its lines start
/// with (e.g. "queue 0", "pair 1").
#[derive(Debug, Clone)]
pub struct CappedWarnings {
    target: &'static str,
    prefix: String,
    logged: u32,
    max: u32,
}

impl CappedWarnings {
    /// Lines go to log target `target` (the caller's `module_path!()`,
    /// as its own `warn!` would) and start with `prefix`.
    pub fn new(target: &'static str, prefix: impl Into<String>) -> CappedWarnings {
        CappedWarnings {
            target,
            prefix: prefix.into(),
            logged: 0,
            max: MAX_WARNINGS,
        }
    }

    /// The same with a budget of `max` lines.
    pub fn with_max(mut self, max: u32) -> CappedWarnings {
        self.max = max;
        self
    }

    /// Logs `msg` as a warning unless the budget is spent; the last line
    /// the budget allows is followed by one saying that further warnings
    /// are suppressed. Returns whether `msg` was logged.
    pub fn warn(&mut self, msg: fmt::Arguments<'_>) -> bool {
        if self.logged >= self.max {
            return false;
        }
        self.logged += 1;
        log::warn!(target: self.target, "{}: {msg}", self.prefix);
        if self.logged == self.max {
            log::warn!(target: self.target, "{}: further warnings suppressed", self.prefix);
        }
        true
    }

    /// Warnings logged so far.
    pub fn logged(&self) -> u32 {
        self.logged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_spent_then_silent() {
        let mut w = CappedWarnings::new(module_path!(), "queue 0").with_max(3);
        let logged: Vec<bool> = (0..10)
            .map(|i| w.warn(format_args!("warning {i}")))
            .collect();
        assert_eq!(logged.iter().filter(|&&l| l).count(), 3);
        assert!(logged[..3].iter().all(|&l| l));
        assert_eq!(w.logged(), 3);
        assert_eq!(CappedWarnings::new(module_path!(), "x").max, MAX_WARNINGS);
    }
}
