#!/usr/bin/env python3
"""Put a file's page cache in a known state for the block benchmarks.

Usage: recache.py MODE FILE...
  small  drop the file's cache, then cache it again in 4 KiB folios:
         read with O_DIRECT (no cache), written back 4 KiB at a time
         (a buffered write allocates a folio the size of the write).
         This is the cache random 4 KiB I/O leaves.
  none   drop the file's cache: the next read comes from the disk.
  large  leave the cache as the prefill made it. A large sequential
         write (or readahead, or a host-side copy) caches the file in
         large folios (up to 2 MiB on ext4 since 6.16), and every
         4 KiB buffered write into one of them walks the folio's
         buffer heads: tens of microseconds a write, for every client,
         the benchmark's ceiling included.
Not for tmpfs, whose pages fadvise cannot drop.
The file's contents and holes are unchanged. The caller syncs
afterwards.
"""
import mmap
import os
import sys

CHUNK = 1 << 20
BLOCK = 4096


def drop(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def extents(fd, size):
    """The file's data extents (holes are left alone: rewritten, they
    would become allocated zeros)."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after off
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        off = end


def small(path):
    drop(path)
    size = os.path.getsize(path)
    # O_DIRECT wants an aligned buffer: an anonymous map is page aligned.
    buf = mmap.mmap(-1, CHUNK)
    src = os.open(path, os.O_RDONLY | os.O_DIRECT)
    dst = os.open(path, os.O_WRONLY)
    try:
        for start, end in extents(src, size):
            # Extents start and end on file system blocks (but the last
            # one may end at the file's size).
            off = start
            while off < end:
                n = os.preadv(src, [buf], off)
                if n <= 0:
                    raise SystemExit(f"{path}: short read at {off}")
                n = min(n, end - off)
                view = memoryview(buf)[:n]
                for i in range(0, n, BLOCK):
                    os.pwrite(dst, view[i:i + BLOCK], off + i)
                view.release()
                off += n
    finally:
        os.close(src)
        os.close(dst)


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("small", "none", "large"):
        raise SystemExit(__doc__)
    mode = sys.argv[1]
    for path in sys.argv[2:]:
        if mode == "small":
            small(path)
        elif mode == "none":
            drop(path)


if __name__ == "__main__":
    main()
