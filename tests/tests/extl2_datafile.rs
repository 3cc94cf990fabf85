//! Extended L2 entries (subclusters) and external data files, with QEMU
//! as the judge: images QEMU made read by us, images we wrote checked by
//! `qemu-img check` and read back by QEMU, and subcluster-granular writes
//! over a backing file compared with what QEMU reads.

use std::path::Path;

use qcow2::Image;
use rimg_tests::image::{open_rw as rw, read_all};
use rimg_tests::{
    assert_qemu_check_clean, ok, qemu_create, qemu_create_backed, qemu_img, qemu_io,
    qemu_map_without_offsets, qemu_raw_content, rimg, tempdir,
};

/// A deterministic pseudo-random sequence (no dependency on a seedable
/// generator's stream staying the same across versions).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// Writes of sizes around the subcluster size (2 KiB for 64 KiB
/// clusters) at unaligned offsets, zeroing and discards.
fn scribble(img: &dyn Image, model: &mut [u8], seed: u64) {
    let size = model.len() as u64;
    let mut r = Lcg(seed);
    for k in 0..60u64 {
        let off = r.next() % (size - 1);
        let len = (1 + r.next() % 9000).min(size - off);
        match k % 10 {
            7 => {
                img.write_zeroes(off, len, k % 20 == 7).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                let buf: Vec<u8> = (0..len)
                    .map(|i| (seed as u8) ^ (k as u8) ^ i as u8)
                    .collect();
                img.write_at(&buf, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
        }
    }
    img.flush().unwrap();
}

/// Scribbles over `path` with the engine (see [`scribble`], `model`
/// following), then has QEMU judge: `qemu-img check` clean, and the
/// content it reads (through `scratch`) is the model.
fn scribble_then_qemu_reads_it(path: &Path, model: &mut [u8], seed: u64, scratch: &Path) {
    scribble(rw(path).as_ref(), model, seed);
    assert_qemu_check_clean(path);
    assert_eq!(qemu_raw_content(path, scratch), model);
}

#[test]
fn subcluster_writes_over_a_backing_file_read_as_qemu_reads_them() {
    let dir = tempdir();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    std::fs::write(&base, vec![0xffu8; 1 << 20]).unwrap();
    qemu_create_backed(&top, "extended_l2=on", &base, "raw", "1M");
    // QEMU writes some subclusters first: we start from its layout.
    qemu_io(
        &top,
        &[
            "write -P 0x11 4k 2k",
            "write -z 64k 8k",
            "write -P 0x22 130k 1k",
        ],
    );
    let mut model = qemu_raw_content(&top, &dir.path().join("q0.raw"));
    {
        let img = rw(&top);
        assert_eq!(read_all(img.as_ref()), model, "we read what QEMU wrote");
        scribble(img.as_ref(), &mut model, 7);
        assert_eq!(read_all(img.as_ref()), model);
    }
    assert_qemu_check_clean(&top);
    assert_eq!(qemu_raw_content(&top, &dir.path().join("q1.raw")), model);
    // Untouched subclusters still come from the backing file: changing it
    // shows through where nothing was written (no whole-cluster copy).
    let o = qemu_img(&["map", "--output=json", top.to_str().unwrap()]);
    ok(o.clone());
    let map = String::from_utf8_lossy(&o.stdout);
    assert!(
        map.contains("\"depth\": 1"),
        "backing data still used: {map}"
    );
}

#[test]
fn extended_l2_images_we_create_pass_qemu_check() {
    let dir = tempdir();
    let img_path = dir.path().join("x.qcow2");
    ok(rimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=32k",
        img_path.to_str().unwrap(),
        "3M",
    ]));
    let info = qemu_img(&["info", img_path.to_str().unwrap()]);
    ok(info.clone());
    assert!(String::from_utf8_lossy(&info.stdout).contains("extended l2: true"));
    let mut model = vec![0u8; 3 << 20];
    scribble_then_qemu_reads_it(&img_path, &mut model, 3, &dir.path().join("x.raw"));
}

