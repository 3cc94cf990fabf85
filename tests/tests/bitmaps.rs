//! Persistent dirty bitmaps with QEMU as the judge: images whose bitmaps
//! `qemu-img bitmap` made, written by rimg, must keep them (qemu-img info
//! flags, qemu-img check clean), and the dirty ranges QEMU reads from them
//! (qemu-nbd exporting the bitmap, `qemu-img map` with x-dirty-bitmap)
//! must be exactly the ranges written, at the bitmap's granularity.
//! (bitmaps_commands.rs has the bitmap-aware commands against qemu-img.)

use std::path::Path;

use qcow2::{open, OpenOptions};
use rimg_tests::bitmaps::{
    assert_no_corruption, bitmap, granular, image_with_bitmaps, qemu_bitmaps, qemu_dirty,
};
use rimg_tests::image::open_rw as rw;
use rimg_tests::{assert_qemu_check_clean, ok, qemu_img, qemu_io, rimg, tempdir, tool};

/// What a writer killed while `img` (from [`image_with_bitmaps`]) was
/// open leaves: every bitmap marked in use, the disabled one too (QEMU
/// loads them all at a writable open and marks them so; a
/// qemu-storage-daemon killed with the image open leaves the same), and
/// leaks at most (no corruption).
fn assert_crash_left_bitmaps_in_use(img: &Path) {
    let flags = qemu_bitmaps(img);
    assert!(
        flags.contains(&bitmap("on", &["in-use", "auto"])),
        "{flags:?}"
    );
    assert!(flags.contains(&bitmap("off", &["in-use"])), "{flags:?}");
    assert_no_corruption(img);
}

#[test]
fn check_counts_bitmap_clusters_and_repairs_nothing() {
    let dir = tempdir();
    let img = image_with_bitmaps(dir.path());
    let p = img.to_str().unwrap();
    let before = std::fs::read(&img).unwrap();
    let out = ok(rimg(&["check", p]));
    assert!(out.contains("No errors were found"), "{out}");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "check changed the image"
    );
    let (flags, dirty) = (qemu_bitmaps(&img), qemu_dirty(&img, "on"));
    for mode in ["leaks", "all"] {
        let out = ok(rimg(&["check", "-r", mode, p]));
        assert!(out.contains("No errors were found"), "{out}");
        // A repair stores the bitmaps at its close, as qemu-img's does:
        // where they are changes, what they hold does not.
        assert_qemu_check_clean(&img);
        assert_eq!(qemu_bitmaps(&img), flags, "check -r {mode}");
        assert_eq!(qemu_dirty(&img, "on"), dirty, "check -r {mode}");
    }
}

#[test]
fn library_writes_are_recorded_in_enabled_bitmaps() {
    let dir = tempdir();
    let img = image_with_bitmaps(dir.path());
    let off_before = qemu_dirty(&img, "off");
    let writes = [(1 << 20, 4096u64), (10 << 20, 100 << 10), (33 << 20, 1)];
    let zeroes = (20 << 20, 256u64 << 10);
    let discard = (40 << 20, 1u64 << 20);
    {
        let q = rw(&img);
        // In use on disk from the open on: a crash leaves them inconsistent.
        let flags = qemu_bitmaps(&img);
        assert!(
            flags.contains(&bitmap("on", &["in-use", "auto"])),
            "{flags:?}"
        );
        for &(o, l) in &writes {
            q.write_at(&vec![9u8; l as usize], o).unwrap();
        }
        q.write_zeroes(zeroes.0, zeroes.1, true).unwrap();
        q.discard(discard.0, discard.1).unwrap();
        q.flush().unwrap();
    }
    assert_qemu_check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            ("on".into(), vec!["auto".into()]),
            ("big".into(), vec!["auto".into()]),
            ("off".into(), vec![]),
        ]
    );
    let mut all = vec![(0, 12 << 10)];
    all.extend(writes);
    all.extend([zeroes, discard]);
    assert_eq!(qemu_dirty(&img, "on"), granular(&all, 4096));
    assert_eq!(qemu_dirty(&img, "big"), granular(&all, 65536));
    assert_eq!(qemu_dirty(&img, "off"), off_before);
    // A second session starts from the stored bits.
    {
        let q = rw(&img);
        q.write_at(&[1; 512], 50 << 20).unwrap();
    }
    all.push((50 << 20, 512));
    assert_eq!(qemu_dirty(&img, "on"), granular(&all, 4096));
    assert_qemu_check_clean(&img);
}

