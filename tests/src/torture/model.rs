//! The verifying client's model of the disk, per 512-byte sector.
//!
//! Every write fills each sector with content derived from (write id,
//! sector number), so a sector read back names the write it came from.
//! A sector's value is one of: [`ZERO`], [`INITIAL`] (what the image held
//! before the run, see [`Initial`]) or a write id.
//!
//! Concurrency: requests are timestamped with a logical clock at
//! submission (before the frontend sees them) and at completion (after
//! the client saw the completion), so each recorded interval contains the
//! real one. A sector keeps the set of completed writes that may be its
//! latest: a completed write drops every candidate that completed before
//! it was submitted (those are certainly older) and keeps the ones that
//! overlapped it in time (either order is allowed). A read may return any
//! candidate present when it was submitted, or any write in flight at
//! some point during the read. A sector with several acceptable values
//! may also mix them byte by byte (requests racing on it have no
//! atomicity). Nothing looser is accepted.

use std::collections::HashMap;

pub const SECTOR: u64 = 512;
/// The sector reads as zeros (write-zeroes, discard, never written).
pub const ZERO: u64 = 0;
/// The sector holds what the image held before the run.
pub const INITIAL: u64 = 1;

/// The image's content before the run: sector ranges filled with one byte
/// each, later entries overriding earlier ones; the rest is zeros.
#[derive(Debug, Clone, Default)]
pub struct Initial {
    pub fills: Vec<(u64, u64, u8)>,
}

impl Initial {
    /// The byte every byte of `sector` holds initially.
    pub fn byte(&self, sector: u64) -> u8 {
        let off = sector * SECTOR;
        self.fills
            .iter()
            .rev()
            .find(|&&(s, e, _)| off >= s && off < e)
            .map_or(0, |&(_, _, b)| b)
    }
}

/// The content a write `id` puts in `sector`: 8 bytes id, 8 bytes sector,
/// then a pseudo-random fill from both.
pub fn fill_sector(id: u64, sector: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&id.to_le_bytes());
    out[8..16].copy_from_slice(&sector.to_le_bytes());
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ sector.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    for c in out[16..].chunks_mut(8) {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        c.copy_from_slice(&z.to_le_bytes()[..c.len()]);
    }
}

/// A candidate value and the clock at which its write completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cand {
    v: u64,
    t: u64,
}

/// A write-like request in flight: sectors [s, e) get value v.
#[derive(Debug, Clone)]
struct InWrite {
    s: u64,
    e: u64,
    v: u64,
    t: u64,
}

/// A read in flight: the candidates of its sectors when submitted
/// (flattened, `idx[i]..idx[i+1]` for sector s+i) and the writes that
/// were in flight at some point since.
#[derive(Debug)]
struct InRead {
    s: u64,
    e: u64,
    snap: Vec<u64>,
    idx: Vec<u32>,
    racing: Vec<(u64, u64, u64)>,
}

/// One sector that read back wrong.
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub sector: u64,
    pub allowed: Vec<u64>,
    /// What the sector holds: a write id and the sector it was meant for
    /// when the header parses as one, else the first bytes.
    pub found: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.allowed.iter().map(|&v| value_name(v)).collect();
        write!(
            f,
            "sector {} (byte {:#x}): allowed [{}], found {}",
            self.sector,
            self.sector * SECTOR,
            names.join(", "),
            self.found
        )
    }
}

pub fn value_name(v: u64) -> String {
    match v {
        ZERO => "zeros".into(),
        INITIAL => "initial".into(),
        w => format!("write#{w}"),
    }
}

pub struct Model {
    first: Vec<Cand>,
    /// Further candidates of sectors that have more than one.
    more: HashMap<u64, Vec<Cand>>,
    clock: u64,
    next_id: u64,
    writes: HashMap<u64, InWrite>,
    reads: HashMap<u64, InRead>,
    pub initial: Initial,
}

