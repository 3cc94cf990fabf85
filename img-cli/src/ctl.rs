//! `rimg ctl SOCKET COMMAND [KEY=VALUE...]`: one request to a running
//! daemon's control socket (rimg-vhost-blk and rimg-vhost-net
//! `--control`), its answer printed as JSON.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::CliError;

/// How long an answer may take (a resize over a longer backing file
/// writes zeros over the whole new range).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(clap::Args)]
pub struct CtlArgs {
    /// The daemon's control socket (its `--control PATH`)
    #[arg(value_name = "SOCKET")]
    socket: PathBuf,
    /// Command name (query-status, query-stats, query-commands, resize,
    /// checksum, quit), or a whole JSON request ({"execute": ...})
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
        // 1e9 and 2.0 are whole numbers to a user: sent as integers.
        return match j.as_f64() {
            Some(f)
                if !j.is_u64() && !j.is_i64() && f.fract() == 0.0 && (0.0..1.8e19).contains(&f) =>
            {
                json!(f as u64)
            }
            _ => j,
        };
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
    // A socket in a shared directory may have been bound by another
    // user once ours was gone: talk only to our own processes.
    if peer_uid(&conn).map_err(fail)? != current_uid() {
        return Err(CliError::new(format!(
            "{}: the process there is another user's",
            socket.display()
        )));
    }
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

fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

/// The user id of the process at the other end (SO_PEERCRED).
fn peer_uid(conn: &UnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which
    // outlives the call.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}
