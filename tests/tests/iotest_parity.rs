//! rimg against qemu-img on the steps of qemu-iotests 061, 080, 112 and
//! 271 that read qemu-img's exact output: amend's progress figures,
//! check -r on misaligned entries, and snapshot tables checked lazily.
//! qemu-img judges every image written.

use rimg_tests::twins::Twins;

const IMG: &str = "t.qcow2";

/// iotest 112: a refcount width change whose new first refcount block is
/// full needs more allocating walks than usual, and the progress figure
/// goes back (66.67 % of three walks, then 50 % of four).
#[test]
fn amend_progress_follows_the_refcount_walks() {
    let t = Twins::new();
    t.both(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=1,cluster_size=512",
            IMG,
            "64k",
        ],
    );
    t.both("qemu-io", &["-c", &format!("write 0 {}", 58 * 512), IMG]);
    let (out, _) = t.same(&["amend", "-p", "-o", "refcount_bits=64", IMG]);
    assert!(out.contains("(66.67/100%)\r    (50.00/100%)"), "{out:?}");
    t.check_clean(IMG);
    // An upgrade with a width change: two passes, projected.
    t.both(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            IMG,
            "64M",
        ],
    );
    t.both("qemu-io", &["-c", "write 0 1M", IMG]);
    t.same(&["amend", "-p", "-o", "compat=1.1,refcount_bits=4", IMG]);
    t.check_clean(IMG);
}

/// iotest 061: a downgrade reports one step per L1 entry.
#[test]
fn amend_progress_of_a_downgrade() {
    let t = Twins::new();
    t.both(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "b.qcow2", "4G"],
    );
    t.both(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", IMG, "4G",
        ],
    );
    t.both(
        "qemu-io",
        &[
            "-c",
            "write -z 0 64k",
            "-c",
            "write -z 1G 64k",
            "-c",
            "write -z 3G 64k",
            IMG,
        ],
    );
    let (out, _) = t.same(&["amend", "-p", "-o", "compat=0.10", IMG]);
    assert!(out.contains("(12.50/100%)"), "{out:?}");
    t.check_clean(IMG);
    t.same_judge("qemu-io", &["-c", "read -P 0 1G 64k", IMG]);
}
