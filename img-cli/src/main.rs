//! `rimg`: a qemu-img-compatible disk image tool. Subcommands take
//! qemu-img's option names and print its output formats; exit codes follow
//! qemu-img (1 for errors), so scripts can switch.

mod amend;
mod bench;
mod check;
mod commit;
mod convert;
mod create;
mod info;
mod json;
mod measure;
mod opts;
mod rebase;
mod size;
mod snapshot;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rimg",
    version,
    about = "Disk image tool for qcow2 and raw images (qemu-img compatible)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
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
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
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
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("rimg: {}", e.msg);
            ExitCode::from(e.code)
        }
    }
}
