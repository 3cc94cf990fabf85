//! What a server exports: images under names, each with the transmission
//! flags and metadata contexts it offers. A client reaches an export only
//! by its exact name; nothing it sends becomes a path.

use std::sync::Arc;

use nbd_proto::consts::tflags;
use qcow2::blockstatus::{qemu_len, Chain};
use qcow2::Image;

/// One exported image.
#[derive(Debug)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub image: Arc<dyn Image>,
    /// The size clients see: QEMU's view (a raw file in whole sectors),
    /// so that rimg-nbd and qemu-nbd export the same disk.
    pub size: u64,
    pub readonly: bool,
    /// Offer `qemu:allocation-depth` (qemu-nbd's `-A`).
    pub allocation_depth: bool,
    /// Offer multi-conn: only where more than one client may connect
    /// (as qemu-nbd: a client that opens several connections to a
    /// server that takes one would wait for ever).
    pub multi_conn: bool,
    /// The image and its backing chain, for block status.
    pub chain: Chain,
    /// Persistent dirty bitmaps offered as `qemu:dirty-bitmap:NAME`
    /// (qemu-nbd's `-B`): the bits as the export started, and whether
    /// they may change while it is served (the bitmap records writes and
    /// the export takes them): then each request reads them afresh.
    pub bitmaps: Vec<(String, qcow2::bitmap::edit::Source, bool)>,
}

impl Export {
    pub fn new(
        name: String,
        description: String,
        image: Arc<dyn Image>,
        readonly: bool,
        allocation_depth: bool,
    ) -> qcow2::Result<Export> {
        Ok(Export {
            name,
            description,
            size: qemu_len(image.as_ref()),
            readonly: readonly || !image.is_writable(),
            allocation_depth,
            multi_conn: true,
            chain: Chain::new(&image)?,
            image,
            bitmaps: Vec::new(),
        })
    }

    /// Offers the image's persistent bitmap `name` as
    /// `qemu:dirty-bitmap:NAME`.
    pub fn with_bitmap(mut self, name: &str) -> qcow2::Result<Export> {
        let src = self.bitmap_now(name)?;
        let live = src.enabled() && !self.readonly;
        self.bitmaps.push((name.to_string(), src, live));
        Ok(self)
    }

    /// The bits of persistent bitmap `name` now.
    pub fn bitmap_now(&self, name: &str) -> qcow2::Result<qcow2::bitmap::edit::Source> {
        let q = self.image.as_qcow2().ok_or_else(|| {
            qcow2::Error::InvalidArgument(format!(
                "bitmap '{name}': only qcow2 images have persistent bitmaps"
            ))
        })?;
        qcow2::bitmap::edit::source_from(q, name)
    }

    /// The transmission flags of this export for a client that agreed on
    /// `structured` replies (DF means something only then). Multi-conn,
    /// where offered, is safe: a flush on any connection makes every
    /// completed write durable, whichever connection made it (the image
    /// is shared).
    pub fn flags(&self, structured: bool) -> u16 {
        let mut f = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_FUA | tflags::SEND_CACHE;
        if self.multi_conn {
            f |= tflags::CAN_MULTI_CONN;
        }
        if structured {
            f |= tflags::SEND_DF;
        }
        if self.readonly {
            f |= tflags::READ_ONLY;
        } else {
            f |= tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES | tflags::SEND_FAST_ZERO;
        }
        f
    }

    /// Every metadata context this export offers, in the order ids are
    /// given.
    pub fn contexts(&self) -> Vec<Context> {
        let mut v = vec![Context::Allocation];
        if self.allocation_depth {
            v.push(Context::AllocationDepth);
        }
        // Last given first, as qemu-nbd lists them.
        for (i, (name, ..)) in self.bitmaps.iter().enumerate().rev() {
            v.push(Context::DirtyBitmap(i, name.clone()));
        }
        v
    }
}

/// A metadata context (§Metadata querying).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`: holes and zeros.
    Allocation,
    /// `qemu:allocation-depth`: which layer of the chain holds a range
    /// (0 none, 1 the image, 2 its backing file...).
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`: 1 where the bitmap is dirty (the
    /// export's bitmap at this index).
    DirtyBitmap(usize, String),
}

impl Context {
    pub fn name(&self) -> String {
        match self {
            Context::Allocation => "base:allocation".into(),
            Context::AllocationDepth => "qemu:allocation-depth".into(),
            Context::DirtyBitmap(_, n) => format!("qemu:dirty-bitmap:{n}"),
        }
    }

    /// Whether `query` names this context for `NBD_OPT_LIST_META_CONTEXT`
    /// (`list`), where a namespace alone ("base:", "qemu:") matches all
    /// of it, or for `NBD_OPT_SET_META_CONTEXT`, where only the full name
    /// selects (as qemu-nbd does).
    pub fn matches(&self, query: &str, list: bool) -> bool {
        let name = self.name();
        if query == name {
            return true;
        }
        list && query.ends_with(':') && name.starts_with(query)
    }
}

/// The exports of one server, looked up by exact name.
#[derive(Debug, Default)]
pub struct Exports {
    pub list: Vec<Arc<Export>>,
}

impl Exports {
    pub fn get(&self, name: &str) -> Option<&Arc<Export>> {
        self.list.iter().find(|e| e.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_list_but_do_not_select() {
        let a = Context::Allocation;
        assert!(a.matches("base:allocation", false));
        assert!(a.matches("base:", true));
        assert!(!a.matches("base:", false));
        assert!(!a.matches("base:alloc", true));
        assert!(!a.matches("qemu:", true));
        let d = Context::AllocationDepth;
        assert!(d.matches("qemu:", true));
        assert!(!d.matches("qemu:", false));
        assert!(d.matches("qemu:allocation-depth", false));
    }
}
