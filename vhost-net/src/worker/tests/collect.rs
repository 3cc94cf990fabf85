//! [`collect`]: one test per way a chain is refused, and what it accepts.

use super::*;

/// Walks `chain` (with prefetching) and checks nothing was written.
fn walk(mem: &Mem, chain: DescriptorChain<&Mem>) -> Result<Vec<(u64, u32, bool)>, &'static str> {
    let before = buffers(mem);
    let mut out = Vec::new();
    let r = collect(chain, mem, &mut out, 4096);
    assert!(before == buffers(mem), "the walk wrote guest memory");
    r.map(|()| out.iter().map(|s| (s.addr.0, s.len, s.write)).collect())
}

fn walk_table(table: &[RawDescriptor], head: u16) -> Result<Vec<(u64, u32, bool)>, &'static str> {
    let mem = guest();
    walk(&mem, pop(&mem, table, head))
}

#[test]
fn chain_in_order_with_directions() {
    let descs = [
        (BUF, 100, false),
        (BUF2, 50, false),
        (BUF + 512, 1500, true),
    ];
    assert_eq!(walk_table(&linked(&descs), 0).unwrap(), descs);
    // Without a prefetch budget.
    let mem = guest();
    let mut out = vec![];
    collect(pop(&mem, &linked(&descs), 0), &mem, &mut out, 0).unwrap();
    assert_eq!(out.len(), 3);
}

#[test]
fn chain_as_long_as_the_queue() {
    let descs: Vec<_> = (0..u64::from(QSIZE))
        .map(|i| (BUF + 64 * i, 64, false))
        .collect();
    assert_eq!(walk_table(&linked(&descs), 0).unwrap(), descs);
}

/// Zero-length descriptors carry no bytes: accepted, wherever they point
/// (TX and RX refuse chains too short for a vnet header).
#[test]
fn zero_length_descriptors() {
    assert_eq!(
        walk_table(&linked(&[(BUF, 0, false)]), 0).unwrap(),
        [(BUF, 0, false)]
    );
    let descs = [(1 << 40, 0, true), (u64::MAX, 0, true)];
    assert_eq!(walk_table(&linked(&descs), 0).unwrap(), descs);
}

#[test]
fn loop_to_the_head() {
    let table = [raw(BUF, 64, NEXT, 1), raw(BUF2, 64, NEXT, 0)];
    assert_eq!(walk_table(&table, 0), Err(CUT_SHORT));
    assert_eq!(walk_table(&[raw(BUF, 64, NEXT, 0)], 0), Err(CUT_SHORT));
}

#[test]
fn loop_in_the_middle() {
    let table = [
        raw(BUF, 64, NEXT, 1),
        raw(BUF2, 64, NEXT, 2),
        raw(BUF2, 64, WRITE | NEXT, 1),
    ];
    assert_eq!(walk_table(&table, 0), Err(CUT_SHORT));
}

#[test]
fn next_index_past_the_table() {
    for next in [QSIZE, QSIZE + 1, u16::MAX] {
        let table = [raw(BUF, 64, NEXT, 1), raw(BUF2, 64, NEXT, next)];
        assert_eq!(walk_table(&table, 0), Err(CUT_SHORT), "next {next}");
    }
}

#[test]
fn head_past_the_table() {
    assert_eq!(walk_table(&linked(&[(BUF, 64, false)]), QSIZE), Err(EMPTY));
}

#[test]
fn indirect_table() {
    let mem = guest();
    let descs = [(BUF, 12, false), (BUF2, 1500, false)];
    store_table(&mem, TABLE, &linked(&descs));
    let chain = pop(&mem, &[raw(TABLE, 32, INDIRECT, 0)], 0);
    assert_eq!(walk(&mem, chain).unwrap(), descs);
}

/// An indirect table holds its own number of descriptors, which may be
/// more than the queue's.
#[test]
fn indirect_table_longer_than_the_queue() {
    let mem = guest();
    let n = 2 * u64::from(QSIZE);
    let descs: Vec<_> = (0..n).map(|i| (BUF + 64 * i, 64, true)).collect();
    store_table(&mem, TABLE, &linked(&descs));
    let chain = pop(&mem, &[raw(TABLE, 16 * n as u32, INDIRECT, 0)], 0);
    assert_eq!(walk(&mem, chain).unwrap(), descs);
}

/// More descriptors than the indirect table holds: the last one's next
/// index is past the table.
#[test]
fn indirect_chain_past_its_table() {
    let mem = guest();
    let mut table = linked(&[(BUF, 64, false); 4]);
    table[3] = raw(BUF, 64, NEXT, 4);
    store_table(&mem, TABLE, &table);
    // A fifth descriptor lies after the table, outside its length.
    store_table(&mem, TABLE + 64, &[raw(BUF, 64, 0, 0)]);
    let chain = pop(&mem, &[raw(TABLE, 64, INDIRECT, 0)], 0);
    assert_eq!(walk(&mem, chain), Err(CUT_SHORT));
}

