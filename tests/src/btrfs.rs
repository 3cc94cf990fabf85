//! A btrfs file system on a loop device, for the tests of what only a
//! file system with copy-on-write shows (NOCOW, reflinks). Needs root,
//! as the block benchmark's XFS does.

use std::path::{Path, PathBuf};

use crate::{ensure_tool, run, run_ok};

/// Mounted in `dir/mnt` from a 320 MiB file in `dir`; unmounted (which
/// detaches the loop device) when dropped, whatever happens.
pub struct Btrfs {
    pub mnt: PathBuf,
}

impl Btrfs {
    pub fn new(dir: &Path) -> Btrfs {
        ensure_tool("mkfs.btrfs", "btrfs-progs");
        let disk = dir.join("btrfs.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(320 << 20)
            .unwrap();
        run_ok("mkfs.btrfs", &["-q", disk.to_str().unwrap()]);
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run_ok(
            "mount",
            &["-o", "loop", disk.to_str().unwrap(), mnt.to_str().unwrap()],
        );
        Btrfs { mnt }
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        let mnt = self.mnt.to_str().unwrap();
        if !run("umount", &[mnt]).status.success() {
            // Busy (a process of a failed test still in it): detached
            // now, gone when the last user is.
            let o = run("umount", &["-l", mnt]);
            eprintln!(
                "umount {mnt} failed; lazily: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}
