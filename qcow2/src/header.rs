//! The qcow2 header and its extensions (qcow2.rst, "Header" and
//! "Header extensions").
//!
//! Every field comes from an untrusted file: [`Header::parse`] validates each
//! one against the limits QEMU enforces, so that the rest of the crate can
//! do arithmetic on them without overflow and allocate tables of bounded
//! size.

use crate::error::{Error, Result};

mod encode;

pub const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"

/// Size of the version 2 header; version 3 headers are at least 104 bytes.
pub const V2_HEADER_LEN: usize = 72;
pub const V3_HEADER_LEN: usize = 104;
/// A version 3 header with the compression type field, padded to 8 bytes.
pub const V3_HEADER_LEN_COMPRESSION: usize = 112;

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// QEMU's cap on the active L1 table (QCOW_MAX_L1_SIZE), in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's cap on the refcount table (QCOW_MAX_REFTABLE_SIZE), in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's cap on the number of internal snapshots (QCOW_MAX_SNAPSHOTS).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: usize = 1023;

/// Incompatible feature bits (qcow2.rst, header bytes 72-79).
pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION: u64 = 1 << 3;
    pub const EXTL2: u64 = 1 << 4;
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}
/// Compatible feature bits (header bytes 80-87).
pub mod compat {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}
/// Autoclear feature bits (header bytes 88-95).
pub mod autoclear {
    pub const BITMAPS: u64 = 1 << 0;
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// rimg's intent log is live (rimg's own bit, far from QEMU's; see
    /// `qcow::ilog`).
    pub const INTENT_LOG: u64 = 1 << 63;
}

/// Header extension types (qcow2.rst, "Header extensions").
/// crypt_method values.
pub mod crypt {
    pub const NONE: u32 = 0;
    pub const AES: u32 = 1;
    pub const LUKS: u32 = 2;
}

/// Largest LUKS header area accepted (8 slots of 64-byte keys take
/// about 2 MiB).
const MAX_CRYPTO_AREA: u64 = 64 << 20;

pub mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const CRYPTO: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
    /// rimg's intent log ("rimg"; in no QEMU list).
    pub const INTENT_LOG: u32 = 0x7269_6d67;
}

/// Compression used by compressed clusters (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    #[default]
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "zlib" => Some(CompressionType::Zlib),
            "zstd" => Some(CompressionType::Zstd),
            _ => None,
        }
    }
}

/// A header extension kept as bytes, so that extensions this crate does not
/// interpret survive a header rewrite unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// The decoded, validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Backing file name as stored (not resolved).
    pub backing_file: Option<String>,
    /// From the backing format extension.
    pub backing_format: Option<String>,
    /// Feature name table, if present.
    pub feature_names: Vec<FeatureName>,
    /// Extensions other than backing format and feature table, in file
    /// order (bitmaps, crypto, data file, unknown ones).
    pub other_extensions: Vec<Extension>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidHeader(msg.into())
}

/// Largest host offset a table may end at (QEMU: INT64_MAX).
const MAX_OFFSET: u64 = i64::MAX as u64;

