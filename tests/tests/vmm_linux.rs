//! Real Linux on rimg-vmm. This machine's KVM cannot boot Linux
//! (shared/TESTBED.md), so an outer QEMU TCG guest with AMD SVM loads
//! kvm_amd and becomes the host: it runs static builds of rimg-vmm,
//! rimg-vhost-blk and rimg-vhost-net; rimg-vmm boots the Debian 6.1 cloud
//! kernel with 2 vCPUs, a qcow2 disk and a NIC. The inner guest makes a
//! filesystem, verifies files across a remount, pings the TAP side and
//! moves data both ways over TCP, then powers off. The qcow2 image comes
//! back to the host on a raw virtio disk of the outer guest and passes
//! `qemu-img check`. (Scripts and setup: rimg_tests::vmm.)

use std::time::Duration;

use rimg_tests::assert_qemu_check_clean;
use rimg_tests::vmm::run_linux_stack;

fn field<'a>(console: &'a str, tag: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.split_once(tag).map(|(_, r)| r))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {tag:?} line:\n{console}"))
}

#[test]
fn linux_boots_on_rimg_vmm_with_qcow2_disk_and_nic() {
    let run = run_linux_stack(Duration::from_secs(240));
    let out = &run.out;
    println!("{}", out.console);
    out.assert_success();
    let c = &out.console;
    assert!(c.contains("/dev/kvm"), "no /dev/kvm in the outer guest");
    assert_eq!(field(c, "inner-cpus "), "2", "inner guest CPUs");
    assert!(
        c.contains("virtio devices: 0x0002 0x0001"),
        "disk and NIC:\n{c}"
    );
    assert!(c.contains("/mnt/f: OK"), "file check after remount:\n{c}");
    assert!(c.contains("2 packets received"), "ping:\n{c}");
    assert!(
        c.contains("INNER-PASS"),
        "inner script did not finish:\n{c}"
    );
    assert_eq!(field(c, "vmm-exit "), "0");
    assert_eq!(
        field(c, "inner-out "),
        field(c, "outer-recv "),
        "inner->TAP data"
    );
    assert_eq!(
        field(c, "outer-blob "),
        field(c, "inner-in "),
        "TAP->inner data"
    );
    let _ = field(c, "disk-size ");
    assert_qemu_check_clean(&run.image);
}
