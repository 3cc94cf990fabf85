//! Parsing and bounds of the bitmaps extension, directory and tables.

use super::*;

fn dir_entry(name: &str, table_offset: u64, table_size: u32, flags: u32, gb: u8) -> DirEntry {
    DirEntry {
        table_offset,
        table_size,
        flags,
        granularity_bits: gb,
        name: name.as_bytes().to_vec(),
    }
}

#[test]
fn extension_round_trips_and_is_bounded() {
    let e = BitmapsExt {
        nb_bitmaps: 2,
        directory_size: 64,
        directory_offset: 0x30000,
    };
    assert_eq!(BitmapsExt::parse(&e.encode(), 65536), Ok(e));
    let mut raw = e.encode();
    raw[7] = 1;
    assert_eq!(
        BitmapsExt::parse(&raw, 65536),
        Err(BitmapError::ExtReserved)
    );
    assert_eq!(
        BitmapsExt::parse(&raw[..16], 65536),
        Err(BitmapError::ExtLength(16))
    );
    let many = BitmapsExt {
        nb_bitmaps: MAX_BITMAPS + 1,
        ..e
    };
    assert_eq!(
        BitmapsExt::parse(&many.encode(), 65536),
        Err(BitmapError::TooMany(MAX_BITMAPS + 1))
    );
    let none = BitmapsExt { nb_bitmaps: 0, ..e };
    assert_eq!(
        BitmapsExt::parse(&none.encode(), 65536),
        Err(BitmapError::NoBitmaps)
    );
    let unaligned = BitmapsExt {
        directory_offset: 0x30200,
        ..e
    };
    assert!(matches!(
        BitmapsExt::parse(&unaligned.encode(), 65536),
        Err(BitmapError::DirectoryOffset(_))
    ));
    let big = BitmapsExt {
        directory_size: MAX_DIRECTORY_SIZE + 8,
        ..e
    };
    assert!(matches!(
        BitmapsExt::parse(&big.encode(), 65536),
        Err(BitmapError::DirectoryTooBig(_))
    ));
}

#[test]
fn directory_round_trips() {
    let d = vec![
        dir_entry("a", 0x10000, 1, flags::AUTO, 16),
        dir_entry("longer-name", 0x20000, 1, flags::IN_USE, 9),
    ];
    let raw = encode_directory(&d);
    assert_eq!(raw.len() % 8, 0);
    let e = BitmapsExt {
        nb_bitmaps: 2,
        directory_size: raw.len() as u64,
        directory_offset: 0x30000,
    };
    assert_eq!(parse_directory(&raw, &e, 65536, 1 << 20), Ok(d));
}

#[test]
fn directory_constraints_are_enforced() {
    let cs = 65536;
    let check = |d: DirEntry, size: u64| {
        let raw = encode_directory(std::slice::from_ref(&d));
        let e = BitmapsExt {
            nb_bitmaps: 1,
            directory_size: raw.len() as u64,
            directory_offset: cs,
        };
        parse_directory(&raw, &e, cs, size)
    };
    let c = |n: &str| Err(BitmapError::Constraints(n.into()));
    assert_eq!(check(dir_entry("t0", 0x10000, 0, 0, 16), 1 << 20), c("t0"));
    assert_eq!(check(dir_entry("o0", 0, 1, 0, 16), 1 << 20), c("o0"));
    assert_eq!(check(dir_entry("un", 0x10200, 1, 0, 16), 1 << 20), c("un"));
    assert_eq!(check(dir_entry("g8", 0x10000, 1, 0, 8), 1 << 20), c("g8"));
    assert_eq!(
        check(dir_entry("g32", 0x10000, 1, 0, 32), 1 << 20),
        c("g32")
    );
    assert_eq!(check(dir_entry("rf", 0x10000, 1, 4, 16), 1 << 20), c("rf"));
    assert_eq!(
        check(dir_entry("ts", 0x10000, MAX_TABLE_SIZE + 1, 0, 16), 1 << 20),
        c("ts")
    );
    // One cluster of data covers 2^19 granules of 512 bytes: 256 MiB.
    assert_eq!(check(dir_entry("sm", 0x10000, 1, 0, 9), 1 << 29), c("sm"));
    // An in-use bitmap may be too small (stale after a resize).
    assert!(check(dir_entry("sm", 0x10000, 1, flags::IN_USE, 9), 1 << 29).is_ok());
    let long = "x".repeat(MAX_NAME_SIZE + 1);
    assert!(check(dir_entry(&long, 0x10000, 1, 0, 16), 1 << 20).is_err());
}

#[test]
fn directory_count_and_framing_are_checked() {
    let d = vec![dir_entry("a", 0x10000, 1, 0, 16)];
    let raw = encode_directory(&d);
    let e = |n| BitmapsExt {
        nb_bitmaps: n,
        directory_size: raw.len() as u64,
        directory_offset: 0x30000,
    };
    assert_eq!(
        parse_directory(&raw, &e(2), 65536, 1 << 20),
        Err(BitmapError::FewerThanHeader)
    );
    let two = encode_directory(&[d[0].clone(), d[0].clone()]);
    assert_eq!(
        parse_directory(&two, &e(1), 65536, 1 << 20),
        Err(BitmapError::MoreThanHeader)
    );
    assert_eq!(
        parse_directory(&raw[..raw.len() - 8], &e(1), 65536, 1 << 20),
        Err(BitmapError::BrokenDirectory)
    );
    let mut extra = raw.clone();
    extra[23] = 8;
    extra.extend_from_slice(&[0; 8]);
    assert_eq!(
        parse_directory(&extra, &e(1), 65536, 1 << 20),
        Err(BitmapError::ExtraData)
    );
}

#[test]
fn table_entries_are_checked() {
    let cs = 65536;
    assert!(check_table_entry(0, cs));
    assert!(check_table_entry(entry::ALL_ONES, cs));
    assert!(check_table_entry(0x30000, cs));
    assert!(!check_table_entry(0x30000 | entry::ALL_ONES, cs));
    assert!(!check_table_entry(0x30200, cs));
    assert!(!check_table_entry(1 << 63, cs));
    assert!(!check_table_entry(2, cs));
    let d = dir_entry("a", 0x10000, 2, 0, 16);
    let mut raw = 0x30000u64.to_be_bytes().to_vec();
    raw.extend_from_slice(&0x30200u64.to_be_bytes());
    assert!(matches!(
        parse_table(&raw, &d, cs),
        Err(BitmapError::TableEntry { index: 1, .. })
    ));
}

#[test]
fn sizes_follow_qemu() {
    assert_eq!(data_bytes(1 << 30, 16), 2048);
    assert_eq!(table_size_for(1 << 30, 16, 65536), 1);
    assert_eq!(table_size_for(1 << 40, 9, 512), (1u64 << 28) / 512);
    assert!(check_new_bitmap("b", 65536, 1 << 30, 65536).is_ok());
    assert!(check_new_bitmap("b", 256, 1 << 30, 65536)
        .unwrap_err()
        .contains("under minimum"));
    assert!(check_new_bitmap("b", 1 << 32, 1 << 30, 65536)
        .unwrap_err()
        .contains("exceeds maximum"));
}
