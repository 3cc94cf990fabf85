//! A real Linux guest (QEMU TCG, virtio_blk driver over vhost-user-blk-pci
//! with two queues) against rimg-vhost-blk: ext2 across a remount, fstrim,
//! O_DIRECT at scattered offsets, blkdiscard; then the host checks the
//! image with qemu-img and reads back what the guest wrote.

use std::path::Path;
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use rimg_tests::blk::Daemon;
use rimg_tests::guest::Guest;
use rimg_tests::{assert_qemu_check_clean, qemu_img, qemu_raw_content, tempdir};

const DISK_MIB: u64 = 128;
/// Offsets (MiB) of the O_DIRECT pattern writes, off the 64 KiB grid's
/// cluster-aligned boundaries in some cases (17, 41 are odd MiB).
const DIRECT_MIB: &[u64] = &[3, 17, 41, 77, 101];
/// The blkdiscard range, in MiB.
const DISCARD_MIB: (u64, u64) = (8, 4);
const PATTERN_LEN: usize = 256 * 1024;

fn script() -> String {
    let offs: Vec<String> = DIRECT_MIB.iter().map(|m| (m * 16).to_string()).collect();
    let offs = offs.join(" ");
    let (d_off, d_len) = DISCARD_MIB;
    format!(
        r#"
q=$(ls /sys/block/vda/mq | wc -l)
echo "vda queues: $q"
test "$q" = 2
mke2fs -F /dev/vda >/dev/null
mount -t ext2 /dev/vda /mnt
i=0
while [ $i -lt 8 ]; do
  dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i * 8 + 1)) 2>/dev/null
  i=$((i + 1))
done
cp /pattern /mnt/pattern
cd /mnt && sha256sum f* pattern > /tmp/sums && cd /
umount /mnt
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 /dev/vda /mnt
cd /mnt && sha256sum -c /tmp/sums && cd /
rm /mnt/f3 /mnt/f5 /mnt/f7
fstrim -v /mnt
umount /mnt
for b in {offs}; do
  dd if=/pattern of=/dev/vda bs=64k seek=$b oflag=direct conv=notrunc 2>/dev/null
done
for b in {offs}; do
  dd if=/dev/vda of=/tmp/rb bs=64k skip=$b count=4 iflag=direct 2>/dev/null
  cmp /tmp/rb /pattern
done
blkdiscard -o $(({d_off} << 20)) -l $(({d_len} << 20)) /dev/vda
dd if=/dev/zero of=/tmp/z bs=64k count=$(({d_len} * 16)) 2>/dev/null
dd if=/dev/vda of=/tmp/d bs=64k skip=$(({d_off} * 16)) count=$(({d_len} * 16)) iflag=direct 2>/dev/null
cmp /tmp/d /tmp/z
echo GUEST-OK
"#
    )
}

fn guest_run(img: &Path, format: &str) {
    let dir = img.parent().unwrap();
    let sock = dir.join("blk.sock");
    let mut pattern = vec![0u8; PATTERN_LEN];
    rand::rngs::StdRng::seed_from_u64(0x6b6c_6f63).fill_bytes(&mut pattern);

    let daemon = Daemon::start(&sock, img, &["--format", format, "--num-queues", "2"])
        .unwrap_or_else(|e| panic!("{e}"));
    let out = Guest::new(&script())
        .file("/pattern", pattern.clone(), 0o644)
        .vhost_user_blk(&sock, 2)
        .run();
    let (st, log) = daemon.terminate();
    out.assert_success();
    assert!(out.console.contains("GUEST-OK"), "{}", out.console);
    assert!(st.success(), "daemon exit {st}: {log}");
    // fstrim found free blocks to discard and the device accepted them.
    let trimmed = out
        .console
        .lines()
        .find_map(|l| {
            l.strip_prefix("/mnt: ")?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no fstrim line:\n{}", out.console));
    assert!(trimmed > 0, "fstrim trimmed nothing:\n{}", out.console);

    if format == "qcow2" {
        assert_qemu_check_clean(img);
    }
    println!("{}", out.console);
    let content = qemu_raw_content(img, &dir.join("content.raw"));
    assert_eq!(content.len() as u64, DISK_MIB << 20);
    for m in DIRECT_MIB {
        let off = (m << 20) as usize;
        assert!(
            content[off..off + PATTERN_LEN] == pattern[..],
            "O_DIRECT data at {m} MiB differs"
        );
    }
    let (d_off, d_len) = (
        (DISCARD_MIB.0 << 20) as usize,
        (DISCARD_MIB.1 << 20) as usize,
    );
    assert!(
        content[d_off..d_off + d_len].iter().all(|&b| b == 0),
        "discarded range does not read as zeroes"
    );
}

#[test]
fn linux_guest_qcow2_two_queues() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    let o = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().unwrap(),
        &format!("{DISK_MIB}M"),
    ]);
    assert!(o.status.success());
    guest_run(&img, "qcow2");
}

