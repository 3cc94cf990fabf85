//! Serialising the header: the fixed fields, the extensions and the
//! backing file name in the first cluster.

use super::{
    ext, CompressionType, FeatureName, Header, MAGIC, MAX_BACKING_NAME, V2_HEADER_LEN,
    V3_HEADER_LEN_COMPRESSION,
};
use crate::error::{Error, Result};

impl Header {
    /// The feature name table QEMU writes into version 3 images.
    pub fn default_feature_names() -> Vec<FeatureName> {
        let f = |kind, bit, name: &str| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        };
        vec![
            f(0, 0, "dirty bit"),
            f(0, 1, "corrupt bit"),
            f(0, 2, "external data file"),
            f(0, 3, "compression type"),
            f(0, 4, "extended L2 entries"),
            f(1, 0, "lazy refcounts"),
            f(2, 0, "bitmaps"),
            f(2, 1, "raw external data"),
        ]
    }

    /// Serialises the header, its extensions and the backing file name into
    /// one first-cluster image (`cluster_size` bytes). Updates
    /// `header_length`, `backing_file_offset` and `backing_file_size`.
    pub fn encode(&mut self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs];
        let hlen = if self.version == 3 {
            (self.header_length as usize).max(V3_HEADER_LEN_COMPRESSION)
        } else {
            V2_HEADER_LEN
        };
        self.header_length = hlen as u32;
        let mut exts: Vec<u8> = Vec::new();
        let mut push_ext = |kind: u32, data: &[u8]| {
            exts.extend_from_slice(&kind.to_be_bytes());
            exts.extend_from_slice(&(data.len() as u32).to_be_bytes());
            exts.extend_from_slice(data);
            exts.resize(exts.len().next_multiple_of(8), 0);
        };
        if let Some(fmt) = &self.backing_format {
            push_ext(ext::BACKING_FORMAT, fmt.as_bytes());
        }
        // QEMU's order: the encryption header pointer, then the data
        // file name, before the feature table.
        for kind in [ext::CRYPTO, ext::DATA_FILE] {
            for e in self.other_extensions.iter().filter(|e| e.kind == kind) {
                push_ext(e.kind, &e.data);
            }
        }
        if !self.feature_names.is_empty() {
            let mut d = Vec::with_capacity(self.feature_names.len() * 48);
            for f in &self.feature_names {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                d.extend_from_slice(&e);
            }
            push_ext(ext::FEATURE_TABLE, &d);
        }
        for e in self
            .other_extensions
            .iter()
            .filter(|e| e.kind != ext::CRYPTO && e.kind != ext::DATA_FILE)
        {
            push_ext(e.kind, &e.data);
        }
        push_ext(ext::END, &[]);
        let name = self.backing_file.clone().unwrap_or_default();
        if name.len() > MAX_BACKING_NAME {
            return Err(Error::InvalidArgument(format!(
                "backing file name is longer than {MAX_BACKING_NAME} bytes"
            )));
        }
        let total = hlen + exts.len() + name.len();
        if total > cs && !self.feature_names.is_empty() {
            // The feature name table is optional; QEMU leaves it out when
            // the first cluster (512 bytes) has no room for it.
            self.feature_names.clear();
            return self.encode();
        }
        if total > cs {
            return Err(Error::InvalidArgument(
                "header, extensions and backing file name do not fit in the first cluster".into(),
            ));
        }
        b[hlen..hlen + exts.len()].copy_from_slice(&exts);
        if name.is_empty() {
            self.backing_file_offset = 0;
            self.backing_file_size = 0;
        } else {
            let at = hlen + exts.len();
            b[at..at + name.len()].copy_from_slice(name.as_bytes());
            self.backing_file_offset = at as u64;
            self.backing_file_size = name.len() as u32;
        }
        self.encode_fixed(&mut b[..hlen]);
        Ok(b)
    }

    /// Writes the fixed header fields into `b` (72 or 112 bytes).
    fn encode_fixed(&self, b: &mut [u8]) {
        let mut put32 = |at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        put32(0, MAGIC);
        put32(4, self.version);
        put32(16, self.backing_file_size);
        put32(20, self.cluster_bits);
        put32(32, self.crypt_method);
        put32(36, self.l1_size);
        put32(56, self.refcount_table_clusters);
        put32(60, self.nb_snapshots);
        let mut put64 = |at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put64(8, self.backing_file_offset);
        put64(24, self.size);
        put64(40, self.l1_table_offset);
        put64(48, self.refcount_table_offset);
        put64(64, self.snapshots_offset);
        if self.version == 3 {
            put64(72, self.incompatible_features);
            put64(80, self.compatible_features);
            put64(88, self.autoclear_features);
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            if b.len() > 104 {
                b[104] = match self.compression_type {
                    CompressionType::Zlib => 0,
                    CompressionType::Zstd => 1,
                };
            }
        }
    }
}
