//! VHDX images (made by `fixtures/make-foreign.sh` at test time, some
//! patched by hand) read by the engine and the CLI exactly as qemu-img
//! reads them: content (zero and unpresent blocks, a fixed disk over file
//! holes, 256 MiB blocks, a cut last block, QEMU's offset-0 quirk, EIO
//! for states it does not read), `info`, `map`, `check`, `measure`,
//! `convert`, `compare`, `dd`; and every open error QEMU's vhdx driver has
//! on hand-made headers, region tables, metadata and BATs (checksums
//! resealed), in its words.

use std::path::Path;

use qcow2::{Format, OpenOptions};
use rimg_tests::{
    foreign_fixtures as fixtures, qemu_img_in as qemu, qemu_raw_content, rimg_in as rimg,
    same_as_qemu as same, FOREIGN_VHDX,
};

#[test]
fn engine_reads_vhdx_like_qemu() {
    let d = fixtures();
    for name in FOREIGN_VHDX {
        let img = qcow2::open(&d.path().join(name), &OpenOptions::default()).unwrap();
        assert_eq!(img.format(), Format::Vhdx, "{name}: probed");
        // EIO blocks cannot be read whole; block 0 at offset 0 reads by
        // where each read starts (judged through dd below).
        if matches!(*name, "vhdx-eio.vhdx" | "vhdx-off0.vhdx" | "vhdx-b256.vhdx") {
            continue;
        }
        let want = qemu_raw_content(&d.path().join(name), &d.path().join(format!("{name}.want")));
        assert_eq!(img.size(), want.len() as u64, "{name}");
        rimg_tests::assert_reads_as(img.as_ref(), &want, name, &[4097, 511, 65536 + 3]);
    }
}

#[test]
fn commands_match_qemu() {
    let d = fixtures();
    let dir = d.path();
    for name in FOREIGN_VHDX.iter().chain(&["vhdx-diff.vhdx"]) {
        for args in rimg_tests::read_only_commands(name, "vhdx") {
            same(dir, &args);
        }
        // Dd reads one block at a time, as qemu-img (vhdx-off0 reads the
        // file's start for each).
        for (bs, skip, count) in [
            ("4k", "0", "300"),
            ("512", "2047", "4200"),
            ("1M", "3", "5"),
        ] {
            for prog in ["qemu-img", "rimg"] {
                let args = [
                    "dd",
                    &format!("bs={bs}"),
                    &format!("skip={skip}"),
                    &format!("count={count}"),
                    &format!("if={name}"),
                    &format!("of={prog}.dd"),
                ];
                let code = match prog {
                    "rimg" => rimg(dir, &args).0,
                    _ => rimg_tests::run_in("qemu-img", dir, &args).status.code(),
                };
                assert!(code.is_some(), "{prog} {args:?}");
            }
            let a = std::fs::read(dir.join("rimg.dd")).unwrap_or_default();
            assert!(
                a == std::fs::read(dir.join("qemu-img.dd")).unwrap_or_default(),
                "dd bs={bs} of {name}"
            );
        }
        if *name == "vhdx-diff.vhdx" {
            continue;
        }
        // One request at a time in qemu-img (its -m 8 reports the EIO of
        // every request in flight).
        for fmt in ["raw", "qcow2"] {
            let (ours, theirs) = (format!("{name}.r.{fmt}"), format!("{name}.q.{fmt}"));
            let r = rimg(dir, &["convert", "-m", "1", "-O", fmt, name, &ours]);
            let q = rimg_tests::run_in(
                "qemu-img",
                dir,
                &["convert", "-m", "1", "-O", fmt, name, &theirs],
            );
            assert_eq!(q.status.code(), r.0, "{name} to {fmt}: {}", r.2);
            assert_eq!(
                String::from_utf8_lossy(&q.stderr).replace("qemu-img:", "rimg:"),
                r.2
            );
            if r.0 == Some(0) {
                let a = std::fs::read(dir.join(&ours)).unwrap();
                assert!(
                    a == std::fs::read(dir.join(&theirs)).unwrap(),
                    "{name} to {fmt}"
                );
                same(dir, &["compare", name, &theirs]);
            }
        }
    }
    // What they look like: the block size as cluster size, everything
    // data without an offset, EIO where QEMU cannot read.
    let (_, out, _) = same(dir, &["info", "vhdx-b256.vhdx"]);
    assert!(out.contains("cluster_size: 268435456\n"), "{out}");
    let (_, out, _) = same(dir, &["map", "--output=json", "vhdx-np.vhdx"]);
    assert!(!out.contains("offset"), "{out}");
    let (code, _, err) = same(dir, &["compare", "vhdx-eio.vhdx", "vhdx-dynamic.vhdx"]);
    assert_eq!(code, Some(4), "{err}");
    same(
        dir,
        &[
            "info",
            "--image-opts",
            "driver=vhdx,file.filename=vhdx-dynamic.vhdx",
        ],
    );
    let (code, _, err) = same(dir, &["info", "vhdx-diff.vhdx"]);
    assert_eq!(code, Some(1));
    assert!(err.ends_with("Operation not supported\n"), "{err}");
}