#[test]
fn a_crash_leaves_the_bitmaps_in_use_never_wrong() {
    let dir = tempdir();
    let img = image_with_bitmaps(dir.path());
    let q = rw(&img);
    q.write_at(&[5; 4096], 8 << 20).unwrap();
    q.flush().unwrap();
    // No close: the file as a kill would leave it, copied away from the
    // still-open (and locked) image.
    std::mem::forget(q);
    let img = dir.path().join("crashed.qcow2");
    std::fs::copy(dir.path().join("a.qcow2"), &img).unwrap();
    assert_crash_left_bitmaps_in_use(&img);
    // The inconsistent bitmap is left alone by the next session.
    drop(rw(&img));
    let flags = qemu_bitmaps(&img);
    assert!(
        flags.contains(&bitmap("on", &["in-use", "auto"])),
        "{flags:?}"
    );
}

#[test]
fn cli_writers_keep_bitmaps() {
    let dir = tempdir();
    let img = image_with_bitmaps(dir.path());
    let src = dir.path().join("s.raw");
    std::fs::write(&src, vec![0u8; 64 << 20]).unwrap();
    qemu_io(&src, &["write -P 7 3M 8k"]);
    ok(rimg(&[
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        img.to_str().unwrap(),
    ]));
    assert_qemu_check_clean(&img);
    let flags = qemu_bitmaps(&img);
    assert!(flags.contains(&bitmap("on", &["auto"])), "{flags:?}");
    // convert -n writes the whole disk (zeros included), as qemu-img does.
    assert_eq!(qemu_dirty(&img, "on"), vec![(0, 64 << 20)]);
}

