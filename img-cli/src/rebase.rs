//! `rimg rebase`: changes an image's backing file. Safe mode first copies
//! into the image every cluster where the old and the new backing chains
//! read differently, so the image reads the same afterwards; `-u` only
//! rewrites the header.

use std::path::Path;

use clap::Args;
use qcow2::{ExtentKind, Format, Image, OpenOptions};

use crate::progress::{Progress, ProgressOpt};
use crate::CliError;

#[derive(Args)]
pub struct RebaseArgs {
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// New backing file ("" for none)
    #[arg(
        short = 'b',
        long = "backing",
        value_name = "BACKING_FILE",
        required = true
    )]
    backing: String,
    /// Format of the new backing file
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_fmt: Option<String>,
    /// Unsafe: only change the backing file name, copy nothing
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_mode: bool,
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    #[arg(short = 'T', long = "backing-cache", value_name = "SRC_CACHE")]
    src_cache: Option<String>,
    #[command(flatten)]
    progress: ProgressOpt,
    /// Write the copied clusters compressed
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The filename is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    filename: String,
}

pub fn run(a: RebaseArgs) -> Result<u8, CliError> {
    let _ = (&a.cache, &a.src_cache);
    let fmt = |f: &Option<String>| -> Result<Option<Format>, CliError> {
        match f {
            Some(f) => {
                Ok(Some(Format::from_name(f).ok_or_else(|| {
                    CliError::new(format!("Unknown file format '{f}'"))
                })?))
            }
            None => Ok(None),
        }
    };
    let format = fmt(&a.format)?;
    // A format name is only recorded with -u, so any driver qemu-img
    // knows will do; a safe rebase has to open the file with it.
    let new_fmt = match &a.backing_fmt {
        Some(f) if a.unsafe_mode && Format::from_name(f).is_none() => {
            if !QEMU_DRIVERS.contains(&f.as_str()) {
                return Err(CliError::new(format!("Invalid format name: '{f}'")));
            }
            None
        }
        f => fmt(f)?,
    };
    let img = crate::blockopts::open_image(
        &a.filename,
        a.image_opts,
        OpenOptions {
            writable: true,
            format,
            no_backing: a.unsafe_mode,
            force_share: a.force_share,
            ..Default::default()
        },
    )?
    .map_err(|e| CliError::new(format!("Could not open '{}': {e}", a.filename)))?;
    if a.compress && !img.supports_compression() {
        return Err(CliError::new(
            "Compression not supported for this file format",
        ));
    }
    let Some(q) = img.as_qcow2() else {
        return Err(CliError::new(format!(
            "rebase is not supported for '{}' images",
            img.format().name()
        )));
    };
    let new_name = (!a.backing.is_empty()).then(|| a.backing.clone());
    if new_name.is_some() && a.backing_fmt.is_none() {
        // As qemu-img (since 6.1): a backing file is never recorded
        // without its format, which probing would guess (and a guest
        // could then make a raw backing file look like an image).
        return Err(CliError::new(format!(
            "Could not change the backing file to '{}': backing format must be specified",
            a.backing
        )));
    }
    let progress = Progress::new(a.progress.target(a.quiet), "Rebasing", img.size(), 2.0);
    let new_fmt_name = a.backing_fmt.clone();
    if !a.unsafe_mode {
        let new = match &new_name {
            None => None,
            Some(n) => {
                let path = qcow2::resolve_backing(Path::new(&a.filename), n);
                let b = qcow2::open(
                    &path,
                    &OpenOptions {
                        format: new_fmt,
                        force_share: a.force_share,
                        ..Default::default()
                    },
                )
                .map_err(|e| {
                    CliError::new(format!("Could not open new backing file '{n}': {e}"))
                })?;
                Some(b)
            }
        };
        copy_differences(img.as_ref(), new.as_deref(), a.compress, &progress)?;
    }
    img.flush()?;
    q.update_header(|h| {
        h.backing_file = new_name.clone();
        h.backing_format = if new_name.is_some() {
            new_fmt_name.clone()
        } else {
            None
        };
        Ok(())
    })?;
    progress.complete();
    progress.finish();
    Ok(0)
}

/// Where `img` is unallocated, makes it hold what its old backing chain
/// shows wherever the new one (or zeros) would show something else.
fn copy_differences(
    img: &dyn Image,
    new: Option<&dyn Image>,
    compress: bool,
    progress: &Progress,
) -> Result<(), CliError> {
    let size = img.size();
    // Differences are copied per subcluster with extended L2 entries,
    // so that only those become allocated (as qemu-img does); compressed
    // writes take whole clusters, so with -c a cluster with any difference
    // is written whole.
    let unit = if compress {
        img.cluster_size()
    } else {
        img.subcluster_size()
    };
    let cs = unit.unwrap_or(65536);
    let zero_clusters = img.supports_zero_clusters();
    let had_backing = img.backing().is_some();
    let step = (1u64 << 20).max(cs);
    let mut old_buf = vec![0u8; step as usize];
    let mut new_buf = vec![0u8; step as usize];
    let mut pos = 0;
    while pos < size {
        let e = img.block_status(pos, (size - pos).min(step))?;
        if e.kind != ExtentKind::Unallocated {
            pos += e.len;
            progress.add(e.len);
            continue;
        }
        let len = e.len as usize;
        // Reads of unallocated ranges come from the old backing chain.
        img.read_at(&mut old_buf[..len], pos)?;
        read_or_zero(new, &mut new_buf[..len], pos)?;
        // Compare per cluster, write the clusters that differ.
        let mut k = 0;
        while k < len {
            let c_end = (((pos + k as u64) / cs + 1) * cs - pos) as usize;
            let j = c_end.min(len);
            if old_buf[k..j] != new_buf[k..j] {
                if zero_clusters && !had_backing {
                    // With no old backing file at all, qemu-img writes a
                    // zero cluster, not zero bytes (with one, even past
                    // its end, it copies what it reads as data).
                    // (Version 2 has none: zeros written there would read
                    // as "unallocated", showing the new backing file.)
                    img.write_zeroes(pos + k as u64, (j - k) as u64, false)?;
                } else if compress {
                    let at = pos + k as u64;
                    let whole = at.is_multiple_of(cs)
                        && ((j - k) as u64 == cs || j == len && pos + e.len == size);
                    if whole {
                        img.write_compressed(at, &old_buf[k..j])?;
                    } else {
                        img.write_at(&old_buf[k..j], at)?;
                    }
                } else {
                    img.write_at(&old_buf[k..j], pos + k as u64)?;
                }
            }
            k = j;
        }
        pos += e.len;
        progress.add(e.len);
    }
    Ok(())
}

fn read_or_zero(img: Option<&dyn Image>, buf: &mut [u8], off: u64) -> Result<(), CliError> {
    buf.fill(0);
    if let Some(b) = img {
        if off < b.size() {
            let n = ((b.size() - off) as usize).min(buf.len());
            b.read_at(&mut buf[..n], off)?;
        }
    }
    Ok(())
}

/// Drivers qemu-img knows by name (its --help list): `rebase -u` records
/// any of them as the backing format.
const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "iser",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];
