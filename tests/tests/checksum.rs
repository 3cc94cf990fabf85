//! `rimg checksum`: equal guest content gives an equal checksum whatever
//! holds it (raw, qcow2 of every cluster size, compressed, backing
//! chains, foreign formats, an NBD export), a one-byte change gives
//! another, and the value is the one the documented coreutils pipeline
//! computes from `qemu-img convert -O raw`'s output.

use std::path::Path;

use rimg_tests::nbd::{unix_uri, QemuNbd};
use rimg_tests::{ensure_tool, ok, qemu_img, qemu_io, rimg, run_ok, tempdir, write_mixed_raw};
use sha2::{Digest, Sha256};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `rimg checksum ARGS`'s digest; asserts the line names the image (a
/// file as given).
fn checksum(args: &[&str]) -> String {
    let out = ok(rimg(&[&["checksum"], args].concat()));
    let (hex, name) = out
        .trim_end()
        .split_once("  ")
        .unwrap_or_else(|| panic!("checksum line: {out:?}"));
    let given = *args.last().unwrap();
    if !given.contains("://") {
        assert_eq!(name, given, "{out}");
    }
    assert_eq!(hex.len(), 64, "{out}");
    hex.to_string()
}

/// The algorithm as the command's docs state it, on QEMU's raw copy.
fn reference(img: &Path, scratch: &Path) -> String {
    let content = rimg_tests::qemu_raw_content(img, scratch);
    let mut outer = Sha256::new();
    for b in content.chunks(64 << 10) {
        outer.update(Sha256::digest(b));
    }
    outer
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The documented coreutils pipeline on a raw file.
fn pipeline(raw: &Path) -> String {
    ensure_tool("xxd", "xxd");
    let out = run_ok(
        "sh",
        &[
            "-c",
            "split -b 64K --filter='sha256sum | head -c 64 | xxd -r -p' \"$1\" | sha256sum",
            "sh",
            s(raw),
        ],
    );
    out.split_whitespace().next().unwrap().to_string()
}

#[test]
fn equal_content_gives_one_checksum_whatever_holds_it() {
    let d = tempdir();
    let dir = d.path();
    // Not a multiple of any cluster or of the 64 KiB block.
    let raw = dir.join("a.raw");
    write_mixed_raw(&raw, (24 << 20) + 3 * 512, 5);
    let want = pipeline(&raw);
    assert_eq!(reference(&raw, &dir.join("ref.raw")), want);
    let mut images = vec![raw.clone()];
    for (name, opts) in [
        ("c512.qcow2", vec!["-O", "qcow2", "-o", "cluster_size=512"]),
        ("c64k.qcow2", vec!["-O", "qcow2"]),
        ("c2m.qcow2", vec!["-O", "qcow2", "-o", "cluster_size=2M"]),
        ("zlib.qcow2", vec!["-c", "-O", "qcow2"]),
        (
            "zstd.qcow2",
            vec!["-c", "-O", "qcow2", "-o", "compression_type=zstd"],
        ),
        (
            "extl2.qcow2",
            vec!["-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k"],
        ),
        (
            "prealloc.qcow2",
            vec!["-O", "qcow2", "-o", "preallocation=full"],
        ),
        ("a.vmdk", vec!["-O", "vmdk"]),
        ("a.vdi", vec!["-O", "vdi"]),
        ("a.vhdx", vec!["-O", "vhdx"]),
    ] {
        let img = dir.join(name);
        ok(qemu_img(
            &[&["convert"], &opts[..], &[s(&raw), s(&img)]].concat(),
        ));
        images.push(img);
    }
    for img in &images {
        assert_eq!(checksum(&[s(img)]), want, "{}", img.display());
    }
    // One thread or many: the same value.
    let q = s(&images[2]);
    assert_eq!(checksum(&["--parallel", "1", q]), want);
    assert_eq!(checksum(&["--parallel", "7", "-f", "qcow2", q]), want);
    // Through an NBD export of the qcow2 image.
    let nbd = QemuNbd::start(&dir.join("q.sock"), &["-r", "-f", "qcow2", q]);
    let uri = unix_uri(&nbd.socket, "");
    assert_eq!(checksum(&["-f", "raw", &uri]), want);
}

#[test]
fn a_backing_chain_checksums_as_its_flattened_copy() {
    let d = tempdir();
    let dir = d.path();
    let raw = dir.join("base.raw");
    write_mixed_raw(&raw, 20 << 20, 9);
    let base = dir.join("base.qcow2");
    ok(qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&base)]));
    let top = dir.join("top.qcow2");
    ok(qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
        "24M",
    ]));
    // Data, zeros over data, a discard and data past the base's end.
    qemu_io(
        &top,
        &[
            "write -P 0x11 1000k 300k",
            "write -z 3M 1M",
            "discard 8M 128k",
            "write -P 0x22 21M 64k",
        ],
    );
    let flat = dir.join("flat.raw");
    let want = reference(&top, &flat);
    assert_eq!(pipeline(&flat), want);
    assert_eq!(checksum(&[s(&top)]), want);
    assert_eq!(checksum(&[s(&flat)]), want);
    // The base alone is other content.
    assert_ne!(checksum(&[s(&base)]), want);
}

#[test]
fn one_changed_byte_or_size_changes_the_checksum() {
    let d = tempdir();
    let dir = d.path();
    let raw = dir.join("a.raw");
    write_mixed_raw(&raw, 8 << 20, 3);
    let img = dir.join("a.qcow2");
    ok(qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&img)]));
    let before = checksum(&[s(&img)]);
    let mut seen = vec![before.clone()];
    // A byte in the middle of a block, the first and the last byte of the
    // disk: each written over what was there, then put back.
    for off in [3 * 65536 + 777, 0, (8 << 20) - 1] {
        let old = std::fs::read(&raw).unwrap()[off];
        let new = old ^ 0x01;
        qemu_io(&img, &[format!("write -P {new} {off} 1").as_str()]);
        let changed = checksum(&[s(&img)]);
        assert!(!seen.contains(&changed), "byte {off}: {changed}");
        seen.push(changed);
        qemu_io(&img, &[format!("write -P {old} {off} 1").as_str()]);
        assert_eq!(checksum(&[s(&img)]), before, "byte {off} put back");
    }
    // Zeros appended: the content is longer, the checksum other.
    ok(qemu_img(&["resize", s(&img), "+512"]));
    assert_ne!(checksum(&[s(&img)]), before);
}

#[test]
fn a_missing_or_bad_image_is_a_clear_error() {
    let d = tempdir();
    let missing = d.path().join("missing.qcow2");
    let o = rimg(&["checksum", s(&missing)]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Could not open") && err.contains("No such file"),
        "{err}"
    );
    assert!(o.stdout.is_empty());
    let o = rimg(&["checksum", "--parallel", "0", s(&missing)]);
    assert_ne!(o.status.code(), Some(0));
    // A qcow2 whose L1 table points to an unaligned L2 table (qemu-img
    // convert fails there too): an error, not a checksum.
    let img = d.path().join("bad.qcow2");
    ok(qemu_img(&["create", "-f", "qcow2", s(&img), "1M"]));
    qemu_io(&img, &["write -P 1 0 64k"]);
    let mut bytes = std::fs::read(&img).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let entry = u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap());
    bytes[l1..l1 + 8].copy_from_slice(&(entry + 512).to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let o = rimg(&["checksum", s(&img)]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(o.stdout.is_empty(), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not cluster aligned"), "{err}");
}
