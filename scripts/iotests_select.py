#!/usr/bin/env python3
"""Lists the qemu-iotests that judge rimg as qemu-img, or rimg-nbd as
qemu-nbd.

Usage: iotests_select.py [--nbd] IOTESTS_DIR

Prints, one a line, the bash tests of IOTESTS_DIR (QEMU's
tests/qemu-iotests) that run on qcow2 over plain files and need neither a
VM (qemu-system), NBD, FUSE, TLS nor the storage daemon: what a script
that calls qemu-img sees. With --nbd, the bash tests that run on raw
images over NBD (the protocol QEMU's own CI runs them with, the server
being qemu-nbd) and need no VM, FUSE, TLS or storage daemon. The
selection reads each test's own declarations (_supported_fmt,
_supported_proto) and looks, outside comments, for the helpers that
start those programs.
"""

import os
import re
import sys

# What makes a test need more than qemu-img and qemu-io.
NEEDS_MORE = re.compile(
    r"common\.(qemu|nbd|tls)\b"  # VM monitor, NBD server, TLS certificates
    r"|_launch_qemu|\b_run_qemu\b|\brun_qemu\b"
    r"|\$\{?QEMU\}?\b(?!_)|\$QEMU_PROG|_require_drivers"  # qemu-system
    r"|\bQEMU_NBD|\bqemu-nbd\b|_require_qemu_nbd"
    r"|nbd-server-start|nbd_server_start"
    r"|\b_qsd|QSD_PROG|qemu-storage-daemon"
    r"|\bfusermount\b"
)


def candidates(root):
    for name in sorted(os.listdir(root)):
        if re.fullmatch(r"\d{3}", name):
            yield name
    named = os.path.join(root, "tests")
    for name in sorted(os.listdir(named)):
        if "." not in name:
            yield "tests/" + name


def declared(lines, what):
    for line in lines:
        if line.startswith(what):
            return set(line.split()[1:])
    return None


# The same for a test over NBD: qemu-nbd is what is judged there.
NEEDS_MORE_THAN_NBD = re.compile(
    r"common\.(qemu|tls)\b"
    r"|_launch_qemu|\b_run_qemu\b|\brun_qemu\b"
    r"|\$\{?QEMU\}?\b(?!_)|\$QEMU_PROG|_require_drivers"
    r"|nbd-server-start|nbd_server_start\b(?!_unix|_tcp)"
    r"|\b_qsd|QSD_PROG|qemu-storage-daemon"
    r"|\bfusermount\b"
)


def selected(root, name, nbd=False):
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    if "bash" not in lines[0]:
        return False
    fmts = declared(lines, "_supported_fmt")
    fmt, proto = ("raw", "nbd") if nbd else ("qcow2", "file")
    if not fmts or not fmts & {fmt, "generic"}:
        return False
    protos = declared(lines, "_supported_proto")
    if protos is not None and not protos & {proto, "generic"}:
        return False
    body = "\n".join(
        line
        for line in lines
        if not line.lstrip().startswith("#") and not line.startswith("_supported_proto")
    )
    return (NEEDS_MORE_THAN_NBD if nbd else NEEDS_MORE).search(body) is None


def main():
    args = sys.argv[1:]
    nbd = args[:1] == ["--nbd"]
    root = args[-1]
    for name in candidates(root):
        if selected(root, name, nbd):
            print(name)


if __name__ == "__main__":
    main()
