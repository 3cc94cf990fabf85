//! The rimg engine as the tests drive it directly (not through the CLI).

use std::path::Path;
use std::sync::Arc;

use qcow2::encrypt::Secret;
use qcow2::{open, Image, OpenOptions, Qcow2Options};

/// Opens `img` for writing with default options; panics if it cannot.
pub fn open_rw(img: &Path) -> Arc<dyn Image> {
    open(
        img,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", img.display()))
}

/// Opens an encrypted image (qcow2 with LUKS or AES, or a luks volume)
/// with password `pw`.
pub fn open_with_key(img: &Path, pw: &str, writable: bool) -> qcow2::Result<Arc<dyn Image>> {
    open(
        img,
        &OpenOptions {
            writable,
            qcow2: Qcow2Options {
                encrypt_key: Some(Secret(pw.as_bytes().to_vec())),
                ..Default::default()
            },
            ..Default::default()
        },
    )
}

/// The whole guest content of `img`.
pub fn read_all(img: &dyn Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

/// Threads racing to allocate the same new units of `img`: 8 threads
/// write interleaved 4 KiB pieces (piece i holds byte i % 8 + 1) of
/// `units` units of `unit` bytes, each thread starting on another unit
/// (offset by `round`). Asserts every piece reads back, and returns the
/// disk's content. Whether each unit was allocated once is the caller's
/// to judge from the file.
pub fn race_new_units(img: &Arc<dyn Image>, units: u64, unit: u64, round: u64) -> Vec<u8> {
    const THREADS: u64 = 8;
    const PIECE: u64 = 4096;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            s.spawn(move || {
                for k in 0..units {
                    let u = (k + t * 3 + round) % units;
                    let mut piece = u * unit + t * PIECE;
                    while piece < (u + 1) * unit {
                        img.write_at(&[t as u8 + 1; PIECE as usize], piece).unwrap();
                        piece += THREADS * PIECE;
                    }
                }
            });
        }
    });
    let got = read_all(img.as_ref());
    for (i, chunk) in got.chunks(PIECE as usize).enumerate() {
        let want = (i as u64 % THREADS) as u8 + 1;
        assert!(chunk.iter().all(|&x| x == want), "round {round}: piece {i}");
    }
    got
}
