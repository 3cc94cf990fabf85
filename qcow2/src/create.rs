//! Creating images, laid out as QEMU lays them out: a minimal qcow2 with
//! header, refcount table and one refcount block, then grown to the
//! requested size through the normal resize path (as qemu-img does).

use std::path::Path;

use crate::encrypt::{crypto_extension, luks_area, EncryptFormat, Secret};
use crate::error::{Error, Result};
use crate::header::crypt;
use crate::header::{compat, incompat, CompressionType, Header, V3_HEADER_LEN_COMPRESSION};
use crate::image::{Format, Image};
use crate::qcow::{Qcow2, Qcow2Options};
use crate::refcount::entry_set;
use crate::storage::Storage;

pub use crate::preallocation::Preallocation;

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub format: Format,
    pub size: u64,
    pub cluster_size: u64,
    /// 2 for compat=0.10, 3 for compat=1.1.
    pub version: u32,
    pub refcount_bits: u32,
    pub lazy_refcounts: bool,
    pub preallocation: Preallocation,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub compression_type: CompressionType,
    /// Encryption and its password.
    pub encrypt: Option<(EncryptFormat, Secret)>,
    /// External data file name (stored as given; created or truncated).
    pub data_file: Option<String>,
    /// Keep the data file a raw image of the disk.
    pub data_file_raw: bool,
    /// Extended L2 entries (subclusters).
    /// Copy-on-write off for the new file (btrfs; a hint elsewhere).
    pub nocow: bool,
    pub extended_l2: bool,
    /// What the other formats take (VDI's `static`).
    pub foreign: crate::foreign::CreateOptions,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            format: Format::Qcow2,
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
            compression_type: CompressionType::Zlib,
            encrypt: None,
            data_file: None,
            data_file_raw: false,
            extended_l2: false,
            nocow: false,
            foreign: Default::default(),
        }
    }
}

