//! The daemon layer shared by rimg's vhost-user daemons, which keep only
//! what is specific to blocks or frames: the connection loop ([`serve`]),
//! the vhost-user backend built from a [`Device`] and its [`workers`],
//! ring checks ([`avail`]) and used-ring notification ([`used`]), worker
//! io_uring rings with one submission and teardown policy ([`uring`]),
//! buffered writes made by the worker where the ring would hand them to
//! a thread ([`inline`]; rimg-nbd's connections use rings and inline
//! writes too), seccomp lists, capped warnings and the common command
//! line ([`cli`]).
//!
//! The life of a daemon: listen on a UNIX socket and serve one frontend
//! connection at a time, forever. A disconnect ends that connection's
//! device state (rings, guest memory); the next frontend gets a fresh
//! device on the same resources (image, TAP). SIGTERM or SIGINT ends the
//! current connection and makes [`serve`] return, so the caller can flush
//! and exit 0.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

pub mod activation;
pub mod avail;
pub mod chain;
pub mod cli;
pub mod control;
pub mod device;
pub mod frontend;
pub mod inflight;
pub mod inline;
pub mod notify;
mod relay;
pub mod seccomp;
pub mod stats;
#[cfg(test)]
mod test_queue;
pub mod uring;
pub mod used;
pub mod warn;
pub mod workers;

pub use control::{CommandError, Commands, Control};
pub use device::{config_window, Backend, Device};
pub use frontend::Frontend;
pub use seccomp::{Sandbox, SeccompAction, SyscallList};
pub use uring::{restricted_ring, RingOwner, WorkerRing};
pub use warn::CappedWarnings;

/// Guest memory as the daemons see it.
pub type Mem = GuestMemoryMmap<()>;
pub type GM = GuestMemoryAtomic<Mem>;
pub type Vring = VringRwLock<GM>;

/// The current connection's backend, as the signal thread sees it.
type Current = Arc<Mutex<Option<(ShutdownHandle, Arc<dyn Fn() -> String + Send + Sync>)>>>;

/// Worker-thread exit events, one per thread, handed to the framework
/// through `VhostUserBackend::exit_event`.
pub struct ExitEvents(Vec<(EventConsumer, EventNotifier)>);

impl ExitEvents {
    pub fn new(threads: usize) -> std::io::Result<ExitEvents> {
        (0..threads)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()
            .map(ExitEvents)
    }

