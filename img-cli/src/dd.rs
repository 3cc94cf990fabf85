//! `rimg dd`: copies input to a new output image, dd style, with qemu-img
//! dd's operands and semantics:
//! - the output is created with the input's size, or `count * bs` when
//!   that is smaller, less the `skip * bs` bytes skipped (so `count`
//!   counts the skipped blocks too, as in qemu-img);
//! - a skip past the input's end gives an empty output and a warning;
//! - every byte is written (no zero detection), as qemu-img writes it.

use std::path::Path;

use clap::Args;
use qcow2::{CreateOptions, Format, OpenOptions};

use crate::common::{open_opts, parse_format, qemu_len, read_padded};
use crate::progress::{Progress, ProgressOpt};
use crate::size::cvtnum;
use crate::CliError;

#[derive(Args)]
pub struct DdArgs {
    /// Input format (probed when absent)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Output format (default raw)
    #[arg(short = 'O', long = "output-format", value_name = "OUTPUT_FMT")]
    out_format: Option<String>,
    /// Open the input even if another process uses it
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The filename is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[command(flatten)]
    progress: ProgressOpt,
    /// bs=BLOCK_SIZE (default 512), count=BLOCKS, skip=BLOCKS, if=INPUT,
    /// of=OUTPUT
    #[arg(value_name = "OPERAND")]
    operands: Vec<String>,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Operands {
    bs: u64,
    count: Option<u64>,
    skip: Option<u64>,
    input: Option<String>,
    output: Option<String>,
}

/// A block count: a plain decimal integer (no size suffix) in
/// [0, i64::MAX].
fn blocks(name: &str, v: &str) -> Result<u64, String> {
    let t = v.trim_start();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("Invalid {name} specified: '{v}'."));
    }
    match t.parse::<i64>() {
        Ok(n) if n >= 0 => Ok(n as u64),
        _ => Err(format!(
            "Invalid {name} specified. Must be between 0 and {}.",
            i64::MAX
        )),
    }
}

fn parse_operands(args: &[String]) -> Result<Operands, String> {
    let mut o = Operands {
        bs: 512,
        ..Default::default()
    };
    for arg in args {
        let Some((k, v)) = arg.split_once('=') else {
            return Err(format!("unrecognized operand {arg}"));
        };
        match k {
            "bs" => o.bs = cvtnum("bs", v, 1, i32::MAX as u64)?,
            "count" => o.count = Some(blocks("count", v)?),
            "skip" => o.skip = Some(blocks("skip", v)?),
            "if" => o.input = Some(v.to_string()),
            "of" => o.output = Some(v.to_string()),
            _ => return Err(format!("unrecognized operand {k}")),
        }
    }
    if o.input.is_none() || o.output.is_none() {
        return Err("Must specify both input and output files".into());
    }
    Ok(o)
}

pub fn run(a: DdArgs) -> Result<u8, CliError> {
    let o = parse_operands(&a.operands).map_err(CliError::new)?;
    let (input, output) = (o.input.unwrap(), o.output.unwrap());
    let out_fmt = parse_format(&a.out_format)?.unwrap_or(Format::Raw);
    let src = open_opts(
        &input,
        a.image_opts,
        parse_format(&a.format)?,
        false,
        a.force_share,
    )?;
    let mut size = qemu_len(src.as_ref());
    if let Some(c) = o.count {
        if let Some(b) = c.checked_mul(o.bs).filter(|&b| b <= i64::MAX as u64) {
            size = size.min(b);
        }
    }
    let skip_bytes = o
        .skip
        .map(|s| s.checked_mul(o.bs).filter(|&b| b <= i64::MAX as u64));
    let skip_past_end =
        matches!(skip_bytes, Some(None)) || matches!(skip_bytes, Some(Some(b)) if b > size);
    let start = match skip_bytes {
        Some(Some(b)) if !skip_past_end => b,
        Some(_) => size,
        None => 0,
    };
    let opts = CreateOptions {
        format: out_fmt,
        // Both formats are created in whole sectors, as by qemu-img.
        size: (size - start).next_multiple_of(512),
        ..Default::default()
    };
    qcow2::create(Path::new(&output), &opts)
        .map_err(|e| CliError::new(format!("{output}: error while creating output image: {e}")))?;
    let dst = qcow2::open(
        Path::new(&output),
        &OpenOptions {
            writable: true,
            format: Some(out_fmt),
            ..Default::default()
        },
    )
    .map_err(|e| CliError::new(format!("Could not open '{output}': {e}")))?;
    if skip_past_end {
        eprintln!(
            "{}: {input}: cannot skip to specified offset",
            crate::prog_name()
        );
    }
    // One block of bs bytes at a time, as qemu-img reads: where a format
    // answers by where a read starts (a VMDK grain that runs on past its
    // extent, a VHDX block at offset 0), the bytes are the same; and the
    // blocks before a failing read are written.
    let mut buf = vec![0u8; o.bs.min(size - start).max(1) as usize];
    let progress = Progress::new(
        a.progress.target(false),
        "Copying",
        (size - start).max(1),
        1.0,
    );
    let mut pos = start;
    while pos < size {
        let n = (size - pos).min(o.bs) as usize;
        read_padded(src.as_ref(), &mut buf[..n], pos).map_err(|e| {
            let e = crate::common::os_error_text(&e);
            CliError::new(format!("error while reading from input image file: {e}"))
        })?;
        dst.write_at(&buf[..n], pos - start)
            .map_err(|e| CliError::new(format!("error while writing to output image file: {e}")))?;
        pos += n as u64;
        progress.add(n as u64);
    }
    dst.flush()
        .map_err(|e| CliError::new(format!("error while writing to output image file: {e}")))?;
    if size == start {
        progress.add(1);
    }
    progress.finish();
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(v: &[&str]) -> Result<Operands, String> {
        parse_operands(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn operands_like_qemu() {
        let o = ops(&["if=a", "of=b", "bs=1M", "count=3", "skip=1"]).unwrap();
        assert_eq!((o.bs, o.count, o.skip), (1 << 20, Some(3), Some(1)));
        assert_eq!(ops(&["if=a", "of=b"]).unwrap().bs, 512);
        assert_eq!(
            ops(&["if=a"]).unwrap_err(),
            "Must specify both input and output files"
        );
        assert_eq!(ops(&["foo=1"]).unwrap_err(), "unrecognized operand foo");
        assert_eq!(ops(&["bar"]).unwrap_err(), "unrecognized operand bar");
        assert_eq!(
            ops(&["bs=0"]).unwrap_err(),
            "Invalid bs specified. Must be between 1 and 2147483647."
        );
        assert_eq!(
            ops(&["bs=abc"]).unwrap_err(),
            "Invalid bs specified: 'abc'."
        );
        assert_eq!(
            ops(&["count=1k"]).unwrap_err(),
            "Invalid count specified: '1k'."
        );
        assert_eq!(
            ops(&["skip=-1"]).unwrap_err(),
            "Invalid skip specified. Must be between 0 and 9223372036854775807."
        );
    }
}
