//! `rimg-nbd`: serves images over NBD, with qemu-nbd's options for the
//! common cases (one image: `rimg-nbd [-r] [-x NAME] [-k SOCKET | -p PORT]
//! FILE`) and `--export` for several.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use qcow2::{Format, OpenOptions, Qcow2Options};
use rimg_nbd::{Aio, Export, Exports, Listen, Policy, ServerConfig};
use rimg_vhost_server::cli::{self, SeccompArg, UserArg};

fn main() -> ExitCode {
    // The name messages start with: the one it was invoked as, so that
    // rimg-nbd installed as qemu-nbd speaks as it (QEMU's iotests read
    // these lines), as rimg does as qemu-img.
    let name = std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "rimg-nbd".into());
    cli::run(&name, serve)
}

#[derive(Parser)]
#[command(
    name = "rimg-nbd",
    version,
    about = "NBD server exporting raw, qcow2 and other disk images (qemu-nbd's options)"
)]
struct Args {
    /// Image to export (backing files are opened read-only); more with
    /// --export
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
    /// Format of FILE; probed from the file when absent
    #[arg(short = 'f', long, value_name = "FORMAT")]
    format: Option<String>,
    /// Export FILE read-only
    #[arg(short = 'r', long)]
    read_only: bool,
    /// Name of FILE's export
    #[arg(short = 'x', long, default_value = "", value_name = "NAME")]
    export_name: String,
    /// Description of FILE's export, sent to clients that ask
    #[arg(short = 'D', long, default_value = "", value_name = "TEXT")]
    description: String,
    /// Offer the qemu:allocation-depth metadata context for FILE
    #[arg(short = 'A', long)]
    allocation_depth: bool,
    /// Offer FILE's persistent dirty bitmap NAME as the
    /// qemu:dirty-bitmap:NAME context (repeatable; a bitmap that records
    /// writes only on a read-only export)
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    bitmaps: Vec<String>,
    /// Another export: name=NAME,file=FILE[,format=FORMAT][,readonly=on]
    /// [,description=TEXT][,allocation-depth=on][,bitmap=NAME...]
    /// (repeatable)
    #[arg(long = "export", value_name = "SPEC")]
    exports: Vec<String>,
    /// Listen on this UNIX socket instead of TCP
    #[arg(short = 'k', long, value_name = "PATH", conflicts_with_all = ["port", "bind"])]
    socket: Option<PathBuf>,
    /// TCP port to listen on
    #[arg(short = 'p', long, default_value_t = nbd_proto::consts::DEFAULT_PORT)]
    port: u16,
    /// Address or host name to listen on (loopback unless told otherwise;
    /// a name listens on its first address)
    #[arg(short = 'b', long, default_value = "127.0.0.1", value_name = "ADDR")]
    bind: String,
    /// Clients served at once (0: no limit); more wait to be accepted
    #[arg(short = 'e', long, default_value_t = 1, value_name = "N")]
    shared: usize,
    /// Keep serving after the last client disconnects
    #[arg(short = 't', long)]
    persistent: bool,
    /// What TRIM does: `ignore` it, or `unmap` (free the space), as
    /// qemu-nbd's --discard
    #[arg(long, default_value = "ignore", value_name = "ignore|unmap")]
    discard: String,
    /// How requests run: on an io_uring per connection (`io_uring`, or
    /// qemu-nbd's `native`), or on worker threads (`threads`)
    #[arg(long, default_value = "io_uring", value_name = "MODE")]
    aio: String,
    /// QEMU's TLS credentials object:
    /// tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=off]
    /// (DIR holds ca-cert.pem, server-cert.pem and server-key.pem); with
    /// --list, endpoint=client (DIR holds ca-cert.pem, and
    /// client-cert.pem and client-key.pem if the server wants them). Or
    /// tls-creds-psk,id=ID,dir=DIR,endpoint=server (DIR holds keys.psk,
    /// IDENTITY:HEXKEY lines, read once at start); with --list,
    /// endpoint=client[,username=NAME] (default qemu)
    #[arg(long, value_name = "SPEC")]
    object: Vec<String>,
    /// Require TLS with the credentials object ID: clients must start TLS
    /// before anything else (and, unless verify-peer=off, present a
    /// certificate the CA signed, or hold a key of keys.psk); with
    /// --list, list over TLS
    #[arg(long, value_name = "ID")]
    tls_creds: Option<String>,
    /// Admit only the X.509 clients the authz-simple object ID names
    /// (--object authz-simple,id=ID,identity=DN, the certificate's
    /// subject as CN=...,O=...,C=..., commas in it doubled)
    #[arg(long, value_name = "ID")]
    tls_authz: Option<String>,
    /// Seconds a client has to finish its handshake (0: no limit)
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    handshake_limit: u64,
    /// Bytes of qcow2 L2 tables to cache per image (default 32 MiB)
    #[arg(long, value_name = "BYTES")]
    cache_size: Option<u64>,
    /// Run in the background: return once the server is listening
    /// (exit 1 with its error if it could not start)
    #[arg(long)]
    fork: bool,
    /// Write the server's process id to PATH, locked while it runs
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// List the exports of the server at -k SOCKET (or -b ADDR -p PORT)
    /// and exit, as qemu-nbd's --list prints them
    #[arg(short = 'L', long, conflicts_with_all = ["file", "exports", "fork", "pid_file"])]
    list: bool,
    /// The name the server's certificate must carry, for --list over
    /// TLS (default: the -b address, or localhost with -k)
    #[arg(long, value_name = "NAME", requires = "list")]
    tls_hostname: Option<String>,
    /// Accepted as qemu-nbd's -v, which adds messages only to modes
    /// rimg-nbd has not (-c); warnings and errors go to stderr anyway
    #[arg(short = 'v', long)]
    _verbose: bool,
    #[command(flatten)]
    user: UserArg,
    #[command(flatten)]
    seccomp: SeccompArg,
}