#[test]
fn data_file_images_we_write_read_the_same_in_qemu() {
    let dir = tempdir();
    for raw in [false, true] {
        let img_path = dir.path().join(format!("d{raw}.qcow2"));
        let data = dir.path().join(format!("d{raw}.data"));
        let opts = data_file_opts(&data, raw);
        ok(rimg(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            img_path.to_str().unwrap(),
            "2M",
        ]));
        let info = qemu_img(&["info", img_path.to_str().unwrap()]);
        ok(info.clone());
        let text = String::from_utf8_lossy(&info.stdout).to_string();
        assert!(
            text.contains(&format!("data file: {}", data.display())),
            "{text}"
        );
        assert!(text.contains(&format!("data file raw: {raw}")), "{text}");
        let mut model = vec![0u8; 2 << 20];
        scribble_then_qemu_reads_it(&img_path, &mut model, 11, &dir.path().join("d.raw"));
        if raw {
            // The data file alone is the disk.
            assert_eq!(std::fs::read(&data).unwrap(), model);
        }
        // The image file holds no guest data.
        assert!(std::fs::metadata(&img_path).unwrap().len() < 1 << 20);
    }
}

#[test]
fn images_qemu_made_with_data_files_and_subclusters_read_the_same() {
    let dir = tempdir();
    let img_path = dir.path().join("q.qcow2");
    let data = dir.path().join("q.data");
    let opts = format!("extended_l2=on,data_file={}", data.display());
    qemu_create(&img_path, &opts, "1M");
    qemu_io(
        &img_path,
        &[
            "write -P 0x5a 0 3k",
            "write -P 0x6b 70k 100k",
            "write -z 80k 4k",
        ],
    );
    let want = qemu_raw_content(&img_path, &dir.path().join("q.raw"));
    assert_eq!(read_all(rw(&img_path).as_ref()), want);
    let mut model = want;
    scribble_then_qemu_reads_it(&img_path, &mut model, 5, &dir.path().join("q2.raw"));
}

