//! rimg-nbd against the real clients: qemu-io, qemu-img, and libnbd's
//! nbdinfo and nbdcopy; qemu-nbd serving the same image is the judge of
//! what the server reports. The server runs as in production: seccomp in
//! kill mode, stopped with SIGTERM and its exit status asserted; every
//! image it wrote passes `qemu-img check` and compares equal to a model.

use std::path::Path;

use rimg_tests::nbd::{self, unix_uri, QemuNbd};
use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, qemu_img, run, run_ok, tempdir,
    write_mixed_raw,
};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs qemu-io's commands on `target` (an image or an NBD URI, read as
/// raw) and asserts that every one succeeded.
fn qemu_io_ok(target: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(target);
    let out = run_ok("qemu-io", &args);
    for bad in ["failed", "Pattern verification", "error"] {
        assert!(!out.contains(bad), "qemu-io {cmds:?} on {target}:\n{out}");
    }
    out
}

/// Guest writes of every kind through the server land in the image: the
/// same qemu-io commands on a raw copy give the same content, and the
/// image checks clean. For qcow2 and raw exports, with TRIM unmapping.
#[test]
fn qemu_io_writes_through_rimg_nbd_land_in_the_image() {
    let cmds = [
        "write -P 0x11 0 1M",
        "write -P 0x22 65536 4096",
        "write -P 0x33 3000 5000",
        "write -f -P 0x44 8M 192k",
        "write -z 512k 256k",
        "write -z -u 8M 64k",
        "discard 1M 64k",
        "write -P 0x55 63M 1M",
        "aio_write -P 0x66 20M 64k",
        "aio_write -P 0x67 21M 64k",
        "aio_flush",
        "flush",
    ];
    for fmt in ["qcow2", "raw"] {
        let d = tempdir();
        let img = d.path().join(format!("disk.{fmt}"));
        let model = d.path().join("model.raw");
        let out = qemu_img(&["create", "-f", fmt, s(&img), "64M"]);
        assert!(out.status.success());
        qemu_io_ok(s(&img), &[]);
        rimg_tests::qemu_io(&img, &["write -P 0x77 30M 1M"]);
        run_ok("qemu-img", &["convert", "-O", "raw", s(&img), s(&model)]);
        let sock = d.path().join("nbd.sock");
        let srv = nbd::serve(&sock, &["--discard", "unmap", "-f", fmt, s(&img)]);
        qemu_io_ok(&unix_uri(&sock, ""), &cmds);
        // Read back through the server what was written.
        qemu_io_ok(
            &unix_uri(&sock, ""),
            &[
                "read -P 0x11 0 3000",
                "read -P 0x33 3000 5000",
                "read -P 0x44 8454144 131072",
                "read -P 0 512k 256k",
                "read -P 0x77 30M 1M",
                "read -P 0x67 21M 64k",
            ],
        );
        nbd::stop(srv);
        qemu_io_ok(s(&model), &cmds);
        if fmt == "qcow2" {
            assert_qemu_check_clean(&img);
        }
        assert_qemu_compare_equal(&img, &model);
    }
}

