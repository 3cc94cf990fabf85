//! rimg against qemu-img, step for step, where the iotests compare their
//! words: check -r (039, 138, 214, 112), "Image is too big" (054),
//! snapshot and amend errors (080, 112), amend size=, rebase -c and -u -F (314, 031),
//! convert -l (029) and convert's allocation order (122). Each case runs
//! the same commands with both tools in twin directories and compares
//! exit codes and output; qemu-img then checks every image written.

use std::os::unix::fs::FileExt;

use rimg_tests::twins::Twins;

const IMG: &str = "t.qcow2";

/// Host offsets of the refcount block, the first L2 table and the first
/// data cluster of `IMG`.
fn layout(t: &Twins) -> (u64, u64, u64) {
    let rt = t.be64(IMG, 48);
    let l1 = t.be64(IMG, 40);
    let refblock = t.be64(IMG, rt) & !511;
    let l2 = t.be64(IMG, l1) & 0x00ff_ffff_ffff_fe00;
    let data = t.be64(IMG, l2) & 0x00ff_ffff_ffff_fe00;
    (refblock, l2, data)
}

fn image_with_data(t: &Twins, opts: &str) {
    t.create(IMG, opts, None, "1M");
    t.io(IMG, &["write -P 0x5a 0 64k"]);
}

#[test]
fn check_rebuilds_for_a_zero_refcount() {
    let t = Twins::new();
    image_with_data(&t, "cluster_size=65536");
    let (refblock, _, data) = layout(&t);
    t.poke(IMG, refblock + (data >> 16) * 2, &[0, 0]);
    t.same(&["check", IMG]);
    let (_, err) = t.same(&["check", "-r", "all", IMG]);
    assert!(err.contains("Rebuilding refcount structure"), "{err}");
    t.check_clean(IMG);
}

#[test]
fn check_repairs_refcounts_one_by_one() {
    // Too low (a snapshot shares the data cluster) and too high.
    let t = Twins::new();
    image_with_data(&t, "cluster_size=65536");
    t.both("qemu-img", &["snapshot", "-c", "s", IMG]);
    let (refblock, _, data) = layout(&t);
    t.poke(IMG, refblock + (data >> 16) * 2, &[0, 1]);
    t.poke(IMG, refblock, &[0, 2]);
    t.same(&["check", IMG]);
    let (_, err) = t.same(&["check", "-r", "all", IMG]);
    assert!(
        err.contains("Repairing cluster 0 refcount=2 reference=1"),
        "{err}"
    );
    t.check_clean(IMG);
    t.same(&["check", "-r", "leaks", IMG]);
}

#[test]
fn check_reports_references_past_the_refcount_width() {
    let t = Twins::new();
    image_with_data(&t, "refcount_bits=1");
    let (_, l2, _) = layout(&t);
    let e = t.be64(IMG, l2);
    t.poke(IMG, l2 + 8, &e.to_be_bytes());
    let (_, err) = t.same(&["check", IMG]);
    assert!(err.contains("ERROR: overflow cluster offset="), "{err}");
    t.same(&["check", "-r", "all", IMG]);
    t.same(&["amend", "-o", "refcount_bits=2", IMG]);
    t.same(&["check", "-r", "all", IMG]);
    t.check_clean(IMG);
}

#[test]
fn open_refuses_an_image_too_big() {
    let t = Twins::new();
    t.create(IMG, "", None, "4G");
    t.poke(IMG, 24, &(1u64 << 60).to_be_bytes());
    assert!(t.same(&["info", IMG]).1.contains("Image is too big"));
    t.poke(IMG, 24, &(1u64 << 40).to_be_bytes());
    assert!(t.same(&["info", IMG]).1.contains("L1 table is too small"));
}

