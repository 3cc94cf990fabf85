//! `rimg map`: qemu-img map's extent list, in its human table or its JSON
//! lines, with extents merged exactly as qemu-img merges them.

use clap::Args;

use crate::common::{open_opts, parse_format};
use crate::info::Output;
use crate::size::cvtnum;
use crate::CliError;
use qcow2::blockstatus::{Chain, Status, ALLOCATED, COMPRESSED, DATA, OFFSET_VALID, ZERO};

#[derive(Args)]
pub struct MapArgs {
    /// Image format (probed when absent)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// First byte to map
    #[arg(long = "start-offset", value_name = "OFFSET")]
    start_offset: Option<String>,
    /// Map at most this many bytes
    #[arg(long = "max-length", value_name = "LENGTH")]
    max_length: Option<String>,
    /// Open the image even if another process uses it
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The filename is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    filename: String,
}

/// One line of the map: qemu-img's MapEntry.
#[derive(Debug, Clone, Default)]
struct Entry {
    start: u64,
    length: u64,
    depth: usize,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
    /// File the offset points into (with an offset only).
    file: Option<String>,
}

impl Entry {
    fn new(chain: &Chain, start: u64, s: Status, depth: usize) -> Entry {
        let offset = if s.has(OFFSET_VALID) { s.offset } else { None };
        Entry {
            start,
            length: s.len,
            depth,
            present: s.has(ALLOCATED),
            zero: s.has(ZERO),
            data: s.has(DATA),
            compressed: s.has(COMPRESSED),
            offset,
            file: offset.map(|_| chain.file_name(depth, s.file)),
        }
    }

    /// Whether `next` continues this entry (qemu-img's entry_mergeable).
    fn mergeable(&self, next: &Entry) -> bool {
        self.length > 0
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.file == next.file
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a.wrapping_add(self.length) == b,
                _ => false,
            }
    }

    fn json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            // QEMU's int64: a VMDK flat extent's offset may wrap.
            s += &format!(", \"offset\": {}", o as i64);
        }
        s.push('}');
        s
    }
}

/// C's "%#-16" PRIx64: "0x" prefix except for zero, left-aligned.
fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

pub fn run(a: MapArgs) -> Result<u8, CliError> {
    let start = match &a.start_offset {
        Some(s) => cvtnum("start offset", s, 0, i64::MAX as u64).map_err(CliError::new)?,
        None => 0,
    };
    let max_len = match &a.max_length {
        Some(s) => Some(cvtnum("max length", s, 0, i64::MAX as u64).map_err(CliError::new)?),
        None => None,
    };
    let img = open_opts(
        &a.filename,
        a.image_opts,
        parse_format(&a.format)?,
        false,
        a.force_share,
    )?;
    let chain = Chain::new(&img)
        .map_err(|e| CliError::new(format!("Could not open '{}': {e}", a.filename)))?;
    let mut length = chain.len();
    if let Some(m) = max_len {
        length = length.min(start.saturating_add(m));
    }

    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let io = |e: std::io::Error| CliError::new(format!("write error: {e}"));
    let human = a.output == Output::Human;
    if human {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )
        .map_err(io)?;
    } else {
        write!(out, "[").map_err(io)?;
    }
    // Print an entry; in human mode the next one is then normalised so
    // that zero and unallocated ranges merge (qemu-img's dump_map_entry).
    let dump = |out: &mut dyn Write, e: &Entry, next: Option<&mut Entry>| -> Result<(), CliError> {
        if human {
            if e.data && e.offset.is_none() {
                return Err(CliError::new(
                    "File contains external, encrypted or compressed clusters.",
                ));
            }
            if e.data && !e.zero {
                writeln!(
                    out,
                    "{}{}{}{}",
                    hex16(e.start),
                    hex16(e.length),
                    hex16(e.offset.unwrap_or(0)),
                    e.file.as_deref().unwrap_or("")
                )
                .map_err(io)?;
            }
            if let Some(n) = next {
                if !n.data || n.zero {
                    n.data = false;
                    n.zero = true;
                }
            }
        } else {
            write!(out, "{}", e.json()).map_err(io)?;
            if next.is_some() {
                writeln!(out, ",").map_err(io)?;
            }
        }
        Ok(())
    };
    let mut curr = Entry {
        start,
        ..Default::default()
    };
    let mut result = Ok(());
    while curr.start + curr.length < length {
        let off = curr.start + curr.length;
        let (s, depth) = match chain.map_status(off, length - off) {
            Ok(x) => x,
            Err(e) => {
                // An errno's words, as qemu-img prints them.
                let e = crate::common::os_error_text(&e);
                result = Err(CliError::new(format!("Could not read file metadata: {e}")));
                break;
            }
        };
        let mut next = Entry::new(&chain, off, s, depth);
        if curr.mergeable(&next) {
            curr.length += next.length;
            continue;
        }
        if curr.length > 0 {
            if let Err(e) = dump(&mut out, &curr, Some(&mut next)) {
                result = Err(e);
                break;
            }
        }
        curr = next;
    }
    if result.is_ok() {
        result = dump(&mut out, &curr, None);
    }
    if !human && result.is_ok() {
        writeln!(out, "]").map_err(io)?;
    }
    out.flush().map_err(io)?;
    result.map(|_| 0)
}