/// One export as given on the command line.
struct Spec {
    name: String,
    file: PathBuf,
    format: Option<String>,
    readonly: bool,
    description: String,
    allocation_depth: bool,
    bitmaps: Vec<String>,
}

fn parse_spec(s: &str) -> Result<Spec, String> {
    let mut spec = Spec {
        name: String::new(),
        file: PathBuf::new(),
        format: None,
        readonly: false,
        description: String::new(),
        allocation_depth: false,
        bitmaps: Vec::new(),
    };
    let on = |k: &str, v: &str| match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("--export: {k}={v}: expected on or off")),
    };
    let mut have_name = false;
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("--export: '{part}' is not KEY=VALUE"))?;
        match k {
            "name" => {
                spec.name = v.into();
                have_name = true;
            }
            "file" => spec.file = v.into(),
            "format" => spec.format = Some(v.into()),
            "readonly" => spec.readonly = on(k, v)?,
            "description" => spec.description = v.into(),
            "allocation-depth" => spec.allocation_depth = on(k, v)?,
            "bitmap" => spec.bitmaps.push(v.into()),
            _ => return Err(format!("--export: unknown key '{k}'")),
        }
    }
    if !have_name || spec.file.as_os_str().is_empty() {
        return Err(format!("--export {s}: name= and file= are required"));
    }
    Ok(spec)
}

fn open(spec: Spec, cache_size: Option<u64>) -> Result<Export, String> {
    let format = match spec.format.as_deref() {
        None => None,
        Some(f) => Some(Format::from_name(f).ok_or_else(|| format!("unknown format '{f}'"))?),
    };
    // As the block daemon: a killed server loses no answered write, and
    // copy-on-write fills are kept in the image's intent log.
    let mut q = Qcow2Options {
        metadata_persistence: qcow2::MetadataPersistence::ProcessDeath,
        intent_log: true,
        ..Default::default()
    };
    if let Some(b) = cache_size {
        q.l2_cache_bytes = b;
    }
    let img = qcow2::open(
        &spec.file,
        &OpenOptions {
            writable: !spec.readonly,
            format,
            qcow2: q,
            ..Default::default()
        },
    )
    .map_err(|e| format!("{}: {e}", spec.file.display()))?;
    if img.guards_first_sector() {
        eprintln!("{}", qcow2::raw::probed_warning(&spec.file));
    }
    let file = spec.file.display().to_string();
    let mut e = Export::new(
        spec.name,
        spec.description,
        img,
        spec.readonly,
        spec.allocation_depth,
    )
    .map_err(|e| format!("{file}: {e}"))?;
    for b in &spec.bitmaps {
        e = e.with_bitmap(b).map_err(|err| format!("{file}: {err}"))?;
    }
    Ok(e)
}

