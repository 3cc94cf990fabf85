//! VMDK images, as QEMU's vmdk driver reads them (monolithicSparse ones
//! are created and written too: `write.rs`):
//! - a single sparse file (monolithicSparse, what `qemu-img create -f
//!   vmdk` makes, and streamOptimized, with compressed grains): `sparse.rs`
//!   and `stream.rs`;
//! - a text descriptor naming extent files (monolithicFlat,
//!   twoGbMaxExtentFlat, vmfs, twoGbMaxExtentSparse, vmfsSparse), parsed
//!   as QEMU parses it (`desc.rs`): FLAT and VMFS extents are raw files
//!   from an offset on, SPARSE and VMFSSPARSE extents sparse files.
//!
//! The extents lie one after the other in the disk, in the order the
//! descriptor lists them. A parent (`parentFileNameHint`, a VMware
//! snapshot's delta disk) is opened as a VMDK backing image: unallocated
//! grains read from it once its CID matches the child's parentCID.
//! seSparse and COWD extents are refused with a clear error, not read.
//!
//! What QEMU does, and rimg with it:
//! - an extent's file is opened as its own file: a relative name is
//!   joined to the descriptor's name as a string;
//! - a flat extent is one run of data (block status recurses into its
//!   file for holes); reads past its file's end are zeros;
//! - a sparse extent's size is its header's capacity, not the line's;
//! - the CID and parent CID are the first `CID` and `parentCID` found in
//!   the 10 KiB at the descriptor (at 0x200 in a sparse file, whatever
//!   its header says), up to its first NUL byte.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::{ForeignImage, Layout, Where};
use crate::check::report::CheckReport;
use crate::error::{Error, Result};
use crate::image::Format;
use crate::storage::Storage;

pub use sparse::{
    at, Header, COMPRESSION_DEFLATE, FLAG_MARKER, FLAG_RGD, FLAG_ZERO_GRAIN, GD_AT_END, HEADER_LEN,
    MAGIC, MAX_GD_ENTRIES, MAX_GRAIN_SECTORS, MAX_GTES,
};
use sparse::{GrainAt, Sparse};

/// A VMDK image.
pub type Vmdk = ForeignImage<VmdkLayout>;

/// The largest grain rimg writes (QEMU and VMware make 64 KiB ones).
const MAX_WRITTEN_GRAIN: u64 = 2 << 20;

/// The old VMFS sparse ("COWD") magic: QEMU reads it, rimg does not.
pub const MAGIC_COWD: &[u8; 4] = b"COWD";
const SECTOR: u64 = 512;
/// Where a sparse file's descriptor is searched for the CIDs, and how
/// much of it.
const DESC_AT: u64 = 0x200;
const DESC_SIZE: usize = 20 * 512;
/// The most of a descriptor QEMU reads (a C string of 1 MiB).
const MAX_DESC: u64 = (1 << 20) - 1;

/// Opens the file an extent line names (read-only); `metadata` when the
/// extent has tables in it (sparse): others may then not write the file,
/// as they may write a flat extent's (QEMU's data-only child).
pub type ExtentOpener<'a> = &'a dyn Fn(&Path, bool) -> Result<Storage>;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn refuse(msg: impl Into<String>) -> Error {
    Error::Format(msg.into())
}

/// What rimg does not read yet, said plainly.
fn not_yet(what: &str) -> Error {
    refuse(format!("{what} are not supported by rimg yet"))
}

/// How an extent's guest bytes are stored.
#[derive(Debug)]
enum Data {
    /// Raw, from this byte of the file on (QEMU's int64 shift of the
    /// line's sector, wrapped).
    Flat { offset: u64 },
    /// A sparse extent; shared by the extents whose lines name the same
    /// file (its tables are held once).
    Sparse(Arc<Sparse>),
}

#[derive(Debug)]
struct Extent {
    /// First disk sector.
    start: u64,
    sectors: u64,
    /// The file: 0 is the image file itself, k the k-th extent file.
    file: u32,
    data: Data,
    /// The line's type; None for a sparse image file read directly.
    kind: Option<desc::Kind>,
}

