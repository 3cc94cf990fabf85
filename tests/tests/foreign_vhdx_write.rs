//! VHDX images written by rimg as qemu-img writes them: `create` (its
//! options, rounding, refusals and words; the same bytes but for the
//! creator, the random GUIDs, sequence numbers and checksums),
//! `convert -O vhdx` and `dd -O vhdx` (the same blocks in the same
//! places; QEMU's stale log entries aside), and the engine's own writes
//! (the headers' update before the first write, odd offsets, threads
//! racing to allocate the same new blocks, the states QEMU refuses to
//! write). Every image rimg writes is checked clean and compared equal
//! by qemu-img.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use qcow2::{Image, OpenOptions};
use rimg_tests::image::{race_new_units, read_all, scattered_writes};
use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, qemu_img_in, same_as_qemu as same, tempdir,
    write_mixed_raw,
};

const MIB: u64 = 1 << 20;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Where the metadata region starts (the region table's second entry).
fn metadata_offset(img: &[u8]) -> usize {
    le64(img, 0x30000 + 16 + 32 + 16) as usize
}

/// A version 4 GUID, as QEMU stores one.
fn assert_guid(g: &[u8], what: &str) {
    assert!(g != [0; 16], "{what}: a null GUID");
    assert_eq!(
        (g[6] >> 4, g[8] >> 6),
        (4, 2),
        "{what}: not a version 4 GUID"
    );
}

/// Both headers of `img`: (valid CRC, sequence number, file write GUID,
/// data write GUID).
fn headers(img: &[u8]) -> Vec<(bool, u64, [u8; 16], [u8; 16])> {
    [0x10000usize, 0x20000]
        .iter()
        .map(|&at| {
            let mut h = img[at..at + 4096].to_vec();
            let crc = le32(&h, 4);
            h[4..8].fill(0);
            let valid = crc == crc32c(&h) && &h[..4] == b"head";
            let guid = |k: usize| h[k..k + 16].try_into().unwrap();
            (valid, le64(&h, 8), guid(16), guid(32))
        })
        .collect()
}

/// CRC-32C, bit by bit (the test's own, not the engine's).
fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The bytes of `img` with what differs between two makers of the same
/// image zeroed: the creator, the headers' checksum, sequence number and
/// GUIDs, the page 83 GUID, and with `log`, the log region (where QEMU
/// leaves stale entries).
fn masked(img: &[u8], log: bool) -> Vec<u8> {
    let mut m = img.to_vec();
    m[8..0x10000].fill(0);
    for h in [0x10000, 0x20000] {
        m[h + 4..h + 0x30].fill(0);
    }
    let md = metadata_offset(img);
    m[md + 0x10010..md + 0x10020].fill(0);
    if log {
        let len = le32(img, 0x10000 + 68) as usize;
        m[MIB as usize..MIB as usize + len].fill(0);
    }
    m
}

/// The data extents of a file (SEEK_DATA/SEEK_HOLE), without `skip`.
fn data_extents(p: &Path, skip: std::ops::Range<u64>) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    let mut out = Vec::new();
    let mut at = 0i64;
    while at < len {
        // SAFETY: lseek on a file this function holds open.
        let d = unsafe { libc::lseek(f.as_raw_fd(), at, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(f.as_raw_fd(), d, libc::SEEK_HOLE) };
        let (s, e) = (d as u64, h as u64);
        for (a, b) in [(s, e.min(skip.start)), (s.max(skip.end), e)] {
            if a < b {
                out.push((a, b));
            }
        }
        at = h;
    }
    out
}

/// `q` (qemu-img's) and `r` (rimg's) are the same image: the same bytes
/// but for `masked`, rimg's headers valid with fresh GUIDs, the same
/// data extents (outside the log region with `log`).
fn same_image(q: &Path, r: &Path, log: bool) {
    let (x, y) = (std::fs::read(q).unwrap(), std::fs::read(r).unwrap());
    assert_eq!(x.len(), y.len(), "{}: length", r.display());
    let hs = headers(&y);
    assert!(hs[0].0 && hs[1].0, "{}: a header is invalid", r.display());
    assert_eq!(hs[1].1, hs[0].1 + 1, "{}: sequence numbers", r.display());
    assert_eq!(hs[0].2, hs[1].2, "{}: file write GUIDs", r.display());
    for (k, h) in hs.iter().enumerate() {
        assert_guid(&h.2, &format!("header {k} file write GUID"));
        assert_guid(&h.3, &format!("header {k} data write GUID"));
    }
    let md = metadata_offset(&y);
    assert_guid(&y[md + 0x10010..md + 0x10020], "page 83");
    let (mx, my) = (masked(&x, log), masked(&y, log));
    let first = mx.iter().zip(&my).position(|(a, b)| a != b);
    assert!(
        first.is_none(),
        "{} and {} differ at byte {first:?}",
        q.display(),
        r.display()
    );
    let skip = match log {
        true => MIB..MIB + le32(&y, 0x10000 + 68) as u64,
        false => 0..0,
    };
    assert_eq!(
        data_extents(q, skip.clone()),
        data_extents(r, skip),
        "{}: not as sparse as qemu-img's",
        r.display()
    );
}

#[test]
fn create_matches_qemu() {
    let d = tempdir();
    let dir = d.path();
    for (size, opts) in [
        ("0", ""),
        ("1", ""),
        ("1000", ""),
        ("5M", ""),
        ("20M", "block_size=1M"),
        ("1G", ""),
        ("1073742336", ""),
        ("4097M", "block_size=1"),
        ("32T", ""),
        ("5M", "subformat=fixed"),
        ("5M", "subformat=dynamic,block_state_zero=off"),
        (
            "12345678",
            "subformat=fixed,block_state_zero=off,block_size=4M",
        ),
        ("5M", "log_size=1500K,block_size=1536K"),
        ("20M", "block_size=512M"),
        ("5.5k", "block_state_zero=yes,block_size=0"),
        ("5M", "block_state_zero,log_size=2M"),
    ] {
        let args = |name: &str| -> Vec<String> {
            let mut a = vec!["create".into(), "-f".into(), "vhdx".into()];
            if !opts.is_empty() {
                a.extend(["-o".into(), opts.into()]);
            }
            a.extend([name.into(), size.into()]);
            a
        };
        let q: Vec<String> = args("q.vhdx");
        let r: Vec<String> = args("r.vhdx");
        qemu_img_in(dir, &q.iter().map(String::as_str).collect::<Vec<_>>());
        let (_, out, _) = same(dir, &r.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.starts_with("Formatting 'r.vhdx', fmt=vhdx"), "{out}");
        same_image(&dir.join("q.vhdx"), &dir.join("r.vhdx"), false);
        assert_qemu_check_clean(&dir.join("r.vhdx"));
        same(dir, &["info", "--output=json", "r.vhdx"]);
    }
    for args in [
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "subformat=Fixed",
            "e.vhdx",
            "5M",
        ][..],
        &["create", "-f", "vhdx", "e.vhdx", "65T"],
        &["create", "-f", "vhdx", "-o", "log_size=4G", "e.vhdx", "5M"],
        &["create", "-f", "vhdx", "-o", "log_size=0", "e.vhdx", "5M"],
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "block_size=3M",
            "e.vhdx",
            "5M",
        ],
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "block_size=abc",
            "e.vhdx",
            "5M",
        ],
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "block_state_zero=x",
            "e.vhdx",
            "5M",
        ],
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "cluster_size=64k",
            "e.vhdx",
            "5M",
        ],
        &["create", "-f", "vhdx", "-b", "q.vhdx", "e.vhdx", "5M"],
        &["create", "-f", "vhdx", "e.vhdx"],
        &["create", "-f", "vhdx", "-o", "help", "e.vhdx"],
    ] {
        let (code, _, _) = same(dir, args);
        let made = dir.join("e.vhdx").exists();
        if code != Some(0) && made {
            assert_eq!(std::fs::metadata(dir.join("e.vhdx")).unwrap().len(), 0);
        }
        let _ = std::fs::remove_file(dir.join("e.vhdx"));
    }
    // A fixed disk the file system cannot hold (ext4 and tmpfs stop
    // short of 64 TiB): refused as QEMU refuses it.
    same(
        dir,
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "subformat=fixed",
            "e.vhdx",
            "64T",
        ],
    );
}

