//! Creating monolithicSparse and streamOptimized VMDK images and writing
//! grains into them, as QEMU's vmdk driver does (`vmdk_co_do_create`,
//! `vmdk_init_extent`, `get_cluster_offset`, `vmdk_write_extent`,
//! `vmdk_L2update`, `vmdk_write_cid`).
//!
//! - Create: a sparse header in sector 0, the descriptor in sectors 1 to
//!   20, the redundant grain directory (GD) and its grain tables (GTs),
//!   then the primary GD and its GTs, all tables preallocated (zeros: the
//!   file is extended over them, so they are holes), grains from the next
//!   64 KiB on. The CID is random.
//! - Write: a new grain is written whole (zeros or the parent's bytes
//!   around the write) at the end of the file, grain-aligned, then its
//!   entry goes into the primary GT and then the redundant one. The GDs
//!   never change. The first write of every writable open puts a new
//!   random CID in the descriptor (so a child made before no longer reads
//!   through it), as QEMU does.
//! - streamOptimized, as QEMU writes it (not as VMware streams it): the
//!   same header (version 3, compressed, markers) and preallocated
//!   tables; each grain a marker (its first sector, the length) and its
//!   zlib stream, packed one after another on sector boundaries. Only
//!   whole grains are written (the disk's last, short one up to the
//!   disk's end), once each.

use std::path::Path;
use std::sync::atomic::Ordering;

use super::sparse::{
    at, Sparse, COMPRESSION_DEFLATE, FLAG_COMPRESSED, FLAG_MARKER, FLAG_RGD, FLAG_ZERO_GRAIN,
    HEADER_LEN, MAGIC,
};
use super::{VmdkLayout, DESC_AT, DESC_SIZE, SECTOR};
use crate::create::CreateOptions;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// Sectors per grain of an image QEMU creates (64 KiB).
const GRAIN_SECTORS: u64 = 128;
/// Entries per grain table.
const GTES: u64 = 512;
const ADAPTERS: [&str; 4] = ["ide", "buslogic", "lsilogic", "legacyESX"];
const SUBFORMATS: [&str; 5] = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];
/// Largest disk: QEMU counts grains in a u32 and writes tables too short
/// for more (rimg refuses instead).
const MAX_SIZE: u64 = u32::MAX as u64 * GRAIN_SECTORS * SECTOR;

fn inval(msg: impl Into<String>) -> Error {
    Error::Format(msg.into())
}

/// Judges the create options as QEMU does before it makes the file (in
/// its order).
pub fn check_options(o: &CreateOptions) -> Result<()> {
    let f = &o.foreign;
    for (v, allowed) in [
        (&f.adapter_type, &ADAPTERS[..]),
        (&f.subformat, &SUBFORMATS[..]),
    ] {
        if let Some(v) = v {
            if !allowed.contains(&v.as_str()) {
                return Err(inval(format!("invalid parameter value: {v}")));
            }
        }
    }
    if o.backing_format.as_deref().is_some_and(|b| b != "vmdk") {
        return Err(inval("backing_file must be a vmdk image"));
    }
    if f.compat6 && f.hwversion.is_some() {
        return Err(inval("compat6 cannot be enabled with hwversion set"));
    }
    let flat = f.subformat.as_deref().is_some_and(|s| s.ends_with("Flat"));
    if flat && o.backing_file.is_some() {
        return Err(inval("Flat image can't have backing file"));
    }
    if flat && f.zeroed_grain {
        return Err(inval("Flat image can't enable zeroed grain"));
    }
    match f.subformat.as_deref() {
        None | Some("monolithicSparse" | "streamOptimized") => Ok(()),
        Some(sub) => Err(inval(format!(
            "VMDK subformat '{sub}' is not supported by rimg yet (monolithicSparse and streamOptimized are)"
        ))),
    }
}