#[test]
fn amend_renames_the_data_file_and_clears_the_raw_bit() {
    let dir = tempdir();
    let img_path = dir.path().join("a.qcow2");
    let data = dir.path().join("a.data");
    let moved = dir.path().join("b.data");
    let opts = format!("data_file={},data_file_raw=on", data.display());
    qemu_create(&img_path, &opts, "1M");
    qemu_io(&img_path, &["write -P 0x42 0 100k"]);
    std::fs::copy(&data, &moved).unwrap();
    ok(rimg(&[
        "amend",
        "-o",
        &format!("data_file={},data_file_raw=off", moved.display()),
        img_path.to_str().unwrap(),
    ]));
    std::fs::remove_file(&data).unwrap();
    let info = qemu_img(&["info", img_path.to_str().unwrap()]);
    ok(info.clone());
    let text = String::from_utf8_lossy(&info.stdout).to_string();
    assert!(
        text.contains(&format!("data file: {}", moved.display())),
        "{text}"
    );
    assert!(text.contains("data file raw: false"), "{text}");
    assert_qemu_check_clean(&img_path);
    qemu_io(&img_path, &["read -P 0x42 0 100k"]);
    // Setting the raw bit on an existing image is refused, as in QEMU.
    let o = rimg(&[
        "amend",
        "-o",
        "data_file_raw=on",
        img_path.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let q = qemu_img(&[
        "amend",
        "-o",
        "data_file_raw=on",
        img_path.to_str().unwrap(),
    ]);
    assert_eq!(message(&o.stderr), message(&q.stderr));
}

/// A compressed cluster's host offset is byte-granular: with extended L2
/// entries, bit 0 of a compressed entry is part of it (only in other
/// entries is it no zero flag). Masking it read an odd offset one byte
/// early (a corrupt deflate stream), in reads, in writes that copy such a
/// cluster and in check.
#[test]
fn compressed_clusters_at_odd_offsets_in_extended_l2_images() {
    let dir = tempdir();
    let img_path = dir.path().join("c.qcow2");
    qemu_create(&img_path, "cluster_size=65536,extended_l2=on", "4M");
    // Four compressed clusters packed one after another: most start at
    // odd host offsets.
    qemu_io(&img_path, &["write -c -P 0x71 1M 256k"]);
    let want = qemu_raw_content(&img_path, &dir.path().join("q.raw"));
    let o = rimg(&["check", img_path.to_str().unwrap()]);
    ok(o);
    let mut model = want.clone();
    {
        let img = rw(&img_path);
        assert_eq!(read_all(img.as_ref()), want);
        // A subcluster write into each compressed cluster copies it.
        for k in 0..4u64 {
            let off = (1 << 20) + k * 65536 + 3000;
            img.write_at(&[0xa5; 5000], off).unwrap();
            model[off as usize..off as usize + 5000].fill(0xa5);
        }
        assert_eq!(read_all(img.as_ref()), model);
    }
    assert_qemu_check_clean(&img_path);
    assert_eq!(
        qemu_raw_content(&img_path, &dir.path().join("q2.raw")),
        model
    );
}

/// The `-o` options of an image whose guest data is in `data`
/// (data_file_raw=on with `raw`).
fn data_file_opts(data: &Path, raw: bool) -> String {
    let raw = if raw { ",data_file_raw=on" } else { "" };
    format!("data_file={}{raw}", data.display())
}

/// An error message without the program's name before it.
fn message(stderr: &[u8]) -> String {
    let s = String::from_utf8_lossy(stderr).to_string();
    s.split_once(": ").map(|x| x.1.to_string()).unwrap_or(s)
}

#[test]
fn rebase_allocates_only_the_differing_subclusters_as_qemu_img() {
    let dir = tempdir();
    let p = |n: &str| dir.path().join(n);
    let opts = "cluster_size=1M,extended_l2=on";
    qemu_create(p("base"), opts, "1M");
    for (img, back) in [("mid", "base"), ("top", "mid")] {
        qemu_create_backed(&p(img), opts, &p(back), "qcow2", "1M");
    }
    qemu_io(
        &p("mid"),
        &["write -P 0x11 32k 32k", "write -P 0x22 960k 32k"],
    );
    std::fs::copy(p("top"), p("top2")).unwrap();
    let want = qemu_raw_content(&p("top"), &p("before.raw"));
    ok(rimg(&[
        "rebase",
        "-F",
        "qcow2",
        "-b",
        p("base").to_str().unwrap(),
        p("top").to_str().unwrap(),
    ]));
    ok(qemu_img(&[
        "rebase",
        "-F",
        "qcow2",
        "-b",
        p("base").to_str().unwrap(),
        p("top2").to_str().unwrap(),
    ]));
    assert_qemu_check_clean(&p("top"));
    assert_eq!(qemu_raw_content(&p("top"), &p("after.raw")), want);
    assert_eq!(
        qemu_map_without_offsets(&p("top")),
        qemu_map_without_offsets(&p("top2"))
    );
}

#[test]
fn resize_with_preallocation_hides_the_backing_file_per_subcluster() {
    let dir = tempdir();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0xffu8; 1 << 20]).unwrap();
    for mode in ["metadata", "falloc", "full"] {
        let img = dir.path().join(format!("{mode}.qcow2"));
        qemu_create_backed(&img, "extended_l2=on", &base, "raw", "503k");
        ok(rimg(&[
            "resize",
            &format!("--preallocation={mode}"),
            img.to_str().unwrap(),
            "1013k",
        ]));
        assert_qemu_check_clean(&img);
        qemu_io(&img, &["read -P 0xff 0 503k", "read -P 0 503k 510k"]);
    }
}

#[test]
fn measure_counts_extended_entries_as_qemu_img() {
    for args in [
        ["--size", "512M", "-O", "qcow2", "-o", "extended_l2=on"],
        [
            "--size",
            "64G",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=16k,extended_l2=on",
        ],
        ["--size", "1025T", "-O", "qcow2", "-o", "extended_l2=on"],
        [
            "--size",
            "1M",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=8k",
        ],
    ] {
        let a = rimg(&[&["measure"][..], &args[..]].concat());
        let b = qemu_img(&[&["measure"][..], &args[..]].concat());
        assert_eq!(a.status.code(), b.status.code(), "{args:?}");
        assert_eq!(a.stdout, b.stdout, "{args:?}");
        assert_eq!(message(&a.stderr), message(&b.stderr), "{args:?}");
    }
}