/// An overlay with data in both layers, zero clusters, a discarded
/// cluster and a compressed one in the backing file, and a sparse raw
/// file: `qemu-img map`, `nbdinfo --map` for base:allocation and
/// qemu:allocation-depth, and `nbdinfo --json` say the same through
/// rimg-nbd as through qemu-nbd.
#[test]
fn block_status_and_export_info_match_qemu_nbd() {
    nbd::ensure_libnbd();
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    let sparse = d.path().join("sparse.raw");
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&base), "64M"]);
    rimg_tests::qemu_io(&base, &["write -P 1 0 4M", "write -c -P 2 8M 64k"]);
    let out = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
        "64M",
    ]);
    assert!(out.status.success());
    rimg_tests::qemu_io(
        &top,
        &[
            "write -P 3 1M 1M",
            "write -z 2M 512k",
            "discard 3M 64k",
            "write -P 4 20M 100k",
        ],
    );
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&sparse).unwrap();
        // Not a whole number of sectors: QEMU exports it rounded up.
        f.set_len((16 << 20) + 1000).unwrap();
        f.write_all_at(&[9u8; 8192], 1 << 20).unwrap();
        f.write_all_at(&[7u8; 100], 16 << 20).unwrap();
    }
    for (img, fmt) in [(&top, "qcow2"), (&sparse, "raw")] {
        let q = QemuNbd::start(&d.path().join("q.sock"), &["-r", "-A", "-f", fmt, s(img)]);
        let rs = d.path().join("r.sock");
        let r = nbd::serve(&rs, &["-e", "0", "-r", "-A", "-f", fmt, s(img)]);
        let report = |sock: &Path| {
            let u = unix_uri(sock, "");
            let json = run_ok("nbdinfo", &["--json", &u]).replace(s(sock), "SOCKET");
            [
                run_ok("qemu-img", &["map", "--output=json", "-f", "raw", &u]),
                run_ok("nbdinfo", &["--map", &u]),
                run_ok("nbdinfo", &["--map=qemu:allocation-depth", &u]),
                json,
            ]
        };
        let want = report(&q.socket);
        let got = report(&rs);
        for (w, g) in want.iter().zip(&got) {
            assert_eq!(g, w, "{fmt}: rimg-nbd (left) and qemu-nbd (right) differ");
        }
        // The reports have something to compare: holes and data both.
        assert!(
            want[1].contains("hole") && want[1].contains("data"),
            "{}",
            want[1]
        );
        nbd::stop(r);
    }
}

/// Copies into and out of the server with the tools users copy with:
/// nbdcopy (several connections, many requests in flight) writes a mixed
/// raw file into an empty qcow2 export; qemu-img convert and nbdcopy read
/// it back out; everything compares equal and the image checks clean.
#[test]
fn nbdcopy_and_qemu_img_convert_copy_through_the_server() {
    nbd::ensure_libnbd();
    let d = tempdir();
    let src = d.path().join("src.raw");
    write_mixed_raw(&src, 48 << 20, 7);
    let img = d.path().join("disk.qcow2");
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&img), "48M"]);
    let sock = d.path().join("nbd.sock");
    let srv = nbd::serve(&sock, &["-e", "0", s(&img)]);
    let u = unix_uri(&sock, "");
    run_ok(
        "nbdcopy",
        &["--connections=4", "--requests=32", s(&src), &u],
    );
    let back = d.path().join("back.raw");
    run_ok("nbdcopy", &[&u, s(&back)]);
    let conv = d.path().join("conv.qcow2");
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &u, s(&conv)],
    );
    nbd::stop(srv);
    assert_qemu_check_clean(&img);
    assert_qemu_check_clean(&conv);
    for out in [&img, &back, &conv] {
        assert_qemu_compare_equal(&src, out);
    }
}

/// Several exports on one server: listed with their descriptions; a
/// read-only one refuses writes; names that are not exported (including
/// ones shaped like paths) are refused.
#[test]
fn exports_are_listed_and_reached_only_by_their_names() {
    nbd::ensure_libnbd();
    let d = tempdir();
    let a = d.path().join("a.qcow2");
    let b = d.path().join("b.raw");
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&a), "16M"]);
    run_ok("qemu-img", &["create", "-f", "raw", s(&b), "8M"]);
    rimg_tests::qemu_io(&b, &["write -P 0x5a 0 64k"]);
    let sock = d.path().join("nbd.sock");
    let spec_a = format!("name=alpha,file={},description=the first", s(&a));
    let spec_b = format!("name=beta,file={},format=raw,readonly=on", s(&b));
    let srv = nbd::serve(
        &sock,
        &["-e", "0", "--export", &spec_a, "--export", &spec_b],
    );
    let list = run_ok("nbdinfo", &["--list", "--json", &unix_uri(&sock, "")]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta"], "{list}");
    assert!(list.contains("the first"), "{list}");
    let beta = unix_uri(&sock, "beta");
    let out = run_ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5a 0 64k", &beta],
    );
    assert!(out.contains("read 65536/65536"), "{out}");
    let w = run("qemu-io", &["-f", "raw", "-c", "write 0 4096", &beta]);
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        text.contains("write failed") || !w.status.success(),
        "a write to a read-only export must fail: {text}"
    );
    for bad in ["gamma", "../alpha", "alpha/", s(&a)] {
        let o = run("nbdinfo", &[&unix_uri(&sock, bad)]);
        assert!(!o.status.success(), "export '{bad}' must be refused");
    }
    qemu_io_ok(
        &unix_uri(&sock, "alpha"),
        &["write -P 1 0 4096", "read -P 1 0 4096"],
    );
    nbd::stop(srv);
    assert_qemu_check_clean(&a);
}

