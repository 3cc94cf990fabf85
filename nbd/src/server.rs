//! The server's life: listen (a UNIX socket, TCP on loopback unless told
//! otherwise, or a descriptor passed by systemd), serve each client on a
//! thread of its own, at most `shared` at once (qemu-nbd's `--shared`:
//! further clients wait in the listen backlog), and end on SIGTERM or
//! SIGINT, or, unless `persistent`, when the last client has gone. At the
//! end every connection is shut down and joined, and every image flushed.
//!
//! The accept loop sleeps in poll(2) on the listener and a wake-up pipe:
//! the signal thread and each ending connection write to the pipe, so the
//! loop sees a stop or a free slot at once.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{info, warn};

use crate::export::Exports;
use crate::tls::TlsCreds;
use crate::transmission::Policy;

/// How often failed accepts are reported at the most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Where to listen.
#[derive(Debug, Clone)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
    /// A listening socket already open (socket activation).
    Fd(RawFd),
}

#[derive(Debug)]
pub struct ServerConfig {
    pub exports: Exports,
    pub listen: Listen,
    /// Most clients served at once (0: no limit).
    pub shared: usize,
    /// Keep serving after the last client has gone.
    pub persistent: bool,
    pub policy: Policy,
    /// A client must finish its handshake within this time (None: no
    /// limit).
    pub handshake_limit: Option<Duration>,
    /// TLS credentials: with them, clients must start TLS first.
    pub tls: Option<TlsCreds>,
    /// The user to become once the images are open and the socket bound
    /// (`--user`).
    pub user: Option<rimg_seccomp::RunAs>,
    pub seccomp: rimg_seccomp::SeccompAction,
    /// `--fork`: tell the waiting parent once the server is up.
    pub ready: Option<crate::daemon::Ready>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {0}: {1}")]
    Listen(String, io::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("seccomp: {0}")]
    Seccomp(#[from] rimg_seccomp::Error),
    #[error("--user: {0}")]
    User(#[from] rimg_seccomp::user::UserError),
    #[error("flushing export '{0}': {1}")]
    Flush(String, qcow2::Error),
}

/// A client connection.
pub use qcow2::nbd::Socket as Stream;

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// The UNIX socket's file, removed at the end relative to its directory
/// (opened before the filter is installed: the filter then allows that
/// one unlinkat and no other path operation).
struct SocketFile {
    dir: OwnedFd,
    name: std::ffi::CString,
}

impl SocketFile {
    fn new(path: &std::path::Path) -> io::Result<SocketFile> {
        use std::os::unix::ffi::OsStrExt;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        let cdir = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
        let name = path.file_name().unwrap_or_default();
        let name = std::ffi::CString::new(name.as_bytes())?;
        // SAFETY: opens a path from a valid C string; the descriptor is
        // owned below.
        let fd = unsafe {
            libc::open(
                cdir.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SocketFile { dir, name })
    }

    fn remove(&self) {
        // SAFETY: unlinkat with our directory descriptor and a valid C
        // string.
        if unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) } != 0 {
            let e = io::Error::last_os_error();
            // Already gone (whoever stopped the server removed it, as
            // qemu-iotests do) is no failure; a daemon run with --user
            // whose socket's directory is not its own is.
            if e.kind() != io::ErrorKind::NotFound {
                warn!("cannot remove the socket {:?}: {e}", self.name);
            }
        }
    }
}

impl Listener {
    fn open(l: &Listen) -> Result<Listener, Error> {
        match l {
            Listen::Unix(p) => {
                // A stale socket file from an earlier run is replaced.
                let _ = std::fs::remove_file(p);
                UnixListener::bind(p)
                    .map(Listener::Unix)
                    .map_err(|e| Error::Listen(p.display().to_string(), e))
            }
            Listen::Tcp(a) => TcpListener::bind(a)
                .map(Listener::Tcp)
                .map_err(|e| Error::Listen(a.to_string(), e)),
            Listen::Fd(fd) => {
                // Checked before it is owned: a descriptor that is not a
                // listening socket may belong to something else here.
                let owned = rimg_vhost_server::activation::take_listener(*fd)
                    .map_err(|e| Error::Listen(format!("descriptor {fd}"), e))?;
                let unix =
                    rimg_vhost_server::activation::family(owned.as_raw_fd())? == libc::AF_UNIX;
                Ok(match unix {
                    true => Listener::Unix(UnixListener::from(owned)),
                    false => Listener::Tcp(TcpListener::from(owned)),
                })
            }
        }
    }

