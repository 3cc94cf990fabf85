//! `rimg compare`: whether two images have the same guest content, with
//! qemu-img compare's messages and exit codes (0 identical, 1 different,
//! 2 an image could not be opened, 3 block status failed, 4 a read
//! failed).
//!
//! Ranges are walked by block status through both backing chains: ranges
//! that read as zeros in both are skipped without reading, ranges stored
//! in only one image are checked for zeros, and only ranges stored in both
//! are read and compared. Mismatches are reported at 512-byte sector
//! granularity, as qemu-img reports them.

use clap::Args;

use crate::common::{is_zero, open_opts, parse_format, read_padded};
use crate::progress::{Progress, ProgressOpt};
use crate::CliError;
use qcow2::blockstatus::{Chain, ALLOCATED, ZERO};

#[derive(Args)]
pub struct CompareArgs {
    /// Format of FILENAME1 (probed when absent)
    #[arg(short = 'f', long = "a-format", value_name = "FMT")]
    format1: Option<String>,
    /// Format of FILENAME2 (probed when absent)
    #[arg(short = 'F', long = "b-format", value_name = "FMT")]
    format2: Option<String>,
    /// Strict mode: sizes and allocation must match too
    #[arg(short = 's', long = "strict")]
    strict: bool,
    /// Quiet: print nothing, the exit status tells
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[command(flatten)]
    progress: ProgressOpt,
    /// Cache mode (accepted for compatibility)
    #[arg(short = 'T', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Open the images even if another process uses them
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Image specifications (not supported)
    #[arg(long = "image-opts")]
    image_opts: bool,
    filename1: String,
    filename2: String,
}

/// Bytes read from each image at a time (qemu-img's IO_BUF_SIZE).
const IO_BUF: u64 = 2 << 20;
const SECTOR: usize = 512;

fn fail(code: u8, msg: String) -> CliError {
    CliError { msg, code }
}

/// Index of the first 512-byte sector (relative to `b`) holding a
/// non-zero byte, as qemu-img's find_nonzero.
fn find_nonzero(b: &[u8]) -> Option<usize> {
    b.chunks(SECTOR)
        .position(|s| !is_zero(s))
        .map(|i| i * SECTOR)
}

/// Offset within the buffers of the first 512-byte sector that differs.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(SECTOR)
        .zip(b.chunks(SECTOR))
        .position(|(x, y)| x != y)
        .map(|i| i * SECTOR)
}

struct Side {
    name: String,
    chain: Chain,
}

impl Side {
    fn read(&self, buf: &mut [u8], off: u64) -> Result<(), CliError> {
        read_padded(self.chain.top(), buf, off).map_err(|e| {
            fail(
                4,
                format!(
                    "Error while reading offset {off} of {}: {}",
                    self.name,
                    crate::common::os_error_text(&e)
                ),
            )
        })
    }

    fn status(&self, off: u64, bytes: u64) -> Result<qcow2::blockstatus::Status, CliError> {
        self.chain.status_above(off, bytes).map_err(|e| {
            fail(
                3,
                format!("Sector allocation test failed for {}: {e}", self.name),
            )
        })
    }

    /// Checks that [off, off + len) reads as zeros; the offset of the first
    /// non-zero sector otherwise.
    fn check_zero(&self, off: u64, len: u64, buf: &mut [u8]) -> Result<Option<u64>, CliError> {
        let b = &mut buf[..len as usize];
        self.read(b, off)?;
        Ok(find_nonzero(b).map(|i| off + i as u64))
    }
}

