//! LUKS1 headers (as QEMU writes them inside qcow2 and as the `luks`
//! image format): decoding with QEMU's sanity checks, unlocking a key slot
//! with a password (PBKDF2, key material, anti-forensic merge, master key
//! digest) and creating a header with one active slot.
//!
//! Hostile headers are bounded: the stripe count must be 4000 (as QEMU
//! requires), key lengths are AES's, and PBKDF2 iteration counts above
//! [`MAX_ITERS`] are refused instead of computed for hours.

use crate::crypto::{random_bytes, CipherMode, HashAlg, IvGen, SectorCipher, SECTOR};
use crate::error::{Error, Result};

pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
pub const HEADER_LEN: usize = 592;
pub const SLOTS: usize = 8;
pub const STRIPES: u32 = 4000;
const SLOT_ENABLED: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;
/// Key material starts after the first 4 KiB (8 sectors).
const HEADER_SECTORS: u32 = 8;
const MIN_ITERS: u64 = 1000;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;
/// Largest PBKDF2 iteration count rimg computes: far above what a
/// 2-second iter-time gives on current machines (about 2^22), far below
/// the hours a hostile u32 count would take.
pub const MAX_ITERS: u32 = 1 << 26;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    pub key_offset_sector: u32,
    pub stripes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    pub cipher_name: String,
    pub cipher_mode: String,
    pub hash_spec: String,
    pub payload_offset_sector: u32,
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_salt: [u8; SALT_LEN],
    pub mk_iterations: u32,
    pub uuid: String,
    pub slots: Vec<KeySlot>,
    // Decoded parameters.
    pub mode: CipherMode,
    pub ivgen: IvGen,
    pub ivhash: Option<HashAlg>,
    pub hash: HashAlg,
}

/// Parameters for a new LUKS header (QEMU's defaults in `Default`).
#[derive(Debug, Clone)]
pub struct LuksParams {
    pub key_bytes: u32,
    pub mode: CipherMode,
    pub ivgen: IvGen,
    pub ivhash: Option<HashAlg>,
    pub hash: HashAlg,
    pub iter_time_ms: u64,
}

impl Default for LuksParams {
    fn default() -> Self {
        LuksParams {
            key_bytes: 32,
            mode: CipherMode::Xts,
            ivgen: IvGen::Plain64,
            ivhash: None,
            hash: HashAlg::Sha256,
            iter_time_ms: 2000,
        }
    }
}

fn bad(m: impl Into<String>) -> Error {
    Error::Crypto(m.into())
}

fn cstr(b: &[u8], what: &str) -> Result<String> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| bad(format!("LUKS header {what} is not NUL terminated")))?;
    Ok(String::from_utf8_lossy(&b[..end]).into_owned())
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

impl LuksHeader {
    /// Key material sectors of one slot, aligned as cryptsetup does.
    pub fn split_key_sectors(key_bytes: u32) -> u32 {
        let s = (key_bytes as u64 * STRIPES as u64).div_ceil(SECTOR) as u32;
        s.div_ceil(HEADER_SECTORS) * HEADER_SECTORS
    }

    /// Bytes of a new header with its key material, for `key_bytes`.
    pub fn area_len(key_bytes: u32) -> u64 {
        (HEADER_SECTORS + SLOTS as u32 * Self::split_key_sectors(key_bytes)) as u64 * SECTOR
    }

    pub fn payload_offset(&self) -> u64 {
        self.payload_offset_sector as u64 * SECTOR
    }

