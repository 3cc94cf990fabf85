//! VHD images (QEMU's vpc format; made by `fixtures/make-foreign.sh` at
//! test time) read by the engine and the CLI exactly as qemu-img reads
//! them: content at odd offsets and lengths, `info`, `map`, `check`
//! (human and JSON, exit codes), `convert` to raw and qcow2 (the same
//! bytes), `compare`; the virtual-size rules (creator application,
//! maximum geometry, `force_size_calc`); fixed disks probed as raw and
//! read as VHD with `-f vpc`; every open error QEMU's vpc driver has, on
//! hand-made footers, headers and BATs. Writing VHD images:
//! `foreign_vpc_write.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2::{ExtentKind, Format, OpenOptions};
use rimg_tests::{
    make_foreign, patched_copy, rimg_in as rimg, same_as_qemu as same, seal_vhd_footers, tempdir,
    FOREIGN_VPC,
};

fn fixtures() -> (tempfile::TempDir, Vec<PathBuf>) {
    let d = tempdir();
    make_foreign(d.path());
    let paths = FOREIGN_VPC.iter().map(|n| d.path().join(n)).collect();
    (d, paths)
}

fn is_fixed(name: &str) -> bool {
    name.contains("fixed")
}

/// The guest content of `img` as qemu-img reads it with `-f vpc`.
fn qemu_content(img: &Path, opts: &[&str]) -> Vec<u8> {
    let scratch = img.with_extension("want");
    let mut args = vec!["convert"];
    args.extend(opts);
    args.extend([
        "-O",
        "raw",
        img.to_str().unwrap(),
        scratch.to_str().unwrap(),
    ]);
    let o = rimg_tests::qemu_img(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(scratch).unwrap()
}

fn open_vpc(img: &Path) -> qcow2::Result<std::sync::Arc<dyn qcow2::Image>> {
    qcow2::open(
        img,
        &OpenOptions {
            format: Some(Format::Vpc),
            ..Default::default()
        },
    )
}

/// A copy of `from` named `to` with `edits` made, then the footers'
/// checksums recomputed (so that the checks behind the checksum are
/// reached).
fn sealed(dir: &Path, from: &str, to: &str, edits: &[(u64, Vec<u8>)]) -> String {
    patched_copy(dir, from, to, edits);
    let p = dir.join(to);
    let mut b = std::fs::read(&p).unwrap();
    seal_vhd_footers(&mut b);
    std::fs::write(&p, b).unwrap();
    to.to_string()
}

fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

#[test]
fn engine_reads_vpc_like_qemu() {
    let (d, images) = fixtures();
    for img in &images {
        let name = img.file_name().unwrap().to_string_lossy().into_owned();
        let want = qemu_content(img, &["-f", "vpc"]);
        // Probed as QEMU probes: a fixed disk has no footer at 0.
        let probed = qcow2::probe(img).unwrap();
        let expect = if is_fixed(&name) {
            Format::Raw
        } else {
            Format::Vpc
        };
        assert_eq!(probed, expect, "{name}: probed");
        let image = open_vpc(img).unwrap();
        assert_eq!(image.format(), Format::Vpc);
        assert_eq!(image.size(), want.len() as u64, "{name}: size");
        let block = (!is_fixed(&name)).then_some(2u64 << 20);
        assert_eq!(image.cluster_size(), block, "{name}: cluster size");
        // Chunks that cross sectors and 2 MiB blocks at odd places.
        rimg_tests::assert_reads_as(
            image.as_ref(),
            &want,
            &name,
            &[4097, 511, 65536 + 3, (2 << 20) + 5],
        );
        // Block status and the split data path agree with the content.
        let size = image.size();
        let mut pos = 0;
        while pos < size {
            let e = image.block_status(pos, size - pos).unwrap();
            let range = pos as usize..(pos + e.len) as usize;
            match (e.kind, block) {
                (ExtentKind::Zero, _) => assert!(
                    want[range.clone()].iter().all(|&b| b == 0),
                    "{name}: hole at {pos}"
                ),
                (ExtentKind::Data, None) => {
                    // A fixed disk: the file's own bytes, one run.
                    assert_eq!((e.offset, e.len, e.recurse), (Some(pos), size - pos, true));
                }
                (ExtentKind::Data, Some(bs)) => {
                    assert!(e.offset.is_some() && !e.recurse);
                    assert_eq!(pos / bs, (pos + e.len - 1) / bs, "{name}: crosses a block");
                }
                (ExtentKind::Unallocated, _) => panic!("{name}: unallocated at {pos}"),
            }
            let (m, n) = image.map_read(pos, e.len).unwrap();
            assert_eq!(n, e.len);
            let mut b = vec![1u8; n as usize];
            image.read_mapped(m, &mut b, pos).unwrap();
            assert!(b == want[range], "{name}: mapped read at {pos} differs");
            pos += e.len;
        }
    }
    // The 6 MiB disk: block 1 is the hole between blocks 0 and 2, whose
    // data lie in the file in another order (2, 0, 3).
    let image = open_vpc(&d.path().join("vpc-dynamic-6m.vhd")).unwrap();
    let at = |off: u64| image.block_status(off, image.size() - off).unwrap();
    let (b0, b1, b2, b3) = (at(0), at(2 << 20), at(4 << 20), at(6 << 20));
    assert_eq!((b1.kind, b1.len), (ExtentKind::Zero, 2 << 20));
    assert!(
        b2.offset < b0.offset && b0.offset < b3.offset,
        "{b0:?} {b2:?} {b3:?}"
    );
}

#[test]
fn info_map_check_match_qemu() {
    let (d, _) = fixtures();
    let dir = d.path();
    for name in FOREIGN_VPC {
        let mut cases = vec![
            vec!["info", name],
            vec!["info", "--output=json", name],
            vec!["info", "-f", "vpc", name],
            vec!["info", "-f", "vpc", "--output=json", name],
            vec!["map", "-f", "vpc", name],
            vec!["map", "-f", "vpc", "--output=json", name],
            vec![
                "map",
                "-f",
                "vpc",
                "--output=json",
                "--start-offset=1000",
                "--max-length=2500001",
                name,
            ],
            vec!["measure", "-f", "vpc", "-O", "qcow2", name],
        ];
        if !is_fixed(name) {
            cases.push(vec!["map", name]);
            cases.push(vec!["map", "--output=json", name]);
        }
        for args in cases {
            same(dir, &args);
        }
        // QEMU's vpc driver has no check, with or without repair.
        let mut checks = vec![
            vec!["check", "-f", "vpc", name],
            vec!["check", "-f", "vpc", "--output=json", name],
            vec!["check", "-f", "vpc", "-r", "all", name],
            vec!["check", "-f", "vpc", "-r", "leaks", name],
        ];
        if !is_fixed(name) {
            checks.push(vec!["check", "-r", "all", name]);
        }
        for args in checks {
            let (code, out, err) = same(dir, &args);
            assert_eq!(
                (code, out.as_str(), err.as_str()),
                (
                    Some(63),
                    "",
                    "qemu-img: This image format does not support checks\n"
                )
            );
        }
    }
    // What the answers look like: a fixed disk's file holes are zeros
    // with data and an offset; a dynamic disk's holes are zeros without
    // data, and it reports its block size (a fixed disk none).
    let (_, out, _) = same(dir, &["map", "-f", "vpc", "--output=json", "vpc-fixed.vhd"]);
    assert!(out.contains("\"zero\": true, \"data\": true"), "{out}");
    let (_, out, _) = same(dir, &["map", "--output=json", "vpc-dynamic-6m.vhd"]);
    assert!(out.contains("\"present\": true, \"zero\": true, \"data\": false"));
    let (_, out, _) = same(dir, &["info", "-f", "vpc", "vpc-fixed.vhd"]);
    assert!(!out.contains("cluster_size"), "{out}");
    let (_, out, _) = same(dir, &["info", "vpc-dynamic.vhd"]);
    assert!(out.contains("cluster_size: 2097152\n"), "{out}");
    // Probed, a fixed disk is raw: footer included in its size.
    let (_, out, _) = same(dir, &["info", "vpc-fixed.vhd"]);
    assert!(out.contains("file format: raw\n"), "{out}");
}

/// The virtual size: the creator application decides between the CHS
/// geometry and the current size, the maximum geometry always means the
/// current size, and `force_size_calc` overrides the application.
#[test]
fn size_rules_match_qemu() {
    let (d, _) = fixtures();
    let dir = d.path();
    // QEMU's own app with a current size below the geometry's.
    sealed(
        dir,
        "vpc-dynamic.vhd",
        "vpc-qemu.vhd",
        &[(48, be64(5 << 20))],
    );
    let cases: &[(&str, Option<&str>, u64)] = &[
        // App "qemu": the geometry, 151/4/17.
        ("vpc-qemu.vhd", None, 5257216),
        ("vpc-qemu.vhd", Some("current_size"), 5242880),
        // App "win ": the current size (5242980, rounded down).
        ("vpc-win.vhd", None, 5242880),
        ("vpc-win.vhd", Some("chs"), 5257216),
        ("vpc-win.vhd", Some("current_size"), 5242880),
        // App "vpc ": the geometry, 151/4/17.
        ("vpc-vpc.vhd", None, 5257216),
        ("vpc-vpc.vhd", Some("chs"), 5257216),
        ("vpc-vpc.vhd", Some("current_size"), 5242880),
        // App "qem2" at the maximum geometry: the current size, always.
        ("vpc-dynamic-force.vhd", Some("chs"), 5242880),
        ("vpc-fixed-force.vhd", Some("chs"), 5242880),
        // App "qemu": the geometry, which is also its current size.
        ("vpc-fixed.vhd", Some("current_size"), 5257216),
    ];
    for &(name, calc, size) in cases {
        let spec = match calc {
            Some(c) => format!("driver=vpc,file.filename={name},force_size_calc={c}"),
            None => format!("driver=vpc,file.filename={name}"),
        };
        let (code, out, _) = same(dir, &["map", "--output=json", "--image-opts", &spec]);
        assert_eq!(code, Some(0));
        let map: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        let last = map.last().unwrap();
        let end = last["start"].as_u64().unwrap() + last["length"].as_u64().unwrap();
        assert_eq!(end, size, "{spec}");
        same(dir, &["compare", "--image-opts", &spec, &spec]);
        same(dir, &["measure", "-O", "qcow2", "--image-opts", &spec]);
        // info names the image by its options: a json: name (keys in
        // QEMU's hash order), its child by the file's name.
        let (_, out, _) = same(dir, &["info", "--output=json", "--image-opts", &spec]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["virtual-size"], size, "{spec}");
        same(dir, &["info", "--image-opts", &spec]);
        // The content at that size, through the engine.
        let out = format!("{name}.{}.raw", calc.unwrap_or("auto"));
        let o = Command::new("qemu-img")
            .args(["convert", "-O", "raw", "--image-opts", &spec, &out])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{spec}");
        let want = std::fs::read(dir.join(&out)).unwrap();
        let opts = OpenOptions {
            format: Some(Format::Vpc),
            vpc_force_size_calc: calc.map(str::to_string),
            ..Default::default()
        };
        let image = qcow2::open(&dir.join(name), &opts).unwrap();
        assert_eq!(image.size(), size, "{spec}");
        let mut got = vec![1u8; want.len()];
        image.read_at(&mut got, 0).unwrap();
        assert!(got == want, "{spec}: content differs");
    }
    // A value QEMU does not know: its message, from every command.
    for spec in [
        "driver=vpc,file.filename=vpc-win.vhd,force_size_calc=bad",
        "driver=vpc,file.filename=vpc-fixed.vhd,force_size_calc=",
    ] {
        for cmd in ["info", "map", "convert"] {
            let mut args = vec![cmd, "--image-opts", spec];
            if cmd == "convert" {
                args.extend(["-O", "raw", "out.raw"]);
            }
            let (code, _, err) = same(dir, &args);
            assert_eq!(code, Some(1));
            assert!(err.contains("Invalid size calculation mode: '"), "{err}");
        }
    }
    let json = r#"json:{"driver":"vpc","file":{"driver":"file","filename":"vpc-win.vhd"},"force_size_calc":"chs"}"#;
    let (_, out, _) = same(dir, &["map", "--output=json", json]);
    assert!(out.contains("\"length\": 1062912"), "{out}");
    // QEMU's name for it: its strong option, driver and file, keys in
    // its hash table's order, whatever else was given.
    let opts = "driver=vpc,file.driver=file,file.filename=vpc-win.vhd,\
                force_size_calc=chs,read-only=on";
    let name = r#"json:{"force_size_calc": "chs", "driver": "vpc", "file": {"driver": "file", "filename": "vpc-win.vhd"}}"#;
    for args in [vec!["info", json], vec!["info", "--image-opts", opts]] {
        let (_, out, _) = same(dir, &args);
        assert!(out.starts_with(&format!("image: {name}\n")), "{out}");
    }
    same(dir, &["info", "--output=json", json]);
}

#[test]
fn convert_and_compare_match_qemu() {
    let (d, _) = fixtures();
    let dir = d.path();
    for name in FOREIGN_VPC {
        for fmt in ["raw", "qcow2"] {
            let ours = format!("{name}.rimg.{fmt}");
            let theirs = format!("{name}.qemu.{fmt}");
            let args =
                |out: &str| ["convert", "-f", "vpc", "-O", fmt, name, out].map(str::to_string);
            let (code, _, err) = rimg(dir, &args(&ours).each_ref().map(String::as_str));
            assert_eq!(code, Some(0), "{name} to {fmt}: {err}");
            let o = Command::new("qemu-img")
                .args(args(&theirs))
                .current_dir(dir)
                .output()
                .unwrap();
            assert!(o.status.success(), "qemu-img {name} to {fmt}");
            let a = std::fs::read(dir.join(&ours)).unwrap();
            let b = std::fs::read(dir.join(&theirs)).unwrap();
            assert!(
                a == b,
                "{name} to {fmt}: rimg's output differs from qemu-img's"
            );
            let (code, out, _) = same(dir, &["compare", "-f", "vpc", name, &ours]);
            assert_eq!((code, out.as_str()), (Some(0), "Images are identical.\n"));
            same(dir, &["compare", "-s", "-f", "vpc", name, &ours]);
        }
    }
    // dd reads them too (a window that starts inside a block).
    for name in ["vpc-dynamic-6m.vhd", "vpc-fixed.vhd"] {
        let input = format!("if={name}");
        for (prog, out) in [("rimg", "of=dd.rimg"), ("qemu-img", "of=dd.qemu")] {
            let args = [
                "dd", "-f", "vpc", "-O", "raw", "bs=64k", "skip=3", "count=70",
            ];
            let mut args = args.to_vec();
            args.extend([input.as_str(), out]);
            let code = match prog {
                "rimg" => rimg(dir, &args).0,
                _ => {
                    let o = Command::new(prog).args(&args).current_dir(dir).output();
                    o.unwrap().status.code()
                }
            };
            assert_eq!(code, Some(0), "{prog} {args:?}");
        }
        let a = std::fs::read(dir.join("dd.rimg")).unwrap();
        assert!(
            a == std::fs::read(dir.join("dd.qemu")).unwrap(),
            "dd of {name}"
        );
        // qemu-img dd counts the skipped blocks in `count`.
        assert_eq!(a.len(), 67 * 65536);
    }
    // Probed (no -f): a dynamic disk is vpc, a fixed one raw.
    for name in ["vpc-dynamic.vhd", "vpc-fixed.vhd"] {
        same(dir, &["convert", "-O", "raw", name, "probed.raw"]);
        let o = Command::new(rimg_tests::workspace_bin("rimg"))
            .args(["compare", name, "probed.raw"])
            .current_dir(dir)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{name}");
    }
    let (code, out, _) = same(dir, &["compare", "vpc-dynamic.vhd", "vpc-dynamic-6m.vhd"]);
    assert_eq!(code, Some(1), "{out}");
    // Same content, different sizes: -s says so; the 5 MiB reading of
    // vpc-win is vpc-dynamic cut short.
    let (code, ..) = same(dir, &["compare", "vpc-win.vhd", "vpc-dynamic.vhd"]);
    assert_eq!(code, Some(0));
    let (code, ..) = same(dir, &["compare", "-s", "vpc-win.vhd", "vpc-dynamic.vhd"]);
    assert_eq!(code, Some(1));
    same(
        dir,
        &[
            "compare",
            "-f",
            "vpc",
            "vpc-empty.vhd",
            "vpc-empty.vhd.qemu.raw",
        ],
    );
}

/// One hand-made image per refusal of QEMU's vpc driver, in its order of
/// checks, and the near misses that open: the same message (or content)
/// and exit code from every command.
#[test]
fn open_errors_match_qemu() {
    let (d, _) = fixtures();
    let dir = d.path();
    let dynamic = "vpc-dynamic.vhd";
    // Its footer at 0, dynamic header at 512 (BAT offset at 512 + 16,
    // entry count at 512 + 28, block size at 512 + 32), BAT at 1536.
    let h = 512u64;
    // QEMU's block layer reads nothing past 2^63 - 2^30.
    let max_offset = (i64::MAX as u64) & !((1 << 30) - 1);
    let truncated = "block-vpc: free_data_block_offset points after the end of file. \
                     The image has been truncated.";
    let pagetable = "Error reading pagetable";
    // (file, edits, message; None: the image opens).
    type Edits = Vec<(u64, Vec<u8>)>;
    let dynamic_cases: Vec<(&str, Edits, Option<&str>)> = vec![
        (
            "efbig.vhd",
            vec![(28, b"win ".to_vec()), (48, be64(0xff00_0001 << 9))],
            Some("Could not open 'efbig.vhd': File too large"),
        ),
        (
            "dyn-magic.vhd",
            vec![(h + 7, b"x".to_vec())],
            Some("Invalid header magic"),
        ),
        // Past the end of the file: zeros, no magic.
        (
            "dyn-past-eof.vhd",
            vec![(16, be64(1 << 40))],
            Some("Invalid header magic"),
        ),
        (
            "dyn-at-limit.vhd",
            vec![(16, be64(max_offset - 1024))],
            Some("Invalid header magic"),
        ),
        (
            "dyn-unreadable.vhd",
            vec![(16, be64(max_offset - 1023))],
            Some("Error reading dynamic VHD header"),
        ),
        // A fixed disk's footer at 0 takes the dynamic path; its data
        // offset says "none" (all ones).
        (
            "fixed-at-0.vhd",
            vec![(16, be64(u64::MAX)), (60, be32(2))],
            Some("Error reading dynamic VHD header"),
        ),
        (
            "block-size.vhd",
            vec![(h + 32, be32(1000))],
            Some("Invalid block size 1000"),
        ),
        (
            "block-size-0.vhd",
            vec![(h + 32, be32(0))],
            Some("Invalid block size 0"),
        ),
        (
            "block-size-256.vhd",
            vec![(h + 32, be32(256))],
            Some("Invalid block size 256"),
        ),
        (
            "table-small.vhd",
            vec![(h + 28, be32(2))],
            Some("Page table too small"),
        ),
        (
            "table-large.vhd",
            vec![(h + 28, be32(0x2000_0000))],
            Some("Max Table Entries too large (536870912)"),
        ),
        (
            "table-negative.vhd",
            vec![(h + 28, be32(0x8000_0000))],
            Some("Max Table Entries too large (-2147483648)"),
        ),
        (
            "table-minus-1.vhd",
            vec![(h + 28, be32(u32::MAX))],
            Some("Max Table Entries too large (-1)"),
        ),
        // A negative count: its room, times the block size, wraps to
        // nearly 2^64, and the count's own check speaks.
        (
            "table-wraps.vhd",
            vec![(h + 28, be32(0xffff_ff00)), (h + 32, be32(1 << 24))],
            Some("Max Table Entries too large (-256)"),
        ),
        (
            "bat-unreadable.vhd",
            vec![(h + 16, be64(max_offset - 11))],
            Some(pagetable),
        ),
        (
            "bat-at-limit.vhd",
            vec![(h + 16, be64(max_offset - 12))],
            Some(truncated),
        ),
        // 0x1fffff81 entries: one request of more than 2^31 - 512 bytes.
        (
            "bat-too-long.vhd",
            vec![(h + 28, be32(0x1fff_ff81)), (h + 32, be32(512))],
            Some(pagetable),
        ),
        (
            "bat-longest.vhd",
            vec![(h + 28, be32(0x1fff_ff80)), (h + 32, be32(512))],
            Some(truncated),
        ),
        // Entries past the end of the file read as 0: block at sector 0.
        (
            "bat-past-eof.vhd",
            vec![(h + 16, be64(1 << 30))],
            Some(truncated),
        ),
        (
            "block-past-eof.vhd",
            vec![(1536 + 8, be32(8192))],
            Some(truncated),
        ),
        (
            "block-huge.vhd",
            vec![(h + 32, be32(0x8000_0000))],
            Some(truncated),
        ),
        // Not checked by QEMU: the dynamic header's checksum.
        ("dyn-checksum.vhd", vec![(h + 36, be32(0x1234_5678))], None),
    ];
    let mut cases: Vec<(String, Option<String>)> = Vec::new();
    for (name, edits, msg) in &dynamic_cases {
        sealed(dir, dynamic, name, edits);
        cases.push((name.to_string(), msg.map(str::to_string)));
    }
    let says = |m: &str| Some(m.to_string());
    patched_copy(dir, dynamic, "checksum.vhd", &[(100, vec![1])]);
    cases.push(("checksum.vhd".into(), says("Incorrect header checksum")));
    // A dynamic disk cut short: its last block ends past the file (the
    // file is measured in whole sectors: 511 bytes short still opens).
    let bytes = std::fs::read(dir.join(dynamic)).unwrap();
    let end = 4197376; // the end of its second block
    for (name, len, msg) in [
        ("cut-512.vhd", end - 512, says(truncated)),
        ("cut-511.vhd", end - 511, None),
    ] {
        std::fs::write(dir.join(name), &bytes[..len]).unwrap();
        cases.push((name.into(), msg));
    }
    // Fixed disks: no footer at 0, so the last sector must hold one that
    // says fixed.
    let fixed = std::fs::read(dir.join("vpc-fixed.vhd")).unwrap();
    let n = fixed.len();
    let mut tail = fixed.clone();
    tail.extend([7; 100]);
    let mut bad = fixed.clone();
    bad[n - 512 + 100] ^= 1;
    let mut type3 = fixed.clone();
    type3[n - 512 + 63] = 3;
    seal_vhd_footers(&mut type3);
    for (name, b, msg) in [
        (
            "empty.vhd",
            &[][..],
            says("File too small for a VHD header"),
        ),
        // 100 bytes are one sector to QEMU: no "too small" then.
        ("tiny.vhd", &[0; 100][..], says("invalid VPC image")),
        (
            "no-footer.vhd",
            &fixed[..n - 512],
            says("invalid VPC image"),
        ),
        // Its footer found at 0: the dynamic path, as above.
        (
            "footer-only.vhd",
            &fixed[n - 512..],
            says("Error reading dynamic VHD header"),
        ),
        (
            "footer-cut.vhd",
            &fixed[n - 412..],
            says("invalid VPC image"),
        ),
        ("tail.vhd", &tail[..], says("invalid VPC image")),
        // The footer's zero tail cut off: read back as zeros.
        ("footer-short.vhd", &fixed[..n - 100], None),
        (
            "fixed-checksum.vhd",
            &bad[..],
            says("Incorrect header checksum"),
        ),
        ("fixed-type-3.vhd", &type3[..], says("invalid VPC image")),
    ] {
        std::fs::write(dir.join(name), b).unwrap();
        cases.push((name.into(), msg));
    }

    for (f, msg) in &cases {
        let f = f.as_str();
        // Probed (raw, where there is no footer at 0) and forced.
        same(dir, &["info", f]);
        let (code, _, err) = same(dir, &["info", "-f", "vpc", f]);
        let Some(msg) = msg else {
            assert_eq!(code, Some(0), "{f}: {err}");
            let want = qemu_content(&dir.join(f), &["-f", "vpc"]);
            let image = open_vpc(&dir.join(f)).unwrap();
            let mut got = vec![1u8; want.len()];
            image.read_at(&mut got, 0).unwrap();
            assert!(got == want, "{f}: content differs");
            same(dir, &["map", "-f", "vpc", "--output=json", f]);
            continue;
        };
        assert_eq!(
            (code, err),
            (Some(1), format!("qemu-img: Could not open '{f}': {msg}\n")),
            "{f}"
        );
        for args in [
            vec!["map", "-f", "vpc", f],
            vec!["check", "-f", "vpc", f],
            vec!["convert", "-f", "vpc", "-O", "raw", f, "out.raw"],
            vec!["compare", "-f", "vpc", f, f],
        ] {
            let (code, ..) = same(dir, &args);
            // compare's exit code for an error is 2.
            let want = if args[0] == "compare" { 2 } else { 1 };
            assert_eq!(code, Some(want), "{f}: {args:?}");
        }
    }
}

/// A footer at 0 that says "fixed", over a dynamic header and BAT that
/// hold: QEMU opens it down the dynamic path, then reads it as a fixed
/// disk (the file's own bytes, footer included) and reports no block
/// size. A differencing disk reads as its dynamic self.
#[test]
fn footer_type_decides_reads() {
    let (d, _) = fixtures();
    let dir = d.path();
    let f = sealed(dir, "vpc-dynamic.vhd", "type-fixed.vhd", &[(60, be32(2))]);
    for args in [
        vec!["info", f.as_str()],
        vec!["info", "--output=json", f.as_str()],
        vec!["map", "--output=json", f.as_str()],
        vec!["map", f.as_str()],
        vec!["convert", "-O", "raw", f.as_str(), "type-fixed.raw"],
    ] {
        same(dir, &args);
    }
    let raw = std::fs::read(dir.join("type-fixed.raw")).unwrap();
    let file = std::fs::read(dir.join(&f)).unwrap();
    assert_eq!(&raw[..512], &file[..512], "the footer is guest data");
    let image = qcow2::open(&dir.join(&f), &OpenOptions::default()).unwrap();
    assert_eq!(image.cluster_size(), None);
    let mut got = vec![0u8; raw.len()];
    image.read_at(&mut got, 0).unwrap();
    assert!(got == raw);
    let diff = qemu_content(&dir.join("vpc-diff.vhd"), &[]);
    let dynamic = qemu_content(&dir.join("vpc-dynamic.vhd"), &[]);
    assert!(diff == dynamic);
    let image = qcow2::open(&dir.join("vpc-diff.vhd"), &OpenOptions::default()).unwrap();
    let mut got = vec![0u8; diff.len()];
    image.read_at(&mut got, 0).unwrap();
    assert!(got == diff);
}

/// A qcow2 image over a VHD backing file (`-F vpc`; a fixed one would
/// probe as raw): reads fall through to the VHD where the top has no
/// data, and info, map, compare and convert answer as qemu-img's.
#[test]
fn vpc_as_a_backing_file() {
    let (d, _) = fixtures();
    let dir = d.path();
    for (top, base) in [
        ("over-dynamic.qcow2", "vpc-dynamic-6m.vhd"),
        ("over-fixed.qcow2", "vpc-fixed.vhd"),
    ] {
        let t = dir.join(top);
        rimg_tests::qemu_create_backed(&t, "", &dir.join(base), "vpc", "");
        rimg_tests::qemu_io(&t, &["write -P 0x77 1M 64k"]);
        for args in [
            vec!["info", top],
            vec!["info", "--backing-chain", "--output=json", top],
            vec!["map", top],
            vec!["map", "--output=json", top],
            vec!["check", top],
        ] {
            let (code, ..) = same(dir, &args);
            assert_eq!(code, Some(0), "{args:?}");
        }
        let (code, out, _) = same(dir, &["compare", "-F", "vpc", top, base]);
        assert_eq!(code, Some(1), "{out}");
        let want = qemu_content(&t, &[]);
        let image = qcow2::open(&t, &OpenOptions::default()).unwrap();
        assert_eq!(image.size(), want.len() as u64);
        rimg_tests::assert_reads_as(image.as_ref(), &want, top, &[65536 + 7]);
        assert!(want[(1 << 20)..(1 << 20) + 65536]
            .iter()
            .all(|&b| b == 0x77));
        let below = qemu_content(&dir.join(base), &["-f", "vpc"]);
        assert!(
            want[..1 << 20] == below[..1 << 20],
            "{top}: the base's data"
        );
    }
}
