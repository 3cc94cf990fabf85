//! `create -o nocow=on` sets btrfs's NOCOW attribute (`chattr +C`) on
//! the new file, as qemu-img does, and `nocow=off` does not: checked
//! with lsattr on a btrfs made on a loop device for the test (root, as
//! the block benchmark's XFS). On other file systems the option is a
//! hint that changes nothing (QEMU ignores the failure too).

use std::path::Path;

use rimg_tests::btrfs::Btrfs;
use rimg_tests::{assert_qemu_check_clean, ok_as, run_ok, tempdir, tool};

fn attrs(p: &Path) -> String {
    let out = run_ok("lsattr", &[p.to_str().unwrap()]);
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn nocow_marks_new_files_on_btrfs() {
    let dir = tempdir();
    let fs = Btrfs::new(dir.path());
    let mnt = &fs.mnt;
    for t in ["qemu-img", "rimg"] {
        for fmt in ["qcow2", "raw"] {
            for on in [true, false] {
                let p = mnt.join(format!("{t}-{on}.{fmt}"));
                let opt = format!("nocow={}", if on { "on" } else { "off" });
                ok_as(
                    tool(
                        t,
                        &[
                            "create",
                            "-q",
                            "-f",
                            fmt,
                            "-o",
                            &opt,
                            p.to_str().unwrap(),
                            "4M",
                        ],
                    ),
                    &format!("{t} create {fmt} {opt}"),
                );
                let a = attrs(&p);
                assert_eq!(a.contains('C'), on, "{t} {fmt} {opt}: lsattr {a}");
                if fmt == "qcow2" {
                    assert_qemu_check_clean(&p);
                }
            }
        }
    }
    // Elsewhere (the test's own directory) it is accepted and harmless.
    let p = dir.path().join("elsewhere.qcow2");
    ok_as(
        tool(
            "rimg",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "nocow=on",
                p.to_str().unwrap(),
                "4M",
            ],
        ),
        "create elsewhere",
    );
    assert_qemu_check_clean(&p);
}