    /// Decodes and sanity-checks a header (QEMU's checks and wording).
    pub fn parse(b: &[u8]) -> Result<LuksHeader> {
        if b.len() < HEADER_LEN || &b[..6] != MAGIC {
            return Err(bad("Volume is not in LUKS format"));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(bad(format!("LUKS version {version} is not supported")));
        }
        let cipher_name = cstr(&b[8..40], "cipher name")?;
        let cipher_mode = cstr(&b[40..72], "cipher mode")?;
        let hash_spec = cstr(&b[72..104], "hash spec")?;
        let mut h = LuksHeader {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset_sector: be32(b, 104),
            key_bytes: be32(b, 108),
            mk_digest: b[112..132].try_into().unwrap(),
            mk_salt: b[132..164].try_into().unwrap(),
            mk_iterations: be32(b, 164),
            uuid: String::from_utf8_lossy(&b[168..208])
                .trim_end_matches('\0')
                .to_string(),
            slots: (0..SLOTS)
                .map(|i| {
                    let o = 208 + i * 48;
                    KeySlot {
                        active: be32(b, o) == SLOT_ENABLED,
                        iterations: be32(b, o + 4),
                        salt: b[o + 8..o + 40].try_into().unwrap(),
                        key_offset_sector: be32(b, o + 40),
                        stripes: be32(b, o + 44),
                    }
                })
                .collect(),
            mode: CipherMode::Xts,
            ivgen: IvGen::Plain64,
            ivhash: None,
            hash: HashAlg::Sha256,
        };
        if h.payload_offset_sector < HEADER_SECTORS {
            return Err(bad("LUKS payload is overlapping with the header"));
        }
        if h.mk_iterations == 0 {
            return Err(bad("LUKS key iteration count is zero"));
        }
        if !matches!(h.key_bytes, 16 | 24 | 32 | 48 | 64) {
            return Err(bad(format!(
                "Algorithm '{}' with key size {} bytes not supported",
                h.cipher_name, h.key_bytes
            )));
        }
        let len = Self::split_key_sectors(h.key_bytes);
        for i in 0..SLOTS {
            let s = &h.slots[i];
            let state = be32(b, 208 + i * 48);
            if s.stripes != STRIPES {
                return Err(bad(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    s.stripes
                )));
            }
            if state != SLOT_ENABLED && state != SLOT_DISABLED {
                return Err(bad(format!(
                    "Keyslot {i} state (active/disable) is corrupted"
                )));
            }
            if s.active && s.iterations == 0 {
                return Err(bad(format!("Keyslot {i} iteration count is zero")));
            }
            if s.key_offset_sector < HEADER_SECTORS {
                return Err(bad(format!(
                    "Keyslot {i} is overlapping with the LUKS header"
                )));
            }
            if s.key_offset_sector as u64 + len as u64 > h.payload_offset_sector as u64 {
                return Err(bad(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                )));
            }
            for j in i + 1..SLOTS {
                let (a, c) = (
                    s.key_offset_sector as u64,
                    h.slots[j].key_offset_sector as u64,
                );
                if a < c + len as u64 && c < a + len as u64 {
                    return Err(bad(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    )));
                }
            }
        }
        h.decode_algorithms()?;
        Ok(h)
    }

    fn decode_algorithms(&mut self) -> Result<()> {
        let spec = self.cipher_mode.clone();
        let (mode, rest) = spec
            .split_once('-')
            .ok_or_else(|| bad(format!("Unexpected cipher mode string format '{spec}'")))?;
        let (ivname, ivhash) = match rest.split_once(':') {
            Some((a, b)) => (a, Some(b)),
            None => (rest, None),
        };
        self.ivhash = match ivhash {
            Some(n) => {
                Some(HashAlg::from_name(n).ok_or_else(|| bad(format!("Unsupported hash '{n}'")))?)
            }
            None => None,
        };
        self.mode = CipherMode::from_name(mode)
            .ok_or_else(|| bad(format!("Unsupported cipher mode '{mode}'")))?;
        if self.cipher_name != "aes" {
            return Err(bad(format!(
                "Unsupported cipher algorithm '{}'",
                self.cipher_name
            )));
        }
        let data_key = if self.mode == CipherMode::Xts {
            self.key_bytes / 2
        } else {
            self.key_bytes
        };
        if !matches!(data_key, 16 | 24 | 32) {
            return Err(bad(format!(
                "No AES cipher with key size {} available",
                self.key_bytes
            )));
        }
        self.hash = HashAlg::from_name(&self.hash_spec)
            .ok_or_else(|| bad(format!("Unsupported hash '{}'", self.hash_spec)))?;
        self.ivgen = IvGen::from_name(ivname)
            .ok_or_else(|| bad(format!("Unsupported IV generator '{ivname}'")))?;
        if self.ivgen == IvGen::Essiv {
            let h = self
                .ivhash
                .ok_or_else(|| bad("Missing IV generator hash specification"))?;
            if !matches!(h.digest_len(), 16 | 24 | 32) {
                return Err(bad(format!(
                    "Hash '{}' has no AES key size for essiv",
                    h.name()
                )));
            }
        }
        Ok(())
    }

    /// "aes-256" and so on, as QEMU's info names the cipher.
    pub fn cipher_alg_name(&self) -> String {
        let bits = if self.mode == CipherMode::Xts {
            self.key_bytes * 4
        } else {
            self.key_bytes * 8
        };
        format!("aes-{bits}")
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        let put =
            |b: &mut [u8], at: usize, s: &str| b[at..at + s.len()].copy_from_slice(s.as_bytes());
        put(&mut b, 8, &self.cipher_name);
        put(&mut b, 40, &self.cipher_mode);
        put(&mut b, 72, &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset_sector.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        put(&mut b, 168, &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = 208 + i * 48;
            let st = if s.active {
                SLOT_ENABLED
            } else {
                SLOT_DISABLED
            };
            b[o..o + 4].copy_from_slice(&st.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_offset_sector.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    fn slot_cipher(&self, key: &[u8]) -> Result<SectorCipher> {
        SectorCipher::new(key, self.mode, self.ivgen, self.ivhash)
    }

    /// The payload cipher for an unlocked master key.
    pub fn payload_cipher(&self, master: &[u8]) -> Result<SectorCipher> {
        self.slot_cipher(master)
    }

    fn check_iters(n: u32) -> Result<()> {
        if n > MAX_ITERS {
            return Err(bad(format!("PBKDF iterations {n} larger than {MAX_ITERS}")));
        }
        Ok(())
    }

    /// Finds the master key with `password`. `read` reads header bytes
    /// (offset relative to the header start).
    pub fn unlock(
        &self,
        password: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Vec<u8>> {
        for i in 0..SLOTS {
            if let Some(master) = self.try_slot(i, password, read)? {
                return Ok(master);
            }
        }
        Err(bad("Invalid password, cannot unlock any keyslot"))
    }

    /// The master key if slot `i` is active and opens with `password`.
    pub fn try_slot(
        &self,
        i: usize,
        password: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Option<Vec<u8>>> {
        let s = &self.slots[i];
        if !s.active {
            return Ok(None);
        }
        Self::check_iters(self.mk_iterations)?;
        Self::check_iters(s.iterations)?;
        let kb = self.key_bytes as usize;
        let mut slot_key = vec![0u8; kb];
        self.hash
            .pbkdf2(password, &s.salt, s.iterations, &mut slot_key);
        let material_len = kb * STRIPES as usize;
        let padded = (material_len as u64).div_ceil(SECTOR) * SECTOR;
        let mut buf = vec![0u8; padded as usize];
        read(s.key_offset_sector as u64 * SECTOR, &mut buf)?;
        self.slot_cipher(&slot_key)?.decrypt(0, &mut buf);
        let master = af_merge(self.hash, &buf[..material_len], kb);
        let mut digest = [0u8; DIGEST_LEN];
        self.hash
            .pbkdf2(&master, &self.mk_salt, self.mk_iterations, &mut digest);
        Ok((digest == self.mk_digest).then_some(master))
    }

    /// Stores `master` in slot `i` under `password` (PBKDF2 iterations
    /// for `iter_time_ms`): returns the key material to write at the
    /// slot's offset; the slot is marked active in `self`.
    pub fn store_key(
        &mut self,
        i: usize,
        password: &[u8],
        master: &[u8],
        iter_time_ms: u64,
    ) -> Result<(u64, Vec<u8>)> {
        let kb = self.key_bytes as usize;
        let rate = self.hash.iters_per_second(kb);
        let n = rate.saturating_mul(iter_time_ms) / 1000;
        if n > u32::MAX as u64 {
            return Err(bad(format!(
                "PBKDF iterations {n} larger than {}",
                u32::MAX
            )));
        }
        let iters = n.max(MIN_ITERS) as u32;
        let mut salt = [0u8; SALT_LEN];
        random_bytes(&mut salt)?;
        let mut material = af_split(self.hash, master)?;
        material.resize(
            Self::split_key_sectors(self.key_bytes) as usize * SECTOR as usize,
            0,
        );
        let mut slot_key = vec![0u8; kb];
        self.hash.pbkdf2(password, &salt, iters, &mut slot_key);
        self.slot_cipher(&slot_key)?.encrypt(0, &mut material);
        let s = &mut self.slots[i];
        s.active = true;
        s.iterations = iters;
        s.salt = salt;
        Ok((s.key_offset_sector as u64 * SECTOR, material))
    }

    /// Marks slot `i` inactive: returns random bytes to write over its
    /// key material.
    pub fn erase_key(&mut self, i: usize) -> Result<(u64, Vec<u8>)> {
        let mut garbage =
            vec![0u8; Self::split_key_sectors(self.key_bytes) as usize * SECTOR as usize];
        random_bytes(&mut garbage)?;
        let s = &mut self.slots[i];
        s.active = false;
        s.iterations = 0;
        s.salt = [0; SALT_LEN];
        Ok((s.key_offset_sector as u64 * SECTOR, garbage))
    }

    /// Creates a header with slot 0 holding a new random master key
    /// under `password`. Returns the header, the key material region
    /// (from offset 0 of the header area up to the payload, header
    /// included) and the master key.
    pub fn create(p: &LuksParams, password: &[u8]) -> Result<(LuksHeader, Vec<u8>, Vec<u8>)> {
        let kb = p.key_bytes as usize;
        let mut master = vec![0u8; kb];
        random_bytes(&mut master)?;
        let mut mk_salt = [0u8; SALT_LEN];
        random_bytes(&mut mk_salt)?;
        let mut slot_salt = [0u8; SALT_LEN];
        random_bytes(&mut slot_salt)?;
        let mut u = [0u8; 16];
        random_bytes(&mut u)?;
        u[6] = (u[6] & 0x0f) | 0x40;
        u[8] = (u[8] & 0x3f) | 0x80;
        let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        );
        let rate = p.hash.iters_per_second(kb);
        let scaled = |div: u64| -> Result<u32> {
            let n = rate.saturating_mul(p.iter_time_ms) / 1000 / div;
            if n > u32::MAX as u64 {
                return Err(bad(format!(
                    "PBKDF iterations {n} larger than {}",
                    u32::MAX
                )));
            }
            Ok(n.max(MIN_ITERS) as u32)
        };
        let mk_iterations = scaled(8)?;
        let slot_iters = scaled(1)?;
        let mut mk_digest = [0u8; DIGEST_LEN];
        p.hash
            .pbkdf2(&master, &mk_salt, mk_iterations, &mut mk_digest);
        let split = Self::split_key_sectors(p.key_bytes);
        let slots = (0..SLOTS as u32)
            .map(|i| KeySlot {
                active: i == 0,
                iterations: if i == 0 { slot_iters } else { 0 },
                salt: if i == 0 { slot_salt } else { [0; SALT_LEN] },
                key_offset_sector: HEADER_SECTORS + i * split,
                stripes: STRIPES,
            })
            .collect();
        let mode = match (p.ivgen, p.ivhash) {
            (IvGen::Essiv, Some(h)) => format!("{}-essiv:{}", p.mode.name(), h.name()),
            (g, _) => format!("{}-{}", p.mode.name(), g.name()),
        };
        let h = LuksHeader {
            cipher_name: "aes".into(),
            cipher_mode: mode,
            hash_spec: p.hash.name().into(),
            payload_offset_sector: HEADER_SECTORS + SLOTS as u32 * split,
            key_bytes: p.key_bytes,
            mk_digest,
            mk_salt,
            mk_iterations,
            uuid,
            slots,
            mode: p.mode,
            ivgen: p.ivgen,
            ivhash: p.ivhash,
            hash: p.hash,
        };
        let mut area = vec![0u8; h.payload_offset() as usize];
        area[..HEADER_LEN].copy_from_slice(&h.encode());
        let mut material = af_split(p.hash, &master)?;
        material.resize(split as usize * SECTOR as usize, 0);
        let mut slot_key = vec![0u8; kb];
        p.hash
            .pbkdf2(password, &slot_salt, slot_iters, &mut slot_key);
        h.slot_cipher(&slot_key)?.encrypt(0, &mut material);
        let at = HEADER_SECTORS as usize * SECTOR as usize;
        area[at..at + material.len()].copy_from_slice(&material);
        Ok((h, area, master))
    }
}

/// The anti-forensic diffuser: each digest-sized piece of `block` becomes
/// hash(be32(index) || piece), truncated to the piece.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let dl = hash.digest_len();
    for (i, piece) in block.chunks_mut(dl).enumerate() {
        let d = hash.hash(&[&(i as u32).to_be_bytes(), piece]);
        let n = piece.len();
        piece.copy_from_slice(&d[..n]);
    }
}

fn af_merge(hash: HashAlg, material: &[u8], kb: usize) -> Vec<u8> {
    let mut d = vec![0u8; kb];
    let stripes = material.len() / kb;
    for (i, s) in material.chunks_exact(kb).enumerate() {
        d.iter_mut().zip(s).for_each(|(x, y)| *x ^= y);
        if i + 1 < stripes {
            diffuse(hash, &mut d);
        }
    }
    d
}

fn af_split(hash: HashAlg, master: &[u8]) -> Result<Vec<u8>> {
    let kb = master.len();
    let mut out = vec![0u8; kb * STRIPES as usize];
    random_bytes(&mut out[..kb * (STRIPES as usize - 1)])?;
    let mut d = vec![0u8; kb];
    for s in out.chunks_exact(kb).take(STRIPES as usize - 1) {
        d.iter_mut().zip(s).for_each(|(x, y)| *x ^= y);
        diffuse(hash, &mut d);
    }
    let last = &mut out[kb * (STRIPES as usize - 1)..];
    last.iter_mut()
        .zip(master.iter().zip(&d))
        .for_each(|(x, (m, y))| *x = m ^ y);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_unlock() {
        let p = LuksParams {
            iter_time_ms: 1,
            ..Default::default()
        };
        let (h, area, master) = LuksHeader::create(&p, b"pw").unwrap();
        let h2 = LuksHeader::parse(&area).unwrap();
        assert_eq!(h, h2);
        let mut rd = |off: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&area[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        assert_eq!(h2.unlock(b"pw", &mut rd).unwrap(), master);
        assert!(h2.unlock(b"nope", &mut rd).is_err());
    }

    #[test]
    fn hostile_iterations_are_refused() {
        let p = LuksParams {
            iter_time_ms: 1,
            ..Default::default()
        };
        let (mut h, area, _) = LuksHeader::create(&p, b"pw").unwrap();
        h.slots[0].iterations = u32::MAX;
        let mut rd = |off: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&area[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        assert!(h.unlock(b"pw", &mut rd).is_err());
    }
}
