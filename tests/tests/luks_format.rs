//! The plain `luks` image format (QEMU's luks driver), QEMU as the
//! judge: volumes qemu-img creates and qemu-io writes are read and
//! written by rimg (library and CLI) and read back by qemu-io and
//! `qemu-img compare`; volumes rimg creates (`create -f luks`, `convert
//! -O luks`) are read by QEMU. info, map, measure and check print what
//! qemu-img prints; wrong passwords and hostile headers are errors,
//! quickly, never panics.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use qcow2::{Format, Image, OpenOptions};
use rimg_tests::{run, tempdir, workspace_bin};

const PW: &str = "123456";
const SECRET: &str = "secret,id=sec0,data=123456";

/// Cipher choices qemu-img offers (fast PBKDF2 for the tests).
const CIPHERS: &[&str] = &[
    "key-secret=sec0,iter-time=10",
    "key-secret=sec0,iter-time=10,cipher-alg=aes-128,ivgen-alg=essiv",
    "key-secret=sec0,iter-time=10,cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,\
     ivgen-hash-alg=sha256,hash-alg=sha1",
    // (Not aes-192: qemu-img 10.0 aborts on its key material, 24 * 4000
    // bytes not being whole sectors.)
    "key-secret=sec0,iter-time=10,cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain,\
     hash-alg=sha512",
];

fn out(cmd: &str, args: &[&str]) -> std::process::Output {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn ok(cmd: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&out(cmd, args).stdout).into_owned()
}

fn rimg_bin() -> String {
    workspace_bin("rimg").to_str().unwrap().to_string()
}

fn rimg(args: &[&str]) -> String {
    ok(&rimg_bin(), args)
}

/// `--image-opts` for a luks volume with the test key.
fn spec(img: &Path) -> String {
    format!(
        "driver=luks,file.filename={},key-secret=sec0",
        img.display()
    )
}

/// qemu-io with the key; panics unless every command succeeded.
fn qio(img: &Path, cmds: &[&str]) {
    let s = spec(img);
    let mut args = vec!["--object", SECRET, "--image-opts", &s];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let o = ok("qemu-io", &args);
    assert!(
        !o.contains("Pattern verification failed") && !o.contains("failed:"),
        "{o}"
    );
}

fn qemu_create(img: &Path, opts: &str, size: &str) {
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            SECRET,
            "-o",
            opts,
            img.to_str().unwrap(),
            size,
        ],
    );
}

fn open_rimg(img: &Path, pw: &str, writable: bool) -> qcow2::Result<std::sync::Arc<dyn Image>> {
    rimg_tests::image::open_with_key(img, pw, writable)
}

/// `qemu-img compare` of a raw file and a luks volume; asserts equality.
fn qemu_compare(raw: &Path, luks: &Path) {
    let r = format!("driver=raw,file.filename={}", raw.display());
    let o = ok(
        "qemu-img",
        &[
            "compare",
            "--object",
            SECRET,
            "--image-opts",
            &r,
            &spec(luks),
        ],
    );
    assert!(o.contains("Images are identical"), "{o}");
}

#[test]
fn qemu_made_volumes_are_read_and_written_by_rimg() {
    let d = tempdir();
    for (i, opts) in CIPHERS.iter().enumerate() {
        let img = d.path().join(format!("q{i}.luks"));
        qemu_create(&img, opts, "4M");
        qio(
            &img,
            &[
                "write -z 0 4M",
                "write -P 0x5a 0 64k",
                "write -P 0x11 100k 3000",
            ],
        );
        let q = open_rimg(&img, PW, true).unwrap();
        assert_eq!(q.format(), Format::Luks, "{opts}");
        assert_eq!(q.size(), 4 << 20);
        let mut b = vec![0u8; 65536];
        q.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0x5a), "{opts}");
        let mut b = vec![0u8; 3000];
        q.read_at(&mut b, 100 << 10).unwrap();
        assert!(b.iter().all(|&x| x == 0x11), "{opts}");
        // Unaligned writes (read-modify-write), zeroes, a no-op discard.
        q.write_at(&[0x77; 1000], 70_001).unwrap();
        q.write_at(&[0x66; 512], 512).unwrap();
        q.write_zeroes(200_000, 5000, true).unwrap();
        q.discard(1 << 20, 4096).unwrap();
        let e = q.block_status(0, 4 << 20).unwrap();
        assert_eq!(
            (e.len, e.kind, e.offset),
            (4 << 20, qcow2::ExtentKind::Data, None)
        );
        q.flush().unwrap();
        drop(q);
        qio(
            &img,
            &[
                "read -P 0x5a 0 512",
                "read -P 0x66 512 512",
                "read -P 0x5a 1024 64512",
                "read -P 0 65536 4465",
                "read -P 0x77 70001 1000",
                "read -P 0x11 100k 3000",
                "read -P 0 200000 5000",
            ],
        );
        // rimg's raw conversion is QEMU's, byte for byte.
        let ours = d.path().join(format!("ours{i}.raw"));
        let theirs = d.path().join(format!("theirs{i}.raw"));
        let s = spec(&img);
        for (tool, o) in [(rimg_bin(), &ours), ("qemu-img".to_string(), &theirs)] {
            ok(
                &tool,
                &[
                    "convert",
                    "-O",
                    "raw",
                    "--object",
                    SECRET,
                    "--image-opts",
                    &s,
                    o.to_str().unwrap(),
                ],
            );
        }
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
            "{opts}"
        );
        qemu_compare(&ours, &img);
    }
}