#[test]
fn resize_keeps_bitmaps_as_qemu_img_does() {
    let dir = tempdir();
    let r = image_with_bitmaps(dir.path());
    let q = dir.path().join("q.qcow2");
    std::fs::copy(&r, &q).unwrap();
    for size in ["128M", "32M"] {
        for (img, name) in [(&r, "rimg"), (&q, "qemu-img")] {
            ok(tool(
                name,
                &["resize", "--shrink", img.to_str().unwrap(), size],
            ));
            qemu_io(img, &["write 30M 64k"]);
            assert_qemu_check_clean(img);
        }
        assert_eq!(qemu_bitmaps(&r), qemu_bitmaps(&q));
        for b in ["on", "big", "off"] {
            assert_eq!(qemu_dirty(&r, b), qemu_dirty(&q, b), "{b} at {size}");
        }
    }
    // An inconsistent bitmap refuses the resize before anything changes.
    let c = rw(&r);
    std::mem::forget(c);
    let crashed = dir.path().join("crashed.qcow2");
    std::fs::copy(&r, &crashed).unwrap();
    let before = std::fs::read(&crashed).unwrap();
    let o = rimg(&["resize", crashed.to_str().unwrap(), "64M"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is inconsistent"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(std::fs::read(&crashed).unwrap() == before);
}

#[test]
fn a_broken_directory_refuses_every_open() {
    let dir = tempdir();
    let img = image_with_bitmaps(dir.path());
    // The directory's first entry: break its granularity (byte 17).
    let h = qcow2::Header::parse(&std::fs::read(&img).unwrap()[..65536]).unwrap();
    let e = h
        .other_extensions
        .iter()
        .find(|e| e.kind == qcow2::header::ext::BITMAPS)
        .unwrap();
    let dir_off = u64::from_be_bytes(e.data[16..24].try_into().unwrap());
    let mut f = std::fs::read(&img).unwrap();
    f[dir_off as usize + 17] = 40;
    std::fs::write(&img, &f).unwrap();
    let err = open(
        &img,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("doesn't satisfy the constraints"),
        "{err}"
    );
    assert!(
        std::fs::read(&img).unwrap() == f,
        "a refused open changed the file"
    );
    // QEMU loads the bitmaps at every open: read-only too (see
    // bitmaps_damaged.rs for the commands).
    let err = open(&img, &OpenOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("doesn't satisfy the constraints"),
        "{err}"
    );
}

/// rimg-vhost-blk serving an image with bitmaps: what a vhost-user-blk
/// client (libblkio) writes, zeroes and discards is what QEMU reads as
/// dirty afterwards; a SIGKILL leaves the bitmaps marked in use.
#[test]
fn vhost_blk_writes_are_recorded_and_a_kill_leaves_them_in_use() {
    use rimg_tests::blk::{Client, Daemon};
    let dir = tempdir();
    let img = image_with_bitmaps(dir.path());
    let off_before = qemu_dirty(&img, "off");
    let sock = dir.path().join("blk.sock");
    let daemon = Daemon::start(&sock, &img, &["--num-queues", "2"]).expect("daemon");
    let mut c = Client::connect(&sock, 2, false).expect("connect");
    let writes = [(2u64 << 20, 4096u64), (5 << 20, 192 << 10), (63 << 20, 512)];
    for (i, &(o, l)) in writes.iter().enumerate() {
        c.write(i % 2, o, &vec![i as u8 + 1; l as usize])
            .expect("write");
    }
    c.write_zeroes(0, 12 << 20, 1 << 20, false)
        .expect("write zeroes");
    c.discard(1, 30 << 20, 2 << 20).expect("discard");
    c.flush(0).expect("flush");
    drop(c);
    let (st, log) = daemon.terminate();
    assert!(st.success(), "daemon exit {st}: {log}");
    assert_qemu_check_clean(&img);
    let flags = qemu_bitmaps(&img);
    assert!(flags.contains(&bitmap("on", &["auto"])), "{flags:?}");
    let mut all = vec![(0, 12 << 10)];
    all.extend(writes);
    all.extend([(12 << 20, 1 << 20), (30 << 20, 2 << 20)]);
    assert_eq!(qemu_dirty(&img, "on"), granular(&all, 4096));
    assert_eq!(qemu_dirty(&img, "big"), granular(&all, 65536));
    assert_eq!(qemu_dirty(&img, "off"), off_before);

    // SIGKILL while serving: the enabled bitmaps stay in use on disk.
    let daemon = Daemon::start(&sock, &img, &[]).expect("daemon");
    let mut c = Client::connect(&sock, 1, false).expect("connect");
    c.write(0, 40 << 20, &[7; 4096]).expect("write");
    c.flush(0).expect("flush");
    daemon.signal(libc::SIGKILL);
    drop(c);
    let (_, _) = daemon.terminate();
    assert_crash_left_bitmaps_in_use(&img);
}

/// An image whose bitmaps bit a program without bitmap support cleared:
/// the bitmaps no longer count (QEMU ignores them too), their clusters
/// are leaks that both checks report alike and `check -r leaks` frees.
#[test]
fn cleared_autoclear_bit_makes_bitmap_clusters_leaks_as_in_qemu() {
    let dir = tempdir();
    let img = image_with_bitmaps(dir.path());
    let mut f = std::fs::read(&img).unwrap();
    f[88..96].fill(0);
    std::fs::write(&img, &f).unwrap();
    let p = img.to_str().unwrap();
    let r = rimg(&["check", "--output=json", p]);
    let q = qemu_img(&["check", "--output=json", p]);
    let j = |o: &std::process::Output| -> serde_json::Value {
        let mut v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v.as_object_mut().unwrap().remove("filename");
        v
    };
    assert_eq!(r.status.code(), q.status.code());
    assert_eq!(j(&r), j(&q));
    assert!(j(&q)["leaks"].as_u64().unwrap() > 0);
    ok(rimg(&["check", "-r", "leaks", p]));
    assert_qemu_check_clean(&img);
    // Opened for writing, the stale extension goes (as QEMU drops it):
    // qemu-img warns no more.
    drop(rw(&img));
    assert!(qemu_bitmaps(&img).is_empty());
    assert_qemu_check_clean(&img);
    let o = qemu_img(&["info", p]);
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
