//! VMDK images (single sparse files made by `fixtures/make-foreign.sh` at
//! test time; descriptors with extent files: `foreign_vmdk_extents.rs`) read by the engine and the CLI exactly as qemu-img reads
//! them: content at odd offsets and lengths, unallocated and zeroed
//! grains, `info` (the vmdk block), `map`, `check` (human and JSON, exit
//! codes, findings), `convert`, `compare`, `measure`, `dd`; QEMU's open
//! errors on hand-made headers; clear refusals of what rimg does not read
//! yet (writing: `foreign_vmdk_write.rs`). The images include
//! streamOptimized files (made by qemu-img, and turned into the form
//! VMware writes, the header in a footer).

use std::process::Command;

use qcow2::{ExtentKind, Format, OpenOptions};
use rimg_tests::{
    foreign_fixtures as fixtures, le32, le64, patched_copy as patched, qemu_img_in as qemu,
    qemu_raw_content, rimg_in as rimg, same_as_qemu as same, FOREIGN_VMDK,
};

/// The images small enough to read whole.
const SMALL: &[&str] = &[
    "vmdk-sparse.vmdk",
    "vmdk-zeroed.vmdk",
    "vmdk-odd.vmdk",
    "vmdk-stream.vmdk",
    "vmdk-stream-end.vmdk",
];

#[test]
fn engine_reads_vmdk_like_qemu() {
    let d = fixtures();
    let mut kinds = Vec::new();
    for name in SMALL {
        let img = d.path().join(name);
        let want = qemu_raw_content(&img, &d.path().join(format!("{name}.want")));
        let image = qcow2::open(&img, &OpenOptions::default()).unwrap();
        assert_eq!(image.format(), Format::Vmdk, "{name}: probed");
        assert_eq!(image.size(), want.len() as u64, "{name}: size");
        assert_eq!(image.cluster_size(), Some(65536));
        // Chunks that cross sectors and grains at odd places.
        rimg_tests::assert_reads_as(image.as_ref(), &want, name, &[4097, 511, 65536 + 3]);
        let size = image.size();
        let mut pos = 0;
        while pos < size {
            let e = image.block_status(pos, size - pos).unwrap();
            // One grain at most per answer, as QEMU's.
            assert!(e.len <= 65536 - pos % 65536, "{name}: {e:?} at {pos}");
            let range = pos as usize..(pos + e.len) as usize;
            match e.kind {
                ExtentKind::Zero | ExtentKind::Unallocated => {
                    assert_eq!(e.offset, None);
                    assert!(want[range.clone()].iter().all(|&b| b == 0), "{name}: {pos}")
                }
                // Compressed grains have no offset to read from.
                ExtentKind::Data => assert_eq!(e.offset.is_some(), !e.compressed),
            }
            kinds.push(e.kind);
            let (m, n) = image.map_read(pos, e.len).unwrap();
            assert_eq!(n, e.len);
            let mut b = vec![1u8; n as usize];
            image.read_mapped(m, &mut b, pos).unwrap();
            assert!(b == want[range], "{name}: mapped read at {pos} differs");
            pos += e.len;
        }
    }
    for k in [ExtentKind::Zero, ExtentKind::Unallocated, ExtentKind::Data] {
        assert!(kinds.contains(&k), "no {k:?} seen");
    }
    // The 6 GiB disk: its three written ranges and the holes around them.
    let image = qcow2::open(&d.path().join("vmdk-6g.vmdk"), &OpenOptions::default()).unwrap();
    assert_eq!(image.size(), 6 << 30);
    for (at, len, byte) in [
        (0u64, 4096usize, 0x78u8),
        (4096, 4096, 0),
        (4 << 30, 65536, 0x79),
        ((4 << 30) - 512, 512, 0),
        (6_442_385_408, 65536, 0x7a),
    ] {
        let mut b = vec![1u8; len];
        image.read_at(&mut b, at).unwrap();
        assert!(b.iter().all(|&x| x == byte), "6g at {at}");
    }
}

