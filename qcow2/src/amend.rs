//! Changing an existing image's format options (qemu-img amend): version
//! (compat), refcount width, lazy refcounts. The backing file fields may
//! only be restated as they are (QEMU's rule; `rebase -u` changes them).

use crate::amend_progress::{AmendProgress, Pass, ProgressFn, WidthModel};
use crate::error::{Error, Result};
use crate::header::{compat, incompat, Header};
use crate::image::{ExtentKind, Image};
use crate::qcow::Qcow2;

/// Requested changes; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct Amend {
    /// 2 (compat 0.10) or 3 (compat 1.1).
    pub version: Option<u32>,
    pub refcount_bits: Option<u32>,
    pub lazy_refcounts: Option<bool>,
    /// Must equal the image's (Some(None): no backing file), see
    /// [`Amend::backing_changes`].
    pub backing_file: Option<Option<String>>,
    pub backing_format: Option<Option<String>>,
    /// New name of the external data file (only images that have one);
    /// empty: drop the name from the header.
    pub data_file: Option<String>,
    /// Only clearing the raw bit is possible (QEMU's rule: an existing
    /// data file is not known to be a raw image of the disk).
    pub data_file_raw: Option<bool>,
}

impl Amend {
    /// Whether the backing file fields asked for differ from the image's.
    /// As in QEMU (which removed changing them by amend in 6.1), naming
    /// them is allowed only to restate both as they are: a field not
    /// named counts as "none".
    pub fn backing_changes(&self, h: &Header) -> bool {
        if self.backing_file.is_none() && self.backing_format.is_none() {
            return false;
        }
        let file = self.backing_file.clone().flatten();
        let format = self.backing_format.clone().flatten();
        file != h.backing_file || format != h.backing_format
    }
}

impl Qcow2 {
    /// Applies `a`. Data is converted first (zero clusters expanded before
    /// a downgrade, refcounts rebuilt for a new width); the header changes
    /// last, so an interrupted amend leaves a valid image in the old format.
    pub fn amend(&self, a: &Amend) -> Result<()> {
        self.amend_with_progress(a, &mut |_, _| {})
    }

    /// As [`amend`](Self::amend), reporting progress to `out` as
    /// `(done, total)` with qemu-img's figures (see
    /// [`crate::amend_progress`]).
    pub fn amend_with_progress(&self, a: &Amend, out: ProgressFn<'_>) -> Result<()> {
        let h = self.header();
        let version = a.version.unwrap_or(h.version);
        let bits = a.refcount_bits.unwrap_or(h.refcount_bits());
        if !bits.is_power_of_two() || bits > 64 {
            return Err(Error::InvalidArgument(
                "refcount width must be a power of two and may not exceed 64 bits".into(),
            ));
        }
        if a.backing_changes(&h) {
            return Err(Error::InvalidArgument(
                "cannot amend the backing file (rebase -u changes it)".into(),
            ));
        }
        // As QEMU: a downgrade drops lazy refcounts (the open made the
        // refcounts right if the image was dirty); only asking to turn them
        // on where they are off is refused for version 2.
        if a.data_file.is_some() && !h.has_data_file() {
            return Err(Error::InvalidArgument(
                "data-file can only be set for images that use an external data file".into(),
            ));
        }
        if a.data_file_raw == Some(true) && !h.data_file_raw() {
            return Err(Error::InvalidArgument(
                "data-file-raw cannot be set on existing images".into(),
            ));
        }
        if version == 2 && h.version == 3 && h.has_data_file() {
            return Err(Error::InvalidArgument(
                "Cannot downgrade an image with a data file".into(),
            ));
        }
        let lazy = a.lazy_refcounts.unwrap_or(h.lazy_refcounts());
        if version == 2 && lazy && !h.lazy_refcounts() {
            return Err(Error::InvalidArgument(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into(),
            ));
        }
        let lazy = lazy && version >= 3;
        if version == 2 {
            // qemu-img words the two cases apart: a width being changed, or
            // a downgrade of an image that keeps its non-16-bit width.
            if bits != 16 && bits != h.refcount_bits() {
                return Err(Error::InvalidArgument(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into(),
                ));
            }
            if bits != 16 {
                return Err(Error::InvalidArgument(
                    "compat=0.10 requires refcount_bits=16".into(),
                ));
            }
            // Version 2 can express none of these (the dirty bit is
            // cleared by the open's repair); qemu-img names them in hex.
            let incompatible = h.incompatible_features & !(incompat::COMPRESSION | incompat::DIRTY);
            if h.version == 3 && incompatible != 0 {
                return Err(Error::InvalidArgument(format!(
                    "Cannot downgrade an image with incompatible features {incompatible:#x} set"
                )));
            }
            if h.version == 3 && h.incompatible_features & incompat::COMPRESSION != 0 {
                return Err(Error::InvalidArgument(
                    "cannot downgrade an image whose compression type is not zlib".into(),
                ));
            }
        }
        let passes = u64::from(version != h.version) + u64::from(bits != h.refcount_bits());
        let mut progress = AmendProgress::new(passes, out);
        if version == 3 && h.version == 2 {
            // QEMU's upgrade reports three fixed steps before anything else.
            progress.begin(Pass::Upgrade);
            for i in 0..3 {
                progress.report(i, 2);
            }
        }
        if bits != h.refcount_bits() {
            let order = bits.trailing_zeros();
            self.flush()?;
            progress.begin(Pass::RefcountWidth);
            self.with_meta(|ctx| {
                ctx.drop_l2_cache();
                let model = self.width_model(ctx, order)?;
                crate::check::rebuild::change_refcount_width(self, ctx, order)?;
                model.report(&mut progress);
                Ok::<_, Error>(())
            })?;
        }
        if version == 2 && h.version == 3 {
            // The zero expansion reads every snapshot's L1 table first.
            for sn in self.snapshots() {
                sn.check_l1(self.cluster_size())?;
            }
            // Version 2 entries have no disk size: each must match the
            // disk's (QEMU's rule; a missing one reads as the disk's).
            let size = self.size();
            if self.snapshots().iter().any(|s| {
                s.vm_state_size > u32::MAX as u64 || s.disk_size.is_some_and(|d| d != size)
            }) {
                return Err(Error::InvalidArgument(
                    "Internal snapshots prevent downgrade of image".into(),
                ));
            }
            progress.begin(Pass::Downgrade);
            self.expand_zero_clusters(&mut progress)?;
        }
        if version == 3 && h.version == 2 {
            // Version 3 requires every snapshot entry to carry the disk
            // size; entries written for version 2 may lack it.
            self.complete_snapshot_table()?;
        }
        self.update_header(|n: &mut Header| {
            if version != n.version {
                n.version = version;
                if version == 2 {
                    // Version 2 has none of these fields.
                    n.incompatible_features = 0;
                    n.compatible_features = 0;
                    n.autoclear_features = 0;
                    n.feature_names.clear();
                } else {
                    n.header_length = crate::header::V3_HEADER_LEN_COMPRESSION as u32;
                    n.feature_names = Header::default_feature_names();
                }
            }
            if a.data_file_raw == Some(false) {
                n.autoclear_features &= !crate::header::autoclear::DATA_FILE_RAW;
            }
            match a.data_file.as_deref() {
                Some("") => n
                    .other_extensions
                    .retain(|e| e.kind != crate::header::ext::DATA_FILE),
                Some(name) => {
                    let raw = n.autoclear_features & crate::header::autoclear::DATA_FILE_RAW;
                    n.set_data_file(Some(name));
                    n.autoclear_features |= raw;
                }
                None => {}
            }
            if version == 3 {
                if lazy {
                    n.compatible_features |= compat::LAZY_REFCOUNTS;
                } else {
                    n.compatible_features &= !compat::LAZY_REFCOUNTS;
                }
            }
            Ok(())
        })
    }

