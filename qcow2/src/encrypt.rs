//! Encryption of qcow2 images: unlocking at open (legacy AES, method 1;
//! LUKS, method 2, its header in the area the full disk encryption
//! header extension points to) and setting it up at creation.
//!
//! Data sectors are encrypted one 512-byte sector at a time. The IV's
//! sector number is the host offset / 512 for LUKS and the guest
//! offset / 512 for legacy AES (QEMU's crypt_physical_offset).

use crate::crypto::{legacy_aes, SectorCipher, SECTOR};
use crate::error::{Error, Result};
use crate::header::{crypt, ext, Extension, Header};
use crate::luks::{LuksHeader, LuksParams, HEADER_LEN};
use crate::storage::Storage;
use crate::units::{GuestOffset, HostOffset};

/// A password for an image (QEMU's `encrypt.key-secret`); never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// How to encrypt a new image.
#[derive(Debug, Clone)]
pub enum EncryptFormat {
    /// Legacy qcow2 AES (`encryption=on`, `encrypt.format=aes`).
    Aes,
    Luks(LuksParams),
}

/// An unlocked image's data cipher.
#[derive(Debug, Clone)]
pub struct DataCipher {
    cipher: SectorCipher,
    /// LUKS: sector numbers from host offsets; legacy AES: guest.
    physical: bool,
}

impl DataCipher {
    /// The IV's sector number: swapping the two offsets would encrypt
    /// with the wrong IV, hence the types.
    fn sector(&self, host: HostOffset, guest: GuestOffset) -> u64 {
        (if self.physical { host.0 } else { guest.0 }) / SECTOR
    }
    /// Encrypts sector-aligned `buf` bound for `host`, guest offset `guest`.
    pub fn encrypt(&self, host: HostOffset, guest: GuestOffset, buf: &mut [u8]) {
        self.cipher.encrypt(self.sector(host, guest), buf)
    }
    pub fn decrypt(&self, host: HostOffset, guest: GuestOffset, buf: &mut [u8]) {
        self.cipher.decrypt(self.sector(host, guest), buf)
    }
}

/// Reads and checks the LUKS header of a method-2 image.
pub fn read_luks(st: &Storage, h: &Header) -> Result<LuksHeader> {
    let (off, len) = h
        .crypto_area()
        .ok_or_else(|| Error::Crypto("Missing CRYPTO header for crypt method 2".into()))?;
    if len < HEADER_LEN as u64 {
        return Err(Error::Crypto(
            "Request for data outside of extension header".into(),
        ));
    }
    let mut b = vec![0u8; HEADER_LEN];
    st.read_at(&mut b, off)?;
    let l = LuksHeader::parse(&b)?;
    if l.payload_offset() > len {
        return Err(Error::Crypto(
            "Request for data outside of extension header".into(),
        ));
    }
    Ok(l)
}

/// The data cipher for an encrypted image; None for a clear one, or
/// when `key` is None and `no_io` (info only: QEMU opens without a key).
pub fn unlock(
    st: &Storage,
    h: &Header,
    key: Option<&Secret>,
    no_io: bool,
) -> Result<Option<DataCipher>> {
    let luks = match h.crypt_method {
        crypt::NONE => return Ok(None),
        crypt::LUKS => Some(read_luks(st, h)?),
        _ => None,
    };
    let Some(key) = key else {
        if no_io {
            return Ok(None);
        }
        return Err(Error::Crypto(
            "Parameter 'encrypt.key-secret' is required for cipher".into(),
        ));
    };
    let Some(l) = luks else {
        return Ok(Some(DataCipher {
            cipher: legacy_aes(&key.0),
            physical: false,
        }));
    };
    let (off, len) = h.crypto_area().expect("checked by read_luks");
    let mut read = |at: u64, buf: &mut [u8]| {
        if at.checked_add(buf.len() as u64).is_none_or(|e| e > len) {
            return Err(Error::Crypto(
                "Request for data outside of extension header".into(),
            ));
        }
        st.read_at(buf, off + at)
    };
    let master = l.unlock(&key.0, &mut read)?;
    Ok(Some(DataCipher {
        cipher: l.payload_cipher(&master)?,
        physical: true,
    }))
}

/// Sets up encryption on a freshly created image: for LUKS, writes the
/// header into `area_off` (clusters the caller allocated for
/// [`luks_area_len`] bytes) and returns the header extension to add.
pub fn luks_area(p: &LuksParams, key: &Secret) -> Result<Vec<u8>> {
    Ok(LuksHeader::create(p, &key.0)?.1)
}

/// The full disk encryption header extension for an area.
pub fn crypto_extension(off: u64, len: u64) -> Extension {
    let mut data = off.to_be_bytes().to_vec();
    data.extend_from_slice(&len.to_be_bytes());
    Extension {
        kind: ext::CRYPTO,
        data,
    }
}
