//! Real Linux on rimg-vmm. This machine's KVM cannot boot Linux
//! (shared/TESTBED.md), so an outer QEMU TCG guest with AMD SVM loads
//! kvm_amd and becomes the host: it runs static builds of rimg-vmm,
//! rimg-vhost-blk and rimg-vhost-net; rimg-vmm boots the Debian 6.1 cloud
//! kernel with 2 vCPUs, a qcow2 disk and a NIC. The inner guest makes a
//! filesystem, verifies files across a remount, pings the TAP side and
//! moves data both ways over TCP, then powers off. The qcow2 image comes
//! back to the host on a raw virtio disk of the outer guest and passes
//! `qemu-img check`.

use std::time::Duration;

use rimg_tests::guest::{kit, Guest};
use rimg_tests::vmm::static_bins;
use rimg_tests::{assert_qemu_check_clean, qemu_img, tempdir};

const INNER: &str = r#"
echo "inner-cpus $(grep -c ^processor /proc/cpuinfo)"
mke2fs -q /dev/vda
mount /dev/vda /mnt
dd if=/dev/urandom of=/mnt/f bs=1M count=4 2>/dev/null
sha256sum /mnt/f > /tmp/sum
umount /mnt
mount /dev/vda /mnt
sha256sum -c /tmp/sum
umount /mnt
echo "virtio devices: $(cat /sys/bus/virtio/devices/*/device | tr '\n' ' ')"
ip link set eth0 up
ip addr add 10.0.0.2/24 dev eth0
ping -c 2 -W 10 10.0.0.1
dd if=/dev/urandom of=/tmp/out bs=1M count=4 2>/dev/null
echo "inner-out $(sha256sum /tmp/out)"
nc 10.0.0.1 5001 < /tmp/out
# The receiving side keeps its stdin open (busybox nc half-closes at
# stdin EOF).
mkfifo /tmp/hold
exec 3<>/tmp/hold
nc 10.0.0.1 5002 < /tmp/hold > /tmp/in
echo "inner-in $(sha256sum /tmp/in)"
echo INNER-PASS
"#;

const OUTER: &str = r#"
ls -l /dev/kvm
ip link set lo up
rimg-vhost-blk --socket /tmp/blk.sock --image /disk.qcow2 > /tmp/blk.log 2>&1 &
BLK=$!
rimg-vhost-net --socket /tmp/net.sock --tap-create tap0 > /tmp/net.log 2>&1 &
NET=$!
until grep -q serving /tmp/blk.log && grep -q serving /tmp/net.log; do usleep 20000; done
ip addr add 10.0.0.1/24 dev tap0
dd if=/dev/urandom of=/tmp/blob bs=1M count=4 2>/dev/null
echo "outer-blob $(sha256sum /tmp/blob)"
mkfifo /tmp/hold
exec 3<>/tmp/hold
nc -l -p 5001 < /tmp/hold > /tmp/recv &
RECV=$!
nc -l -p 5002 < /tmp/blob &
until netstat -ltn | grep -q ':5001 ' && netstat -ltn | grep -q ':5002 '; do usleep 20000; done
rc=0
rimg-vmm --kernel /vmlinuz --initrd /inner.cpio --memory 256M --cpus 2 \
  --cmdline "console=ttyS0 quiet panic=-1 reboot=k" \
  --disk socket=/tmp/blk.sock --net socket=/tmp/net.sock,mac=52:54:00:12:34:56 \
  > /tmp/inner.log 2>&1 || rc=$?
sed 's/^/inner| /' /tmp/inner.log
echo "vmm-exit $rc"
[ $rc = 0 ]
grep -q INNER-PASS /tmp/inner.log
wait $RECV
echo "outer-recv $(sha256sum /tmp/recv)"
kill -TERM $BLK $NET
wait $BLK
wait $NET
cat /tmp/blk.log /tmp/net.log
dd if=/disk.qcow2 of=/dev/vda bs=64k conv=fsync 2>/dev/null
echo "disk-size $(stat -c %s /disk.qcow2)"
"#;

fn field<'a>(console: &'a str, tag: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.split_once(tag).map(|(_, r)| r))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {tag:?} line:\n{console}"))
}

#[test]
fn linux_boots_on_rimg_vmm_with_qcow2_disk_and_nic() {
    let d = tempdir();
    let bins = static_bins();
    let img = d.path().join("disk.qcow2");
    let o = qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    assert!(o.status.success());
    // The outer guest writes the image back here when done.
    let back = d.path().join("back.raw");
    std::fs::File::create(&back)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();

    let inner = Guest::new(INNER)
        .module("virtio_mmio")
        .module("virtio_blk")
        .module("virtio_net")
        .initramfs_image();
    let read = |p: &std::path::Path| std::fs::read(p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    let out = Guest::new(OUTER)
        .module("kvm_amd")
        .module("tun")
        .module("virtio_pci")
        .module("virtio_blk")
        .memory_mib(1024)
        .cpus(2)
        .timeout(Duration::from_secs(240))
        .file("/vmlinuz", read(kit().kernel()), 0o644)
        .file("/inner.cpio", inner, 0o644)
        .file("/disk.qcow2", read(&img), 0o644)
        .file("/bin/rimg-vmm", read(&bins.join("rimg-vmm")), 0o755)
        .file("/bin/rimg-vhost-blk", read(&bins.join("rimg-vhost-blk")), 0o755)
        .file("/bin/rimg-vhost-net", read(&bins.join("rimg-vhost-net")), 0o755)
        .qemu_args([
            "-drive".to_string(),
            format!("file={},format=raw,if=virtio", back.display()),
        ])
        .run();
    println!("{}", out.console);
    out.assert_success();
    let c = &out.console;
    assert!(c.contains("/dev/kvm"), "no /dev/kvm in the outer guest");
    assert_eq!(field(c, "inner-cpus "), "2", "inner guest CPUs");
    assert!(c.contains("virtio devices: 0x0002 0x0001"), "disk and NIC:\n{c}");
    assert!(c.contains("/mnt/f: OK"), "file check after remount:\n{c}");
    assert!(c.contains("2 packets received"), "ping:\n{c}");
    assert!(c.contains("INNER-PASS"), "inner script did not finish:\n{c}");
    assert_eq!(field(c, "vmm-exit "), "0");
    assert_eq!(field(c, "inner-out "), field(c, "outer-recv "), "inner->TAP data");
    assert_eq!(field(c, "outer-blob "), field(c, "inner-in "), "TAP->inner data");
    // The image as the daemon left it.
    let size: usize = field(c, "disk-size ").parse().unwrap();
    let data = std::fs::read(&back).unwrap();
    std::fs::write(&img, &data[..size]).unwrap();
    assert_qemu_check_clean(&img);
}