fn convert_both(dir: &Path, input: &str, opts: &[&str]) {
    let args = [&["convert", "-O", "vhdx"], opts, &[input]].concat();
    qemu_img_in(dir, &[&args[..], &["q.vhdx"]].concat());
    same(dir, &[&args[..], &["r.vhdx"]].concat());
    same_image(&dir.join("q.vhdx"), &dir.join("r.vhdx"), true);
    assert_qemu_check_clean(&dir.join("r.vhdx"));
    assert_qemu_compare_equal(&dir.join(input), &dir.join("r.vhdx"));
    for cmd in ["info", "map"] {
        same(dir, &[cmd, "--output=json", "r.vhdx"]);
    }
    same(dir, &["check", "r.vhdx"]);
}

/// The input of the design notes: data in four blocks (one of them a
/// single sector), an allocated zero block, holes elsewhere.
fn sparse_input(p: &Path) {
    let f = std::fs::File::create(p).unwrap();
    f.set_len(20 * MIB).unwrap();
    f.write_all_at(&[0x11; 4096], 0).unwrap();
    f.write_all_at(&[0x22; 64 << 10], 5 * MIB + (100 << 10))
        .unwrap();
    f.write_all_at(&vec![0x33; MIB as usize], 13 * MIB).unwrap();
    f.write_all_at(&[0x44; 512], 17 * MIB + 512).unwrap();
    f.write_all_at(&vec![0; MIB as usize], 9 * MIB).unwrap();
}

