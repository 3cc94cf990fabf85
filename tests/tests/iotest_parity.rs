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
    t.create(IMG, "refcount_bits=1,cluster_size=512", None, "64k");
    t.io(IMG, &[&format!("write 0 {}", 58 * 512)]);
    let (out, _) = t.same(&["amend", "-p", "-o", "refcount_bits=64", IMG]);
    assert!(out.contains("(66.67/100%)\r    (50.00/100%)"), "{out:?}");
    t.check_clean(IMG);
    // An upgrade with a width change: two passes, projected.
    t.create(IMG, "compat=0.10", None, "64M");
    t.io(IMG, &["write 0 1M"]);
    t.same(&["amend", "-p", "-o", "compat=1.1,refcount_bits=4", IMG]);
    t.check_clean(IMG);
}

/// iotest 061: a downgrade reports one step per L1 entry.
#[test]
fn amend_progress_of_a_downgrade() {
    let t = Twins::new();
    t.create("b.qcow2", "", None, "4G");
    t.create(IMG, "", Some("b.qcow2"), "4G");
    t.io(
        IMG,
        &["write -z 0 64k", "write -z 1G 64k", "write -z 3G 64k"],
    );
    let (out, _) = t.same(&["amend", "-p", "-o", "compat=0.10", IMG]);
    assert!(out.contains("(12.50/100%)"), "{out:?}");
    t.check_clean(IMG);
    t.same_judge("qemu-io", &["-c", "read -P 0 1G 64k", IMG]);
}

/// An extended-L2 image over a raw backing file with data at 4k..6k of
/// its first cluster, whose L2 entry then gets a misaligned offset
/// (iotest 271).
fn misaligned_extl2(t: &Twins, zero_it: bool) {
    t.both("qemu-img", &["create", "-q", "-f", "raw", "b.raw", "128k"]);
    t.both(
        "qemu-io",
        &["-f", "raw", "-c", "write -q -P 0xff 0 128k", "b.raw"],
    );
    t.both(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-F",
            "raw",
            "-b",
            "b.raw",
            IMG,
        ],
    );
    t.io(IMG, &["write -q -P 1 4k 2k"]);
    if zero_it {
        t.io(IMG, &["write -q -z 4k 2k"]);
    }
    let l1 = t.be64(IMG, 40);
    let l2 = t.be64(IMG, l1) & !(1 << 63);
    t.poke(IMG, l2 + 6, &[2]);
}

/// iotest 271: a misaligned entry whose subclusters hold data cannot be
/// repaired: check -r all says so each pass, counts the references of
/// its range (a rebuild follows) and still fails.
#[test]
fn check_keeps_a_misaligned_data_cluster() {
    let t = Twins::new();
    misaligned_extl2(&t, false);
    let (_, err) = t.same(&["check", "-r", "all", IMG]);
    assert_eq!(
        err.matches("Data cluster is not properly aligned").count(),
        3,
        "{err}"
    );
    assert!(err.contains("Rebuilding refcount structure"), "{err}");
    t.same(&["check", IMG]);
}

/// iotest 271: a misaligned entry with no allocated subcluster is
/// repaired in place (its cluster then leaks, and is freed).
#[test]
fn check_repairs_a_misaligned_preallocated_cluster() {
    let t = Twins::new();
    misaligned_extl2(&t, true);
    t.same(&["check", IMG]);
    misaligned_extl2(&t, true);
    let (out, err) = t.same(&["check", "-r", "all", IMG]);
    assert!(
        err.contains("Repairing offset=50200: Preallocated cluster is not properly aligned"),
        "{err}"
    );
    assert!(out.contains("1 leaked clusters"), "{out}");
    t.check_clean(IMG);
    t.same_judge(
        "qemu-io",
        &["-c", "read -P 0xff 0 4k", "-c", "read -P 0 4k 2k", IMG],
    );
}

