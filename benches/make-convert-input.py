#!/usr/bin/env python3
"""Writes the convert benchmark's input: a raw image of SIZE bytes in
64 KiB chunks, about 60 % random data, 10 % half-zero chunks (random then
zeros), the rest holes. With --zeros instead: long runs of zeros that are
written (allocated, so a tool must read them to find them), 1 MiB of
random data every 16 MiB. Deterministic (seeded)."""
import os
import random
import sys

args = [a for a in sys.argv[1:] if a != "--zeros"]
zeros = "--zeros" in sys.argv
path = args[0]
size = int(args[1]) if len(args) > 1 else 1 << 30
chunk = 64 << 10
rng = random.Random(1234)
if zeros:
    with open(path, "wb") as f:
        block = 16 << 20
        for off in range(0, size, block):
            f.write(rng.randbytes(1 << 20))
            f.write(bytes(min(block, size - off) - (1 << 20)))
    sys.exit(0)
with open(path, "wb") as f:
    f.truncate(size)
    for off in range(0, size, chunk):
        r = rng.random()
        if r < 0.60:
            f.seek(off)
            f.write(rng.randbytes(chunk))
        elif r < 0.70:
            f.seek(off)
            f.write(rng.randbytes(chunk // 2))
