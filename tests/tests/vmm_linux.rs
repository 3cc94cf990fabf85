//! Real Linux on rimg-vmm. This machine's KVM cannot boot Linux
//! (shared/TESTBED.md), so an outer QEMU TCG guest with AMD SVM loads
//! kvm_amd and becomes the host: it runs static builds of rimg-vmm,
//! rimg-vhost-blk and rimg-vhost-net; rimg-vmm boots the Debian 6.1 cloud
//! kernel with 2 vCPUs, a qcow2 disk and a NIC with 2 queue pairs. The
//! inner guest makes a filesystem, verifies files across a remount, sees
//! its disk grow online (`rimg resize` on the outer side, through the
//! daemon's control socket) and writes past the old end, sees both queue
//! pairs, pings the TAP side and moves data both ways over TCP
//! (one flow per vCPU, so both pairs carry frames both ways), then powers
//! off. The qcow2 image comes back to the host on a raw virtio disk of the
//! outer guest and passes `qemu-img check`. (Scripts and setup:
//! rimg_tests::nested.)
//!
//! The environment fails now and then by itself: QEMU's TCG emulation of
//! nested SVM, under the outer guest's KVM, kills about one round in ten
//! under load whichever VMM runs inside (measured with QEMU's microvm
//! too; QEMU 10 as the outer emulator did worse than 7.2: 3 of 15 rounds
//! against 0 of 15). So a failed round is printed and run once more; the
//! test passes only if that second round passes.
//!
//! Stress mode: `RIMG_NESTED_ROUNDS=N` boots the whole stack N times in a
//! row, each round in a fresh outer guest with a fresh image, with no
//! second chance, and fails on the first bad round with its console (a triple fault's register
//! dump and recent exits are in the `inner|` lines).
//! `RIMG_NESTED_KEEP_GOING=1` runs all N rounds and fails at the end
//! with the count, for measuring a failure rate. `RIMG_NESTED_INNER=
//! qemu-microvm` runs the same rounds with QEMU's microvm machine as the
//! inner VMM instead, for comparison; `RIMG_NESTED_VMM_BIN=PATH` runs a
//! given static rimg-vmm build instead of this tree's.

use std::time::{Duration, Instant};

use rimg_tests::nested::{run_linux_stack_on, InnerVmm, StackRun};
use rimg_tests::net::pair_stats;

fn field<'a>(console: &'a str, tag: &str) -> Result<&'a str, String> {
    console
        .lines()
        .find_map(|l| l.split_once(tag).map(|(_, r)| r))
        .and_then(|l| l.split_whitespace().next())
        .ok_or_else(|| format!("no {tag:?} line"))
}

fn ensure(ok: bool, what: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what.to_string())
    }
}