#[test]
fn check_finds_the_bitmap_errors_qemu_img_finds() {
    let dir = tempdir();
    let img = dir.path().join("c.qcow2");
    qemu_create(&img, "extended_l2=on", "1M");
    // Cluster #4 gets the L2 table; #1 (unallocated) gets an allocation
    // bit, #4 both bits of subcluster 0.
    qemu_io(&img, &["write -q 256k 1k"]);
    let l2 = 0x40000u64;
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&1u64.to_be_bytes(), l2 + 16 + 8).unwrap();
    f.write_all_at(&((1u64 << 32) | 1).to_be_bytes(), l2 + 4 * 16 + 8)
        .unwrap();
    drop(f);
    let a = rimg(&["check", img.to_str().unwrap()]);
    let b = qemu_img(&["check", img.to_str().unwrap()]);
    assert_eq!(a.status.code(), b.status.code());
    let (ea, eb) = (
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr),
    );
    for msg in [
        "ERROR: Unallocated cluster has non-zero subcluster allocation map",
        "Allocated cluster has corrupted subcluster allocation bitmap",
    ] {
        assert!(eb.contains(msg), "qemu-img: {eb}");
        assert!(ea.contains(msg), "rimg: {ea}");
    }
}

#[test]
fn resize_grows_the_data_file_and_keeps_a_raw_one_mapped() {
    let dir = tempdir();
    for raw in [false, true] {
        let img = dir.path().join(format!("r{raw}.qcow2"));
        let data = dir.path().join(format!("r{raw}.data"));
        let o = data_file_opts(&data, raw);
        qemu_create(&img, &o, "1M");
        ok(rimg(&["resize", img.to_str().unwrap(), "3M"]));
        assert_eq!(std::fs::metadata(&data).unwrap().len(), 3 << 20);
        assert_qemu_check_clean(&img);
        qemu_io(&img, &["write -P 0x77 2500k 100k"]);
        ok(rimg(&[
            "compare",
            img.to_str().unwrap(),
            img.to_str().unwrap(),
        ]));
        if raw {
            let d = std::fs::read(&data).unwrap();
            assert!(d[2500 << 10..2600 << 10].iter().all(|&b| b == 0x77));
            let m = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
            let v: Vec<serde_json::Value> = serde_json::from_slice(&m.stdout).unwrap();
            assert!(
                v.iter().all(|e| e["data"] == true),
                "every cluster mapped: {v:?}"
            );
        }
    }
}

/// Runs `tool` ("rimg" or a program on PATH) in `dir`.
fn in_dir(dir: &Path, tool: &str, args: &[&str]) -> std::process::Output {
    let prog = match tool {
        "rimg" => rimg_tests::workspace_bin("rimg"),
        t => t.into(),
    };
    std::process::Command::new(prog)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} {args:?}: {e}"))
}

/// A relative data file name is relative to the working directory, not
/// to the image (QEMU opens the data file by that name as it is, unlike a
/// backing file): made from the parent directory, `sd/x.qcow2` with
/// `data_file=sd/x.data` keeps its data in `sd/x.data`, and from inside
/// `sd` it does not open. Both ways: each tool makes and writes, the
/// other reads.
#[test]
fn relative_data_file_names_are_relative_to_the_working_directory() {
    let dir = tempdir();
    let d = dir.path();
    std::fs::create_dir(d.join("sd")).unwrap();
    for (maker, reader) in [("qemu-img", "rimg"), ("rimg", "qemu-img")] {
        let (img, data) = (format!("sd/{maker}.qcow2"), format!("sd/{maker}.data"));
        let opts = format!("data_file={data}");
        ok(in_dir(
            d,
            maker,
            &["create", "-q", "-f", "qcow2", "-o", &opts, &img, "1M"],
        ));
        assert!(d.join(&data).is_file(), "{maker} made no {data}");
        assert!(!d.join("sd/sd").exists(), "{maker} made sd/sd");
        // Data written through the image lands in the data file.
        let pattern = d.join("pattern.raw");
        let mut bytes = vec![0x3c; 65536];
        bytes.resize(1 << 20, 0);
        std::fs::write(&pattern, &bytes).unwrap();
        let p = pattern.to_str().unwrap();
        ok(in_dir(
            d,
            maker,
            &["convert", "-n", "-f", "raw", "-O", "qcow2", p, &img],
        ));
        let got = std::fs::read(d.join(&data)).unwrap();
        assert_eq!(
            &got[..65536],
            &[0x3c; 65536][..],
            "{maker}: data not in {data}"
        );
        // The other tool reads it from the same directory...
        let out = d.join(format!("{reader}-read.raw"));
        ok(in_dir(
            d,
            reader,
            &["convert", "-O", "raw", &img, out.to_str().unwrap()],
        ));
        assert_eq!(&std::fs::read(&out).unwrap()[..65536], &[0x3c; 65536][..]);
        // ...and neither opens it from inside `sd`.
        for t in ["rimg", "qemu-img"] {
            let name = format!("{maker}.qcow2");
            let o = in_dir(
                &d.join("sd"),
                t,
                &["convert", "-O", "raw", &name, out.to_str().unwrap()],
            );
            assert!(!o.status.success(), "{t} opened {name} from sd/");
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains(&format!("'{data}'")), "{t}: {err}");
        }
    }
}

