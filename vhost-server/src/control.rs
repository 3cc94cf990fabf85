//! The control socket (`--control PATH`): JSON requests, one per line,
//! each answered by one JSON line, in QMP's shapes:
//!
//! ```text
//! {"execute": "query-status"}
//! {"return": {"status": "running", "running": true, "frontend": true, "connections": 1}}
//! {"execute": "resize", "arguments": {"size": 2147483648}, "id": 7}
//! {"return": {...}, "id": 7}
//! {"execute": "nope"}
//! {"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}
//! ```
//!
//! Commands every daemon has: `query-status`, `query-commands`, `quit`
//! (as SIGTERM: the daemon ends its connection, flushes and exits 0);
//! each daemon adds its own ([`Commands`]). There is no greeting and no
//! capabilities negotiation: a line in, a line out.
//!
//! The socket is the owner's only (mode 0600, set before it listens).
//! Bad input gets an error answer and the connection stays open; a line
//! longer than [`MAX_LINE`] gets one and the connection is closed, as
//! does a client beyond [`MAX_CLIENTS`] at once. The daemon serves its
//! frontend whatever its control clients do: each client has its own
//! thread and the commands take no lock the data path waits on for long.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, warn};
use serde_json::{json, Map, Value};

use crate::frontend::Frontend;

/// Longest request line taken.
pub const MAX_LINE: usize = 64 * 1024;
/// Clients served at once.
pub const MAX_CLIENTS: usize = 8;

/// Why a command failed: QMP's error classes.
#[derive(Debug)]
pub enum CommandError {
    /// Bad or missing arguments, or a request the command refuses.
    Invalid(String),
    /// The command ran and failed.
    Failed(String),
}

impl CommandError {
    fn answer(&self) -> Value {
        let desc = match self {
            CommandError::Invalid(d) | CommandError::Failed(d) => d,
        };
        json!({"error": {"class": "GenericError", "desc": desc}})
    }
}

/// A daemon's own commands.
pub trait Commands: Send + Sync + 'static {
    /// Their names, for `query-commands`.
    fn names(&self) -> &'static [&'static str];
    /// Runs command `name` with `args`; None when the daemon has none of
    /// that name. `frontend` is the current connection.
    fn execute(
        &self,
        name: &str,
        args: &Map<String, Value>,
        frontend: &Frontend,
    ) -> Option<Result<Value, CommandError>>;
    /// The daemon is stopping: a command still running should end soon
    /// (stopping waits for it).
    fn cancel(&self) {}
}

/// A daemon with no commands of its own.
pub struct NoCommands;

impl Commands for NoCommands {
    fn names(&self) -> &'static [&'static str] {
        &[]
    }
    fn execute(
        &self,
        _: &str,
        _: &Map<String, Value>,
        _: &Frontend,
    ) -> Option<Result<Value, CommandError>> {
        None
    }
}

/// `--control PATH` and what answers there.
pub struct Control {
    pub path: std::path::PathBuf,
    pub commands: Arc<dyn Commands>,
    /// Links to `path` the daemon published for other programs, removed
    /// with the socket when the daemon ends.
    pub links: Vec<std::path::PathBuf>,
}

/// The shared commands' view of the daemon.
pub(crate) struct Shared {
    pub(crate) commands: Arc<dyn Commands>,
    pub(crate) frontend: Frontend,
    /// Ends the daemon, as SIGTERM does.
    pub(crate) quit: Box<dyn Fn() + Send + Sync>,
}

/// A UNIX socket at `path` that only its owner can connect to: bound
/// under a temporary name, made mode 0600, listening, and only then
/// renamed to `path`, so no other user can slip in between, and a client
/// that waits for the file to appear finds it answering.
pub fn owner_only_listener(path: &Path) -> std::io::Result<UnixListener> {
    if UnixStream::connect(path).is_ok() {
        // Another process answers there: taking its name would cut its
        // clients off (and its exit would remove ours).
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{}: a running process listens there", path.display()),
        ));
    }
    // An unpredictable temporary name: one another user made first
    // could not make us fail.
    let salt = {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.{salt:016x}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let l = listening(&tmp);
    let renamed = l.and_then(|l| std::fs::rename(&tmp, path).map(|()| l));
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    renamed
}

