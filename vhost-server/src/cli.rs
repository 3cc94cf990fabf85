//! What the daemons' command lines share: the socket to listen on, the
//! user to become, the seccomp choice, the manual page (`--man`), logging, and how a result
//! becomes the exit status ([`run`]).

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

/// `--user`, flattened before `--seccomp`.
#[derive(clap::Args, Debug, Clone)]
pub struct UserArg {
    /// Once set up (image or TAP open, sockets bound), become USER for
    /// good: its user id, GROUP's id (by default the user's own group)
    /// and its supplementary groups, with no way back to root. Names or
    /// numeric ids, not root's; needs root to start. The sockets stay
    /// root's; their directory must be writable by USER for them to be
    /// removed at exit
    #[arg(long, value_name = "USER[:GROUP]")]
    pub user: Option<rimg_seccomp::RunAs>,
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
    let args = parse::<A>();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `cmd` with `--man`, which [`parse`] takes only alone on the command
/// line (clap's `exclusive` does not waive required groups).
fn with_man(cmd: clap::Command) -> clap::Command {
    cmd.arg(
        clap::Arg::new("man")
            .long("man")
            .action(clap::ArgAction::SetTrue)
            .exclusive(true)
            .help("Print this manual page (roff, for man(1)) to stdout and exit"),
    )
}

/// The manual page of the program whose arguments are `A`, in roff,
/// generated from the same clap definition as its parsing, so that the
/// two never drift apart (section 1, as qemu-storage-daemon's).
pub fn man_page<A: clap::CommandFactory>() -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(with_man(A::command())).render(&mut out)?;
    Ok(out)
}

/// The arguments `A` from the command line (exits with clap's message
/// and status 2 on bad ones); `--man` prints the manual page and exits.
pub fn parse<A: clap::Parser>() -> A {
    if std::env::args_os()
        .skip(1)
        .eq([std::ffi::OsString::from("--man")])
    {
        use std::io::Write;
        let wrote = man_page::<A>().and_then(|page| {
            let mut out = std::io::stdout().lock();
            out.write_all(&page)?;
            out.flush()
        });
        match wrote {
            Ok(()) => std::process::exit(0),
            // `--man | head`: a closed pipe is no failure.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
            Err(e) => {
                eprintln!("cannot write the manual page: {e}");
                std::process::exit(1)
            }
        }
    }
    // `--man` with anything else is refused here (it is exclusive).
    let m = with_man(A::command()).get_matches();
    A::from_arg_matches(&m).unwrap_or_else(|e| e.exit())
}