/// iotest 271: rebase -c onto a new backing file writes whole clusters
/// compressed, even where the old backing file differs in one subcluster.
#[test]
fn rebase_compressed_with_subclusters() {
    let t = Twins::new();
    let ext = "cluster_size=1M,extended_l2=on";
    t.create("base.qcow2", ext, None, "3M");
    for (img, back) in [("mid.qcow2", "base.qcow2"), (IMG, "mid.qcow2")] {
        t.create(img, ext, Some(back), "3M");
    }
    t.io("base.qcow2", &["write -P 0x11 1M 1M"]);
    t.io(
        "mid.qcow2",
        &["write -P 0x22 992k 32k", "write -P 0x33 2M 32k"],
    );
    t.same(&["rebase", "-c", "-b", "base.qcow2", "-F", "qcow2", IMG]);
    let map = t.same_judge("qemu-img", &["map", "--output=json", IMG]);
    assert_eq!(map.matches("\"compressed\": true").count(), 2, "{map}");
    t.check_clean(IMG);
}

/// iotest 080: snapshot -c with an L2 entry mapping a cluster far past the
/// end of the file fails by errno, as qemu-img (EFBIG where the refcount
/// table could not grow enough, EAGAIN where a refcount block would be
/// allocated), and leaves the image usable.
#[test]
fn snapshot_create_past_eof_errnos() {
    let t = Twins::new();
    t.create(IMG, "", None, "64M");
    t.io(IMG, &["write 0 512"]);
    let l1 = t.be64(IMG, 40);
    let l2 = t.be64(IMG, l1) & !(1 << 63);
    t.poke(IMG, l2, &0xbfff_ffff_ffff_0000u64.to_be_bytes());
    let (_, err) = t.same(&["snapshot", "-c", "test", IMG]);
    assert!(err.contains("File too large"), "{err}");
    t.poke(IMG, l2, &0x8000_00ff_ffff_0000u64.to_be_bytes());
    let (q, r) = t.run(&["snapshot", "-c", "test", IMG]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(q.status.code(), r.status.code());
    assert!(
        err.contains("Could not create snapshot 'test': Resource temporarily unavailable"),
        "{err}"
    );
    // Not marked corrupt: it still opens for writing.
    t.same(&["snapshot", "-l", IMG]);
    let o = std::process::Command::new("qemu-io")
        .args(["-c", "write 4k 512", IMG])
        .current_dir(&t.r)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// iotest 080: an image whose snapshot names an invalid L1 table opens;
/// what uses the table fails with qemu-img's words, check reports it.
#[test]
fn snapshot_l1_checked_where_used() {
    for (field, bytes, errno) in [
        (
            0u64,
            0x40_0200u64.to_be_bytes().to_vec(),
            "Invalid argument",
        ),
        (8, 0x1000_0000u32.to_be_bytes().to_vec(), "File too large"),
    ] {
        let t = Twins::new();
        t.create(IMG, "", None, "64M");
        t.io(IMG, &["write 0 512"]);
        t.both("qemu-img", &["snapshot", "-c", "test", IMG]);
        let table = t.be64(IMG, 64);
        t.poke(IMG, table + field, &bytes);
        let (_, err) = t.same(&["convert", "-l", "test", IMG, "x.qcow2"]);
        assert!(
            err.contains("Failed to load snapshot: Snapshot L1 table"),
            "{err}"
        );
        let (_, err) = t.same(&["amend", "-o", "compat=0.10", IMG]);
        assert!(
            err.contains(&format!("Failed to turn zero into data clusters: {errno}")),
            "{err}"
        );
        let (_, err) = t.same(&["snapshot", "-a", "test", IMG]);
        assert!(
            err.contains(&format!("Failed to load snapshot: {errno}")),
            "{err}"
        );
        let (_, err) = t.same(&["snapshot", "-d", "test", IMG]);
        assert!(
            err.contains("Could not delete snapshot 'test': Snapshot L1 table"),
            "{err}"
        );
        let (_, err) = t.same(&["check", IMG]);
        assert!(err.contains("snapshot table entry corrupted"), "{err}");
        t.same(&["info", IMG]);
    }
}

/// A lazy-refcounts image left dirty by a killed writer (iotest 061).
fn dirty_image(t: &Twins) {
    t.create(IMG, "compat=1.1,lazy_refcounts=on", None, "64M");
    for d in [&t.q, &t.r] {
        // qemu-io dies by its own signal: its exit status is not success.
        let o = std::process::Command::new("qemu-io")
            .args([
                "-c",
                "write -P 0x2a 0 128k",
                "-c",
                "flush",
                "-c",
                "sigraise 9",
                IMG,
            ])
            .current_dir(d)
            .output()
            .unwrap();
        assert!(!o.status.success());
    }
}

/// iotest 061: opening a dirty image for writing repairs it with the
/// check's lines on stderr, and the rebuilt refcount table lands where
/// qemu-img puts it.
#[test]
fn dirty_image_repaired_at_open() {
    for opt in ["compat=0.10", "lazy_refcounts=off"] {
        let t = Twins::new();
        dirty_image(&t);
        let (_, err) = t.same(&["amend", "-o", opt, IMG]);
        assert!(err.contains("Rebuilding refcount structure"), "{err}");
        let q = std::fs::read(t.q.join(IMG)).unwrap();
        let r = std::fs::read(t.r.join(IMG)).unwrap();
        // Version, features, refcount table offset and size.
        assert_eq!(q[..104], r[..104]);
        t.check_clean(IMG);
        t.same_judge("qemu-io", &["-c", "read -P 0x2a 0 128k", IMG]);
    }
}

/// iotest 061: amend's refusals in qemu-img's words.
#[test]
fn amend_refusals_as_qemu_img() {
    let t = Twins::new();
    t.create(IMG, "compat=0.10", None, "64M");
    for o in [
        "lazy_refcounts=on",
        "compat=0.10,lazy_refcounts=on",
        "compat=0.42",
        "foo=bar",
        "cluster_size=1k",
        "encryption=on",
        "preallocation=on",
    ] {
        let (_, err) = t.same(&["amend", "-o", o, IMG]);
        assert!(!err.is_empty(), "{o}");
    }
    t.create(IMG, "extended_l2=on", None, "64M");
    let (_, err) = t.same(&["amend", "-o", "compat=0.10", IMG]);
    assert!(err.contains("incompatible features 0x10"), "{err}");
    t.check_clean(IMG);
}

/// iotest 061: an upgrade makes a resize possible in the same amend on a
/// version 2 image with snapshots.
#[test]
fn amend_upgrade_then_resize_with_snapshots() {
    let t = Twins::new();
    t.create(IMG, "compat=0.10", None, "32M");
    t.io(IMG, &["write -P 0x2a 24M 64k"]);
    t.both("qemu-img", &["snapshot", "-c", "foo", IMG]);
    t.same(&["resize", IMG, "64M"]);
    t.same(&["amend", "-o", "compat=1.1,size=128M", IMG]);
    t.same_judge("qemu-img", &["info", IMG]);
    t.check_clean(IMG);
}

/// iotest 061: a downgrade expands zero clusters in the snapshots' L2
/// tables too (shared with the active table or not, with and without a
/// backing file), reporting one step per L1 entry of every table.
#[test]
fn downgrade_expands_snapshot_zero_clusters() {
    let create = |t: &Twins, backed: bool| {
        if backed {
            t.create("b.qcow2", "", None, "64M");
            t.io("b.qcow2", &["write -P 0x2a 0 128k"]);
            t.create(IMG, "", Some("b.qcow2"), "64M");
        } else {
            t.create(IMG, "", None, "64M");
        }
    };
    for (backed, overwrite) in [(false, true), (false, false), (true, true), (true, false)] {
        let t = Twins::new();
        create(&t, backed);
        t.io(IMG, &["write -z 0 64k", "write 64k 64k"]);
        t.both("qemu-img", &["snapshot", "-c", "foo", IMG]);
        if overwrite {
            // The active table stops sharing the snapshot's L2 table.
            t.io(IMG, &["write -P 0x42 0 128k"]);
        }
        let (out, _) = t.same(&["amend", "-p", "-o", "compat=0.10", IMG]);
        assert!(out.contains("(50.00/100%)"), "{out}");
        t.check_clean(IMG);
        t.same(&["snapshot", "-a", "foo", IMG]);
        t.check_clean(IMG);
        t.same_judge("qemu-io", &["-c", "read -P 0 0 64k", IMG]);
    }
}

/// iotest 061: applying a snapshot taken at another disk size gives the
/// disk that size back; a downgrade then works once every snapshot has
/// the disk's size.
#[test]
fn snapshot_apply_restores_its_disk_size() {
    let t = Twins::new();
    t.create(IMG, "compat=0.10", None, "32M");
    t.io(IMG, &["write -P 0x2a 24M 64k"]);
    t.both("qemu-img", &["snapshot", "-c", "foo", IMG]);
    t.same(&["amend", "-o", "compat=1.1,size=128M", IMG]);
    t.both("qemu-img", &["snapshot", "-c", "bar", IMG]);
    t.same(&["resize", "--shrink", IMG, "64M"]);
    let (_, err) = t.same(&["amend", "-o", "compat=0.10,size=32M", IMG]);
    assert!(
        err.contains("Internal snapshots prevent downgrade"),
        "{err}"
    );
    t.same(&["snapshot", "-a", "bar", IMG]);
    same_size_and_version(&t);
    t.same(&["snapshot", "-d", "bar", IMG]);
    t.same(&["amend", "-o", "compat=0.10,size=32M", IMG]);
    same_size_and_version(&t);
    t.check_clean(IMG);
    t.same_judge("qemu-io", &["-c", "read -P 0x2a 24M 64k", IMG]);
}

/// qemu-img's info of both twins agrees on size, version and snapshots.
fn same_size_and_version(t: &Twins) {
    let lines = |d: &std::path::Path| {
        let o = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", IMG])
            .current_dir(d)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let names: Vec<_> = v["snapshots"]
            .as_array()
            .map(|a| a.iter().map(|s| s["name"].clone()).collect())
            .unwrap_or_default();
        (
            v["virtual-size"].clone(),
            v["format-specific"]["data"]["compat"].clone(),
            names,
        )
    };
    assert_eq!(lines(&t.q), lines(&t.r));
}

/// iotest 061: `data-file.filename` opens an image whose data file the
/// header names wrongly (or no longer names), and amend can drop the name.
#[test]
fn data_file_given_in_place_of_the_headers() {
    let t = Twins::new();
    let data = format!("compat=1.1,data_file={IMG}.data");
    t.create(IMG, &data, None, "64M");
    t.io(IMG, &["write -P 0x2a 0 4k"]);
    t.same(&["amend", "-o", "data_file=foo", IMG]);
    let opts = format!("data-file.filename={IMG}.data,file.filename={IMG}");
    let (info, _) = t.same(&["info", "--image-opts", &opts]);
    assert!(info.contains("data file: foo"), "{info}");
    t.same(&["amend", "-o", "data_file=", "--image-opts", &opts]);
    let (info, _) = t.same(&["info", "--image-opts", &opts]);
    assert!(!info.contains("data file:"), "{info}");
    t.same(&["convert", "-O", "raw", "--image-opts", &opts, "out.raw"]);
    t.same_judge(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x2a 0 4k", "out.raw"],
    );
}

/// iotest 098: commit empties the top image in qemu-img's steps; an
/// error injected at any step's blkdebug event fails the commit and
/// leaves what qemu-img leaves (the next open repairs it the same way).
#[test]
fn commit_empties_the_top_in_qemu_img_steps() {
    for event in [
        None,
        Some("l1_update"),
        Some("empty_image_prepare"),
        Some("reftable_update"),
        Some("refblock_alloc"),
    ] {
        let t = Twins::new();
        t.create("b.qcow2", "", None, "64M");
        t.create(IMG, "", Some("b.qcow2"), "64M");
        t.io(IMG, &["write 0 64k"]);
        let target = match event {
            Some(e) => {
                for d in [&t.q, &t.r] {
                    std::fs::write(
                        d.join("bd.conf"),
                        format!("[inject-error]\nevent = \"{e}\"\n"),
                    )
                    .unwrap();
                }
                format!("blkdebug:bd.conf:{IMG}")
            }
            None => IMG.to_string(),
        };
        let (_, err) = t.same(&["commit", &target]);
        if event.is_some() {
            assert!(err.contains("Failed to empty"), "{err}");
        }
        t.same_judge("qemu-io", &["-c", "close", IMG]);
        t.same_judge("qemu-img", &["check", IMG]);
    }
}