impl Extent {
    fn end(&self) -> u64 {
        self.start + self.sectors
    }

    fn sparse(&self) -> Option<&Sparse> {
        match &self.data {
            Data::Sparse(s) => Some(s),
            Data::Flat { .. } => None,
        }
    }

    /// QEMU's vmdk_extents_type_eq.
    fn type_eq(&self, o: &Extent) -> bool {
        match (self.sparse(), o.sparse()) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                a.compressed == b.compressed && a.grain_sectors() == b.grain_sectors()
            }
            _ => false,
        }
    }
}

/// What qemu-img info shows of one extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentInfo {
    pub virtual_size: u64,
    /// Index into [`VmdkLayout::extent_files`] plus one; 0: the image
    /// file.
    pub file: u32,
    /// The grain; None for a flat extent.
    pub cluster_size: Option<u64>,
    /// The line's type word; "" for a sparse image file read directly.
    pub format: &'static str,
    pub compressed: bool,
}

/// A VMDK image's extents, CIDs and create type.
#[derive(Debug)]
pub struct VmdkLayout {
    extents: Vec<Extent>,
    /// A descriptor's extent files, one per extent, in order.
    files: Vec<Storage>,
    /// Disk sectors.
    sectors: u64,
    cid: u32,
    parent_cid: u32,
    create_type: String,
    /// The parent's name as the descriptor gives it (None: none, or "").
    parent: Option<Vec<u8>>,
    /// A write has put a new CID in the descriptor (once per open).
    cid_updated: std::sync::atomic::AtomicBool,
}

/// Opens a VMDK image (for writing: a monolithicSparse one only);
/// extent files are opened with `opener`.
pub fn open(st: Storage, opener: ExtentOpener) -> Result<Vmdk> {
    let layout = VmdkLayout::read(&st, opener)?;
    ForeignImage::new(st, layout)
}

/// Opens an extent file as QEMU's file driver would take it: read-only,
/// locked as a reader unless `force_share`; a regular file, or a device
/// under /dev (QEMU's host_device). Anything else (a directory, a FIFO
/// that would block the open) is refused with QEMU's words.
pub fn open_extent_file(path: &Path, force_share: bool, metadata: bool) -> Result<Storage> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let shown = path.display();
    let could_not = |e: std::io::Error| {
        let e = crate::error::strerror(&e);
        refuse(format!("Could not open '{shown}': {e}"))
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(could_not)?;
    let t = f.metadata().map_err(could_not)?.file_type();
    if !t.is_file() && !t.is_block_device() && !t.is_char_device() {
        return Err(refuse(format!(
            "'file' driver requires '{shown}' to be a regular file"
        )));
    }
    Storage::from_file_locked(f, path, force_share, !metadata)
}

/// The descriptor text at `at` of a file `file_len` bytes long (in whole
/// sectors), read as QEMU reads it: at most 1 MiB - 1 bytes, up to the
/// first NUL.
fn read_desc(st: &Storage, at: u64, file_len: u64) -> Result<Vec<u8>> {
    let len = file_len.min(MAX_DESC);
    if !sparse::readable(at, len) {
        return Err(refuse("Could not read from file: Input/output error"));
    }
    let mut b = vec![0u8; len as usize];
    st.read_at(&mut b, at)?;
    let n = desc::until_nul(&b).len();
    b.truncate(n);
    Ok(b)
}

/// A file's length as QEMU's block layer sees it: in whole sectors.
fn sectors_len(st: &Storage) -> Result<u64> {
    Ok(st.len()?.next_multiple_of(SECTOR))
}

/// The extents a descriptor lists, its extent files and create type.
struct Described {
    extents: Vec<Extent>,
    files: Vec<Storage>,
    create_type: String,
}

