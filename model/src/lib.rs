//! The workspace's shuttle models (the allocation and NBD client models
//! in rimg-qcow2, rimg-nbd's queue, convert's turn order, the vhost
//! inflight protocol) explore by one knob, read here:
//! `RIMG_MODEL_SCALE` multiplies every model's schedule count (1 in CI;
//! more for a long run, as `scripts/test.sh` documents).

use std::sync::Arc;

/// `n` schedules, times `RIMG_MODEL_SCALE` (1 when unset or not a
/// number).
pub fn schedules(n: usize) -> usize {
    let scale = std::env::var("RIMG_MODEL_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    n * scale
}

/// Runs `f` under shuttle's random scheduler for `random` schedules and
/// then under PCT (depth 3, which finds orderings random rarely does)
/// for `pct`, both scaled by [`schedules`].
pub fn explore<F>(f: F, random: usize, pct: usize)
where
    F: Fn() + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let g = Arc::clone(&f);
    shuttle::check_random(move || f(), schedules(random));
    shuttle::check_pct(move || g(), schedules(pct), 3);
}
