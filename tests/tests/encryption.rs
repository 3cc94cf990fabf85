//! Encrypted qcow2 (LUKS and legacy AES) and LUKS images: rimg creates,
//! QEMU reads and writes them (qemu-io with the key), and the reverse
//! (QEMU creates and writes, the rimg engine reads and writes);
//! `qemu-img check` with the key judges every image. Wrong passwords and
//! hostile LUKS headers give errors, never panics or hours of PBKDF2.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use qcow2::{Image, OpenOptions, Qcow2Options};
use rimg_tests::{ok_as, rimg as rimg_output, run, run_ok as ok, tempdir, OutputText};

const PW: &str = "123456";
const SECRET: &str = "secret,id=sec0,data=123456";
/// LUKS with key `sec0`, quick to unlock.
const LUKS: &str = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";

/// `create` arguments for the encrypted qcow2 image `img` (`opts` holds
/// the key's name; `secret` defines it).
fn create_args<'a>(secret: &'a str, opts: &'a str, img: &'a str, size: &'a str) -> Vec<&'a str> {
    vec![
        "create", "-q", "--object", secret, "-f", "qcow2", "-o", opts, img, size,
    ]
}

/// `convert` arguments from the raw image `src` to the qcow2 `dst`
/// encrypted with key `sec0` and `opts`.
fn convert_args<'a>(opts: &'a str, src: &'a Path, dst: &'a Path) -> Vec<&'a str> {
    vec![
        "convert",
        "--object",
        SECRET,
        "-O",
        "qcow2",
        "-o",
        opts,
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]
}

fn spec(img: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        img.display()
    )
}

/// qemu-io with the key; panics unless every command succeeded.
fn qio(img: &Path, cmds: &[&str]) -> String {
    let s = spec(img);
    let mut args = vec!["--object", SECRET, "--image-opts", &s];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let out = ok("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "{out}"
    );
    out
}

fn qcheck(img: &Path) {
    let s = spec(img);
    ok(
        "qemu-img",
        &["check", "--object", SECRET, "--image-opts", &s],
    );
}

/// Runs rimg, asserts it succeeded; returns its stdout.
fn rimg(args: &[&str]) -> String {
    ok_as(rimg_output(args), &format!("rimg {args:?}")).stdout_text()
}

fn open_rimg(img: &Path, pw: &str, writable: bool) -> qcow2::Result<std::sync::Arc<dyn Image>> {
    rimg_tests::image::open_with_key(img, pw, writable)
}

fn create_rimg(img: &Path, opts: &str) {
    rimg(&create_args(SECRET, opts, img.to_str().unwrap(), "4M"));
}

#[test]
fn rimg_creates_luks_and_aes_images_qemu_reads_and_writes() {
    let dir = tempdir();
    for (name, opts) in [
        ("luks.qcow2", LUKS),
        (
            "essiv.qcow2",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,\
             encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,\
             encrypt.hash-alg=sha1,cluster_size=4k",
        ),
        ("aes.qcow2", "encryption=on,encrypt.key-secret=sec0"),
    ] {
        let img = dir.path().join(name);
        create_rimg(&img, opts);
        qcheck(&img);
        qio(
            &img,
            &[
                "read -P 0 0 4M",
                "write -P 0x5a 0 64k",
                "write -P 0x11 100k 3000",
            ],
        );
        qio(&img, &["read -P 0x5a 0 64k", "read -P 0x11 100k 3000"]);
        // rimg reads what QEMU wrote, writes unaligned data QEMU reads.
        let q = open_rimg(&img, PW, true).unwrap();
        let mut b = vec![0u8; 65536];
        q.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0x5a), "{name}");
        q.write_at(&[0x77; 1000], 70_001).unwrap();
        q.write_at(&[0x66; 512], 512).unwrap();
        // No host offset for encrypted data (as QEMU: map cannot show it).
        assert_eq!(q.block_status(0, 512).unwrap().offset, None);
        q.flush().unwrap();
        drop(q);
        qio(
            &img,
            &[
                "read -P 0x77 70001 1000",
                "read -P 0x66 512 512",
                "read -P 0x5a 1024 63k",
            ],
        );
        qcheck(&img);
        // info as qemu-img's (minus the sizes that depend on the host).
        let a = rimg(&["info", "--output=json", img.to_str().unwrap()]);
        let b = ok(
            "qemu-img",
            &["info", "--output=json", img.to_str().unwrap()],
        );
        let strip = |s: &str| {
            let mut v: serde_json::Value = serde_json::from_str(s).unwrap();
            v.as_object_mut().unwrap().remove("actual-size");
            v.as_object_mut().unwrap().remove("children");
            v
        };
        assert_eq!(strip(&a), strip(&b), "{name}");
    }
}

