//! The parser's verdicts on chains built in guest memory with
//! virtio-queue's mock split queue and popped as the worker pops them:
//! one test per way a chain is refused, and the layouts it accepts. The
//! parser only reads guest memory; every parse checks that.

use super::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::GuestMemoryMmap;

mod discard;
mod refused;

type Mem = GuestMemoryMmap<()>;
/// Guest memory: 1 MiB at 0; the mock queue's rings lie below 0x1000.
const MEM: u64 = 1 << 20;
const QSIZE: u16 = 16;
const HDR: u64 = 0x10000;
const BUF: u64 = 0x11000;
const BUF2: u64 = 0x18000;
const STATUS: u64 = 0x20000;
const TABLE: u64 = 0x30000;
const CAP: u64 = 1 << 20;
const R: bool = false;
const W: bool = true;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
const T_SCSI_CMD: u32 = 2;
const T_GET_LIFETIME: u32 = 10;
const T_SECURE_ERASE: u32 = 14;

fn guest() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

fn header(typ: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&typ.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDesc::new(addr, len, flags, next))
}

/// Parses with the guest memory unchanged by the parse.
fn parse_chain(
    mem: &Mem,
    chain: DescriptorChain<&Mem>,
    cap: u64,
    readonly: bool,
) -> (Result<(), Invalid>, Request) {
    let before = snapshot(mem);
    let mut req = Request::default();
    let r = req.parse(chain, mem, cap, readonly);
    assert!(before == snapshot(mem), "the parse wrote guest memory");
    (r, req)
}

fn snapshot(mem: &Mem) -> Vec<u8> {
    let mut v = vec![0u8; MEM as usize];
    mem.read_slice(&mut v, GuestAddress(0)).unwrap();
    v
}

/// Parses the chain `descs` (address, length, device-writable), linked
/// in order, with `hdr` at HDR.
fn parse_in(
    mem: &Mem,
    hdr: [u8; 16],
    descs: &[(u64, u32, bool)],
    readonly: bool,
) -> (Result<(), Invalid>, Request) {
    mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    let vq = MockSplitQueue::new(mem, QSIZE);
    let raws: Vec<_> = descs
        .iter()
        .map(|&(a, l, w)| raw(a, l, if w { WRITE } else { 0 }, 0))
        .collect();
    let chain = vq.build_desc_chain(&raws).unwrap();
    parse_chain(mem, chain, CAP, readonly)
}

fn parse(
    hdr: [u8; 16],
    descs: &[(u64, u32, bool)],
    readonly: bool,
) -> (Result<(), Invalid>, Request) {
    parse_in(&guest(), hdr, descs, readonly)
}

/// Stores `table` as the descriptor table (flags and next as given) and
/// makes `head` the one available chain.
fn pop<'a>(mem: &'a Mem, table: &[RawDescriptor], head: u16) -> DescriptorChain<&'a Mem> {
    let vq = MockSplitQueue::new(mem, QSIZE);
    for (i, d) in table.iter().enumerate() {
        vq.desc_table().store(i as u16, *d).unwrap();
    }
    vq.avail().ring().ref_at(0).unwrap().store(head);
    vq.avail().idx().store(1);
    let mut q: Queue = vq.create_queue().unwrap();
    let chain = q.iter(mem).unwrap().next().expect("a chain");
    chain
}

fn ioerr_with(r: Result<(), Invalid>, why: &str) {
    match r {
        Err(Invalid::Status(st, w)) => {
            assert_eq!(u32::from(st), VIRTIO_BLK_S_IOERR, "{w}");
            assert!(w.contains(why), "{w}");
        }
        other => panic!("expected IOERR ({why}): {other:?}"),
    }
}

fn unsupp(r: Result<(), Invalid>) {
    assert!(
        matches!(&r, Err(Invalid::Status(st, _)) if u32::from(*st) == VIRTIO_BLK_S_UNSUPP),
        "{r:?}"
    );
}

// ----- accepted layouts -----

#[test]
fn read_into_a_split_buffer() {
    let (r, req) = parse(
        header(VIRTIO_BLK_T_IN, 2),
        &[(HDR, 16, R), (BUF, 512, W), (BUF2, 1024, W), (STATUS, 1, W)],
        false,
    );
    r.unwrap();
    assert_eq!(req.kind, Some(Kind::In));
    assert_eq!((req.head, req.offset, req.len), (0, 1024, 1536));
    assert_eq!(
        req.segs,
        vec![(GuestAddress(BUF), 512), (GuestAddress(BUF2), 1024)]
    );
    assert_eq!(req.status, GuestAddress(STATUS));
}

