//! A client for the daemons' control sockets (`--control`), speaking the
//! protocol directly (one JSON line each way), so tests see exactly what
//! the daemon answers.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Sends one request line (no newline needed) and returns the answer.
pub fn request(socket: &Path, line: &str) -> Value {
    try_request(socket, line).unwrap_or_else(|e| panic!("control socket {}: {e}", socket.display()))
}

/// As [`request`], with what went wrong as an error: for a client that
/// may be turned away (the daemon closes on it when it has too many).
pub fn try_request(socket: &Path, line: &str) -> Result<Value, String> {
    let mut c = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    c.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    BufReader::new(&c)
        .read_line(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    serde_json::from_str(&answer).map_err(|e| format!("answer {answer:?}: {e}"))
}

/// Runs command `name` with `args` (a JSON object); the whole answer.
pub fn execute(socket: &Path, name: &str, args: Value) -> Value {
    request(
        socket,
        &serde_json::json!({ "execute": name, "arguments": args }).to_string(),
    )
}

/// The "return" value of a command that must succeed.
pub fn ok(socket: &Path, name: &str, args: Value) -> Value {
    let a = execute(socket, name, args);
    a.get("return")
        .cloned()
        .unwrap_or_else(|| panic!("{name} failed: {a}"))
}

/// The description of a command's error (panics if it succeeded).
pub fn error(socket: &Path, name: &str, args: Value) -> String {
    let a = execute(socket, name, args);
    a["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} did not fail: {a}"))
        .to_string()
}
