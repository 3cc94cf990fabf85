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