#[test]
fn linux_guest_raw_two_queues() {
    let dir = tempdir();
    let img = dir.path().join("disk.raw");
    let o = qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        img.to_str().unwrap(),
        &format!("{DISK_MIB}M"),
    ]);
    assert!(o.status.success());
    guest_run(&img, "raw");
}

/// The harness itself: a failing script is reported as failing, with the
/// exit status the script returned.
#[test]
fn guest_script_failure_is_reported() {
    let out = Guest::new("echo before\nexit 7\n").run();
    assert!(!out.timed_out, "{}", out.console);
    assert_eq!(out.status, Some(7), "{}", out.console);
    assert!(out.console.contains("before"));
}

/// Online resize end to end: the control socket's `resize` grows the
/// image while the guest runs, rimg-vhost-blk tells QEMU on the backend
/// request channel (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG), QEMU raises
/// the config interrupt, and the guest's virtio_blk sees the new
/// capacity without a reboot and can write past the old end.
#[test]
fn linux_guest_sees_the_disk_grow_online() {
    const OLD_MIB: u64 = 64;
    const NEW_MIB: u64 = 128;
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    rimg_tests::qemu_create(&img, "", &format!("{OLD_MIB}M"));
    let sock = dir.path().join("blk.sock");
    let ctl = dir.path().join("ctl.sock");
    let mut pattern = vec![0u8; PATTERN_LEN];
    rand::rngs::StdRng::seed_from_u64(0x7265_7369).fill_bytes(&mut pattern);
    let daemon = Daemon::start(&sock, &img, &["--control", ctl.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("{e}"));
    let (old, new) = (OLD_MIB << 11, NEW_MIB << 11);
    // The guest waits (bounded) for the new size, then writes past the
    // old end and reads it back.
    let script = format!(
        r#"
echo "size-before $(cat /sys/block/vda/size)"
# A GET_ID request: the host's cue to resize.
cat /sys/block/vda/serial >/dev/null
i=0
while [ "$(cat /sys/block/vda/size)" = {old} ] && [ $i -lt 1200 ]; do
  sleep 0.1
  i=$((i + 1))
done
echo "size-after $(cat /sys/block/vda/size)"
dmesg | grep -i "capacity change"
test "$(cat /sys/block/vda/size)" = {new}
dd if=/pattern of=/dev/vda bs=64k seek={seek} oflag=direct conv=notrunc 2>/dev/null
dd if=/dev/vda of=/tmp/rb bs=64k skip={seek} count=4 iflag=direct 2>/dev/null
cmp /tmp/rb /pattern
echo GUEST-OK
"#,
        seek = (NEW_MIB - 8) * 16,
    );
    let guest = Guest::new(&script)
        .file("/pattern", pattern.clone(), 0o644)
        .vhost_user_blk(&sock, 1);
    let run = std::thread::spawn(move || guest.run());
    // The guest has seen the old size and asked for the serial number:
    // now grow the disk under it.
    let cued = rimg_tests::net::wait_for(Duration::from_secs(300), || {
        let s = rimg_tests::control::ok(&ctl, "query-stats", serde_json::json!({}));
        s["queues"][0]["get-ids"].as_u64().unwrap_or(0) > 0 || run.is_finished()
    });
    assert!(cued, "the guest never asked for its serial");
    let r = rimg_tests::control::ok(&ctl, "resize", serde_json::json!({ "size": NEW_MIB << 20 }));
    assert_eq!(r["frontend-notified"], true, "{r}");
    let out = run.join().unwrap();
    let (st, log) = daemon.terminate();
    println!("{}", out.console);
    out.assert_success();
    assert!(
        out.console.contains(&format!("size-before {old}")),
        "{}",
        out.console
    );
    assert!(
        out.console.contains(&format!("size-after {new}")),
        "{}",
        out.console
    );
    // The kernel's own record of the online change.
    assert!(
        out.console
            .contains(&format!("capacity change from {old} to {new}")),
        "{}",
        out.console
    );
    assert!(out.console.contains("GUEST-OK"), "{}", out.console);
    assert!(st.success(), "daemon exit {st}: {log}");
    assert_qemu_check_clean(&img);
    let content = qemu_raw_content(&img, &dir.path().join("content.raw"));
    assert_eq!(content.len() as u64, NEW_MIB << 20);
    let off = ((NEW_MIB - 8) << 20) as usize;
    assert!(content[off..off + PATTERN_LEN] == pattern[..]);
}
