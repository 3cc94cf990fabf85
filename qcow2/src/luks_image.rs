//! The `luks` image format (QEMU's block/crypto.c): a LUKS1 header and
//! key material, then the encrypted payload. Guest offset `g` lives at
//! file offset `payload + g`; each 512-byte sector is encrypted with the
//! header's cipher, its IV seeded by the guest sector number `g / 512`
//! (unlike LUKS inside qcow2, which uses the host offset).
//!
//! Requests that do not cover whole sectors read, modify and write back
//! the sectors at their edges; those read-modify-writes exclude every
//! other write for their duration so that no concurrent write to the same
//! sector is lost (QEMU serialises such requests the same way).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::crypto::{SectorCipher, SECTOR};
use crate::datapath::{Mapping, PendingWrite};
use crate::encrypt::Secret;
use crate::error::{Error, Result};
use crate::image::{Extent, ExtentKind, Format, Image};
use crate::luks::{LuksHeader, HEADER_LEN};
use crate::storage::Storage;
use crate::sync::AllocWaker;

/// Bytes encrypted per step of a large request (bounds the bounce buffer).
const CHUNK: u64 = 1 << 20;

#[derive(Debug)]
pub struct LuksImage {
    st: Storage,
    header: LuksHeader,
    payload: u64,
    size: AtomicU64,
    /// None when opened without a key (metadata only, as qemu-img info).
    cipher: Option<SectorCipher>,
    /// Writers of whole sectors share it; a read-modify-write of partial
    /// sectors holds it alone.
    rmw: RwLock<()>,
}

fn crypto(m: impl Into<String>) -> Error {
    Error::Crypto(m.into())
}

/// Whether `b` (the first bytes of a file) starts a LUKS header.
pub fn is_luks(b: &[u8]) -> bool {
    b.starts_with(crate::luks::MAGIC)
}

impl LuksImage {
    /// Opens a LUKS volume. Without `key`, `no_io` opens it for its
    /// metadata only (qemu-img info needs no password); otherwise a key
    /// is required (QEMU's wording: `key-secret` is the option's name).
    pub fn open(st: Storage, key: Option<&Secret>, no_io: bool) -> Result<LuksImage> {
        let mut b = vec![0u8; HEADER_LEN];
        st.read_at(&mut b, 0)?;
        let header = LuksHeader::parse(&b)?;
        let cipher = match key {
            Some(k) => {
                let mut read = |at: u64, buf: &mut [u8]| st.read_at(buf, at);
                let master = header.unlock(&k.0, &mut read)?;
                Some(header.payload_cipher(&master)?)
            }
            None if no_io => None,
            None => return Err(crypto("Parameter 'key-secret' is required for cipher")),
        };
        let payload = header.payload_offset();
        let len = st.len()?;
        if len < payload {
            // QEMU's getlength fails with EIO when the payload starts past
            // the end of the file.
            return Err(crypto(
                "Could not refresh total sector count: Input/output error",
            ));
        }
        Ok(LuksImage {
            st,
            header,
            payload,
            // A payload that ends in a partial sector is a whole sector
            // long (QEMU counts the length in sectors, rounding up).
            size: AtomicU64::new((len - payload).next_multiple_of(SECTOR)),
            cipher,
            rmw: RwLock::new(()),
        })
    }

    pub fn header(&self) -> &LuksHeader {
        &self.header
    }

    pub fn payload_offset(&self) -> u64 {
        self.payload
    }

    fn cipher(&self) -> Result<&SectorCipher> {
        self.cipher
            .as_ref()
            .ok_or_else(|| crypto("Parameter 'key-secret' is required for cipher"))
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        crate::image::check_range(off, len, self.size())
    }