/// Checks that a table of `entries * entry_len` bytes at `offset` is cluster
/// aligned and does not overflow (QEMU's validate_table_offset).
fn validate_table(
    what: &str,
    offset: u64,
    entries: u64,
    entry_len: u64,
    cluster_size: u64,
) -> Result<()> {
    let bytes = entries
        .checked_mul(entry_len)
        .ok_or_else(|| bad(format!("{what} size overflows")))?;
    if !offset.is_multiple_of(cluster_size) {
        return Err(bad(format!(
            "{what} offset {offset:#x} is not cluster aligned"
        )));
    }
    if offset.checked_add(bytes).is_none_or(|end| end > MAX_OFFSET) {
        return Err(bad(format!(
            "{what} at {offset:#x} extends past the largest file offset"
        )));
    }
    Ok(())
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// The external data file name (qcow2.rst, "External data file name"
    /// header extension), if the image has one.
    pub fn data_file(&self) -> Option<String> {
        self.other_extensions
            .iter()
            .find(|e| e.kind == ext::DATA_FILE)
            .map(|e| {
                let n = e.data.iter().position(|&c| c == 0).unwrap_or(e.data.len());
                String::from_utf8_lossy(&e.data[..n]).into_owned()
            })
    }
    /// Sets (or, with None, removes) the external data file: the name
    /// extension and the incompatible bit 2 go together.
    pub fn set_data_file(&mut self, name: Option<&str>) {
        self.other_extensions.retain(|e| e.kind != ext::DATA_FILE);
        match name {
            Some(n) => {
                self.other_extensions.insert(
                    0,
                    Extension {
                        kind: ext::DATA_FILE,
                        data: n.as_bytes().to_vec(),
                    },
                );
                self.incompatible_features |= incompat::DATA_FILE;
            }
            None => {
                self.incompatible_features &= !incompat::DATA_FILE;
                self.autoclear_features &= !autoclear::DATA_FILE_RAW;
            }
        }
    }
    /// L2 entries carry subcluster bitmaps (incompatible bit 4).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }
    /// Guest data lives in an external data file (incompatible bit 2).
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }
    /// The data file is a raw image of the guest disk (autoclear bit 1).
    pub fn data_file_raw(&self) -> bool {
        self.has_data_file() && self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }
    /// Entries in one L2 table: 8 bytes each, 16 with extended L2 entries
    /// (qcow2.rst, "Extended L2 Entries").
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits()
    }
    /// log2 of the entries in one L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2() { 4 } else { 3 }
    }
    /// As [`l1_entries_for`](Self::l1_entries_for), for L2 tables of
    /// 2^`l2_bits` entries.
    pub fn l1_entries_with(cluster_bits: u32, l2_bits: u32, size: u64) -> u64 {
        size.div_ceil(1u64 << (cluster_bits + l2_bits))
    }
    /// As [`max_size`](Self::max_size), for L2 tables of 2^`l2_bits`
    /// entries.
    pub fn max_size_with(cluster_bits: u32, l2_bits: u32) -> u64 {
        (MAX_L1_BYTES / 8)
            .saturating_mul(1u64 << (cluster_bits + l2_bits))
            .min(MAX_OFFSET)
    }
    /// Minimum L1 entries to map `size` bytes.
    pub fn l1_entries_for(cluster_bits: u32, size: u64) -> u64 {
        let per_l1 = 1u64 << (2 * cluster_bits - 3);
        size.div_ceil(per_l1)
    }
    /// Largest virtual size for this cluster size whose L1 table stays
    /// within QEMU's limit.
    pub fn max_size(cluster_bits: u32) -> u64 {
        let per_l1 = 1u64 << (2 * cluster_bits - 3);
        (MAX_L1_BYTES / 8).saturating_mul(per_l1).min(MAX_OFFSET)
    }

    /// Names an incompatible feature bit, from the image's feature name
    /// table if it has one.
    pub fn incompat_name(&self, bit: u8) -> String {
        self.feature_names
            .iter()
            .find(|f| f.kind == 0 && f.bit == bit)
            .map(|f| f.name.clone())
            .unwrap_or_else(|| format!("unknown incompatible feature bit {bit}"))
    }

    /// Parses and validates the header from the start of the file.
    /// `buf` holds the first cluster (or the whole file, if shorter).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN || be32(buf, 0) != MAGIC {
            return Err(Error::NotQcow2);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion(version));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!("cluster_bits {cluster_bits} outside 9..21")));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            other_extensions: Vec::new(),
        };
        if version == 3 {
            if buf.len() < V3_HEADER_LEN {
                return Err(bad("file too short for a version 3 header"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if (h.header_length as usize) < V3_HEADER_LEN {
                return Err(bad(format!(
                    "header_length {} is less than 104",
                    h.header_length
                )));
            }
            if h.header_length as u64 > cluster_size || h.header_length as usize > buf.len() {
                return Err(bad(format!(
                    "header_length {} is larger than the first cluster",
                    h.header_length
                )));
            }
            if h.header_length > V3_HEADER_LEN as u32 {
                h.compression_type = match buf[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    t => return Err(Error::UnsupportedFeature(format!("compression type {t}"))),
                };
            }
        }
        if h.size > MAX_OFFSET {
            return Err(bad(format!("virtual size {} is too large", h.size)));
        }
        if h.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(bad(format!(
                "refcount_order {} is larger than 6",
                h.refcount_order
            )));
        }
        // Extensions are read before feature checks so that an unknown
        // incompatible bit can be reported by the name the image gives it.
        h.parse_extensions(buf, cluster_size)?;
        h.check_features()?;
        h.check_crypto(cluster_size)?;
        // Compression type consistency (QEMU's validate_compression_type).
        let bit = h.incompatible_features & incompat::COMPRESSION != 0;
        match (h.compression_type, bit) {
            (CompressionType::Zlib, true) => {
                return Err(bad(
                    "compression type bit is set but the compression type is zlib",
                ))
            }
            (CompressionType::Zstd, false) => {
                return Err(bad(
                    "compression type is zstd but the compression type bit is clear",
                ))
            }
            _ => {}
        }
        // L1 table: bounded and large enough for the virtual size.
        if h.l1_size as u64 > MAX_L1_BYTES / 8 {
            return Err(Error::TooLarge(format!(
                "active L1 table has {} entries",
                h.l1_size
            )));
        }
        let need = Header::l1_entries_with(cluster_bits, h.l2_bits(), h.size);
        if need > i32::MAX as u64 {
            return Err(Error::ImageTooBig { size: h.size });
        }
        if (h.l1_size as u64) < need {
            return Err(Error::L1TooSmall {
                entries: h.l1_size,
                size: h.size,
            });
        }
        validate_table(
            "L1 table",
            h.l1_table_offset,
            h.l1_size as u64,
            8,
            cluster_size,
        )?;
        // Cluster 0 is the header: an L1 table there could only map the
        // magic as an L2 offset, and writing its entries (or repairing
        // them) would overwrite the header.
        if h.l1_size > 0 && h.l1_table_offset == 0 {
            return Err(bad("L1 table offset is 0"));
        }
        // Refcount table.
        if h.refcount_table_clusters == 0 {
            return Err(bad("image has no refcount table"));
        }
        if h.refcount_table_clusters as u64 > MAX_REFTABLE_BYTES.div_ceil(cluster_size) {
            return Err(Error::TooLarge(format!(
                "refcount table has {} clusters",
                h.refcount_table_clusters
            )));
        }
        validate_table(
            "refcount table",
            h.refcount_table_offset,
            h.refcount_table_clusters as u64,
            cluster_size,
            cluster_size,
        )?;
        if h.refcount_table_offset == 0 {
            return Err(bad("refcount table offset is 0"));
        }
        // Snapshot table.
        // More than MAX_SNAPSHOTS is refused when the image is opened
        // (a repair drops the overhanging ones); the table's first
        // MAX_SNAPSHOTS entries must be valid either way.
        // A snapshot header is at least 40 bytes (qcow2.rst "Snapshot table").
        validate_table(
            "snapshot table",
            h.snapshots_offset,
            h.nb_snapshots.min(MAX_SNAPSHOTS) as u64,
            40,
            cluster_size,
        )?;
        // Backing file name, which must lie in the first cluster.
        if h.backing_file_offset != 0 {
            let len = h.backing_file_size as u64;
            if len > MAX_BACKING_NAME as u64 {
                return Err(bad(format!("backing file name is {len} bytes long")));
            }
            let end = h
                .backing_file_offset
                .checked_add(len)
                .filter(|&e| e <= cluster_size && e <= buf.len() as u64)
                .ok_or_else(|| bad("backing file name lies outside the first cluster"))?;
            let raw = &buf[h.backing_file_offset as usize..end as usize];
            let name = String::from_utf8(raw.to_vec())
                .map_err(|_| bad("backing file name is not UTF-8"))?;
            if !name.is_empty() {
                h.backing_file = Some(name);
            }
        }
        Ok(h)
    }

    /// The LUKS header area (offset, length) from the full disk
    /// encryption header extension.
    pub fn crypto_area(&self) -> Option<(u64, u64)> {
        let e = self
            .other_extensions
            .iter()
            .find(|e| e.kind == ext::CRYPTO && e.data.len() == 16)?;
        Some((be64(&e.data, 0), be64(&e.data, 8)))
    }

    /// Encryption fields as QEMU validates them (its wording).
    fn check_crypto(&self, cluster_size: u64) -> Result<()> {
        let ce = |m: String| Err(Error::Crypto(m));
        if self.crypt_method > crypt::LUKS {
            return ce(format!(
                "Unsupported encryption method: {}",
                self.crypt_method
            ));
        }
        let ext = self.other_extensions.iter().find(|e| e.kind == ext::CRYPTO);
        match ext {
            Some(_) if self.crypt_method != crypt::LUKS => {
                return ce(
                    "CRYPTO header extension only expected with LUKS encryption method".into(),
                )
            }
            Some(e) if e.data.len() != 16 => {
                return ce(format!(
                    "CRYPTO header extension size {}, but expected size 16",
                    e.data.len()
                ))
            }
            None if self.crypt_method == crypt::LUKS => {
                return ce("Missing CRYPTO header for crypt method 2".into())
            }
            _ => {}
        }
        if let Some((off, len)) = self.crypto_area() {
            if !off.is_multiple_of(cluster_size) {
                return ce(format!(
                    "Encryption header offset '{off}' is not a multiple of cluster size '{cluster_size}'"
                ));
            }
            if off.checked_add(len).is_none_or(|e| e > MAX_OFFSET) || len > MAX_CRYPTO_AREA {
                return ce(format!(
                    "Encryption header at {off:#x}+{len:#x} is out of range"
                ));
            }
        }
        Ok(())
    }

    fn check_features(&self) -> Result<()> {
        let unknown = self.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            // As QEMU words it: the named bits, then one mask of the rest.
            let mut names = Vec::new();
            let mut unnamed = 0u64;
            for b in (0..64u8).filter(|b| unknown & (1u64 << b) != 0) {
                match self
                    .feature_names
                    .iter()
                    .find(|f| f.kind == 0 && f.bit == b)
                {
                    Some(f) => names.push(f.name.clone()),
                    None => unnamed |= 1u64 << b,
                }
            }
            if unnamed != 0 {
                names.push(format!("Unknown incompatible feature: {unnamed:x}"));
            }
            return Err(Error::UnsupportedFeature(names.join(", ")));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(bad(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        Ok(())
    }

    fn parse_extensions(&mut self, buf: &[u8], cluster_size: u64) -> Result<()> {
        // As QEMU bounds them (qcow2_do_open's ext_end): the first cluster,
        // or up to the backing file name where that comes first; bytes past
        // the end of a short file read as zeros (an END marker).
        let mut end = cluster_size;
        if self.backing_file_offset != 0 {
            end = end.min(self.backing_file_offset);
        }
        let end = end as usize;
        let padded;
        let buf = if buf.len() < end {
            padded = [buf, &vec![0u8; end - buf.len()]].concat();
            &padded[..]
        } else {
            buf
        };
        let mut at = self.header_length as usize;
        // A header extension area must end with an END marker or the
        // cluster end; both are accepted, as QEMU does. An extension
        // header cut by the end is refused, as QEMU refuses it.
        while at < end {
            if at + 8 > end {
                return Err(bad("header extension too large"));
            }
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            at += 8;
            if kind == ext::END {
                break;
            }
            if len > end - at {
                return Err(bad(format!(
                    "header extension {kind:#x} is longer than the first cluster"
                )));
            }
            let data = &buf[at..at + len];
            match kind {
                ext::BACKING_FORMAT => {
                    let s = String::from_utf8(data.to_vec())
                        .map_err(|_| bad("backing format is not UTF-8"))?;
                    self.backing_format = Some(s.trim_end_matches('\0').to_string());
                }
                ext::FEATURE_TABLE => {
                    // A short last entry counts (QEMU reads it padded).
                    for e in data.chunks(48).filter(|e| e.len() >= 2) {
                        let name_raw = &e[2..];
                        let n = name_raw
                            .iter()
                            .position(|&c| c == 0)
                            .unwrap_or(name_raw.len());
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&name_raw[..n]).into_owned(),
                        });
                    }
                }
                _ => self.other_extensions.push(Extension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            at += len.next_multiple_of(8).min(end - at);
        }
        Ok(())
    }
}

/// Byte offsets of header fields that are updated in place.
pub mod field {
    pub const SIZE: u64 = 24;
    /// l1_size (u32) followed by l1_table_offset (u64): 12 contiguous
    /// bytes, so an L1 switch is a single small write.
    pub const L1_SIZE: u64 = 36;
    /// refcount_table_offset (u64) followed by refcount_table_clusters
    /// (u32): also 12 contiguous bytes.
    pub const REFCOUNT_TABLE: u64 = 48;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const INCOMPATIBLE: u64 = 72;
    pub const AUTOCLEAR: u64 = 88;
}