#[test]
fn info_map_check_measure_match_qemu() {
    let d = fixtures();
    let dir = d.path();
    for name in FOREIGN_VMDK {
        for args in rimg_tests::read_only_commands(name, "vmdk") {
            same(dir, &args);
        }
    }
    // What they look like: the vmdk block, unallocated and zeroed grains.
    let (_, out, _) = same(dir, &["info", "vmdk-sparse.vmdk"]);
    assert!(out.contains("    create type: monolithicSparse\n"), "{out}");
    assert!(out.contains("            format: \n"), "{out}");
    let (_, out, _) = same(dir, &["map", "--output=json", "vmdk-zeroed.vmdk"]);
    assert!(out.contains("\"present\": false, \"zero\": true, \"data\": false"));
    assert!(out.contains("\"present\": true, \"zero\": true, \"data\": false"));
    let (_, out, _) = same(dir, &["info", "--output=json", "vmdk-6g.vmdk"]);
    assert!(out.contains("\"cluster-size\": 65536,\n"), "{out}");
    // --image-opts and json: name the driver.
    same(
        dir,
        &[
            "info",
            "--image-opts",
            "driver=vmdk,file.filename=vmdk-sparse.vmdk",
        ],
    );
    same(dir, &["map", "--output=json", "json:{\"driver\": \"vmdk\", \"file\": {\"driver\": \"file\", \"filename\": \"vmdk-zeroed.vmdk\"}}"]);
}

#[test]
fn convert_compare_dd_match_qemu() {
    let d = fixtures();
    let dir = d.path();
    for name in FOREIGN_VMDK {
        let fmts: &[&str] = match *name {
            "vmdk-6g.vmdk" => &["qcow2"],
            "vmdk-empty.vmdk" => &[],
            _ => &["raw", "qcow2"],
        };
        for fmt in fmts {
            let ours = format!("{name}.rimg.{fmt}");
            let theirs = format!("{name}.qemu.{fmt}");
            let (code, _, err) = rimg(dir, &["convert", "-O", fmt, name, &ours]);
            assert_eq!(code, Some(0), "{err}");
            qemu(dir, &["convert", "-O", fmt, name, &theirs]);
            let a = std::fs::read(dir.join(&ours)).unwrap();
            let b = std::fs::read(dir.join(&theirs)).unwrap();
            assert!(
                a == b,
                "{name} to {fmt}: rimg's output differs from qemu-img's"
            );
            let (code, out, _) = same(dir, &["compare", name, &ours]);
            assert_eq!((code, out.as_str()), (Some(0), "Images are identical.\n"));
        }
    }
    let (code, ..) = same(dir, &["compare", "vmdk-sparse.vmdk", "vmdk-zeroed.vmdk"]);
    assert_eq!(code, Some(1));
    same(dir, &["compare", "-s", "vmdk-sparse.vmdk", "vmdk-odd.vmdk"]);
    // dd: a window from inside the first grain on.
    for name in SMALL {
        for (prog, out) in [("rimg", "of=dd.rimg"), ("qemu-img", "of=dd.qemu")] {
            let args = [
                "dd",
                "-O",
                "raw",
                "bs=4k",
                "skip=3",
                "count=1100",
                &format!("if={name}"),
                out,
            ];
            let o = match prog {
                "rimg" => rimg(dir, &args).0,
                _ => Command::new(prog)
                    .args(args)
                    .current_dir(dir)
                    .status()
                    .unwrap()
                    .code(),
            };
            assert_eq!(o, Some(0), "{prog} dd {name}");
        }
        let a = std::fs::read(dir.join("dd.rimg")).unwrap();
        assert!(
            a == std::fs::read(dir.join("dd.qemu")).unwrap(),
            "dd of {name}"
        );
    }
}

/// Bytes to write at offsets of a copy.
type Edits = Vec<(u64, Vec<u8>)>;

/// Header offsets (the magic included).
const CAPACITY: u64 = 12;
const GRAIN: u64 = 20;
const DESC_OFFSET: u64 = 28;
const GTES: u64 = 44;
const RGD: u64 = 48;
const GD: u64 = 56;
const GRAIN_OFFSET: u64 = 64;

