//! The split data path's guards end what they began when dropped: a
//! write guard dropped uncommitted rolls its allocation back (the
//! clusters leave the in-flight set, its data never becomes visible), an
//! in-place write guard stops counting itself on its clusters, and an
//! epoch guard ends its epoch.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::encrypt::Secret;
use qcow2::{AllocWaker, CreateOptions, Error, HostOffset, Image, Mapping, OpenOptions};

const CS: u64 = 65536;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("rimg-guards-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn create(p: &Path, format: qcow2::Format) {
    match format {
        qcow2::Format::Qcow2 => {
            let o = CreateOptions {
                size: 16 << 20,
                cluster_size: CS,
                ..CreateOptions::default()
            };
            qcow2::create(p, &o).unwrap();
        }
        qcow2::Format::Raw => {
            std::fs::File::create(p).unwrap().set_len(16 << 20).unwrap();
        }
        qcow2::Format::Luks => {
            let params = qcow2::luks::LuksParams {
                iter_time_ms: 10,
                ..Default::default()
            };
            qcow2::create_luks(p, 16 << 20, &params, &Secret(KEY.to_vec())).unwrap();
        }
        f @ (qcow2::Format::Vdi
        | qcow2::Format::Vpc
        | qcow2::Format::Vmdk
        | qcow2::Format::Vhdx) => {
            panic!("rimg does not write {} images", f.name())
        }
    }
}

const KEY: &[u8] = b"guards";

