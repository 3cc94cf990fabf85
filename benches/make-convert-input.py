#!/usr/bin/env python3
"""Writes the convert benchmark's input: a raw image of SIZE bytes in
64 KiB chunks, about 60 % random data, 10 % half-zero chunks (random then
zeros), the rest holes. Deterministic (seeded)."""
import os
import random
import sys

path = sys.argv[1]
size = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 30
chunk = 64 << 10
rng = random.Random(1234)
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
