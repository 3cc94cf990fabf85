//! The crash-consistency workload, shared by the `crash_writer` helper
//! (which runs it against an image until it is killed) and
//! `tests/crash_consistency.rs` (which replays it from the same seed to
//! know what the image must hold).
//!
//! The workload is a sequence of batches. A batch is up to a dozen writes,
//! write-zeroes and discards on non-overlapping sector ranges, so they may
//! run concurrently in any order and still leave one defined result; each
//! batch ends with a flush, after which the writer prints `F <batch>`.
//! Every sector written holds a pattern derived from its sector number and
//! the write's generation, so a read tells which write (if any) it holds.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const SECTOR: u64 = 512;
/// Largest write, in sectors (256 KiB); batches fit the blkio client's
/// 4 MiB buffer.
pub const MAX_WRITE_SECTORS: u64 = 512;
const MAX_OPS: usize = 12;

/// One request of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Sectors [sector, sector + count) get pattern(sector, gen).
    Write { sector: u64, count: u64, gen: u64 },
    /// Sectors read as zeros afterwards.
    Zero {
        sector: u64,
        count: u64,
        unmap: bool,
    },
    /// Whole clusters inside the range may be dropped.
    Discard { sector: u64, count: u64 },
}

impl Op {
    /// First sector and sector count.
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Op::Write { sector, count, .. }
            | Op::Zero { sector, count, .. }
            | Op::Discard { sector, count } => (sector, count),
        }
    }

    /// The data of a write (empty for the other kinds).
    pub fn data(&self) -> Vec<u8> {
        let Op::Write { sector, count, gen } = *self else {
            return Vec::new();
        };
        let mut v = vec![0u8; (count * SECTOR) as usize];
        for (k, s) in v.chunks_exact_mut(SECTOR as usize).enumerate() {
            pattern(sector + k as u64, gen, s);
        }
        v
    }
}

/// The content of `sector` written by the write of generation `gen`:
/// sector and generation in the first 16 bytes (so a mismatch can say what
/// was found), then bytes derived from both.
pub fn pattern(sector: u64, gen: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&sector.to_le_bytes());
    out[8..16].copy_from_slice(&gen.to_le_bytes());
    let mut x = sector
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(gen.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        | 1;
    for b in out[16..].chunks_mut(8) {
        // xorshift64: cheap, and different in every word.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
}

/// The seeded batch generator.
pub struct Workload {
    rng: StdRng,
    sectors: u64,
    round: u64,
    batch: u64,
}

impl Workload {
    /// `round` keeps generations unique across the rounds run on one image.
    pub fn new(seed: u64, round: u64, sectors: u64) -> Workload {
        Workload {
            rng: StdRng::seed_from_u64(seed),
            sectors,
            round,
            batch: 0,
        }
    }

    fn place(&mut self, count: u64) -> u64 {
        let count = count.min(self.sectors);
        let s = self.rng.random_range(0..=self.sectors - count);
        // Aligned to 4 KiB or 64 KiB a third of the time each, else any
        // sector: heads and tails of clusters of every size get hit.
        let s = match self.rng.random_range(0..3) {
            0 => s & !7,
            1 => s & !127,
            _ => s,
        };
        s.min(self.sectors - count)
    }

    /// The next batch (its index is the number of batches before it).
    pub fn next_batch(&mut self) -> Vec<Op> {
        let n = self.rng.random_range(1..=MAX_OPS);
        let mut ops: Vec<Op> = Vec::with_capacity(n);
        let gen0 = (self.round << 40) | (self.batch << 8);
        for i in 0..n {
            let kind = self.rng.random_range(0..100);
            let count = match self.rng.random_range(0..100) {
                0..=64 => self.rng.random_range(1..=16),
                65..=94 => self.rng.random_range(1..=128),
                _ => self.rng.random_range(1..=MAX_WRITE_SECTORS),
            };
            let op = (0..8).find_map(|_| {
                let count = if kind >= 75 { count * 4 } else { count };
                let sector = self.place(count);
                let count = count.min(self.sectors - sector);
                let clash = ops.iter().any(|o| {
                    let (s, c) = o.range();
                    sector < s + c && s < sector + count
                });
                (!clash).then_some((sector, count))
            });
            let Some((sector, count)) = op else {
                continue;
            };
            ops.push(match kind {
                0..=74 => Op::Write {
                    sector,
                    count: count.min(MAX_WRITE_SECTORS),
                    gen: gen0 | i as u64,
                },
                75..=87 => Op::Zero {
                    sector,
                    count,
                    unmap: self.rng.random_bool(0.5),
                },
                _ => Op::Discard { sector, count },
            });
        }
        self.batch += 1;
        ops
    }
}

/// What a sector holds, as the test's model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Val {
    /// What it held when the round began.
    Init,
    Zero,
    Gen(u64),
}

/// How the image applies discards: `zeroes` is false where the engine
/// leaves discards undone (version 2 with a backing file, which has no
/// zero clusters and must not expose the backing data).
#[derive(Debug, Clone, Copy)]
pub struct DiscardRule {
    pub cluster_sectors: u64,
    pub zeroes: bool,
}

/// The sector values `op` leaves: (first sector, values).
pub fn effect(op: &Op, rule: DiscardRule) -> Vec<(u64, Val)> {
    match *op {
        Op::Write { sector, count, gen } => (sector..sector + count)
            .map(|s| (s, Val::Gen(gen)))
            .collect(),
        Op::Zero { sector, count, .. } => {
            (sector..sector + count).map(|s| (s, Val::Zero)).collect()
        }
        Op::Discard { sector, count } => {
            if !rule.zeroes {
                return Vec::new();
            }
            // Only the whole clusters inside the range.
            let cs = rule.cluster_sectors;
            let first = sector.next_multiple_of(cs);
            let end = (sector + count) / cs * cs;
            (first..end.max(first)).map(|s| (s, Val::Zero)).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_reproducible_and_never_overlap() {
        let mut a = Workload::new(42, 3, 32768);
        let mut b = Workload::new(42, 3, 32768);
        for _ in 0..500 {
            let x = a.next_batch();
            assert_eq!(x, b.next_batch());
            for (i, o) in x.iter().enumerate() {
                let (s, c) = o.range();
                assert!(c > 0 && s + c <= 32768, "{o:?}");
                for p in &x[i + 1..] {
                    let (t, d) = p.range();
                    assert!(s + c <= t || t + d <= s, "{o:?} overlaps {p:?}");
                }
            }
        }
    }

    #[test]
    fn patterns_differ_by_sector_and_generation() {
        let mut a = [0u8; 512];
        let mut b = [0u8; 512];
        pattern(7, 1, &mut a);
        pattern(7, 2, &mut b);
        assert_ne!(a[16..], b[16..]);
        pattern(8, 1, &mut b);
        assert_ne!(a[16..], b[16..]);
        assert_ne!(a, [0u8; 512]);
    }

    #[test]
    fn discards_drop_whole_clusters_only() {
        let rule = DiscardRule {
            cluster_sectors: 8,
            zeroes: true,
        };
        let e = effect(
            &Op::Discard {
                sector: 3,
                count: 20,
            },
            rule,
        );
        let s: Vec<u64> = e.iter().map(|x| x.0).collect();
        assert_eq!(s, (8..16).collect::<Vec<_>>());
        assert!(effect(
            &Op::Discard {
                sector: 1,
                count: 9
            },
            rule
        )
        .is_empty());
    }
}
