//! The block daemon's control commands (see `rimg_vhost_server::control`
//! for the socket and the shared ones): `query-block` (the image),
//! `query-stats`, per queue, `resize`, which grows the image under a
//! running guest and tells the frontend to read the new capacity, the
//! dirty bitmap edits and `checksum`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::warn;
use qcow2::Image;
use rimg_vhost_server::stats::{Counter, Histogram};
use rimg_vhost_server::{CommandError, Commands, Frontend};
use serde_json::{json, Map, Value};

use crate::request::Kind;

/// One queue's counters, kept across frontend connections.
#[derive(Default)]
pub struct QueueStats {
    reads: Counter,
    writes: Counter,
    flushes: Counter,
    discards: Counter,
    write_zeroes: Counter,
    get_ids: Counter,
    /// Requests answered with an error status, or returned unanswered.
    failed: Counter,
    read_bytes: Counter,
    written_bytes: Counter,
    latency: Histogram,
}

impl QueueStats {
    /// A request ended (`kind` None: it could not be decoded), answered
    /// after `took` (None: returned without a status); `bytes` of data
    /// moved when `ok`.
    pub fn answered(&self, kind: Option<Kind>, ok: bool, bytes: u64, took: Option<Duration>) {
        let c = match kind {
            Some(Kind::In) => &self.reads,
            Some(Kind::Out) => &self.writes,
            Some(Kind::Flush) => &self.flushes,
            Some(Kind::Discard) => &self.discards,
            Some(Kind::WriteZeroes) => &self.write_zeroes,
            Some(Kind::GetId) => &self.get_ids,
            None => &self.failed,
        };
        c.add(1);
        if kind.is_some() && !ok {
            self.failed.add(1);
        }
        if ok {
            match kind {
                Some(Kind::In) => self.read_bytes.add(bytes),
                Some(Kind::Out) => self.written_bytes.add(bytes),
                _ => {}
            }
        }
        if let Some(t) = took {
            self.latency.record(t);
        }
    }

    fn to_json(&self, queue: usize) -> Value {
        json!({
            "queue": queue,
            "reads": self.reads.get(),
            "writes": self.writes.get(),
            "flushes": self.flushes.get(),
            "discards": self.discards.get(),
            "write-zeroes": self.write_zeroes.get(),
            "get-ids": self.get_ids.get(),
            "failed": self.failed.get(),
            "read-bytes": self.read_bytes.get(),
            "written-bytes": self.written_bytes.get(),
            "latency": self.latency.to_json(),
        })
    }
}

/// What the commands act on, shared with every connection's backend.
pub struct BlkControl {
    pub img: Arc<dyn Image>,
    /// The capacity the device shows, in bytes (the image's size rounded
    /// down to sectors): workers check requests against it and the
    /// config space reports it.
    pub capacity: Arc<AtomicU64>,
    pub stats: Vec<Arc<QueueStats>>,
    pub readonly: bool,
    /// The image file's device and inode, for `rimg resize` to check it
    /// asks the daemon serving the file it was given.
    pub file_id: Option<(u64, u64)>,
    /// One resize at a time.
    resizing: Mutex<()>,
    /// One checksum at a time.
    checksumming: Mutex<()>,
    /// Set when the daemon stops: a running checksum ends.
    cancel: AtomicBool,
}

impl BlkControl {
    pub fn new(
        img: Arc<dyn Image>,
        queues: usize,
        readonly: bool,
        file_id: Option<(u64, u64)>,
    ) -> BlkControl {
        BlkControl {
            file_id,
            capacity: Arc::new(AtomicU64::new(img.size() & !511)),
            img,
            stats: (0..queues).map(|_| Arc::default()).collect(),
            readonly,
            resizing: Mutex::new(()),
            checksumming: Mutex::new(()),
            cancel: AtomicBool::new(false),
        }
    }

    fn stats(&self) -> Value {
        let queues: Vec<Value> = self
            .stats
            .iter()
            .enumerate()
            .map(|(q, s)| s.to_json(q))
            .collect();
        json!({ "queues": queues })
    }

    /// Grows the image to `size` bytes, then shows the guest the new
    /// capacity: published for the workers and the config space only
    /// once the image has it, then announced to the frontend.
    fn resize(
        &self,
        args: &Map<String, Value>,
        frontend: &Frontend,
    ) -> Result<Value, CommandError> {
        let size = args.get("size").and_then(Value::as_u64).ok_or_else(|| {
            CommandError::Invalid("'size' (bytes, an integer) is required".into())
        })?;
        if self.readonly {
            return Err(CommandError::Invalid("the disk is served read-only".into()));
        }
        if size % 512 != 0 {
            return Err(CommandError::Invalid(format!(
                "size {size} is not a multiple of 512"
            )));
        }
        let _one = self.resizing.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.img.size();
        if size < old {
            // The guest may hold data there: it must shrink its file
            // system and partitions first, which an online resize cannot
            // know. qemu-img resize --shrink on the stopped disk can.
            return Err(CommandError::Invalid(format!(
                "size {size} is smaller than the disk ({old} bytes): a served disk only grows"
            )));
        }
        if size > old {
            self.img
                .resize(size)
                .map_err(|e| CommandError::Failed(format!("resize: {e}")))?;
            self.img
                .flush()
                .map_err(|e| CommandError::Failed(format!("flush after resize: {e}")))?;
        }
        self.capacity.store(size, Ordering::Release);
        // The disk has grown whatever the frontend does with the news: a
        // channel that fails is reported, not an error.
        let mut answer = json!({ "size": size, "old-size": old });
        match frontend.config_changed() {
            Ok(n) => answer["frontend-notified"] = json!(n),
            Err(e) => {
                warn!("resize: telling the frontend: {e}");
                answer["frontend-notified"] = json!(false);
                answer["notify-error"] = json!(e.to_string());
            }
        }
        Ok(answer)
    }
}