    /// Replaces zero clusters (which version 2 cannot express) with real
    /// zeros, or with unallocated clusters where nothing shows through.
    fn expand_zero_clusters(&self, progress: &mut AmendProgress<'_>) -> Result<()> {
        let size = self.size();
        let cs = self.cluster_size();
        // One step per L1 entry, as qemu-img counts.
        let l1_span = cs * (cs / 8);
        let active_entries = u64::from(self.header().l1_size);
        let l1_entries = active_entries
            + self
                .snapshots()
                .iter()
                .map(|s| u64::from(s.l1_size))
                .sum::<u64>();
        let mut reported = 0;
        let mut report_to = |n: u64, p: &mut AmendProgress<'_>| {
            while reported < n.min(active_entries) {
                reported += 1;
                p.report(reported, l1_entries);
            }
        };
        let has_backing = self.header().backing_file.is_some();
        let zeros = vec![0u8; cs as usize];
        let mut pos = 0;
        while pos < size {
            let e = self.block_status(pos, size - pos)?;
            if e.kind == ExtentKind::Zero {
                let end = pos + e.len;
                let mut p = pos;
                while p < end {
                    let n = (end - p).min(cs - p % cs);
                    if has_backing || e.offset.is_some() {
                        self.write_at(&zeros[..n as usize], p)?;
                    } else {
                        self.deallocate(p, n)?;
                    }
                    p += n;
                }
            }
            pos += e.len;
            report_to(pos / l1_span, progress);
        }
        report_to(active_entries, progress);
        self.flush()?;
        self.with_meta(|ctx| {
            crate::downgrade::expand_inactive(
                self,
                ctx,
                has_backing,
                progress,
                active_entries,
                l1_entries,
            )
        })
    }

    /// The state QEMU's refcount width change walks over (see
    /// [`WidthModel`]).
    fn width_model(&self, ctx: &mut crate::qcow::MetaCtx<'_>, order: u32) -> Result<WidthModel> {
        let st = self.storage();
        let cb = ctx.header.cluster_bits;
        let cs = 1u64 << cb;
        let clusters = st.len()?.div_ceil(cs);
        let mut used = Vec::with_capacity(clusters as usize);
        for c in 0..clusters {
            used.push(ctx.rc.get(st, c)? != 0);
        }
        Ok(WidthModel {
            table_entries: ctx.rc.table_clusters() * cs / 8,
            old_per_block: 1 << (cb + 3 - ctx.header.refcount_order),
            new_per_block: 1 << (cb + 3 - order),
            cluster_size: cs,
            used,
        })
    }
}
