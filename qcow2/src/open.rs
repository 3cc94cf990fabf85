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
    /// Opened for qemu-img check (QEMU's BDRV_O_CHECK): checks the check
    /// reports itself are not run at open (a VHDX BAT's).
    pub for_check: bool,
    /// QEMU's vpc option `force_size_calc` as given (`chs` or
    /// `current_size`; any other value fails the open with QEMU's
    /// message): how a VHD image's virtual size is decided.
    pub vpc_force_size_calc: Option<String>,
}

/// Opens an image and, unless told not to, its backing chain.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Arc<dyn Image>> {
    let path = host_path(path);
    let mut seen = HashSet::new();
    open_at_depth(path, opts.format, opts.writable, opts, 0, &mut seen)
}

/// Reads the first bytes of a file to decide its format: qcow2, LUKS and
/// the foreign formats by their magic, anything else is raw (as QEMU's
/// probing falls back to raw).
pub fn probe(path: &Path) -> Result<Format> {
    let st = match path.to_str().filter(|n| crate::nbd::is_nbd(n)) {
        Some(n) => Storage::open_nbd(n, false)?,
        None => Storage::open(host_path(path), false)?,
    };
    probe_storage(&st)
}

fn probe_storage(st: &Storage) -> Result<Format> {
    // Zero-padded past the end of a shorter file, as QEMU's probe buffer
    // (all zeros, an empty file's, matches no magic: raw).
    let mut first = [0u8; crate::foreign::probe::PROBE_LEN];
    st.read_at(&mut first, 0)?;
    Ok(
        if u32::from_be_bytes(first[..4].try_into().unwrap()) == MAGIC {
            Format::Qcow2
        } else if crate::luks_image::is_luks(&first) {
            Format::Luks
        } else if let Some(f) = crate::foreign::probe::probe(&first) {
            f
        } else if let Some(name) = crate::foreign::probe::qemu_only_format(&first) {
            // QEMU would open it as that format; as raw bytes it would be
            // misread, and writable, its tables rewritten.
            return Err(Error::Format(format!(
                "Image is in the {name} format, which rimg does not read"
            )));
        } else {
            Format::Raw
        },
    )
}

/// What [`Header::parse`](crate::header::Header::parse) reads a qcow2
/// header from: the file's first cluster, or the whole file if shorter
/// (nothing past the first cluster counts). One read of 64 KiB (the
/// default cluster size) holds it for most images; a larger cluster is
/// read on from there, a smaller one cut to size. With cluster_bits out
/// of range, what was read is returned: parsing refuses it.
pub(crate) fn first_cluster(st: &Storage, file_len: u64) -> Result<Vec<u8>> {
    use crate::header::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
    let mut buf = vec![0u8; file_len.min(64 << 10) as usize];
    st.read_at(&mut buf, 0)?;
    let bits = buf
        .get(20..24)
        .map(|b| u32::from_be_bytes(b.try_into().unwrap()));
    if let Some(bits) = bits.filter(|b| (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(b)) {
        let want = file_len.min(1 << bits) as usize;
        let have = buf.len();
        if want > have {
            buf.resize(want, 0);
            st.read_at(&mut buf[have..], have as u64)?;
        }
        buf.truncate(want);
    }
    Ok(buf)
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
    // An NBD address (QEMU's nbd protocol driver) instead of a file.
    let nbd = path.to_str().filter(|n| crate::nbd::is_nbd(n));
    let canon = match nbd {
        Some(n) => PathBuf::from(n),
        None => std::fs::canonicalize(path).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?,
    };
    if !seen.insert(canon) {
        return Err(Error::Backing(format!(
            "backing file '{}' creates an infinite loop",
            path.display()
        )));
    }
    let st = match nbd {
        Some(n) => Storage::open_nbd(n, writable)?,
        None => Storage::open_locked(path, writable, opts.force_share)?,
    };
    if let (0, Some(f)) = (depth, &opts.faults) {
        st.set_faults(f.clone());
    }
    let probed = format.is_none();
    let format = match format {
        Some(f) => f,
        None => probe_storage(&st)?,
    };
    match format {
        Format::Raw => Ok(Arc::new(Raw::open_as(st, probed)?)),
        // No backing files: QEMU refuses VDI images that have a parent.
        Format::Vdi => Ok(Arc::new(crate::foreign::vdi::open(st)?)),
        // No backing files either: QEMU reads a differencing VHD as a
        // dynamic disk of its own.
        Format::Vpc => {
            use crate::foreign::vpc;
            let calc = vpc::SizeCalc::parse(opts.vpc_force_size_calc.as_deref())?;
            Ok(Arc::new(vpc::open(st, calc)?))
        }
        // QEMU passes its check open down the chain.
        Format::Vhdx => Ok(Arc::new(crate::foreign::vhdx::open(st, opts.for_check)?)),
        // A parent is a VMDK whatever it is (QEMU forces the format).
        Format::Vmdk => {
            use crate::foreign::vmdk;
            let opener = |p: &Path, meta| vmdk::open_extent_file(p, opts.force_share, meta);
            let img = vmdk::open(st, &opener)?;
            let backing = match img.layout().parent() {
                Some(name) if !opts.no_backing => {
                    let bpath = resolve_backing(img.path(), &name);
                    Some(open_backing(&bpath, Some(Format::Vmdk), opts, depth, seen)?)
                }
                _ => None,
            };
            Ok(Arc::new(img.with_backing(backing)))
        }
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

/// Opens the backing file at `path` of an image at `depth`; a failure
/// reads as QEMU's "Could not open backing file: ...", once per level.
fn open_backing(
    path: &Path,
    format: Option<Format>,
    opts: &OpenOptions,
    depth: usize,
    seen: &mut HashSet<PathBuf>,
) -> Result<Arc<dyn Image>> {
    open_at_depth(path, format, false, opts, depth + 1, seen)
        .map_err(|e| Error::Backing(format!("Could not open backing file: {e}")))
}

fn backing_of(
    st: &Storage,
    opts: &OpenOptions,
    depth: usize,
    seen: &mut HashSet<PathBuf>,
) -> Result<Option<Arc<dyn Image>>> {
    let first = first_cluster(st, st.len()?)?;
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
    open_backing(&bpath, bfmt, opts, depth, seen).map(Some)
}

#[cfg(test)]
mod tests {
    use super::first_cluster;
    use crate::storage::Storage;

    /// What the header is parsed from, for a file of `len` bytes whose
    /// cluster_bits field holds `bits`.
    fn first(len: usize, bits: u32) -> Vec<u8> {
        let p =
            std::env::temp_dir().join(format!("rimg-first-{}-{len}-{bits}", std::process::id()));
        let mut b: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        if len >= 24 {
            b[20..24].copy_from_slice(&bits.to_be_bytes());
        }
        std::fs::write(&p, &b).unwrap();
        let st = Storage::open(&p, false).unwrap();
        let got = first_cluster(&st, len as u64).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert_eq!(got[..], b[..got.len()]);
        got
    }

    #[test]
    fn reads_one_cluster_or_the_whole_shorter_file() {
        assert_eq!(first(3 << 20, 21).len(), 2 << 20);
        assert_eq!(first(3 << 20, 16).len(), 64 << 10);
        assert_eq!(first(3 << 20, 9).len(), 512);
        assert_eq!(first(10 << 10, 16).len(), 10 << 10);
        assert_eq!(first(100 << 10, 17).len(), 100 << 10);
        // Out of range: parsing refuses it from what was read.
        assert_eq!(first(3 << 20, 40).len(), 64 << 10);
        assert_eq!(first(10, 0).len(), 10);
    }
}
