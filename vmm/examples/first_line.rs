//! Benchmark aid (vmm-bench): runs a VMM command, timestamps the first
//! stdout line containing MARKER, samples the VMM's memory then, and
//! waits for it to exit.
//!
//! Usage: first_line MARKER COMMAND [ARGS...]
//! Prints `first-line-ms N`, then `rss-kib vmm=V guest-ram=G total=T`
//! (resident memory outside / inside rimg-vmm's guest RAM memfd, from
//! /proc/PID/smaps when the marker appeared) and `exit-code C`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// (resident KiB outside mappings named `exclude`, resident KiB inside).
fn rss_split(pid: u32, exclude: &str) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut outside, mut inside, mut in_excluded) = (0, 0, false);
    for l in smaps.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            in_excluded = l.contains(exclude);
        } else if let Some(v) = l.strip_prefix("Rss:") {
            let kib: u64 = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if in_excluded {
                inside += kib
            } else {
                outside += kib
            }
        }
    }
    (outside, inside)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: first_line MARKER COMMAND [ARGS...]");
        std::process::exit(2);
    }
    let start = Instant::now();
    let mut child = Command::new(&args[1])
        .args(&args[2..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            eprintln!("first_line: {}: {e}", args[1]);
            std::process::exit(2)
        });
    let pid = child.id();
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = false;
    for line in out.lines().map_while(Result::ok) {
        if !seen && line.contains(&args[0]) {
            seen = true;
            println!("first-line-ms {}", start.elapsed().as_millis());
            let (outside, guest) = rss_split(pid, "memfd:rimg-vmm-ram");
            println!(
                "rss-kib vmm={outside} guest-ram={guest} total={}",
                status_kib(pid, "VmRSS:")
            );
        }
    }
    let st = child.wait().map(|s| s.code().unwrap_or(-1)).unwrap_or(-1);
    if !seen {
        println!("first-line-ms none");
    }
    println!("exit-code {st}");
}
