//! qemu-img's -S rule: which zero runs of a buffer of source data
//! become holes in the target.

use crate::common::{is_zero, zero_prefix};

const SECTOR: usize = 512;

/// Where the run of sectors (counted from `i`) that are all zero, or
/// (`zero` false) all hold data, ends.
fn same_sectors(b: &[u8], i: usize, zero: bool) -> usize {
    let n = b.len();
    if zero {
        // Up to the sector holding the first non-zero byte, found in one
        // pass over the run.
        let z = zero_prefix(&b[i..]);
        return if i + z >= n { n } else { i + z - z % SECTOR };
    }
    let mut j = (i + SECTOR).min(n);
    while j < n && !is_zero(&b[j..(j + SECTOR).min(n)]) {
        j = (j + SECTOR).min(n);
    }
    j
}

/// Splits `b`, to be written at offset `at`, into (from, to, is_data)
/// runs by qemu-img's -S rule: zeros become a hole only in a run of at
/// least `min` bytes; runs are judged in 512-byte sectors and their ends
/// aligned to `min` rounded down to a power of two (a data run's end up,
/// a hole's end down; a short zero run ending past a boundary is data).
/// A buffer that starts with zeros starts with a hole.
pub(super) fn sparse_runs(b: &[u8], at: u64, min: u64) -> Vec<(usize, usize, bool)> {
    let n = b.len();
    let min = (min as usize).min(n);
    let align = 1u64 << (min.max(SECTOR) as u64).ilog2();
    // The run starting at `i`: its end and whether it is data.
    let run = |i: usize| -> (usize, bool) {
        let zero = is_zero(&b[i..(i + SECTOR).min(n)]);
        let j = same_sectors(b, i, zero);
        if j == n {
            return (n, !zero);
        }
        let tail = ((at + j as u64) % align) as usize;
        if tail == 0 {
            return (j, !zero);
        }
        if !zero || j - i <= tail {
            ((j + align as usize - tail).min(n), true)
        } else {
            (j - tail, false)
        }
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let (j, data) = run(i);
        if !data {
            out.push((i, j, false));
            i = j;
            continue;
        }
        // Data goes on over zero runs shorter than `min`.
        let mut used = j;
        let mut k = j;
        while k < n {
            let (e, d) = run(k);
            if d {
                used = e;
            } else if e - k >= min {
                break;
            }
            k = e;
        }
        out.push((i, used, true));
        i = used;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{same_sectors, sparse_runs, SECTOR};

    /// The run end judged sector by sector, byte by byte.
    fn by_sectors(b: &[u8], i: usize, zero: bool) -> usize {
        let n = b.len();
        let is_zero = |k: usize| b[k..(k + SECTOR).min(n)].iter().all(|&x| x == 0);
        let mut j = (i + SECTOR).min(n);
        while j < n && is_zero(j) == zero {
            j = (j + SECTOR).min(n);
        }
        j
    }

    #[test]
    fn run_ends_match_a_sector_by_sector_scan() {
        // Sparse non-zero bytes at pseudo-random places, sizes that end
        // mid-sector, runs starting at every sector.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..40 {
            let n = 20_000 + (next() % 50_000) as usize;
            let mut b = vec![0u8; n];
            for _ in 0..(round % 8) * 3 {
                let k = (next() % n as u64) as usize;
                b[k] = 1 + (next() % 255) as u8;
            }
            let mut i = 0;
            while i < n {
                let zero = b[i..(i + SECTOR).min(n)].iter().all(|&x| x == 0);
                assert_eq!(
                    same_sectors(&b, i, zero),
                    by_sectors(&b, i, zero),
                    "round {round} n {n} i {i}"
                );
                i += SECTOR;
            }
        }
    }

    #[test]
    fn zero_runs_end_at_the_sector_of_the_first_data_byte() {
        let mut b = vec![0u8; 64 << 10];
        // Data in the middle of sector 70 and in the last byte.
        b[70 * 512 + 300] = 1;
        let n = b.len();
        b[n - 1] = 7;
        // Zeros up to the 4 KiB boundary below sector 70, data up to the
        // boundary above it, then zeros, then the last 4 KiB as data.
        assert_eq!(
            sparse_runs(&b, 0, 4096),
            vec![
                (0, 32768, false),
                (32768, 36864, true),
                (36864, n - 4096, false),
                (n - 4096, n, true),
            ]
        );
    }
}
