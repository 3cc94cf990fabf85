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

/// Writes and zeroings through the engine, against a model of the disk:
/// 200 pieces of 1 byte to 3 MiB at offsets and contents from `seed`
/// (every fifth a write-zeroes with unmap), then 0x77 over the last
/// sector; a write past the end must fail. Returns the model.
pub fn scattered_writes(img: &dyn Image, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let size = img.size();
    let mut model = vec![0u8; size as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..200 {
        let len = rng.random_range(1..(3u64 << 20).min(size));
        let off = rng.random_range(0..size - len);
        let range = off as usize..(off + len) as usize;
        if i % 5 == 4 {
            img.write_zeroes(off, len, true).unwrap();
            model[range].fill(0);
        } else {
            let mut b = vec![0u8; len as usize];
            rng.fill(&mut b[..]);
            img.write_at(&b, off).unwrap();
            model[range].copy_from_slice(&b);
        }
    }
    img.write_at(&[0x77; 512], size - 512).unwrap();
    model[size as usize - 512..].fill(0x77);
    assert!(img.write_at(&[1; 2], size - 1).is_err());
    model
}