/// Over 4 GiB in all: virtio-queue stops the walk.
#[test]
fn chain_over_4_gib() {
    let mem = guest();
    let mib = 1u32 << 20;
    let descs = vec![(u64::from(mib), mib, true); 4096];
    store_table(&mem, TABLE, &linked(&descs));
    let chain = pop(&mem, &[raw(TABLE, 16 * 4096, INDIRECT, 0)], 0);
    assert_eq!(walk(&mem, chain), Err(CUT_SHORT));
    // One descriptor fewer is exactly 4 GiB - 1 MiB: accepted.
    store_table(&mem, TABLE, &linked(&descs[..4095]));
    let chain = pop(&mem, &[raw(TABLE, 16 * 4095, INDIRECT, 0)], 0);
    assert_eq!(walk(&mem, chain).unwrap().len(), 4095);
}

#[test]
fn indirect_table_outside_guest_memory() {
    for at in [MEM, 1 << 40, u64::MAX - 15] {
        assert_eq!(
            walk_table(&[raw(at, 32, INDIRECT, 0)], 0),
            Err(EMPTY),
            "{at:#x}"
        );
    }
}

/// A table running off the end of memory: the walk stops at the first
/// descriptor outside it.
#[test]
fn indirect_table_partly_outside_guest_memory() {
    let mem = guest();
    store_table(&mem, MEM - 16, &[raw(BUF, 64, NEXT, 1)]);
    let chain = pop(&mem, &[raw(MEM - 16, 48, INDIRECT, 0)], 0);
    assert_eq!(walk(&mem, chain), Err(CUT_SHORT));
}

#[test]
fn indirect_table_not_whole_descriptors() {
    let mem = guest();
    store_table(&mem, TABLE, &linked(&[(BUF, 64, false)]));
    for len in [1, 15, 17, 24] {
        let chain = pop(&mem, &[raw(TABLE, len, INDIRECT, 0)], 0);
        assert_eq!(walk(&mem, chain), Err(EMPTY), "{len}");
    }
}

#[test]
fn empty_indirect_table() {
    assert_eq!(walk_table(&[raw(TABLE, 0, INDIRECT, 0)], 0), Err(EMPTY));
}

#[test]
fn nested_indirect_table() {
    let mem = guest();
    // First in the table: nothing walked.
    store_table(&mem, TABLE, &[raw(TABLE + 0x100, 16, INDIRECT, 0)]);
    store_table(&mem, TABLE + 0x100, &linked(&[(BUF, 64, false)]));
    let chain = pop(&mem, &[raw(TABLE, 16, INDIRECT, 0)], 0);
    assert_eq!(walk(&mem, chain), Err(EMPTY));
    // After a descriptor: the walk is cut short.
    store_table(
        &mem,
        TABLE,
        &[raw(BUF, 64, NEXT, 1), raw(TABLE + 0x100, 16, INDIRECT, 0)],
    );
    let chain = pop(&mem, &[raw(TABLE, 32, INDIRECT, 0)], 0);
    assert_eq!(walk(&mem, chain), Err(CUT_SHORT));
}

/// A descriptor not wholly in guest memory, first, in the middle or last.
#[test]
fn descriptor_partly_outside_guest_memory() {
    for bad in [(MEM - 8, 16, false), (MEM - 1, 2, true), (MEM, 1, true)] {
        for pos in 0..3 {
            let mut descs = vec![(BUF, 64, false), (BUF2, 64, true)];
            descs.insert(pos, bad);
            assert_eq!(
                walk_table(&linked(&descs), 0),
                Err(OUTSIDE),
                "{bad:?} at {pos}"
            );
        }
    }
}

#[test]
fn descriptor_wrapping_the_address_space() {
    let descs = [(BUF, 64, false), (u64::MAX - 4, 16, true)];
    assert_eq!(walk_table(&linked(&descs), 0), Err(OUTSIDE));
}

/// Across two adjacent regions the range is in memory (the slow path);
/// across a hole between them it is not.
#[test]
fn descriptor_across_regions() {
    let half = (MEM / 2) as usize;
    let adjacent: Mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), half), (GuestAddress(half as u64), half)])
            .unwrap();
    let descs = linked(&[(BUF, 64, false), (half as u64 - 100, 200, true)]);
    let chain = pop(&adjacent, &descs, 0);
    let mut out = vec![];
    collect(chain, &adjacent, &mut out, 4096).unwrap();
    assert_eq!(out.len(), 2);
    let holed: Mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), half),
        (GuestAddress(half as u64 + 4096), half),
    ])
    .unwrap();
    let chain = pop(&holed, &descs, 0);
    assert_eq!(collect(chain, &holed, &mut out, 4096), Err(OUTSIDE));
}
