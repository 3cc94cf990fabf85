//! A random workload through the library against a shadow model: 10,000
//! operations per configuration (unaligned and cluster-straddling writes,
//! write-zeroes with and without unmap, discards, verified reads, flushes
//! and reopens) on a 1 GiB qcow2 image, cluster sizes 512 B and 64 KiB,
//! with and without a backing file. The model is a sparse raw file written
//! with the same operations; at the end `qemu-img check` must be clean and
//! `qemu-img compare` must find the model and the image identical.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use qcow2::{Image, OpenOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, qemu_img, qemu_overlay, run, tempdir,
};

const SIZE: u64 = 1 << 30;
const OPS: usize = 10_000;

fn open_rw(p: &Path) -> Arc<dyn Image> {
    qcow2::open(
        p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .expect("open")
}

fn model_read(m: &File, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = m.read_at(&mut v[done..], off + done as u64).unwrap();
        if n == 0 {
            break; // past the model's end: zeros
        }
        done += n;
    }
    v
}

/// Offset and length: mostly small and unaligned, sometimes large.
fn range(rng: &mut StdRng, big: u64) -> (u64, u64) {
    let len = match rng.random_range(0..20) {
        0..=13 => rng.random_range(1..=8192),
        14..=18 => rng.random_range(1..=128 << 10),
        _ => rng.random_range(1..=big),
    };
    let off = rng.random_range(0..SIZE - len);
    // Half the time, straddle a 64 KiB boundary on purpose.
    let off = if rng.random_bool(0.5) && len > 1 {
        let b = (off | 0xffff) + 1;
        (b - rng.random_range(1..len.min(b))).min(SIZE - len)
    } else {
        off
    };
    (off, len)
}

fn workload(cluster: u32, backing: bool, seed: u64) {
    let d = tempdir();
    let img = d.path().join("disk.qcow2");
    let model_path = d.path().join("model.raw");
    let opts = format!("cluster_size={cluster}");
    if backing {
        let base = d.path().join("base.qcow2");
        let b = base.to_str().unwrap();
        let o = qemu_img(&["create", "-q", "-f", "qcow2", b, "1G"]);
        assert!(o.status.success());
        let o = run(
            "qemu-io",
            &[
                "-c",
                "write -P 0x5a 0 4M",
                "-c",
                "write -P 0xa5 300M 8M",
                "-c",
                "write -c -P 0x3c 700M 1M",
                "-c",
                "write -P 0x77 1020M 4M",
                b,
            ],
        );
        assert!(o.status.success());
        qemu_overlay(&img, "base.qcow2", &[&opts]);
        let o = qemu_img(&["convert", "-O", "raw", b, model_path.to_str().unwrap()]);
        assert!(o.status.success());
    } else {
        let o = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            img.to_str().unwrap(),
            "1G",
        ]);
        assert!(o.status.success());
        File::create(&model_path).unwrap().set_len(SIZE).unwrap();
    }
    let model = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&model_path)
        .unwrap();

    let mut rng = StdRng::seed_from_u64(seed);
    let mut image = open_rw(&img);
    let ctx = |i: usize| format!("cluster {cluster} backing {backing} seed {seed} op {i}");
    for i in 0..OPS {
        match rng.random_range(0..100) {
            0..=44 => {
                let (off, len) = range(&mut rng, 1 << 20);
                let fill: u64 = rng.random();
                let data: Vec<u8> = (0..len)
                    .map(|k| (fill >> ((k % 8) * 8)) as u8 ^ k as u8)
                    .collect();
                image
                    .write_at(&data, off)
                    .unwrap_or_else(|e| panic!("{}: write: {e}", ctx(i)));
                model.write_all_at(&data, off).unwrap();
            }
            45..=54 => {
                let (off, len) = range(&mut rng, 2 << 20);
                let unmap = rng.random_bool(0.5);
                image
                    .write_zeroes(off, len, unmap)
                    .unwrap_or_else(|e| panic!("{}: write_zeroes: {e}", ctx(i)));
                model.write_all_at(&vec![0u8; len as usize], off).unwrap();
            }
            55..=59 => {
                // Discarded bytes read back as before or as zeros; the
                // model takes what the image now says.
                let (off, len) = range(&mut rng, 2 << 20);
                let before = model_read(&model, off, len as usize);
                image
                    .discard(off, len)
                    .unwrap_or_else(|e| panic!("{}: discard: {e}", ctx(i)));
                let mut after = vec![0u8; len as usize];
                image.read_at(&mut after, off).unwrap();
                for (k, (a, b)) in after.iter().zip(&before).enumerate() {
                    assert!(
                        a == b || *a == 0,
                        "{}: discarded byte {} reads neither old data nor zero",
                        ctx(i),
                        off + k as u64
                    );
                }
                model.write_all_at(&after, off).unwrap();
            }
            60..=96 => {
                let (off, len) = range(&mut rng, 512 << 10);
                let mut got = vec![0u8; len as usize];
                image
                    .read_at(&mut got, off)
                    .unwrap_or_else(|e| panic!("{}: read: {e}", ctx(i)));
                let want = model_read(&model, off, len as usize);
                if got != want {
                    let k = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                    panic!("{}: read mismatch at byte {}", ctx(i), off + k as u64);
                }
            }
            97..=98 => image.flush().unwrap(),
            _ => {
                image.flush().unwrap();
                drop(image);
                image = open_rw(&img);
            }
        }
    }
    image.flush().unwrap();
    drop(image);
    assert_qemu_check_clean(&img);
    assert_qemu_compare_equal(&model_path, &img);
}

#[test]
fn workload_64k_clusters() {
    workload(65536, false, 1);
}

#[test]
fn workload_64k_clusters_backing() {
    workload(65536, true, 2);
}

#[test]
fn workload_512b_clusters() {
    workload(512, false, 3);
}

#[test]
fn workload_512b_clusters_backing() {
    workload(512, true, 4);
}
