//! `rimg bench` side by side with `qemu-img bench`: the same options give
//! the same report lines and leave images with the same content (qcow2
//! with fresh clusters, partial clusters over a backing file, raw; every
//! cache mode, O_DIRECT with aligned and unaligned requests, flush
//! intervals with and without draining, long option names); the same
//! refusals with the same messages; and the file space rimg reserves
//! ahead of its writes is gone when it exits.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, ok_as as ok, qemu_create, qemu_img,
    qemu_io, rimg, tempdir,
};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The report without the measured time: every line but the last, and
/// the last with its number checked and replaced.
fn report_shape(out: &str) -> Vec<String> {
    let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
    let last = lines.pop().expect("a report");
    let secs = last
        .strip_prefix("Run completed in ")
        .and_then(|r| r.strip_suffix(" seconds."))
        .unwrap_or_else(|| panic!("last line of the report: {last:?}"));
    let (int, frac) = secs.split_once('.').expect("seconds with a fraction");
    assert!(
        !int.is_empty() && int.chars().all(|c| c.is_ascii_digit()),
        "{last:?}"
    );
    assert!(
        frac.len() == 3 && frac.chars().all(|c| c.is_ascii_digit()),
        "{last:?}"
    );
    lines.push("Run completed in N seconds.".into());
    lines
}

/// The command line `bench ARGS IMG`.
fn bench<'a>(args: &[&'a str], img: &'a Path) -> Vec<&'a str> {
    let mut a = vec!["bench"];
    a.extend(args);
    a.push(s(img));
    a
}

/// Runs qemu-img bench on `q` and rimg bench on `r` with `args`; both
/// must succeed with the same report.
fn same_report(q: &Path, r: &Path, args: &[&str]) {
    let qa = bench(args, q);
    let qo = ok(qemu_img(&qa), &format!("qemu-img {qa:?}"));
    let ra = bench(args, r);
    let ro = ok(rimg(&ra), &format!("rimg {ra:?}"));
    assert_eq!(
        report_shape(&text(&ro.stdout)),
        report_shape(&text(&qo.stdout)),
        "report of {args:?}"
    );
}

/// Creates `name.q` and `name.r` alike with `create` (qemu-img create
/// arguments after the file name go last), runs qemu-img bench on the
/// first and rimg bench on the second with `args`, and checks that both
/// succeed with the same report and leave the same content.
fn side_by_side(d: &Path, name: &str, create: &[&str], size: &str, args: &[&str]) {
    let q = d.join(format!("{name}.q"));
    let r = d.join(format!("{name}.r"));
    for p in [&q, &r] {
        let mut a = vec!["create", "-q"];
        a.extend(create);
        a.extend([s(p), size]);
        ok(qemu_img(&a), "qemu-img create");
    }
    same_report(&q, &r, args);
    if args.contains(&"-w") || args.contains(&"--write") {
        if create.contains(&"qcow2") {
            assert_qemu_check_clean(&r);
        }
        assert_qemu_compare_equal(&q, &r);
    }
}

