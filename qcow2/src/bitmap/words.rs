//! The bits of one bitmap in memory, with a summary of where they are.
//!
//! A bitmap over a huge disk can be hundreds of MiB (QEMU allows up to
//! 512 MiB) that are almost all clear. The words are allocated zeroed
//! (calloc), so clear pages are never mapped; the summary keeps it that
//! way: one bit per page of words, set (Release) once a bit in that
//! page is set, so storing, copying, merging and walking look only at
//! the pages that may hold set bits. A mark still in flight may be
//! missed by a concurrent copy, as it could be by a copy of every word. A pass over every word would map and read
//! every page (tens of milliseconds per bitmap).

use std::sync::atomic::{AtomicU64, Ordering};

/// Words per summary bit: one 4 KiB page of words.
const PAGE_WORDS: usize = 512;

/// Bits of one bitmap: bit k (LSB first, as the on-disk data) is the
/// k-th granule.
pub(crate) struct Words {
    words: Vec<AtomicU64>,
    /// Bit p set: words [p * PAGE_WORDS, (p + 1) * PAGE_WORDS) may hold
    /// set bits; clear: they are all zero. Set (Release) after the words
    /// it covers, read (Acquire) before them.
    pages: Vec<AtomicU64>,
    /// Number of granules.
    bits: u64,
}

/// `n` zeroed words, allocated zeroed (calloc): the pages of a large
/// bitmap are mapped only as bits are set in them, so a bitmap over a
/// huge disk costs the memory of its set bits, not of its size.
fn zeroed_words(n: usize) -> Vec<AtomicU64> {
    if n == 0 {
        return Vec::new();
    }
    let layout = std::alloc::Layout::array::<AtomicU64>(n).expect("bitmap size");
    // SAFETY: the layout is not zero-sized (n > 0). All-zero bytes are a
    // valid AtomicU64 (it has u64's size and bit validity). The pointer
    // comes from the global allocator with exactly this layout (size
    // n * 8, AtomicU64's alignment), so a Vec of length and capacity n
    // may own it and free it with the same layout.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<AtomicU64>();
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Vec::from_raw_parts(p, n, n)
    }
}

/// Sets bits [first, last] of `v` (`last` < 64 * v.len()).
fn or_range(v: &[AtomicU64], first: u64, last: u64, order: Ordering) {
    let (w0, w1) = ((first / 64) as usize, (last / 64) as usize);
    for (w, word) in v.iter().enumerate().take(w1 + 1).skip(w0) {
        let lo = if w == w0 { first % 64 } else { 0 };
        let hi = if w == w1 { last % 64 } else { 63 };
        let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
        word.fetch_or(mask, order);
    }
}

impl Words {
    /// A clear bitmap of `bits` granules.
    pub(crate) fn zeroed(bits: u64) -> Words {
        let n = bits.div_ceil(64) as usize;
        Words {
            words: zeroed_words(n),
            pages: zeroed_words(n.div_ceil(PAGE_WORDS).div_ceil(64)),
            bits,
        }
    }

    /// Number of granules.
    pub(crate) fn bits(&self) -> u64 {
        self.bits
    }

    /// Number of 64-bit words.
    pub(crate) fn len(&self) -> usize {
        self.words.len()
    }

    /// Word `i` (zero past the end).
    pub(crate) fn word(&self, i: usize) -> u64 {
        self.words.get(i).map_or(0, |w| w.load(Ordering::Relaxed))
    }

