//! Guest RAM: one memfd mapped shared, so vhost-user backends can map the
//! same pages (SET_MEM_TABLE passes the fd and each region's offset in it).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::error::{Error, IoContext, Result};
use crate::layout;

pub type Mem = GuestMemoryMmap;

/// One RAM region as the kernel and the backends need it.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    pub guest: u64,
    pub size: u64,
    /// Address of the mapping in this process.
    pub host: u64,
    /// Offset of the region in the memfd.
    pub offset: u64,
}

pub struct GuestRam {
    pub mem: Mem,
    pub file: Arc<File>,
    pub regions: Vec<Region>,
}

impl GuestRam {
    pub fn new(size: u64) -> Result<GuestRam> {
        if size < 64 << 20 {
            return Err(Error::Usage(format!(
                "--memory {size} bytes is too small: at least 64M"
            )));
        }
        if !size.is_multiple_of(4096) {
            return Err(Error::Usage("--memory must be a multiple of 4K".into()));
        }
        // SAFETY: memfd_create with a valid NUL-terminated name; the result
        // is checked before use.
        let fd = unsafe { libc::memfd_create(c"rimg-vmm-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).io_ctx(|| "memfd_create");
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let file = Arc::new(unsafe { File::from_raw_fd(fd) });
        file.set_len(size)
            .io_ctx(|| format!("sizing guest memory to {size} bytes"))?;
        let mut ranges = Vec::new();
        let mut offset = 0;
        for (guest, len) in layout::ram_regions(size) {
            ranges.push((
                GuestAddress(guest),
                len as usize,
                Some(FileOffset::from_arc(file.clone(), offset)),
            ));
            offset += len;
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges)
            .map_err(|e| Error::Memory(e.to_string()))?;
        let mut regions = Vec::new();
        for r in mem.iter() {
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| Error::Memory(e.to_string()))? as u64;
            let offset = r.file_offset().map(|f| f.start()).unwrap_or(0);
            regions.push(Region {
                guest: r.start_addr().0,
                size: r.len(),
                host,
                offset,
            });
        }
        for r in &regions {
            advise_huge_pages(r);
        }
        Ok(GuestRam { mem, file, regions })
    }

    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Highest guest address + 1 of RAM below the MMIO hole.
    pub fn low_end(&self) -> u64 {
        self.regions[0].guest + self.regions[0].size
    }
}

/// Asks for transparent huge pages on guest RAM, as QEMU does for its
/// RAM blocks. Under KVM every first touch of a guest page is a
/// nested-paging fault the host must service; with 2 MiB pages there
/// are 512 times fewer, which is most of what a booting kernel waits
/// for on a nested host. The host decides: shared memory (a memfd) gets
/// huge pages when /sys/kernel/mm/transparent_hugepage/shmem_enabled is
/// `advise` (or `always`), and the advice is ignored otherwise, so a
/// failure here is not an error.
fn advise_huge_pages(r: &Region) {
    // SAFETY: the range is exactly one mapping this process created for
    // guest RAM and still owns; MADV_HUGEPAGE changes only how the kernel
    // backs it, never its contents or its validity.
    unsafe {
        libc::madvise(
            r.host as *mut libc::c_void,
            r.size as usize,
            libc::MADV_HUGEPAGE,
        );
    }
}