#[test]
fn writes_match_qemu_img_in_every_cache_mode() {
    let d = tempdir();
    let qcow = ["-f", "qcow2", "-o", "cluster_size=64k"];
    for (i, cache) in ["writeback", "none", "directsync", "writethrough", "unsafe"]
        .iter()
        .enumerate()
    {
        // Every request allocates a cluster: 4 KiB at the start of each.
        side_by_side(
            d.path(),
            &format!("fresh{i}"),
            &qcow,
            "64M",
            &[
                "-w",
                "-t",
                cache,
                "-c",
                "300",
                "-d",
                "8",
                "-s",
                "4k",
                "-S",
                "64k",
                "-o",
                "8k",
                "--pattern",
                "0xa5",
            ],
        );
    }
    // Requests smaller than a sector, at odd offsets, overlapping one
    // another and several to a cluster (they wait for the cluster's
    // allocation); with O_DIRECT they cannot be aligned and go buffered.
    for cache in ["writeback", "none"] {
        side_by_side(
            d.path(),
            &format!("odd-{cache}"),
            &qcow,
            "16M",
            &[
                "-w",
                "-t",
                cache,
                "-c",
                "500",
                "-d",
                "16",
                "-s",
                "1536",
                "-S",
                "1000",
                "-o",
                "333",
                "--pattern",
                "7",
            ],
        );
    }
    // Requests spanning clusters (3 clusters of 64 KiB each, unaligned).
    side_by_side(
        d.path(),
        "span",
        &qcow,
        "64M",
        &[
            "-w", "-t", "none", "-c", "60", "-d", "4", "-s", "150k", "-S", "300k", "-o", "4k",
        ],
    );
    // Raw images.
    for cache in ["writeback", "none"] {
        side_by_side(
            d.path(),
            &format!("raw-{cache}"),
            &["-f", "raw"],
            "8M",
            &[
                "-f",
                "raw",
                "-w",
                "-t",
                cache,
                "-c",
                "200",
                "-s",
                "4k",
                "-S",
                "12k",
                "--pattern",
                "0x3c",
            ],
        );
    }
}

#[test]
fn partial_writes_over_a_backing_file_match_qemu_img() {
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    qemu_create(&base, "", "8M");
    qemu_io(&base, &["write -P 0x11 0 8M"]);
    // Each 4 KiB write at 1 KiB into a cluster: the rest of the cluster
    // is copied from the backing file.
    for cache in ["writeback", "none"] {
        side_by_side(
            d.path(),
            &format!("top-{cache}"),
            &["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"],
            "8M",
            &[
                "-w",
                "-t",
                cache,
                "-c",
                "100",
                "-d",
                "8",
                "-s",
                "4k",
                "-S",
                "64k",
                "-o",
                "1k",
                "--pattern",
                "0x22",
            ],
        );
    }
}

/// Extended L2 entries over a backing file (a write copies only the
/// subclusters it partly covers) and an external data file (the ring does
/// its I/O there): the same content as qemu-img bench leaves, aligned and
/// unaligned, through the page cache and with O_DIRECT.
#[test]
fn subcluster_and_data_file_writes_match_qemu_img() {
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    qemu_create(&base, "", "8M");
    qemu_io(&base, &["write -P 0x11 0 8M"]);
    let backed = ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"];
    for cache in ["writeback", "none"] {
        for (size, at) in [("4k", "0"), ("4k", "1k"), ("1536", "3584")] {
            let args = [
                "-w",
                "-t",
                cache,
                "-c",
                "100",
                "-d",
                "8",
                "-s",
                size,
                "-S",
                "64k",
                "-o",
                at,
                "--pattern",
                "0x22",
            ];
            let name = format!("ext-{cache}-{size}-{at}");
            let mut create = backed.to_vec();
            create.extend(["-o", "extended_l2=on"]);
            side_by_side(d.path(), &name, &create, "8M", &args);
            // A data file each: the two images must not share one.
            let q = d.path().join(format!("data-{name}.q"));
            let r = d.path().join(format!("data-{name}.r"));
            for p in [&q, &r] {
                let opt = format!("data_file={}.data", s(p));
                ok(
                    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opt, s(p), "8M"]),
                    "qemu-img create",
                );
            }
            same_report(&q, &r, &args);
            assert_qemu_check_clean(&r);
            assert_qemu_compare_equal(&q, &r);
            let data = std::fs::read(format!("{}.data", s(&r))).unwrap();
            assert!(data.contains(&0x22), "no data in the data file of {name}");
        }
    }
}

