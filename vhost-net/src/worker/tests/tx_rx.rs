//! What TX and RX refuse of a walked chain, on a pair worker whose TAP
//! is a stand-in (nothing here reaches the device or the io_uring).

use std::fs::File;

use vm_memory::GuestMemoryBackend;

use super::super::tx::TxFrame;
use super::*;
use crate::tap::Tap;

/// A pair worker on `mem` with guest header length `hdr_len`; the memory
/// as the worker sees it.
fn worker(mem: &Mem, hdr_len: usize, mrg_rxbuf: bool) -> (PairWorker, Arc<Mem>) {
    let tap = Tap::from_files("rimg-test", vec![File::open("/dev/null").unwrap()]);
    let gm = GM::new(mem.clone());
    let arc = gm.memory().into_inner();
    let mut w = PairWorker::new(0, Arc::new(tap), gm).unwrap();
    w.set_negotiated(crate::config::Negotiated {
        hdr_len,
        mrg_rxbuf,
        tap_offloads: 0,
    });
    (w, arc)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 + 1).collect()
}

// ----- TX -----

/// Walks and prepares the TX chain `table` (head 0) into slot 0; checks
/// nothing was written to guest memory.
fn tx(
    w: &mut PairWorker,
    mem: &Arc<Mem>,
    table: &[RawDescriptor],
) -> Result<TxFrame, &'static str> {
    let before = buffers(mem);
    let chain = pop(mem, table, 0);
    let walked = w.walk_tx(chain, mem);
    let r = walked
        .walked
        .and_then(|()| w.prepare_tx(&walked.segs, mem, 0));
    assert!(before == buffers(mem), "TX wrote guest memory");
    r
}

fn tx_err(w: &mut PairWorker, mem: &Arc<Mem>, table: &[RawDescriptor]) -> &'static str {
    match tx(w, mem, table) {
        Err(e) => e,
        Ok(_) => panic!("TX chain accepted"),
    }
}

#[test]
fn tx_frame_copied_with_its_header() {
    let mem = guest();
    let (mut w, mem) = worker(&mem, 12, false);
    let (hdr, frame) = (pattern(12), pattern(60));
    mem.write_slice(&hdr, GuestAddress(BUF)).unwrap();
    mem.write_slice(&frame, GuestAddress(BUF2)).unwrap();
    let table = linked(&[(BUF, 12, false), (BUF2, 60, false)]);
    let Ok(TxFrame::Copied(72)) = tx(&mut w, &mem, &table) else {
        panic!("not copied");
    };
    assert_eq!(&w.tx.slot(0)[..12], &hdr[..]);
    assert_eq!(&w.tx.slot(0)[12..72], &frame[..]);
    assert_eq!((w.stats.tx_frames.get(), w.stats.tx_dropped.get()), (1, 0));
}

/// A 10-byte guest header: the frame lands after a zero gap, at the
/// TAP's 12.
#[test]
fn tx_legacy_header_gets_a_gap() {
    let mem = guest();
    let (mut w, mem) = worker(&mem, 10, false);
    let data = pattern(70);
    mem.write_slice(&data, GuestAddress(BUF)).unwrap();
    w.tx.slot(0)[10..12].fill(0xff);
    let Ok(TxFrame::Copied(72)) = tx(&mut w, &mem, &linked(&[(BUF, 70, false)])) else {
        panic!("not copied");
    };
    let slot = w.tx.slot(0);
    assert_eq!(&slot[..10], &data[..10]);
    assert_eq!(&slot[10..12], &[0, 0]);
    assert_eq!(&slot[12..72], &data[10..]);
}

#[test]
fn tx_frame_written_in_place() {
    let mem = guest();
    let (mut w, mem) = worker(&mem, 12, false);
    let Ok(TxFrame::InPlace(ptr, 300)) = tx(&mut w, &mem, &linked(&[(BUF, 300, false)])) else {
        panic!("not in place");
    };
    let at = mem.get_slice(GuestAddress(BUF), 300).unwrap();
    assert_eq!(ptr, at.ptr_guard().as_ptr());
}

