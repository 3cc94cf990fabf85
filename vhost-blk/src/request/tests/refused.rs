//! Chains the parser refuses: unanswered (no status byte), IOERR or
//! UNSUPP.

use super::*;

// ----- no status byte: returned unanswered -----

#[test]
fn no_writable_descriptor() {
    let (r, _) = parse(header(0, 0), &[(HDR, 16, R), (BUF, 512, R)], false);
    assert_eq!(r, Err(Invalid::NoStatus));
}

/// The status byte is never placed in device-readable memory.
#[test]
fn chain_ending_in_a_readable_descriptor() {
    for descs in [
        &[(HDR, 16, R), (BUF, 512, W), (STATUS, 1, R)][..],
        &[(HDR, 16, R), (STATUS, 1, W), (BUF, 512, R)],
    ] {
        let (r, _) = parse(header(0, 0), descs, false);
        assert_eq!(r, Err(Invalid::NoStatus), "{descs:?}");
    }
}

#[test]
fn zero_length_writable_descriptor_last() {
    let (r, _) = parse(
        header(0, 0),
        &[(HDR, 16, R), (BUF, 512, W), (BUF2, 512, R), (STATUS, 0, W)],
        false,
    );
    assert_eq!(r, Err(Invalid::NoStatus));
}

/// A head index past the descriptor table yields no descriptor.
#[test]
fn head_past_the_table() {
    let mem = guest();
    let chain = pop(&mem, &[raw(HDR, 16, 0, 0)], QSIZE);
    let (r, _) = parse_chain(&mem, chain, CAP, false);
    assert_eq!(r, Err(Invalid::NoStatus));
}

/// Indirect tables virtio-queue does not walk: outside guest memory, of a
/// length that is not whole descriptors, or empty.
#[test]
fn unusable_indirect_table() {
    let mem = guest();
    for (addr, len) in [(MEM, 48), (MEM - 16, 48), (TABLE, 20), (TABLE, 0)] {
        let chain = pop(&mem, &[raw(addr, len, INDIRECT, 0)], 0);
        let (r, _) = parse_chain(&mem, chain, CAP, false);
        assert_eq!(r, Err(Invalid::NoStatus), "{addr:#x} {len}");
    }
}

/// A status descriptor whose end overflows the address space.
#[test]
fn status_address_overflows() {
    let (r, _) = parse(header(0, 0), &[(HDR, 16, R), (u64::MAX - 4, 16, W)], false);
    assert_eq!(r, Err(Invalid::NoStatus));
}

// ----- refused with IOERR -----

#[test]
fn readable_after_writable() {
    let (r, req) = parse(
        header(0, 0),
        &[(HDR, 16, R), (BUF, 512, W), (BUF2, 512, R), (STATUS, 1, W)],
        false,
    );
    ioerr_with(r, "readable descriptor after a writable one");
    assert_eq!(req.status, GuestAddress(STATUS));
}

#[test]
fn header_too_short() {
    for descs in [
        &[(HDR, 8, R), (BUF, 512, W), (STATUS, 1, W)][..],
        &[(HDR, 8, R), (HDR + 8, 7, R), (STATUS, 1, W)],
        &[(STATUS, 1, W)],
    ] {
        let (r, _) = parse(header(0, 0), descs, false);
        ioerr_with(r, "header shorter than 16 bytes");
    }
}

#[test]
fn data_descriptor_outside_guest_memory() {
    for (addr, len) in [(MEM - 256, 512), (MEM, 512), (1 << 40, 512)] {
        let (r, req) = parse(
            header(0, 0),
            &[(HDR, 16, R), (addr, len, W), (STATUS, 1, W)],
            false,
        );
        ioerr_with(r, "descriptor outside guest memory");
        assert_eq!(req.status, GuestAddress(STATUS));
    }
}

#[test]
fn header_descriptor_outside_guest_memory() {
    let (r, _) = parse(
        header(0, 0),
        &[(MEM - 8, 16, R), (BUF, 512, W), (STATUS, 1, W)],
        false,
    );
    ioerr_with(r, "descriptor outside guest memory");
}

/// The status byte itself outside memory: refused, and the worker's
/// write of the status fails (the chain goes back with length 0).
#[test]
fn status_outside_guest_memory() {
    let (r, req) = parse(header(0, 0), &[(HDR, 16, R), (MEM, 1, W)], false);
    ioerr_with(r, "descriptor outside guest memory");
    assert_eq!(req.status, GuestAddress(MEM));
}

#[test]
fn readable_data_in_a_read() {
    for typ in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID] {
        let (r, _) = parse(
            header(typ, 0),
            &[(HDR, 16, R), (BUF, 512, R), (STATUS, 1, W)],
            false,
        );
        ioerr_with(r, "device-readable data in a read request");
    }
}

#[test]
fn writable_data_in_a_write() {
    for typ in [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ] {
        let (r, _) = parse(
            header(typ, 0),
            &[(HDR, 16, R), (BUF, 512, W), (STATUS, 1, W)],
            false,
        );
        ioerr_with(r, "device-writable data in a write request");
    }
}

