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
//! Buffers the caller passes (`Image::write_at`, guest memory) are the
//! caller's: sector-aligned ones get the same guarantee.

/// Bytes in a page (the smallest on the hosts rimg runs on).
pub const PAGE: usize = 4096;

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; PAGE]);

const ZERO_PAGE: Page = Page([0; PAGE]);

#[repr(C, align(4096))]
struct Zeros([u8; 64 * 1024]);

static ZEROS: Zeros = Zeros([0; 64 * 1024]);

/// A shared, page-aligned buffer of zeros for writing zero ranges in
/// bounded pieces (slice it from its start).
pub(crate) fn zero_buf() -> &'static [u8] {
    &ZEROS.0
}

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
}