impl VmdkLayout {
    fn read(st: &Storage, opener: ExtentOpener) -> Result<VmdkLayout> {
        let file_len = sectors_len(st)?;
        if file_len < 4 {
            return Err(refuse("File is too small, not a valid image"));
        }
        let mut b = [0u8; HEADER_LEN];
        st.read_at(&mut b, 0)?;
        let (d, desc_at) = if &b[..4] == MAGIC_COWD {
            return Err(not_yet("VMDK3 (COWD) sparse files"));
        } else if &b[..4] == MAGIC {
            let h = Header::parse(&b);
            if h.capacity == 0 && h.desc_offset != 0 {
                // The embedded descriptor stands for the file; the CIDs
                // are still looked for at 0x200.
                let text = read_desc(st, h.desc_offset.wrapping_mul(SECTOR), file_len)?;
                (Self::described(st, &text, opener, file_len)?, DESC_AT)
            } else {
                let s = Sparse::read(st, h, file_len)?;
                let create_type = if s.compressed {
                    "streamOptimized"
                } else {
                    "monolithicSparse"
                };
                let e = Extent {
                    start: 0,
                    sectors: s.header.capacity,
                    file: 0,
                    data: Data::Sparse(Arc::new(s)),
                    kind: None,
                };
                let d = Described {
                    extents: vec![e],
                    files: Vec::new(),
                    create_type: create_type.into(),
                };
                (d, DESC_AT)
            }
        } else {
            let text = read_desc(st, 0, file_len)?;
            (Self::described(st, &text, opener, file_len)?, 0)
        };
        // The descriptor, for the CIDs and the parent's name.
        let mut desc = vec![0u8; DESC_SIZE];
        st.read_at(&mut desc, desc_at)?;
        let einval = || {
            refuse(format!(
                "Could not open '{}': Invalid argument",
                st.path().display()
            ))
        };
        let parent = desc::parent_hint(&desc).map_err(|()| einval())?;
        let cid = desc::cid_after(&desc, b"CID").ok_or_else(einval)?;
        let parent_cid = desc::cid_after(&desc, b"parentCID").ok_or_else(einval)?;
        // The disk's length past QEMU's largest (or u64): EFBIG from the
        // block layer once the driver has opened.
        let sectors = d
            .extents
            .iter()
            .try_fold(0u64, |t, e| t.checked_add(e.sectors));
        match sectors.and_then(|s| s.checked_mul(SECTOR)) {
            Some(n) if n <= super::MAX_OFFSET => {}
            _ => {
                return Err(refuse(
                    "Could not refresh total sector count: File too large",
                ))
            }
        }
        let mut start = 0;
        let mut extents = d.extents;
        for e in &mut extents {
            e.start = start;
            start += e.sectors;
        }
        Ok(VmdkLayout {
            extents,
            files: d.files,
            sectors: start,
            cid,
            parent_cid,
            create_type: d.create_type,
            parent,
            cid_updated: Default::default(),
        })
    }

    /// The extents descriptor `text` of image file `st` lists, their
    /// files opened (QEMU's vmdk_open_desc_file). `desc_len` is the image
    /// file's length, which QEMU finds a stream extent's footer against.
    fn described(
        st: &Storage,
        text: &[u8],
        opener: ExtentOpener,
        desc_len: u64,
    ) -> Result<Described> {
        let mut create_type = desc::check_create_type(text)?;
        let mut extents = Vec::new();
        let mut files = Vec::new();
        // Sparse extents by file (device, inode): one set of tables each,
        // whatever the lines repeat.
        let mut sparse: HashMap<(u64, u64), Arc<Sparse>> = HashMap::new();
        desc::for_each_extent_line(text, |line| {
            let path = desc::extent_path(st.path(), line.name);
            let metadata = !matches!(line.kind, desc::Kind::Flat | desc::Kind::Vmfs);
            let f = opener(&path, metadata)?;
            let file = files.len() as u32 + 1;
            let (sectors, data) = match line.kind {
                desc::Kind::Flat | desc::Kind::Vmfs => (
                    line.sectors,
                    Data::Flat {
                        offset: line.offset.wrapping_shl(9),
                    },
                ),
                desc::Kind::Sparse | desc::Kind::VmfsSparse => {
                    let s = Self::sparse_extent(&f, desc_len, &mut sparse)?;
                    if s.compressed {
                        create_type = "streamOptimized".into();
                    }
                    (s.header.capacity, Data::Sparse(s))
                }
                desc::Kind::SeSparse => return Err(not_yet("seSparse extents")),
            };
            extents.push(Extent {
                start: 0,
                sectors,
                file,
                data,
                kind: Some(line.kind),
            });
            files.push(f);
            Ok(())
        })?;
        Ok(Described {
            extents,
            files,
            create_type,
        })
    }