    /// Accepts never block: the loop polls first, and a client that
    /// went away in between must not stall it.
    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }

    /// Where clients reach it (a TCP port given as 0 is the one bound).
    fn describe(&self) -> String {
        match self {
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "an unnamed socket".into()),
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string()),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                // Replies are whole messages: send each at once.
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        })
    }
}

/// The accept loop's wake-up pipe.
struct Wake {
    r: OwnedFd,
    w: OwnedFd,
}

impl Wake {
    fn new() -> io::Result<Wake> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned here.
        Ok(unsafe {
            Wake {
                r: OwnedFd::from_raw_fd(fds[0]),
                w: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }

    fn wake(&self) {
        // A full pipe already wakes the loop: the result does not matter.
        // SAFETY: writes one byte from a live buffer to our own pipe.
        let _ = unsafe { libc::write(self.w.as_raw_fd(), b"x".as_ptr().cast(), 1) };
    }

    fn drain(&self) {
        let mut b = [0u8; 64];
        // SAFETY: reads into a live buffer from our own non-blocking pipe.
        while unsafe { libc::read(self.r.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) } > 0 {}
    }
}

/// Waits until one of `fds` is readable (or a signal interrupts).
fn poll_in(fds: &[RawFd]) -> io::Result<()> {
    poll_in_for(fds, -1)
}

/// As [`poll_in`], for at most `ms` milliseconds (-1: no limit).
fn poll_in_for(fds: &[RawFd], ms: i32) -> io::Result<()> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a live array of `p.len()` pollfds.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// The live set, whatever a panicking holder left behind.
fn lock(l: &Mutex<Live>) -> std::sync::MutexGuard<'_, Live> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ends a connection's membership of [`Live`] when its thread ends.
struct Leave {
    id: u64,
    live: Arc<Mutex<Live>>,
    wake: Arc<Wake>,
}

impl Drop for Leave {
    fn drop(&mut self) {
        let id = self.id;
        lock(&self.live).conns.retain(|(i, _)| *i != id);
        self.wake.wake();
    }
}

struct Live {
    next_id: u64,
    /// Each live connection's clone, to shut it down at the end.
    conns: Vec<(u64, Stream)>,
    threads: Vec<JoinHandle<()>>,
}

/// Serves until a termination signal, or (not persistent) until the last
/// client has gone; returns after every image is flushed.
pub fn run(mut cfg: ServerConfig) -> Result<(), Error> {
    let listener = Listener::open(&cfg.listen)?;
    listener.set_nonblocking()?;
    let socket_file = match &cfg.listen {
        Listen::Unix(p) => Some(SocketFile::new(p)?),
        _ => None,
    };
    // Connected while still root: a manager's socket may be root's.
    let notifier = rimg_vhost_server::notify::Notifier::from_env();
    if let Some(user) = &cfg.user {
        user.assume()?;
    }
    let live = Arc::new(Mutex::new(Live {
        next_id: 0,
        conns: Vec::new(),
        threads: Vec::new(),
    }));
    let wake = Arc::new(Wake::new()?);
    let stop = Arc::new(AtomicBool::new(false));
    {
        use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1])?;
        let (stop, wake, live) = (stop.clone(), wake.clone(), live.clone());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if sig == SIGUSR1 {
                        let ids: Vec<u64> = live
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .conns
                            .iter()
                            .map(|c| c.0)
                            .collect();
                        // Never a panic here (stderr may be closed): this
                        // thread must live on to handle SIGTERM.
                        let _ = write!(
                            io::stderr(),
                            "state dump (SIGUSR1):\nclients connected: {ids:?}\nstate dump end\n"
                        );
                        continue;
                    }
                    info!("signal {sig}: ending");
                    stop.store(true, Ordering::SeqCst);
                    wake.wake();
                }
            })?;
    }
    let mut sandbox = crate::seccomp::sandbox();
    if let Some(f) = &socket_file {
        sandbox.allow_if(
            libc::SYS_unlinkat,
            &[rimg_seccomp::Arg::Eq32(0, f.dir.as_raw_fd() as u32)],
        );
    }
    // Info, so silent by default as qemu-nbd is (QEMU's iotests compare
    // its stderr); tests and scripts that wait for it run with
    // RUST_LOG=info. Printed once the socket is bound.
    let line = format!(
        "serving {} export(s) on {}",
        cfg.exports.list.len(),
        listener.describe()
    );
    match cfg.ready.take() {
        // Forked: the line goes to the parent, which returns once the
        // streams are let go (dup2, before the filter forbids it).
        Some(ready) => {
            info!("{line}");
            ready.signal();
            sandbox.install(cfg.seccomp)?;
        }
        None => {
            sandbox.install(cfg.seccomp)?;
            info!("{line}");
        }
    }
    if cfg.seccomp != rimg_seccomp::SeccompAction::Off {
        crate::seccomp::confined();
    }
    if let Some(n) = &notifier {
        n.ready();
    }
    let exports = Arc::new(cfg.exports);
    let mut served = false;
    // At most one warning every WARN_EVERY about failed accepts, not one
    // per attempt: a server at its descriptor limit, whose clients come
    // and go, would otherwise warn at each turn.
    let mut warned: Option<std::time::Instant> = None;
    loop {
        wake.drain();
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let active = lock(&live).conns.len();
        if served && active == 0 && !cfg.persistent {
            info!("last client gone: ending (not --persistent)");
            break;
        }
        if cfg.shared != 0 && active >= cfg.shared {
            poll_in(&[wake.r.as_raw_fd()])?;
            continue;
        }
        poll_in(&[listener.fd(), wake.r.as_raw_fd()])?;
        if stop.load(Ordering::SeqCst) {
            break;
        }
        // Out of descriptors, threads or memory: the client is turned
        // away (or left in the backlog) and the loop waits for a
        // connection to end, or a second, before it tries again.
        let mut back_off = |what: &str, e: io::Error| -> io::Result<()> {
            if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                warn!("{what}: {e} (retrying once a client leaves, or each second)");
                warned = Some(std::time::Instant::now());
            }
            poll_in_for(&[wake.r.as_raw_fd()], 1000)
        };
        let stream = match accept_ready(&listener) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                back_off("accept", e)?;
                continue;
            }
        };
        let clone = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                back_off("new client", e)?;
                continue;
            }
        };
        let id = {
            let mut l = lock(&live);
            let id = l.next_id;
            l.next_id += 1;
            l.conns.push((id, clone));
            id
        };
        let leave = Leave {
            id,
            live: live.clone(),
            wake: wake.clone(),
        };
        let exports = exports.clone();
        let (policy, limit, tls) = (cfg.policy, cfg.handshake_limit, cfg.tls.clone());
        // Spawned without the lock held: a spawn that fails drops the
        // closure, whose Leave takes the lock to free the slot.
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                // Frees the slot however the thread ends, a panic too.
                let _leave = leave;
                crate::connection::run(id, stream, &exports, policy, limit, tls.as_ref());
            });
        let t = match spawned {
            Ok(t) => t,
            Err(e) => {
                back_off("new client thread", e)?;
                continue;
            }
        };
        served = true;
        let mut l = lock(&live);
        l.threads.push(t);
        // Joined at the end; finished ones are reaped as they pile up.
        if l.threads.len() > 64 {
            let (done, running): (Vec<_>, Vec<_>) =
                l.threads.drain(..).partition(|t| t.is_finished());
            l.threads = running;
            for t in done {
                let _ = t.join();
            }
        }
    }
    if let Some(n) = &notifier {
        n.stopping();
    }
    let threads = {
        let mut l = lock(&live);
        for (_, s) in &l.conns {
            s.shutdown();
        }
        std::mem::take(&mut l.threads)
    };
    for t in threads {
        let _ = t.join();
    }
    if let Some(f) = &socket_file {
        f.remove();
    }
    for e in &exports.list {
        if !e.readonly {
            e.image
                .finish()
                .map_err(|err| Error::Flush(e.name.clone(), err))?;
        }
    }
    Ok(())
}

/// Accepts the pending client, if one is still there.
fn accept_ready(l: &Listener) -> io::Result<Option<Stream>> {
    match l.accept() {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