/// A socket bound at `path`, mode 0600, listening.
fn listening(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::other(format!(
            "{}: socket path too long or not a path",
            path.display()
        )));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call, and
    // `len` is within it (the path is NUL-terminated by the zeroing).
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let c = CString::new(bytes).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    let chmod = unsafe { libc::chmod(c.as_ptr(), 0o600) };
    // SAFETY: listen(2) on the descriptor we own.
    if chmod != 0 || unsafe { libc::listen(sock.as_raw_fd(), 16) } != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(sock))
}

/// How long a client may stay silent before it is disconnected: clients
/// hold one of [`MAX_CLIENTS`] places (or, in the VMM, the only one).
pub const IDLE: Duration = Duration::from_secs(30);

/// The control socket's threads, until [`Running::stop`]: they hold the
/// daemon's commands, and so its image, which must be closed (bitmaps
/// stored, locks released) once the daemon ends, not at process exit.
pub(crate) struct Running {
    /// A duplicate of the listening socket: shut down to end `accept`.
    listener: UnixListener,
    stopping: Arc<AtomicBool>,
    accept: std::thread::JoinHandle<()>,
    clients: Arc<Mutex<Vec<Client>>>,
    commands: Arc<dyn Commands>,
}

/// A client's thread and a duplicate of its connection, shut down to end
/// the thread's read.
struct Client {
    conn: UnixStream,
    thread: std::thread::JoinHandle<()>,
}

impl Running {
    /// Ends the accept thread and every client's (a command running
    /// finishes first), so that the commands are dropped.
    pub(crate) fn stop(self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.commands.cancel();
        // SAFETY: shutdown(2) on a descriptor we own: a blocked accept on
        // a listening socket returns (EINVAL) once it is shut down.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let _ = self.accept.join();
        let clients = std::mem::take(&mut *lock(&self.clients));
        for c in clients {
            let _ = c.conn.shutdown(std::net::Shutdown::Both);
            let _ = c.thread.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Accepts control clients on `listener`, each on a thread of its own,
/// until [`Running::stop`].
pub(crate) fn spawn(listener: UnixListener, shared: Arc<Shared>) -> std::io::Result<Running> {
    let clients: Arc<Mutex<Vec<Client>>> = Arc::default();
    let stopping = Arc::new(AtomicBool::new(false));
    let dup = listener.try_clone()?;
    let commands = shared.commands.clone();
    let (list, stop) = (clients.clone(), stopping.clone());
    let accept = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let mut list = lock(&list);
                list.retain(|c| !c.thread.is_finished());
                let Ok(keep) = conn.try_clone() else { continue };
                let conn = as_file(conn);
                if list.len() >= MAX_CLIENTS {
                    let _ = reply(&conn, &failure("too many control clients"), None);
                    continue;
                }
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("control-client".into())
                    .spawn(move || {
                        if let Err(e) = serve_client(&conn, &shared, Some(IDLE)) {
                            debug!("control client: {e}");
                        }
                        // The accept thread's duplicate keeps the socket
                        // open: the client sees the end only this way.
                        // SAFETY: shutdown(2) on a descriptor we own.
                        unsafe { libc::shutdown(conn.as_raw_fd(), libc::SHUT_RDWR) };
                    });
                match spawned {
                    Ok(thread) => list.push(Client { conn: keep, thread }),
                    Err(e) => warn!("control client thread: {e}"),
                }
            }
        })?;
    Ok(Running {
        listener: dup,
        stopping,
        accept,
        clients,
        commands,
    })
}