#[test]
fn rimg_made_volumes_are_read_and_written_by_qemu() {
    let d = tempdir();
    let src = d.path().join("src.raw");
    let mut data = vec![0u8; 3 << 20];
    for (i, b) in data.iter_mut().enumerate().skip(4096).take(1 << 20) {
        *b = (i % 251) as u8;
    }
    std::fs::write(&src, &data).unwrap();
    for (i, opts) in CIPHERS.iter().enumerate() {
        // create -f luks: QEMU writes and reads it.
        let img = d.path().join(format!("c{i}.luks"));
        let o = rimg(&[
            "create",
            "-f",
            "luks",
            "--object",
            SECRET,
            "-o",
            opts,
            img.to_str().unwrap(),
            "2M",
        ]);
        let q = ok(
            "qemu-img",
            &[
                "create",
                "-f",
                "luks",
                "--object",
                SECRET,
                "-o",
                opts,
                d.path().join("echo.luks").to_str().unwrap(),
                "2M",
            ],
        );
        assert_eq!(o, q.replace("echo.luks", &format!("c{i}.luks")));
        qio(&img, &["write -P 0x33 1000 10000", "write -z 1M 1M"]);
        qio(&img, &["read -P 0x33 1000 10000", "read -P 0 1M 1M"]);
        let r = open_rimg(&img, PW, false).unwrap();
        let mut b = vec![0u8; 10000];
        r.read_at(&mut b, 1000).unwrap();
        assert!(b.iter().all(|&x| x == 0x33), "{opts}");

        // convert -O luks: every byte written, QEMU reads the same disk.
        let conv = d.path().join(format!("v{i}.luks"));
        rimg(&[
            "convert",
            "-O",
            "luks",
            "--object",
            SECRET,
            "-o",
            opts,
            src.to_str().unwrap(),
            conv.to_str().unwrap(),
        ]);
        qemu_compare(&src, &conv);
        // And back: luks to raw through rimg equals the source.
        let back = d.path().join(format!("b{i}.raw"));
        let s = spec(&conv);
        rimg(&[
            "convert",
            "-O",
            "raw",
            "--object",
            SECRET,
            "--image-opts",
            &s,
            back.to_str().unwrap(),
        ]);
        assert_eq!(std::fs::read(&back).unwrap(), data, "{opts}");
        // rimg compare agrees.
        let o = rimg(&[
            "compare",
            "--object",
            SECRET,
            "--image-opts",
            &format!("driver=raw,file.filename={}", src.display()),
            &s,
        ]);
        assert!(o.contains("Images are identical"), "{o}");
    }
}

/// info (human and JSON), map and measure print what qemu-img prints,
/// for volumes of either tool.
#[test]
fn info_map_and_measure_match_qemu() {
    let d = tempdir();
    for (i, opts) in CIPHERS.iter().enumerate() {
        let theirs = d.path().join(format!("t{i}.luks"));
        let ours = d.path().join(format!("o{i}.luks"));
        qemu_create(&theirs, opts, "1M");
        rimg(&[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            SECRET,
            "-o",
            opts,
            ours.to_str().unwrap(),
            "1M",
        ]);
        for img in [&theirs, &ours] {
            let name = img.to_str().unwrap();
            for args in [
                vec!["info", name],
                vec!["info", "--output=json", name],
                vec!["info", "-f", "luks", name],
            ] {
                assert_eq!(rimg(&args), ok("qemu-img", &args), "{args:?}");
            }
            let s = spec(img);
            for args in [
                vec![
                    "map",
                    "--output=json",
                    "--object",
                    SECRET,
                    "--image-opts",
                    &s,
                ],
                vec![
                    "measure",
                    "-O",
                    "luks",
                    "--object",
                    SECRET,
                    "-o",
                    opts,
                    "--image-opts",
                    &s,
                ],
                vec![
                    "measure",
                    "-O",
                    "luks",
                    "--object",
                    SECRET,
                    "-o",
                    opts,
                    "--size",
                    "1000",
                    "--output=json",
                ],
                vec![
                    "measure",
                    "-O",
                    "qcow2",
                    "--object",
                    SECRET,
                    "--image-opts",
                    &s,
                ],
            ] {
                assert_eq!(rimg(&args), ok("qemu-img", &args), "{args:?}");
            }
        }
    }
}