    /// The sparse extent in file `f` (QEMU's vmdk_open_sparse), or the
    /// one already read from the same file.
    fn sparse_extent(
        f: &Storage,
        desc_len: u64,
        seen: &mut HashMap<(u64, u64), Arc<Sparse>>,
    ) -> Result<Arc<Sparse>> {
        use std::os::unix::fs::MetadataExt;
        let md = f
            .file()
            .ok_or(Error::NotSupportedByFormat("VMDK extents on NBD"))?
            .metadata()
            .map_err(|e| Error::io("stat an extent", e))?;
        let key = (md.dev(), md.ino());
        if let Some(s) = seen.get(&key) {
            return Ok(s.clone());
        }
        if sectors_len(f)? < 4 {
            return Err(refuse("File is too small, not a valid image"));
        }
        let mut b = [0u8; HEADER_LEN];
        f.read_at(&mut b, 0)?;
        if &b[..4] == MAGIC_COWD {
            return Err(not_yet("VMDK3 (COWD) sparse files"));
        }
        if &b[..4] != MAGIC {
            return Err(refuse("Image not in VMDK format"));
        }
        let h = Header::parse(&b);
        if h.capacity == 0 && h.desc_offset != 0 {
            // QEMU opens it as a descriptor (its type checked first).
            let text = read_desc(f, h.desc_offset.wrapping_mul(SECTOR), sectors_len(f)?)?;
            desc::check_create_type(&text)?;
            return Err(not_yet("descriptors embedded in extent files"));
        }
        let s = Arc::new(Sparse::read(f, h, desc_len)?);
        seen.insert(key, s.clone());
        Ok(s)
    }

    /// The descriptor's CID.
    pub fn cid(&self) -> u32 {
        self.cid
    }

    /// The descriptor's parentCID (0xffffffff: no parent).
    pub fn parent_cid(&self) -> u32 {
        self.parent_cid
    }

    /// The parent image's name as the descriptor writes it
    /// (`parentFileNameHint`), if there is one: a VMDK backing file.
    pub fn parent(&self) -> Option<String> {
        self.parent
            .as_ref()
            .map(|p| String::from_utf8_lossy(p).into_owned())
    }

    /// qemu-img info's create type: the descriptor's; for a sparse file
    /// read directly, monolithicSparse; compressed grains make it a
    /// stream, as in QEMU.
    pub fn create_type(&self) -> &str {
        &self.create_type
    }

    /// Whether grains are compressed (streamOptimized).
    pub fn compressed(&self) -> bool {
        self.extents
            .iter()
            .any(|e| e.sparse().is_some_and(|s| s.compressed))
    }

    /// A descriptor's extent files, in extent order (QEMU's children
    /// `extents.0`, `extents.1`, ...); empty for a sparse image file.
    pub fn extent_files(&self) -> &[Storage] {
        &self.files
    }

    /// The extents as qemu-img info lists them.
    pub fn extents_info(&self) -> Vec<ExtentInfo> {
        self.extents
            .iter()
            .map(|e| ExtentInfo {
                virtual_size: e.sectors * SECTOR,
                file: e.file,
                cluster_size: e.sparse().map(Sparse::grain_bytes),
                format: e.kind.map_or("", desc::Kind::word),
                compressed: e.sparse().is_some_and(|s| s.compressed),
            })
            .collect()
    }

