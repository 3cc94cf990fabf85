//! monolithicSparse and streamOptimized VMDK images written by rimg as
//! qemu-img writes them:
//! `create` (every option, parents, refusals and words; the same bytes
//! but for the random CID), `convert -O vmdk` and `dd -O vmdk` (the same
//! grains in the same places), and the engine's own writes (odd offsets,
//! grains copied from a parent, threads racing to allocate the same new
//! grains, a new CID per open). Every image rimg writes is checked clean
//! and compared equal by qemu-img.

use std::path::Path;
use std::sync::Arc;

use qcow2::{Image, OpenOptions};
use rimg_tests::image::{race_new_units, read_all};
use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, qemu_img_in, same_as_qemu as same, tempdir,
    write_mixed_raw,
};

const SECTOR: usize = 512;

/// The descriptor's text (sectors 1 to 20, up to its NUL) with the CID
/// masked and the image's own name replaced.
fn descriptor(img: &[u8], name: &str) -> String {
    let d = &img[SECTOR..21 * SECTOR];
    let text = &d[..d.iter().position(|&b| b == 0).unwrap_or(d.len())];
    let text = String::from_utf8_lossy(text).replace(&format!("\"{name}\""), "\"NAME\"");
    text.lines()
        .map(|l| match l.strip_prefix("CID=") {
            Some(cid) => {
                assert!(u32::from_str_radix(cid, 16).is_ok(), "CID {cid}");
                "CID=X"
            }
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `a` and `b` are the same image but for the CID (and the name the
/// descriptor gives each).
fn same_but_cid(dir: &Path, a: &str, b: &str) {
    let (x, y) = (
        std::fs::read(dir.join(a)).unwrap(),
        std::fs::read(dir.join(b)).unwrap(),
    );
    assert_eq!(x.len(), y.len(), "{a} vs {b}: lengths");
    assert!(x[..SECTOR] == y[..SECTOR], "{a} vs {b}: headers differ");
    assert_eq!(
        descriptor(&x, a),
        descriptor(&y, b),
        "{a} vs {b}: descriptors"
    );
    let first = x[21 * SECTOR..]
        .iter()
        .zip(&y[21 * SECTOR..])
        .position(|(p, q)| p != q);
    assert!(
        first.is_none(),
        "{a} vs {b}: tables or grains differ at {first:?}"
    );
}

#[test]
fn create_matches_qemu() {
    let d = tempdir();
    let dir = d.path();
    for opts in [
        "",
        "adapter_type=lsilogic",
        "adapter_type=buslogic,toolsversion=11",
        "adapter_type=legacyESX,hwversion=undefined,compat6=on",
        "zeroed_grain=on",
        "compat6",
        "hwversion=7,subformat=monolithicSparse",
        "preallocation=full",
        "subformat=streamOptimized",
        "subformat=streamOptimized,zeroed_grain=on,adapter_type=lsilogic",
    ] {
        for size in ["1000", "1M", "64M", "1G", "3T"] {
            let mut args = vec!["create", "-f", "vmdk"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            qemu_img_in(dir, &[&args[..], &["q.vmdk", size]].concat());
            let (code, ..) = same(dir, &[&args[..], &["r.vmdk", size]].concat());
            assert_eq!(code, Some(0), "{opts} {size}");
            same_but_cid(dir, "q.vmdk", "r.vmdk");
            assert_qemu_check_clean(&dir.join("r.vmdk"));
            same(dir, &["info", "--output=json", "r.vmdk"]);
        }
    }
    // A parent: its CID is the child's parentCID, its name the hint.
    qemu_img_in(dir, &["create", "-f", "vmdk", "base.vmdk", "8M"]);
    rimg_tests::qemu_io(&dir.join("base.vmdk"), &["write -P 0x41 0 1M"]);
    let child = ["create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk"];
    qemu_img_in(dir, &[&child[..], &["q.vmdk"]].concat());
    same(dir, &[&child[..], &["r.vmdk"]].concat());
    same_but_cid(dir, "q.vmdk", "r.vmdk");
    assert_qemu_compare_equal(&dir.join("base.vmdk"), &dir.join("r.vmdk"));
    same(dir, &["info", "--output=json", "r.vmdk"]);

    qemu_img_in(dir, &["create", "-f", "qcow2", "base.qcow2", "1M"]);
    let left = |prog: &str, args: &[&str]| {
        let _ = std::fs::remove_file(dir.join("e.vmdk"));
        rimg_tests::run_in(prog, dir, args);
        std::fs::metadata(dir.join("e.vmdk")).map(|m| m.len()).ok()
    };
    let bin = rimg_tests::workspace_bin("rimg");
    for args in [
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=foo",
            "e.vmdk",
            "1M",
        ][..],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "adapter_type=IDE",
            "e.vmdk",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "adapter_type=",
            "e.vmdk",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "compat6=on,hwversion=7",
            "e.vmdk",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=maybe",
            "e.vmdk",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "preallocation=metadata",
            "e.vmdk",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "cluster_size=1M",
            "e.vmdk",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "e.vmdk",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat,zeroed_grain=on",
            "e.vmdk",
            "1M",
        ],
        &["create", "-f", "vmdk", "-o", "help", "e.vmdk"],
        &["measure", "-O", "vmdk", "--size", "5M"],
    ] {
        same(dir, args);
        assert_eq!(
            left("qemu-img", args),
            left(bin.to_str().unwrap(), args),
            "{args:?}: the file left differs"
        );
    }
    // What rimg does not write yet says so, and leaves nothing.
    for sub in [
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    ] {
        let o = format!("subformat={sub}");
        let (code, _, err) =
            rimg_tests::rimg_in(dir, &["create", "-f", "vmdk", "-o", &o, "n.vmdk", "1M"]);
        assert_eq!(code, Some(1));
        assert!(
            err.contains(&format!(
                "VMDK subformat '{sub}' is not supported by rimg yet"
            )),
            "{err}"
        );
        assert!(!dir.join("n.vmdk").exists());
    }
}

/// Converts `input` to VMDK with `opts` by both tools: the same image
/// but for the CID, checked clean, equal to the input.
fn convert_both(dir: &Path, input: &str, opts: &[&str]) {
    let args = [&["convert", "-O", "vmdk"], opts, &[input]].concat();
    qemu_img_in(dir, &[&args[..], &["q.vmdk"]].concat());
    same(dir, &[&args[..], &["r.vmdk"]].concat());
    same_but_cid(dir, "q.vmdk", "r.vmdk");
    assert_qemu_check_clean(&dir.join("r.vmdk"));
    assert_qemu_compare_equal(&dir.join(input), &dir.join("r.vmdk"));
    for cmd in ["info", "map"] {
        same(dir, &[cmd, "--output=json", "r.vmdk"]);
    }
}

#[test]
fn convert_and_dd_place_grains_as_qemu() {
    let d = tempdir();
    let dir = d.path();
    write_mixed_raw(&dir.join("in.raw"), (21 << 20) + 1000, 10);
    for opts in [
        &[][..],
        &["-S", "0"],
        &["-o", "zeroed_grain=on"],
        &["-o", "adapter_type=lsilogic"],
        &["-c"],
    ] {
        convert_both(dir, "in.raw", opts);
    }
    qemu_img_in(dir, &["convert", "-O", "qcow2", "in.raw", "in.qcow2"]);
    qemu_img_in(
        dir,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "in.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    rimg_tests::qemu_io(
        &dir.join("top.qcow2"),
        &["write -z 0 3M", "write -P 0x5a 5M 100k"],
    );
    convert_both(dir, "top.qcow2", &[]);
    std::fs::rename(dir.join("r.vmdk"), dir.join("again.vmdk")).unwrap();
    convert_both(dir, "again.vmdk", &[]);
    qemu_img_in(dir, &["convert", "-O", "vmdk", "top.qcow2", "n.vmdk"]);
    same(dir, &["convert", "-n", "-O", "vmdk", "in.raw", "n.vmdk"]);
    assert_qemu_check_clean(&dir.join("n.vmdk"));
    assert_qemu_compare_equal(&dir.join("in.raw"), &dir.join("n.vmdk"));
    let dd = ["dd", "-O", "vmdk", "bs=192k", "count=100", "if=in.raw"];
    qemu_img_in(dir, &[&dd[..], &["of=q.vmdk"]].concat());
    same(dir, &[&dd[..], &["of=r.vmdk"]].concat());
    same_but_cid(dir, "q.vmdk", "r.vmdk");
    assert_qemu_check_clean(&dir.join("r.vmdk"));
}

fn open_rw(path: &Path) -> Arc<dyn Image> {
    let o = OpenOptions {
        writable: true,
        ..Default::default()
    };
    qcow2::open(path, &o).unwrap()
}

fn cid(path: &Path) -> String {
    let b = std::fs::read(path).unwrap();
    let d = descriptor(&b, "");
    let raw = String::from_utf8_lossy(&b[SECTOR..21 * SECTOR]).into_owned();
    assert!(d.contains("CID=X"));
    raw.lines()
        .find_map(|l| l.strip_prefix("CID="))
        .unwrap()
        .to_string()
}

/// Writes through the engine at odd offsets and lengths, into a child
/// over a parent (new grains take the parent's bytes around the write),
/// against a model of the disk.
#[test]
fn engine_writes_read_back_and_check_clean() {
    use rand::{Rng, SeedableRng};
    let d = tempdir();
    let dir = d.path();
    let size: u64 = (9 << 20) + 512;
    qemu_img_in(
        dir,
        &["create", "-f", "vmdk", "base.vmdk", &size.to_string()],
    );
    rimg_tests::qemu_io(
        &dir.join("base.vmdk"),
        &["write -P 0x41 0 4M", "write -P 0x42 6M 1M"],
    );
    for parent in [false, true] {
        let path = dir.join(format!("w{parent}.vmdk"));
        let mut o = qcow2::CreateOptions {
            format: qcow2::Format::Vmdk,
            size,
            ..Default::default()
        };
        if parent {
            o.backing_file = Some("base.vmdk".into());
            o.backing_format = Some("vmdk".into());
        }
        qcow2::create(&path, &o).unwrap();
        let img = open_rw(&path);
        let mut model = if parent {
            read_all(img.as_ref())
        } else {
            vec![0u8; size as usize]
        };
        let before = cid(&path);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for i in 0..150 {
            let len = rng.random_range(1..(1 << 20)) as u64;
            let off = rng.random_range(0..size - len);
            let range = off as usize..(off + len) as usize;
            if i % 5 == 4 {
                img.write_zeroes(off, len, true).unwrap();
                model[range].fill(0);
            } else {
                let mut b = vec![0u8; len as usize];
                rng.fill(&mut b[..]);
                img.write_at(&b, off).unwrap();
                model[range].copy_from_slice(&b);
            }
        }
        assert!(read_all(img.as_ref()) == model, "engine reads differ");
        img.flush().unwrap();
        drop(img);
        assert_ne!(cid(&path), before, "the first write keeps the CID");
        std::fs::write(dir.join("model.raw"), &model).unwrap();
        assert_qemu_check_clean(&path);
        assert_qemu_compare_equal(&dir.join("model.raw"), &path);
    }
}

/// Threads write interleaved 4 KiB pieces of the same new grains: each
/// grain is allocated once.
#[test]
fn racing_writers_allocate_each_grain_once() {
    const GRAINS: u64 = 48;
    const GRAIN: u64 = 64 << 10;
    let d = tempdir();
    let path = d.path().join("race.vmdk");
    for round in 0..4u64 {
        let o = qcow2::CreateOptions {
            format: qcow2::Format::Vmdk,
            size: GRAINS * GRAIN,
            ..Default::default()
        };
        qcow2::create(&path, &o).unwrap();
        let empty = std::fs::metadata(&path).unwrap().len();
        let img = open_rw(&path);
        race_new_units(&img, GRAINS, GRAIN, round);
        drop(img);
        let file = std::fs::metadata(&path).unwrap().len();
        assert_eq!(
            file,
            empty + GRAINS * GRAIN,
            "round {round}: grains allocated twice"
        );
        assert_qemu_check_clean(&path);
    }
}

#[test]
fn what_rimg_or_qemu_cannot_write_is_refused() {
    let d = tempdir();
    let dir = d.path();
    qemu_img_in(dir, &["create", "-f", "vmdk", "x.vmdk", "4M"]);
    {
        let sub = "monolithicFlat";
        let o = format!("subformat={sub}");
        qemu_img_in(
            dir,
            &[
                "create",
                "-f",
                "vmdk",
                "-o",
                &o,
                &format!("{sub}.vmdk"),
                "4M",
            ],
        );
        let e = qcow2::open(
            &dir.join(format!("{sub}.vmdk")),
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .map(|_| ())
        .unwrap_err();
        assert!(
            matches!(e, qcow2::Error::ReadOnlyFormat("vmdk")),
            "{sub}: {e}"
        );
    }
    for args in [
        &["resize", "x.vmdk", "8M"][..],
        &["amend", "-o", "compat6=on", "x.vmdk"],
        &["snapshot", "-c", "s1", "x.vmdk"],
        &["commit", "x.vmdk"],
        &["check", "-r", "all", "x.vmdk"],
    ] {
        same(dir, args);
    }
}

/// streamOptimized as qemu-img writes it: grains compressed (zlib, so
/// not byte for byte: compared as content), the same tables and header,
/// whole grains only, each written once.
#[test]
fn stream_optimized_images_take_whole_grains_once() {
    let d = tempdir();
    let dir = d.path();
    write_mixed_raw(&dir.join("in.raw"), (13 << 20) + 1000, 11);
    for opts in [&[][..], &["-S", "0"], &["-W"]] {
        let args = [
            &["convert", "-O", "vmdk", "-o", "subformat=streamOptimized"],
            opts,
            &["in.raw"],
        ]
        .concat();
        qemu_img_in(dir, &[&args[..], &["q.vmdk"]].concat());
        same(dir, &[&args[..], &["r.vmdk"]].concat());
        let (q, r) = (
            std::fs::read(dir.join("q.vmdk")).unwrap(),
            std::fs::read(dir.join("r.vmdk")).unwrap(),
        );
        assert!(q[..SECTOR] == r[..SECTOR], "{opts:?}: headers differ");
        assert_eq!(descriptor(&q, "q.vmdk"), descriptor(&r, "r.vmdk"));
        assert_qemu_check_clean(&dir.join("r.vmdk"));
        assert_qemu_compare_equal(&dir.join("in.raw"), &dir.join("r.vmdk"));
        for cmd in ["info", "check"] {
            same(dir, &[cmd, "--output=json", "r.vmdk"]);
        }
    }
    // The engine: whole grains go in once; a part of a grain, or a grain
    // again, is refused (EINVAL, EIO) as QEMU refuses them.
    let o = qcow2::CreateOptions {
        format: qcow2::Format::Vmdk,
        size: (1 << 20) + 4096,
        foreign: qcow2::foreign::CreateOptions {
            subformat: Some("streamOptimized".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let path = dir.join("s.vmdk");
    qcow2::create(&path, &o).unwrap();
    let img = open_rw(&path);
    assert!(img.compressed_writes_only());
    let errno = |r: qcow2::Result<()>| match r {
        Err(qcow2::Error::Io { source, .. }) => source.raw_os_error(),
        r => panic!("{r:?}"),
    };
    assert_eq!(errno(img.write_at(&[1; 4096], 0)), Some(libc::EINVAL));
    img.write_at(&[2; 65536], 65536).unwrap();
    img.write_compressed(0, &[3; 65536]).unwrap();
    assert_eq!(errno(img.write_at(&[4; 65536], 65536)), Some(libc::EIO));
    // The last grain, short: up to the disk's end.
    img.write_at(&[5; 4096], 1 << 20).unwrap();
    let mut want = vec![0u8; (1 << 20) + 4096];
    want[..65536].fill(3);
    want[65536..131072].fill(2);
    want[1 << 20..].fill(5);
    assert!(read_all(img.as_ref()) == want);
    drop(img);
    std::fs::write(dir.join("s.raw"), &want).unwrap();
    assert_qemu_check_clean(&path);
    assert_qemu_compare_equal(&dir.join("s.raw"), &path);
}