/// Serves control clients on `listener` one after the other, on the
/// calling thread, forever: for a process that creates no threads once
/// it runs (rimg-vmm, under its seccomp filter). A client idle for
/// `idle` is disconnected, so one that stays connected cannot shut the
/// others out for long. `quit` runs `quit`.
pub fn serve_in_turn(
    listener: UnixListener,
    commands: Arc<dyn Commands>,
    quit: Box<dyn Fn() + Send + Sync>,
    idle: Duration,
) {
    let shared = Shared {
        commands,
        frontend: Frontend::default(),
        quit,
    };
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if let Err(e) = serve_client(&as_file(conn), &shared, Some(idle)) {
            debug!("control client: {e}");
        }
    }
}

/// A client's connection as a plain descriptor: read(2) and write(2), the
/// calls every seccomp list here has (std's socket reads are recvfrom).
fn as_file(conn: UnixStream) -> File {
    File::from(OwnedFd::from(conn))
}

/// Waits up to `t` for `f` to be readable; false on timeout.
fn readable_within(f: &File, t: Duration) -> std::io::Result<bool> {
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = t.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one pollfd that outlives the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n > 0)
}

fn failure(desc: &str) -> Value {
    CommandError::Failed(desc.into()).answer()
}

fn reply(conn: &File, answer: &Value, id: Option<&Value>) -> std::io::Result<()> {
    let mut answer = answer.clone();
    if let (Some(id), Some(o)) = (id, answer.as_object_mut()) {
        o.insert("id".into(), id.clone());
    }
    let mut line = answer.to_string();
    line.push('\n');
    let mut w = conn;
    w.write_all(line.as_bytes())
}

fn serve_client(conn: &File, shared: &Shared, idle: Option<Duration>) -> std::io::Result<()> {
    let mut input = BufReader::new(conn);
    let mut line = Vec::new();
    loop {
        line.clear();
        if let Some(t) = idle {
            if !input.buffer().contains(&b'\n') && !readable_within(conn, t)? {
                return reply(conn, &failure("idle too long: disconnected"), None);
            }
        }
        let n = (&mut input)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            let desc = format!("request longer than {MAX_LINE} bytes");
            return reply(conn, &failure(&desc), None);
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (answer, id, quit) = answer(&line, shared);
        reply(conn, &answer, id.as_ref())?;
        if quit {
            (shared.quit)();
            return Ok(());
        }
    }
}

/// The answer to one request line, its id, and whether it asked to quit.
fn answer(line: &[u8], shared: &Shared) -> (Value, Option<Value>, bool) {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return (failure(&format!("JSON parse error: {e}")), None, false),
    };
    let id = req.get("id").cloned();
    let Some(obj) = req.as_object() else {
        return (failure("Expected a JSON object"), id, false);
    };
    let Some(name) = obj.get("execute").and_then(Value::as_str) else {
        return (failure("Expected 'execute' naming a command"), id, false);
    };
    let empty = Map::new();
    let args = match obj.get("arguments") {
        None => &empty,
        Some(Value::Object(a)) => a,
        Some(_) => return (failure("'arguments' must be an object"), id, false),
    };
    let done = |r: Result<Value, CommandError>| match r {
        Ok(v) => json!({ "return": v }),
        Err(e) => e.answer(),
    };
    if name == "query-status" {
        // A process with a status of its own (the VMM: paused or not)
        // answers itself.
        let st = shared.commands.execute(name, args, &shared.frontend);
        return (
            done(st.unwrap_or_else(|| Ok(status(&shared.frontend)))),
            id,
            false,
        );
    }
    match name {
        "query-commands" => {
            let mut names = vec!["query-status", "query-commands", "quit"];
            names.extend(shared.commands.names());
            let list: Vec<Value> = names.iter().map(|n| json!({ "name": n })).collect();
            (done(Ok(Value::Array(list))), id, false)
        }
        "quit" => (done(Ok(json!({}))), id, true),
        _ => match shared.commands.execute(name, args, &shared.frontend) {
            Some(r) => (done(r), id, false),
            None => (
                json!({"error": {
                    "class": "CommandNotFound",
                    "desc": format!("The command {name} has not been found"),
                }}),
                id,
                false,
            ),
        },
    }
}

