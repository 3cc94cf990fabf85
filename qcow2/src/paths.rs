//! File names as QEMU reads them: the `file:` protocol prefix, backing
//! file names relative to the image that names them, and data file names
//! relative to the working directory.

use std::path::{Path, PathBuf};

/// The host file a filename names: QEMU's `file:` protocol prefix
/// (which lets a name hold a colon) is taken off.
pub fn host_path(path: &Path) -> &Path {
    use std::os::unix::ffi::OsStrExt;
    let b = path.as_os_str().as_bytes();
    match b.strip_prefix(b"file:") {
        Some(rest) => Path::new(std::ffi::OsStr::from_bytes(rest)),
        None => path,
    }
}

/// Where a backing file name points, as QEMU resolves it: absolute names
/// and protocol names as they are, relative names against the directory
/// of the image that names them.
pub fn resolve_backing(image: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        return b.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b),
        _ => b.to_path_buf(),
    }
}

/// Where an external data file name points, as QEMU opens it: as given
/// (less a `file:` prefix). Unlike a backing file name, a relative name
/// is relative to the working directory, not to the image: QEMU opens the
/// data file as a child by that file name, and an image with a relative
/// data file name opens only from the directory it was made in.
pub fn resolve_data_file(name: &str) -> PathBuf {
    host_path(Path::new(name)).to_path_buf()
}