/// One hand-made header per refusal of QEMU's vmdk driver that rimg
/// shares, and near misses that open: the same message and exit code
/// from every command.
#[test]
fn open_errors_match_qemu() {
    let d = fixtures();
    let dir = d.path();
    let src = "vmdk-sparse.vmdk";
    let cases: Vec<(&str, Edits)> = vec![
        ("version", vec![(4, le32(4))]),
        ("gtes", vec![(GTES, le32(513))]),
        ("grain-0", vec![(GRAIN, le64(0))]),
        (
            "span-wraps",
            vec![(GRAIN, le64(1 << 23)), (GTES, le32(512))],
        ),
        ("truncated", vec![(GRAIN_OFFSET, le64(1 << 20))]),
        ("granularity", vec![(GRAIN, le64(0x20_0001))]),
        (
            "l1-size",
            vec![(GRAIN, le64(1)), (GTES, le32(1)), (CAPACITY, le64(1 << 26))],
        ),
        ("efbig", vec![(CAPACITY, le64(1 << 54))]),
        ("gd-read", vec![(GD, le64(1 << 54))]),
        ("rgd-read", vec![(RGD, le64(1 << 54))]),
        (
            "no-cid",
            vec![(0x200 + 30, b"X".to_vec()), (0x200 + 43, b"X".to_vec())],
        ),
        ("embedded", vec![(CAPACITY, le64(0))]),
        (
            "embedded-none",
            vec![(CAPACITY, le64(0)), (DESC_OFFSET, le64(0x4000))],
        ),
        ("cap-0", vec![(CAPACITY, le64(0)), (DESC_OFFSET, le64(0))]),
        ("gd-wraps", vec![(GD, le64(1 << 55))]),
        ("gd-past-eof", vec![(GD, le64(1 << 30))]),
        ("no-zero-flag", vec![(8, le32(1))]),
        (
            "gd-count-wraps",
            vec![
                (GRAIN, le64(1)),
                (GTES, le32(1)),
                (CAPACITY, le64((1 << 32) + 16)),
            ],
        ),
    ];
    let bytes = std::fs::read(dir.join(src)).unwrap();
    std::fs::write(dir.join("short.vmdk"), &bytes[..100]).unwrap();
    std::fs::write(dir.join("tiny.vmdk"), b"KD").unwrap();
    std::fs::write(dir.join("desc.vmdk"), b"# x\nversion=1\nCID=1\n").unwrap();
    std::fs::write(
        dir.join("desc-so.vmdk"),
        b"version=1\ncreateType=\"streamOptimized\"\n",
    )
    .unwrap();
    let mut names = vec![
        "short.vmdk".to_string(),
        "tiny.vmdk".into(),
        "desc.vmdk".into(),
        "desc-so.vmdk".into(),
    ];
    for (what, edits) in &cases {
        names.push(patched(dir, src, &format!("bad-{what}.vmdk"), edits));
    }
    for f in &names {
        same(dir, &["info", f]);
        same(dir, &["info", "-f", "vmdk", f]);
        for args in [
            vec!["map", "-f", "vmdk", "--output=json", f],
            vec!["check", "-f", "vmdk", f],
        ] {
            same(dir, &args);
        }
        let (code, _, err) = rimg(
            dir,
            &["convert", "-f", "vmdk", "-O", "qcow2", f, "out.qcow2"],
        );
        let q = Command::new("qemu-img")
            .args(["convert", "-f", "vmdk", "-O", "qcow2", f, "out.qemu.qcow2"])
            .current_dir(dir)
            .output()
            .unwrap();
        assert_eq!(code, q.status.code(), "{f}: {err}");
        let qerr = String::from_utf8_lossy(&q.stderr);
        if f == "bad-gd-count-wraps.vmdk" {
            // rimg's convert reads a whole chunk where it can and asks the
            // block status of the next: its offset is not QEMU's.
            let words = "error while reading block status at offset ";
            assert!(err.contains(words) && qerr.contains(words), "{err}");
        } else if code == Some(1) {
            assert_eq!(err.replace("rimg:", "qemu-img:"), qerr);
        } else {
            same(dir, &["compare", "out.qcow2", "out.qemu.qcow2"]);
        }
    }
    // The words, for the record.
    let (_, _, err) = same(dir, &["info", "bad-version.vmdk"]);
    assert_eq!(
        err,
        "qemu-img: Could not open 'bad-version.vmdk': Unsupported VMDK version 4\n"
    );
    let (_, _, err) = same(dir, &["info", "bad-embedded.vmdk"]);
    assert!(
        err.contains("Unsupported image type 'monolithicSparse'"),
        "{err}"
    );
}

