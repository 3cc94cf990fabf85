//! VDI images (made by `fixtures/make-foreign.sh` at test time) read by the
//! engine and the CLI exactly as qemu-img reads them: content at odd
//! offsets and lengths, `info`, `map`, `check` (human and JSON, exit
//! codes), `convert` to raw and qcow2 (the same bytes), `compare`; every
//! open error QEMU's vdi driver has, and check's findings, on hand-made
//! headers and maps. Writing VDI images: `foreign_vdi_write.rs`.

use std::path::PathBuf;
use std::process::Command;

use qcow2::{ExtentKind, Format, OpenOptions};
use rimg_tests::{
    le32, make_foreign, patched_copy as patched, qemu_raw_content, rimg_in as rimg,
    same_as_qemu as same, tempdir, FOREIGN_VDI,
};

fn fixtures() -> (tempfile::TempDir, Vec<PathBuf>) {
    let d = tempdir();
    make_foreign(d.path());
    let paths = FOREIGN_VDI.iter().map(|n| d.path().join(n)).collect();
    (d, paths)
}

#[test]
fn engine_reads_vdi_like_qemu() {
    let (d, images) = fixtures();
    for img in &images {
        let name = img.file_name().unwrap().to_string_lossy();
        let want = qemu_raw_content(img, &d.path().join(format!("{name}.want")));
        let image = qcow2::open(img, &OpenOptions::default()).unwrap();
        assert_eq!(image.format(), Format::Vdi, "{name}: probed");
        assert_eq!(image.size(), want.len() as u64, "{name}: size");
        assert_eq!(image.cluster_size(), Some(1 << 20));
        // Chunks that cross sectors and 1 MiB blocks at odd places.
        rimg_tests::assert_reads_as(
            image.as_ref(),
            &want,
            &name,
            &[4097, 511, 65536 + 3, (1 << 20) + 5],
        );
        // Block status and the split data path agree with the content.
        let size = image.size();
        let mut pos = 0;
        while pos < size {
            let e = image.block_status(pos, size - pos).unwrap();
            let range = pos as usize..(pos + e.len) as usize;
            match e.kind {
                ExtentKind::Zero => {
                    assert!(
                        want[range.clone()].iter().all(|&b| b == 0),
                        "{name}: hole at {pos}"
                    )
                }
                ExtentKind::Data => assert!(e.offset.is_some()),
                ExtentKind::Unallocated => panic!("{name}: unallocated at {pos}"),
            }
            let (m, n) = image.map_read(pos, e.len).unwrap();
            assert_eq!(n, e.len);
            let mut b = vec![1u8; n as usize];
            image.read_mapped(m, &mut b, pos).unwrap();
            assert!(b == want[range], "{name}: mapped read at {pos} differs");
            pos += e.len;
        }
    }
}

#[test]
fn info_map_check_match_qemu() {
    let (d, _) = fixtures();
    let dir = d.path();
    for name in FOREIGN_VDI {
        for args in rimg_tests::read_only_commands(name, "vdi") {
            same(dir, &args);
        }
    }
    // What the static image's map looks like: file holes inside its
    // preallocated blocks are zeros with data and an offset.
    let (_, out, _) = same(dir, &["map", "--output=json", "vdi-static.vdi"]);
    assert!(
        out.contains("\"zero\": true, \"data\": true"),
        "static map: {out}"
    );
    let (_, out, _) = same(dir, &["map", "--output=json", "vdi-dynamic.vdi"]);
    assert!(out.contains("\"present\": true, \"zero\": true, \"data\": false"));
}

