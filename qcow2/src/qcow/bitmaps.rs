//! Hooks into the persistent dirty bitmaps ([`crate::bitmap::track`]).

use super::*;

thread_local! {
    /// This thread is filling the new area of a resize (see
    /// [`Qcow2::untracked`]).
    static UNTRACKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Clears [`UNTRACKED`] when the fill ends, by error or panic too.
struct UntrackedGuard;

impl Drop for UntrackedGuard {
    fn drop(&mut self) {
        UNTRACKED.with(|u| u.set(false));
    }
}

impl Qcow2 {
    /// Runs `f`, whose writes are the format's own (the zeros a resize
    /// puts over the new area), unrecorded in the bitmaps: QEMU writes
    /// them below its dirty tracking, so the new area stays clean. Other
    /// threads' writes meanwhile are recorded as ever.
    pub(super) fn untracked<T>(&self, f: impl FnOnce() -> T) -> T {
        UNTRACKED.with(|u| u.set(true));
        let _g = UntrackedGuard;
        f()
    }

    /// At a writable open, after `prepare_for_writing`.
    pub(super) fn load_bitmaps(&self) -> Result<()> {
        if self.opts.repair || self.opts.bitmaps_on_disk {
            return Ok(());
        }
        let t = crate::bitmap::track::load(self)?;
        let _ = self.bitmaps.set(t);
        Ok(())
    }

    /// After a repair (which opens without them): loads the bitmaps as
    /// any writable open does, so that the close stores them, as qemu-img
    /// check -r stores the bitmaps its open loaded (rewriting their tables
    /// without what lay past the end of the file, say). A failure leaves
    /// them as they are on disk: the check's outcome is the result.
    pub(crate) fn load_bitmaps_after_repair(&self) {
        if self.bitmaps.get().is_some() || !self.st.writable() || self.opts.bitmaps_on_disk {
            return;
        }
        // No message on failure: qemu-img prints none here (its load was
        // part of the open the check needed).
        if let Ok(t) = crate::bitmap::track::load(self) {
            let _ = self.bitmaps.set(t);
        }
    }

    /// Records a change of guest bytes [off, off + len) in the enabled
    /// bitmaps; every path that changes guest data calls it first.
    pub(super) fn mark_dirty(&self, off: u64, len: u64) -> Result<()> {
        if UNTRACKED.with(|u| u.get()) {
            return Ok(());
        }
        match self.bitmaps.get() {
            Some(t) => t.mark(off, len.min(self.size().saturating_sub(off))),
            None => Ok(()),
        }
    }

    /// Stores the bitmaps and clears their in-use flags (done at drop
    /// too, where errors cannot be reported). Later writes fail.
    pub fn store_bitmaps(&self) -> Result<()> {
        match self.bitmaps.get() {
            Some(t) => t.store(self),
            None => Ok(()),
        }
    }

    /// Before a resize, without the metadata lock (see
    /// `Tracker::prepare_resize`).
    pub(super) fn prepare_bitmaps_for_resize(&self) -> Result<()> {
        match self.bitmaps.get() {
            Some(t) => t.prepare_resize(),
            None => Ok(()),
        }
    }

    /// After the virtual size changed (metadata lock held).
    pub(super) fn resize_bitmaps(&self, new_size: u64) {
        if let Some(t) = self.bitmaps.get() {
            t.resize(new_size);
        }
    }

    /// Applying a snapshot rewrites the whole disk behind the bitmaps'
    /// back: refused while the image has any (as QEMU refuses).
    pub(super) fn refuse_with_bitmaps(&self) -> Result<()> {
        match self.bitmaps.get() {
            Some(t) => t.refuse_snapshot_apply(),
            None => Ok(()),
        }
    }

    /// The bitmaps of this writable image (None when read-only or opened
    /// for repair), for edits (`crate::bitmap::edit`).
    pub fn bitmap_tracker(&self) -> Option<&crate::bitmap::track::Tracker> {
        self.bitmaps.get()
    }
}