#[test]
fn flush_intervals_match_qemu_img() {
    let d = tempdir();
    for extra in [&[][..], &["--no-drain"][..]] {
        let mut args = vec![
            "-w",
            "-c",
            "100",
            "-d",
            "4",
            "-S",
            "64k",
            "--flush-interval",
            "8",
            "--pattern",
            "1",
        ];
        args.extend(extra);
        side_by_side(
            d.path(),
            &format!("flush{}", extra.len()),
            &["-f", "qcow2"],
            "16M",
            &args,
        );
    }
}

#[test]
fn long_options_and_accepted_options_match_qemu_img() {
    let d = tempdir();
    side_by_side(
        d.path(),
        "long",
        &["-f", "qcow2"],
        "16M",
        &[
            "--write",
            "--count",
            "40",
            "--depth",
            "2",
            "--buffer-size",
            "1k",
            "--step-size",
            "70k",
            "--offset",
            "512",
            "--cache",
            "none",
            "--native",
            "--pattern",
            "3",
            "--format",
            "qcow2",
        ],
    );
    for (i, extra) in [
        &["-t", "none", "-n"][..],
        &["-t", "directsync", "-i", "native"][..],
        &["-i", "io_uring"][..],
        &["-i", "threads"][..],
        &["-q"][..],
    ]
    .iter()
    .enumerate()
    {
        let mut args = vec!["-w", "-c", "10", "-S", "64k", "--pattern", "9"];
        args.extend(*extra);
        side_by_side(d.path(), &format!("acc{i}"), &["-f", "qcow2"], "4M", &args);
    }
}

#[test]
fn reads_match_qemu_img() {
    let d = tempdir();
    let img = d.path().join("data.qcow2");
    qemu_create(&img, "", "16M");
    // Data, zero and unallocated clusters, and a compressed one.
    qemu_io(
        &img,
        &[
            "write -P 0x44 0 4M",
            "write -z 4M 1M",
            "write -c -P 0x55 6M 64k",
        ],
    );
    for args in [
        &["-c", "2000", "-s", "4k"][..],
        &["-c", "2000", "-s", "4k", "-t", "none"][..],
        // Unaligned for O_DIRECT: buffered instead.
        &["-c", "500", "-s", "1000", "-S", "3333", "-t", "none"][..],
        &["-c", "300", "-s", "96k", "-S", "48k", "-d", "3"][..],
        &["-c", "100", "-U", "-q"][..],
        &["--count", "100", "--force-share", "--aio", "io_uring"][..],
    ] {
        same_report(&img, &img, args);
    }
}

#[test]
fn refusals_match_qemu_img() {
    let d = tempdir();
    let img = d.path().join("small.qcow2");
    qemu_create(&img, "", "1M");
    for args in [
        &["-t", "foo"][..],
        &["-c", "0"][..],
        &["-c", "-3"][..],
        &["-c", "abc"][..],
        &["-c", "1k"][..],
        &["-c", "3000000000"][..],
        &["-d", "0"][..],
        &["-d", "1k"][..],
        &["-s", "0"][..],
        &["-s", "3G"][..],
        &["-o", "-1"][..],
        &["-S", "-1"][..],
        &["-w", "--pattern", "256"][..],
        &["-w", "--pattern", "x"][..],
        &["-w", "--flush-interval", "1"][..],
        &["-w", "--flush-interval", "1k"][..],
        &["--flush-interval", "64"][..],
        &["-i", "foo"][..],
        &["-n"][..],
        &["-i", "native"][..],
        &["-w", "-U"][..],
        // A first request past the end of the image.
        &["-o", "2M", "-c", "1"][..],
        &["-o", "1020k", "-c", "1", "-s", "8k"][..],
    ] {
        let qo = qemu_img(&bench(args, &img));
        let ro = rimg(&bench(args, &img));
        assert_eq!(qo.status.code(), Some(1), "qemu-img {args:?}");
        assert_eq!(
            ro.status.code(),
            Some(1),
            "rimg {args:?}: {}",
            text(&ro.stdout)
        );
        let qe = text(&qo.stderr);
        let re = text(&ro.stderr);
        assert_eq!(
            re.trim_end().strip_prefix("rimg: "),
            qe.trim_end().strip_prefix("qemu-img: "),
            "{args:?}"
        );
    }
}