/// check's findings: a grain past the end of the file, a GD that cannot
/// place every grain; reads of them match too.
#[test]
fn check_findings_match_qemu() {
    let d = fixtures();
    let dir = d.path();
    // The GD is at sector 26 (a 5 MiB disk: 1 entry); its GT at 0x3800
    // (sector 28 + 0? read it from the GD).
    let bytes = std::fs::read(dir.join("vmdk-sparse.vmdk")).unwrap();
    let gd = u64::from_le_bytes(bytes[GD as usize..GD as usize + 8].try_into().unwrap()) * 512;
    let gt =
        u32::from_le_bytes(bytes[gd as usize..gd as usize + 4].try_into().unwrap()) as u64 * 512;
    let past = (bytes.len() as u64 / 512) as u32;
    let cases = [
        patched(
            dir,
            "vmdk-sparse.vmdk",
            "eof.vmdk",
            &[(gt + 4 * 20, le32(past))],
        ),
        patched(
            dir,
            "vmdk-sparse.vmdk",
            "eof-0.vmdk",
            &[(gt, le32(past + 100))],
        ),
        patched(
            dir,
            "vmdk-sparse.vmdk",
            "in-file.vmdk",
            &[(gt + 4 * 20, le32(past - 1))],
        ),
        patched(
            dir,
            "vmdk-sparse.vmdk",
            "gd-count-wraps.vmdk",
            &[
                (GRAIN, le64(1)),
                (GTES, le32(1)),
                (CAPACITY, le64((1 << 32) + 16)),
            ],
        ),
    ];
    for f in &cases {
        let (code, _, err) = same(dir, &["check", f]);
        if f != "in-file.vmdk" {
            assert_eq!(code, Some(1), "{f}: {err}");
            assert!(err.starts_with("ERROR: "), "{err}");
        }
        for args in [
            vec!["check", "--output=json", f],
            vec!["check", "-q", f],
            vec!["check", "-r", "all", f],
            vec!["map", "--output=json", f],
            vec!["map", f],
            vec!["info", f],
        ] {
            same(dir, &args);
        }
        if f != "gd-count-wraps.vmdk" {
            let img = dir.join(f);
            let want = qemu_raw_content(&img, &dir.join(format!("{f}.raw")));
            let image = qcow2::open(&img, &OpenOptions::default()).unwrap();
            let mut got = vec![0u8; want.len()];
            image.read_at(&mut got, 0).unwrap();
            assert!(got == want, "{f}: content differs");
        }
    }
}

/// What rimg does not read yet is refused plainly, not misread.
#[test]
fn unsupported_vmdk_kinds_are_refused() {
    let d = fixtures();
    let dir = d.path();
    let src = "vmdk-sparse.vmdk";
    // (seSparse extents: foreign_vmdk_extents.rs.)
    let cases = [(
        patched(dir, src, "cowd.vmdk", &[(0, b"COWD".to_vec())]),
        "COWD",
    )];
    for (f, what) in cases {
        let (code, _, err) = rimg(dir, &["info", &f]);
        assert_eq!(code, Some(1), "{f}");
        assert!(
            err.starts_with(&format!("rimg: Could not open '{f}': ")),
            "{err}"
        );
        assert!(
            err.contains(what) && err.contains("not supported by rimg yet"),
            "{err}"
        );
    }
}

/// A qcow2 image over a VMDK backing file (-F vmdk): the VMDK's
/// unallocated grains are holes of the chain, its zeroed grains zeros,
/// as qemu-img reads them.
#[test]
fn qcow2_over_a_vmdk_backing_file() {
    let d = fixtures();
    let dir = d.path();
    for base in [
        "vmdk-sparse.vmdk",
        "vmdk-zeroed.vmdk",
        "vmdk-stream-end.vmdk",
    ] {
        let top = format!("top-{base}.qcow2");
        qemu(
            dir,
            &[
                "create", "-q", "-f", "qcow2", "-b", base, "-F", "vmdk", &top,
            ],
        );
        rimg_tests::qemu_io(
            &dir.join(&top),
            &["write -P 0x99 2M 64k", "write -P 0x98 60k 8k"],
        );
        for args in [
            vec!["info", "--backing-chain", "--output=json", &top],
            vec!["map", &top],
            vec!["map", "--output=json", &top],
            vec!["check", &top],
        ] {
            same(dir, &args);
        }
        let want = qemu_raw_content(&dir.join(&top), &dir.join(format!("{top}.raw")));
        let image = qcow2::open(&dir.join(&top), &OpenOptions::default()).unwrap();
        rimg_tests::assert_reads_as(image.as_ref(), &want, &top, &[65536 + 7, 4096]);
        let (code, out, _) = same(dir, &["compare", &top, &format!("{top}.raw")]);
        assert_eq!((code, out.as_str()), (Some(0), "Images are identical.\n"));
    }
}
