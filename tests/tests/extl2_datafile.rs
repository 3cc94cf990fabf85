//! Extended L2 entries (subclusters) and external data files, with QEMU
//! as the judge: images QEMU made read by us, images we wrote checked by
//! `qemu-img check` and read back by QEMU, and subcluster-granular writes
//! over a backing file compared with what QEMU reads.

use std::path::Path;

use qcow2::{open, Image, OpenOptions};
use rimg_tests::{assert_qemu_check_clean, qemu_img, qemu_io, qemu_raw_content, tempdir};

fn ok(o: std::process::Output) {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn rw(img: &Path) -> std::sync::Arc<dyn Image> {
    open(
        img,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap()
}

fn read_all(img: &dyn Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

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

#[test]
fn subcluster_writes_over_a_backing_file_read_as_qemu_reads_them() {
    let dir = tempdir();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    std::fs::write(&base, vec![0xffu8; 1 << 20]).unwrap();
    let o = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-F",
        "raw",
        "-b",
        base.to_str().unwrap(),
        top.to_str().unwrap(),
        "1M",
    ]);
    ok(o);
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
    let rimg = rimg_tests::workspace_bin("rimg");
    let o = std::process::Command::new(&rimg)
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=32k",
        ])
        .arg(&img_path)
        .arg("3M")
        .output()
        .unwrap();
    ok(o);
    let info = qemu_img(&["info", img_path.to_str().unwrap()]);
    ok(info.clone());
    assert!(String::from_utf8_lossy(&info.stdout).contains("extended l2: true"));
    let mut model = vec![0u8; 3 << 20];
    {
        let img = rw(&img_path);
        scribble(img.as_ref(), &mut model, 3);
    }
    assert_qemu_check_clean(&img_path);
    assert_eq!(
        qemu_raw_content(&img_path, &dir.path().join("x.raw")),
        model
    );
}

#[test]
fn data_file_images_we_write_read_the_same_in_qemu() {
    let dir = tempdir();
    let rimg = rimg_tests::workspace_bin("rimg");
    for raw in [false, true] {
        let img_path = dir.path().join(format!("d{raw}.qcow2"));
        let data = dir.path().join(format!("d{raw}.data"));
        let opts = format!(
            "data_file={}{}",
            data.display(),
            if raw { ",data_file_raw=on" } else { "" }
        );
        let o = std::process::Command::new(&rimg)
            .args(["create", "-q", "-f", "qcow2", "-o", &opts])
            .arg(&img_path)
            .arg("2M")
            .output()
            .unwrap();
        ok(o);
        let info = qemu_img(&["info", img_path.to_str().unwrap()]);
        ok(info.clone());
        let text = String::from_utf8_lossy(&info.stdout).to_string();
        assert!(
            text.contains(&format!("data file: {}", data.display())),
            "{text}"
        );
        assert!(text.contains(&format!("data file raw: {raw}")), "{text}");
        let mut model = vec![0u8; 2 << 20];
        {
            let img = rw(&img_path);
            scribble(img.as_ref(), &mut model, 11);
        }
        assert_qemu_check_clean(&img_path);
        assert_eq!(
            qemu_raw_content(&img_path, &dir.path().join("d.raw")),
            model
        );
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
    let o = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("extended_l2=on,data_file={}", data.display()),
        img_path.to_str().unwrap(),
        "1M",
    ]);
    ok(o);
    qemu_io(
        &img_path,
        &[
            "write -P 0x5a 0 3k",
            "write -P 0x6b 70k 100k",
            "write -z 80k 4k",
        ],
    );
    let want = qemu_raw_content(&img_path, &dir.path().join("q.raw"));
    let mut model = want.clone();
    {
        let img = rw(&img_path);
        assert_eq!(read_all(img.as_ref()), want);
        scribble(img.as_ref(), &mut model, 5);
    }
    assert_qemu_check_clean(&img_path);
    assert_eq!(
        qemu_raw_content(&img_path, &dir.path().join("q2.raw")),
        model
    );
}