#[test]
fn snapshot_create_errors_are_errnos() {
    // refcount_bits=1: a snapshot would need refcounts of 2.
    let t = Twins::new();
    image_with_data(&t, "refcount_bits=1");
    let (_, err) = t.same(&["snapshot", "-c", "foo", IMG]);
    assert!(err.contains("Could not create snapshot 'foo': Invalid argument"));
    t.same(&["check", IMG]);
    t.same(&["check", "-r", "all", IMG]);
    t.check_clean(IMG);
    // A full snapshot table.
    let t = Twins::new();
    t.create(IMG, "", None, "64M");
    t.poke(IMG, 64, &0x1_0000_0000u64.to_be_bytes());
    t.poke(IMG, 60, &0x10000u32.to_be_bytes());
    let (_, err) = t.same(&["snapshot", "-c", "test", IMG]);
    assert!(err.contains("File too large"), "{err}");
}

#[test]
fn amend_refcount_width_messages() {
    let t = Twins::new();
    image_with_data(&t, "refcount_bits=64");
    t.same(&["amend", "-o", "compat=0.10", IMG]);
    t.same(&["amend", "-o", "compat=0.10,refcount_bits=16", IMG]);
    t.same_info(IMG, "refcount bits");
    t.same(&["amend", "-o", "compat=1.1", IMG]);
    t.same(&["amend", "-o", "refcount_bits=32,compat=0.10", IMG]);
    t.check_clean(IMG);
    // A shared cluster cannot go down to one bit.
    t.both("qemu-img", &["snapshot", "-c", "s", IMG]);
    let (_, err) = t.same(&["amend", "-o", "refcount_bits=1", IMG]);
    assert!(err.contains("Cannot decrease refcount entry width to 1 bits"));
    t.same(&["amend", "-o", "refcount_bits=2", IMG]);
    t.check_clean(IMG);
}

/// `amend -o size=` grows and shrinks as qemu-img's does, also with
/// internal snapshots (version 3), and changes the size before a
/// downgrade, which then fails on the snapshot with qemu-img's words
/// (the size change stays, as in qemu-img).
#[test]
fn amend_changes_the_size() {
    let t = Twins::new();
    image_with_data(&t, "compat=1.1");
    t.same(&["amend", "-o", "size=2M", IMG]);
    t.same_info(IMG, "virtual size");
    t.same(&["amend", "-o", "size=32k", IMG]);
    t.same_info(IMG, "virtual size");
    t.check_clean(IMG);
    t.both("qemu-img", &["snapshot", "-c", "s", IMG]);
    t.same(&["amend", "-o", "size=4M", IMG]);
    t.same_info(IMG, "virtual size");
    let (_, err) = t.same(&["amend", "-o", "compat=0.10,size=1M", IMG]);
    assert!(
        err.contains("Internal snapshots prevent downgrade"),
        "{err}"
    );
    t.same_info(IMG, "virtual size");
    t.same(&["amend", "-o", "size=junk", IMG]);
    t.check_clean(IMG);
}