    /// Whether page `p` of words may hold set bits.
    fn page_dirty(&self, p: usize) -> bool {
        self.pages
            .get(p / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) >> (p % 64) & 1 == 1)
    }

    /// Whether words [w0, w1) may hold set bits (false: all zero).
    pub(crate) fn may_be_set(&self, w0: usize, w1: usize) -> bool {
        w0 < w1 && (w0 / PAGE_WORDS..=(w1 - 1) / PAGE_WORDS).any(|p| self.page_dirty(p))
    }

    /// The first word at or after `i` whose page may hold set bits
    /// (`len()` if none): words in between are zero.
    pub(crate) fn next_maybe_set(&self, i: usize) -> usize {
        let mut p = i / PAGE_WORDS;
        let pages = self.words.len().div_ceil(PAGE_WORDS);
        while p < pages {
            let s = self.pages[p / 64].load(Ordering::Acquire) >> (p % 64);
            if s != 0 {
                let q = p + s.trailing_zeros() as usize;
                return if q == i / PAGE_WORDS {
                    i
                } else {
                    q * PAGE_WORDS
                }
                .min(self.len());
            }
            p = (p / 64 + 1) * 64;
        }
        self.len()
    }

    /// Sets granules [first, last] (clipped to the bitmap).
    pub(crate) fn set(&self, first: u64, last: u64) {
        let last = last.min(self.bits.saturating_sub(1));
        if first > last || self.bits == 0 {
            return;
        }
        or_range(&self.words, first, last, Ordering::Relaxed);
        let (w0, w1) = (first / 64, last / 64);
        or_range(
            &self.pages,
            w0 / PAGE_WORDS as u64,
            w1 / PAGE_WORDS as u64,
            Ordering::Release,
        );
    }

    /// ORs `x` into word `i` (bits past the bitmap's end are dropped).
    pub(crate) fn or_word(&self, i: usize, mut x: u64) {
        if i + 1 == self.words.len() && !self.bits.is_multiple_of(64) {
            x &= (1u64 << (self.bits % 64)) - 1;
        }
        if x == 0 || i >= self.words.len() {
            return;
        }
        self.words[i].fetch_or(x, Ordering::Relaxed);
        let p = i / PAGE_WORDS;
        self.pages[p / 64].fetch_or(1 << (p % 64), Ordering::Release);
    }

    /// The nonzero words, in order, as (index, word).
    pub(crate) fn nonzero(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        let pages = self.words.len().div_ceil(PAGE_WORDS);
        (0..pages)
            .filter(|&p| self.page_dirty(p))
            .flat_map(move |p| {
                let end = ((p + 1) * PAGE_WORDS).min(self.words.len());
                (p * PAGE_WORDS..end).map(move |i| (i, self.word(i)))
            })
            .filter(|&(_, w)| w != 0)
    }

    /// A copy of the current bits, resized to `bits` granules (bits past
    /// the new end dropped, new ones clear).
    pub(crate) fn copy_resized(&self, bits: u64) -> Words {
        let w = Words::zeroed(bits);
        for (i, x) in self.nonzero() {
            if i >= w.len() {
                break;
            }
            w.or_word(i, x);
        }
        w
    }

    /// A copy of the current bits.
    pub(crate) fn snapshot(&self) -> Words {
        self.copy_resized(self.bits)
    }

    /// Clears every bit: fresh zeroed words (writing zeros would map
    /// every page of the bitmap).
    pub(crate) fn clear(&mut self) {
        *self = Words::zeroed(self.bits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so failures replay.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    fn naive(w: &Words) -> Vec<u64> {
        (0..w.len()).map(|i| w.word(i)).collect()
    }

    /// Every operation keeps the summary covering the set bits: the
    /// summary-driven views (nonzero words, copies, next_maybe_set,
    /// may_be_set) agree with a plain read of every word.
    #[test]
    fn summary_covers_every_set_bit() {
        for seed in 1..200u64 {
            let mut r = rng(seed);
            let bits = 1 + r() % (PAGE_WORDS as u64 * 64 * 5);
            let w = Words::zeroed(bits);
            let mut model = vec![false; bits as usize];
            for _ in 0..(r() % 6) {
                let first = r() % bits;
                let last = (first + r() % (bits / 3 + 1)).min(bits + 100);
                w.set(first, last);
                for b in first..=last.min(bits - 1) {
                    model[b as usize] = true;
                }
                if r().is_multiple_of(3) {
                    let i = (r() % w.len() as u64) as usize;
                    let x = r();
                    w.or_word(i, x);
                    for k in 0..64 {
                        let b = i * 64 + k;
                        if x >> k & 1 == 1 && b < bits as usize {
                            model[b] = true;
                        }
                    }
                }
            }
            let plain = naive(&w);
            for (b, &m) in model.iter().enumerate() {
                assert_eq!(plain[b / 64] >> (b % 64) & 1 == 1, m, "seed {seed} bit {b}");
            }
            let nz: Vec<(usize, u64)> = w.nonzero().collect();
            let want: Vec<(usize, u64)> = plain
                .iter()
                .copied()
                .enumerate()
                .filter(|&(_, x)| x != 0)
                .collect();
            assert_eq!(nz, want, "seed {seed}");
            assert_eq!(naive(&w.snapshot()), plain, "seed {seed}");
            for i in 0..w.len() {
                let n = w.next_maybe_set(i);
                assert!(n >= i, "seed {seed}");
                assert!(plain[i..n].iter().all(|&x| x == 0), "seed {seed} at {i}");
            }
            let a = (r() % w.len() as u64) as usize;
            let b = a + (r() % (w.len() - a) as u64) as usize + 1;
            if plain[a..b].iter().any(|&x| x != 0) {
                assert!(w.may_be_set(a, b), "seed {seed} [{a}, {b})");
            }
            let nb = 1 + r() % (bits * 2);
            let c = w.copy_resized(nb);
            assert_eq!(c.bits(), nb);
            for k in 0..nb {
                let want = k < bits && model[k as usize];
                assert_eq!(c.word((k / 64) as usize) >> (k % 64) & 1 == 1, want);
            }
        }
    }

    /// A clear bitmap's summary is clear: nothing to look at.
    #[test]
    fn clear_bitmap_has_nothing_to_visit() {
        let mut w = Words::zeroed(64 * PAGE_WORDS as u64 * 100);
        assert_eq!(w.next_maybe_set(0), w.len());
        assert!(!w.may_be_set(0, w.len()));
        w.set(70 * 64 * PAGE_WORDS as u64, 70 * 64 * PAGE_WORDS as u64);
        assert_eq!(w.next_maybe_set(0), 70 * PAGE_WORDS);
        assert!(w.may_be_set(70 * PAGE_WORDS, 70 * PAGE_WORDS + 1));
        assert!(!w.may_be_set(0, 70 * PAGE_WORDS));
        w.clear();
        assert_eq!(w.nonzero().count(), 0);
        assert_eq!(w.next_maybe_set(0), w.len());
    }
}
