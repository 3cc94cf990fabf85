//! Metadata overlap checks against images qemu-img made and we damaged:
//! an L2 entry pointing (COPIED, so written in place) at an L2 table, the
//! L1 table, the refcount table, a refcount block, the snapshot table or a
//! snapshot's L1 table, and refcounts of 0 on an L2 table or a refcount
//! block (so that the allocator would hand them out as data). In each case
//! a guest write must be refused with an error naming the structure, the
//! image must be marked corrupt (the incompatible "corrupt" bit, which
//! qemu-io then refuses to open read-write), and the file must be
//! byte-identical apart from that bit. `qemu-img check` must report the
//! corruption; `rimg check -r all` must repair it so that qemu-img finds
//! the image clean, opens it read-write again, and every other guest
//! cluster reads as before. The same through rimg-vhost-blk: the guest
//! write completes with an I/O error and the image is marked corrupt.

use std::os::unix::fs::FileExt;
use std::path::Path;

use qcow2::{Error, Header, Image, OpenOptions};
use rimg_tests::blk::{Client, Daemon};
use rimg_tests::{assert_qemu_check_clean, qemu_img, run, tempdir, workspace_bin};

const CS: u64 = 65536;
const COPIED: u64 = 1 << 63;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const INCOMPATIBLE: usize = 72;
const CORRUPT: u64 = 2;
/// The dirty bit: the block daemon sets it when it opens an image for
/// writing (its metadata is persisted per request; a kill leaks).
const DIRTY: u64 = 1;

fn be64(f: &[u8], off: u64) -> u64 {
    u64::from_be_bytes(f[off as usize..off as usize + 8].try_into().unwrap())
}

fn patch(p: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn ok(o: std::process::Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Where qemu-img put things.
struct Layout {
    header: Header,
    /// L2 tables of L1 entries 0 and 1.
    l2: [u64; 2],
    refblock: u64,
    /// The first snapshot's L1 table (0 without snapshots).
    snap_l1: u64,
}

fn layout(p: &Path) -> Layout {
    let f = std::fs::read(p).unwrap();
    let header = Header::parse(&f[..CS as usize]).unwrap();
    let l1 = header.l1_table_offset;
    let snap_l1 = if header.nb_snapshots > 0 {
        be64(&f, header.snapshots_offset)
    } else {
        0
    };
    Layout {
        l2: [be64(&f, l1) & OFFSET_MASK, be64(&f, l1 + 8) & OFFSET_MASK],
        refblock: be64(&f, header.refcount_table_offset) & !511,
        header,
        snap_l1,
    }
}

/// A 1 GiB image (two L2 tables with 64 KiB clusters): data in guest
/// clusters 0-3 and at 512 MiB; with `snapshot`, a snapshot of that and
/// then guest clusters 0-3 rewritten (so they are ours again, COPIED).
fn make(dir: &Path, compat: &str, snapshot: bool) -> std::path::PathBuf {
    let img = dir.join(format!("o-{compat}-{snapshot}.qcow2"));
    let _ = std::fs::remove_file(&img);
    let p = img.to_str().unwrap();
    ok(
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat}"),
            p,
            "1G",
        ]),
        "create",
    );
    ok(
        run(
            "qemu-io",
            &[
                "-c",
                "write -P 0x61 0 256k",
                "-c",
                "write -P 0x62 512M 64k",
                p,
            ],
        ),
        "qemu-io",
    );
    if snapshot {
        ok(qemu_img(&["snapshot", "-c", "s1", p]), "snapshot");
        ok(
            run("qemu-io", &["-c", "write -P 0x63 0 256k", p]),
            "qemu-io",
        );
    }
    img
}

fn open_rw(p: &Path) -> Result<std::sync::Arc<dyn Image>, Error> {
    qcow2::open(
        p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
}

/// The rimg binary (built once).
fn rimg() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| workspace_bin("rimg").to_str().unwrap().to_string())
}