/// check: not supported for the format, with qemu-img's exit code;
/// resize grows and shrinks the payload as QEMU does.
#[test]
fn check_and_resize_as_qemu() {
    let d = tempdir();
    let img = d.path().join("r.luks");
    qemu_create(&img, CIPHERS[0], "1M");
    let s = spec(&img);
    for tool in [rimg_bin(), "qemu-img".to_string()] {
        let o = run(&tool, &["check", "--object", SECRET, "--image-opts", &s]);
        assert_eq!(o.status.code(), Some(63), "{tool}");
        assert!(String::from_utf8_lossy(&o.stderr)
            .contains("This image format does not support checks"));
    }
    qio(&img, &["write -P 0x42 0 1M"]);
    rimg(&["resize", "--object", SECRET, "--image-opts", &s, "3M"]);
    qio(&img, &["read -P 0x42 0 1M", "write -P 0x43 2M 1M"]);
    let o = run(
        &rimg_bin(),
        &["resize", "--object", SECRET, "--image-opts", &s, "2M"],
    );
    assert!(!o.status.success());
    rimg(&[
        "resize",
        "--shrink",
        "--object",
        SECRET,
        "--image-opts",
        &s,
        "2M",
    ]);
    let info = ok(
        "qemu-img",
        &["info", "--output=json", img.to_str().unwrap()],
    );
    assert!(info.contains("\"virtual-size\": 2097152"), "{info}");
    qio(&img, &["read -P 0x42 0 1M"]);
}

/// Wrong and missing passwords: QEMU's messages, from the library and the
/// CLI; no panic.
#[test]
fn wrong_and_missing_passwords_are_errors() {
    let d = tempdir();
    let img = d.path().join("w.luks");
    qemu_create(&img, CIPHERS[0], "1M");
    let e = open_rimg(&img, "nope", false).unwrap_err();
    assert_eq!(e.to_string(), "Invalid password, cannot unlock any keyslot");
    let e = qcow2::open(&img, &OpenOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Parameter 'key-secret' is required for cipher"
    );
    let dst = d.path().join("x.raw");
    let name = img.to_str().unwrap();
    let bad = format!("driver=luks,file.filename={name},key-secret=sec0");
    for args in [
        vec![
            "convert",
            "-O",
            "raw",
            "--object",
            "secret,id=sec0,data=wrong",
            "--image-opts",
            &bad,
            dst.to_str().unwrap(),
        ],
        vec!["convert", "-O", "raw", name, dst.to_str().unwrap()],
        vec![
            "convert",
            "-O",
            "luks",
            name,
            d.path().join("y.luks").to_str().unwrap(),
        ],
    ] {
        let ours = run(&rimg_bin(), &args);
        let theirs = run("qemu-img", &args);
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&ours.stderr).replacen("rimg:", "", 1),
            String::from_utf8_lossy(&theirs.stderr).replacen("qemu-img:", "", 1),
            "{args:?}"
        );
    }
}

/// Truncated and hostile headers: clear errors, in well under the time a
/// hostile PBKDF2 count would take.
#[test]
fn hostile_headers_are_refused_quickly() {
    let d = tempdir();
    let img = d.path().join("h.luks");
    qemu_create(&img, CIPHERS[0], "64k");
    let orig = std::fs::read(&img).unwrap();
    // (offset in the LUKS header, value): slot 0 iterations, slot 0
    // stripes, key_bytes, payload offset (past the end, inside the
    // header), master key iterations.
    for (at, v) in [
        (208 + 4, u32::MAX),
        (208 + 44, 1 << 30),
        (108, 1 << 30),
        (104, u32::MAX),
        (104, 1),
        (164, u32::MAX),
    ] {
        std::fs::write(&img, &orig).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&v.to_be_bytes(), at).unwrap();
        let t = Instant::now();
        assert!(open_rimg(&img, PW, false).is_err(), "patch at {at}");
        let o = run(&rimg_bin(), &["info", img.to_str().unwrap()]);
        // info needs no key, so only header checks refuse it.
        if at != 208 + 4 && at != 164 {
            assert!(!o.status.success(), "info accepted patch at {at}");
        }
        assert!(t.elapsed() < Duration::from_secs(20), "patch at {at}");
    }
    // Truncated: inside the header, and before the payload's start.
    for len in [300u64, 100_000] {
        std::fs::write(&img, &orig[..len as usize]).unwrap();
        let e = open_rimg(&img, PW, false).unwrap_err().to_string();
        assert!(!e.is_empty());
        let args = ["info", "-f", "luks", img.to_str().unwrap()];
        let ours = run(&rimg_bin(), &args);
        let theirs = run("qemu-img", &args);
        assert!(!ours.status.success() && !theirs.status.success(), "{len}");
        if len == 100_000 {
            assert_eq!(
                String::from_utf8_lossy(&ours.stderr).replacen("rimg:", "", 1),
                String::from_utf8_lossy(&theirs.stderr).replacen("qemu-img:", "", 1),
            );
        }
    }
}