#[test]
fn write_from_a_split_buffer() {
    let (r, req) = parse(
        header(VIRTIO_BLK_T_OUT, 1),
        &[(HDR, 16, R), (BUF, 512, R), (BUF2, 512, R), (STATUS, 1, W)],
        false,
    );
    r.unwrap();
    assert_eq!(req.kind, Some(Kind::Out));
    assert_eq!((req.offset, req.len), (512, 1024));
    assert_eq!(
        req.segs,
        vec![(GuestAddress(BUF), 512), (GuestAddress(BUF2), 512)]
    );
}

/// ANY_LAYOUT: the header is the stream's first 16 bytes, however the
/// descriptors cut it.
#[test]
fn header_split_across_descriptors() {
    let (r, req) = parse(
        header(VIRTIO_BLK_T_IN, 3),
        &[
            (HDR, 4, R),
            (HDR + 4, 1, R),
            (HDR + 5, 11, R),
            (BUF, 512, W),
            (STATUS, 1, W),
        ],
        false,
    );
    r.unwrap();
    assert_eq!((req.kind, req.offset, req.len), (Some(Kind::In), 1536, 512));
    // The header's tail and the data in one descriptor.
    let (r, req) = parse(
        header(VIRTIO_BLK_T_OUT, 0),
        &[(HDR, 10, R), (HDR + 10, 6 + 512, R), (STATUS, 1, W)],
        false,
    );
    r.unwrap();
    assert_eq!(req.kind, Some(Kind::Out));
    assert_eq!(req.segs, vec![(GuestAddress(HDR + 16), 512)]);
}

#[test]
fn header_and_data_in_one_descriptor() {
    let (r, req) = parse(header(1, 0), &[(HDR, 16 + 512, R), (STATUS, 1, W)], false);
    r.unwrap();
    assert_eq!(req.kind, Some(Kind::Out));
    assert_eq!(req.segs, vec![(GuestAddress(HDR + 16), 512)]);
}

#[test]
fn header_data_and_status_in_two_descriptors() {
    let (r, req) = parse(header(0, 0), &[(HDR, 16, R), (BUF, 513, W)], false);
    r.unwrap();
    assert_eq!((req.len, req.status), (512, GuestAddress(BUF + 512)));
    assert_eq!(req.segs, vec![(GuestAddress(BUF), 512)]);
}

/// The status is the stream's last byte: a one-byte writable descriptor
/// before the data is data.
#[test]
fn status_descriptor_in_the_middle_is_data() {
    let (r, req) = parse(
        header(VIRTIO_BLK_T_IN, 0),
        &[(HDR, 16, R), (STATUS, 1, W), (BUF, 512, W)],
        false,
    );
    r.unwrap();
    assert_eq!(req.len, 512);
    assert_eq!(
        req.segs,
        vec![(GuestAddress(STATUS), 1), (GuestAddress(BUF), 511)]
    );
    assert_eq!(req.status, GuestAddress(BUF + 511));
}

/// Zero-length descriptors carry no bytes, wherever they point.
#[test]
fn zero_length_descriptors_are_skipped() {
    let (r, req) = parse(
        header(VIRTIO_BLK_T_IN, 0),
        &[
            (HDR, 16, R),
            (1 << 40, 0, R),
            (BUF, 512, W),
            (1 << 40, 0, W),
            (STATUS, 1, W),
        ],
        false,
    );
    r.unwrap();
    assert_eq!(req.segs, vec![(GuestAddress(BUF), 512)]);
    assert_eq!(req.status, GuestAddress(STATUS));
}

#[test]
fn read_of_the_last_sector_and_empty_read_at_the_end() {
    let (r, req) = parse(
        header(0, CAP / 512 - 1),
        &[(HDR, 16, R), (BUF, 512, W), (STATUS, 1, W)],
        false,
    );
    r.unwrap();
    assert_eq!((req.offset, req.len), (CAP - 512, 512));
    let (r, req) = parse(header(0, CAP / 512), &[(HDR, 16, R), (STATUS, 1, W)], false);
    r.unwrap();
    assert_eq!((req.offset, req.len), (CAP, 0));
    assert!(req.segs.is_empty());
}