impl BlkControl {
    /// QMP's block-dirty-bitmap-{add,remove,clear,enable,disable} on the
    /// served image (`name`; add: `granularity`, `disabled`; a bitmap is
    /// always persistent, stored when the daemon closes the image). The
    /// engine records the edits in its session state, as `rimg bitmap`
    /// does; guest writes mark enabled bitmaps from then on.
    fn bitmap(&self, cmd: &str, args: &Map<String, Value>) -> Option<Result<Value, CommandError>> {
        let op = cmd.strip_prefix("block-dirty-bitmap-")?;
        if !["add", "remove", "clear", "enable", "disable"].contains(&op) {
            return None;
        }
        Some((|| {
            let name = args
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| CommandError::Invalid("'name' (a string) is required".into()))?;
            let q = self.img.as_qcow2().ok_or_else(|| {
                CommandError::Invalid(format!(
                    "a {} image has no dirty bitmaps",
                    self.img.format().name()
                ))
            })?;
            let t = q.bitmap_tracker().ok_or_else(|| {
                CommandError::Invalid(
                    "the image is served read-only: its bitmaps cannot change".into(),
                )
            })?;
            let r = match op {
                "add" => {
                    let g = match args.get("granularity") {
                        None => None,
                        Some(v) => Some(v.as_u64().ok_or_else(|| {
                            CommandError::Invalid("'granularity' must be an integer".into())
                        })?),
                    };
                    let disabled = args
                        .get("disabled")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                    t.add(q, name, g, disabled)
                }
                "remove" => t.remove(q, name),
                "clear" => t.clear(name),
                "enable" => t.set_enabled(name, true),
                _ => t.set_enabled(name, false),
            };
            r.map(|()| json!({}))
                .map_err(|e| CommandError::Failed(e.to_string()))
        })())
    }
}

impl BlkControl {
    /// `rimg checksum` of the served content (`qcow2::checksum`), hashed
    /// on the asking client's thread alone, one checksum at a time (it
    /// reads the whole disk); the queues go on. Writes that land during
    /// it may or may not count: a value to compare needs a quiet guest.
    /// A stopping daemon cancels it.
    fn checksum(&self) -> Result<Value, CommandError> {
        let Ok(_one) = self.checksumming.try_lock() else {
            return Err(CommandError::Invalid(
                "a checksum is running already".into(),
            ));
        };
        let chain = qcow2::blockstatus::Chain::new(&self.img)
            .map_err(|e| CommandError::Failed(format!("checksum: {e}")))?;
        let d = qcow2::checksum::checksum(&chain, 1, &|_| {}, &self.cancel)
            .map_err(|e| CommandError::Failed(format!("checksum: {e}")))?;
        Ok(json!({
            "checksum": qcow2::checksum::hex(&d),
            "size": chain.len(),
        }))
    }
}

impl Commands for BlkControl {
    fn names(&self) -> &'static [&'static str] {
        &[
            "query-block",
            "query-stats",
            "resize",
            "block-dirty-bitmap-add",
            "block-dirty-bitmap-remove",
            "block-dirty-bitmap-clear",
            "block-dirty-bitmap-enable",
            "block-dirty-bitmap-disable",
            "checksum",
        ]
    }

    fn execute(
        &self,
        name: &str,
        args: &Map<String, Value>,
        frontend: &Frontend,
    ) -> Option<Result<Value, CommandError>> {
        match name {
            "query-block" => Some(Ok(json!({
                "image": self.img.path(),
                "format": self.img.format().name(),
                "virtual-size": self.img.size(),
                "read-only": self.readonly,
                "file-dev": self.file_id.map(|i| i.0),
                "file-ino": self.file_id.map(|i| i.1),
            }))),
            "query-stats" => Some(Ok(self.stats())),
            "resize" => Some(self.resize(args, frontend)),
            "checksum" => Some(self.checksum()),
            n if n.starts_with("block-dirty-bitmap-") => self.bitmap(n, args),
            _ => None,
        }
    }

    fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// Makes `link` a symbolic link to the control socket `socket`, in a
/// directory only this user can use (created with mode 0700 when
/// missing; refused when someone else could write there). What
/// `rimg resize` follows to find the daemon serving an image
/// (`qcow2::paths::control_link`).
pub fn publish_link(link: &Path, socket: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = link
        .parent()
        .ok_or_else(|| std::io::Error::other("link without a directory"))?;
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir);
    if !qcow2::paths::trusted_dir(dir) {
        return Err(std::io::Error::other(format!(
            "{}: not a directory of this user's alone (mode 0700)",
            dir.display()
        )));
    }
    let target = match (socket.parent(), socket.file_name()) {
        (Some(p), Some(f)) if !p.as_os_str().is_empty() => p.canonicalize()?.join(f),
        (_, Some(f)) => std::env::current_dir()?.join(f),
        _ => return Err(std::io::Error::other("control socket without a name")),
    };
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
}