impl CreateOptions {
    /// Rejects combinations qemu-img rejects, with its reasons.
    pub fn validate(&self) -> Result<()> {
        let inval = |m: &str| Err(Error::InvalidArgument(m.to_string()));
        if self.format == Format::Raw {
            if self.backing_file.is_some() {
                return inval("raw images cannot have a backing file");
            }
            if self.preallocation == Preallocation::Metadata {
                return inval("preallocation mode 'metadata' is not supported for raw images");
            }
            return Ok(());
        }
        if self.format == Format::Luks {
            if self.backing_file.is_some() {
                return inval("luks images cannot have a backing file");
            }
            if !matches!(self.encrypt, Some((EncryptFormat::Luks(_), _))) {
                return inval("Parameter 'key-secret' is required for cipher");
            }
            // preallocation=metadata is accepted and, with no metadata
            // in the payload, means off (as QEMU's).
            return Ok(());
        }
        if matches!(
            self.format,
            Format::Vdi | Format::Vpc | Format::Vmdk | Format::Vhdx
        ) {
            if self.backing_file.is_some() && self.format != Format::Vmdk {
                return inval(&format!(
                    "Backing file not supported for file format '{}'",
                    self.format.name()
                ));
            }
            // QEMU's file layer refuses it (the format never sees it).
            if self.preallocation == Preallocation::Metadata {
                return Err(Error::Format(
                    "Unsupported preallocation mode: metadata".into(),
                ));
            }
            return Ok(());
        }
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return inval("cluster size must be a power of two between 512 and 2048k");
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return inval("refcount width must be a power of two and may not exceed 64 bits");
        }
        if self.version != 2 && self.version != 3 {
            return inval("compat must be 0.10 or 1.1");
        }
        if self.version == 2 {
            if self.refcount_bits != 16 {
                return inval("different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)");
            }
            if self.lazy_refcounts {
                return inval("lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)");
            }
            if self.compression_type != CompressionType::Zlib {
                return inval("non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)");
            }
        }
        if self.data_file_raw && self.data_file.is_none() {
            return inval("data-file-raw requires data-file");
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return inval("Backing file and data-file-raw cannot be used at the same time");
        }
        if self.data_file.is_some() && self.version < 3 {
            return inval("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if self.extended_l2 && self.version < 3 {
            return inval("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if self.extended_l2 && cs < 16384 {
            return inval(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            );
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return inval("Backing file and preallocation can only be used at the same time if extended_l2 is on");
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return inval("backing format cannot be used without backing file");
        }
        let cb = cs.trailing_zeros();
        let l2_bits = cb - if self.extended_l2 { 4 } else { 3 };
        if self.size > Header::max_size_with(cb, l2_bits) {
            return Err(Error::TooLarge(format!(
                "virtual size {} for cluster size {cs}",
                self.size
            )));
        }
        Ok(())
    }
}

/// Creates (or truncates) `path` as a new image.
pub fn create(path: &Path, o: &CreateOptions) -> Result<()> {
    let path = crate::paths::host_path(path);
    // QEMU's other drivers judge their options once the file layer has
    // made the file (a refusal leaves it empty); qcow2 and raw first.
    let foreign = matches!(
        o.format,
        Format::Vdi | Format::Vpc | Format::Vmdk | Format::Vhdx
    );
    if !foreign {
        o.validate()?;
    }
    if o.format == Format::Vmdk {
        crate::foreign::vmdk::check_options(o)?;
    }
    let st = Storage::create_locked(path)?;
    if o.nocow {
        st.set_nocow();
    }
    if foreign {
        o.validate()?;
    }
    // One flush at the end instead of one per step (each a journal
    // commit, milliseconds on a busy disk): QEMU's format layer creates
    // with BDRV_O_NO_FLUSH too, and its file layer flushes once it closes.
    st.set_no_flush(true);
    match o.format {
        Format::Raw => {
            st.set_len(o.size)?;
            preallocate_range(&st, o.preallocation, 0, o.size)?;
            // QEMU syncs a raw image only after writing its zeros.
            if o.preallocation == Preallocation::Full {
                durable(&st)?;
            }
            Ok(())
        }
        Format::Qcow2 => create_qcow2(st, o),
        Format::Luks => {
            let Some((EncryptFormat::Luks(p), key)) = &o.encrypt else {
                return Err(Error::InvalidArgument(
                    "Parameter 'key-secret' is required for cipher".into(),
                ));
            };
            let payload = write_luks(&st, o.size, p, key)?;
            preallocate_range(&st, o.preallocation, payload, o.size)?;
            durable(&st)
        }
        // The file layer's falloc and full preallocate nothing here: the
        // format's header replaces the file QEMU made.
        Format::Vdi => {
            crate::foreign::vdi::create(&st, o.size, o.foreign.is_static)?;
            durable(&st)
        }
        Format::Vpc => {
            let f = &o.foreign;
            crate::foreign::vpc::create(&st, o.size, f.subformat.as_deref(), f.force_size)?;
            durable(&st)
        }
        Format::Vmdk => {
            let parent_cid = match &o.backing_file {
                Some(b) => Some(vmdk_cid(&crate::paths::resolve_backing(path, b))?),
                None => None,
            };
            crate::foreign::vmdk::create(&st, path, o, parent_cid)?;
            durable(&st)
        }
        Format::Vhdx => {
            crate::foreign::vhdx::create(&st, o.size, &o.foreign)?;
            durable(&st)
        }
    }
}

/// The CID of the VMDK image at `path` (a new image's parent).
fn vmdk_cid(path: &Path) -> Result<u32> {
    let opts = crate::open::OpenOptions {
        format: Some(Format::Vmdk),
        no_backing: true,
        ..Default::default()
    };
    let img = crate::open::open(path, &opts)?;
    let v = img.as_any().downcast_ref::<crate::foreign::vmdk::Vmdk>();
    Ok(v.map_or(u32::MAX, |v| v.layout().cid()))
}

/// Makes what creation wrote durable (flushes were off until now).
fn durable(st: &Storage) -> Result<()> {
    st.set_no_flush(false);
    st.sync()
}

fn preallocate_range(st: &Storage, mode: Preallocation, off: u64, len: u64) -> Result<()> {
    match mode {
        Preallocation::Off | Preallocation::Metadata => Ok(()),
        Preallocation::Falloc => st.allocate(off, len),
        Preallocation::Full => {
            // Write real zeros (not a zero-range request), as
            // preallocation=full promises allocated blocks.
            crate::pagebuf::zero_pieces(off, len, |z, at| st.write_at(z, at))
        }
    }
}

fn create_qcow2(st: Storage, o: &CreateOptions) -> Result<()> {
    let mut o = o.clone();
    if o.data_file_raw && o.preallocation == Preallocation::Off {
        // A raw data file must read as the image does, so the tables map
        // every cluster onto it from the start (as QEMU does).
        o.preallocation = Preallocation::Metadata;
    }
    let o = &o;
    if let Some(name) = &o.data_file {
        // Created empty (or truncated), as qemu-img creates it.
        let path = crate::paths::resolve_data_file(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|source| Error::Io {
                context: format!("Could not create '{}'", path.display()),
                source,
            })?;
    }
    let cs = o.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    let refcount_order = o.refcount_bits.trailing_zeros();
    let mut incompatible = 0;
    if o.compression_type != CompressionType::Zlib {
        incompatible |= incompat::COMPRESSION;
    }
    if o.extended_l2 {
        incompatible |= incompat::EXTL2;
    }
    let mut h = Header {
        version: o.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        // No table yet: growing to the virtual size below allocates it
        // (after the refcount block), and a 0-byte disk keeps none, as
        // QEMU's create leaves it.
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompatible,
        compatible_features: if o.lazy_refcounts {
            compat::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order,
        header_length: V3_HEADER_LEN_COMPRESSION as u32,
        compression_type: o.compression_type,
        backing_file: o.backing_file.clone(),
        backing_format: o.backing_format.clone(),
        feature_names: if o.version == 3 {
            Header::default_feature_names()
        } else {
            Vec::new()
        },
        other_extensions: Vec::new(),
    };
    if let Some(name) = &o.data_file {
        h.set_data_file(Some(name));
        if o.data_file_raw {
            h.autoclear_features |= crate::header::autoclear::DATA_FILE_RAW;
        }
    }
    let first = h.encode()?;
    // Cluster 1: refcount table with one entry; cluster 2: its block,
    // counting clusters 0-2.
    let mut table = vec![0u8; cs as usize];
    table[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    let mut block = vec![0u8; cs as usize];
    for c in 0..3 {
        entry_set(&mut block, c, refcount_order, 1);
    }
    st.write_at(&first, 0)?;
    st.write_at(&table, cs)?;
    st.write_at(&block, 2 * cs)?;
    st.sync()?;
    let q = Qcow2::open(st, None, Qcow2Options::default())?;
    q.data_storage().set_no_flush(true);
    q.resize(o.size)?;
    if o.data_file.is_some() {
        q.data_storage().set_len(o.size)?;
    }
    if o.preallocation != Preallocation::Off {
        q.preallocate_metadata()?;
        for (off, len) in q.data_extents()? {
            preallocate_range(q.data_storage(), o.preallocation, off, len)?;
        }
    }
    // Encryption last, as QEMU sets it up: the LUKS area follows the
    // tables and any preallocated data.
    match &o.encrypt {
        None => {}
        Some((EncryptFormat::Aes, _)) => q.update_header(|h| {
            h.crypt_method = crypt::AES;
            Ok(())
        })?,
        Some((EncryptFormat::Luks(p), key)) => {
            let area = luks_area(p, key)?;
            let off = q.alloc_clusters_zeroed(area.len() as u64)?;
            q.storage().write_at(&area, off)?;
            q.update_header(|h| {
                h.crypt_method = crypt::LUKS;
                h.other_extensions
                    .push(crypto_extension(off, area.len() as u64));
                Ok(())
            })?;
        }
    }
    q.storage().set_no_flush(false);
    q.data_storage().set_no_flush(false);
    q.flush()
}

/// Creates a LUKS image (QEMU's `luks` format): the LUKS header and key
/// material, then `size` bytes of payload (zeros on disk, as QEMU
/// leaves them: unwritten payload decrypts to noise).
pub fn create_luks(
    path: &Path,
    size: u64,
    p: &crate::luks::LuksParams,
    key: &Secret,
) -> Result<()> {
    let path = crate::paths::host_path(path);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let st = Storage::from_file(file, path, true);
    st.set_no_flush(true); // as in `create`
    write_luks(&st, size, p, key)?;
    durable(&st)
}

/// Writes a LUKS header into empty `st` and sizes it for `size` bytes of
/// payload; returns the payload offset.
fn write_luks(st: &Storage, size: u64, p: &crate::luks::LuksParams, key: &Secret) -> Result<u64> {
    let area = luks_area(p, key)?;
    let payload = area.len() as u64;
    let len = payload
        .checked_add(size)
        .ok_or_else(|| Error::TooLarge(format!("virtual size {size}")))?;
    st.write_at(&area, 0)?;
    st.set_len(len)?;
    Ok(payload)
}
