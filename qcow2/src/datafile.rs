//! External data files (qcow2.rst, "External data file name" header
//! extension, incompatible bit 2 and autoclear bit 1 "raw external data").
//!
//! Guest data of such an image lives in another file, always at the host
//! offset equal to the guest offset: data clusters take no space and no
//! refcounts in the qcow2 file, and compressed clusters are impossible.
//! With the raw bit, the data file alone is a valid raw image of the disk.

use std::path::Path;

use crate::error::{Error, Result};
use crate::header::Header;
use crate::paths::resolve_data_file;
use crate::storage::Storage;

/// The open external data file of an image.
#[derive(Debug)]
pub struct DataFile {
    pub st: Storage,
    /// The name as stored in the header extension.
    pub name: String,
    /// The data file is kept a raw image of the disk (autoclear bit 1).
    pub raw: bool,
}

impl DataFile {
    /// Opens the data file named by the image's header `h` (a relative
    /// name from the working directory, as QEMU opens it:
    /// [`resolve_data_file`]),
    /// or `given` in its place (QEMU's `data-file` option, which also
    /// opens an image whose header lost the name), or None when the image
    /// has none.
    pub fn open_for(h: &Header, writable: bool, given: Option<&Path>) -> Result<Option<DataFile>> {
        if !h.has_data_file() {
            return Ok(None);
        }
        let name = h.data_file();
        let path = match (given, &name) {
            (Some(p), _) => p.to_path_buf(),
            (None, Some(n)) => resolve_data_file(n),
            (None, None) => {
                return Err(Error::InvalidArgument(
                    "'data-file' is required for this image".into(),
                ))
            }
        };
        let name = name.unwrap_or_default();
        let st = Storage::open(&path, writable)?;
        Ok(Some(DataFile {
            st,
            name,
            raw: h.data_file_raw(),
        }))
    }
}
