//! Real Linux on rimg-vmm. This machine's KVM cannot boot Linux
//! (shared/TESTBED.md), so an outer QEMU TCG guest with AMD SVM loads
//! kvm_amd and becomes the host: it runs static builds of rimg-vmm,
//! rimg-vhost-blk and rimg-vhost-net; rimg-vmm boots the Debian 6.1 cloud
//! kernel with 2 vCPUs, a qcow2 disk and a NIC with 2 queue pairs. The
//! inner guest makes a filesystem, verifies files across a remount, sees
//! both queue pairs, pings the TAP side and moves data both ways over TCP
//! (one flow per vCPU, so both pairs carry frames both ways), then powers
//! off. The qcow2 image comes back to the host on a raw virtio disk of the
//! outer guest and passes `qemu-img check`. (Scripts and setup:
//! rimg_tests::vmm.)

use std::time::Duration;

use rimg_tests::assert_qemu_check_clean;
use rimg_tests::net::pair_stats;
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
    // Two combined channels: the guest took MQ and VQ_PAIRS_SET 2 was
    // answered OK by the VMM's control queue.
    assert!(
        c.contains("eth0 queues: rx-0 rx-1 tx-0 tx-1 "),
        "guest does not see 2 queue pairs:\n{c}"
    );
    assert!(c.contains("2 packets received"), "ping:\n{c}");
    assert!(
        c.contains("INNER-PASS"),
        "inner script did not finish:\n{c}"
    );
    assert_eq!(field(c, "vmm-exit "), "0");
    // The second boot reboots at once: the kernel's keyboard-controller
    // reset ends rimg-vmm cleanly, and it says so.
    assert!(c.contains("reboot| INNER-REBOOT"), "reboot run:\n{c}");
    assert!(
        c.contains("reboot| rimg-vmm: guest reset; exiting"),
        "reboot run:\n{c}"
    );
    assert_eq!(field(c, "reboot-exit "), "0");
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
    // (tx frames, tx gso, rx frames, rx gso) per pair from the net
    // daemon's disconnect log: both pairs carried frames both ways.
    let stats = pair_stats(c);
    println!("pairs: {stats:?}");
    for p in 0..2 {
        let s = stats
            .iter()
            .find(|s| s.0 == p)
            .unwrap_or_else(|| panic!("no counters for pair {p}: {stats:?}"));
        assert!(s.1[0] > 0 && s.1[2] > 0, "pair {p} idle: {stats:?}");
    }
    let _ = field(c, "disk-size ");
    assert_qemu_check_clean(&run.image);
}
