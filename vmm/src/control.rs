//! rimg-vmm's control socket (`--control PATH`; the protocol is the
//! daemons', `rimg_vhost_server::control`): `query-status` (running or
//! paused), `query-devices` (each device's link to its backend: `state`
//! up, reconnecting or failed, `reconnects` so far, and `inflight`: whether
//! the backend tracks its requests in an inflight region), `pause`, `resume`, and `quit`, which ends
//! the VM at once (exit status 0). Served by one thread, started before
//! the seccomp filter, one client at a time.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rimg_vhost_server::{CommandError, Commands, Frontend};
use serde_json::{json, Map, Value};

use crate::diag::Kick;
use crate::pause::Pause;
use crate::reconnect::Health;
use crate::vhost_user::Kind;

/// What `query-devices` reports of one device.
pub struct DeviceInfo {
    pub kind: Kind,
    pub socket: PathBuf,
    pub base: u64,
    pub irq: u32,
    pub health: Arc<Health>,
}

pub struct VmmControl {
    pub devices: Vec<DeviceInfo>,
    pub pause: Arc<Pause>,
    pub kick: Arc<Kick>,
}

impl VmmControl {
    fn status(&self) -> Value {
        let paused = self.pause.is_paused();
        json!({
            "status": if paused { "paused" } else { "running" },
            "running": !paused,
        })
    }

    fn devices(&self) -> Value {
        let list: Vec<Value> = self
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                json!({
                    "id": i,
                    "type": match d.kind {
                        Kind::Block => "virtio-blk",
                        Kind::Net => "virtio-net",
                    },
                    "socket": d.socket,
                    "mmio-base": d.base,
                    "irq": d.irq,
                    "failed": d.health.failed(),
                    "state": d.health.link().name(),
                    "reconnects": d.health.reconnects.load(Ordering::Acquire),
                    "inflight": d.health.inflight,
                })
            })
            .collect();
        Value::Array(list)
    }
}

impl Commands for VmmControl {
    fn names(&self) -> &'static [&'static str] {
        &["query-devices", "pause", "resume"]
    }

    fn execute(
        &self,
        name: &str,
        _args: &Map<String, Value>,
        _frontend: &Frontend,
    ) -> Option<Result<Value, CommandError>> {
        Some(match name {
            "query-status" => Ok(self.status()),
            "query-devices" => Ok(self.devices()),
            "pause" => self
                .pause
                .pause(&self.kick)
                .map(|()| json!({}))
                .map_err(CommandError::Failed),
            "resume" => {
                self.pause.resume();
                Ok(json!({}))
            }
            _ => return None,
        })
    }
}
