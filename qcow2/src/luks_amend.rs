//! Amending LUKS key slots of an encrypted qcow2 image (qemu-img amend
//! `encrypt.state`, `encrypt.keyslot`, `encrypt.new-secret`,
//! `encrypt.old-secret`, `encrypt.iter-time`) or of a `luks` volume (the
//! same options unprefixed), with QEMU's checks and wording.

use crate::error::{Error, Result};
use crate::header::crypt;
use crate::image::Image;
use crate::luks::{LuksHeader, SLOTS};
use crate::qcow::Qcow2;
use crate::storage::Storage;

/// What to change. `active`: add a key (`new_secret`, unlocking with
/// the image's key); inactive: erase slots (`keyslot` or those
/// `old_secret` opens).
#[derive(Debug, Clone, Default)]
pub struct LuksAmend {
    pub active: bool,
    pub keyslot: Option<i64>,
    pub new_secret: Option<Vec<u8>>,
    pub old_secret: Option<Vec<u8>>,
    pub iter_time_ms: Option<u64>,
    /// Password to unlock the master key with (the image's key).
    pub secret: Option<Vec<u8>>,
    /// qemu-img amend --force: allow overwriting or erasing the last slot.
    pub force: bool,
}

fn err(m: impl Into<String>) -> Error {
    Error::Crypto(m.into())
}

fn slot_index(k: i64) -> Result<usize> {
    if !(0..SLOTS as i64).contains(&k) {
        return Err(err(format!(
            "Invalid keyslot {k} specified, must be between 0 and {}",
            SLOTS - 1
        )));
    }
    Ok(k as usize)
}

/// Applies `a` to the LUKS header of `q` (crypt method 2).
pub fn amend_luks(q: &Qcow2, a: &LuksAmend) -> Result<()> {
    let h = q.header();
    if h.crypt_method != crypt::LUKS {
        return Err(err("Only LUKS encryption options can be amended"));
    }
    let (area, len) = h.crypto_area().expect("method 2 has a crypto header");
    let l = crate::encrypt::read_luks(q.storage(), &h)?;
    amend_area(q.storage(), area, len, l, a)
}

/// Applies `a` to the header of a `luks` volume (QEMU's luks driver
/// amends the same options, unprefixed), open for writing in `st`.
pub fn amend_luks_volume(st: &Storage, a: &LuksAmend) -> Result<()> {
    let mut b = vec![0u8; crate::luks::HEADER_LEN];
    st.read_at(&mut b, 0)?;
    let l = LuksHeader::parse(&b)?;
    let len = l.payload_offset();
    amend_area(st, 0, len, l, a)
}

/// Amends the LUKS header `l` stored at `area` (`len` bytes of header
/// and key material) in `st`.
fn amend_area(st: &Storage, area: u64, len: u64, mut l: LuksHeader, a: &LuksAmend) -> Result<()> {
    let mut read = |at: u64, buf: &mut [u8]| {
        if at.checked_add(buf.len() as u64).is_none_or(|e| e > len) {
            return Err(err("Request for data outside of extension header"));
        }
        st.read_at(buf, area + at)
    };
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    if a.active {
        let new = a
            .new_secret
            .as_ref()
            .ok_or_else(|| err("'new-secret' is required to activate a keyslot"))?;
        if a.old_secret.is_some() {
            return Err(err(
                "'old-secret' must not be given when activating keyslots",
            ));
        }
        let slot = match a.keyslot {
            Some(k) => slot_index(k)?,
            None => (0..SLOTS)
                .find(|&i| !l.slots[i].active)
                .ok_or_else(|| err("Can't add a keyslot - all keyslots are in use"))?,
        };
        if !a.force && l.slots[slot].active {
            return Err(err(format!(
                "Refusing to overwrite active keyslot {slot} - please erase it first"
            )));
        }
        let pw = a
            .secret
            .as_ref()
            .ok_or_else(|| err("Parameter 'encrypt.key-secret' is required for cipher"))?;
        let master = l.unlock(pw, &mut read)?;
        writes.push(l.store_key(slot, new, &master, a.iter_time_ms.unwrap_or(2000))?);
    } else {
        if a.new_secret.is_some() {
            return Err(err("'new-secret' must not be given when erasing keyslots"));
        }
        if a.iter_time_ms.is_some() {
            return Err(err("'iter-time' must not be given when erasing keyslots"));
        }
        let active = l.slots.iter().filter(|s| s.active).count();
        let erase: Vec<usize> = match (a.keyslot, &a.old_secret) {
            (Some(k), old) => {
                let i = slot_index(k)?;
                if let Some(pw) = old {
                    if l.try_slot(i, pw, &mut read)?.is_none() {
                        return Err(err(format!(
                            "Given keyslot {i} doesn't contain the given old password for erase operation"
                        )));
                    }
                }
                if !a.force && !l.slots[i].active {
                    return Err(err(format!("Given keyslot {i} is already erased (inactive) ")));
                }
                if !a.force && active == 1 {
                    return Err(err(format!(
                        "Attempt to erase the only active keyslot {i} which will erase all the data in the image irreversibly - refusing operation"
                    )));
                }
                vec![i]
            }
            (None, Some(pw)) => {
                let mut v = Vec::new();
                for i in 0..SLOTS {
                    if l.try_slot(i, pw, &mut read)?.is_some() {
                        v.push(i);
                    }
                }
                if v.is_empty() {
                    return Err(err(
                        "No keyslots match given (old) password for erase operation",
                    ));
                }
                if !a.force && v.len() == active {
                    return Err(err("All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation"));
                }
                v
            }
            (None, None) => {
                return Err(err("To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given"))
            }
        };
        for i in erase {
            writes.push(l.erase_key(i)?);
        }
    }
    write_back(st, area, &l, writes)
}

fn write_back(st: &Storage, area: u64, l: &LuksHeader, writes: Vec<(u64, Vec<u8>)>) -> Result<()> {
    // Key material first, then the header that makes it live (as QEMU).
    for (off, data) in writes {
        st.write_at(&data, area + off)?;
    }
    st.sync()?;
    st.write_at(&l.encode(), area)?;
    st.sync()
}