/// The header of a sparse extent of `capacity` sectors.
fn header(
    capacity: u64,
    gd: u64,
    grain_offset: u64,
    zeroed_grain: bool,
    stream: bool,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    let put32 = |h: &mut [u8; HEADER_LEN], at: usize, v: u32| {
        h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    };
    let put64 = |h: &mut [u8; HEADER_LEN], at: usize, v: u64| {
        h[at..at + 8].copy_from_slice(&v.to_le_bytes());
    };
    h[..4].copy_from_slice(MAGIC);
    // Version 2 says the zeroed-grain flag may be set, 3 that grains are
    // compressed.
    let version = match (stream, zeroed_grain) {
        (true, _) => 3,
        (false, true) => 2,
        (false, false) => 1,
    };
    put32(&mut h, at::VERSION, version);
    // Bit 0: newline detection; bit 1: a redundant GD; 16 and 17:
    // compressed grains with markers.
    let zero = if zeroed_grain { FLAG_ZERO_GRAIN } else { 0 };
    let compressed = if stream {
        FLAG_COMPRESSED | FLAG_MARKER
    } else {
        0
    };
    put32(&mut h, at::FLAGS, 1 | FLAG_RGD | zero | compressed);
    put64(&mut h, at::CAPACITY, capacity);
    put64(&mut h, at::GRAIN, GRAIN_SECTORS);
    put64(&mut h, at::DESC_OFFSET, DESC_AT / SECTOR);
    put64(&mut h, at::DESC_SIZE, DESC_SIZE as u64 / SECTOR);
    put32(&mut h, at::GTES_PER_GT, GTES as u32);
    put64(&mut h, at::RGD_OFFSET, RGD);
    put64(&mut h, at::GD_OFFSET, gd);
    put64(&mut h, at::GRAIN_OFFSET, grain_offset);
    // The check bytes that catch a file mangled by a text transfer.
    h[73..77].copy_from_slice(b"\n \r\n");
    if stream {
        h[at::COMPRESSION..at::COMPRESSION + 2].copy_from_slice(&COMPRESSION_DEFLATE.to_le_bytes());
    }
    h
}

/// The redundant GD's sector: right after the descriptor.
const RGD: u64 = 21;

/// A GD at `gd` of `gd_sectors` sectors whose `gt_count` GTs follow it.
fn directory(gd: u64, gd_sectors: u64, gt_count: u64) -> Vec<u8> {
    let mut b = vec![0u8; (gd_sectors * SECTOR) as usize];
    for i in 0..gt_count {
        // Sectors below 2^32: the tables of at most 2^32 grains.
        let gt = (gd + gd_sectors + 4 * i) as u32;
        b[i as usize * 4..i as usize * 4 + 4].copy_from_slice(&gt.to_le_bytes());
    }
    b
}

/// Writes a new monolithicSparse image of `o.size` bytes (rounded up to
/// a sector) into the empty file `st` made at `path`; `parent_cid` is the
/// CID of the backing image `o.backing_file` names, if any.
pub fn create(st: &Storage, path: &Path, o: &CreateOptions, parent_cid: Option<u32>) -> Result<()> {
    let f = &o.foreign;
    let sub = f.subformat.as_deref().unwrap_or("monolithicSparse");
    let stream = sub == "streamOptimized";
    let hw = match (f.compat6, f.hwversion.as_deref()) {
        (true, _) => "6",
        (false, v) => v.unwrap_or("4"),
    };
    let size = o.size.next_multiple_of(SECTOR);
    if size > MAX_SIZE {
        return Err(inval(format!(
            "VMDK images over {MAX_SIZE} bytes are not supported (QEMU's grain count wraps)"
        )));
    }
    let capacity = size / SECTOR;
    let grains = capacity.div_ceil(GRAIN_SECTORS);
    let gt_count = grains.div_ceil(GTES);
    let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
    let gd = RGD + gd_sectors + 4 * gt_count;
    let grain_offset = (gd + gd_sectors + 4 * gt_count).next_multiple_of(GRAIN_SECTORS);

    let adapter = f.adapter_type.as_deref().unwrap_or("ide");
    let heads: u64 = if adapter == "ide" { 16 } else { 255 };
    let cylinders = size / (63 * heads * SECTOR);
    let mut cid = [0u8; 4];
    crate::crypto::random_bytes(&mut cid)?;
    let parent_line = match &o.backing_file {
        Some(b) => format!("parentFileNameHint=\"{b}\""),
        None => String::new(),
    };
    let base = path.file_name().map_or_else(
        || path.to_string_lossy().into_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID={:x}\nparentCID={:x}\n\
         createType=\"{sub}\"\n{parent_line}\n# Extent description\n\
         RW {capacity} SPARSE \"{base}\"\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"{hw}\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"{heads}\"\nddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"{adapter}\"\nddb.toolsVersion = \"{}\"\n",
        u32::from_ne_bytes(cid),
        parent_cid.unwrap_or(u32::MAX),
        f.toolsversion.as_deref().unwrap_or("2147483647"),
    );
    if desc.len() >= DESC_SIZE {
        return Err(inval("VMDK descriptor too long for its 20 sectors"));
    }
    st.write_at(
        &header(capacity, gd, grain_offset, f.zeroed_grain, stream),
        0,
    )?;
    st.set_len(grain_offset * SECTOR)?;
    st.write_at(&directory(RGD, gd_sectors, gt_count), RGD * SECTOR)?;
    st.write_at(&directory(gd, gd_sectors, gt_count), gd * SECTOR)?;
    st.write_at(desc.as_bytes(), DESC_AT)
}

impl VmdkLayout {
    /// The one sparse extent of a monolithicSparse or streamOptimized
    /// image, the only VMDK images rimg writes (a stream with its GD in
    /// the header, as QEMU writes them).
    pub(super) fn writable_sparse(&self) -> Option<&Sparse> {
        match &self.extents[..] {
            [e] if e.file == 0 => e.sparse().filter(|s| !s.gd_at_end),
            _ => None,
        }
    }