#[test]
fn amend_renames_the_data_file_and_clears_the_raw_bit() {
    let dir = tempdir();
    let rimg = rimg_tests::workspace_bin("rimg");
    let img_path = dir.path().join("a.qcow2");
    let data = dir.path().join("a.data");
    let moved = dir.path().join("b.data");
    ok(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={},data_file_raw=on", data.display()),
        img_path.to_str().unwrap(),
        "1M",
    ]));
    qemu_io(&img_path, &["write -P 0x42 0 100k"]);
    std::fs::copy(&data, &moved).unwrap();
    let o = std::process::Command::new(&rimg)
        .args(["amend", "-o"])
        .arg(format!("data_file={},data_file_raw=off", moved.display()))
        .arg(&img_path)
        .output()
        .unwrap();
    ok(o);
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
    let o = std::process::Command::new(&rimg)
        .args(["amend", "-o", "data_file_raw=on"])
        .arg(&img_path)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let q = qemu_img(&[
        "amend",
        "-o",
        "data_file_raw=on",
        img_path.to_str().unwrap(),
    ]);
    let tail = |e: &[u8]| {
        let s = String::from_utf8_lossy(e).to_string();
        s.split_once(": ").map(|x| x.1.to_string()).unwrap_or(s)
    };
    assert_eq!(tail(&o.stderr), tail(&q.stderr));
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
    ok(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536,extended_l2=on",
        img_path.to_str().unwrap(),
        "4M",
    ]));
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

fn rimg(args: &[&str]) -> std::process::Output {
    std::process::Command::new(rimg_tests::workspace_bin("rimg"))
        .args(args)
        .output()
        .unwrap()
}

/// `qemu-img map --output=json` without host offsets (allocation order
/// may differ).
fn map_shape(img: &Path) -> Vec<serde_json::Value> {
    let o = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
    ok(o.clone());
    let mut v: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    for e in &mut v {
        e.as_object_mut().unwrap().remove("offset");
    }
    v
}

#[test]
fn rebase_allocates_only_the_differing_subclusters_as_qemu_img() {
    let dir = tempdir();
    let p = |n: &str| dir.path().join(n);
    let opts = "cluster_size=1M,extended_l2=on";
    ok(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        p("base").to_str().unwrap(),
        "1M",
    ]));
    for (img, back) in [("mid", "base"), ("top", "mid")] {
        ok(qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-F",
            "qcow2",
            "-b",
            p(back).to_str().unwrap(),
            p(img).to_str().unwrap(),
            "1M",
        ]));
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
    assert_eq!(map_shape(&p("top")), map_shape(&p("top2")));
}

#[test]
fn resize_with_preallocation_hides_the_backing_file_per_subcluster() {
    let dir = tempdir();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0xffu8; 1 << 20]).unwrap();
    for mode in ["metadata", "falloc", "full"] {
        let img = dir.path().join(format!("{mode}.qcow2"));
        ok(qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-F",
            "raw",
            "-b",
            base.to_str().unwrap(),
            img.to_str().unwrap(),
            "503k",
        ]));
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
        let strip = |e: &[u8]| {
            let s = String::from_utf8_lossy(e).to_string();
            s.split_once(": ").map(|x| x.1.to_string()).unwrap_or(s)
        };
        assert_eq!(strip(&a.stderr), strip(&b.stderr), "{args:?}");
    }
}

#[test]
fn check_finds_the_bitmap_errors_qemu_img_finds() {
    let dir = tempdir();
    let img = dir.path().join("c.qcow2");
    ok(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        img.to_str().unwrap(),
        "1M",
    ]));
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
        let o = format!(
            "data_file={}{}",
            data.display(),
            if raw { ",data_file_raw=on" } else { "" }
        );
        ok(qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &o,
            img.to_str().unwrap(),
            "1M",
        ]));
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