/// TCP on loopback (the default address), a port chosen by the kernel;
/// and without --persistent the server ends by itself, exit status 0,
/// when its last client has gone.
#[test]
fn tcp_on_loopback_and_exit_after_the_last_client() {
    let d = tempdir();
    let img = d.path().join("disk.qcow2");
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&img), "16M"]);
    rimg_tests::qemu_io(&img, &["write -P 0x42 1M 64k"]);
    let srv = nbd::start(&img, &["-p", "0", s(&img)]);
    let addr = nbd::loopback_address(&srv);
    qemu_io_ok(&format!("nbd://{addr}/"), &["read -P 0x42 1M 64k"]);
    let (st, log) = srv.exit_within(std::time::Duration::from_secs(10));
    let st = st.unwrap_or_else(|| panic!("server did not end after its last client:\n{log}"));
    assert!(st.success(), "{st}: {log}");
    assert_qemu_check_clean(&img);
}

/// A raw file whose length is not a whole number of sectors is exported
/// rounded up, as qemu-nbd does; writes and TRIM into that last partial
/// sector work as under qemu-nbd, which grows the file: both servers
/// leave the same file behind.
#[test]
fn a_raw_files_padded_last_sector_takes_writes_as_under_qemu_nbd() {
    let d = tempdir();
    let cmds = [
        "discard 0 1000448",
        "write -P 0x61 999000 1448",
        "write -z 4096 4096",
        "read -P 0x61 999000 1448",
    ];
    let mut files = Vec::new();
    for server in ["rimg", "qemu"] {
        let img = d.path().join(format!("{server}.raw"));
        std::fs::write(&img, vec![0x5au8; 1_000_001]).unwrap();
        let sock = d.path().join(format!("{server}.sock"));
        if server == "rimg" {
            let srv = nbd::serve(&sock, &["--discard", "unmap", "-f", "raw", s(&img)]);
            qemu_io_ok(&unix_uri(&sock, ""), &cmds);
            nbd::stop(srv);
        } else {
            let q = QemuNbd::start(&sock, &["--discard=unmap", "-f", "raw", s(&img)]);
            qemu_io_ok(&unix_uri(&sock, ""), &cmds);
            drop(q);
        }
        files.push(std::fs::read(&img).unwrap());
    }
    assert_eq!(files[0].len(), files[1].len(), "file lengths differ");
    assert!(
        files[0] == files[1],
        "rimg-nbd and qemu-nbd left different files"
    );
}