/// qemu-nbd's names of the transmission flags, by bit.
const FLAG_NAMES: [&str; 13] = [
    "",
    "readonly",
    "flush",
    "fua",
    "rotational",
    "trim",
    "zeroes",
    "df",
    "multi",
    "resize",
    "cache",
    "fast-zero",
    "block-status-payload",
];

/// `--list`: the server's exports, in qemu-nbd's words and layout (over
/// TLS with `--tls-creds` naming client credentials).
fn list(a: &Args) -> Result<(), String> {
    use qcow2::nbd::uri::{Credentials, Server, TlsParams};
    use rimg_nbd::tls::Kind;
    if a.tls_authz.is_some() {
        return Err("TLS authorization is incompatible with export list".into());
    }
    let tls = match &a.tls_creds {
        None if a.tls_hostname.is_some() => {
            return Err("--tls-hostname is not permitted without --tls-creds".into())
        }
        None => None,
        Some(id) => {
            let objects = a
                .object
                .iter()
                .filter(|o| !o.starts_with("authz-"))
                .map(|o| rimg_nbd::tls::CredsObject::parse(o))
                .collect::<Result<Vec<_>, _>>()?;
            let o = rimg_nbd::tls::CredsObject::find(&objects, id, true)?;
            // As qemu-nbd: the name asked for, else the address bound
            // over TCP; over a UNIX socket there is none to check, which
            // QEMU refuses unless nothing is checked (verify-peer=off).
            let host = match &a.socket {
                Some(_) => None,
                None => Some(a.bind.to_string()),
            };
            let hostname = a.tls_hostname.clone().or(host);
            let (creds, verify_peer) = match &o.kind {
                Kind::X509 { verify_peer } => {
                    (Credentials::Certificates(o.dir.clone()), *verify_peer)
                }
                Kind::Psk { username } => (
                    Credentials::Psk {
                        file: o.dir.join("keys.psk"),
                        username: username.clone(),
                    },
                    false,
                ),
            };
            if hostname.is_none() && verify_peer {
                return Err("No hostname for certificate validation".into());
            }
            Some(TlsParams {
                creds,
                hostname,
                verify_peer,
            })
        }
    };
    let server = match &a.socket {
        Some(p) => Server::Unix(p.clone()),
        None => Server::Tcp {
            host: a.bind.clone(),
            port: a.port,
        },
    };
    // The client's errors are in QEMU's words ("Failed to connect to
    // ...", an option the server refused).
    let list = qcow2::nbd::client::list_exports(&server, tls.as_ref())
        .map_err(|e| qcow2::error::strerror(&e))?;
    let mut out = format!("exports available: {}\n", list.len());
    for l in &list {
        out += &format!(" export: '{}'\n", l.name);
        if !l.description.is_empty() {
            out += &format!("  description: {}\n", l.description);
        }
        if let Some((size, flags)) = l.export {
            out += &format!("  size:  {size}\n  flags: {flags:#x} (");
            for (bit, name) in FLAG_NAMES.iter().enumerate().skip(1) {
                if flags & (1 << bit) != 0 {
                    out += &format!(" {name}");
                }
            }
            out += " )\n";
        }
        if let Some((min, opt, max)) = l.block {
            out += &format!("  min block: {min}\n  opt block: {opt}\n  max block: {max}\n");
        }
        let size = if l.extended { "64-bit" } else { "32-bit" };
        out += &format!("  transaction size: {size}\n");
        if !l.contexts.is_empty() {
            out += &format!("  available meta contexts: {}\n", l.contexts.len());
            for c in &l.contexts {
                out += &format!("   {c}\n");
            }
        }
    }
    print!("{out}");
    Ok(())
}

