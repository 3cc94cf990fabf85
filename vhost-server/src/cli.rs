//! What the daemons' command lines share: the socket to listen on, the
//! seccomp choice, logging, and how a result becomes the exit status
//! ([`run`]).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::SeccompAction;

/// `--socket`, flattened first into a daemon's arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct SocketArg {
    /// Path of the vhost-user UNIX socket to listen on (created; an old
    /// socket file there is replaced). Under socket activation
    /// (LISTEN_FDS) the socket passed is used instead, and left in place
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
}

/// `--control`, the control socket (see [`crate::control`]).
#[derive(clap::Args, Debug, Clone)]
pub struct ControlArg {
    /// Path of a control socket to create (mode 0600): JSON requests, one
    /// per line, QMP's shapes (`{"execute": "query-status"}`); `rimg ctl`
    /// is a client
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// `--seccomp`, flattened last into a daemon's arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct SeccompArg {
    /// Seccomp filter, installed once the image/TAP is open and the socket
    /// bound: `kill` (default) kills the daemon on any syscall outside its
    /// list, `log` allows such calls and has the kernel log them (audit
    /// type 1326), `off` installs no filter
    #[arg(long, default_value_t = SeccompAction::Kill, value_name = "kill|log|off")]
    pub seccomp: SeccompAction,
}

/// A daemon's whole life: logging to stderr (warnings and errors unless
/// RUST_LOG says otherwise), its arguments `A` parsed (exits on bad
/// ones), then `serve`; an error is printed, prefixed with `name`, and
/// the exit status says which.
pub fn run<A: clap::Parser, E: std::fmt::Display>(
    name: &str,
    serve: impl FnOnce(A) -> Result<(), E>,
) -> ExitCode {
    // First, while the process has one thread: this clears the
    // environment's service-manager variables.
    crate::notify::take_from_env();
    if let Err(e) = crate::activation::take_from_env() {
        eprintln!("{name}: {e}");
        return ExitCode::FAILURE;
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    match serve(A::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}