#[test]
fn convert_and_dd_place_blocks_as_qemu() {
    let d = tempdir();
    let dir = d.path();
    sparse_input(&dir.join("s.raw"));
    for opts in [
        &[][..],
        &["-o", "block_size=1M"],
        &["-o", "block_size=1M,block_state_zero=off"],
        &["-o", "subformat=fixed"],
        &["-o", "subformat=fixed,block_size=1M"],
        &["-o", "subformat=fixed,block_state_zero=off,block_size=1M"],
        &["-S", "0", "-o", "block_size=1M"],
    ] {
        convert_both(dir, "s.raw", opts);
    }
    // Not a whole number of blocks, nor of sectors.
    write_mixed_raw(&dir.join("in.raw"), (37 << 20) + 1000, 8);
    convert_both(dir, "in.raw", &["-o", "block_size=2M"]);
    convert_both(dir, "in.raw", &[]);
    // From qcow2 (zero clusters, holes), and from a VHDX rimg wrote.
    qemu_img_in(dir, &["convert", "-O", "qcow2", "in.raw", "in.qcow2"]);
    qemu_img_in(
        dir,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "in.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    rimg_tests::qemu_io(
        &dir.join("top.qcow2"),
        &["write -z 0 3M", "write -P 0x5a 5M 100k"],
    );
    convert_both(dir, "top.qcow2", &["-o", "block_size=1M"]);
    std::fs::rename(dir.join("r.vhdx"), dir.join("again.vhdx")).unwrap();
    convert_both(dir, "again.vhdx", &[]);
    // Into an existing image (-n): what it holds is overwritten (QEMU
    // allocates the zero blocks too, so only the content is compared).
    qemu_img_in(dir, &["convert", "-O", "vhdx", "top.qcow2", "n.vhdx"]);
    same(dir, &["convert", "-n", "-O", "vhdx", "in.raw", "n.vhdx"]);
    assert_qemu_check_clean(&dir.join("n.vhdx"));
    assert_qemu_compare_equal(&dir.join("in.raw"), &dir.join("n.vhdx"));
    let dd = ["dd", "-O", "vhdx", "bs=192k", "count=100", "if=in.raw"];
    qemu_img_in(dir, &[&dd[..], &["of=q.vhdx"]].concat());
    same(dir, &[&dd[..], &["of=r.vhdx"]].concat());
    same_image(&dir.join("q.vhdx"), &dir.join("r.vhdx"), true);
    assert_qemu_check_clean(&dir.join("r.vhdx"));
}

