//! The NIC daemon's control commands (see `rimg_vhost_server::control`
//! for the socket and the shared ones): `query-stats`, per queue pair,
//! counted since the daemon started.

use std::sync::{Arc, Mutex, MutexGuard};

use rimg_vhost_server::{CommandError, Commands, Frontend};
use serde_json::{json, Map, Value};

use crate::worker::Stats;

/// Counters of connections that ended, and the current connection's,
/// which its workers bump as they run.
#[derive(Default)]
pub struct NetControl(Mutex<Totals>);

#[derive(Default)]
struct Totals {
    ended: Vec<[u64; 6]>,
    current: Vec<Arc<Stats>>,
}

impl NetControl {
    fn lock(&self) -> MutexGuard<'_, Totals> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection's pairs count into `current` from now on.
    pub fn attach(&self, current: Vec<Arc<Stats>>) {
        let mut t = self.lock();
        t.fold();
        t.current = current;
    }

    /// The connection ended: its counts join the totals.
    pub fn detach(&self) {
        self.lock().fold();
    }

    fn stats(&self) -> Value {
        let t = self.lock();
        let n = t.ended.len().max(t.current.len());
        let pairs: Vec<Value> = (0..n)
            .map(|p| {
                let mut v = t.ended.get(p).copied().unwrap_or_default();
                if let Some(c) = t.current.get(p) {
                    for (a, b) in v.iter_mut().zip(c.values()) {
                        *a += b;
                    }
                }
                json!({
                    "pair": p,
                    "tx-frames": v[0],
                    "tx-gso-frames": v[1],
                    "tx-dropped": v[2],
                    "rx-frames": v[3],
                    "rx-gso-frames": v[4],
                    "rx-dropped": v[5],
                })
            })
            .collect();
        json!({ "pairs": pairs })
    }
}

impl Totals {
    fn fold(&mut self) {
        for (p, c) in std::mem::take(&mut self.current).into_iter().enumerate() {
            if self.ended.len() <= p {
                self.ended.resize(p + 1, [0; 6]);
            }
            for (a, b) in self.ended[p].iter_mut().zip(c.values()) {
                *a += b;
            }
        }
    }
}

impl Commands for NetControl {
    fn names(&self) -> &'static [&'static str] {
        &["query-stats"]
    }

    fn execute(
        &self,
        name: &str,
        _args: &Map<String, Value>,
        _frontend: &Frontend,
    ) -> Option<Result<Value, CommandError>> {
        (name == "query-stats").then(|| Ok(self.stats()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_ended_and_current_connections() {
        let c = NetControl::default();
        let a = Arc::new(Stats::default());
        c.attach(vec![a.clone()]);
        a.tx_frames.add(3);
        assert_eq!(c.stats()["pairs"][0]["tx-frames"], 3);
        c.detach();
        let b = Arc::new(Stats::default());
        let b2 = Arc::new(Stats::default());
        c.attach(vec![b.clone(), b2.clone()]);
        b.tx_frames.add(2);
        b2.rx_dropped.add(1);
        let s = c.stats();
        assert_eq!(s["pairs"][0]["tx-frames"], 5);
        assert_eq!(s["pairs"][1]["rx-dropped"], 1);
        // A counter bumped after its connection ended is not counted twice.
        c.detach();
        c.detach();
        assert_eq!(c.stats()["pairs"][0]["tx-frames"], 5);
    }
}