#[test]
fn reserved_space_is_trimmed_at_exit() {
    let d = tempdir();
    let q = d.path().join("q.qcow2");
    let r = d.path().join("r.qcow2");
    for p in [&q, &r] {
        qemu_create(p, "", "1G");
    }
    let args = ["-w", "-t", "none", "-c", "1000", "-s", "4k", "-S", "64k"];
    ok(qemu_img(&bench(&args, &q)), "qemu-img bench");
    ok(rimg(&bench(&args, &r)), "rimg bench");
    assert_qemu_check_clean(&r);
    assert_qemu_compare_equal(&q, &r);
    // rimg reserved 128 MiB at a time past its last cluster; all of it
    // is gone: the file ends with its last cluster and occupies what its
    // 1000 clusters and metadata need, as qemu-img's does (which
    // allocates each new cluster whole).
    let qm = std::fs::metadata(&q).unwrap();
    let rm = std::fs::metadata(&r).unwrap();
    assert_eq!(rm.len(), qm.len());
    let (qused, rused) = (qm.blocks() * 512, rm.blocks() * 512);
    assert!(
        rused <= qused + (1 << 20),
        "{rused} bytes allocated, qemu-img {qused}"
    );
    assert!(rused < 100 << 20, "{rused} bytes allocated");
}

/// The engine's `preallocate_ahead` (what rimg bench turns on): the file
/// grows by the reservation while the image is open; if the process dies
/// before the tail is cut off, the tail is only free space, and the image
/// checks clean and takes more writes.
#[test]
fn reserved_tail_left_by_a_crash_is_free_space() {
    use qcow2::{Image, Qcow2Options};
    let d = tempdir();
    let p = d.path().join("crash.qcow2");
    qemu_create(&p, "", "1G");
    // The crashed writer's descriptor (and its locks) is still open in
    // this process: the image is opened below the lock layer (a writable
    // open with force-share is refused, as in QEMU).
    let open = |ahead: u64| {
        let st = qcow2::storage::Storage::open(&p, true).expect("open");
        let q = qcow2::Qcow2::open(
            st,
            None,
            Qcow2Options {
                preallocate_ahead: ahead,
                ..Default::default()
            },
        )
        .expect("open");
        std::sync::Arc::new(q)
    };
    let img = open(8 << 20);
    let data = vec![0x6bu8; 4096];
    for k in 0..100u64 {
        img.write_at(&data, k << 16).unwrap();
    }
    img.flush().unwrap();
    let len = std::fs::metadata(&p).unwrap().len();
    // The first new cluster reserved 8 MiB past itself; the 100
    // clusters (6.25 MiB) and the metadata stayed inside.
    assert!(len >= 8 << 20, "file length {len}: nothing reserved ahead");
    // Die without dropping the image: the reserved tail stays.
    std::mem::forget(img);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), len);
    let check = |what: &str| {
        let o = ok(
            qemu_img(&["check", "-U", "--output=json", s(&p)]),
            &format!("qemu-img check {what}"),
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for key in ["corruptions", "leaks", "check-errors"] {
            assert_eq!(
                v.get(key).and_then(|x| x.as_u64()).unwrap_or(0),
                0,
                "{what}: {v}"
            );
        }
    };
    check("after the crash");
    let img = open(0);
    for k in 100..200u64 {
        img.write_at(&data, k << 16).unwrap();
    }
    let mut back = vec![0u8; 4096];
    for k in [0u64, 99, 100, 199] {
        img.read_at(&mut back, k << 16).unwrap();
        assert_eq!(back, data, "cluster {k}");
    }
    img.read_at(&mut back, 200 << 16).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    drop(img);
    check("after more writes");
}