#[test]
fn convert_and_compare_match_qemu() {
    let (d, _) = fixtures();
    let dir = d.path();
    for name in FOREIGN_VDI {
        for fmt in ["raw", "qcow2"] {
            let ours = format!("{name}.rimg.{fmt}");
            let theirs = format!("{name}.qemu.{fmt}");
            for (tool, out) in [("rimg", &ours), ("qemu-img", &theirs)] {
                let args = ["convert", "-O", fmt, name, out.as_str()];
                let o = match tool {
                    "rimg" => rimg(dir, &args),
                    _ => {
                        let o = Command::new("qemu-img")
                            .args(args)
                            .current_dir(dir)
                            .output()
                            .unwrap();
                        (o.status.code(), String::new(), String::new())
                    }
                };
                assert_eq!(o.0, Some(0), "{tool} {args:?}: {}", o.2);
            }
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
    let (code, ..) = same(dir, &["compare", "vdi-dynamic.vdi", "vdi-static.vdi"]);
    assert_eq!(code, Some(1));
    same(
        dir,
        &["compare", "-s", "vdi-empty.vdi", "vdi-empty.vdi.qemu.raw"],
    );
}

/// One hand-made header per refusal of QEMU's vdi driver, in its order
/// of checks: the same message and exit code from every command.
#[test]
fn open_errors_match_qemu() {
    let (d, _) = fixtures();
    let dir = d.path();
    let src = "vdi-dynamic.vdi";
    let cases = [
        (
            "size",
            vec![(0x170, 0x1_ffff_f800_0001_u64.to_le_bytes().to_vec())],
        ),
        ("signature", vec![(0x40, le32(0xbeda_1070))]),
        ("version", vec![(0x44, le32(0x0001_0002))]),
        ("bmap-offset", vec![(0x154, le32(0x201))]),
        ("data-offset", vec![(0x158, le32(0x401))]),
        ("sector-size", vec![(0x168, le32(4096))]),
        ("block-size", vec![(0x178, le32(2 << 20))]),
        ("room", vec![(0x170, (6u64 << 20).to_le_bytes().to_vec())]),
        ("link-uuid", vec![(0x1a8, vec![1])]),
        ("parent-uuid", vec![(0x1b8 + 15, vec![1])]),
        ("blocks", vec![(0x180, le32(0x1fff_ff81))]),
    ];
    // A file shorter than the header: zeros past its end, for both.
    let bytes = std::fs::read(dir.join(src)).unwrap();
    std::fs::write(dir.join("short.vdi"), &bytes[..100]).unwrap();
    let (code, _, err) = same(dir, &["info", "short.vdi"]);
    assert_eq!(code, Some(1), "{err}");
    for (what, edits) in cases {
        let f = patched(dir, src, &format!("bad-{what}.vdi"), &edits);
        // Probed (a bad signature probes as raw, for both) and forced.
        same(dir, &["info", &f]);
        let (code, _, err) = same(dir, &["info", "-f", "vdi", &f]);
        assert_eq!(code, Some(1), "{what}");
        assert!(err.starts_with(&format!("qemu-img: Could not open '{f}': ")));
        for args in [
            vec!["map", "-f", "vdi", &f],
            vec!["check", "-f", "vdi", &f],
            vec!["convert", "-f", "vdi", "-O", "raw", &f, "out.raw"],
        ] {
            let (code, ..) = same(dir, &args);
            assert_eq!(code, Some(1), "{what}: {args:?}");
        }
    }
}

/// A map that does not hold: every kind of problem qemu-img's check
/// counts, and maps cut by the end of the file (whose missing entries
/// read as zeros); reads and maps of them match too.
#[test]
fn check_findings_match_qemu() {
    let (d, _) = fixtures();
    let dir = d.path();
    let src = "vdi-dynamic.vdi";
    // The map is at 0x200: blocks 0, 2, 3 hold data blocks 0, 1, 2.
    let mut cases = vec![
        patched(dir, src, "dup.vdi", &[(0x208, le32(0))]),
        patched(dir, src, "too-large.vdi", &[(0x20c, le32(7))]),
        patched(dir, src, "count.vdi", &[(0x184, le32(9))]),
        patched(dir, src, "discarded.vdi", &[(0x208, le32(0xffff_fffe))]),
        patched(dir, src, "static-type.vdi", &[(0x4c, le32(2))]),
    ];
    for (name, len) in [("header-only.vdi", 512u64), ("cut-entry.vdi", 0x206)] {
        let bytes = std::fs::read(dir.join(src)).unwrap();
        std::fs::write(dir.join(name), &bytes[..len as usize]).unwrap();
        cases.push(name.to_string());
    }
    for f in &cases {
        let (code, ..) = same(dir, &["check", f]);
        if f != "static-type.vdi" {
            assert_eq!(code, Some(2), "{f}: corruptions found");
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
        let img = dir.join(f);
        let want = qemu_raw_content(&img, &dir.join(format!("{f}.raw")));
        let image = qcow2::open(&img, &OpenOptions::default()).unwrap();
        let mut got = vec![0u8; want.len()];
        image.read_at(&mut got, 0).unwrap();
        assert!(got == want, "{f}: content differs");
    }
}