#[test]
fn tx_writable_descriptor() {
    let mem = guest();
    let (mut w, mem) = worker(&mem, 12, false);
    for descs in [
        &[(BUF, 12, false), (BUF2, 60, true)][..],
        // Not written in place either.
        &[(BUF, 300, true)],
    ] {
        assert_eq!(
            tx_err(&mut w, &mem, &linked(descs)),
            "device-writable descriptor in a TX chain"
        );
    }
}

#[test]
fn tx_chain_shorter_than_the_vnet_header() {
    let mem = guest();
    let (mut w, mem) = worker(&mem, 12, false);
    for descs in [
        &[(BUF, 11, false)][..],
        &[(BUF, 0, false)],
        &[(BUF, 4, false), (BUF2, 4, false)],
    ] {
        assert_eq!(
            tx_err(&mut w, &mem, &linked(descs)),
            "chain shorter than the vnet header"
        );
    }
}

#[test]
fn tx_frame_shorter_than_an_ethernet_header() {
    let mem = guest();
    let (mut w, mem) = worker(&mem, 12, false);
    assert_eq!(
        tx_err(&mut w, &mem, &linked(&[(BUF, 12 + 13, false)])),
        "frame shorter than an Ethernet header"
    );
}

#[test]
fn tx_frame_larger_than_a_slot() {
    let mem = guest();
    for (hdr, descs) in [
        (12, vec![(BUF, SLOT_LEN as u32 + 1, false)]),
        (
            12,
            vec![(BUF, 12, false), (BUF2, SLOT_LEN as u32 - 11, false)],
        ),
        // The 2-byte gap pushes it over.
        (10, vec![(BUF, SLOT_LEN as u32 - 1, false)]),
    ] {
        let (mut w, mem) = worker(&mem, hdr, false);
        assert_eq!(
            tx_err(&mut w, &mem, &linked(&descs)),
            "frame larger than 64 KiB"
        );
    }
}

#[test]
fn tx_chain_refused_by_the_walk() {
    let mem = guest();
    let (mut w, mem) = worker(&mem, 12, false);
    assert_eq!(tx_err(&mut w, &mem, &[raw(BUF, 64, NEXT, 0)]), CUT_SHORT);
    assert_eq!(
        tx_err(&mut w, &mem, &linked(&[(MEM - 8, 64, false)])),
        OUTSIDE
    );
    assert_eq!(tx_err(&mut w, &mem, &[raw(MEM, 32, INDIRECT, 0)]), EMPTY);
}

// ----- RX -----

/// Places a frame of `n` bytes (after the TAP's header) into the chains
/// of `q`; returns place()'s verdict.
fn rx(w: &mut PairWorker, mem: &Arc<Mem>, q: &mut Queue, n: usize) -> Option<bool> {
    let slot = w.rx.slot(0);
    slot[..TAP_HDR_LEN].copy_from_slice(&pattern(TAP_HDR_LEN));
    slot[TAP_HDR_LEN..TAP_HDR_LEN + n].copy_from_slice(&pattern(n));
    w.place(q, mem, 0, TAP_HDR_LEN + n)
}

/// The used ring: its index and the (id, len) elements up to it.
fn used(mem: &Mem, q: &Queue) -> Vec<(u32, u32)> {
    let at = q.used_ring();
    let idx: u16 = mem.read_obj(GuestAddress(at + 2)).unwrap();
    (0..u64::from(idx))
        .map(|i| {
            let id: u32 = mem.read_obj(GuestAddress(at + 4 + 8 * i)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 8 + 8 * i)).unwrap();
            (id, len)
        })
        .collect()
}

/// A frame RX drops: the chains go back unused and no buffer is written.
fn rx_dropped(
    w: &mut PairWorker,
    mem: &Arc<Mem>,
    table: &[RawDescriptor],
    heads: &[u16],
) -> Vec<(u32, u32)> {
    let mut q = queue(mem, table, heads);
    let before = buffers(mem);
    assert_eq!(rx(w, mem, &mut q, 100), Some(false));
    assert!(before == buffers(mem), "RX wrote a refused chain");
    used(mem, &q)
}

