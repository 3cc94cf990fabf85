//! Progress of `amend` as qemu-img reports it (`amend -p`).
//!
//! qemu-img's figures come from its internal passes: an upgrade reports
//! three fixed steps, a refcount width change one step per refcount table
//! entry in each of its walks over the refcount table (QEMU repeats the
//! allocating walk until nothing new was allocated, so the projected total
//! can grow and the figure go back), a downgrade one step per L1 entry of
//! the active and snapshot tables. Scripts (and iotests 061 and 112) read
//! these figures, so rimg reports the same passes even where its own work
//! is organised differently: the refcount walks are replayed on a model of
//! QEMU's first-fit allocator.

/// Receives `(done, total)` pairs in arbitrary units.
pub type ProgressFn<'a> = &'a mut dyn FnMut(u64, u64);

/// The kinds of passes an amend runs, in QEMU's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    Upgrade,
    RefcountWidth,
    Downgrade,
}

/// Combines the passes' own figures into one figure for the whole amend,
/// projecting the passes not started yet from the ones done (QEMU's rule,
/// so the figures match).
pub(crate) struct AmendProgress<'a> {
    out: ProgressFn<'a>,
    total_passes: u64,
    passes_done: u64,
    done_work: u64,
    current: Option<Pass>,
    last: Option<Pass>,
    last_work: u64,
}

impl<'a> AmendProgress<'a> {
    pub fn new(total_passes: u64, out: ProgressFn<'a>) -> Self {
        AmendProgress {
            out,
            total_passes,
            passes_done: 0,
            done_work: 0,
            current: None,
            last: None,
            last_work: 0,
        }
    }

    /// The pass that the following reports belong to.
    pub fn begin(&mut self, p: Pass) {
        self.current = Some(p);
    }

    /// Reports `offset` of `work` units of the current pass.
    pub fn report(&mut self, offset: u64, work: u64) {
        if self.current != self.last {
            if self.last.is_some() {
                self.done_work += self.last_work;
                self.passes_done += 1;
            }
            self.last = self.current;
        }
        if self.total_passes == 0 || self.passes_done >= self.total_passes {
            return;
        }
        self.last_work = work;
        let cur = self.done_work + work;
        let left = self.total_passes - self.passes_done - 1;
        let projected = cur * left / (self.passes_done + 1);
        (self.out)(self.done_work + offset, cur + projected);
    }
}

/// What the refcount width change walks over: the old refcount table's
/// entry count, clusters per old and new refcount block, and which host
/// clusters are in use.
pub(crate) struct WidthModel {
    pub table_entries: u64,
    pub old_per_block: u64,
    pub new_per_block: u64,
    pub cluster_size: u64,
    pub used: Vec<bool>,
}

impl WidthModel {
    /// Reports the walks QEMU's refcount width change makes: allocating
    /// walks until one allocates nothing, then the writing walk.
    pub fn report(mut self, p: &mut AmendProgress<'_>) {
        let r = self.table_entries;
        let span = r * self.old_per_block;
        let blocks = span.div_ceil(self.new_per_block.max(1));
        let entries_per_cluster = self.cluster_size / 8;
        let mut new_table: Vec<bool> = Vec::new();
        let mut table_at: Option<(u64, u64)> = None;
        let mut free_from = 0u64;
        let mut walk = 0u64;
        loop {
            let total = (walk + 2).max(3);
            let mut allocated = false;
            // One report per old table entry (their figures do not depend
            // on what the walk allocates).
            for e in 0..r {
                p.report(walk * r + e, total * r);
            }
            for b in 0..blocks {
                let lo = b * self.new_per_block;
                let hi = ((b + 1) * self.new_per_block).min(span);
                let empty = !(lo..hi).any(|c| self.is_used(c));
                if empty {
                    continue;
                }
                let idx = b as usize;
                if idx >= new_table.len() {
                    let n = (b + 1).div_ceil(entries_per_cluster) * entries_per_cluster;
                    new_table.resize(n as usize, false);
                }
                if !new_table[idx] {
                    new_table[idx] = true;
                    self.alloc(1, &mut free_from);
                    allocated = true;
                }
            }
            p.report((walk + 1) * r, total * r);
            walk += 1;
            if !allocated {
                break;
            }
            if let Some((at, n)) = table_at {
                for c in at..at + n {
                    self.used[c as usize] = false;
                }
                free_from = free_from.min(at);
            }
            let n = (new_table.len() as u64 * 8).div_ceil(self.cluster_size);
            table_at = Some((self.alloc(n, &mut free_from), n));
        }
        // The writing walk.
        let total = walk + 1;
        for e in 0..r {
            p.report(walk * r + e, total * r);
        }
        p.report((walk + 1) * r, total * r);
    }

    fn is_used(&self, c: u64) -> bool {
        self.used.get(c as usize).copied().unwrap_or(false)
    }

    /// First fit from `free_from`, as QEMU's cluster allocator.
    fn alloc(&mut self, n: u64, free_from: &mut u64) -> u64 {
        let mut start = *free_from;
        while let Some(c) = (start..start + n).find(|&c| self.is_used(c)) {
            start = c + 1;
        }
        let end = start + n;
        if self.used.len() < end as usize {
            self.used.resize(end as usize, false);
        }
        for c in start..end {
            self.used[c as usize] = true;
        }
        *free_from = end;
        start
    }
}