/// amend manages key slots as qemu-img amend does for the format: a new
/// password, the old one erased; QEMU opens with exactly the passwords
/// left, and refusals read as qemu-img's.
#[test]
fn key_slots_are_amended_as_qemu_amends_them() {
    let d = tempdir();
    let img = d.path().join("a.luks");
    qemu_create(&img, CIPHERS[0], "1M");
    qio(&img, &["write -P 0x21 0 64k"]);
    let s = spec(&img);
    let other = "secret,id=sec1,data=abcdef";
    let amend = |opts: &str| {
        run(
            &rimg_bin(),
            &[
                "amend",
                "--object",
                SECRET,
                "--object",
                other,
                "--image-opts",
                &s,
                "-o",
                opts,
            ],
        )
    };
    let o = amend("state=active,new-secret=sec1,iter-time=10");
    assert!(o.status.success(), "{o:?}");
    let o = amend("state=inactive,old-secret=sec0");
    assert!(o.status.success(), "{o:?}");
    let with1 = format!(
        "driver=luks,file.filename={},key-secret=sec1",
        img.display()
    );
    let r = ok(
        "qemu-io",
        &[
            "--object",
            other,
            "--image-opts",
            &with1,
            "-c",
            "read -P 0x21 0 64k",
        ],
    );
    assert!(!r.contains("verification failed"), "{r}");
    let o = run(
        "qemu-io",
        &["--object", SECRET, "--image-opts", &s, "-c", "read 0 512"],
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("Invalid password"));
    // Refusals: no state; a qcow2 option; erasing the last slot.
    for opts in ["iter-time=10", "compat=v3", "state=inactive,keyslot=1"] {
        let args = [
            "amend",
            "--object",
            SECRET,
            "--object",
            other,
            "--image-opts",
            &with1,
            "-o",
            opts,
        ];
        let ours = run(&rimg_bin(), &args);
        let theirs = run("qemu-img", &args);
        assert!(!ours.status.success() && !theirs.status.success(), "{opts}");
        assert_eq!(
            String::from_utf8_lossy(&ours.stderr).replacen("rimg:", "", 1),
            String::from_utf8_lossy(&theirs.stderr).replacen("qemu-img:", "", 1),
            "{opts}"
        );
    }
}

/// A passphrase must be UTF-8, as QEMU takes every LUKS key: a secret
/// that is not is refused with QEMU's words, when creating (luks and
/// qcow2 with LUKS) and when opening, and no image is written.
#[test]
fn secrets_that_are_not_utf8_are_refused_as_qemu_refuses_them() {
    let dir = tempdir();
    let key = dir.path().join("key");
    std::fs::write(&key, b":<;\xff").unwrap();
    let secret = format!("secret,id=sec0,file={}", key.display());
    for (fmt, opt) in [
        ("luks", "key-secret=sec0"),
        ("qcow2", "encrypt.format=luks,encrypt.key-secret=sec0"),
    ] {
        let mut seen = Vec::new();
        for tool in ["qemu-img".to_string(), rimg_bin()] {
            let img = dir.path().join(format!("v.{fmt}"));
            let _ = std::fs::remove_file(&img);
            let o = run(
                &tool,
                &[
                    "create",
                    "-q",
                    "-f",
                    fmt,
                    "--object",
                    &secret,
                    "-o",
                    opt,
                    img.to_str().unwrap(),
                    "4M",
                ],
            );
            assert!(!o.status.success(), "{tool} {fmt}: created");
            assert!(!img.exists(), "{tool} {fmt}: left an image");
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            assert!(
                err.contains("Data from secret sec0 is not valid UTF-8"),
                "{tool} {fmt}: {err}"
            );
            seen.push(o.status.code());
        }
        assert_eq!(seen[0], seen[1], "{fmt}: exit codes");
    }
    // Opening a volume with such a secret.
    let img = dir.path().join("ok.luks");
    qemu_create(&img, "key-secret=sec0,iter-time=10", "4M");
    let spec = format!(
        "driver=luks,file.filename={},key-secret=sec0",
        img.display()
    );
    let o = run(
        &rimg_bin(),
        &["compare", "--object", &secret, "--image-opts", &spec, &spec],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Data from secret sec0 is not valid UTF-8"),
        "{err}"
    );
}
