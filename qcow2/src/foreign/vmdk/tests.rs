use super::*;

/// A tiny sparse image: 8 grains of 1 sector, 4 GTEs per GT (2 GTs),
/// descriptor at 0x200, GD at sector 30, GT 0 at sector 31, GT 1 absent,
/// grains from sector 32.
fn image(flags: u32, gt0: [u32; 4], desc: &str) -> Vec<u8> {
    let mut f = vec![0u8; 40 * 512];
    f[..4].copy_from_slice(MAGIC);
    let put32 =
        |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put32(&mut f, at::VERSION, 1);
    put32(&mut f, at::FLAGS, flags);
    put64(&mut f, at::CAPACITY, 8);
    put64(&mut f, at::GRAIN, 1);
    put64(&mut f, at::DESC_OFFSET, 1);
    put32(&mut f, at::GTES_PER_GT, 4);
    put64(&mut f, at::GD_OFFSET, 30);
    put64(&mut f, at::GRAIN_OFFSET, 32);
    f[512..512 + desc.len()].copy_from_slice(desc.as_bytes());
    put32(&mut f, 30 * 512, 31);
    for (i, e) in gt0.iter().enumerate() {
        put32(&mut f, 31 * 512 + i * 4, *e);
    }
    for s in 32..40 {
        f[s * 512..(s + 1) * 512].fill(s as u8);
    }
    f
}

const DESC: &str = "# Disk DescriptorFile\nversion=1\nCID=836df646\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n";