#[test]
fn rebase_compressed_and_unsafe_format_names() {
    let t = Twins::new();
    t.create("b.qcow2", "", None, "4M");
    t.io("b.qcow2", &["write -P 0xaa 0 2M"]);
    t.create(IMG, "", Some("b.qcow2"), "");
    t.io(IMG, &["write -c -P 0xbb 2M 2M"]);
    t.same(&["rebase", "-c", "-f", "qcow2", "-b", "", IMG]);
    t.same(&["check", IMG]);
    t.check_clean(IMG);
    t.same(&["compare", "-f", "qcow2", "-F", "qcow2", IMG, "../q/t.qcow2"]);
    t.both("qemu-img", &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    t.same(&["rebase", "-c", "-f", "raw", "-b", "", "r.raw"]);
    t.same(&["rebase", "-u", "-b", "/some/path", "-F", "host_device", IMG]);
    t.same(&["rebase", "-u", "-b", "/some/path", "-F", "nosuch", IMG]);
    t.same_info(IMG, "backing");
}

#[test]
fn convert_from_an_internal_snapshot() {
    let t = Twins::new();
    image_with_data(&t, "cluster_size=65536");
    t.both("qemu-img", &["snapshot", "-c", "foo", IMG]);
    t.io(IMG, &["write -P 0x22 32k 128k"]);
    t.same(&["convert", "-l", "foo", "-O", "qcow2", IMG, "s.qcow2"]);
    t.same(&["convert", "-l", "snapshot.id=1", "-O", "raw", IMG, "s.raw"]);
    t.same(&["convert", "-l", "nope", IMG, "n.raw"]);
    t.check_clean("s.qcow2");
    t.same(&["compare", "s.qcow2", "s.raw"]);
    t.same(&["compare", "s.qcow2", "../q/s.qcow2"]);
}

#[test]
fn convert_allocates_in_guest_order() {
    let t = Twins::new();
    t.create("b.qcow2", "", None, "64M");
    t.io("b.qcow2", &["write -P 0x11 0 64M"]);
    t.create(IMG, "", Some("b.qcow2"), "");
    t.io(IMG, &["write -P 0x22 0 3M"]);
    t.same(&["convert", "-O", "qcow2", "-S", "0", IMG, "o.qcow2"]);
    t.same(&["map", "--output=json", "o.qcow2"]);
    t.check_clean("o.qcow2");
}

#[test]
fn snapshot_table_with_too_much_extra_data() {
    // As iotest 261: the table is rewritten past the end of the file (no
    // refcounts for it) with 64 KiB of extra data in its one entry.
    let t = Twins::new();
    image_with_data(&t, "cluster_size=65536");
    t.both("qemu-img", &["snapshot", "-c", "s", IMG]);
    let table = t.be64(IMG, 64);
    let f = std::fs::File::open(t.q.join(IMG)).unwrap();
    let mut fixed = [0u8; 40];
    f.read_exact_at(&mut fixed, table).unwrap();
    let extra_len = u32::from_be_bytes(fixed[36..40].try_into().unwrap()) as usize;
    let names = (u16::from_be_bytes([fixed[12], fixed[13]])
        + u16::from_be_bytes([fixed[14], fixed[15]])) as usize;
    let mut rest = vec![0u8; extra_len + names];
    f.read_exact_at(&mut rest, table + 40).unwrap();
    let mut raw = fixed[..36].to_vec();
    raw.extend_from_slice(&65536u32.to_be_bytes());
    raw.extend_from_slice(&rest[..extra_len]);
    raw.resize(40 + 65536, 0);
    raw.extend_from_slice(&rest[extra_len..]);
    raw.resize(raw.len().next_multiple_of(8), 0);
    let at = f.metadata().unwrap().len().next_multiple_of(65536);
    t.poke(IMG, at, &raw);
    t.poke(IMG, 64, &at.to_be_bytes());
    let (_, err) = t.same(&["info", IMG]);
    assert!(err.contains("Too much extra metadata in snapshot table entry 0"));
    t.same(&["check", IMG]);
    t.same_msgs(&["check", "-r", "all", IMG]);
    t.check_clean(IMG);
    t.same_info(IMG, "Snapshot list");
}

#[test]
fn convert_n_writes_zeros_over_the_target() {
    // As iotest 122: -n assumes nothing of the target, so zero regions
    // become zero clusters (v3), stay unallocated (v2 alone) or are
    // written as data (v2 over a backing file).
    for (compat, backing) in [
        ("1.1", false),
        ("0.10", false),
        ("1.1", true),
        ("0.10", true),
    ] {
        let t = Twins::new();
        t.create("o.qcow2", "", None, "4M");
        t.create("b.qcow2", "", None, "4M");
        let opt = format!("compat={compat}");
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opt];
        if backing {
            args.extend(["-b", "b.qcow2", "-F", "qcow2"]);
        }
        args.extend([IMG, "4M"]);
        t.both("qemu-img", &args);
        t.same(&["convert", "-O", "qcow2", "-n", "o.qcow2", IMG]);
        t.same(&["map", "--output=json", IMG]);
        t.check_clean(IMG);
    }
}

/// Fragmentation is counted within each L2 table (a data cluster that
/// follows the previous table's last one is not "fragmented").
#[test]
fn check_counts_fragmentation_per_l2_table() {
    let t = Twins::new();
    t.create(IMG, "cluster_size=512", None, "3M");
    t.io(IMG, &["write 512 4608", "write 1000960 4608"]);
    let (out, _) = t.same(&["check", "--output=json", IMG]);
    assert!(!out.contains("fragmented-clusters"), "{out}");
    t.same(&["check", IMG]);
    t.check_clean(IMG);
}