#[test]
fn write_on_a_read_only_device() {
    for (typ, n) in [
        (VIRTIO_BLK_T_OUT, 512),
        (VIRTIO_BLK_T_DISCARD, 16),
        (VIRTIO_BLK_T_WRITE_ZEROES, 16),
    ] {
        let (r, _) = parse(
            header(typ, 0),
            &[(HDR, 16, R), (BUF, n, R), (STATUS, 1, W)],
            true,
        );
        ioerr_with(r, "read-only");
    }
}

#[test]
fn length_not_whole_sectors() {
    for (typ, w) in [(VIRTIO_BLK_T_IN, W), (VIRTIO_BLK_T_OUT, R)] {
        for n in [1, 100, 511, 513] {
            let (r, _) = parse(
                header(typ, 0),
                &[(HDR, 16, R), (BUF, n, w), (STATUS, 1, W)],
                false,
            );
            ioerr_with(r, "data length not a multiple of 512");
        }
    }
}

#[test]
fn range_past_the_end() {
    let cases = [
        (VIRTIO_BLK_T_IN, CAP / 512, 512, W),
        (VIRTIO_BLK_T_IN, CAP / 512 - 1, 1024, W),
        (VIRTIO_BLK_T_IN, CAP / 512 + 1, 0, W),
        (VIRTIO_BLK_T_OUT, u64::MAX, 512, R),
        // sector * 512 overflows.
        (VIRTIO_BLK_T_OUT, u64::MAX / 256, 512, R),
        // sector * 512 fits, + len overflows.
        (VIRTIO_BLK_T_IN, u64::MAX / 512, 1024, W),
    ];
    for (typ, sector, n, w) in cases {
        let (r, _) = parse(
            header(typ, sector),
            &[(HDR, 16, R), (BUF, n, w), (STATUS, 1, W)],
            false,
        );
        ioerr_with(r, "request past the end of the disk");
    }
}

/// An unknown type completes with UNSUPP, whatever its data.
#[test]
fn unsupported_type() {
    for typ in [T_SCSI_CMD, T_GET_LIFETIME, T_SECURE_ERASE, 99, u32::MAX] {
        for descs in [
            &[(HDR, 16, R), (STATUS, 1, W)][..],
            &[(HDR, 16, R), (BUF, 7, R), (BUF2, 9, W), (STATUS, 1, W)],
        ] {
            let (r, _) = parse(header(typ, 0), descs, true);
            unsupp(r);
        }
    }
    // The header must be there to tell the type.
    let (r, _) = parse(header(99, 0), &[(HDR, 8, R), (STATUS, 1, W)], false);
    ioerr_with(r, "shorter than 16");
}

// ----- chains cut short by the walk's bounds -----

/// A chain whose last descriptor still has NEXT was cut short by
/// virtio-queue (a loop, a next index past the table, a nested indirect
/// table, over 4 GiB): its last byte is not the status the driver meant.
#[test]
fn chain_looping() {
    let mem = guest();
    mem.write_slice(&header(0, 0), GuestAddress(HDR)).unwrap();
    // Walked: the header, one byte, then the buffer 14 times (the queue
    // size bounds the walk): whole sectors, a read the walk alone would
    // accept.
    let table = [
        raw(HDR, 16, NEXT, 1),
        raw(STATUS, 1, WRITE | NEXT, 2),
        raw(BUF, 512, WRITE | NEXT, 2),
    ];
    let chain = pop(&mem, &table, 0);
    let (r, req) = parse_chain(&mem, chain, CAP, false);
    ioerr_with(r, "descriptor chain loops");
    assert_eq!(req.status, GuestAddress(BUF + 511));
}

#[test]
fn chain_next_index_past_the_table() {
    let mem = guest();
    mem.write_slice(&header(0, 0), GuestAddress(HDR)).unwrap();
    let table = [
        raw(HDR, 16, NEXT, 1),
        raw(BUF, 512, WRITE | NEXT, 2),
        raw(STATUS, 1, WRITE | NEXT, QSIZE),
    ];
    let chain = pop(&mem, &table, 0);
    let (r, _) = parse_chain(&mem, chain, CAP, false);
    ioerr_with(r, "descriptor chain loops");
}

#[test]
fn chain_with_a_nested_indirect_table() {
    let mem = guest();
    mem.write_slice(&header(0, 0), GuestAddress(HDR)).unwrap();
    let inner = [
        raw(HDR, 16, NEXT, 1),
        raw(BUF, 513, WRITE | NEXT, 2),
        raw(TABLE, 16, INDIRECT, 0),
    ];
    for (i, d) in inner.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(TABLE + 16 * i as u64))
            .unwrap();
    }
    let chain = pop(&mem, &[raw(TABLE, 48, INDIRECT, 0)], 0);
    let (r, _) = parse_chain(&mem, chain, CAP, false);
    ioerr_with(r, "descriptor chain loops");
}