/// Preallocation falloc/full with extended L2 entries allocates the data
/// clusters as qemu-img does (their subclusters stay unallocated in the
/// tables, which must not hide the host clusters from preallocation),
/// in the image or in its external data file.
#[test]
fn falloc_and_full_preallocation_allocate_with_subclusters() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempdir();
    let allocated = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    for prealloc in ["falloc", "full"] {
        for data_file in [false, true] {
            let mut sizes = Vec::new();
            for t in ["qemu-img", "rimg"] {
                let img = dir.path().join(format!("{t}-{prealloc}.qcow2"));
                let data = img.with_extension("data");
                let _ = std::fs::remove_file(&data);
                let mut opts = format!("extended_l2=on,preallocation={prealloc}");
                if data_file {
                    opts += &format!(",data_file={}", data.display());
                }
                let i = img.to_str().unwrap();
                ok(rimg_tests::tool(
                    t,
                    &["create", "-q", "-f", "qcow2", "-o", &opts, i, "64M"],
                ));
                assert_qemu_check_clean(&img);
                let stored = if data_file { &data } else { &img };
                sizes.push(allocated(stored));
            }
            let ctx = format!("{prealloc}, data file {data_file}: {sizes:?}");
            assert!(sizes[1] >= 64 << 20, "{ctx}");
            // The same but for metadata blocks (QEMU's header cluster is
            // written whole, ours in part): within one cluster.
            assert!(sizes[0].abs_diff(sizes[1]) <= 65536, "{ctx}");
        }
    }
}

/// Shrinking an image with an external data file: the dropped clusters
/// have no refcounts (they are in the data file), so nothing in the qcow2
/// file may lose one; the data file is cut to the new size. As qemu-img,
/// small clusters (many L2 tables dropped) and large.
#[test]
fn shrinking_with_a_data_file_frees_nothing_in_the_image() {
    let dir = tempdir();
    for (cs, size, new) in [("512", "16M", "32K"), ("65536", "256M", "10M")] {
        let mut imgs = Vec::new();
        for t in ["qemu-img", "rimg"] {
            let img = dir.path().join(format!("{t}-{cs}.qcow2"));
            let data = img.with_extension("data");
            let _ = std::fs::remove_file(&data);
            let opts = format!("cluster_size={cs},data_file={}", data.display());
            qemu_create(&img, &opts, size);
            qemu_io(&img, &[&format!("write -P 0x11 0 {size}")]);
            let out = rimg_tests::tool(t, &["resize", "--shrink", img.to_str().unwrap(), new]);
            let text = ok(out);
            assert!(!text.contains("failed"), "{t} {cs}: {text}");
            assert_qemu_check_clean(&img);
            let want = ok(qemu_img(&["info", "--output=json", img.to_str().unwrap()]));
            assert!(!want.contains("\"corrupt\": true"), "{t} {cs}: {want}");
            let len = std::fs::metadata(&data).unwrap().len();
            assert_eq!(len, imgs_len(new), "{t} {cs}: data file length");
            imgs.push(img);
        }
        rimg_tests::assert_qemu_compare_equal(&imgs[0], &imgs[1]);
    }
}

/// Bytes of a qemu-img size argument ("32K", "10M").
fn imgs_len(s: &str) -> u64 {
    let (n, unit) = s.split_at(s.len() - 1);
    n.parse::<u64>().unwrap() << if unit == "K" { 10 } else { 20 }
}

