//! `rimg ctl SOCKET COMMAND [KEY=VALUE...]`: one request to a running
//! daemon's control socket (rimg-vhost-blk and rimg-vhost-net
//! `--control`), its answer printed as JSON.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::CliError;

/// How long an answer may take (a resize allocates and flushes).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(clap::Args)]
pub struct CtlArgs {
    /// The daemon's control socket (its `--control PATH`)
    #[arg(value_name = "SOCKET")]
    socket: PathBuf,
    /// Command name (query-status, query-stats, query-commands, resize,
    /// quit), or a whole JSON request ({"execute": ...})
    #[arg(value_name = "COMMAND")]
    command: String,
    /// Arguments as KEY=VALUE: a VALUE that reads as JSON is taken as
    /// such, a size with a suffix (20G) as bytes, anything else as a
    /// string
    #[arg(value_name = "KEY=VALUE")]
    args: Vec<String>,
}

pub fn run(a: CtlArgs) -> Result<u8, CliError> {
    let req = if a.command.trim_start().starts_with('{') {
        if !a.args.is_empty() {
            return Err(CliError::new(
                "ctl: a JSON request takes no KEY=VALUE arguments",
            ));
        }
        serde_json::from_str(&a.command)
            .map_err(|e| CliError::new(format!("ctl: the request is not JSON: {e}")))?
    } else {
        let mut args = Map::new();
        for kv in &a.args {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| CliError::new(format!("ctl: '{kv}' is not KEY=VALUE")))?;
            args.insert(k.to_string(), value(v));
        }
        json!({ "execute": a.command, "arguments": args })
    };
    let answer = request(&a.socket, &req)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&answer).unwrap_or_default()
    );
    Ok(0)
}

fn value(v: &str) -> Value {
    if let Ok(j) = serde_json::from_str::<Value>(v) {
        return j;
    }
    match crate::size::parse_size(v) {
        Some(n) => json!(n),
        None => Value::String(v.to_string()),
    }
}

/// Sends `req` to the control socket at `socket`; the command's "return"
/// value, or its error's description as the error.
pub fn request(socket: &Path, req: &Value) -> Result<Value, CliError> {
    let fail = |e: std::io::Error| CliError::new(format!("{}: {e}", socket.display()));
    let mut conn = UnixStream::connect(socket).map_err(fail)?;
    conn.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(fail)?;
    let mut line = req.to_string();
    line.push('\n');
    conn.write_all(line.as_bytes()).map_err(fail)?;
    let mut answer = String::new();
    BufReader::new(&conn).read_line(&mut answer).map_err(fail)?;
    if answer.is_empty() {
        return Err(CliError::new(format!(
            "{}: the daemon closed the connection without answering",
            socket.display()
        )));
    }
    let v: Value = serde_json::from_str(&answer)
        .map_err(|e| CliError::new(format!("{}: bad answer: {e}", socket.display())))?;
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    let desc = v["error"]["desc"].as_str().unwrap_or("unknown error");
    Err(CliError::new(desc.to_string()))
}