#[test]
fn qemu_created_image_decrypts_and_converts_with_rimg() {
    let dir = tempdir();
    let img = dir.path().join("q.qcow2");
    let i = img.to_str().unwrap();
    ok("qemu-img", &create_args(SECRET, LUKS, i, "4M"));
    qio(&img, &["write -P 0x42 4096 8192"]);
    let q = open_rimg(&img, PW, false).unwrap();
    let mut all = vec![0u8; 4 << 20];
    q.read_at(&mut all, 0).unwrap();
    drop(q);
    let raw = dir.path().join("want.raw");
    std::fs::write(&raw, &all).unwrap();
    assert!(all[4096..12288].iter().all(|&x| x == 0x42));
    assert!(all[..4096].iter().all(|&x| x == 0));
    // rimg convert encrypts a raw image; QEMU finds the same content.
    let out = dir.path().join("conv.qcow2");
    rimg(&convert_args(LUKS, &raw, &out));
    let r = format!("driver=raw,file.filename={}", raw.display());
    let judge = |out: &Path| {
        qcheck(out);
        let info = ok(
            "qemu-img",
            &["info", "--output=json", out.to_str().unwrap()],
        );
        assert!(info.contains("\"encrypted\": true"), "{info}");
        let s = spec(out);
        ok(
            "qemu-img",
            &["compare", "--object", SECRET, "--image-opts", &s, &r],
        );
    };
    judge(&out);
    // Preallocated clusters of an encrypted image read as noise: convert
    // must write the zeros (188).
    let pre = dir.path().join("pre.qcow2");
    rimg(&convert_args(
        &format!("{LUKS},preallocation=metadata"),
        &raw,
        &pre,
    ));
    judge(&pre);
    let compressed = dir.path().join("c.qcow2");
    let mut args = convert_args(
        "encrypt.format=luks,encrypt.key-secret=sec0",
        &raw,
        &compressed,
    );
    args.insert(1, "-c");
    let o = rimg_output(&args);
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("Compression and encryption not supported at the same time"));
}