/// Offsets in vhdx-dynamic.vhdx (1 MiB log at 1 MiB, BAT at 2 MiB,
/// metadata at 3 MiB, items at 3 MiB + 64 KiB). Region table entries
/// are 32 bytes from RT + 16 (GUID, offset +16, length +24, flags +28):
/// the BAT's first, the metadata's second; metadata entries 32 bytes
/// from MD + 32 (GUID, offset +16, length +20, flags +24).
const H1: usize = 0x10000;
const H2: usize = 0x20000;
const RT: usize = 0x30000;
const MD: usize = 0x300000;
const ITEMS: usize = 0x310000;
const BAT: usize = 0x200000;

/// Edits of a file: (offset, little-endian value, width).
type Edits = Vec<(usize, u64, usize)>;

/// A copy of vhdx-dynamic.vhdx with `edits` (offset, little-endian value,
/// width) made and the headers' and region table's checksums resealed
/// (unless an edit is to a checksum).
fn patched(dir: &Path, to: &str, edits: &[(usize, u64, usize)]) -> String {
    use qcow2::foreign::crc32c::crc32c_without;
    let mut b = std::fs::read(dir.join("vhdx-dynamic.vhdx")).unwrap();
    for &(at, v, w) in edits {
        if at + w > b.len() {
            b.resize(at + w, 0);
        }
        b[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
    }
    for (at, len) in [(H1, 4096), (H2, 4096), (RT, 65536)] {
        if edits.iter().any(|&(e, ..)| e == at + 4) {
            continue;
        }
        let crc = crc32c_without(&b[at..at + len], 4);
        b[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
    }
    std::fs::write(dir.join(to), b).unwrap();
    to.to_string()
}

#[test]
fn open_errors_match_qemu() {
    let d = fixtures();
    let dir = d.path();
    let both = |off: usize, v: u64, w: usize| -> Edits { vec![(H1 + off, v, w), (H2 + off, v, w)] };
    let guid = 0x5555_4444_3333_2222u64;
    let cases: Vec<(&str, Edits)> = vec![
        ("sig", vec![(0, 0, 1)]),
        ("h1crc", vec![(H1 + 4, 1, 4)]),
        ("hcrc", vec![(H1 + 4, 1, 4), (H2 + 4, 1, 4)]),
        ("hver", both(66, 2, 2)),
        ("hseq", both(8, 7, 8)),
        ("logoff0", both(72, 0, 8)),
        ("logoffodd", both(72, 0x180000, 8)),
        ("logver", both(64, 1, 2)),
        ("loglen", both(68, 0x100800, 4)),
        ("rtcrc", vec![(RT + 4, 1, 4)]),
        ("rtcount", vec![(RT + 8, 2048, 4)]),
        ("rtcount0", vec![(RT + 8, 0, 4)]),
        (
            "dupbat",
            vec![
                (RT + 48, 0x0042_f623_2dc2_7766, 8),
                (RT + 56, 0x084a_fd9b_5e11_649d, 8),
            ],
        ),
        ("unkreq", vec![(RT + 48, guid, 8), (RT + 76, 1, 4)]),
        ("unkopt", vec![(RT + 48, guid, 8)]),
        ("overlap", vec![(RT + 32, 0x100000, 8)]),
        (
            "empty-region",
            vec![(RT + 32, 0x180000, 8), (RT + 40, 0, 4)],
        ),
        ("mdsig", vec![(MD, 0, 8)]),
        ("mdcount", vec![(MD + 10, 2048, 2)]),
        ("mdmissing", vec![(MD + 10, 4, 2)]),
        ("mdunkreq", vec![(MD + 32, guid, 8), (MD + 56, 4, 4)]),
        ("bs512k", vec![(ITEMS, 0x80000, 4)]),
        ("bs3m", vec![(ITEMS, 0x300000, 4)]),
        ("bs256m", vec![(ITEMS, 0x1000_0000, 4)]),
        ("lss", vec![(ITEMS + 0x20, 4096, 4)]),
        ("pss", vec![(ITEMS + 0x24, 3, 4)]),
        ("hasparent", vec![(ITEMS + 4, 2, 4)]),
        ("size0", vec![(ITEMS + 8, 0, 8)]),
        ("size513", vec![(ITEMS + 8, 513, 8)]),
        ("size-huge", vec![(ITEMS + 8, 1 << 63, 8)]),
        ("size-4p", vec![(ITEMS + 8, (1 << 52) + (1 << 20), 8)]),
        ("batlen", vec![(RT + 40, 32, 4)]),
        ("batbig", vec![(RT + 40, 0x7FFF_FE01, 4)]),
        ("batfar", vec![(RT + 32, (1 << 63) - (2 << 20), 8)]),
        ("past", vec![(BAT + 32, 0xb000_0006, 8)]),
        ("inlog", vec![(BAT, 0x100006, 8)]),
        ("inbat", vec![(BAT, 0x200006, 8)]),
        ("overflow", vec![(BAT, 0xFFFF_FFFF_FFF0_0006, 8)]),
        ("two", vec![(BAT, 0x100006, 8), (BAT + 16, 0xb000_0006, 8)]),
        ("reserved", vec![(BAT + 16, 0x9f_fff6, 8)]),
        // A log of a length not in whole MiB: refused before the region
        // table is read (whose overlap with it would print first).
        (
            "loglen-guid",
            [both(68, 0x100800, 4), both(48, guid, 8)].concat(),
        ),
    ];
    for (n, edits) in &cases {
        let name = patched(dir, &format!("{n}.vhdx"), edits);
        for args in [
            vec!["info", &name],
            vec!["check", &name],
            vec!["check", "--output=json", &name],
            vec!["map", "--output=json", &name],
        ] {
            same(dir, &args);
        }
    }
    // A truncated file: the last present block's end.
    let name = patched(dir, "trunc.vhdx", &[]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(&name))
        .unwrap();
    f.set_len(0xb7ff01).unwrap();
    for args in [vec!["info", &name], vec!["check", &name]] {
        same(dir, &args);
    }
    // Blocks past the BAT's count are not checked at open: one at the
    // top of the address space, reached through QEMU's u32 wrap of the
    // block number, reads where QEMU's wrapping sum points.
    let name = patched(
        dir,
        "wrap.vhdx",
        &[
            (ITEMS, 0x200000, 4),
            (ITEMS + 8, 0x20_0000_0020_0000, 8),
            (BAT + 40, 0xFFFF_FFFF_FFF0_0006, 8),
        ],
    );
    let (i, o) = (format!("if={name}"), "of=wrap.dd");
    let args = ["dd", "bs=1M", "skip=11", "count=12", &i, o];
    rimg_tests::run_in("qemu-img", dir, &args);
    let want = std::fs::read(dir.join("wrap.dd")).unwrap();
    assert_eq!(rimg(dir, &args).0, Some(0));
    assert!(want == std::fs::read(dir.join("wrap.dd")).unwrap());
    // qemu-img check opens a backing VHDX for the check too: its BAT is
    // not checked at open there either.
    let name = patched(dir, "bad-bat.vhdx", &[(BAT + 8, 0x1000_0006, 8)]);
    qemu(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &name,
            "-F",
            "vhdx",
            "-u",
            "top.qcow2",
            "5M",
        ],
    );
    same(dir, &["check", "top.qcow2"]);
    // A log that may hold entries: rimg does not read logs yet.
    let name = patched(dir, "log.vhdx", &both(48, guid, 8));
    let (code, _, err) = rimg(dir, &["info", &name]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not supported by rimg yet"), "{err}");
    // Resizing is refused (as by QEMU: foreign_vhdx_write.rs).
    let (code, _, err) = rimg(dir, &["resize", "vhdx-dynamic.vhdx", "6M"]);
    assert_eq!(code, Some(1), "{err}");
    qemu(dir, &["info", "vhdx-dynamic.vhdx"]);
}