fn open(p: &Path) -> Arc<dyn Image> {
    qcow2::open(
        p,
        &OpenOptions {
            writable: true,
            qcow2: qcow2::Qcow2Options {
                encrypt_key: Some(Secret(KEY.to_vec())),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap()
}

/// Counts nothing: a refused write would register it and return None.
struct NoWake;

impl AllocWaker for NoWake {
    fn wake(&self) {}
}

fn qemu_img_check(p: &Path) {
    let o = std::process::Command::new("qemu-img")
        .args(["check", p.to_str().unwrap()])
        .output()
        .expect("qemu-img");
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn dropped_allocating_write_rolls_back() {
    let dir = Dir::new("alloc");
    let p = dir.0.join("t.qcow2");
    create(&p, qcow2::Format::Qcow2);
    let img = open(&p);
    let waker: Arc<dyn AllocWaker> = Arc::new(NoWake);

    // Guest cluster 1 is unallocated: the write allocates it.
    let w = img.clone().begin_write(CS, 4096).unwrap();
    assert_eq!(w.len(), 4096);
    let state = img.alloc_state().unwrap();
    assert!(state.contains("clusters being allocated [1]"), "{state}");
    // While it is in flight another write to the cluster is refused.
    assert!(img
        .clone()
        .try_begin_write(CS + 8192, 4096, &waker)
        .unwrap()
        .is_none());
    // Its data lands, but it is never committed.
    img.data_storage()
        .write_data_at(&[0xaa; 4096], w.host().0)
        .unwrap();
    drop(w);

    let state = img.alloc_state().unwrap();
    assert!(state.contains("clusters being allocated []"), "{state}");
    let mut buf = vec![0u8; CS as usize];
    img.read_at(&mut buf, CS).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "rolled-back data is visible");
    assert_eq!(img.map_read(CS, CS).unwrap().0, Mapping::Unallocated);

    // Another write to the cluster proceeds and commits.
    let w2 = img
        .clone()
        .try_begin_write(CS + 8192, 4096, &waker)
        .unwrap()
        .expect("the cluster is no longer in flight");
    img.data_storage()
        .write_data_at(&[0xbb; 4096], w2.host().0)
        .unwrap();
    w2.commit().unwrap();
    img.read_at(&mut buf, CS).unwrap();
    assert!(buf[..8192].iter().all(|&b| b == 0), "rolled-back data");
    assert!(buf[8192..12288].iter().all(|&b| b == 0xbb));
    assert!(buf[12288..].iter().all(|&b| b == 0));
    img.flush().unwrap();
    drop(img);
    qemu_img_check(&p);
}

#[test]
fn dropped_inplace_write_ends_its_count() {
    let dir = Dir::new("inplace");
    let p = dir.0.join("t.qcow2");
    create(&p, qcow2::Format::Qcow2);
    let img = open(&p);
    img.write_at(&[0x11; CS as usize], CS).unwrap();
    let waker: Arc<dyn AllocWaker> = Arc::new(NoWake);
    let zero = || qcow2::sync::without_blocking(&waker, || img.write_zeroes(CS, CS, false));

    let w = img.clone().begin_write(CS, 512).unwrap();
    // Write-zeroes keeping the host cluster waits for the in-place write.
    assert!(matches!(zero(), Err(Error::WouldBlock)));
    drop(w);
    zero().unwrap();
    let mut buf = vec![0u8; CS as usize];
    img.read_at(&mut buf, CS).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    img.flush().unwrap();
    drop(img);
    qemu_img_check(&p);
}

#[test]
fn dropped_epoch_guard_ends_its_epoch() {
    let dir = Dir::new("epoch");
    let p = dir.0.join("t.qcow2");
    create(&p, qcow2::Format::Qcow2);
    let img = open(&p);
    let held = |n: u32| {
        let state = img.alloc_state().unwrap();
        assert!(state.contains(&format!("I/O epochs held {n};")), "{state}");
    };
    let a = img.io_epoch();
    let b = img.io_epoch();
    held(2);
    drop(a);
    held(1);
    drop(b);
    held(0);
}

#[test]
fn raw_maps_identity_and_needs_no_ending() {
    let dir = Dir::new("raw");
    let p = dir.0.join("t.raw");
    create(&p, qcow2::Format::Raw);
    let img = open(&p);
    assert_eq!(img.cluster_size(), None);
    assert!(img.alloc_state().is_none());
    let _epoch = img.io_epoch();
    assert_eq!(
        img.map_read(4096, 1 << 20).unwrap(),
        (Mapping::Data(HostOffset(4096)), 1 << 20)
    );
    let w = img.clone().begin_write(8192, 4096).unwrap();
    assert_eq!((w.host(), w.len()), (HostOffset(8192), 4096));
    img.data_storage()
        .write_at(&[0xcc; 4096], w.host().0)
        .unwrap();
    w.commit().unwrap();
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 8192).unwrap();
    assert!(buf.iter().all(|&b| b == 0xcc));
    assert!(matches!(
        img.write_compressed(0, &[0; 4096]),
        Err(Error::NotSupportedByFormat(_))
    ));
    assert!(img.clone().begin_write(16 << 20, 1).is_err());
}

/// Encrypted data has no host range a caller could move in clear: the
/// split data path refuses it, the whole-request path works.
#[test]
fn encrypted_images_refuse_the_split_data_path() {
    let dir = Dir::new("luks");
    let p = dir.0.join("t.luks");
    create(&p, qcow2::Format::Luks);
    let img = open(&p);
    assert_eq!(img.format(), qcow2::Format::Luks);
    assert!(!img.data_in_clear());
    assert!(matches!(
        img.map_read(0, 4096),
        Err(Error::NotSupportedByFormat(_))
    ));
    assert!(img.clone().begin_write(0, 4096).is_err());
    let waker: Arc<dyn AllocWaker> = Arc::new(NoWake);
    assert!(img.clone().try_begin_write(0, 4096, &waker).is_err());
    img.write_at(&[0x5a; 4096], 4096).unwrap();
    let mut buf = vec![0u8; 4096];
    img.read_mapped(Mapping::Data(HostOffset(0)), &mut buf, 4096)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    // The payload on disk is not the guest's bytes.
    let raw = std::fs::read(&p).unwrap();
    assert!(!raw.chunks(512).any(|c| c.iter().all(|&b| b == 0x5a)));
    let q = dir.0.join("t.qcow2");
    create(&q, qcow2::Format::Qcow2);
    assert!(open(&q).data_in_clear());
}
