//! `rimg`: a qemu-img-compatible disk image tool. Subcommands take
//! qemu-img's option names and print its output formats; exit codes follow
//! qemu-img (1 for errors), so scripts can switch.

mod amend;
mod bench;
mod bitmap;
mod blkdebug;
mod blockopts;
mod check;
mod checksum;
mod commit;
mod common;
mod compact;
mod compare;
mod convert;
mod create;
mod ctl;
mod dd;
mod docs;
mod info;
mod json;
mod map;
mod measure;
mod object;
mod opts;
mod progress;
mod qjson;
mod rate;
mod rebase;
mod resize;
mod size;
mod snapshot;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rimg",
    version,
    // A long option may be shortened while it stays unambiguous
    // (--out=json), as getopt_long lets qemu-img's be.
    infer_long_args = true,
    // An option given twice is taken, the last one counting, as with
    // qemu-img's getopt.
    args_override_self = true,
    about = "Disk image tool for qcow2 and raw images (qemu-img compatible)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// User-creatable object, e.g. secret,id=ID,data=STRING (any subcommand)
    #[arg(long = "object", value_name = "OBJECTDEF", global = true)]
    object: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new disk image
    Create(create::CreateArgs),
    /// Show information about an image
    Info(info::InfoArgs),
    /// Convert an image to another format (or copy it)
    Convert(convert::ConvertArgs),
    /// Check an image for consistency, optionally repairing it
    Check(check::CheckArgs),
    /// Change format options of an existing image
    Amend(amend::AmendArgs),
    /// Compute the size of a new image for an input image or size
    Measure(measure::MeasureArgs),
    /// Commit the changes of an image into its backing file
    Commit(commit::CommitArgs),
    /// Change the backing file of an image
    Rebase(rebase::RebaseArgs),
    /// List, create, apply or delete internal snapshots
    Snapshot(snapshot::SnapshotArgs),
    /// Run a simple I/O benchmark on an image
    Bench(bench::BenchArgs),
    /// Dump the image's block status (allocation and host offsets)
    Map(map::MapArgs),
    /// Check whether two images have the same content
    Compare(compare::CompareArgs),
    /// Print a checksum of the guest-visible content, whatever the format
    Checksum(checksum::ChecksumArgs),
    /// Shrink a qcow2 image in place: move clusters into holes, cut the file
    Compact(compact::CompactArgs),
    /// Change the virtual size of an image
    Resize(resize::ResizeArgs),
    /// Copy input to a new output image, dd style
    Dd(dd::DdArgs),
    /// Edit the persistent dirty bitmaps of a qcow2 image
    Bitmap(bitmap::BitmapArgs),
    /// Send a command to a running daemon's control socket
    Ctl(ctl::CtlArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(hide = true)]
    Completions(docs::CompletionsArgs),
    /// Print the manual page (roff), of rimg or of one subcommand
    #[command(hide = true)]
    Man(docs::ManArgs),
}

/// The name error messages start with: the last component of `argv[0]`, as
/// qemu-img does it, so that rimg installed as `qemu-img` speaks as it
/// (scripts and QEMU's iotests read these lines).
pub fn prog_name() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::env::args_os()
            .next()
            .and_then(|a| {
                std::path::Path::new(&a)
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "rimg".into())
    })
}

/// A failure to report: one line on stderr, exit status 1 unless the
/// command says otherwise.
#[derive(Debug)]
pub struct CliError {
    pub msg: String,
    pub code: u8,
}

impl CliError {
    pub fn new(msg: impl Into<String>) -> Self {
        CliError {
            msg: msg.into(),
            code: 1,
        }
    }
}

impl From<qcow2::Error> for CliError {
    fn from(e: qcow2::Error) -> Self {
        CliError::new(e.to_string())
    }
}

fn main() -> ExitCode {
    progress::catch_usr1();
    // Output into a closed pipe (`rimg map ... | head`) ends the process
    // quietly, as it ends qemu-img, instead of a panic in println!
    // (Rust's runtime ignores SIGPIPE and turns it into EPIPE errors).
    // SAFETY: restores the default disposition of one signal before any
    // thread exists; no handler is installed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // Bad usage: one line, as every other error (clap's usage
            // block is one `--help` away).
            let text = e.render().to_string();
            // The message is the first paragraph (a list of missing
            // arguments continues it on indented lines).
            let msg: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!(
                "{0}: {1} (see '{0} --help')",
                prog_name(),
                msg.join(" ").trim_start_matches("error: ")
            );
            return ExitCode::from(1);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(0);
        }
    };
    if let Err(e) = object::init(&cli.object) {
        eprintln!("{}: {}", prog_name(), e.msg);
        return ExitCode::from(e.code);
    }
    // Failures the engine carries on after are printed as qemu-img prints
    // them ("qcow2_free_clusters failed: ...").
    qcow2::storage::set_swallowed_reporter(|what, e| {
        eprintln!("{what}: {}", common::os_error_text(e));
    });
    // QEMU's error_report lines, before the error they lead to.
    qcow2::storage::set_error_reporter(|msg| eprintln!("{}: {msg}", prog_name()));
    let r = match cli.cmd {
        Cmd::Create(a) => create::run(a),
        Cmd::Info(a) => info::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Check(a) => check::run(a),
        Cmd::Convert(a) => convert::run(a),
        Cmd::Snapshot(a) => snapshot::run(a),
        Cmd::Commit(a) => commit::run(a),
        Cmd::Measure(a) => measure::run(a),
        Cmd::Amend(a) => amend::run(a),
        Cmd::Rebase(a) => rebase::run(a),
        Cmd::Map(a) => map::run(a),
        Cmd::Compare(a) => compare::run(a),
        Cmd::Checksum(a) => checksum::run(a),
        Cmd::Compact(a) => compact::run(a),
        Cmd::Resize(a) => resize::run(a),
        Cmd::Dd(a) => dd::run(a),
        Cmd::Bitmap(a) => bitmap::run(a),
        Cmd::Ctl(a) => ctl::run(a),
        Cmd::Completions(a) => docs::completions(a, Cli::command()),
        Cmd::Man(a) => docs::man(a, Cli::command()),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // An empty message: the command has reported it already.
            if !e.msg.is_empty() {
                eprintln!("{}: {}", prog_name(), e.msg);
            }
            ExitCode::from(e.code)
        }
    }
}
