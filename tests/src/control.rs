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
    let mut c = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("control socket {}: {e}", socket.display()));
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c.write_all(line.as_bytes()).unwrap();
    c.write_all(b"\n").unwrap();
    let mut answer = String::new();
    BufReader::new(&c).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer {answer:?}: {e}"))
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
