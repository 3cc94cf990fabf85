//! Opening images: format probing and backing chains.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::header::MAGIC;
use crate::image::{Format, Image};
use crate::luks_image::LuksImage;
use crate::qcow::{Qcow2, Qcow2Options};
use crate::raw::Raw;
use crate::storage::Storage;

pub use crate::paths::{host_path, resolve_backing};

/// Deepest backing chain followed; deeper chains are refused.
pub const MAX_CHAIN_DEPTH: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open the top image for writing (backing images are always
    /// read-only).
    pub writable: bool,
    /// Format of the top image; probed when None.
    pub format: Option<Format>,
    /// Do not open backing files: unallocated clusters read as zeros.
    pub no_backing: bool,
    /// Take no locks (qemu-img's -U): the image may be in use elsewhere.
    pub force_share: bool,
    pub qcow2: Qcow2Options,
    /// Fault injection for the top image's file (qemu-img's blkdebug).
    pub faults: Option<Arc<dyn crate::storage::Faults>>,
    /// Passwords of encrypted backing images, nearest first (QEMU's
    /// `backing.encrypt.key-secret`, `backing.backing.encrypt...`); the
    /// top image's is `qcow2.encrypt_key`.
    pub backing_keys: Vec<Option<crate::encrypt::Secret>>,
}

/// Opens an image and, unless told not to, its backing chain.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Arc<dyn Image>> {
    let path = host_path(path);
    let mut seen = HashSet::new();
    open_at_depth(path, opts.format, opts.writable, opts, 0, &mut seen)
}

/// Reads the first bytes of a file to decide its format: qcow2 and LUKS
/// by magic, anything else is raw (as QEMU's probing falls back to raw).
pub fn probe(path: &Path) -> Result<Format> {
    let st = Storage::open(host_path(path), false)?;
    probe_storage(&st)
}

fn probe_storage(st: &Storage) -> Result<Format> {
    let mut magic = [0u8; 6];
    st.read_at(&mut magic, 0)?;
    Ok(
        if u32::from_be_bytes(magic[..4].try_into().unwrap()) == MAGIC {
            Format::Qcow2
        } else if crate::luks_image::is_luks(&magic) {
            Format::Luks
        } else {
            Format::Raw
        },
    )
}

fn open_at_depth(
    path: &Path,
    format: Option<Format>,
    writable: bool,
    opts: &OpenOptions,
    depth: usize,
    seen: &mut HashSet<PathBuf>,
) -> Result<Arc<dyn Image>> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(Error::Backing(format!(
            "backing chain is deeper than {MAX_CHAIN_DEPTH} images at '{}'",
            path.display()
        )));
    }
    let canon = std::fs::canonicalize(path).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if !seen.insert(canon) {
        return Err(Error::Backing(format!(
            "backing file '{}' creates an infinite loop",
            path.display()
        )));
    }
    let st = Storage::open_locked(path, writable, opts.force_share)?;
    if let (0, Some(f)) = (depth, &opts.faults) {
        st.set_faults(f.clone());
    }
    let format = match format {
        Some(f) => f,
        None => probe_storage(&st)?,
    };
    match format {
        Format::Raw => Ok(Arc::new(Raw::open(st)?)),
        Format::Luks => {
            let key = match depth {
                0 => opts.qcow2.encrypt_key.clone(),
                d => opts.backing_keys.get(d - 1).cloned().flatten(),
            };
            let no_io = opts.qcow2.no_io;
            Ok(Arc::new(LuksImage::open(st, key.as_ref(), no_io)?))
        }
        Format::Qcow2 => {
            let backing = if opts.no_backing {
                None
            } else {
                backing_of(&st, opts, depth, seen)?
            };
            let mut qopts = opts.qcow2.clone();
            if depth > 0 {
                qopts.encrypt_key = opts.backing_keys.get(depth - 1).cloned().flatten();
            }
            Ok(Arc::new(Qcow2::open(st, backing, qopts)?))
        }
    }
}

fn backing_of(
    st: &Storage,
    opts: &OpenOptions,
    depth: usize,
    seen: &mut HashSet<PathBuf>,
) -> Result<Option<Arc<dyn Image>>> {
    let mut first = vec![0u8; 1 << crate::header::MAX_CLUSTER_BITS];
    let len = st.len()?.min(first.len() as u64) as usize;
    first.truncate(len);
    st.read_at(&mut first, 0)?;
    let h = crate::header::Header::parse(&first)?;
    let Some(name) = h.backing_file.as_deref() else {
        return Ok(None);
    };
    let bpath = resolve_backing(st.path(), name);
    let bfmt = match h.backing_format.as_deref() {
        None => None,
        Some(f) => Some(Format::from_name(f).ok_or_else(|| {
            Error::Backing(format!(
                "unknown backing file format '{f}' for '{}'",
                bpath.display()
            ))
        })?),
    };
    let b = open_at_depth(&bpath, bfmt, false, opts, depth + 1, seen).map_err(|e| match e {
        e @ Error::Backing(_) => e,
        e => Error::Backing(format!(
            "could not open backing file '{}': {e}",
            bpath.display()
        )),
    })?;
    Ok(Some(b))
}