    /// Copies of thread `i`'s pair, as `exit_event` returns them.
    pub fn get(&self, i: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.0.get(i)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {0}: {1}")]
    Listen(PathBuf, vhost::vhost_user::Error),
    #[error("vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
    #[error("--user: {0}")]
    User(#[from] rimg_seccomp::user::UserError),
}

/// Serves frontends on `socket` until SIGTERM, SIGINT or the control
/// socket's `quit`. `control` is the control socket and the daemon's
/// commands there (see [`control`]). `ready` runs once the sockets are
/// bound and the seccomp filters of `sandbox` (plus this loop's own
/// needs, see [`seccomp`]) are installed for `action` (daemons print
/// their "serving" line there, which tests and scripts wait for); `make`
/// builds a fresh device for each connection (its workers' threads call
/// [`seccomp::enter_vring_worker`] first, see [`workers`]). Returns after
/// the last connection's device was dropped.
pub fn serve<D, F>(
    name: &str,
    socket: &Path,
    control: Option<Control>,
    action: SeccompAction,
    sandbox: &Sandbox,
    ready: impl FnOnce(),
    mut make: F,
) -> Result<(), Error>
where
    D: Device,
    F: FnMut(GM) -> std::io::Result<Arc<D>>,
{
    // Frontends connect to the public socket; each connection is relayed
    // (see `relay`) to the vhost-user handler through a private socket.
    // A socket the service manager passed (socket activation) is its
    // own: used as it is, and left in place at exit.
    let listen_err = |e| {
        Error::Listen(
            socket.to_path_buf(),
            vhost::vhost_user::Error::SocketError(e),
        )
    };
    let (public, activated) = match activation::passed() {
        Some(fd) => {
            let owned = activation::take_listener(fd).map_err(listen_err)?;
            if activation::family(std::os::fd::AsRawFd::as_raw_fd(&owned)).map_err(listen_err)?
                != libc::AF_UNIX
            {
                return Err(listen_err(std::io::Error::other(
                    "the socket passed (LISTEN_FDS) is not a UNIX socket",
                )));
            }
            (UnixListener::from(owned), true)
        }
        None => {
            let _ = std::fs::remove_file(socket);
            (UnixListener::bind(socket).map_err(listen_err)?, false)
        }
    };
    let notifier = notify::Notifier::from_env().map(Arc::new);
    let ending = Ending {
        wake: Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?),
        terminating: Arc::new(AtomicBool::new(false)),
        current: Arc::new(Mutex::new(None)),
        notifier: notifier.clone(),
    };
    let terminating = ending.terminating.clone();
    let ending_wake = ending.wake.clone();
    let current = ending.current.clone();
    let frontend = Frontend::default();
    let mut own = seccomp::common();
    // The sockets' directories stay open: removing the sockets at exit is
    // the one path operation left once the filter is in place, and it is
    // allowed relative to these descriptors only.
    let mut sockets = Vec::new();
    if !activated {
        sockets.push(socket_dir(socket)?);
    }
    let control = match control {
        Some(c) => {
            let l = control::owner_only_listener(&c.path).map_err(|e| {
                Error::Listen(c.path.clone(), vhost::vhost_user::Error::SocketError(e))
            })?;
            sockets.push(socket_dir(&c.path)?);
            for link in &c.links {
                sockets.push(socket_dir(link)?);
            }
            Some((c, l))
        }
        None => None,
    };
    let (private, listener) = PrivateSocket::new()?;
    let mut listener = Listener::from(listener);
    // The sockets stay as they were bound (the control socket root's:
    // root's `rimg ctl` is the administrator), except the private one,
    // which the daemon connects to itself.
    if let Some(user) = &sandbox.run_as {
        private.give_to(user)?;
        user.assume()?;
    }
    let mut control_threads = None;
    if let Some((c, l)) = control {
        let end = ending.clone();
        let shared = control::Shared {
            commands: c.commands,
            frontend: frontend.clone(),
            quit: Box::new(move || end.terminate()),
        };
        control_threads = Some(control::spawn(l, Arc::new(shared))?);
    }
    spawn_signal_thread(ending)?;

    for (dir, _) in &sockets {
        own.allow_if(
            libc::SYS_unlinkat,
            &[seccomp::Arg::Eq32(0, dir.as_raw_fd() as u32)],
        );
    }
    sandbox.install(action, &own)?;
    ready();
    if let Some(n) = &notifier {
        n.ready();
    }

    while !terminating.load(Ordering::SeqCst) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = make(mem.clone())?;
        let mut daemon = VhostUserDaemon::new(name.to_string(), Backend(backend.clone()), mem)
            .map_err(Error::Daemon)?;
        let handlers = daemon.get_epoll_handlers();
        for (thread, fd, id) in backend.workers().listeners() {
            if let Some(h) = handlers.get(thread) {
                h.register_listener(fd, EventSet::IN, id)?;
            }
        }
        drop(handlers);
        let Some(front) = accept_unless_ending(&public, &ending_wake)? else {
            break;
        };
        let back = private.connect()?;
        daemon.start(&mut listener).map_err(Error::Daemon)?;
        frontend.connected();
        let relay = relay::spawn(front, back, frontend.clone(), backend.inflight().cloned())?;
        {
            let mut cur = current.lock().unwrap_or_else(|p| p.into_inner());
            let h = daemon.shutdown_handle();
            // A signal that arrived while we were accepting: end at once.
            if terminating.load(Ordering::SeqCst) {
                if let Some(h) = &h {
                    h.shutdown();
                }
            }
            let b = backend.clone();
            *cur = h.map(|h| {
                let dump: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || b.dump_state());
                (h, dump)
            });
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

        // Dropping the daemon stops the worker threads; the backend then
        // finishes what they left in flight, before the next connection.
        drop(daemon);
        for t in relay {
            let _ = t.join();
        }
        // After the relay: a late SET_BACKEND_REQ_FD cannot leave the old
        // frontend's channel behind.
        frontend.disconnected();
        backend.disconnected();
        drop(backend);
        info!("frontend disconnected");
    }
    // The commands hold the daemon's image: they must be gone before the
    // caller closes it.
    if let Some(c) = control_threads {
        c.stop();
    }
    for (dir, file_name) in &sockets {
        // SAFETY: unlinkat with a directory descriptor we hold open and a
        // NUL-terminated name that outlives the call.
        if unsafe { libc::unlinkat(dir.as_raw_fd(), file_name.as_ptr(), 0) } != 0 {
            warn!(
                "cannot remove {:?}: {}",
                file_name,
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// The directory holding `socket` (opened O_PATH) and the socket's file
/// name in it.
fn socket_dir(socket: &Path) -> std::io::Result<(File, CString)> {
    let name = socket
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{}: no file name", socket.display())))?;
    let parent = match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(parent)?;
    let name = CString::new(name.as_bytes()).map_err(std::io::Error::other)?;
    Ok((dir, name))
}

/// The handler's listening socket, reachable by this process only and
/// without a name in the file system: bound in a fresh mode-0700
/// directory, then held by an O_PATH descriptor while its name and the
/// directory are removed. Connections go through `/proc/self/fd/N`, the
/// descriptor's link to the socket, so nothing is left to clean up and no
/// path operation is needed once the seccomp filter is in place.
struct PrivateSocket {
    path: PathBuf,
    inode: File,
}

impl PrivateSocket {
    fn new() -> std::io::Result<(PrivateSocket, UnixListener)> {
        let dir = tempfile_dir()?;
        let named = dir.join("handler.sock");
        let made = (|| {
            let listener = UnixListener::bind(&named)?;
            let inode = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open(&named)?;
            Ok::<_, std::io::Error>((listener, inode))
        })();
        let _ = std::fs::remove_file(&named);
        let _ = std::fs::remove_dir(&dir);
        let (listener, inode) = made?;
        let s = PrivateSocket {
            path: PathBuf::from(format!("/proc/self/fd/{}", inode.as_raw_fd())),
            inode,
        };
        // Check the route once now, for a clear error (no /proc?) before
        // any frontend comes.
        let probe = s.connect().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("private socket via {}: {e}", s.path.display()),
            )
        })?;
        listener.accept()?;
        drop(probe);
        Ok((s, listener))
    }

    fn connect(&self) -> std::io::Result<UnixStream> {
        UnixStream::connect(&self.path)
    }

    /// Makes the socket `user`'s, who connects to it once the daemon
    /// runs as them: through the descriptor, as the name is gone.
    fn give_to(&self, user: &rimg_seccomp::RunAs) -> std::io::Result<()> {
        // SAFETY: fchownat on a descriptor we hold, with an empty
        // NUL-terminated path (AT_EMPTY_PATH: the descriptor itself).
        let r = unsafe {
            libc::fchownat(
                self.inode.as_raw_fd(),
                c"".as_ptr(),
                user.uid,
                user.gid,
                libc::AT_EMPTY_PATH,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A private directory for the handler's socket while it is bound (mode
/// 0700, under the system temporary directory).
fn tempfile_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "rimg-vhost-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// How the daemon ends: SIGTERM, SIGINT or the control socket's `quit`
/// mark termination, tell the service manager, and end the current
/// connection; with none, they wake the pending accept through `wake`.
/// (With a connection the loop sees the flag once it ends: it is set
/// under the lock the loop takes to clear `current`.) No connection to
/// the socket itself: it would stay queued on a socket systemd holds and
/// start the daemon again, and a daemon run with `--user` may not be
/// allowed to connect to its own socket.
#[derive(Clone)]
struct Ending {
    wake: Arc<vmm_sys_util::eventfd::EventFd>,
    terminating: Arc<AtomicBool>,
    current: Current,
    notifier: Option<Arc<notify::Notifier>>,
}

impl Ending {
    fn terminate(&self) {
        let cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if self.terminating.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(n) = &self.notifier {
            n.stopping();
        }
        match cur.as_ref() {
            Some((h, _)) => h.shutdown(),
            None => {
                drop(cur);
                let _ = self.wake.write(1);
            }
        }
    }
}

/// The next frontend on `public`, or `None` once `wake` is signalled
/// (the daemon is ending). A connection poll saw stays queued until
/// accepted, even if its peer closed, so the accept does not block.
fn accept_unless_ending(
    public: &UnixListener,
    wake: &vmm_sys_util::eventfd::EventFd,
) -> std::io::Result<Option<UnixStream>> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: public.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll reads and writes the two pollfds, which live
        // across the call, and nothing else.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(None);
        }
        if fds[0].revents != 0 {
            return public.accept().map(|(s, _)| Some(s));
        }
    }
}

/// On SIGTERM/SIGINT: [`Ending::terminate`]. On SIGUSR1: print the
/// current connection's state dump ([`Device::dump_state`]) on stderr,
/// for hangs to be diagnosed.
fn spawn_signal_thread(ending: Ending) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig != SIGUSR1 {
                    ending.terminate();
                    continue;
                }
                // Dumped outside the lock: SIGTERM must still work if the
                // dump is slow.
                let cur = ending.current.lock().unwrap_or_else(|p| p.into_inner());
                let dump = cur.as_ref().map(|(_, d)| d.clone());
                drop(cur);
                let dump = dump.map_or_else(|| "no frontend connected\n".into(), |d| d());
                // Never a panic here: with stderr closed, the signal
                // thread must live on to handle SIGTERM.
                use std::io::Write;
                let _ = write!(
                    std::io::stderr(),
                    "state dump (SIGUSR1):\n{dump}state dump end\n"
                );
            }
        })?;
    Ok(())
}