/// A data cluster whose bytes end early in the file (an external data
/// file shorter than the clusters it holds) reads as zeros past the
/// file's end, as through qemu-nbd and qemu-io's own reads: on the
/// io_uring path a read that meets the end of the file is not an error.
#[test]
fn data_past_the_end_of_an_external_data_file_reads_as_zeros() {
    let d = tempdir();
    let img = d.path().join("ext.qcow2");
    let data = d.path().join("ext.data");
    let opt = format!("data_file={}", s(&data));
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", &opt, s(&img), "1M"],
    );
    rimg_tests::qemu_io(&img, &["write -P 7 0 4096"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let cmds = [
        "read -P 7 0 4096",
        "read -P 0 4096 61440",
        "read -P 7 0 4096",
    ];
    for aio in ["io_uring", "threads"] {
        let sock = d.path().join(format!("{aio}.sock"));
        let srv = nbd::serve(&sock, &["--aio", aio, "-f", "qcow2", s(&img)]);
        qemu_io_ok(&unix_uri(&sock, ""), &cmds);
        nbd::stop(srv);
    }
    let sock = d.path().join("qemu.sock");
    let q = QemuNbd::start(&sock, &["-f", "qcow2", s(&img)]);
    qemu_io_ok(&unix_uri(&sock, ""), &cmds);
    drop(q);
}

/// One 4 MiB read of 8192 separately placed 512-byte clusters (even
/// ones written first, then odd ones): thousands of ring reads for one
/// request, more than the ring's completion queue holds, so the request
/// waits for room part way. The bytes read equal qemu-nbd's.
#[test]
fn a_read_of_thousands_of_extents_reads_what_qemu_nbd_reads() {
    let d = tempdir();
    let img = d.path().join("frag.qcow2");
    let o = "cluster_size=512";
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", o, s(&img), "4M"],
    );
    let n = 8192u64;
    let cmds: Vec<String> = (0..n)
        .step_by(2)
        .chain((1..n).step_by(2))
        .map(|k| format!("write -P {} {} 512", k % 251 + 1, k * 512))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
    rimg_tests::qemu_io(&img, &cmds);
    // Under a deadline: a request that waits for room and is never
    // resumed hangs its client.
    let dump = |uri: &str| -> Vec<String> {
        let mut cmd = std::process::Command::new("qemu-io");
        cmd.args(["-f", "raw", "-c", "read -v 0 4M", uri]);
        let w = rimg_tests::run_watched(cmd, std::time::Duration::from_secs(60));
        let out = String::from_utf8_lossy(&w.stdout).into_owned();
        assert!(!w.timed_out, "qemu-io read of {uri} hung");
        assert!(w.status.is_some_and(|s| s.success()), "{uri}: {out}");
        out.lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_hexdigit()) && l.contains(':'))
            .map(String::from)
            .collect()
    };
    let sock = d.path().join("qemu.sock");
    let q = QemuNbd::start(&sock, &["-f", "qcow2", s(&img)]);
    let want = dump(&unix_uri(&sock, ""));
    drop(q);
    assert_eq!(want.len(), 4 << 16, "qemu-io prints 16 bytes a line");
    for aio in ["io_uring", "threads"] {
        let sock = d.path().join(format!("{aio}.sock"));
        let srv = nbd::serve(&sock, &["--aio", aio, "-f", "qcow2", s(&img)]);
        let got = dump(&unix_uri(&sock, ""));
        nbd::stop(srv);
        assert!(got == want, "{aio}: the bytes read differ from qemu-nbd's");
    }
}