    /// Whether every extent is of the first one's type (QEMU's get_info
    /// answers, and info shows a cluster size and dirty flag, only then).
    pub fn uniform(&self) -> bool {
        self.extents.iter().all(|e| e.type_eq(&self.extents[0]))
    }

    /// The headers of the sparse extents, once per extent.
    #[cfg(feature = "fuzz-targets")]
    pub(crate) fn sparse_headers(&self) -> impl Iterator<Item = &Header> {
        self.extents
            .iter()
            .filter_map(|e| e.sparse().map(|s| &s.header))
    }

    fn file<'a>(&'a self, st: &'a Storage, file: u32) -> &'a Storage {
        match file {
            0 => st,
            k => &self.files[k as usize - 1],
        }
    }

    /// The extent holding disk sector `sector`, searched from `from` on
    /// (QEMU's find_extent with a hint).
    fn extent_at(&self, sector: u64, from: usize) -> usize {
        from + self.extents[from..].partition_point(|e| e.end() <= sector)
    }

    /// qemu-img check, as QEMU's walks the disk: from sector 0, one step
    /// per grain of the extent the step lands in (one per flat extent);
    /// the first grain or flat extent that starts past its file's end,
    /// or a grain the GD cannot place, stops the check with its error.
    /// A missing GT is passed over whole: the answers are QEMU's, the
    /// work bounded by the GDs.
    pub fn check(&self, st: &Storage) -> Result<CheckReport> {
        let mut rep = CheckReport::default();
        let mut fail = |message: String, errno: &str| {
            rep.messages.push(message);
            rep.failed = Some(errno.into());
            rep.corruptions += 1;
            Ok(std::mem::take(&mut rep))
        };
        let mut sector = 0u64;
        let mut i = 0;
        while sector < self.sectors {
            i = self.extent_at(sector, i);
            let e = &self.extents[i];
            let f = self.file(st, e.file);
            let (host, step) = match &e.data {
                Data::Flat { offset } => (Some(*offset), e.sectors),
                Data::Sparse(s) => {
                    let rel = sector - e.start;
                    let g = s.grain_sectors();
                    if let Some(end) = s.missing_gt_end(rel) {
                        sector += (end.min(e.sectors) - rel).div_ceil(g) * g;
                        continue;
                    }
                    match s.grain_at(f, rel)? {
                        // QEMU's VMDK_ERROR (-1), read as an errno.
                        GrainAt::Broken => {
                            return fail(
                                format!("ERROR: could not get cluster_offset for sector {sector}"),
                                "Operation not permitted",
                            )
                        }
                        GrainAt::Data(off) => (Some(off), g),
                        GrainAt::Zero | GrainAt::Unallocated => (None, g),
                    }
                }
            };
            if host.is_some_and(|h| h >= sectors_len(f).unwrap_or(0)) {
                return fail(
                    format!("ERROR: cluster offset for sector {sector} points after EOF"),
                    "Invalid argument",
                );
            }
            sector += step;
        }
        Ok(rep)
    }
}