fn status(f: &Frontend) -> Value {
    json!({
        "status": "running",
        "running": true,
        "frontend": f.is_connected(),
        "connections": f.connections(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::AtomicUsize;

    struct Echo;
    impl Commands for Echo {
        fn names(&self) -> &'static [&'static str] {
            &["echo"]
        }
        fn execute(
            &self,
            name: &str,
            args: &Map<String, Value>,
            _: &Frontend,
        ) -> Option<Result<Value, CommandError>> {
            (name == "echo").then(|| match args.get("v") {
                Some(v) => Ok(v.clone()),
                None => Err(CommandError::Invalid("missing 'v'".into())),
            })
        }
    }

    fn shared() -> (Arc<Shared>, Arc<AtomicUsize>) {
        let quits = Arc::new(AtomicUsize::new(0));
        let q = quits.clone();
        let s = Shared {
            commands: Arc::new(Echo),
            frontend: Frontend::default(),
            quit: Box::new(move || {
                q.fetch_add(1, Ordering::SeqCst);
            }),
        };
        (Arc::new(s), quits)
    }

    fn ask(s: &Shared, line: &str) -> Value {
        let (v, id, _) = answer(line.as_bytes(), s);
        let mut v = v;
        if let Some(id) = id {
            v["id"] = id;
        }
        v
    }

    #[test]
    fn requests_and_errors_have_qmp_shapes() {
        let (s, _) = shared();
        let st = ask(&s, r#"{"execute":"query-status","id":3}"#);
        assert_eq!(st["return"]["status"], "running");
        assert_eq!(st["return"]["frontend"], false);
        assert_eq!(st["id"], 3);
        let v = ask(&s, r#"{"execute":"echo","arguments":{"v":[1,"x"]}}"#);
        assert_eq!(v, json!({"return": [1, "x"]}));
        let names = ask(&s, r#"{"execute":"query-commands"}"#);
        assert!(names["return"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "echo"})));
        for (bad, class, desc) in [
            ("{", "GenericError", "JSON parse error"),
            ("[1]", "GenericError", "Expected a JSON object"),
            (r#"{"execute":1}"#, "GenericError", "Expected 'execute'"),
            (
                r#"{"execute":"echo","arguments":[]}"#,
                "GenericError",
                "'arguments'",
            ),
            (r#"{"execute":"echo"}"#, "GenericError", "missing 'v'"),
            (
                r#"{"execute":"nope"}"#,
                "CommandNotFound",
                "nope has not been found",
            ),
        ] {
            let e = ask(&s, bad);
            assert_eq!(e["error"]["class"], class, "{bad}");
            assert!(
                e["error"]["desc"].as_str().unwrap().contains(desc),
                "{bad}: {e}"
            );
        }
        // serde_json's own depth limit: deep nesting is an error, not a
        // stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(ask(&s, &deep)["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("JSON"));
    }

    #[test]
    fn the_socket_is_the_owners_and_survives_bad_clients() {
        let dir = std::env::temp_dir().join(format!("rimg-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let l = owner_only_listener(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (s, quits) = shared();
        spawn(l, s).unwrap();

        // A line too long: an error, then the connection is closed.
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert!(got.contains("longer than"), "{got}");

        // Garbage, then a good request on the same connection.
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"\xff\xfe\n\n{\"execute\":\"quit\"}\n")
            .unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("JSON parse error"), "{line}");
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "{\"return\":{}}\n");
        // The client thread runs quit after answering, then closes.
        line.clear();
        assert_eq!(r.read_line(&mut line).unwrap(), 0);
        assert_eq!(quits.load(Ordering::SeqCst), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