fn create(path: &Path, size: u64, opts: impl FnOnce(&mut qcow2::CreateOptions)) {
    let mut o = qcow2::CreateOptions {
        format: qcow2::Format::Vhdx,
        size,
        ..Default::default()
    };
    o.foreign.block_size = Some(MIB);
    opts(&mut o);
    qcow2::create(path, &o).unwrap();
}

fn open_rw(path: &Path) -> Arc<dyn Image> {
    let o = OpenOptions {
        writable: true,
        format: Some(qcow2::Format::Vhdx),
        ..Default::default()
    };
    qcow2::open(path, &o).unwrap()
}

/// Adjusts creation options.
type Adjust = fn(&mut qcow2::CreateOptions);

/// Writes through the engine at odd offsets and lengths, zeroes among
/// them, against a model of the disk, into each subformat; then QEMU
/// writes into rimg's image (its blocks go after rimg's).
#[test]
fn engine_writes_read_back_and_check_clean() {
    let d = tempdir();
    let dir = d.path();
    let size = (9 << 20) + 512;
    let subformats: [(&str, Adjust); 3] = [
        ("dynamic", |_| {}),
        ("fixed", |o| o.foreign.subformat = Some("fixed".into())),
        ("fixed-nozero", |o| {
            o.foreign.subformat = Some("fixed".into());
            o.foreign.block_state_zero = Some(false);
        }),
    ];
    for (sub, opts) in subformats {
        let path = dir.join(format!("w-{sub}.vhdx"));
        create(&path, size, opts);
        let img = open_rw(&path);
        let mut model = scattered_writes(img.as_ref(), 7);
        assert!(
            read_all(img.as_ref()) == model,
            "{sub}: engine reads differ"
        );
        assert!(matches!(
            img.resize(size * 2),
            Err(qcow2::Error::ResizeUnsupported)
        ));
        img.flush().unwrap();
        drop(img);
        let raw = dir.join("model.raw");
        std::fs::write(&raw, &model).unwrap();
        assert_qemu_check_clean(&path);
        assert_qemu_compare_equal(&raw, &path);
        // QEMU allocates after rimg's blocks and finds nothing amiss.
        rimg_tests::qemu_io(&path, &["write -P 0x66 0 4k", "write -P 0x67 9M 512"]);
        model[..4096].fill(0x66);
        model[9 << 20..].fill(0x67);
        std::fs::write(&raw, &model).unwrap();
        assert_qemu_check_clean(&path);
        assert_qemu_compare_equal(&raw, &path);
    }
}

/// The first write of each open updates both headers (MS-VHDX 2.2.2.1):
/// the sequence number advances by one per header, the file write GUID
/// is the open's, each data write GUID new, and the header in use stays
/// the same one, as QEMU leaves it. An open that writes nothing changes
/// no byte.
#[test]
fn each_writing_open_updates_the_headers_once() {
    let d = tempdir();
    let path = d.path().join("h.vhdx");
    create(&path, 8 * MIB, |_| {});
    let before = std::fs::read(&path).unwrap();
    let s = headers(&before)[0].1;
    let img = open_rw(&path);
    assert_eq!(read_all(img.as_ref()), vec![0; 8 << 20]);
    img.flush().unwrap();
    drop(img);
    assert!(
        std::fs::read(&path).unwrap() == before,
        "an open without writes changed the file"
    );
    let mut seen = Vec::new();
    for round in 0..2u64 {
        let img = open_rw(&path);
        for k in 0..3u64 {
            img.write_at(&[round as u8 + 1; 4096], k * MIB).unwrap();
        }
        drop(img);
        let hs = headers(&std::fs::read(&path).unwrap());
        assert!(hs[0].0 && hs[1].0, "round {round}: a header is invalid");
        assert_eq!(
            (hs[0].1, hs[1].1),
            (s + 2 + 2 * round, s + 3 + 2 * round),
            "round {round}: sequence numbers"
        );
        assert_eq!(hs[0].2, hs[1].2, "round {round}: file write GUIDs");
        assert_ne!(hs[0].3, hs[1].3, "round {round}: data write GUIDs");
        seen.push(hs[0].2);
        seen.extend([hs[0].3, hs[1].3]);
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "a GUID was used twice");
    assert_qemu_check_clean(&path);
    let o = qemu_io_output(&path, &["read -P 2 0 4k", "read -P 2 2M 4k"]);
    assert!(
        !o.contains("Pattern verification failed") && o.contains("read 4096/4096"),
        "{o}"
    );
}