impl Model {
    pub fn new(sectors: u64, initial: Initial) -> Model {
        Model {
            first: vec![Cand { v: INITIAL, t: 0 }; sectors as usize],
            more: HashMap::new(),
            clock: 1,
            next_id: 2,
            writes: HashMap::new(),
            reads: HashMap::new(),
            initial,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// A fresh id for a request (also the value a data write stores).
    pub fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn cands(&self, s: u64) -> impl Iterator<Item = &Cand> {
        std::iter::once(&self.first[s as usize]).chain(self.more.get(&s).into_iter().flatten())
    }

    /// Registers a request that sets sectors [s, e) to `v` (a data write
    /// with v = id, or zeroing with v = ZERO); call before submitting it.
    pub fn write_submitted(&mut self, id: u64, s: u64, e: u64, v: u64) {
        let t = self.tick();
        for r in self.reads.values_mut() {
            if r.s < e && s < r.e {
                r.racing.push((s.max(r.s), e.min(r.e), v));
            }
        }
        self.writes.insert(id, InWrite { s, e, v, t });
    }

    /// The write `id` completed successfully (a discard that zeroes
    /// nothing was never registered: nothing to do).
    pub fn write_completed(&mut self, id: u64) {
        let Some(w) = self.writes.remove(&id) else {
            return;
        };
        let t = self.tick();
        for s in w.s..w.e {
            let new = Cand { v: w.v, t };
            let mut keep: Vec<Cand> = self
                .cands(s)
                .copied()
                .filter(|c| c.t > w.t && c.v != w.v)
                .collect();
            self.first[s as usize] = new;
            if keep.is_empty() {
                self.more.remove(&s);
            } else {
                keep.dedup_by_key(|c| c.v);
                self.more.insert(s, keep);
            }
        }
    }

    /// Registers a read of sectors [s, e); call before submitting it.
    pub fn read_submitted(&mut self, id: u64, s: u64, e: u64) {
        self.tick();
        let mut snap = Vec::with_capacity((e - s) as usize);
        let mut idx = Vec::with_capacity((e - s) as usize + 1);
        for sec in s..e {
            idx.push(snap.len() as u32);
            snap.extend(self.cands(sec).map(|c| c.v));
        }
        idx.push(snap.len() as u32);
        let racing = self
            .writes
            .values()
            .filter(|w| w.s < e && s < w.e)
            .map(|w| (w.s.max(s), w.e.min(e), w.v))
            .collect();
        self.reads.insert(
            id,
            InRead {
                s,
                e,
                snap,
                idx,
                racing,
            },
        );
    }

    /// The read `id` completed with `data`: every sector is checked. A
    /// sector no write raced with is pinned to the value it showed.
    pub fn read_completed(&mut self, id: u64, data: &[u8]) -> Vec<Mismatch> {
        let r = self.reads.remove(&id).expect("unknown read");
        let mut bad = Vec::new();
        let mut buf = [0u8; SECTOR as usize];
        for (i, sec) in (r.s..r.e).enumerate() {
            let got = &data[i * SECTOR as usize..(i + 1) * SECTOR as usize];
            let mut allowed: Vec<u64> = r.snap[r.idx[i] as usize..r.idx[i + 1] as usize].to_vec();
            let raced = r.racing.iter().any(|&(a, b, _)| sec >= a && sec < b);
            for &(a, b, v) in &r.racing {
                if sec >= a && sec < b && !allowed.contains(&v) {
                    allowed.push(v);
                }
            }
            match self.identify(sec, got, &allowed, &mut buf) {
                Some(v) if !raced && allowed.len() > 1 => {
                    // Nothing changed the sector during the read: it now
                    // holds exactly what was seen.
                    let c = self.cands(sec).copied().find(|c| c.v == v).unwrap();
                    self.first[sec as usize] = c;
                    self.more.remove(&sec);
                }
                Some(_) => {}
                None if allowed.len() > 1 && self.bytewise(sec, got, &allowed) => {}
                None => bad.push(mismatch(sec, got, allowed)),
            }
        }
        bad
    }

    /// Which of `allowed` the sector content `got` is, if any.
    fn identify(&self, sec: u64, got: &[u8], allowed: &[u64], buf: &mut [u8]) -> Option<u64> {
        let id = u64::from_le_bytes(got[..8].try_into().unwrap());
        let s = u64::from_le_bytes(got[8..16].try_into().unwrap());
        if id >= 2 && s == sec && allowed.contains(&id) {
            fill_sector(id, sec, buf);
            if got == buf {
                return Some(id);
            }
        }
        let ib = self.initial.byte(sec);
        if allowed.contains(&INITIAL) && got.iter().all(|&b| b == ib) {
            return Some(INITIAL);
        }
        if allowed.contains(&ZERO) && got.iter().all(|&b| b == 0) {
            return Some(ZERO);
        }
        None
    }

    /// Whether every byte of `got` is that byte of one of `allowed`: what
    /// requests that overlapped in time may leave (neither the page cache
    /// nor virtio makes a sector atomic against a racing request).
    fn bytewise(&self, sec: u64, got: &[u8], allowed: &[u64]) -> bool {
        let vals: Vec<Vec<u8>> = allowed
            .iter()
            .map(|&v| {
                let mut b = vec![0u8; SECTOR as usize];
                match v {
                    ZERO => {}
                    INITIAL => b.fill(self.initial.byte(sec)),
                    w => fill_sector(w, sec, &mut b),
                }
                b
            })
            .collect();
        got.iter()
            .enumerate()
            .all(|(i, &g)| vals.iter().any(|v| v[i] == g))
    }

    /// A request that never completed (its daemon went away, or it
    /// failed during shutdown): its writes may or may not have landed.
    pub fn abandon(&mut self, id: u64) {
        if let Some(w) = self.writes.remove(&id) {
            for s in w.s..w.e {
                let c = Cand {
                    v: w.v,
                    t: u64::MAX,
                };
                if !self.cands(s).any(|x| x.v == w.v) {
                    self.more.entry(s).or_default().push(c);
                }
            }
        }
        self.reads.remove(&id);
    }

    /// Checks the final content of sectors [s, s + data.len()/512) (read
    /// after the daemon exited).
    pub fn check_final(&self, s: u64, data: &[u8]) -> Vec<Mismatch> {
        assert!(self.writes.is_empty() && self.reads.is_empty());
        let mut bad = Vec::new();
        let mut buf = [0u8; SECTOR as usize];
        for (i, got) in data.chunks(SECTOR as usize).enumerate() {
            let sec = s + i as u64;
            let allowed: Vec<u64> = self.cands(sec).map(|c| c.v).collect();
            if self.identify(sec, got, &allowed, &mut buf).is_none()
                && !(allowed.len() > 1 && self.bytewise(sec, got, &allowed))
            {
                bad.push(mismatch(sec, got, allowed));
            }
        }
        bad
    }

    /// Sectors whose value is not pinned down to one candidate.
    pub fn ambiguous(&self) -> usize {
        self.more.len()
    }

    pub fn in_flight(&self) -> usize {
        self.writes.len() + self.reads.len()
    }
}

fn mismatch(sector: u64, got: &[u8], allowed: Vec<u64>) -> Mismatch {
    let id = u64::from_le_bytes(got[..8].try_into().unwrap());
    let s = u64::from_le_bytes(got[8..16].try_into().unwrap());
    let found = if got.iter().all(|&b| b == got[0]) {
        format!("512 bytes of {:#04x}", got[0])
    } else if (2..1 << 40).contains(&id) && s < 1 << 40 {
        let mut want = [0u8; SECTOR as usize];
        fill_sector(id, s, &mut want);
        let intact = if want == got { "intact" } else { "damaged" };
        format!("write#{id}'s data for sector {s} ({intact})")
    } else {
        format!("bytes {:02x?}..", &got[..16])
    };
    Mismatch {
        sector,
        allowed,
        found,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(id: u64, s: u64, n: u64) -> Vec<u8> {
        let mut v = vec![0u8; (n * SECTOR) as usize];
        for i in 0..n {
            fill_sector(
                id,
                s + i,
                &mut v[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize],
            );
        }
        v
    }

    #[test]
    fn sequential_writes_supersede_and_overlapping_ones_both_count() {
        let mut m = Model::new(8, Initial::default());
        let a = m.new_id();
        m.write_submitted(a, 0, 4, a);
        m.write_completed(a);
        let b = m.new_id();
        m.write_submitted(b, 2, 6, b);
        let c = m.new_id();
        m.write_submitted(c, 3, 4, c);
        m.write_completed(b);
        m.write_completed(c);
        let r = m.new_id();
        m.read_submitted(r, 0, 8);
        let mut got = data(a, 0, 8);
        got[2 * 512..6 * 512].copy_from_slice(&data(b, 2, 4));
        got[6 * 512..].fill(0);
        // Sector 3 may be b or c; a would be stale.
        assert!(m.read_completed(r, &got).is_empty());
        let r = m.new_id();
        m.read_submitted(r, 0, 8);
        got[2 * 512..3 * 512].copy_from_slice(&data(a, 2, 1));
        let bad = m.read_completed(r, &got);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].sector, 2);
        // The first read pinned sector 3 to b: c is no longer accepted.
        let r = m.new_id();
        m.read_submitted(r, 3, 4);
        assert_eq!(m.read_completed(r, &data(c, 3, 1)).len(), 1);
    }
}
