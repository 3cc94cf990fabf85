//! `rimg-vhost-net`: bridges a guest's virtio-net queues (vhost-user
//! frontends: QEMU, DPDK virtio-user, rimg-vmm) to a Linux TAP device.

use std::process::ExitCode;

use clap::{ArgGroup, Parser};
use rimg_vhost_net::config::Mac;
use rimg_vhost_net::server::{self, ServerConfig};
use rimg_vhost_server::cli::{self, ControlArg, SeccompArg, SocketArg, UserArg};

#[derive(Parser)]
#[command(
    name = "rimg-vhost-net",
    version,
    about = "vhost-user-net daemon bridging virtio-net queues to a TAP device through io_uring",
    group(ArgGroup::new("tapdev").required(true).args(["tap", "tap_create"]))
)]
struct Args {
    #[command(flatten)]
    socket: SocketArg,
    /// Attach to the existing TAP device NAME (created with vnet_hdr, and
    /// multi_queue when more than one queue pair is used)
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// Create the TAP device NAME and bring it up; it disappears when the
    /// daemon exits
    #[arg(long, value_name = "NAME")]
    tap_create: Option<String>,
    /// MAC address offered to the guest (default: random 52:54:00:xx:xx:xx)
    #[arg(long, value_name = "MAC")]
    mac: Option<Mac>,
    /// Number of RX/TX queue pairs, each served by its own thread, io_uring
    /// and TAP queue
    #[arg(long, default_value_t = 1, value_name = "N")]
    num_queue_pairs: u16,
    /// Maximum size of each virtqueue (power of two, 64 to 1024)
    #[arg(long, default_value_t = 256, value_name = "N")]
    queue_size: u16,
    /// MTU offered to the guest (VIRTIO_NET_F_MTU) and set on a created TAP
    #[arg(long, value_name = "N")]
    mtu: Option<u16>,
    #[command(flatten)]
    control: ControlArg,
    #[command(flatten)]
    user: UserArg,
    #[command(flatten)]
    seccomp: SeccompArg,
}

fn serve(a: Args) -> Result<(), String> {
    let (tap, create) = match (a.tap, a.tap_create) {
        (Some(t), None) => (t, false),
        (None, Some(t)) => (t, true),
        _ => unreachable!("clap enforces exactly one of --tap and --tap-create"),
    };
    let cfg = ServerConfig {
        socket: a.socket.socket,
        tap,
        create,
        mac: a.mac.unwrap_or_else(Mac::random),
        queue_pairs: a.num_queue_pairs,
        queue_size: a.queue_size,
        mtu: a.mtu,
        control: a.control.control,
        user: a.user.user,
        seccomp: a.seccomp.seccomp,
    };
    server::run(cfg).map_err(|e| e.to_string())
}

/// Serves until SIGTERM or SIGINT.
fn main() -> ExitCode {
    cli::run("rimg-vhost-net", serve)
}
