//! Shell completions and manual pages, generated from the clap
//! definitions of the commands (`rimg completions SHELL`, `rimg man
//! [SUBCOMMAND]`), so they never drift from what `rimg` accepts.

use std::io::Write;

use clap::{Args, Command};
use clap_complete::Shell;

use crate::CliError;

#[derive(Args)]
pub struct CompletionsArgs {
    /// The shell to complete for
    shell: Shell,
}

#[derive(Args)]
pub struct ManArgs {
    /// The subcommand whose page to print (default: rimg's own page)
    subcommand: Option<String>,
}

/// Writes the completion script for `a.shell` to stdout.
pub fn completions(a: CompletionsArgs, mut cmd: Command) -> Result<u8, CliError> {
    let mut out = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "rimg", &mut out);
    emit(&out)
}

/// Writes the manual page of rimg or of one of its subcommands to stdout
/// (`rimg man > rimg.1`, `rimg man convert > rimg-convert.1`).
pub fn man(a: ManArgs, cmd: Command) -> Result<u8, CliError> {
    let page = page(cmd, a.subcommand.as_deref())?;
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .map_err(|e| CliError::new(format!("cannot render the manual page: {e}")))?;
    emit(&out)
}

/// The command whose page to render: rimg itself, or a visible
/// subcommand named `rimg-NAME` (as its page is called).
fn page(cmd: Command, sub: Option<&str>) -> Result<Command, CliError> {
    let Some(name) = sub else {
        return Ok(cmd);
    };
    // The page is named rimg-NAME; clap takes names for the whole run.
    let page_name: &'static str = Box::leak(format!("rimg-{name}").into_boxed_str());
    let sc = cmd
        .get_subcommands()
        .find(|s| s.get_name() == name && !s.is_hide_set())
        .cloned()
        .ok_or_else(|| CliError::new(format!("no subcommand '{name}'")))?
        .name(page_name)
        .version(env!("CARGO_PKG_VERSION"));
    Ok(sc)
}

fn emit(bytes: &[u8]) -> Result<u8, CliError> {
    let mut so = std::io::stdout().lock();
    match so.write_all(bytes).and_then(|_| so.flush()) {
        Ok(()) => Ok(0),
        // `rimg man | head`: a closed pipe is not an error worth a line.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(CliError::new(format!("cannot write: {e}"))),
    }
}