impl Layout for VmdkLayout {
    fn format(&self) -> Format {
        Format::Vmdk
    }
    fn size(&self) -> u64 {
        self.sectors * SECTOR
    }
    fn cluster_size(&self) -> Option<u64> {
        match self.extents.first() {
            Some(e) if self.uniform() => e.sparse().map(Sparse::grain_bytes),
            _ => None,
        }
    }
    fn files(&self) -> &[Storage] {
        &self.files
    }
    /// QEMU's vmdk_is_cid_valid: the parent's CID must be the child's
    /// parentCID, or its data cannot be read through the child (EINVAL).
    fn backing_readable(&self, backing: &dyn crate::image::Image) -> Result<()> {
        match backing.as_any().downcast_ref::<Vmdk>() {
            Some(p) if p.layout().cid == self.parent_cid => Ok(()),
            _ => Err(Error::io(
                "the VMDK parent's CID is not the parentCID",
                std::io::Error::from_raw_os_error(libc::EINVAL),
            )),
        }
    }
    fn alloc_unit(&self) -> Option<u64> {
        // A write stages a whole grain in memory: grains past 2 MiB
        // (none that QEMU or VMware make; hostile headers claim up to
        // 1 GiB) are not written.
        self.writable_sparse()
            .map(Sparse::grain_bytes)
            .filter(|&g| g <= MAX_WRITTEN_GRAIN)
    }
    fn compressed_writes_only(&self) -> bool {
        self.writable_sparse().is_some_and(|s| s.compressed)
    }
    fn encode(
        &self,
        index: u64,
        data: &[u8],
        written: std::ops::Range<usize>,
    ) -> Result<Option<Vec<u8>>> {
        match self.compressed_writes_only() {
            true => self.marked_grain(index, data, written).map(Some),
            false => Ok(None),
        }
    }
    fn before_write(&self, st: &Storage, _off: u64) -> Result<()> {
        self.update_cid(st)
    }
    fn allocate(
        &self,
        st: &Storage,
        index: u64,
        data: &[u8],
        _written: std::ops::Range<usize>,
    ) -> Result<()> {
        self.allocate_grain(st, index, data)
    }
    fn lookup(&self, st: &Storage, off: u64, len: u64) -> Result<(Where, u64)> {
        // Only an empty range at the disk's end (of no extents, or all
        // empty) lies in no extent.
        let Some(e) = self.extents.get(self.extent_at(off / SECTOR, 0)) else {
            return Ok((Where::Zero, len));
        };
        let rel = off - e.start * SECTOR;
        match &e.data {
            Data::Flat { offset } => Ok((
                Where::Data {
                    file: e.file,
                    host: offset.wrapping_add(rel),
                    recurse: true,
                },
                len.min(e.sectors * SECTOR - rel),
            )),
            Data::Sparse(s) => s.lookup(self.file(st, e.file), e.file, rel, len),
        }
    }
    fn read_compressed(
        &self,
        st: &Storage,
        file: u32,
        host: u64,
        skip: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        // File k holds extent k - 1; a sparse image file, extent 0.
        let s = self
            .extents
            .get(file.saturating_sub(1) as usize)
            .and_then(Extent::sparse)
            .ok_or_else(stream::einval)?;
        s.read_compressed(self.file(st, file), host, skip, buf)
    }
}

/// Whether `first` (the first bytes of a file, zero-padded) is a VMDK,
/// as QEMU's probe says: a sparse magic, or a text descriptor whose first
/// line that is neither a comment nor blank is `version=1|2|3`.
pub fn probe(first: &[u8]) -> bool {
    if first.len() < 4 {
        return false;
    }
    if &first[..4] == MAGIC || &first[..4] == MAGIC_COWD {
        return true;
    }
    let mut p = first;
    while let Some(&c) = p.first() {
        match c {
            b'#' => {
                let nl = p.iter().position(|&c| c == b'\n').unwrap_or(p.len());
                p = p.get(nl + 1..).unwrap_or(&[]);
            }
            b' ' => {
                let sp = p.iter().take_while(|&&c| c == b' ').count();
                p = &p[sp..];
                if p.first() == Some(&b'\r') {
                    p = &p[1..];
                }
                if p.first() != Some(&b'\n') {
                    return false;
                }
                p = &p[1..];
            }
            _ => {
                return [b"version=1", b"version=2", b"version=3"].iter().any(|v| {
                    p.starts_with(*v) && (p[9..].starts_with(b"\n") || p[9..].starts_with(b"\r\n"))
                });
            }
        }
    }
    false
}

mod desc;
mod sparse;
mod stream;
#[cfg(test)]
mod tests;
mod write;
pub use write::{check_options, create};
