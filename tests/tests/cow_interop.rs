//! Copy-on-write against images QEMU made: clusters and L2 tables shared
//! with an internal snapshot (refcount > 1, COPIED clear), compressed
//! clusters (zlib and zstd), preallocated zero clusters, and L1 growth on
//! resize. After our writes `qemu-img check` must be clean (it verifies
//! refcounts and COPIED flags), the snapshot must still read as before,
//! and the current content must match what we wrote.

use std::path::Path;

use qcow2::{open, Image, OpenOptions};
use rimg_tests::{assert_qemu_check_clean, qemu_img, qemu_io, tempdir};

fn to_raw(img: &Path, out: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let mut args = vec!["convert", "-O", "raw"];
    if let Some(s) = snapshot {
        args.extend(["-l", s]);
    }
    args.extend([img.to_str().unwrap(), out.to_str().unwrap()]);
    let o = qemu_img(&args);
    assert!(
        o.status.success(),
        "convert: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read(out).unwrap()
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

/// Unaligned writes that hit the head, middle and tail of clusters and
/// straddle cluster and L2-table boundaries.
fn scribble(img: &dyn Image, model: &mut [u8], cs: u64, seed: u8) {
    let spots = [
        (0u64, 1usize),
        (cs - 100, 300),
        (3 * cs + 17, 5000),
        (10 * cs, cs as usize),
        (20 * cs - 1, 2),
        ((1 << 20) - 333, 1000),
        ((2 << 20) + 4095, 3 * cs as usize + 7),
    ];
    for (k, &(off, len)) in spots.iter().enumerate() {
        let buf: Vec<u8> = (0..len)
            .map(|i| seed.wrapping_add(k as u8).wrapping_mul(31) ^ (i as u8))
            .collect();
        img.write_at(&buf, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&buf);
    }
}

#[test]
fn writes_over_snapshot_shared_clusters() {
    let dir = tempdir();
    for cs in [512u64, 65536] {
        let img = dir.path().join(format!("snap-{cs}.qcow2"));
        let o = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cs}"),
            img.to_str().unwrap(),
            "8M",
        ]);
        assert!(o.status.success());
        qemu_io(&img, &["write -P 0x11 0 3M", "write -P 0x22 5M 100k"]);
        let o = qemu_img(&["snapshot", "-c", "snap1", img.to_str().unwrap()]);
        assert!(o.status.success());
        let before = to_raw(&img, &dir.path().join("before.raw"), None);
        let mut model = before.clone();
        {
            let i = rw(&img);
            scribble(i.as_ref(), &mut model, cs, 1);
            // Write the same clusters twice: the second write goes in place.
            scribble(i.as_ref(), &mut model, cs, 2);
            i.write_zeroes(5 << 20, 64 << 10, true).unwrap();
            model[5 << 20..(5 << 20) + (64 << 10)].fill(0);
            i.flush().unwrap();
        }
        assert_qemu_check_clean(&img);
        assert_eq!(
            to_raw(&img, &dir.path().join("now.raw"), None),
            model,
            "current content, cluster {cs}"
        );
        assert_eq!(
            to_raw(&img, &dir.path().join("snap.raw"), Some("snap1")),
            before,
            "snapshot content, cluster {cs}"
        );
        // Deleting the snapshot drops its references: refcounts must then
        // match exactly what the active L1 uses.
        let o = qemu_img(&["snapshot", "-d", "snap1", img.to_str().unwrap()]);
        assert!(o.status.success());
        assert_qemu_check_clean(&img);
    }
}

#[test]
fn writes_over_compressed_clusters() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    let pattern: Vec<u8> = (0..(4u32 << 20))
        .map(|i| ((i / 1000) % 7) as u8 * 3)
        .collect();
    std::fs::write(&src, &pattern).unwrap();
    for ct in ["zlib", "zstd"] {
        let img = dir.path().join(format!("c-{ct}.qcow2"));
        let o = qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ct}"),
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let map = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
        assert!(
            String::from_utf8_lossy(&map.stdout).contains("\"compressed\": true"),
            "fixture is compressed"
        );
        let mut model = pattern.clone();
        {
            let i = rw(&img);
            let mut buf = vec![0u8; 4 << 20];
            i.read_at(&mut buf, 0).unwrap();
            assert_eq!(buf, pattern, "{ct}: compressed read");
            scribble(i.as_ref(), &mut model, 65536, 7);
            i.flush().unwrap();
        }
        assert_qemu_check_clean(&img);
        assert_eq!(
            to_raw(&img, &dir.path().join("now.raw"), None),
            model,
            "{ct}"
        );
    }
}

#[test]
fn writes_into_preallocated_zero_clusters() {
    let dir = tempdir();
    let img = dir.path().join("z.qcow2");
    let o = qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    assert!(o.status.success());
    // Zero clusters that keep their host cluster, and ones that do not.
    qemu_io(
        &img,
        &["write -P 0x5 0 4M", "write -z 0 1M", "write -z -u 2M 1M"],
    );
    let mut model = to_raw(&img, &dir.path().join("a.raw"), None);
    {
        let i = rw(&img);
        scribble(i.as_ref(), &mut model, 65536, 9);
        i.flush().unwrap();
    }
    assert_qemu_check_clean(&img);
    assert_eq!(to_raw(&img, &dir.path().join("b.raw"), None), model);
}

#[test]
fn resize_grows_l1_table() {
    let dir = tempdir();
    let img = dir.path().join("g.qcow2");
    // 512-byte clusters: each L1 entry covers 32 KiB, so growing from
    // 1 MiB to 64 MiB needs a larger L1 table in new clusters.
    let o = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        img.to_str().unwrap(),
        "1M",
    ]);
    assert!(o.status.success());
    qemu_io(&img, &["write -P 0x3 1000 20k"]);
    let mut model = to_raw(&img, &dir.path().join("a.raw"), None);
    {
        let i = rw(&img);
        i.resize(64 << 20).unwrap();
        model.resize(64 << 20, 0);
        let buf = vec![0xeeu8; 70000];
        i.write_at(&buf, (64 << 20) - 70000).unwrap();
        model[(64 << 20) - 70000..].copy_from_slice(&buf);
        i.flush().unwrap();
    }
    assert_qemu_check_clean(&img);
    let info = qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["virtual-size"], 64 << 20);
    assert_eq!(to_raw(&img, &dir.path().join("b.raw"), None), model);
}