#[test]
fn rx_frame_delivered() {
    let mem = guest();
    let (mut w, mem) = worker(&mem, 12, false);
    let mut q = queue(&mem, &linked(&[(BUF, 40, true), (BUF2, 1500, true)]), &[0]);
    assert_eq!(rx(&mut w, &mem, &mut q, 100), Some(true));
    assert_eq!(used(&mem, &q), [(0, 112)]);
    let mut got = vec![0u8; 112];
    mem.read_slice(&mut got[..40], GuestAddress(BUF)).unwrap();
    mem.read_slice(&mut got[40..], GuestAddress(BUF2)).unwrap();
    let mut want = pattern(12);
    want[10..12].copy_from_slice(&1u16.to_le_bytes());
    want.extend(pattern(100));
    assert_eq!(got, want);
}

/// MRG_RXBUF: a frame over several chains, num_buffers counting them.
#[test]
fn rx_frame_over_merged_buffers() {
    let mem = guest();
    let (mut w, mem) = worker(&mem, 12, true);
    let table = [raw(BUF, 64, WRITE, 0), raw(BUF2, 64, WRITE, 0)];
    let mut q = queue(&mem, &table, &[0, 1]);
    assert_eq!(rx(&mut w, &mem, &mut q, 100), Some(true));
    assert_eq!(used(&mem, &q), [(0, 64), (1, 48)]);
    let n: u16 = mem.read_obj(GuestAddress(BUF + 10)).unwrap();
    assert_eq!(n, 2);
}

#[test]
fn rx_readable_descriptor() {
    for descs in [
        &[(BUF, 200, false)][..],
        &[(BUF, 100, true), (BUF2, 100, false)],
    ] {
        let (mut w, mem) = worker(&guest(), 12, false);
        assert_eq!(rx_dropped(&mut w, &mem, &linked(descs), &[0]), [(0, 0)]);
    }
    // A readable descriptor in the second chain of a merged frame: both
    // chains go back, nothing written.
    let (mut w, mem) = worker(&guest(), 12, true);
    let table = [raw(BUF, 64, WRITE, 0), raw(BUF2, 64, 0, 0)];
    assert_eq!(rx_dropped(&mut w, &mem, &table, &[0, 1]), [(0, 0), (1, 0)]);
}

#[test]
fn rx_chain_shorter_than_the_vnet_header() {
    let (mut w, mem) = worker(&guest(), 12, true);
    let table = linked(&[(BUF, 11, true)]);
    assert_eq!(rx_dropped(&mut w, &mem, &table, &[0]), [(0, 0)]);
}

/// Without MRG_RXBUF a frame must fit one chain.
#[test]
fn rx_chain_too_small_for_the_frame() {
    let (mut w, mem) = worker(&guest(), 12, false);
    let table = [raw(BUF, 64, WRITE, 0), raw(BUF2, 64, WRITE, 0)];
    assert_eq!(rx_dropped(&mut w, &mem, &table, &[0, 1]), [(0, 0)]);
}

#[test]
fn rx_chain_refused_by_the_walk() {
    for table in [
        vec![raw(BUF, 64, WRITE | NEXT, 0)],
        linked(&[(MEM - 8, 200, true)]),
        vec![raw(MEM, 32, INDIRECT, 0)],
    ] {
        let (mut w, mem) = worker(&guest(), 12, false);
        assert_eq!(rx_dropped(&mut w, &mem, &table, &[0]), [(0, 0)]);
    }
    // A head past the table cannot even be returned.
    let (mut w, mem) = worker(&guest(), 12, false);
    assert_eq!(
        rx_dropped(&mut w, &mem, &linked(&[(BUF, 200, true)]), &[QSIZE]),
        []
    );
}

/// Too few buffers: nothing is taken or written, and the frame waits.
#[test]
fn rx_waits_for_buffers() {
    let (mut w, mem) = worker(&guest(), 12, true);
    let mut q = queue(&mem, &[], &[]);
    assert_eq!(rx(&mut w, &mem, &mut q, 100), None);
    let mut q = queue(&mem, &[raw(BUF, 64, WRITE, 0)], &[0]);
    let before = buffers(&mem);
    assert_eq!(rx(&mut w, &mem, &mut q, 100), None);
    assert_eq!(q.next_avail(), 0);
    assert!(before == buffers(&mem));
    assert_eq!(used(&mem, &q), []);
}
