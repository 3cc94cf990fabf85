//! The daemon's life: open the image (taking QEMU-compatible locks), then
//! serve one frontend connection at a time on the socket, forever: a
//! disconnect ends that connection's device state (rings, memory) and the
//! next frontend gets a fresh one on the same image. SIGTERM or SIGINT
//! ends the current connection, drains in-flight requests, flushes the
//! image and returns.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{info, warn};
use qcow2::{Format, Image, OpenOptions, Qcow2Options};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::BlkBackend;
use crate::config::DeviceConfig;
use crate::worker::DataFiles;

/// Everything the daemon is started with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub socket: PathBuf,
    pub image: PathBuf,
    pub format: Option<Format>,
    pub readonly: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: String,
    pub direct: bool,
    pub l2_cache_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Image(PathBuf, qcow2::Error),
    #[error("{0}: cannot open for O_DIRECT: {1}")]
    Direct(PathBuf, std::io::Error),
    #[error("cannot listen on {0}: {1}")]
    Listen(PathBuf, vhost::vhost_user::Error),
    #[error("vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Serves the image until a termination signal; returns after the final
/// flush.
pub fn run(cfg: ServerConfig) -> Result<(), Error> {
    if cfg.num_queues == 0 || cfg.num_queues > 64 {
        return Err(Error::Config("--num-queues must be 1..=64".into()));
    }
    if !cfg.queue_size.is_power_of_two() || cfg.queue_size > 1024 {
        return Err(Error::Config(
            "--queue-size must be a power of two up to 1024".into(),
        ));
    }
    let mut qopts = Qcow2Options::default();
    if let Some(b) = cfg.l2_cache_bytes {
        qopts.l2_cache_bytes = b;
    }
    let img: Arc<dyn Image> = qcow2::open(
        &cfg.image,
        &OpenOptions {
            writable: !cfg.readonly,
            format: cfg.format,
            qcow2: qopts,
            ..Default::default()
        },
    )
    .map_err(|e| Error::Image(cfg.image.clone(), e))?;
    let direct = if cfg.direct {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(!cfg.readonly)
            .custom_flags(libc::O_DIRECT)
            .open(&cfg.image)
            .map_err(|e| Error::Direct(cfg.image.clone(), e))?;
        Some(f)
    } else {
        None
    };
    let files = Arc::new(DataFiles {
        buffered: img.storage().file().as_raw_fd(),
        direct,
    });
    let opt_io = img
        .as_qcow2()
        .map(|q| q.cluster_size() as u32)
        .unwrap_or(4096)
        .max(512);
    let dev = DeviceConfig {
        capacity: img.size() & !511,
        num_queues: cfg.num_queues,
        queue_size: cfg.queue_size,
        readonly: cfg.readonly,
        serial: cfg.serial.as_bytes().iter().copied().take(20).collect(),
        opt_io_size: opt_io,
        blk_size: 512,
    };

    let mut listener =
        Listener::new(&cfg.socket, true).map_err(|e| Error::Listen(cfg.socket.clone(), e))?;
    let terminating = Arc::new(AtomicBool::new(false));
    let current: Arc<Mutex<Option<ShutdownHandle>>> = Arc::new(Mutex::new(None));
    spawn_signal_thread(cfg.socket.clone(), terminating.clone(), current.clone())?;
    eprintln!(
        "rimg-vhost-blk: serving {} ({}, {} bytes) on {}",
        cfg.image.display(),
        img.format().name(),
        img.size(),
        cfg.socket.display()
    );

    while !terminating.load(Ordering::SeqCst) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(
            img.clone(),
            files.clone(),
            dev.clone(),
            mem.clone(),
        )?);
        let mut daemon = VhostUserDaemon::new("rimg-vhost-blk".into(), backend.clone(), mem)
            .map_err(Error::Daemon)?;
        for (q, h) in daemon.get_epoll_handlers().iter().enumerate() {
            h.register_listener(
                backend.completion_fd(q),
                EventSet::IN,
                backend.completion_event_id(),
            )?;
        }
        daemon.start(&mut listener).map_err(Error::Daemon)?;
        {
            let mut cur = current.lock().unwrap_or_else(|p| p.into_inner());
            let h = daemon.shutdown_handle();
            if terminating.load(Ordering::SeqCst) {
                if let Some(h) = &h {
                    h.shutdown();
                }
            }
            *cur = h;
        }
        info!("frontend connected");
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => {}
            Err(e) => warn!("connection ended: {e}"),
        }
        *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // Dropping the daemon stops the queue threads; then finish what
        // they left in flight before the next connection.
        drop(daemon);
        backend.drain();
        drop(backend);
        if let Err(e) = img.flush() {
            warn!("flush after disconnect: {e}");
        }
        info!("frontend disconnected");
    }
    img.flush()
        .map_err(|e| Error::Image(cfg.image.clone(), e))?;
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

/// On SIGTERM/SIGINT: mark termination, end the current connection, and
/// wake a pending accept with a throwaway connection so the main loop
/// sees the flag.
fn spawn_signal_thread(
    socket: PathBuf,
    terminating: Arc<AtomicBool>,
    current: Arc<Mutex<Option<ShutdownHandle>>>,
) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                terminating.store(true, Ordering::SeqCst);
                if let Some(h) = current.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    h.shutdown();
                }
                let _ = UnixStream::connect(&socket);
            }
        })?;
    Ok(())
}