/// Threads write interleaved 4 KiB pieces of the same new blocks, in
/// different orders: each block is allocated once.
#[test]
fn racing_writers_allocate_each_block_once() {
    const BLOCKS: u64 = 12;
    let d = tempdir();
    let path = d.path().join("race.vhdx");
    for round in 0..4u64 {
        create(&path, BLOCKS * MIB, |_| {});
        let empty = std::fs::metadata(&path).unwrap().len();
        let img = open_rw(&path);
        let got = race_new_units(&img, BLOCKS, MIB, round);
        drop(img);
        let file = std::fs::metadata(&path).unwrap().len();
        assert_eq!(
            file,
            empty + BLOCKS * MIB,
            "round {round}: blocks allocated twice"
        );
        assert_qemu_check_clean(&path);
        std::fs::write(d.path().join("want.raw"), &got).unwrap();
        assert_qemu_compare_equal(&d.path().join("want.raw"), &path);
    }
}

/// What qemu-io prints (stdout and stderr) for `cmds` on `path`.
fn qemu_io_output(path: &Path, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "vhdx"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(path.to_str().unwrap());
    let o = rimg_tests::run_in("qemu-io", path.parent().unwrap(), &args);
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

/// Sets BAT entry `i` of the image at `path` to `v`.
fn set_bat(path: &Path, i: u64, v: u64) {
    let img = std::fs::read(path).unwrap();
    let bat = le64(&img, 0x30000 + 16 + 16);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&v.to_le_bytes(), bat + 8 * i).unwrap();
}

/// What QEMU refuses to write, rimg refuses with the same errno: a
/// present block at offset 0 (EFAULT: it would write over the file's
/// start) and a partially present one (EIO); and a log that may hold
/// entries is not written past.
#[test]
fn what_qemu_cannot_write_is_refused() {
    let d = tempdir();
    let dir = d.path();
    let path = dir.join("x.vhdx");
    create(&path, 4 * MIB, |_| {});
    set_bat(&path, 1, 6);
    set_bat(&path, 2, 4);
    let before = std::fs::read(&path).unwrap();
    let img = open_rw(&path);
    for (off, errno) in [(MIB + 512, "Bad address"), (2 * MIB, "Input/output error")] {
        let e = img.write_at(&[9; 512], off).unwrap_err().to_string();
        assert!(e.contains(errno), "{off}: {e}");
    }
    drop(img);
    let after = std::fs::read(&path).unwrap();
    assert!(
        after[..0x10000] == before[..0x10000],
        "the file's start was written"
    );
    assert!(
        after[0x30000..] == before[0x30000..],
        "a refused write changed the file"
    );
    for (qemu_cmd, want) in [
        ("write 1M 512", "Bad address"),
        ("write 2M 512", "Input/output error"),
    ] {
        let text = qemu_io_output(&path, &[qemu_cmd]);
        assert!(text.contains(want), "qemu-io {qemu_cmd}: {text}");
    }
    // rimg bench writes through the split data path, which a writable
    // VHDX has not: refused, and said why.
    let (code, _, err) = rimg_tests::rimg_in(dir, &["bench", "-w", "-c", "10", "x.vhdx"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("bench does not support writing to vhdx images"),
        "{err}"
    );
    // Operations the format has no way to do: refused as qemu-img does.
    qemu_img_in(dir, &["create", "-f", "vhdx", "y.vhdx", "4M"]);
    for args in [
        &["resize", "y.vhdx", "8M"][..],
        &["amend", "-o", "block_size=1M", "y.vhdx"],
        &["snapshot", "-c", "s1", "y.vhdx"],
        &["snapshot", "-l", "y.vhdx"],
        &["commit", "y.vhdx"],
        &["check", "-r", "all", "y.vhdx"],
    ] {
        same(dir, args);
    }
}