/// Verifies with qemu-io (read-only) that the guest data `make` wrote
/// reads back, except guest cluster `skip`.
fn assert_guest_data(p: &Path, snapshot: bool, skip: Option<u64>, when: &str) {
    let pat = if snapshot { "0x63" } else { "0x61" };
    let mut cmds = Vec::new();
    for c in 0..4u64 {
        if Some(c) != skip {
            cmds.push(format!("read -P {pat} {} 64k", c * CS));
        }
    }
    cmds.push("read -P 0x62 512M 64k".into());
    cmds.push("read -P 0 600M 64k".into());
    let mut args = vec!["-r"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(p.to_str().unwrap());
    let o = run("qemu-io", &args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && !out.contains("failed"),
        "{when}: guest data: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn qemu_check(p: &Path) -> (i32, serde_json::Value) {
    let o = qemu_img(&["check", "--output=json", p.to_str().unwrap()]);
    let v = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (o.status.code().unwrap(), v)
}

/// What a damaged image must show after the refused write, and after the
/// repair. `guest` is the guest cluster whose mapping was damaged (its
/// content is allowed to change in the repair). `marked`: the header bits
/// the writer set (v3): the corrupt bit, and the dirty bit where the
/// writer marks the image at open.
fn assert_refused_then_repaired(
    p: &Path,
    before: &[u8],
    v3: bool,
    snapshot: bool,
    guest: Option<u64>,
    marked: u64,
) {
    let after = std::fs::read(p).unwrap();
    let mut want = before.to_vec();
    if v3 {
        let bits = be64(before, INCOMPATIBLE as u64) | marked;
        want[INCOMPATIBLE..INCOMPATIBLE + 8].copy_from_slice(&bits.to_be_bytes());
    }
    assert_eq!(after.len(), want.len(), "file length changed");
    if let Some(i) = after.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("byte {i:#x} changed although the write was refused");
    }
    if v3 {
        // qemu refuses to open it read-write...
        let o = run("qemu-io", &["-c", "write 0 512", p.to_str().unwrap()]);
        assert!(
            !o.status.success(),
            "qemu-io opened a corrupt image read-write"
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("corrupt"), "{err}");
        // ... and so does rimg.
        assert!(matches!(open_rw(p), Err(Error::MarkedCorrupt)));
    }
    // qemu-img check sees the damage.
    let (code, v) = qemu_check(p);
    assert_eq!(code, 2, "qemu-img check exit code: {v}");
    assert!(v["corruptions"].as_u64().unwrap() > 0, "{v}");
    assert_guest_data(p, snapshot, guest, "before the repair");

    let o = run(rimg(), &["check", "-r", "all", p.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "rimg check -r all: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_qemu_check_clean(p);
    let f = std::fs::read(p).unwrap();
    assert_eq!(
        be64(&f, INCOMPATIBLE as u64) & CORRUPT,
        0,
        "corrupt bit cleared"
    );
    assert_guest_data(p, snapshot, guest, "after the repair");
    // Writable again, for qemu and for us.
    ok(
        run(
            "qemu-io",
            &["-c", "write -P 0x77 64k 4k", p.to_str().unwrap()],
        ),
        "qemu-io after repair",
    );
    let img = open_rw(p).unwrap();
    img.write_at(&[0x78; 4096], 65536).unwrap();
    img.flush().unwrap();
    drop(img);
    assert_qemu_check_clean(p);
}

#[test]
fn in_place_writes_onto_metadata_are_refused() {
    let dir = tempdir();
    // (what the L2 entry of guest cluster 1 points at, compat, snapshot)
    type Target = fn(&Layout) -> u64;
    let cases: Vec<(&str, Target, &str, bool)> = vec![
        ("active L2 table", |l| l.l2[1], "1.1", false),
        ("active L2 table", |l| l.l2[1], "0.10", false),
        (
            "active L1 table",
            |l| l.header.l1_table_offset,
            "1.1",
            false,
        ),
        (
            "refcount table",
            |l| l.header.refcount_table_offset,
            "1.1",
            false,
        ),
        ("refcount block", |l| l.refblock, "1.1", false),
        ("snapshot table", |l| l.header.snapshots_offset, "1.1", true),
        ("snapshot L1 table", |l| l.snap_l1, "1.1", true),
    ];
    for (name, target, compat, snapshot) in cases {
        let img = make(dir.path(), compat, snapshot);
        let l = layout(&img);
        let at = target(&l);
        assert_ne!(at, 0, "{name}");
        patch(&img, l.l2[0] + 8, &(at | COPIED).to_be_bytes());
        let before = std::fs::read(&img).unwrap();

        let q = open_rw(&img).unwrap();
        let e = q.write_at(&[0xee; 4096], CS + 8192).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::OverlapRefused(_)), "{name}: {msg}");
        assert!(
            msg.contains(&format!("would overwrite {name} at {at:#x}")),
            "{name}: {msg}"
        );
        // The image takes no more writes, anywhere.
        assert!(q.write_at(&[1; 512], 100 << 20).is_err(), "{name}");
        drop(q);
        eprintln!("{name} ({compat}): {msg}");
        assert_refused_then_repaired(&img, &before, compat == "1.1", snapshot, Some(1), CORRUPT);
    }
}

#[test]
fn allocating_clusters_whose_refcount_is_zero_but_are_metadata_is_refused() {
    let dir = tempdir();
    type Target = fn(&Layout) -> u64;
    let cases: Vec<(&str, Target)> = vec![
        ("active L2 table", |l| l.l2[0]),
        ("refcount block", |l| l.refblock),
        ("active L1 table", |l| l.header.l1_table_offset),
    ];
    for (name, target) in cases {
        let img = make(dir.path(), "1.1", false);
        let l = layout(&img);
        let at = target(&l);
        // 16-bit refcounts; the block covers the whole file.
        patch(&img, l.refblock + (at / CS) * 2, &[0, 0]);
        let before = std::fs::read(&img).unwrap();
        let q = open_rw(&img).unwrap();
        // An unallocated guest cluster under an existing L2 table.
        let msg = q.write_at(&[0xee; 512], 100 << 20).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("would overwrite {name} at {at:#x}")),
            "{name}: {msg}"
        );
        drop(q);
        eprintln!("{name}: {msg}");
        assert_refused_then_repaired(&img, &before, true, false, None, CORRUPT);
    }
}

#[test]
fn the_block_daemon_refuses_too() {
    let dir = tempdir();
    let img = make(dir.path(), "1.1", false);
    let l = layout(&img);
    patch(&img, l.l2[0] + 8, &(l.l2[1] | COPIED).to_be_bytes());
    let before = std::fs::read(&img).unwrap();
    let sock = dir.path().join("blk.sock");
    let d = Daemon::start(&sock, &img, &[]).expect("daemon");
    let mut c = Client::connect(&sock, 1, false).expect("connect");
    // Elsewhere writes work; onto the table, an I/O error.
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![0x61; 4096]);
    assert!(c.write(0, CS + 4096, &[0xee; 4096]).is_err());
    // From then on nothing is written.
    assert!(c.write(0, 200 << 20, &[0xef; 4096]).is_err());
    drop(c);
    let (_, log) = d.terminate();
    assert!(log.contains("active L2 table"), "daemon log: {log}");
    assert_refused_then_repaired(&img, &before, true, false, Some(1), CORRUPT | DIRTY);
}