#[test]
fn flush() {
    let (r, req) = parse(
        header(VIRTIO_BLK_T_FLUSH, 0),
        &[(HDR, 16, R), (STATUS, 1, W)],
        true,
    );
    r.unwrap();
    assert_eq!((req.kind, req.len), (Some(Kind::Flush), 0));
    assert!(req.segs.is_empty());
    // Data on a flush is not looked at: nothing of it is used.
    let (r, req) = parse(
        header(VIRTIO_BLK_T_FLUSH, 99),
        &[(HDR, 16, R), (BUF, 7, R), (BUF2, 9, W), (STATUS, 1, W)],
        false,
    );
    r.unwrap();
    assert_eq!((req.kind, req.len, req.offset), (Some(Kind::Flush), 0, 0));
    assert!(req.segs.is_empty());
}

/// GET_ID: any writable size is accepted (the worker writes at most the
/// 20-byte ID); the ID is written across the descriptors.
#[test]
fn get_id_buffer_sizes() {
    for n in [0u32, 1, 20, 30] {
        let (r, req) = parse(
            header(VIRTIO_BLK_T_GET_ID, 0),
            &[(HDR, 16, R), (BUF, n, W), (STATUS, 1, W)],
            true,
        );
        r.unwrap();
        assert_eq!((req.kind, req.len), (Some(Kind::GetId), u64::from(n)));
    }
    let mem = guest();
    let (r, req) = parse_in(
        &mem,
        header(VIRTIO_BLK_T_GET_ID, 0),
        &[(HDR, 16, R), (BUF, 5, W), (BUF2, 15, W), (STATUS, 1, W)],
        false,
    );
    r.unwrap();
    let id: Vec<u8> = (1..=20).collect();
    assert!(req.write_data(&mem, 0, &id));
    let (mut a, mut b) = ([0u8; 6], [0u8; 16]);
    mem.read_slice(&mut a, GuestAddress(BUF)).unwrap();
    mem.read_slice(&mut b, GuestAddress(BUF2)).unwrap();
    assert_eq!(a, [1, 2, 3, 4, 5, 0]);
    assert_eq!(&b[..15], &id[5..]);
    assert_eq!(b[15], 0);
    // Not a byte more than the request's data.
    assert!(!req.write_data(&mem, 1, &id));
}

#[test]
fn read_only_device_serves_reads_flushes_and_ids() {
    for typ in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID] {
        let (r, _) = parse(
            header(typ, 0),
            &[(HDR, 16, R), (BUF, 512, W), (STATUS, 1, W)],
            true,
        );
        r.unwrap();
    }
}

#[test]
fn indirect_chain() {
    let mem = guest();
    mem.write_slice(&header(VIRTIO_BLK_T_IN, 1), GuestAddress(HDR))
        .unwrap();
    let table = [
        raw(HDR, 16, NEXT, 1),
        raw(BUF, 512, WRITE | NEXT, 2),
        raw(STATUS, 1, WRITE, 0),
    ];
    for (i, d) in table.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(TABLE + 16 * i as u64))
            .unwrap();
    }
    let chain = pop(&mem, &[raw(TABLE, 48, INDIRECT, 0)], 0);
    let (r, req) = parse_chain(&mem, chain, CAP, false);
    r.unwrap();
    assert_eq!((req.offset, req.len), (512, 512));
    assert_eq!(req.status, GuestAddress(STATUS));
}

/// A request slot's Request is reused: a refused chain leaves nothing of
/// the one before.
#[test]
fn a_reused_request_is_reset() {
    let mem = guest();
    let (r, mut req) = parse_in(
        &mem,
        header(0, 1),
        &[(HDR, 16, R), (BUF, 512, W), (STATUS, 1, W)],
        false,
    );
    r.unwrap();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let chain = vq
        .build_desc_chain(&[raw(HDR, 16, 0, 0), raw(BUF, 100, WRITE, 0)])
        .unwrap();
    ioerr_with(req.parse(chain, &mem, CAP, false), "multiple of 512");
    assert_eq!((req.kind, req.len, req.offset), (None, 0, 0));
    assert!(req.segs.is_empty());
}
