//! Sector ciphers for encrypted images: AES in XTS, CBC or ECB mode with
//! the plain, plain64 or ESSIV IV generators (the set LUKS names and
//! QEMU's legacy qcow2 AES uses), PBKDF2 and the hashes LUKS names.
//!
//! Sectors are 512 bytes; the sector number that seeds the IV is chosen
//! by the caller (qcow2 LUKS: host offset / 512; legacy AES: guest offset
//! / 512).

use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use sha2::Digest;

use crate::error::{Error, Result};

pub const SECTOR: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }
    pub fn from_name(s: &str) -> Option<HashAlg> {
        Some(match s {
            "sha1" => HashAlg::Sha1,
            "sha224" => HashAlg::Sha224,
            "sha256" => HashAlg::Sha256,
            "sha384" => HashAlg::Sha384,
            "sha512" => HashAlg::Sha512,
            _ => return None,
        })
    }
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }
    /// Hash of the concatenation of `parts`.
    pub fn hash(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            HashAlg::Sha1 => run::<sha1::Sha1>(parts),
            HashAlg::Sha224 => run::<sha2::Sha224>(parts),
            HashAlg::Sha256 => run::<sha2::Sha256>(parts),
            HashAlg::Sha384 => run::<sha2::Sha384>(parts),
            HashAlg::Sha512 => run::<sha2::Sha512>(parts),
        }
    }
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iters: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Sha1 => pbkdf2_hmac::<sha1::Sha1>(password, salt, iters, out),
            HashAlg::Sha224 => pbkdf2_hmac::<sha2::Sha224>(password, salt, iters, out),
            HashAlg::Sha256 => pbkdf2_hmac::<sha2::Sha256>(password, salt, iters, out),
            HashAlg::Sha384 => pbkdf2_hmac::<sha2::Sha384>(password, salt, iters, out),
            HashAlg::Sha512 => pbkdf2_hmac::<sha2::Sha512>(password, salt, iters, out),
        }
    }
    /// PBKDF2 iterations this machine does per second with this hash
    /// (QEMU's qcrypto_pbkdf2_count_iters, measured the same way: time a
    /// fixed batch and scale).
    pub fn iters_per_second(self, key_len: usize) -> u64 {
        let mut out = vec![0u8; key_len];
        let mut iters = 1u32 << 14;
        loop {
            let t = std::time::Instant::now();
            self.pbkdf2(b"rimg-calibration", &[0u8; 32], iters, &mut out);
            let ms = t.elapsed().as_millis() as u64;
            if ms >= 100 || iters >= 1 << 26 {
                return (iters as u64 * 1000) / ms.max(1);
            }
            iters *= 4;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    Xts,
    Cbc,
    Ecb,
}

impl CipherMode {
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Xts => "xts",
            CipherMode::Cbc => "cbc",
            CipherMode::Ecb => "ecb",
        }
    }
    pub fn from_name(s: &str) -> Option<CipherMode> {
        Some(match s {
            "xts" => CipherMode::Xts,
            "cbc" => CipherMode::Cbc,
            "ecb" => CipherMode::Ecb,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGen {
    Plain,
    Plain64,
    Essiv,
}

impl IvGen {
    pub fn name(self) -> &'static str {
        match self {
            IvGen::Plain => "plain",
            IvGen::Plain64 => "plain64",
            IvGen::Essiv => "essiv",
        }
    }
    pub fn from_name(s: &str) -> Option<IvGen> {
        Some(match s {
            "plain" => IvGen::Plain,
            "plain64" => IvGen::Plain64,
            "essiv" => IvGen::Essiv,
            _ => return None,
        })
    }
}

/// AES with a 128, 192 or 256-bit key.
#[derive(Clone)]
enum Aes {
    A128(aes::Aes128),
    A192(aes::Aes192),
    A256(aes::Aes256),
}

impl Aes {
    fn new(key: &[u8]) -> Result<Aes> {
        let bad = |_| Error::InvalidArgument(format!("bad AES key length {}", key.len()));
        Ok(match key.len() {
            16 => Aes::A128(aes::Aes128::new_from_slice(key).map_err(bad)?),
            24 => Aes::A192(aes::Aes192::new_from_slice(key).map_err(bad)?),
            32 => Aes::A256(aes::Aes256::new_from_slice(key).map_err(bad)?),
            n => return Err(Error::InvalidArgument(format!("bad AES key length {n}"))),
        })
    }
    fn enc(&self, b: &mut [u8]) {
        let blk: &mut aes::Block = b.try_into().expect("16-byte block");
        match self {
            Aes::A128(c) => c.encrypt_block(blk),
            Aes::A192(c) => c.encrypt_block(blk),
            Aes::A256(c) => c.encrypt_block(blk),
        }
    }
    fn dec(&self, b: &mut [u8]) {
        let blk: &mut aes::Block = b.try_into().expect("16-byte block");
        match self {
            Aes::A128(c) => c.decrypt_block(blk),
            Aes::A192(c) => c.decrypt_block(blk),
            Aes::A256(c) => c.decrypt_block(blk),
        }
    }
}

/// Multiplies the XTS tweak by alpha in GF(2^128) (little-endian).
fn xts_next(t: &mut [u8; 16]) {
    let mut carry = 0u8;
    for b in t.iter_mut() {
        let c = *b >> 7;
        *b = (*b << 1) | carry;
        carry = c;
    }
    if carry != 0 {
        t[0] ^= 0x87;
    }
}

/// A keyed sector cipher: cipher, mode and IV generator.
#[derive(Clone)]
pub struct SectorCipher {
    mode: CipherMode,
    ivgen: IvGen,
    data: Aes,
    /// XTS: the tweak key.
    tweak: Option<Aes>,
    /// ESSIV: the IV key (XTS with ESSIV has both).
    essiv: Option<Aes>,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SectorCipher({:?}, {:?})", self.mode, self.ivgen)
    }
}

impl SectorCipher {
    /// `key` is the whole master key (for XTS both halves).
    pub fn new(
        key: &[u8],
        mode: CipherMode,
        ivgen: IvGen,
        ivhash: Option<HashAlg>,
    ) -> Result<SectorCipher> {
        let (data, tweak) = if mode == CipherMode::Xts {
            if !key.len().is_multiple_of(2) {
                return Err(Error::InvalidArgument("odd XTS key length".into()));
            }
            let (a, b) = key.split_at(key.len() / 2);
            (Aes::new(a)?, Some(Aes::new(b)?))
        } else {
            (Aes::new(key)?, None)
        };
        let essiv = if ivgen == IvGen::Essiv {
            let h = ivhash.ok_or_else(|| Error::InvalidArgument("essiv needs a hash".into()))?;
            Some(Aes::new(&h.hash(&[key]))?)
        } else {
            None
        };
        Ok(SectorCipher {
            mode,
            ivgen,
            data,
            tweak,
            essiv,
        })
    }

    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                if let Some(k) = &self.essiv {
                    k.enc(&mut iv);
                }
            }
        }
        iv
    }

    /// Encrypts `buf` (a multiple of 512 bytes) in place, its first sector
    /// numbered `sector`.
    pub fn encrypt(&self, sector: u64, buf: &mut [u8]) {
        for (i, s) in buf.chunks_exact_mut(SECTOR as usize).enumerate() {
            self.sector(sector + i as u64, s, true);
        }
    }

    pub fn decrypt(&self, sector: u64, buf: &mut [u8]) {
        for (i, s) in buf.chunks_exact_mut(SECTOR as usize).enumerate() {
            self.sector(sector + i as u64, s, false);
        }
    }

    fn sector(&self, n: u64, s: &mut [u8], enc: bool) {
        let iv = self.iv(n);
        match self.mode {
            CipherMode::Ecb => {
                for b in s.chunks_exact_mut(16) {
                    if enc {
                        self.data.enc(b)
                    } else {
                        self.data.dec(b)
                    }
                }
            }
            CipherMode::Cbc => {
                let mut prev = iv;
                for b in s.chunks_exact_mut(16) {
                    if enc {
                        b.iter_mut().zip(prev).for_each(|(x, p)| *x ^= p);
                        self.data.enc(b);
                        prev.copy_from_slice(b);
                    } else {
                        let c: [u8; 16] = (&*b).try_into().unwrap();
                        self.data.dec(b);
                        b.iter_mut().zip(prev).for_each(|(x, p)| *x ^= p);
                        prev = c;
                    }
                }
            }
            CipherMode::Xts => {
                let mut t = iv;
                if let Some(k) = &self.tweak {
                    k.enc(&mut t);
                }
                for b in s.chunks_exact_mut(16) {
                    b.iter_mut().zip(t).for_each(|(x, p)| *x ^= p);
                    if enc {
                        self.data.enc(b)
                    } else {
                        self.data.dec(b)
                    }
                    b.iter_mut().zip(t).for_each(|(x, p)| *x ^= p);
                    xts_next(&mut t);
                }
            }
        }
    }
}