pub fn run(a: CompareArgs) -> Result<u8, CliError> {
    let _ = &a.cache;
    let open_side = |name: &str, fmt: &Option<String>| -> Result<Side, CliError> {
        let f = parse_format(fmt).map_err(|e| fail(2, e.msg))?;
        let img =
            open_opts(name, a.image_opts, f, false, a.force_share).map_err(|e| fail(2, e.msg))?;
        let chain =
            Chain::new(&img).map_err(|e| fail(2, format!("Could not open '{name}': {e}")))?;
        let name = match crate::blockopts::is_special(name) || a.image_opts {
            true => crate::blockopts::parse(name, a.image_opts)?.name,
            false => name.to_string(),
        };
        Ok(Side { name, chain })
    };
    let one = open_side(&a.filename1, &a.format1)?;
    let two = open_side(&a.filename2, &a.format2)?;
    let (size1, size2) = (one.chain.len(), two.chain.len());
    let total = size1.min(size2);
    let progress = Progress::new(
        a.progress.target(a.quiet),
        "Comparing",
        size1.max(size2),
        2.0,
    );
    // qemu-img's stdout is fully buffered into a pipe: its lines come
    // after an error on stderr there, so they wait for the end here too.
    use std::io::IsTerminal;
    let buffered = !std::io::stdout().is_terminal();
    let held = std::cell::RefCell::new(String::new());
    let say = |s: &str| {
        if a.quiet {
        } else if buffered {
            held.borrow_mut().push_str(&format!("{s}\n"));
        } else {
            progress.suspend(|| println!("{s}"));
        }
    };
    let r = compare(&a, &one, &two, total, &progress, &say);
    progress.finish();
    let held = held.into_inner();
    match r {
        Err(e) if !held.is_empty() => {
            eprintln!("{}: {}", crate::prog_name(), e.msg);
            print!("{held}");
            Err(CliError {
                msg: String::new(),
                code: e.code,
            })
        }
        r => {
            print!("{held}");
            r
        }
    }
}

fn compare(
    a: &CompareArgs,
    one: &Side,
    two: &Side,
    total: u64,
    progress: &Progress,
    say: &dyn Fn(&str),
) -> Result<u8, CliError> {
    let (size1, size2) = (one.chain.len(), two.chain.len());
    if a.strict && size1 != size2 {
        say("Strict mode: Image size mismatch!");
        return Ok(1);
    }
    let mut buf1 = vec![0u8; IO_BUF as usize];
    let mut buf2 = vec![0u8; IO_BUF as usize];
    let mut off = 0;
    while off < total {
        let s1 = one.status(off, size1 - off)?;
        let s2 = two.status(off, size2 - off)?;
        let mut chunk = s1.len.min(s2.len);
        if a.strict && s1.flags != s2.flags {
            say(&format!("Strict mode: Offset {off} block status mismatch!"));
            return Ok(1);
        }
        let (alloc1, alloc2) = (s1.has(ALLOCATED), s2.has(ALLOCATED));
        if s1.has(ZERO) && s2.has(ZERO) {
            // Both read as zeros: nothing to read.
        } else if alloc1 == alloc2 {
            if alloc1 {
                chunk = chunk.min(IO_BUF);
                let n = chunk as usize;
                one.read(&mut buf1[..n], off)?;
                two.read(&mut buf2[..n], off)?;
                if let Some(i) = first_difference(&buf1[..n], &buf2[..n]) {
                    say(&format!("Content mismatch at offset {}!", off + i as u64));
                    return Ok(1);
                }
            }
        } else {
            // Stored in one image only: the other reads as zeros there.
            chunk = chunk.min(IO_BUF);
            let side = if alloc1 { one } else { two };
            if let Some(at) = side.check_zero(off, chunk, &mut buf1)? {
                say(&format!("Content mismatch at offset {at}!"));
                return Ok(1);
            }
        }
        off += chunk;
        progress.add(chunk);
    }
    if size1 != size2 {
        say("Warning: Image size mismatch!");
        let over = if size1 > size2 { one } else { two };
        let end = size1.max(size2);
        while off < end {
            let s = over.status(off, end - off)?;
            let mut chunk = s.len;
            if s.has(ALLOCATED) && !s.has(ZERO) {
                chunk = chunk.min(IO_BUF);
                if let Some(at) = over.check_zero(off, chunk, &mut buf1)? {
                    say(&format!("Content mismatch at offset {at}!"));
                    return Ok(1);
                }
            }
            off += chunk;
            progress.add(chunk);
        }
    }
    say("Images are identical.");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_granularity() {
        let a = vec![0u8; 2048];
        let mut b = a.clone();
        assert_eq!(first_difference(&a, &b), None);
        b[1500] = 1;
        assert_eq!(first_difference(&a, &b), Some(1024));
        assert_eq!(find_nonzero(&b), Some(1024));
        assert_eq!(find_nonzero(&b[..1501]), Some(1024));
        assert_eq!(find_nonzero(&b[..1100]), None);
        b[0] = 1;
        assert_eq!(find_nonzero(&b), Some(0));
    }
}
