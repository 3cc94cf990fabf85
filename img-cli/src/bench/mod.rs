//! `rimg bench`: qemu-img bench's options, checks and report, with the
//! requests in flight driven through io_uring on the engine's split data
//! path (map under the metadata lock, data I/O in the ring, commit on
//! completion).
//!
//! As in qemu-img: requests go to `-o`, then every `-S` bytes further,
//! wrapping modulo (image size - request size) (QEMU's fixed rule: the
//! 10.0 release wraps modulo the image size and can then run a request
//! past the end); `--flush-interval N` drains the queue and flushes each
//! time the number of requests not yet sent is a multiple of N (without
//! draining with `--no-drain`); `-t none`/`directsync` do the data I/O
//! with O_DIRECT; `-t writethrough`/`directsync` flush after every write;
//! `-t unsafe` never flushes. `-q` does not silence the report, as in
//! qemu-img.
//!
//! rimg's own option `--preallocate-ahead SIZE` (default 128 MiB, 0 for
//! off) has the engine reserve file space that much ahead of new
//! clusters (`Qcow2Options::preallocate_ahead`), as QEMU's `preallocate`
//! filter does; the unused part is cut off when the run ends.

mod options;
mod ring;
#[cfg(test)]
mod tests;

use std::os::unix::fs::OpenOptionsExt;
use std::time::Instant;

use qcow2::{OpenOptions, Qcow2Options};

use crate::CliError;
use options::parse;
pub use options::BenchArgs;
use ring::execute;

pub fn run(a: BenchArgs) -> Result<u8, CliError> {
    let _ = a.quiet;
    let p = parse(&a)?;
    let format = crate::common::parse_format(&a.format)?;
    let img = crate::blockopts::open_image(
        &a.filename,
        a.image_opts,
        OpenOptions {
            writable: a.write,
            format,
            force_share: a.force_share,
            qcow2: Qcow2Options {
                preallocate_ahead: p.prealloc,
                ..Default::default()
            },
            ..Default::default()
        },
    )?
    .map_err(|e| match e {
        qcow2::Error::Open { source, .. } => {
            CliError::new(format!("Could not open '{}': {source}", a.filename))
        }
        e => CliError::new(format!("Could not open '{}': {e}", a.filename)),
    })?;
    img.storage().set_no_flush(p.cache.no_flush);
    // The ring does guest data I/O on the image file at mapped offsets:
    // an encrypted payload would be read and written in clear, and a
    // writable foreign image places new data only through its own
    // writes.
    if !img.data_in_clear() {
        let why = match img.format() {
            qcow2::Format::Qcow2 | qcow2::Format::Luks => {
                "encrypted images (its data path does not decrypt)".to_string()
            }
            f => format!(
                "writing to {} images (its data path maps writes for qcow2 and raw only)",
                f.name()
            ),
        };
        return Err(CliError::new(format!(
            "'{}': bench does not support {why}",
            a.filename
        )));
    }
    // Data I/O with O_DIRECT goes through a descriptor of its own on the
    // file that holds guest data (the image file, or its external data
    // file); the engine keeps its metadata I/O on the buffered one, and
    // its own guest-data writes (copy-on-write fill, as around a
    // subcluster) take the direct one too, so that no page holds guest
    // data written both ways.
    let direct = if p.cache.direct {
        let data = img.data_storage();
        let name = data.path().display().to_string();
        let open_failed = |e: std::io::Error| {
            CliError::new(format!(
                "Could not open '{0}': Could not open '{0}': {1}",
                name,
                crate::common::strerror(&e)
            ))
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(a.write)
            .custom_flags(libc::O_DIRECT)
            .open(data.path())
            .map_err(open_failed)?;
        // Only where O_DIRECT takes 512-byte sectors: the engine's writes
        // have no buffered fallback (the ring's own I/O has one).
        if a.write && qcow2::storage::check_direct_alignment(&f).is_ok() {
            data.set_direct(f.try_clone().map_err(open_failed)?);
        }
        Some(f)
    } else {
        None
    };
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        p.count,
        if a.write { "write" } else { "read" },
        p.size,
        p.depth,
        p.offset,
        p.step
    );
    if p.flush_interval != 0 {
        println!("Sending flush every {} requests", p.flush_interval);
    }
    let start = Instant::now();
    execute(&img, &p, a.write, !a.no_drain, direct.as_ref())?;
    println!(
        "Run completed in {:.3} seconds.",
        start.elapsed().as_secs_f64()
    );
    img.flush()
        .map_err(|e| CliError::new(format!("Failed to flush the image: {e}")))?;
    Ok(0)
}