    fn check_writable(&self) -> Result<()> {
        if !self.st.writable() {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Reads and decrypts whole sectors at sector-aligned guest `off`.
    fn read_sectors(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let c = self.cipher()?;
        self.st.read_at(buf, self.payload + off)?;
        c.decrypt(off / SECTOR, buf);
        Ok(())
    }

    /// Encrypts `buf` (whole sectors, clobbered) and writes it at
    /// sector-aligned guest `off`.
    fn write_sectors(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.cipher()?.encrypt(off / SECTOR, buf);
        self.st.write_data_at(buf, self.payload + off)
    }

    /// Writes `len` bytes at `off`, taken from `src(pos, piece)` which
    /// fills `piece` with the bytes at request position `pos`.
    fn write_with(&self, off: u64, len: u64, src: &dyn Fn(u64, &mut [u8])) -> Result<()> {
        self.check_range(off, len)?;
        self.check_writable()?;
        self.cipher()?;
        if len == 0 {
            return Ok(());
        }
        let start = off - off % SECTOR;
        let end = (off + len).next_multiple_of(SECTOR);
        let partial = start != off || end != off + len;
        let (_shared, _alone);
        if partial {
            _alone = self.rmw.write().unwrap_or_else(|e| e.into_inner());
        } else {
            _shared = self.rmw.read().unwrap_or_else(|e| e.into_inner());
        }
        let mut at = start;
        // Page-aligned: a kill cuts a write only between sectors (a cut
        // encrypted sector would decrypt to noise; `crate::pagebuf`).
        let mut buf = crate::pagebuf::PageBuf::new();
        while at < end {
            let n = (end - at).min(CHUNK);
            buf.resize(n as usize);
            // Edge sectors keep the bytes the request does not cover.
            let head_partial = at < off;
            let tail_partial = at + n > off + len;
            if head_partial || tail_partial {
                self.read_sectors(&mut buf, at)?;
            }
            let lo = off.max(at);
            let hi = (off + len).min(at + n);
            src(lo - off, &mut buf[(lo - at) as usize..(hi - at) as usize]);
            self.write_sectors(&mut buf, at)?;
            at += n;
        }
        Ok(())
    }
}

impl Image for LuksImage {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn format(&self) -> Format {
        Format::Luks
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn path(&self) -> &Path {
        self.st.path()
    }
    fn is_writable(&self) -> bool {
        self.st.writable()
    }
    fn backing(&self) -> Option<&Arc<dyn Image>> {
        None
    }
    fn storage(&self) -> &Storage {
        &self.st
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range(off, len)?;
        self.cipher()?;
        let start = off - off % SECTOR;
        let end = (off + len).next_multiple_of(SECTOR);
        if start == off && end == off + len {
            for (i, piece) in buf.chunks_mut(CHUNK as usize).enumerate() {
                self.read_sectors(piece, off + i as u64 * CHUNK)?;
            }
            return Ok(());
        }
        let mut tmp = Vec::new();
        let mut at = start;
        while at < end {
            let n = (end - at).min(CHUNK);
            tmp.resize(n as usize, 0);
            self.read_sectors(&mut tmp, at)?;
            let lo = off.max(at);
            let hi = (off + len).min(at + n);
            buf[(lo - off) as usize..(hi - off) as usize]
                .copy_from_slice(&tmp[(lo - at) as usize..(hi - at) as usize]);
            at += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.write_with(off, buf.len() as u64, &|pos, piece| {
            piece.copy_from_slice(&buf[pos as usize..pos as usize + piece.len()])
        })
    }

    // The split data path: every byte of the payload is encrypted, so no
    // host range can be handed to a caller that moves data itself.
    fn data_in_clear(&self) -> bool {
        false
    }
    fn map_read(&self, _off: u64, _len: u64) -> Result<(Mapping, u64)> {
        Err(Error::NotSupportedByFormat(
            "Direct access to encrypted data",
        ))
    }
    fn read_mapped(&self, _mapping: Mapping, buf: &mut [u8], off: u64) -> Result<()> {
        self.read_at(buf, off)
    }
    fn begin_write(self: Arc<Self>, _off: u64, _len: usize) -> Result<PendingWrite> {
        Err(Error::NotSupportedByFormat(
            "Direct access to encrypted data",
        ))
    }
    fn try_begin_write(
        self: Arc<Self>,
        _off: u64,
        _len: usize,
        _waker: &Arc<dyn AllocWaker>,
    ) -> Result<Option<PendingWrite>> {
        Err(Error::NotSupportedByFormat(
            "Direct access to encrypted data",
        ))
    }

    /// Zeros are encrypted like any data (the format has no zero
    /// clusters; QEMU writes an encrypted zero buffer too).
    fn write_zeroes(&self, off: u64, len: u64, _unmap: bool) -> Result<()> {
        self.write_with(off, len, &|_, piece| piece.fill(0))
    }

    /// A no-op, as in QEMU's crypto driver: a hole in the payload would
    /// decrypt to noise, not zeros, so nothing is passed down.
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_range(off, len)?;
        self.check_writable()
    }

    fn flush(&self) -> Result<()> {
        self.st.sync()
    }

    /// Everything is data, with no host offset (the payload is
    /// encrypted), as QEMU reports a format driver without block status.
    fn block_status(&self, off: u64, len: u64) -> Result<Extent> {
        self.check_range(off, len)?;
        Ok(Extent {
            len,
            kind: ExtentKind::Data,
            offset: None,
            file: 0,
            compressed: false,
            recurse: false,
        })
    }

    /// Grows or shrinks the payload (QEMU truncates the file to the
    /// payload offset plus the new size); new space is not written.
    fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let len = self
            .payload
            .checked_add(new_size)
            .ok_or_else(|| Error::TooLarge(format!("virtual size {new_size}")))?;
        let _alone = self.rmw.write().unwrap_or_else(|e| e.into_inner());
        self.st.set_len(len)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::luks::LuksParams;

    /// A file removed when dropped.
    struct Temp(std::path::PathBuf);
    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn make(size: u64) -> (Temp, std::path::PathBuf) {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "rimg-luks-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let d = Temp(p.clone());
        let params = LuksParams {
            iter_time_ms: 1,
            ..Default::default()
        };
        crate::create_luks(&p, size, &params, &Secret(b"pw".to_vec())).unwrap();
        (d, p)
    }

    fn open(p: &Path, key: &[u8]) -> Result<LuksImage> {
        LuksImage::open(
            Storage::open(p, true).unwrap(),
            Some(&Secret(key.to_vec())),
            false,
        )
    }

    #[test]
    fn partial_writes_round_trip() {
        let (_d, p) = make(1 << 20);
        let img = open(&p, b"pw").unwrap();
        assert_eq!(img.size(), 1 << 20);
        img.write_zeroes(0, 1 << 20, false).unwrap();
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        img.write_at(&data, 700).unwrap();
        let img = open(&p, b"pw").unwrap();
        let mut back = vec![1u8; 4096];
        img.read_at(&mut back, 0).unwrap();
        assert!(back[..700].iter().all(|&b| b == 0));
        assert_eq!(&back[700..3700], &data[..]);
        assert!(back[3700..].iter().all(|&b| b == 0));
        let mut mid = vec![0u8; 10];
        img.read_at(&mut mid, 1000).unwrap();
        assert_eq!(&mid[..], &data[300..310]);
    }

    #[test]
    fn payload_is_encrypted_and_key_checked() {
        let (_d, p) = make(4096);
        let img = open(&p, b"pw").unwrap();
        img.write_at(&[0x5a; 4096], 0).unwrap();
        let raw = std::fs::read(&p).unwrap();
        let payload = &raw[img.payload_offset() as usize..];
        assert!(payload.iter().filter(|&&b| b == 0x5a).count() < 200);
        assert_eq!(
            open(&p, b"wrong").unwrap_err().to_string(),
            "Invalid password, cannot unlock any keyslot"
        );
        let st = Storage::open(&p, false).unwrap();
        let meta = LuksImage::open(st, None, true).unwrap();
        assert!(meta.read_at(&mut [0u8; 512], 0).is_err());
    }

    #[test]
    fn resize_moves_the_end() {
        let (_d, p) = make(4096);
        let img = open(&p, b"pw").unwrap();
        img.resize(8192).unwrap();
        img.write_at(&[7; 512], 7680).unwrap();
        let img = open(&p, b"pw").unwrap();
        assert_eq!(img.size(), 8192);
        let mut b = [0u8; 512];
        img.read_at(&mut b, 7680).unwrap();
        assert_eq!(b, [7; 512]);
    }
}
