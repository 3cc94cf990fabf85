#!/usr/bin/env python3
"""Put a file's page cache in a known state for the block benchmarks.

Usage: recache.py MODE FILE...
  small  drop the file's cache, then cache it again in 4 KiB folios:
         read with O_DIRECT (no cache), written back 4 KiB at a time
         (a buffered write allocates a folio the size of the write).
         This is the cache a guest's own 4 KiB I/O leaves.
  none   drop the file's cache: the next read comes from the disk.
  large  leave the cache as the prefill made it. A large sequential
         write caches the file in large folios (2 MiB on ext4 since
         6.16), and every 4 KiB buffered write into one of them walks
         the folio's buffer heads: about 35 us a write for every
         client, the benchmark's ceiling included.
The file's contents are unchanged. The caller syncs afterwards.
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


def small(path):
    drop(path)
    size = os.path.getsize(path)
    # O_DIRECT wants an aligned buffer: an anonymous map is page aligned.
    buf = mmap.mmap(-1, CHUNK)
    src = os.open(path, os.O_RDONLY | os.O_DIRECT)
    dst = os.open(path, os.O_WRONLY)
    try:
        off = 0
        while off < size:
            n = os.preadv(src, [buf], off)
            if n <= 0:
                raise SystemExit(f"{path}: short read at {off}")
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