    /// Stores grain `index` (`data`, one grain) at the end of the file,
    /// then records it in the primary GT and the redundant one.
    /// `data` is the grain, or a stream's marked grain ([`Self::marked_grain`]).
    pub(super) fn allocate_grain(&self, st: &Storage, index: u64, data: &[u8]) -> Result<()> {
        let s = self.writable_sparse().ok_or_else(|| {
            inval("only monolithicSparse and streamOptimized VMDK images are written")
        })?;
        let grain = s.grain_sectors();
        let sector = index * grain;
        let Some((gt, i)) = s.gt_slot(sector) else {
            return Err(Error::io(
                "VMDK grain with no grain table",
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        };
        let at = s.next.load(Ordering::Relaxed);
        let next = match s.compressed {
            false => at + grain,
            true => at + (data.len() as u64).div_ceil(SECTOR),
        };
        // Grain table entries are u32 sectors.
        if at + grain > u32::MAX as u64 {
            return Err(Error::io(
                "VMDK file full (grains past 2 TiB)",
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        st.write_at(data, at * SECTOR)?;
        if s.compressed {
            // QEMU zeroes a whole grain at the marker's sector first: the
            // file ends a grain past the last marker (a hole here).
            let end = (at + grain) * SECTOR;
            if st.len()? < end {
                st.set_len(end)?;
            }
        }
        let gte = (at as u32).to_le_bytes();
        st.write_at(&gte, gt as u64 * SECTOR + i * 4)?;
        if let Some(rgt) = s.backup_gt(sector) {
            st.write_at(&gte, rgt as u64 * SECTOR + i * 4)?;
        }
        s.note_gte(gt, i, at as u32);
        s.next.store(next, Ordering::Relaxed);
        self.update_cid(st)
    }

    /// A stream's grain `index` as stored: its marker (first sector, then
    /// the compressed length) and zlib stream (level 6, as QEMU's
    /// compress()), padded to a sector. Only the whole grain may be
    /// written, or the disk's last grain up to the disk's end (EINVAL).
    pub(super) fn marked_grain(
        &self,
        index: u64,
        data: &[u8],
        written: std::ops::Range<usize>,
    ) -> Result<Vec<u8>> {
        use std::io::Write;
        let start = index * data.len() as u64;
        let len = (data.len() as u64).min(self.sectors * SECTOR - start) as usize;
        if written != (0..len) {
            return Err(Error::io(
                "a streamOptimized VMDK takes whole grains only",
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
        z.write_all(&data[..len])
            .and_then(|()| z.flush())
            .map_err(|e| Error::io("deflate", e))?;
        let packed = z.finish().map_err(|e| Error::io("deflate", e))?;
        let grain_sectors = data.len() as u64 / SECTOR;
        let mut m = Vec::with_capacity(12 + packed.len() + SECTOR as usize);
        m.extend((index * grain_sectors).to_le_bytes());
        // At most a little over the grain (64 KiB): a u32.
        m.extend((packed.len() as u32).to_le_bytes());
        m.extend(packed);
        m.resize(m.len().next_multiple_of(SECTOR as usize), 0);
        Ok(m)
    }

    /// On the first write of this open: a new random CID in the
    /// descriptor, the text from `parentCID` on moved up behind it, the
    /// rest of the 10 KiB left as it was (QEMU's vmdk_write_cid).
    pub(super) fn update_cid(&self, st: &Storage) -> Result<()> {
        if self.cid_updated.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let mut desc = vec![0u8; DESC_SIZE];
        st.read_at(&mut desc, DESC_AT)?;
        desc[DESC_SIZE - 1] = 0;
        let text = super::desc::until_nul(&desc).to_vec();
        let find = |k: &[u8]| text.windows(k.len()).position(|w| w == k);
        let Some(parent) = find(b"parentCID") else {
            return Err(Error::io(
                "VMDK descriptor without parentCID",
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        };
        let tail = text[parent..].to_vec();
        if let Some(c) = find(b"CID") {
            let mut cid = [0u8; 4];
            crate::crypto::random_bytes(&mut cid)?;
            // snprintf at "CID=" + 1, then strcat of the tail, within
            // the 10 KiB (its last byte a NUL).
            let mut new = format!("{:x}\n", u32::from_ne_bytes(cid)).into_bytes();
            new.extend(&tail);
            let start = c + 4;
            let n = new.len().min(DESC_SIZE - 1 - start.min(DESC_SIZE - 1));
            desc[start..start + n].copy_from_slice(&new[..n]);
            desc[start + n] = 0;
        }
        st.write_at(&desc, DESC_AT)
    }
}