/// Bad `create` arguments (QEMU's iotest 049): the size given twice, an
/// empty backing file name. Same message, same exit code, no image.
#[test]
fn create_refuses_a_size_given_twice_and_an_empty_backing_name() {
    let dir = rimg_tests::tempdir();
    let cases: [&[&str]; 4] = [
        &["-f", "qcow2", "-o", "size=10M", "IMG", "20M"],
        &["-f", "qcow2", "-b", "", "IMG", "20M"],
        &[
            "-f",
            "qcow2",
            "-o",
            "backing_file=",
            "-F",
            "raw",
            "IMG",
            "20M",
        ],
        &[
            "-f",
            "luks",
            "--object",
            "secret,id=s,data=x",
            "-o",
            "key-secret=s,size=1M",
            "IMG",
            "2M",
        ],
    ];
    for case in cases {
        let mut seen = Vec::new();
        for tool in ["qemu-img", "rimg"] {
            let img = dir.path().join(format!("{tool}.img"));
            let p = img.to_str().unwrap();
            let args: Vec<&str> = std::iter::once("create")
                .chain(case.iter().map(|&a| if a == "IMG" { p } else { a }))
                .collect();
            let o = rimg_tests::tool(tool, &args);
            assert!(!img.exists(), "{tool} {case:?}: made an image");
            let err = String::from_utf8_lossy(&o.stderr)
                .replace(p, "IMG")
                .replacen(&format!("{tool}: "), "", 1);
            seen.push((o.status.code(), err));
        }
        assert_eq!(seen[0], seen[1], "{case:?}");
    }
}

#[test]
fn a_failed_creation_leaves_no_file() {
    // qemu-img deletes what a failed qcow2 or LUKS creation began, even a
    // file that existed before (iotest 282); a backing file that does not
    // open fails before anything is touched, so that file stays.
    let dir = rimg_tests::tempdir();
    let bad = dir.path().join("bad-secret");
    std::fs::write(&bad, b"\x3a\x3c\x3b\xff").unwrap();
    let secret = format!("secret,id=s,file={}", bad.display());
    let cases: [(&[&str], bool); 4] = [
        (
            &[
                "-f",
                "qcow2",
                "--object",
                &secret,
                "-o",
                "encrypt.format=luks,encrypt.key-secret=s",
                "IMG",
                "4M",
            ],
            false,
        ),
        (
            &[
                "-f",
                "luks",
                "--object",
                &secret,
                "-o",
                "key-secret=s",
                "IMG",
                "4M",
            ],
            false,
        ),
        (
            &["-f", "qcow2", "-o", "data_file=/nonexistent/x", "IMG", "4M"],
            false,
        ),
        (
            &[
                "-f",
                "qcow2",
                "-b",
                "nonexistent",
                "-F",
                "qcow2",
                "IMG",
                "4M",
            ],
            true,
        ),
    ];
    for (case, stays) in cases {
        for existed in [false, true] {
            let mut seen = Vec::new();
            for tool in ["qemu-img", "rimg"] {
                let img = dir.path().join(format!("{tool}.img"));
                let p = img.to_str().unwrap();
                if existed {
                    std::fs::write(&img, b"old").unwrap();
                }
                let args: Vec<&str> = std::iter::once("create")
                    .chain(case.iter().map(|&a| if a == "IMG" { p } else { a }))
                    .collect();
                let o = rimg_tests::tool(tool, &args);
                assert!(!o.status.success(), "{tool} {case:?}");
                assert_eq!(img.exists(), existed && stays, "{tool} {case:?} {existed}");
                let _ = std::fs::remove_file(&img);
                let err = String::from_utf8_lossy(&o.stderr)
                    .replace(p, "IMG")
                    .replacen(&format!("{tool}: "), "", 1);
                seen.push((o.status.code(), err));
            }
            assert_eq!(seen[0], seen[1], "{case:?}");
        }
    }
}