/// `-b ADDR` as qemu-nbd takes it: an address, or a name resolved to its
/// first address (`localhost`).
fn bind_address(host: &str, port: u16) -> Result<SocketAddr, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    use std::net::ToSocketAddrs;
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("address resolution failed for {host}:{port}: {e}"))?
        .next()
        .ok_or_else(|| format!("address resolution failed for {host}:{port}"))
}

fn serve(a: Args) -> Result<(), String> {
    if a.list {
        return list(&a);
    }
    // A socket systemd passed (cli::run read the variables first).
    let listen = match (rimg_vhost_server::activation::passed(), a.socket) {
        (Some(fd), _) => Listen::Fd(fd),
        (None, Some(p)) => Listen::Unix(p),
        (None, None) => Listen::Tcp(bind_address(&a.bind, a.port)?),
    };
    // Before anything opens an image or starts a thread.
    let ready = match a.fork {
        true => Some(rimg_nbd::daemon::fork()?),
        false => None,
    };
    if let Some(p) = &a.pid_file {
        rimg_nbd::daemon::pid_file(p)?;
    }
    let mut specs = Vec::new();
    if let Some(file) = a.file {
        specs.push(Spec {
            name: a.export_name,
            file,
            format: a.format,
            readonly: a.read_only,
            description: a.description,
            allocation_depth: a.allocation_depth,
            bitmaps: a.bitmaps,
        });
    }
    for s in &a.exports {
        specs.push(parse_spec(s)?);
    }
    if specs.is_empty() {
        return Err("nothing to export: give FILE or --export".into());
    }
    let mut exports = Exports::default();
    for s in specs {
        if exports.get(&s.name).is_some() {
            return Err(format!("export name '{}' given twice", s.name));
        }
        if s.name.len() > nbd_proto::MAX_STRING || s.description.len() > nbd_proto::MAX_STRING {
            return Err(format!(
                "export '{}': name or description over 4096 bytes",
                s.name
            ));
        }
        let mut e = open(s, a.cache_size)?;
        e.multi_conn = a.shared != 1;
        exports.list.push(Arc::new(e));
    }
    let unmap = match a.discard.as_str() {
        "ignore" | "off" => false,
        "unmap" | "on" => true,
        d => return Err(format!("--discard {d}: expected ignore or unmap")),
    };
    let aio = match a.aio.as_str() {
        "io_uring" | "native" => Aio::IoUring,
        "threads" => Aio::Threads,
        m => return Err(format!("--aio {m}: expected io_uring, native or threads")),
    };
    let mut objects = Vec::new();
    let mut authz = Vec::new();
    for o in &a.object {
        match rimg_nbd::authz::AuthzObject::parse(o)? {
            Some(z) => authz.push(z),
            None => objects.push(rimg_nbd::tls::CredsObject::parse(o)?),
        }
    }
    let identity = match (&a.tls_authz, &a.tls_creds) {
        (None, _) => None,
        (Some(_), None) => return Err("--tls-authz is not permitted without --tls-creds".into()),
        (Some(id), Some(_)) => Some(
            authz
                .iter()
                .find(|z| &z.id == id)
                .ok_or_else(|| format!("No authorization object with id '{id}'"))?
                .identity
                .clone(),
        ),
    };
    let tls = match &a.tls_creds {
        None => None,
        Some(id) => {
            let o = rimg_nbd::tls::CredsObject::find(&objects, id, false)?;
            Some(rimg_nbd::tls::TlsCreds::load(o, identity)?)
        }
    };
    rimg_nbd::run(ServerConfig {
        exports,
        listen,
        shared: a.shared,
        persistent: a.persistent,
        policy: Policy { unmap, aio },
        handshake_limit: (a.handshake_limit > 0).then(|| Duration::from_secs(a.handshake_limit)),
        tls,
        user: a.user.user,
        seccomp: a.seccomp.seccomp,
        ready,
    })
    .map_err(|e| e.to_string())
}
