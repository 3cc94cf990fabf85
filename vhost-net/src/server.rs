//! The daemon's life: open (or create) the TAP once, then serve frontends
//! with the shared connection loop (`rimg_vhost_server`): each connection
//! gets fresh queue-pair workers on the same TAP. SIGTERM or SIGINT ends
//! the current connection and `run` returns.

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::NetBackend;
use crate::config::{Mac, NetConfig};
use crate::control::NetControl;
use crate::tap::{self, Tap};
use rimg_vhost_server::seccomp::RunAs;
use rimg_vhost_server::Control;

/// Everything the daemon is started with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub socket: PathBuf,
    pub tap: String,
    /// The daemon creates the TAP (and brings it up) rather than
    /// attaching to an existing one.
    pub create: bool,
    pub mac: Mac,
    pub queue_pairs: u16,
    pub queue_size: u16,
    pub mtu: Option<u16>,
    /// The control socket to create (`--control`).
    pub control: Option<PathBuf>,
    /// The user to become once set up (`--user`).
    pub user: Option<RunAs>,
    /// What a syscall outside the daemon's seccomp list does (or no
    /// filter).
    pub seccomp: rimg_vhost_server::SeccompAction,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tap(#[from] tap::Error),
    #[error("TAP {0} does not exist (use --tap-create to create it)")]
    NoTap(String),
    #[error("TAP {0} already exists (use --tap to attach to it)")]
    TapExists(String),
    #[error(transparent)]
    Serve(#[from] rimg_vhost_server::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
}

fn tap_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Serves until a termination signal.
pub fn run(cfg: ServerConfig) -> Result<(), Error> {
    if cfg.queue_pairs == 0 || cfg.queue_pairs > 16 {
        return Err(Error::Config("--num-queue-pairs must be 1..=16".into()));
    }
    if !cfg.queue_size.is_power_of_two() || !(64..=1024).contains(&cfg.queue_size) {
        return Err(Error::Config(
            "--queue-size must be a power of two from 64 to 1024".into(),
        ));
    }
    if let Some(m) = cfg.mtu {
        if !(68..=65535 - 14).contains(&m) {
            return Err(Error::Config("--mtu must be 68..=65521".into()));
        }
    }
    match (cfg.create, tap_exists(&cfg.tap)) {
        (true, true) => return Err(Error::TapExists(cfg.tap.clone())),
        (false, false) => return Err(Error::NoTap(cfg.tap.clone())),
        _ => {}
    }
    let tap = Arc::new(Tap::open(&cfg.tap, usize::from(cfg.queue_pairs))?);
    if cfg.create {
        tap.configure_link(cfg.mtu)?;
    }
    let net = NetConfig {
        mac: cfg.mac,
        queue_pairs: cfg.queue_pairs,
        queue_size: cfg.queue_size,
        mtu: cfg.mtu,
    };
    let announce = || {
        eprintln!(
            "rimg-vhost-net: serving TAP {} ({} queue pair(s), mac {}) on {}",
            tap.name(),
            tap.num_queues(),
            net.mac,
            cfg.socket.display()
        )
    };
    let control = Arc::new(NetControl::default());
    let commands = cfg.control.clone().map(|path| Control {
        path,
        commands: control.clone(),
        links: Vec::new(),
    });
    rimg_vhost_server::serve(
        "rimg-vhost-net",
        &cfg.socket,
        commands,
        cfg.seccomp,
        &rimg_vhost_server::Sandbox {
            run_as: cfg.user.clone(),
            ..crate::seccomp::sandbox()
        },
        announce,
        |mem| {
            Ok(Arc::new(NetBackend::new(
                net.clone(),
                tap.clone(),
                mem,
                control.clone(),
            )?))
        },
    )?;
    Ok(())
}
