//! A raw image whose format was probed, open for writing, keeps probing
//! as raw: a write that would make its first sector another format's
//! header is refused (QEMU's raw driver: EPERM), whatever the write's
//! size and alignment, and whatever the sector held before. The format
//! given explicitly lifts the guard, as in QEMU.

use std::path::PathBuf;
use std::sync::Arc;

use qcow2::{Error, Format, Image, OpenOptions};

struct File(PathBuf);

impl File {
    fn new(name: &str, len: u64) -> File {
        let p = std::env::temp_dir().join(format!("rimg-probed-{name}-{}", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(len).unwrap();
        File(p)
    }

    fn open(&self, format: Option<Format>) -> Arc<dyn Image> {
        let o = OpenOptions {
            writable: true,
            format,
            ..Default::default()
        };
        qcow2::open(&self.0, &o).unwrap()
    }

    fn probe(&self) -> Format {
        qcow2::probe(&self.0).unwrap()
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const QCOW2_MAGIC: &[u8] = b"QFI\xfb\0\0\0\x03";

fn refused(r: qcow2::Result<()>) -> bool {
    matches!(r, Err(Error::FirstSectorFormat))
}

#[test]
fn a_header_in_one_write_is_refused() {
    let f = File::new("whole", 1 << 20);
    let img = f.open(None);
    assert!(img.guards_first_sector());
    let mut sector = vec![0u8; 512];
    sector[..8].copy_from_slice(QCOW2_MAGIC);
    assert!(refused(img.write_at(&sector, 0)));
    // Longer writes too, and headers of QEMU formats rimg does not read.
    let mut big = vec![0u8; 4096];
    big[..4].copy_from_slice(b"QED\0");
    assert!(refused(img.write_at(&big, 0)));
    // Anything else is written, past the first sector included.
    sector[..8].copy_from_slice(b"an MBR..");
    img.write_at(&sector, 0).unwrap();
    img.write_at(QCOW2_MAGIC, 512).unwrap();
    drop(img);
    assert_eq!(f.probe(), Format::Raw);
    let data = std::fs::read(&f.0).unwrap();
    assert_eq!(&data[..8], b"an MBR..");
}

#[test]
fn a_header_built_from_small_writes_is_refused() {
    let f = File::new("pieces", 1 << 20);
    let img = f.open(None);
    // Byte by byte: each write is checked against the sector it makes.
    for (i, &b) in QCOW2_MAGIC.iter().enumerate().skip(1) {
        img.write_at(&[b], i as u64).unwrap();
    }
    assert!(refused(img.write_at(&QCOW2_MAGIC[..1], 0)));
    // A VDI signature lands at 0x40, a write that starts past it may not
    // complete it either.
    img.write_at(&[0x7f, 0x10], 0x40).unwrap();
    assert!(refused(img.write_at(&[0xda, 0xbe], 0x42)));
    drop(img);
    assert_eq!(f.probe(), Format::Raw);
}

/// A zero can complete a magic or end a comment line, so zeroing and
/// discarding are checked too; whole sectors of zeros always pass.
#[test]
fn zeroing_that_would_make_a_header_is_refused() {
    let f = File::new("zeros", 1 << 20);
    let img = f.open(None);
    img.write_at(b"data", 0).unwrap();
    img.write_zeroes(0, 4096, false).unwrap();
    img.write_zeroes(0, 512, true).unwrap();
    img.discard(0, 1 << 20).unwrap();
    // "QEDx" is no format; its last byte zeroed, it is QED's magic.
    img.write_at(b"QEDx", 0).unwrap();
    assert!(refused(img.write_zeroes(3, 1, false)));
    assert!(refused(img.write_zeroes(3, 1, true)));
    assert!(refused(img.discard(3, 1)));
    // A line that stops a VMDK descriptor's probe, made part of the
    // comment before it by zeroing the newline between them.
    img.write_at(b"#\nX\nversion=1\n", 0).unwrap();
    assert!(refused(img.write_zeroes(1, 1, false)));
    // Zeroing the whole sector, or past it, is fine.
    img.write_zeroes(0, 512, false).unwrap();
    img.discard(512, 4096).unwrap();
    drop(img);
    assert_eq!(f.probe(), Format::Raw);
}

#[test]
fn a_file_shorter_than_a_sector_is_guarded_as_zero_padded() {
    let f = File::new("short", 100);
    let img = f.open(None);
    assert!(refused(img.write_at(&QCOW2_MAGIC[..4], 0)));
    img.write_at(b"text", 96).unwrap();
    drop(img);
    assert_eq!(std::fs::read(&f.0).unwrap().len(), 100);
}

#[test]
fn the_split_data_path_refuses_the_first_sector_only() {
    let f = File::new("split", 1 << 20);
    let img = f.open(None);
    assert!(img.clone().begin_write(0, 512).is_err());
    assert!(img.clone().begin_write(511, 2).is_err());
    drop(img.clone().begin_write(512, 512).unwrap());
}

#[test]
fn a_given_format_or_a_read_only_open_is_not_guarded() {
    let f = File::new("given", 1 << 20);
    let img = f.open(Some(Format::Raw));
    assert!(!img.guards_first_sector());
    img.write_at(QCOW2_MAGIC, 0).unwrap();
    drop(img);
    // Now it probes as qcow2 (and is no valid one): what the guard keeps
    // a probed image from becoming.
    assert_eq!(f.probe(), Format::Qcow2);
    let g = File::new("readonly", 1 << 20);
    let o = OpenOptions::default();
    assert!(!qcow2::open(&g.0, &o).unwrap().guards_first_sector());
}

/// Writers racing on the first sector each see the sector as the others
/// left it: two halves of a magic written at once never both pass.
#[test]
fn racing_halves_of_a_magic_never_both_land() {
    use std::sync::Barrier;
    let f = File::new("race", 1 << 20);
    let img = f.open(None);
    img.write_at(&QCOW2_MAGIC[4..], 4).unwrap();
    let start = Arc::new(Barrier::new(2));
    for round in 0..2000 {
        img.write_zeroes(0, 4, false).unwrap();
        let half = |img: &Arc<dyn Image>, at: usize| {
            let (img, start) = (img.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                img.write_at(&QCOW2_MAGIC[at..at + 2], at as u64)
            })
        };
        let (t1, t2) = (half(&img, 0), half(&img, 2));
        let (r1, r2) = (t1.join().unwrap(), t2.join().unwrap());
        assert!(
            refused(r1) || refused(r2),
            "round {round}: both halves written"
        );
    }
    drop(img);
    assert_eq!(f.probe(), Format::Raw);
}

/// A file QEMU would open as a format rimg does not read is refused,
/// not read (or served) as raw bytes.
#[test]
fn formats_rimg_does_not_read_are_refused_when_probed() {
    let f = File::new("qed", 1 << 20);
    let o = OpenOptions {
        format: Some(Format::Raw),
        writable: true,
        ..Default::default()
    };
    qcow2::open(&f.0, &o)
        .unwrap()
        .write_at(b"QED\0", 0)
        .unwrap();
    let e = qcow2::open(&f.0, &OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains("qed format"), "{e}");
    assert!(qcow2::probe(&f.0).is_err());
}