/// `convert -c` into an image with an external data file fails with
/// both tools, whether or not anything would be compressed (iotest 314
/// with data_file), new target or -n.
#[test]
fn compressed_convert_into_a_data_file_image_fails_as_in_qemu() {
    let dir = tempdir();
    let empty = dir.path().join("empty.raw");
    std::fs::write(&empty, vec![0u8; 1 << 20]).unwrap();
    let data = dir.path().join("data.raw");
    std::fs::write(&data, vec![0x42u8; 1 << 20]).unwrap();
    for src in [&empty, &data] {
        for t in ["qemu-img", "rimg"] {
            let img = dir.path().join(format!("{t}.qcow2"));
            let df = img.with_extension("data");
            let o = format!("data_file={}", df.display());
            let args = ["convert", "-c", "-O", "qcow2", "-o", &o];
            let args: Vec<&str> = args
                .into_iter()
                .chain([src.to_str().unwrap(), img.to_str().unwrap()])
                .collect();
            let out = rimg_tests::tool(t, &args);
            assert_eq!(out.status.code(), Some(1), "{t} {}", src.display());
            qemu_create(&img, &o, "1M");
            let args = [
                "convert",
                "-n",
                "-c",
                "-O",
                "qcow2",
                src.to_str().unwrap(),
                img.to_str().unwrap(),
            ];
            let out = rimg_tests::tool(t, &args);
            assert_eq!(out.status.code(), Some(1), "{t} -n {}", src.display());
        }
    }
}

/// Growing an extended-L2 image with preallocation maps the new clusters
/// as qemu-img's resize does: subclusters unallocated, zero where a longer
/// backing file must not show through (data where falloc/full zeroed the
/// file itself), with or without a data file. An encrypted image's new
/// area reads as zeros (plaintext zeros in the file would decrypt to
/// noise), whatever the mode.
#[test]
fn preallocated_growth_maps_subclusters_as_qemu() {
    let d = tempdir();
    let base = d.path().join("base.raw");
    std::fs::write(&base, vec![7u8; 3 << 20]).unwrap();
    let b = base.to_str().unwrap();
    for data_file in [false, true] {
        for backing in [false, true] {
            for mode in ["metadata", "falloc", "full"] {
                let what = format!("data file {data_file}, backing {backing}, {mode}");
                let mut maps = Vec::new();
                for who in ["qemu-img", "rimg"] {
                    let img = d.path().join(format!("{who}.qcow2"));
                    let data = d.path().join(format!("{who}.data"));
                    let mut o = "extended_l2=on".to_string();
                    if data_file {
                        o += &format!(",data_file={}", data.display());
                    }
                    let i = img.to_str().unwrap();
                    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &o];
                    if backing {
                        args.extend(["-b", b, "-F", "raw"]);
                    }
                    args.extend([i, "1M"]);
                    ok(qemu_img(&args));
                    let p = format!("--preallocation={mode}");
                    let args = ["resize", "-q", &p, i, "2M"];
                    ok(match who {
                        "rimg" => rimg(&args),
                        _ => qemu_img(&args),
                    });
                    assert_qemu_check_clean(&img);
                    maps.push(qemu_map_without_offsets(&img));
                }
                assert_eq!(maps[0], maps[1], "{what}: qemu-img's map, then rimg's");
            }
        }
    }
    let secret = "secret,id=s0,data=pw";
    for backing in [false, true] {
        for mode in ["metadata", "falloc", "full"] {
            let img = d.path().join("enc.qcow2");
            let _ = std::fs::remove_file(&img);
            let i = img.to_str().unwrap();
            let o = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,extended_l2=on";
            let mut args = vec!["create", "-q", "--object", secret, "-f", "qcow2", "-o", o];
            if backing {
                args.extend(["-b", b, "-F", "raw"]);
            }
            args.extend([i, "1M"]);
            ok(qemu_img(&args));
            let spec = format!("driver=qcow2,file.filename={i},encrypt.key-secret=s0");
            let p = format!("--preallocation={mode}");
            ok(rimg(&[
                "resize",
                "-q",
                "--object",
                secret,
                "--image-opts",
                &spec,
                &p,
                "2M",
            ]));
            let out = ok(run_qemu_io_spec(secret, &spec, "read -P 0 1M 1M"));
            assert!(
                !out.contains("verification failed"),
                "encrypted, backing {backing}, {mode}: {out}"
            );
        }
    }
}

fn run_qemu_io_spec(secret: &str, spec: &str, cmd: &str) -> std::process::Output {
    rimg_tests::run(
        "qemu-io",
        &["--object", secret, "--image-opts", spec, "-c", cmd],
    )
}