/// Everything one round must show; the first thing missing, as an error.
fn check(run: &StackRun, vmm: InnerVmm) -> Result<(), String> {
    let out = &run.out;
    let c = &out.console;
    ensure(!out.timed_out, "the outer guest timed out")?;
    ensure(c.contains("/dev/kvm"), "no /dev/kvm in the outer guest")?;
    // 137: SIGKILL from the outer script's watchdog, after SIGUSR1 asked
    // rimg-vmm for its vCPUs' state and the daemons for theirs.
    ensure(
        field(c, "vmm-exit ") != Ok("137"),
        "the inner guest hung: the watchdog killed the inner VMM (vCPU and daemon dumps above)",
    )?;
    ensure(field(c, "inner-cpus ")? == "2", "inner guest CPUs")?;
    if vmm == InnerVmm::Rimg {
        ensure(
            c.contains("virtio devices: 0x0002 0x0001"),
            "disk and NIC not both seen",
        )?;
    }
    ensure(c.contains("/mnt/f: OK"), "file check after remount")?;
    // rimg resize through the daemon's control socket, seen by the guest
    // at once (the kernel's own line) and usable past the old end.
    ensure(c.contains("resize| Image resized."), "rimg resize")?;
    ensure(
        field(c, "resize| resize-rc ")? == "0",
        "rimg resize exit status",
    )?;
    ensure(field(c, "inner-size-before ")? == "131072", "size before")?;
    ensure(
        field(c, "inner-size-after ")? == "262144",
        "size after the resize",
    )?;
    ensure(
        c.contains("capacity change from 131072 to 262144"),
        "no capacity change in the guest's kernel log",
    )?;
    ensure(c.contains("inner-grown-ok"), "data past the old end")?;
    // Two combined channels: the guest took MQ and VQ_PAIRS_SET 2 was
    // answered OK by the VMM's control queue.
    ensure(
        c.contains("eth0 queues: rx-0 rx-1 tx-0 tx-1 "),
        "guest does not see 2 queue pairs",
    )?;
    ensure(c.contains("2 packets received"), "ping")?;
    let exit = field(c, "vmm-exit ")?;
    ensure(exit == "0", &format!("inner VMM exit status {exit}"))?;
    ensure(c.contains("INNER-PASS"), "inner script did not finish")?;
    if vmm == InnerVmm::Rimg {
        // The second boot reboots at once: the kernel's keyboard-controller
        // reset ends rimg-vmm cleanly, and it says so.
        ensure(c.contains("reboot| INNER-REBOOT"), "reboot run")?;
        ensure(
            c.contains("reboot| rimg-vmm: guest reset; exiting"),
            "reboot run: no reset message",
        )?;
        ensure(field(c, "reboot-exit ")? == "0", "reboot run exit status")?;
    }
    ensure(
        field(c, "inner-out ")? == field(c, "outer-recv ")?,
        "inner->TAP data differs",
    )?;
    ensure(
        field(c, "outer-blob ")? == field(c, "inner-in ")?,
        "TAP->inner data differs",
    )?;
    // (tx frames, tx gso, rx frames, rx gso) per pair from the net
    // daemon's disconnect log: both pairs carried frames both ways.
    let stats = pair_stats(c);
    for p in 0..2 {
        let s = stats
            .iter()
            .find(|s| s.0 == p)
            .ok_or_else(|| format!("no counters for pair {p}: {stats:?}"))?;
        ensure(
            s.1[0] > 0 && s.1[2] > 0,
            &format!("pair {p} idle: {stats:?}"),
        )?;
    }
    field(c, "disk-size ")?;
    ensure(out.status == Some(0), "outer script failed")?;
    let o = rimg_tests::qemu_img(&["check", run.image.to_str().unwrap()]);
    ensure(
        o.status.success(),
        &format!(
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn env_u32(name: &str, default: u32) -> u32 {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    }
}

#[test]
fn linux_boots_on_rimg_vmm_with_qcow2_disk_and_nic() {
    let vmm = InnerVmm::from_env();
    let stress = std::env::var("RIMG_NESTED_ROUNDS").is_ok();
    let mut rounds = env_u32("RIMG_NESTED_ROUNDS", 1).max(1);
    let keep_going = env_u32("RIMG_NESTED_KEEP_GOING", 0) != 0;
    let mut failed = Vec::new();
    let mut retried = false;
    let mut round = 0;
    while round < rounds {
        round += 1;
        let t = Instant::now();
        // A healthy round takes 30-100 s; the inner VMM's own watchdog
        // (150 s) must fire, and its dumps come out, before this one.
        let run = run_linux_stack_on(vmm, Duration::from_secs(400));
        let secs = t.elapsed().as_secs_f64();
        let result = check(&run, vmm);
        if rounds == 1 || result.is_err() {
            println!("{}", run.out.console);
        }
        match result {
            Ok(()) => {
                // The outer KVM's complaints about the inner guest's MSR
                // accesses (e.g. AMD's legacy perf counters, which Linux
                // probes at boot), counted for comparison with failing
                // rounds.
                let msr_lines = run
                    .out
                    .console
                    .lines()
                    .filter(|l| l.to_ascii_lowercase().contains("wrmsr"))
                    .count();
                println!(
                    "nested round {round}/{rounds} ({vmm:?}): pass in {secs:.0} s \
                     ({msr_lines} outer-kernel WRMSR messages)"
                );
                if rounds == 1 {
                    println!("pairs: {:?}", pair_stats(&run.out.console));
                }
            }
            Err(why) => {
                println!("nested round {round}/{rounds} ({vmm:?}): FAIL in {secs:.0} s: {why}");
                // The emulator under the nested KVM kills about one round
                // in ten, with either VMM inside (see the module docs):
                // outside stress mode, one failed round is run again, and
                // the test passes only if that one passes.
                let retry = !stress && !retried;
                // The inner VMM's last words (a fault's dump) again, apart:
                // the inner log from its first message on.
                for l in run
                    .out
                    .console
                    .lines()
                    .filter(|l| l.starts_with("inner| "))
                    .skip_while(|l| !l.starts_with("inner| rimg-vmm:") && !l.contains("qemu"))
                {
                    println!("  {l}");
                }
                assert!(
                    keep_going || retry,
                    "nested round {round} of {rounds} ({vmm:?}) failed: {why} (console above)"
                );
                if retry {
                    println!("nested: running the round again (the failure is above)");
                    retried = true;
                    rounds += 1;
                } else {
                    failed.push(round);
                }
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{vmm:?}: {} of {rounds} nested rounds failed: rounds {failed:?}",
        failed.len()
    );
}