fn with_file<T>(bytes: &[u8], f: impl FnOnce(&Storage) -> T) -> T {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let p = std::env::temp_dir().join(format!(
        "rimg-vmdk-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&p, bytes).unwrap();
    let st = Storage::open(&p, false).unwrap();
    std::fs::remove_file(&p).unwrap();
    f(&st)
}

/// The layout of a file that names no extent files.
fn read(st: &Storage) -> Result<VmdkLayout> {
    VmdkLayout::read(st, &|p, _| panic!("opened {}", p.display()))
}

fn err(bytes: &[u8]) -> String {
    with_file(bytes, |st| read(st).unwrap_err().to_string())
}

#[test]
fn grains_holes_and_zeroed_grains() {
    let f = image(FLAG_ZERO_GRAIN, [33, 0, 1, 39], DESC);
    with_file(&f, |st| {
        let l = read(st).unwrap();
        assert_eq!(l.size(), 8 * 512);
        assert_eq!(l.cluster_size(), Some(512));
        assert_eq!((l.cid(), l.parent_cid()), (0x836df646, 0xffff_ffff));
        let data = |host| Where::Data {
            file: 0,
            host,
            recurse: false,
        };
        // One grain per answer, cut at the grain's end.
        assert_eq!(l.lookup(st, 10, 4096).unwrap(), (data(33 * 512 + 10), 502));
        assert_eq!(l.lookup(st, 512, 4096).unwrap(), (Where::Unallocated, 512));
        assert_eq!(l.lookup(st, 1024, 100).unwrap(), (Where::Zero, 100));
        assert_eq!(l.lookup(st, 1536, 512).unwrap(), (data(39 * 512), 512));
        // GT 1 is absent: unallocated.
        assert_eq!(
            l.lookup(st, 7 * 512, 512).unwrap(),
            (Where::Unallocated, 512)
        );
        assert_eq!(l.check(st).unwrap(), CheckReport::default());
    });
    // Without the flag, GTE 1 is a grain at sector 1.
    let f = image(0, [33, 0, 1, 39], DESC);
    with_file(&f, |st| {
        let l = read(st).unwrap();
        assert_eq!(
            l.lookup(st, 1024, 512).unwrap().0,
            Where::Data {
                file: 0,
                host: 512,
                recurse: false
            }
        );
    });
}

#[test]
fn check_stops_at_the_first_grain_past_the_end() {
    let f = image(0, [33, 40, 41, 0], DESC);
    with_file(&f, |st| {
        let r = read(st).unwrap().check(st).unwrap();
        assert_eq!(
            r.messages,
            ["ERROR: cluster offset for sector 1 points after EOF"]
        );
        assert_eq!(r.failed.as_deref(), Some("Invalid argument"));
        assert_eq!(r.corruptions, 1);
    });
}

#[test]
fn a_gd_too_short_for_the_disk_cannot_place_grains() {
    // 2^32 + 8 sectors in GTs of 1 grain: QEMU's u32 count wraps to 8.
    let mut f = image(0, [33, 0, 0, 0], DESC);
    f[at::CAPACITY..at::CAPACITY + 8].copy_from_slice(&((1u64 << 32) + 8).to_le_bytes());
    f[at::GTES_PER_GT..at::GTES_PER_GT + 4].copy_from_slice(&1u32.to_le_bytes());
    with_file(&f, |st| {
        let l = read(st).unwrap();
        assert_eq!(l.extents[0].sparse().unwrap().gd_entries, 8);
        assert_eq!(l.lookup(st, 8 * 512, 512).unwrap().0, Where::Broken);
        let r = l.check(st).unwrap();
        assert_eq!(
            r.messages,
            ["ERROR: could not get cluster_offset for sector 8"]
        );
        assert_eq!(r.failed.as_deref(), Some("Operation not permitted"));
    });
}

#[test]
fn open_errors_in_qemus_order_and_words() {
    let good = image(0, [0; 4], DESC);
    let set = |at: usize, v: &[u8]| {
        let mut f = good.clone();
        f[at..at + v.len()].copy_from_slice(v);
        f
    };
    assert_eq!(
        err(&set(at::VERSION, &4u32.to_le_bytes())),
        "Unsupported VMDK version 4"
    );
    assert_eq!(
        err(&set(at::GTES_PER_GT, &513u32.to_le_bytes())),
        "L2 table size too big"
    );
    assert_eq!(
        err(&set(at::GRAIN, &0u64.to_le_bytes())),
        "L1 entry size is invalid"
    );
    // 2^32 sectors times 1 GTE: wraps to 0 in QEMU's u32.
    let mut f = set(at::GRAIN, &(1u64 << 32).to_le_bytes());
    f[at::GTES_PER_GT..at::GTES_PER_GT + 4].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(err(&f), "L1 entry size is invalid");
    assert_eq!(
        err(&set(at::GRAIN_OFFSET, &41u64.to_le_bytes())),
        "File truncated, expecting at least 20992 bytes"
    );
    assert_eq!(
        err(&set(at::GRAIN, &(MAX_GRAIN_SECTORS + 1).to_le_bytes())),
        "Invalid granularity, image may be corrupt"
    );
    let mut f = set(
        at::CAPACITY,
        &(4u64 * (MAX_GD_ENTRIES as u64 + 1)).to_le_bytes(),
    );
    assert_eq!(err(&f), "L1 size too big");
    f[at::CAPACITY..at::CAPACITY + 8].copy_from_slice(&(1u64 << 54).to_le_bytes());
    f[at::GRAIN..at::GRAIN + 8].copy_from_slice(&MAX_GRAIN_SECTORS.to_le_bytes());
    f[at::GTES_PER_GT..at::GTES_PER_GT + 4].copy_from_slice(&512u32.to_le_bytes());
    assert_eq!(
        err(&f),
        "Could not refresh total sector count: File too large"
    );
    // The GD "at the end" without a footer there.
    assert_eq!(
        err(&set(at::GD_OFFSET, &u64::MAX.to_le_bytes())),
        "Invalid footer"
    );
    // No capacity: the embedded descriptor is the image; QEMU's own
    // (monolithicSparse) is refused by type.
    assert_eq!(
        err(&set(at::CAPACITY, &0u64.to_le_bytes())),
        "Unsupported image type 'monolithicSparse'"
    );
    let e = err(&set(at::GD_OFFSET, &(1u64 << 54).to_le_bytes()));
    assert!(
        e.starts_with("Could not read l1 table from extent '/"),
        "{e}"
    );
    assert!(e.ends_with("': Input/output error"), "{e}");
    // 2^55 sectors wrap to 0 in QEMU's shift: the GD at 0 opens.
    assert!(with_file(
        &set(at::GD_OFFSET, &(1u64 << 55).to_le_bytes()),
        |st| { read(st).is_ok() }
    ));
    let mut f = set(at::RGD_OFFSET, &(1u64 << 54).to_le_bytes());
    assert!(with_file(&f, |st| read(st).is_ok()));
    f[at::FLAGS] = FLAG_RGD as u8;
    assert!(err(&f).starts_with("Could not read l1 backup table from extent '/"));
    // No CID: EINVAL.
    let f = image(0, [0; 4], "version=1\nXID=1\nparentXID=2\n");
    assert!(err(&f).ends_with("': Invalid argument"), "{}", err(&f));
    let f = image(
        0,
        [0; 4],
        "parentFileNameHint=\"b.vmdk\"\nCID=1\nparentCID=2\n",
    );
    let parent = with_file(&f, |st| read(st).unwrap().parent());
    assert_eq!(parent.as_deref(), Some("b.vmdk"));
    assert_eq!(err(b"version=1\n"), "invalid VMDK image descriptor");
    // A descriptor without extents opens as far as its missing CID.
    assert!(err(b"version=1\ncreateType=\"monolithicFlat\"\n").ends_with("Invalid argument"));
    assert_eq!(
        err(b"version=1\ncreateType=\"streamOptimized\"\n"),
        "Unsupported image type 'streamOptimized'"
    );
    assert_eq!(
        err(b"version=1\ncreateType=\"monolithicFlat\n"),
        "invalid VMDK image descriptor"
    );
    assert!(err(b"COWD").contains("COWD"));
}

/// A stream: grain 0 deflated after a marker at sector 33, the GD "at
/// the end" and the header in a footer; a marker QEMU refuses is EINVAL.
#[test]
fn compressed_grains_through_a_footer() {
    use std::io::Write;
    let mut f = image(FLAG_MARKER, [33, 0, 0, 0], DESC);
    f[at::COMPRESSION..at::COMPRESSION + 2].copy_from_slice(&1u16.to_le_bytes());
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&[0xab; 512]).unwrap();
    let z = z.finish().unwrap();
    let grain = 33 * 512;
    f[grain..grain + 8].copy_from_slice(&0u64.to_le_bytes());
    f[grain + 8..grain + 12].copy_from_slice(&(z.len() as u32).to_le_bytes());
    f[grain + 12..grain + 12 + z.len()].copy_from_slice(&z);
    let header = f[..512].to_vec();
    f[at::GD_OFFSET..at::GD_OFFSET + 8].copy_from_slice(&GD_AT_END.to_le_bytes());
    let mut marker = vec![0u8; 512];
    marker[..8].copy_from_slice(&1u64.to_le_bytes());
    marker[12..16].copy_from_slice(&3u32.to_le_bytes());
    f.extend_from_slice(&marker);
    f.extend_from_slice(&header);
    f.extend_from_slice(&[0u8; 512]);
    with_file(&f, |st| {
        let l = read(st).unwrap();
        assert_eq!(l.create_type(), "streamOptimized");
        assert_eq!(
            l.lookup(st, 100, 1000).unwrap(),
            (
                Where::Compressed {
                    file: 0,
                    host: 33 * 512,
                    skip: 100
                },
                412
            )
        );
        let mut b = [0u8; 300];
        l.read_compressed(st, 0, 33 * 512, 100, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0xab));
        // More than the grain holds: EINVAL, as QEMU.
        let mut b = [0u8; 513];
        assert!(l.read_compressed(st, 0, 33 * 512, 0, &mut b).is_err());
    });
    // A compressed length of 0, or past two grains: EINVAL.
    for bad in [0u32, 1025] {
        let mut g = f.clone();
        g[grain + 8..grain + 12].copy_from_slice(&bad.to_le_bytes());
        with_file(&g, |st| {
            let l = read(st).unwrap();
            let e = l
                .read_compressed(st, 0, 33 * 512, 0, &mut [0u8; 512])
                .unwrap_err();
            assert!(e.to_string().contains("Invalid argument"), "{e}");
        });
    }
    // The footer's checks, one field at a time.
    let end = f.len();
    for (at, v) in [
        (end - 1536 + 12, 2u32),
        (end - 1536 + 8, 1),
        (end - 512 + 12, 1),
    ] {
        let mut g = f.clone();
        g[at..at + 4].copy_from_slice(&v.to_le_bytes());
        assert_eq!(err(&g), "Invalid footer");
    }
}

/// A descriptor with no extents (or only empty ones) is a 0-byte disk:
/// block status of the empty range at its end answers, no panic.
#[test]
fn an_empty_disk_answers_at_its_end() {
    let d = b"version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n";
    with_file(d, |st| {
        let l = read(st).unwrap();
        assert_eq!(l.size(), 0);
        assert_eq!(l.lookup(st, 0, 0).unwrap(), (Where::Zero, 0));
        assert!(l.check(st).unwrap().messages.is_empty());
    });
}
