//! Issue 20's acceptance run: a Linux guest under rimg-vmm keeps running
//! a verifying disk load and TCP transfers both ways while its block and
//! net daemons are SIGKILLed and restarted, 10 times each (nested setup:
//! rimg_tests::nested_restart has the scripts). The guest sees no I/O
//! error, no data mismatch and no reset; rimg-vmm reconnects every time
//! and never marks a device failed (a restarted block daemon resubmits
//! what its predecessor had taken, if a kill caught any: the count is
//! printed); both streams arrive with matching sums;
//! and the image passes `qemu-img check` clean (a killed block daemon
//! leaves the image dirty; the next one repairs it as it opens it).

use std::time::{Duration, Instant};

use rimg_tests::nested_restart::{run_restart_stack, KILLS, ROUNDS};

fn field<'a>(c: &'a str, tag: &str) -> &'a str {
    c.lines()
        .find_map(|l| l.split_once(tag).map(|(_, r)| r))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {tag:?} line"))
}

fn count(c: &str, needle: &str) -> usize {
    c.lines().filter(|l| l.contains(needle)).count()
}

/// Not in the default run: it takes 7 minutes of nested TCG on a quiet
/// machine and up to 20 under load, more than a CI run has room for,
/// and the emulator under it (QEMU 7.2's TCG SVM) still loses an
/// occasional nested round of its own (issue 24; see
/// `rimg_tests::nested`'s kvm_amd parameters): `cargo test -p
/// rimg-tests --test vmm_restart -- --ignored`. The default run keeps
/// the same restarts under a QEMU guest (vhost_blk_restart_guest,
/// vhost_net_restart) and rimg-vmm's reconnects (vmm_reconnect).
#[test]
#[ignore = "nested TCG, minutes long: run with --ignored (see the docs)"]
fn guest_keeps_disk_and_network_across_daemon_kills() {
    let t = Instant::now();
    let run = run_restart_stack(Duration::from_secs(1500));
    let c = &run.out.console;
    println!("{c}");
    println!("nested restart run: {:.0} s", t.elapsed().as_secs_f64());
    assert!(!run.out.timed_out, "the outer guest timed out");
    assert_eq!(field(c, "vmm-exit "), "0", "inner VMM exit status");
    assert!(c.contains("INNER-PASS"), "inner script did not finish");
    assert_eq!(
        field(c, "inner-verified "),
        ROUNDS.to_string(),
        "rounds verified at the end"
    );
    let kills = |d: &str| count(c, &format!("outer-kill {d} "));
    assert_eq!(
        (kills("blk"), kills("net")),
        (KILLS as usize, KILLS as usize),
        "kills per daemon"
    );
    // Every kill was a kill (137), never a crash or a seccomp death
    // (159); the supervisors' last instances ended on SIGTERM with 0.
    for d in ["blk", "net"] {
        let exits: Vec<&str> = c
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{d}| {d}-exit ")))
            .collect();
        let killed = exits.iter().filter(|e| **e == "137").count();
        assert_eq!(killed, KILLS as usize, "{d} exits: {exits:?}");
        assert_eq!(exits.last(), Some(&"0"), "{d} exits: {exits:?}");
        assert!(
            exits.iter().all(|e| ["0", "1", "137"].contains(e)),
            "{d} exits: {exits:?}"
        );
    }
    // rimg-vmm reconnected each device after each kill and failed none.
    let reconnected = |sock: &str| count(c, &format!("backend {sock} reconnected"));
    assert_eq!(reconnected("/tmp/blk.sock"), KILLS as usize);
    assert_eq!(reconnected("/tmp/net.sock"), KILLS as usize);
    assert!(!c.contains("marked failed"), "a device was failed");
    for bad in ["I/O error", "is not a head", "out of range", "verify-fail"] {
        assert!(!c.contains(bad), "{bad:?} in the console");
    }
    assert_eq!(
        field(c, "inner-out-sum "),
        field(c, "outer-recv-sum "),
        "guest->host stream differs"
    );
    assert_eq!(
        field(c, "outer-sent-sum "),
        field(c, "inner-in-sum "),
        "host->guest stream differs"
    );
    // Each killed rimg-vhost-blk left the image dirty and the next one
    // repaired it at open; the last one closed it cleanly.
    assert!(
        c.contains("not closed cleanly"),
        "no restarted block daemon repaired the image"
    );
    rimg_tests::assert_qemu_check_clean(&run.image);
    // How many requests the restarted block daemons resubmitted: a
    // kill lands inside the daemon's short window around a request only
    // by chance here (2 of 3 complete runs found none), so it is
    // reported, not required; vhost_blk_inflight (requests held at the
    // kill) and vhost_blk_restart_guest require resubmissions.
    let resubmitted: Vec<&str> = c
        .lines()
        .filter_map(|l| l.split_once("resubmitting ").map(|(_, r)| r))
        .filter_map(|r| r.split_whitespace().next())
        .collect();
    println!("requests resubmitted per block daemon start: {resubmitted:?}");
}