/// Random bytes from the kernel.
pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("getrandom", e));
        }
        done += n as usize;
    }
    Ok(())
}

/// Legacy qcow2 AES (crypt_method 1): AES-128-CBC with plain64 IVs, the
/// key the password's first 16 bytes, zero padded.
pub fn legacy_aes(password: &[u8]) -> SectorCipher {
    let mut key = [0u8; 16];
    let n = password.len().min(16);
    key[..n].copy_from_slice(&password[..n]);
    SectorCipher::new(&key, CipherMode::Cbc, IvGen::Plain64, None).expect("16-byte key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xts_round_trips_and_depends_on_sector() {
        let key = [7u8; 64];
        let c = SectorCipher::new(&key, CipherMode::Xts, IvGen::Plain64, None).unwrap();
        let mut a = vec![0x5au8; 1024];
        c.encrypt(3, &mut a);
        assert_ne!(a[..512], a[512..]);
        c.decrypt(3, &mut a);
        assert!(a.iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn cbc_essiv_round_trips() {
        let c = SectorCipher::new(
            &[1u8; 32],
            CipherMode::Cbc,
            IvGen::Essiv,
            Some(HashAlg::Sha256),
        )
        .unwrap();
        let mut a = vec![9u8; 512];
        c.encrypt(1, &mut a);
        c.decrypt(1, &mut a);
        assert!(a.iter().all(|&b| b == 9));
    }
}
