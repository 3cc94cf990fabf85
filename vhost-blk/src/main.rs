//! `rimg-vhost-blk`: serves a raw, qcow2 or LUKS image to vhost-user-blk
//! frontends (QEMU, cloud-hypervisor, libblkio, rimg-vmm).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qcow2::encrypt::Secret;
use rimg_vhost_blk::server::{self, ServerConfig};
use rimg_vhost_server::cli::{self, ControlArg, SeccompArg, SocketArg, UserArg};

/// Serves until SIGTERM or SIGINT; exits 0 once the image is flushed.
fn main() -> ExitCode {
    cli::run("rimg-vhost-blk", serve)
}

#[derive(Parser)]
#[command(
    name = "rimg-vhost-blk",
    version,
    about = "vhost-user-blk daemon serving raw, qcow2 and LUKS images through io_uring"
)]
struct Args {
    #[command(flatten)]
    socket: SocketArg,
    /// Disk image to serve (backing files are opened read-only)
    #[arg(long, value_name = "FILE")]
    image: PathBuf,
    /// Image format; probed from the file when absent (a LUKS volume
    /// then needs --key-file; a raw image's first sector may not be
    /// written to look like another format, as QEMU guards probed raw
    /// images)
    #[arg(long, value_name = "qcow2|raw|luks")]
    format: Option<String>,
    /// Password of an encrypted image (qcow2 with encryption, or luks):
    /// the file's whole content, byte for byte (a trailing newline is
    /// part of it), as QEMU's `--object secret,file=FILE` reads it
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Serve read-only: the device offers VIRTIO_BLK_F_RO and refuses writes
    #[arg(long)]
    readonly: bool,
    /// Number of virtqueues, each served by its own thread and io_uring
    #[arg(long, default_value_t = 1, value_name = "N")]
    num_queues: u16,
    /// Maximum size of each virtqueue (power of two, at most 1024)
    #[arg(long, default_value_t = 256, value_name = "N")]
    queue_size: u16,
    /// Serial number returned to GET_ID requests (at most 20 bytes)
    #[arg(long, default_value = "", value_name = "ID")]
    serial: String,
    /// Do guest data I/O with O_DIRECT, bypassing the host page cache
    #[arg(long)]
    direct: bool,
    /// Bytes of qcow2 L2 tables to cache (default 32 MiB)
    #[arg(long, value_name = "BYTES")]
    cache_size: Option<u64>,
    /// After answering, each queue's worker keeps looking for new requests
    /// and completions this long before it sleeps: lower latency at low
    /// queue depth, for a busy core while the guest does I/O; only while
    /// fewer workers are awake than there are cores (default 0: it
    /// sleeps at once)
    #[arg(long, default_value_t = 0, value_name = "MICROSECONDS")]
    poll_us: u32,
    /// Sync the copy-on-write fill of every write into a new cluster over
    /// a backing file before answering, instead of keeping its mapping in
    /// the image's intent log until the next flush (slower; the log is
    /// replayed by the next writable open after a kill)
    #[arg(long)]
    no_intent_log: bool,
    #[command(flatten)]
    control: ControlArg,
    #[command(flatten)]
    user: UserArg,
    #[command(flatten)]
    seccomp: SeccompArg,
}

fn serve(a: Args) -> Result<(), String> {
    let format = match a.format.as_deref() {
        None => None,
        Some(f) => match qcow2::Format::from_name(f) {
            Some(f) => Some(f),
            None => {
                return Err(format!(
                    "unknown format '{f}' (expected qcow2, raw or luks)"
                ))
            }
        },
    };
    // Read once, here: the engine keeps what it derives from it.
    let key = match &a.key_file {
        None => None,
        Some(p) => Some(Secret(
            std::fs::read(p).map_err(|e| format!("--key-file {}: {e}", p.display()))?,
        )),
    };
    let cfg = ServerConfig {
        socket: a.socket.socket,
        image: a.image,
        format,
        key,
        readonly: a.readonly,
        num_queues: a.num_queues,
        queue_size: a.queue_size,
        serial: a.serial,
        direct: a.direct,
        l2_cache_bytes: a.cache_size,
        poll_us: a.poll_us,
        intent_log: !a.no_intent_log,
        control: a.control.control,
        user: a.user.user,
        seccomp: a.seccomp.seccomp,
    };
    server::run(cfg).map_err(|e| e.to_string())
}
