//! convert's options for hard cases against qemu-img's: `--salvage`
//! (sectors that cannot be read are reported, unless -q, and written as
//! zeros; the rest is copied), blkdebug's injected read errors (the tool
//! qemu-iotests 251 uses: the first rule given that matches fails the
//! read), `-C`'s refusals and `--target-image-opts`.

use std::path::Path;

use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, qemu_img, rimg, same_as_qemu, tempdir,
};

/// 1 MiB of data deflate shrinks (nibbles), the same every run.
fn data() -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x & 0x0f) as u8
        })
        .collect()
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Garbles the compressed data of guest cluster `n` of the compressed
/// qcow2 `img` (qcow2.rst, "Compressed Clusters Descriptor").
fn garble_compressed_cluster(img: &Path, n: usize) {
    let mut b = std::fs::read(img).unwrap();
    let cb = u32::from_be_bytes(b[20..24].try_into().unwrap());
    let l2 = (be64(&b, be64(&b, 40) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    let e = be64(&b, l2 + 8 * n);
    assert_ne!(e & (1 << 62), 0, "cluster {n} is not compressed");
    let host = (e & ((1u64 << (62 - (cb - 8))) - 1)) as usize;
    b[host + 8..host + 72].fill(0xff);
    std::fs::write(img, b).unwrap();
}

/// The offsets of `stderr`'s "error while reading offset N" warnings.
fn warned_offsets(stderr: &[u8]) -> Vec<u64> {
    let mut v: Vec<u64> = String::from_utf8_lossy(stderr)
        .lines()
        .map(|l| {
            let rest = l
                .split_once("warning: error while reading offset ")
                .unwrap_or_else(|| panic!("not a salvage warning: {l}"))
                .1;
            rest.split(':').next().unwrap().parse().unwrap()
        })
        .collect();
    v.sort_unstable();
    v
}

/// A compressed cluster that does not inflate: without --salvage both
/// tools fail; with it, both warn for the same 128 sectors and write the
/// same output, the cluster zeroed; -q silences the warnings; a qcow2
/// target is clean and holds the same content.
#[test]
fn salvage_zeroes_a_cluster_that_cannot_be_read() {
    let d = tempdir();
    let src = d.path().join("src.raw");
    let data = data();
    std::fs::write(&src, &data).unwrap();
    let img = d.path().join("c.qcow2");
    let (s, i) = (src.to_str().unwrap(), img.to_str().unwrap());
    assert!(qemu_img(&["convert", "-c", "-O", "qcow2", s, i])
        .status
        .success());
    garble_compressed_cluster(&img, 3);

    let plain = d.path().join("plain.raw");
    let p = plain.to_str().unwrap();
    assert_eq!(rimg(&["convert", "-O", "raw", i, p]).status.code(), Some(1));
    assert_eq!(
        qemu_img(&["convert", "-O", "raw", i, p]).status.code(),
        Some(1)
    );

    let (q, r) = (d.path().join("q.raw"), d.path().join("r.raw"));
    let qo = qemu_img(&["convert", "--salvage", "-O", "raw", i, q.to_str().unwrap()]);
    let ro = rimg(&["convert", "--salvage", "-O", "raw", i, r.to_str().unwrap()]);
    assert!(qo.status.success(), "{qo:?}");
    assert!(ro.status.success(), "{ro:?}");
    let want: Vec<u64> = (3 << 16..4 << 16).step_by(512).collect();
    assert_eq!(warned_offsets(&qo.stderr), want);
    assert_eq!(warned_offsets(&ro.stderr), want);
    let out = std::fs::read(&r).unwrap();
    assert_eq!(out, std::fs::read(&q).unwrap());
    let mut expect = data.clone();
    expect[3 << 16..4 << 16].fill(0);
    assert!(out == expect, "only the bad cluster reads as zeros");

    let quiet = rimg(&[
        "convert",
        "-q",
        "--salvage",
        "-O",
        "raw",
        i,
        r.to_str().unwrap(),
    ]);
    assert!(
        quiet.status.success() && quiet.stderr.is_empty(),
        "{quiet:?}"
    );

    let t = d.path().join("r.qcow2");
    let ro = rimg(&[
        "convert",
        "--salvage",
        "-O",
        "qcow2",
        i,
        t.to_str().unwrap(),
    ]);
    assert!(ro.status.success(), "{ro:?}");
    assert_qemu_check_clean(&t);
    assert_qemu_compare_equal(&q, &t);
}

/// blkdebug read errors on a raw source, as qemu-iotests 251 injects them:
/// without --salvage the first rule given that matches fails the read
/// (EIO here, ENOSPC with the rules swapped); with it, the same warnings
/// as qemu-img's, byte for byte, and those sectors zeroed. -C refuses
/// what qemu-img's -C refuses.
#[test]
fn salvage_and_blkdebug_errors_match_qemu_img() {
    let d = tempdir();
    let data = data();
    std::fs::write(d.path().join("src.raw"), &data).unwrap();
    let rule = |errno: u32, sector: u64| {
        format!(r#"{{"event":"none","iotype":"read","errno":{errno},"sector":{sector}}}"#)
    };
    let json = |rules: &[String]| {
        format!(
            r#"json:{{"driver":"raw","file":{{"driver":"blkdebug","inject-error":[{}],"image":{{"driver":"file","filename":"src.raw"}}}}}}"#,
            rules.join(",")
        )
    };
    let eio_first = json(&[rule(5, 1000), rule(28, 1500)]);
    let enospc_first = json(&[rule(28, 1500), rule(5, 1000)]);

    let (code, _, err) = same_as_qemu(d.path(), &["convert", "-O", "raw", &eio_first, "o.raw"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("error while reading at byte 0: Input/output error"),
        "{err}"
    );
    let (_, _, err) = same_as_qemu(d.path(), &["convert", "-O", "raw", &enospc_first, "o.raw"]);
    assert!(err.contains("No space left on device"), "{err}");

    let (code, _, err) = same_as_qemu(
        d.path(),
        &["convert", "--salvage", "-O", "raw", &eio_first, "o.raw"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        err,
        "qemu-img: warning: error while reading offset 512000: Input/output error\n\
         qemu-img: warning: error while reading offset 768000: No space left on device\n"
    );
    let mut expect = data;
    expect[512000..512512].fill(0);
    expect[768000..768512].fill(0);
    assert!(std::fs::read(d.path().join("o.raw")).unwrap() == expect);

    for extra in [&["-C", "--salvage"][..], &["-C", "-c"], &["-C", "-S", "0"]] {
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["src.raw", "c.qcow2"]);
        let (code, _, err) = same_as_qemu(d.path(), &args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains("copy offloading"), "{args:?}: {err}");
    }
}

/// `--target-image-opts`: an existing target (-n) named by an option
/// string, in the format the string gives; refused without -n or with
/// -O, in qemu-img's words. The target is written as with a plain name.
#[test]
fn target_image_opts_name_an_existing_target() {
    let d = tempdir();
    std::fs::write(d.path().join("src.raw"), data()).unwrap();
    let opts = "driver=qcow2,file.filename=t.qcow2";
    let create = || {
        let o = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            d.path().join("t.qcow2").to_str().unwrap(),
            "1M",
        ]);
        assert!(o.status.success(), "{o:?}");
    };
    create();
    for refused in [
        &["convert", "--target-image-opts", "src.raw", opts][..],
        &[
            "convert",
            "-n",
            "-O",
            "qcow2",
            "--target-image-opts",
            "src.raw",
            opts,
        ],
    ] {
        let (code, _, err) = same_as_qemu(d.path(), refused);
        assert_eq!(code, Some(1), "{refused:?}: {err}");
    }
    let (code, _, err) = same_as_qemu(
        d.path(),
        &["convert", "-n", "--target-image-opts", "src.raw", opts],
    );
    assert_eq!(code, Some(0), "{err}");
    create();
    let r = rimg_tests::rimg_in(
        d.path(),
        &["convert", "-n", "--target-image-opts", "src.raw", opts],
    );
    assert_eq!(r.0, Some(0), "{r:?}");
    let t = d.path().join("t.qcow2");
    assert_qemu_check_clean(&t);
    assert_qemu_compare_equal(&d.path().join("src.raw"), &t);
}

/// What the option strings and values say is checked as qemu-img checks
/// it: a read-only or force-share node is not written, `driver=file` is
/// the file's bytes (not probed), -S takes whole sectors up to 16 MiB
/// (checked before -C's refusals), -m 1 to 16, and a flag given twice
/// is taken.
#[test]
fn option_values_are_checked_like_qemu_img() {
    let d = tempdir();
    std::fs::write(d.path().join("src.raw"), data()).unwrap();
    let t = d.path().join("t.qcow2");
    let o = qemu_img(&["create", "-q", "-f", "qcow2", t.to_str().unwrap(), "2M"]);
    assert!(o.status.success(), "{o:?}");
    for opts in [
        "driver=qcow2,read-only=on,file.filename=t.qcow2",
        "driver=qcow2,file.read-only=on,file.filename=t.qcow2",
        "driver=qcow2,force-share=on,file.filename=t.qcow2",
        // The qcow2 file's own bytes, shorter than the source.
        "driver=file,filename=t.qcow2",
    ] {
        let args = ["convert", "-n", "--target-image-opts", "src.raw", opts];
        let q = rimg_tests::run_in("qemu-img", d.path(), &args);
        let r = rimg_tests::rimg_in(d.path(), &args);
        assert_eq!((q.status.code(), r.0), (Some(1), Some(1)), "{opts}: {r:?}");
    }
    for args in [
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "src.raw",
            "driver=qcow2,read-only=on,file.filename=t.qcow2",
        ][..],
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "src.raw",
            "driver=qcow2,force-share=on,file.filename=t.qcow2",
        ],
        &["convert", "-S", "100", "src.raw", "o.raw"],
        &["convert", "-S", "32M", "src.raw", "o.raw"],
        &["convert", "-C", "-S", "foo", "src.raw", "o.raw"],
        // -m: qemu-img's 1 to 16 coroutines, as cvtnum reads numbers.
        &["convert", "-m", "0", "src.raw", "o.raw"],
        &["convert", "-m", "17", "src.raw", "o.raw"],
        &["convert", "-m", "-1", "src.raw", "o.raw"],
        &["convert", "-m", "x", "src.raw", "o.raw"],
    ] {
        let (code, _, err) = same_as_qemu(d.path(), args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
    }
    // The image is untouched: still qcow2, still empty.
    assert_qemu_check_clean(&t);
    let (code, _, err) = same_as_qemu(
        d.path(),
        &[
            "convert",
            "--salvage",
            "--salvage",
            "-q",
            "-q",
            "-m",
            "0x10",
            "-O",
            "raw",
            "src.raw",
            "o.raw",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(std::fs::read(d.path().join("o.raw")).unwrap() == data());
}
