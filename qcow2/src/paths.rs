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
    if b.is_absolute() || crate::nbd::is_nbd(backing) {
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

/// The directory where a daemon serving an image publishes a link to its
/// control socket, for other programs (`rimg resize`) to find it by the
/// image alone: `$RIMG_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/rimg`, else
/// `/tmp/rimg-UID`. Only a directory the user owns with mode 0700 is to
/// be trusted (see [`trusted_dir`]).
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RIMG_RUNTIME_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&d).join("rimg");
    }
    // SAFETY: getuid has no preconditions.
    PathBuf::from(format!("/tmp/rimg-{}", unsafe { libc::getuid() }))
}

/// The link to the control socket of the daemon serving the image file
/// with `meta` (named by device and inode: the same file under any name).
pub fn control_link(meta: &std::fs::Metadata) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    runtime_dir().join(format!("image-{}-{}.ctl", meta.dev(), meta.ino()))
}

/// Whether `dir` is a directory only this user can write to and read:
/// owned by the user, no access for group or others (a directory in /tmp
/// made by someone else could point us at their socket).
pub fn trusted_dir(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(dir).is_ok_and(|m| {
        // SAFETY: getuid has no preconditions.
        m.is_dir() && m.uid() == unsafe { libc::getuid() } && m.mode() & 0o077 == 0
    })
}
