//! DISCARD and WRITE_ZEROES payloads: whole segments, their number,
//! flags and ranges.

use super::*;

#[test]
fn discard_payload_not_whole_segments() {
    for typ in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        for n in [0, 12, 17, 31] {
            let (r, _) = parse(
                header(typ, 0),
                &[(HDR, 16, R), (BUF, n, R), (STATUS, 1, W)],
                false,
            );
            ioerr_with(r, "discard/write-zeroes payload not whole segments");
        }
    }
}

#[test]
fn too_many_discard_segments() {
    let max = crate::config::MAX_DISCARD_SEG;
    for typ in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let (r, req) = parse(
            header(typ, 0),
            &[(HDR, 16, R), (BUF, 16 * max, R), (STATUS, 1, W)],
            false,
        );
        r.unwrap();
        assert_eq!(req.len, 16 * u64::from(max));
        for n in [max + 1, 4096] {
            let (r, _) = parse(
                header(typ, 0),
                &[(HDR, 16, R), (BUF, 16 * n, R), (STATUS, 1, W)],
                false,
            );
            ioerr_with(r, "too many discard/write-zeroes segments");
        }
    }
}

fn seg_bytes(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&sector.to_le_bytes());
    b[8..12].copy_from_slice(&num.to_le_bytes());
    b[12..16].copy_from_slice(&flags.to_le_bytes());
    b
}

/// Segments are read from the data stream, across descriptor boundaries
/// and after the header in the same descriptor.
#[test]
fn discard_segments_read_across_descriptors() {
    let mem = guest();
    let (s0, s1) = (seg_bytes(7, 3, 0), seg_bytes(100, 8, 1));
    let mut hdr_and_seg = header(VIRTIO_BLK_T_WRITE_ZEROES, 0).to_vec();
    hdr_and_seg.extend_from_slice(&s0[..10]);
    mem.write_slice(&hdr_and_seg, GuestAddress(HDR)).unwrap();
    mem.write_slice(&s0[10..], GuestAddress(BUF)).unwrap();
    mem.write_slice(&s1, GuestAddress(BUF + 6)).unwrap();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let chain = vq
        .build_desc_chain(&[
            raw(HDR, 26, 0, 0),
            raw(BUF, 22, 0, 0),
            raw(STATUS, 1, WRITE, 0),
        ])
        .unwrap();
    let (r, req) = parse_chain(&mem, chain, CAP, false);
    r.unwrap();
    assert_eq!(req.len, 32);
    let mut b = [0u8; 16];
    assert!(req.read_data(&mem, 0, &mut b));
    assert_eq!(b, s0);
    assert!(req.read_data(&mem, 16, &mut b));
    assert_eq!(b, s1);
    assert_eq!(
        ZeroSeg::decode(&b),
        Some(ZeroSeg {
            sector: 100,
            num_sectors: 8,
            unmap: true
        })
    );
    // Past the request's data.
    assert!(!req.read_data(&mem, 17, &mut b));
}

#[test]
fn discard_segment_reserved_flags() {
    for flags in [2, 4, 1 << 31, u32::MAX] {
        assert_eq!(ZeroSeg::decode(&seg_bytes(0, 1, flags)), None, "{flags:#x}");
    }
    let plain = ZeroSeg::decode(&seg_bytes(7, 3, 0)).unwrap();
    assert!(!plain.unmap);
}

#[test]
fn discard_segment_range() {
    let seg = |sector, num_sectors| ZeroSeg {
        sector,
        num_sectors,
        unmap: false,
    };
    assert_eq!(seg(2, 3).byte_range(CAP), Some((1024, 1536)));
    assert_eq!(
        seg(CAP / 512 - 1, 1).byte_range(CAP),
        Some((CAP - 512, 512))
    );
    assert_eq!(seg(CAP / 512, 0).byte_range(CAP), Some((CAP, 0)));
    for s in [
        seg(CAP / 512, 1),
        seg(0, (CAP / 512 + 1) as u32),
        seg(CAP / 512 + 1, 0),
        // sector * 512 overflows.
        seg(u64::MAX / 256, 1),
        // sector * 512 fits, + length overflows.
        seg(u64::MAX / 512, u32::MAX),
    ] {
        assert_eq!(s.byte_range(CAP), None, "{s:?}");
    }
    assert_eq!(seg(u64::MAX / 256, 1).byte_range(u64::MAX), None);
    assert_eq!(seg(u64::MAX / 512, u32::MAX).byte_range(u64::MAX), None);
}
