//! `rimg-vhost-blk`: serves a raw or qcow2 image to vhost-user-blk
//! frontends (QEMU, cloud-hypervisor, libblkio, rimg-vmm).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rimg_vhost_blk::server::{self, ServerConfig};
use rimg_vhost_server::cli::{self, SeccompArg, SocketArg};

/// Serves until SIGTERM or SIGINT; exits 0 once the image is flushed.
fn main() -> ExitCode {
    cli::run("rimg-vhost-blk", serve)
}

#[derive(Parser)]
#[command(
    name = "rimg-vhost-blk",
    version,
    about = "vhost-user-blk daemon serving raw and qcow2 images through io_uring"
)]
struct Args {
    #[command(flatten)]
    socket: SocketArg,
    /// Disk image to serve (backing files are opened read-only)
    #[arg(long, value_name = "FILE")]
    image: PathBuf,
    /// Image format; probed from the file when absent
    #[arg(long, value_name = "qcow2|raw")]
    format: Option<String>,
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
    #[command(flatten)]
    seccomp: SeccompArg,
}

fn serve(a: Args) -> Result<(), String> {
    let format = match a.format.as_deref() {
        None => None,
        Some(f) => match qcow2::Format::from_name(f) {
            Some(f) => Some(f),
            None => return Err(format!("unknown format '{f}' (expected qcow2 or raw)")),
        },
    };
    let cfg = ServerConfig {
        socket: a.socket.socket,
        image: a.image,
        format,
        readonly: a.readonly,
        num_queues: a.num_queues,
        queue_size: a.queue_size,
        serial: a.serial,
        direct: a.direct,
        l2_cache_bytes: a.cache_size,
        seccomp: a.seccomp.seccomp,
    };
    server::run(cfg).map_err(|e| e.to_string())
}