#[test]
fn wrong_password_and_missing_key_are_errors() {
    let dir = tempdir();
    let img = dir.path().join("w.qcow2");
    create_rimg(&img, LUKS);
    let e = open_rimg(&img, "nope", false).unwrap_err().to_string();
    assert_eq!(e, "Invalid password, cannot unlock any keyslot");
    let e = qcow2::open(&img, &OpenOptions::default())
        .unwrap_err()
        .to_string();
    assert_eq!(e, "Parameter 'encrypt.key-secret' is required for cipher");
    // Without the key: info only; no data path.
    let o = rimg_output(&["check", img.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("key-secret"));
}

#[test]
fn hostile_luks_headers_are_refused_quickly() {
    let dir = tempdir();
    let img = dir.path().join("h.qcow2");
    create_rimg(&img, LUKS);
    let q = qcow2::open(
        &img,
        &OpenOptions {
            qcow2: Qcow2Options {
                no_io: true,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let (area, _) = q.as_qcow2().unwrap().header().crypto_area().unwrap();
    drop(q);
    let orig = std::fs::read(&img).unwrap();
    // (offset in the LUKS header, value): slot 0 iterations, slot 0
    // stripes, key_bytes, payload offset, master key iterations.
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
        f.write_all_at(&v.to_be_bytes(), area + at).unwrap();
        let t = Instant::now();
        let r = open_rimg(&img, PW, false);
        assert!(r.is_err(), "patch at {at} accepted");
        assert!(t.elapsed() < Duration::from_secs(20), "patch at {at}");
    }
}

/// 293's key slot management through the engine: add a password, erase
/// the first by its password, refuse to erase the last; QEMU opens the
/// image with exactly the passwords left.
#[test]
fn luks_key_slots_are_amended_as_qemu_amends_them() {
    use qcow2::luks_amend::{amend_luks, LuksAmend};
    let dir = tempdir();
    let img = dir.path().join("k.qcow2");
    create_rimg(&img, LUKS);
    let amend = |pw: &str, a: LuksAmend| {
        let i = open_rimg(&img, pw, true).unwrap();
        let r = amend_luks(
            i.as_qcow2().unwrap(),
            &LuksAmend {
                secret: Some(pw.as_bytes().to_vec()),
                ..a
            },
        );
        r.map_err(|e| e.to_string())
    };
    amend(
        PW,
        LuksAmend {
            active: true,
            keyslot: Some(4),
            new_secret: Some(b"other".to_vec()),
            iter_time_ms: Some(10),
            ..Default::default()
        },
    )
    .unwrap();
    let e = amend(
        PW,
        LuksAmend {
            active: true,
            keyslot: Some(4),
            new_secret: Some(b"x".to_vec()),
            iter_time_ms: Some(10),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(
        e,
        "Refusing to overwrite active keyslot 4 - please erase it first"
    );
    // Erase slot 0 by its password; the other password still opens.
    amend(
        "other",
        LuksAmend {
            old_secret: Some(PW.as_bytes().to_vec()),
            ..Default::default()
        },
    )
    .unwrap();
    let o = run(
        "qemu-io",
        &[
            "--object",
            SECRET,
            "--image-opts",
            &spec(&img),
            "-c",
            "read 0 512",
        ],
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Invalid password")
            || String::from_utf8_lossy(&o.stderr).contains("Invalid password")
    );
    let other = "secret,id=sec0,data=other";
    ok(
        "qemu-io",
        &[
            "--object",
            other,
            "--image-opts",
            &spec(&img),
            "-c",
            "read -P 0 0 512",
        ],
    );
    ok(
        "qemu-img",
        &["check", "--object", other, "--image-opts", &spec(&img)],
    );
    let e = amend(
        "other",
        LuksAmend {
            keyslot: Some(4),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        e.starts_with("Attempt to erase the only active keyslot 4"),
        "{e}"
    );
}

/// measure counts the LUKS header area as qemu-img does.
#[test]
fn measure_counts_the_luks_header() {
    for o in [
        "encrypt.format=luks,encrypt.key-secret=sec0",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128,cluster_size=4k",
        "encryption=on,encrypt.key-secret=sec0",
    ] {
        let args = [
            "measure", "-O", "qcow2", "--object", SECRET, "-o", o, "--size", "16M",
        ];
        assert_eq!(rimg(&args), ok("qemu-img", &args), "{o}");
    }
}

/// iotest 198's steps: an encrypted image over an encrypted base with
/// other passwords, committed with the chain's keys given as options
/// (`backing.encrypt.key-secret`); info names such a specification as
/// qemu-img does (`json:{...}`), with or without the secrets defined.
#[test]
fn commit_through_an_encrypted_chain_with_image_opts() {
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    let (s0, s1) = ("secret,id=sec0,data=123456", "secret,id=sec1,data=654321");
    let b = base.to_str().unwrap();
    let t = top.to_str().unwrap();
    let luks = "encrypt.format=luks,encrypt.iter-time=10";
    let base_opts = format!("{luks},encrypt.key-secret=sec0");
    ok("qemu-img", &create_args(s0, &base_opts, b, "4M"));
    let top_opts = format!("{luks},encrypt.key-secret=sec1");
    let args = ["-o", &top_opts, "-b", b, "-F", "qcow2", t];
    ok(
        "qemu-img",
        &[&["create", "-q", "--object", s1, "-f", "qcow2"], &args[..]].concat(),
    );
    let spec_top = format!(
        "driver=qcow2,file.filename={t},encrypt.key-secret=sec1,\
         backing.driver=qcow2,backing.file.filename={b},backing.encrypt.key-secret=sec0"
    );
    let spec_base = format!("driver=qcow2,file.filename={b},encrypt.key-secret=sec0");
    ok(
        "qemu-io",
        &[
            "--object",
            s0,
            "--object",
            s1,
            "--image-opts",
            &spec_top,
            "-c",
            "write -P 0xa 0 1M",
            "-c",
            "write -P 0xb 3M 1M",
        ],
    );
    // A key is a "strong" option: no plain filename names the image, so
    // qemu-img and rimg show a json: name (keys in the order of QEMU's
    // hash table, which the iotests filter; rimg follows it). Info reads
    // no data: no secrets.
    let info_top = format!("driver=qcow2,file.filename={t},encrypt.key-secret=sec1");
    for spec in [&info_top, &spec_base] {
        let want = ok("qemu-img", &["info", "--image-opts", spec]);
        let got = rimg(&["info", "--image-opts", spec]);
        assert_eq!(want.lines().next(), got.lines().next(), "{spec}");
        for out in [&want, &got] {
            let first = out.lines().next().unwrap();
            let j: serde_json::Value =
                serde_json::from_str(first.strip_prefix("image: json:").expect(first)).unwrap();
            let secret = j
                .get("encrypt.key-secret")
                .or_else(|| j.get("encrypt").and_then(|e| e.get("key-secret")));
            assert!(secret.is_some(), "{first}");
            assert!(j["file"]["filename"].is_string(), "{first}");
        }
    }
    rimg(&[
        "commit",
        "--object",
        s0,
        "--object",
        s1,
        "--image-opts",
        &spec_top,
    ]);
    let out = ok(
        "qemu-io",
        &[
            "--object",
            s0,
            "--image-opts",
            &spec_base,
            "-c",
            "read -P 0xa 0 1M",
            "-c",
            "read -P 0 1M 2M",
            "-c",
            "read -P 0xb 3M 1M",
        ],
    );
    assert!(!out.contains("verification failed"), "{out}");
    ok(
        "qemu-img",
        &["check", "--object", s0, "--image-opts", &spec_base],
    );
    ok(
        "qemu-img",
        &[
            "check",
            "--object",
            s0,
            "--object",
            s1,
            "--image-opts",
            &spec_top,
        ],
    );
}

/// Encryption with extended L2 entries (copy-on-write per subcluster,
/// every fill encrypted for where it lands) and with an external data
/// file, raw or not: images made by QEMU and by rimg, written by both
/// and read by the other, at cluster sizes 512 B to 2 MiB; qemu-img
/// check, compare and info judge.
#[test]
fn encryption_with_subclusters_and_data_files_both_ways() {
    const SIZE: usize = 8 << 20;
    let d = tempdir();
    let variants = [
        "extended_l2=on,cluster_size=16k",
        "extended_l2=on",
        "extended_l2=on,cluster_size=2M",
        "data_file=DATA,cluster_size=512",
        "data_file=DATA",
        "data_file=DATA,data_file_raw=on,cluster_size=2M",
        "extended_l2=on,data_file=DATA",
    ];
    for (i, extra) in variants.iter().enumerate() {
        for maker in ["qemu-img", "rimg"] {
            let img = d.path().join(format!("{maker}{i}.qcow2"));
            let data = d.path().join(format!("{maker}{i}.data"));
            let opts = format!("{LUKS},{}", extra.replace("DATA", data.to_str().unwrap()));
            let what = format!("{maker} {opts}");
            let args = create_args(SECRET, &opts, img.to_str().unwrap(), "8M");
            match maker {
                "rimg" => drop(rimg(&args)),
                _ => drop(ok("qemu-img", &args)),
            }
            qcheck(&img);
            // QEMU writes inside a subcluster, across clusters, zeros.
            qio(
                &img,
                &[
                    "write -P 0x11 1536 1000",
                    "write -P 0x22 70000 140000",
                    "write -z 307200 65536",
                    "write -P 0x23 2097000 4000",
                ],
            );
            // rimg reads what QEMU reads.
            let plain = d.path().join(format!("{maker}{i}.raw"));
            let s = spec(&img);
            let p = plain.to_str().unwrap();
            ok(
                "qemu-img",
                &[
                    "convert",
                    "--object",
                    SECRET,
                    "--image-opts",
                    &s,
                    "-O",
                    "raw",
                    p,
                ],
            );
            let mut want = std::fs::read(&plain).unwrap();
            let q = open_rimg(&img, PW, true).unwrap();
            let mut got = vec![0u8; SIZE];
            q.read_at(&mut got, 0).unwrap();
            assert!(got == want, "{what}: rimg reads other bytes than QEMU");
            // rimg writes inside a subcluster, across a cluster boundary,
            // over QEMU's zeros, into untouched space; QEMU reads them.
            for (off, len, v) in [
                (5000, 700, 0x33),
                ((2 << 20) - 20000, 40000, 0x44),
                (307200 + 512, 512, 0x55),
                (6 << 20, 3000, 0x66),
            ] {
                q.write_at(&vec![v; len], off as u64).unwrap();
                want[off..off + len].fill(v);
            }
            q.write_zeroes(1 << 20, 65536, false).unwrap();
            want[1 << 20..(1 << 20) + 65536].fill(0);
            q.flush().unwrap();
            drop(q);
            std::fs::write(&plain, &want).unwrap();
            qcheck(&img);
            let r = format!("driver=raw,file.filename={p}");
            ok(
                "qemu-img",
                &["compare", "--object", SECRET, "--image-opts", &s, &r],
            );
            // info as qemu-img's (minus the sizes that depend on the host).
            let strip = |s: &str| {
                let mut v: serde_json::Value = serde_json::from_str(s).unwrap();
                v.as_object_mut().unwrap().remove("actual-size");
                v.as_object_mut().unwrap().remove("children");
                v
            };
            let i = img.to_str().unwrap();
            let a = rimg(&["info", "--output=json", i]);
            let b = ok("qemu-img", &["info", "--output=json", i]);
            assert_eq!(strip(&a), strip(&b), "{what}");
        }
    }
}
