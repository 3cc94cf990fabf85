//! streamOptimized VMDK (compressed grains; the grain directory found
//! through a footer, as VMware writes streams) on hand-made damage, judged
//! by qemu-img: footers QEMU refuses, a footer's header QEMU checks as the
//! header, grain markers and deflate streams it cannot read, a sparse file
//! flagged compressed. Every command answers as qemu-img does (the
//! fixtures' good reads are checked with the other VMDK images in
//! foreign_vmdk.rs).

use std::path::Path;
use std::process::Command;

use rimg_tests::{le32, le64, make_foreign, same_as_qemu as same, tempdir};

/// Header offsets (the magic included).
const GTES: u64 = 44;
const GD: u64 = 56;
const COMPRESSION: u64 = 77;
/// The first grain of the fixtures (the header's grain offset, 128
/// sectors): its marker's compressed length, its deflate data.
const GRAIN0: u64 = 65536;
const GRAIN0_LEN: u64 = GRAIN0 + 8;
const GRAIN0_DATA: u64 = GRAIN0 + 12;

/// `rimg convert` fails or succeeds as `qemu-img convert` does, with its
/// words, or writes the same image.
fn convert_as_qemu(dir: &Path, f: &str) {
    let (code, _, err) = rimg_tests::rimg_in(dir, &["convert", "-O", "raw", f, "out.raw"]);
    let q = Command::new("qemu-img")
        .args(["convert", "-O", "raw", f, "out.qemu.raw"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(code, q.status.code(), "{f}: {err}");
    if code == Some(0) {
        same(dir, &["compare", "out.raw", "out.qemu.raw"]);
    } else {
        let qerr = String::from_utf8_lossy(&q.stderr);
        assert_eq!(err.replace("rimg:", "qemu-img:"), qerr, "{f}");
    }
}

#[test]
fn damaged_streams_answer_as_qemu() {
    let d = tempdir();
    make_foreign(d.path());
    let dir = d.path();
    let end = "vmdk-stream-end.vmdk";
    let len = std::fs::metadata(dir.join(end)).unwrap().len();
    // The footer: marker sector, header sector, end-of-stream sector.
    let (marker, header, eos) = (len - 1536, len - 1024, len - 512);
    let mut names = Vec::new();
    let mut patch = |from: &str, to: &str, edits: &[(u64, Vec<u8>)]| {
        names.push(rimg_tests::patched_copy(dir, from, to, edits));
    };
    patch(end, "footer-magic.vmdk", &[(header, b"KDMX".to_vec())]);
    patch(end, "footer-type.vmdk", &[(marker + 12, le32(1))]);
    patch(end, "footer-size.vmdk", &[(marker + 8, le32(1))]);
    patch(end, "footer-eos.vmdk", &[(eos + 12, le32(2))]);
    patch(end, "footer-eos-val.vmdk", &[(eos, le64(1))]);
    // The footer's header is the one QEMU checks and uses.
    patch(end, "footer-gtes.vmdk", &[(header + GTES, le32(513))]);
    patch(end, "footer-gd.vmdk", &[(header + GD, le64(1 << 54))]);
    // A sparse file whose GD is "at the end", without a footer.
    patch(
        "vmdk-sparse.vmdk",
        "sparse-gd-end.vmdk",
        &[(GD, le64(u64::MAX))],
    );
    // A sparse file flagged compressed (no markers): its grains are not
    // deflate streams.
    patch(
        "vmdk-sparse.vmdk",
        "sparse-deflate.vmdk",
        &[(COMPRESSION, vec![1, 0])],
    );
    // Grain markers QEMU refuses, and streams it cannot inflate.
    for (src, tag) in [("vmdk-stream.vmdk", "s"), (end, "e")] {
        patch(src, &format!("{tag}-len0.vmdk"), &[(GRAIN0_LEN, le32(0))]);
        patch(
            src,
            &format!("{tag}-len-big.vmdk"),
            &[(GRAIN0_LEN, le32(131073))],
        );
        patch(
            src,
            &format!("{tag}-len-short.vmdk"),
            &[(GRAIN0_LEN, le32(40))],
        );
        patch(
            src,
            &format!("{tag}-data.vmdk"),
            &[(GRAIN0_DATA, vec![0xff; 8])],
        );
        patch(
            src,
            &format!("{tag}-adler.vmdk"),
            &[(GRAIN0_DATA + 200, vec![0; 64])],
        );
    }
    // A stream cut short: the footer cannot be read, or is not there.
    let bytes = std::fs::read(dir.join(end)).unwrap();
    std::fs::write(dir.join("cut-1k.vmdk"), &bytes[..1024]).unwrap();
    std::fs::write(dir.join("cut-half.vmdk"), &bytes[..bytes.len() / 2]).unwrap();
    names.push("cut-1k.vmdk".into());
    names.push("cut-half.vmdk".into());
    for f in &names {
        for args in [
            vec!["info", f],
            vec!["info", "--output=json", f],
            vec!["map", "--output=json", f],
            vec!["check", f],
        ] {
            same(dir, &args);
        }
        convert_as_qemu(dir, f);
    }
    // The words, for the record.
    let (_, _, err) = same(dir, &["info", "footer-magic.vmdk"]);
    assert_eq!(
        err,
        "qemu-img: Could not open 'footer-magic.vmdk': Invalid footer\n"
    );
    let (code, _, err) = rimg_tests::rimg_in(dir, &["convert", "-O", "raw", "s-len0.vmdk", "x"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("Invalid argument"), "{err}");
}