/// Persistent dirty bitmaps as `qemu:dirty-bitmap:NAME` (`-B`), as
/// qemu-nbd gives them: the listed contexts, each bitmap's extents
/// (nbdinfo, and qemu-img's own reading of a bitmap through block
/// status), and on a writable export a bitmap that records writes made
/// through the server; the image then checks clean with its bitmaps.
#[test]
fn dirty_bitmaps_are_exported_as_qemu_nbd_exports_them() {
    nbd::ensure_libnbd();
    let d = tempdir();
    let img = d.path().join("bm.qcow2");
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&img), "64M"]);
    run_ok(
        "qemu-img",
        &["bitmap", "--add", "-g", "65536", s(&img), "b0"],
    );
    rimg_tests::qemu_io(&img, &["write 1M 100k", "write 5M 4k", "write 20M 3M"]);
    run_ok(
        "qemu-img",
        &["bitmap", "--add", "--disable", "-g", "512k", s(&img), "b1"],
    );
    run_ok("qemu-img", &["bitmap", "--merge", "b0", s(&img), "b1"]);
    let report = |sock: &Path| {
        let u = unix_uri(sock, "");
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:b0",
            s(sock)
        );
        [
            run_ok("nbdinfo", &["--list", "--json", &u]).replace(s(sock), "SOCKET"),
            run_ok("nbdinfo", &["--map=qemu:dirty-bitmap:b0", &u]),
            run_ok("nbdinfo", &["--map=qemu:dirty-bitmap:b1", &u]),
            run_ok("qemu-img", &["map", "--output=json", "--image-opts", &opts]),
        ]
    };
    // Read-only, both bitmaps.
    let want = {
        let q = QemuNbd::start(
            &d.path().join("q.sock"),
            &["-r", "-B", "b0", "-B", "b1", s(&img)],
        );
        report(&q.socket)
    };
    let rs = d.path().join("r.sock");
    let r = nbd::serve(&rs, &["-e", "0", "-r", "-B", "b0", "-B", "b1", s(&img)]);
    let got = report(&rs);
    nbd::stop(r);
    assert!(
        want[1].contains("dirty") && want[2].contains("dirty"),
        "{want:?}"
    );
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g, w, "rimg-nbd (left) and qemu-nbd (right) differ");
    }
    // Writable, b0 records the writes made through the server.
    let mut maps = Vec::new();
    for server in ["qemu", "rimg"] {
        let copy = d.path().join(format!("{server}.qcow2"));
        std::fs::copy(&img, &copy).unwrap();
        let sock = d.path().join(format!("{server}-w.sock"));
        let u = unix_uri(&sock, "");
        let write = ["write -P 9 40M 64k", "write -P 9 63M 1M"];
        let map = |u: &str| run_ok("nbdinfo", &["--map=qemu:dirty-bitmap:b0", u]);
        if server == "qemu" {
            let q = QemuNbd::start(&sock, &["-B", "b0", s(&copy)]);
            qemu_io_ok(&u, &write);
            maps.push(map(&u));
            drop(q);
        } else {
            let r = nbd::serve(&sock, &["-e", "0", "-B", "b0", s(&copy)]);
            qemu_io_ok(&u, &write);
            maps.push(map(&u));
            nbd::stop(r);
        }
        assert_qemu_check_clean(&copy);
    }
    assert!(maps[0].contains("41943040"), "{}", maps[0]);
    assert_eq!(
        maps[1], maps[0],
        "live bitmap: rimg-nbd (left), qemu-nbd (right)"
    );
    let info = |p: &str| run_ok("qemu-img", &["info", "--output=json", p]);
    let bitmaps = |j: String| {
        serde_json::from_str::<serde_json::Value>(&j).unwrap()["format-specific"]["data"]["bitmaps"]
            .clone()
    };
    assert_eq!(
        bitmaps(info(s(&d.path().join("rimg.qcow2")))),
        bitmaps(info(s(&d.path().join("qemu.qcow2"))))
    );
}

/// With qemu-nbd's default of one client at a time, neither server
/// offers multi-conn (a client opening several connections would wait
/// for ever); with more, both do. `nbdinfo --json` is the same.
#[test]
fn multi_conn_is_offered_only_where_several_clients_may_connect() {
    nbd::ensure_libnbd();
    let d = tempdir();
    let img = d.path().join("disk.qcow2");
    run_ok("qemu-img", &["create", "-f", "qcow2", s(&img), "16M"]);
    for shared in [None, Some("2")] {
        // QemuNbd::start passes -e 0; a later -e wins (1 is the default).
        let e = shared.unwrap_or("1");
        let qs = d.path().join(format!("q{e}.sock"));
        let q = QemuNbd::start(&qs, &["-e", e, "-r", s(&img)]);
        let rs = d.path().join(format!("r{e}.sock"));
        let mut rargs = vec!["-r"];
        if let Some(n) = shared {
            rargs.extend(["-e", n]);
        }
        rargs.push(s(&img));
        let r = nbd::serve(&rs, &rargs);
        let json = |sock: &Path| {
            run_ok("nbdinfo", &["--json", &unix_uri(sock, "")]).replace(s(sock), "SOCKET")
        };
        let (want, got) = (json(&qs), json(&rs));
        drop(q);
        nbd::stop(r);
        assert_eq!(
            got, want,
            "shared {shared:?}: rimg-nbd (left), qemu-nbd (right)"
        );
        let multi = want.contains("\"can_multi_conn\": true");
        assert_eq!(multi, shared.is_some(), "{want}");
    }
}
