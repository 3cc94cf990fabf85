//! `-r RATE` of convert and commit: at most RATE bytes of data copied per
//! second, as qemu-img limits them (holes and zeros are not counted).
//! Each worker, after copying, waits until the bytes copied so far are
//! due at that rate since the first copy (opening and creating images
//! earn no credit).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::CliError;

pub struct Limit {
    /// Bytes per second, above 0.
    rate: u64,
    /// When the first copy ended.
    start: OnceLock<Instant>,
    done: AtomicU64,
}

impl Limit {
    /// The limit `-r` asks for (qemu-img's sizes and messages); None
    /// without `-r` or with 0, which qemu-img takes as no limit.
    pub fn parse(opt: &Option<String>) -> Result<Option<Limit>, CliError> {
        let Some(s) = opt else { return Ok(None) };
        let rate =
            crate::size::cvtnum("rate limit", s, 0, i64::MAX as u64).map_err(CliError::new)?;
        Ok((rate > 0).then(|| Limit {
            rate,
            start: OnceLock::new(),
            done: AtomicU64::new(0),
        }))
    }

    /// Counts `bytes` copied; returns once they are due.
    pub fn take(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let start = *self.start.get_or_init(Instant::now);
        let total = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let due = Duration::from_secs_f64(total as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}
