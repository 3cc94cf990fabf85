//! Page-aligned buffers for the data the engine writes itself (zeros,
//! copy-on-write fill, encrypted sectors).
//!
//! Why aligned: a buffered write copies from user memory page by page,
//! and when a source page faults halfway (not yet mapped, or migrated)
//! the kernel keeps the part copied so far (Linux 6.x commits a short
//! copy into a page that is already up to date), then sees a pending
//! SIGKILL and stops. The write is then cut where the *source* crosses a
//! page. The crash test found a sector whose first 16 bytes were the new
//! zeros and the rest the old data: the static zero buffer sat 16 bytes
//! before a page boundary. From a page-aligned buffer written at a
//! sector-aligned offset, a cut falls on a sector boundary: every sector
//! holds its old or its new contents, as a disk promises.
//!
//! Zeros are written with `zero_pieces`, which takes each piece at the
//! offset within a page that its destination has, so that even a write
//! starting inside a sector is cut only where the destination crosses a
//! page. Buffers the caller passes (`Image::write_at`, guest memory) are
//! the caller's: sector-aligned ones get the same guarantee; the NBD
//! server reads payloads into a `PageBuf`.

/// Bytes in a page (the smallest on the hosts rimg runs on).
pub const PAGE: usize = 4096;

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; PAGE]);

const ZERO_PAGE: Page = Page([0; PAGE]);

#[repr(C, align(4096))]
struct Zeros([u8; 64 * 1024]);

static ZEROS: Zeros = Zeros([0; 64 * 1024]);

/// The shared, page-aligned buffer of zeros (see `zero_pieces`).
fn zero_buf() -> &'static [u8] {
    &ZEROS.0
}

/// Calls `write(piece, at)` over [off, off + len) with pieces of the
/// zero buffer, each taken at the same offset within a page as the byte
/// it lands on: a cut falls on a page boundary of the destination,
/// whatever the offset (NBD writes may start anywhere).
pub(crate) fn zero_pieces<E>(
    off: u64,
    len: u64,
    mut write: impl FnMut(&[u8], u64) -> Result<(), E>,
) -> Result<(), E> {
    let zeros = zero_buf();
    let mut done = 0;
    while done < len {
        let at = off + done;
        let skew = (at % PAGE as u64) as usize;
        let n = (len - done).min((zeros.len() - skew) as u64) as usize;
        write(&zeros[skew..skew + n], at)?;
        done += n as u64;
    }
    Ok(())
}

// `Page` is its bytes and nothing else (the `Deref`s rely on it).
const _: () = assert!(std::mem::size_of::<Page>() == PAGE);

/// A growable byte buffer whose first byte is page-aligned.
#[derive(Default)]
pub struct PageBuf {
    pages: Vec<Page>,
    len: usize,
}

impl PageBuf {
    pub const fn new() -> PageBuf {
        PageBuf {
            pages: Vec::new(),
            len: 0,
        }
    }

    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> PageBuf {
        let mut b = PageBuf::new();
        b.resize(len);
        b
    }

    /// Bytes it holds room for.
    pub fn capacity(&self) -> usize {
        self.pages.len() * PAGE
    }

    /// Makes the buffer `len` bytes long: bytes it held are kept, new
    /// ones are zeros (or what an earlier, longer use left there).
    pub fn resize(&mut self, len: usize) {
        let n = len.div_ceil(PAGE);
        if self.pages.len() < n {
            self.pages.resize(n, ZERO_PAGE);
        }
        self.len = len;
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `Page` is `repr(C)` around `[u8; PAGE]`, and PAGE is a
        // multiple of its alignment, so the pages are contiguous
        // initialized bytes with no padding: `pages.len() * PAGE` of
        // them from the vector's pointer (dangling but aligned and
        // non-null when empty, which a zero-length slice allows). `len`
        // never exceeds that (`resize` grows the pages first), and the
        // slice borrows `self`.
        let all = unsafe {
            std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.pages.len() * PAGE)
        };
        &all[..self.len]
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; the slice borrows `self` mutably, so it
        // is the only reference to these bytes.
        let all = unsafe {
            std::slice::from_raw_parts_mut(
                self.pages.as_mut_ptr().cast::<u8>(),
                self.pages.len() * PAGE,
            )
        };
        &mut all[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_page() {
        assert_eq!(zero_buf().as_ptr() as usize % PAGE, 0);
        assert!(zero_buf().iter().all(|&b| b == 0));
        let mut b = PageBuf::new();
        assert!(b.is_empty());
        for len in [1, 511, 4096, 65536, 3 * 4096 + 5, 100] {
            b.resize(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % PAGE, 0, "len {len}");
            b.fill(0xab);
        }
        // A shrink keeps the bytes; a new buffer is zeros.
        assert!(b.iter().all(|&x| x == 0xab));
        let z = PageBuf::zeroed(10_000);
        assert_eq!(z.len(), 10_000);
        assert_eq!(z.as_ptr() as usize % PAGE, 0);
        assert!(z.iter().all(|&x| x == 0));
    }

    #[test]
    fn zero_pieces_cover_the_range_aligned_like_their_destination() {
        for (off, len) in [
            (0u64, 1u64),
            (512, 200_000),
            (4095, 70_000),
            (123, 0),
            (65_536, 65_536),
        ] {
            let mut next = off;
            zero_pieces(off, len, |z, at| -> Result<(), ()> {
                assert_eq!(at, next, "contiguous");
                assert!(!z.is_empty() && z.iter().all(|&b| b == 0));
                assert_eq!(z.as_ptr() as usize % PAGE, (at % PAGE as u64) as usize);
                next += z.len() as u64;
                Ok(())
            })
            .unwrap();
            assert_eq!(next, off + len);
        }
    }
}
