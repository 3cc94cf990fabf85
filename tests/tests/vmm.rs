//! rimg-vmm on this machine's /dev/kvm with a freestanding probe guest
//! (tests/guests/virtio_probe.rs): a virtio-mmio disk served by
//! rimg-vhost-blk and a NIC served by rimg-vhost-net, driven by the guest
//! through rings in its own memory, the VMM only relaying the setup; a
//! disk served by qemu-storage-daemon and resized while the guest runs.
//! Plus what the vCPUs see of CPUID and the application-processor start
//! (tests/guests/cpu_probe.rs), the dump a triple fault leaves, and the
//! VMM's usage errors.

use std::os::fd::OwnedFd;
use std::time::Duration;

use rimg_tests::blk::Daemon;
use rimg_tests::daemon::thread_seccomp;
use rimg_tests::net::{pair_stats, NetDaemon, Netns};
use rimg_tests::qsd::Qsd;
use rimg_tests::vmm::{
    cpu_guest, frame_to_guest, guest_frame, packet_socket, probe_guest, run_vmm, send_frame,
    VmmProcess,
};
use rimg_tests::{assert_qemu_check_clean, qemu_create, qemu_img, qemu_raw_content, tempdir};

const T: Duration = Duration::from_secs(60);

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn probe_guest_writes_reads_and_flushes_a_vhost_blk_disk() {
    let d = tempdir();
    let img = d.path().join("disk.qcow2");
    let sock = d.path().join("blk.sock");
    let o = qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    assert!(o.status.success());
    let daemon = Daemon::start(&sock, &img, &[]).unwrap();
    let disk = format!("socket={}", s(&sock));
    let r = run_vmm(
        &[
            "--kernel",
            s(probe_guest()),
            "--memory",
            "64M",
            "--disk",
            &disk,
        ],
        T,
    );
    r.assert_clean_exit();
    for line in [
        "blk: capacity 0x20000 sectors",
        "blk: write status 0x0",
        "blk: read status 0x0",
        "blk: data verified",
        "blk: flush status 0x0",
        "probe: devices 0x1",
        "probe: PASS",
    ] {
        assert!(r.console.contains(line), "missing {line:?}:\n{}", r.console);
    }
    let (st, log) = daemon.terminate();
    assert!(st.success(), "daemon: {log}");
    assert_qemu_check_clean(&img);
    // The guest wrote 4 KiB at sector 40; the rest stays zero.
    let raw = qemu_raw_content(&img, &d.path().join("raw"));
    let at = 40 * 512;
    for i in 0..4096usize {
        let want = (i as u8) ^ 0x5a ^ ((i >> 8) as u8);
        assert_eq!(raw[at + i], want, "byte {i} of the guest's write");
    }
    assert!(raw[..at].iter().all(|&b| b == 0));
    assert!(raw[at + 4096..].iter().all(|&b| b == 0));
}

/// qemu-storage-daemon serves the disk, which the test grows from 64 to
/// 128 MiB (QMP block_resize) while the guest waits: the daemon announces
/// the change on the backend request channel (CONFIG_CHANGE_MSG), the VMM
/// fetches the config space again, moves ConfigGeneration on and raises
/// the configuration-change interrupt. The probe guest takes the
/// device's interrupt, finds InterruptStatus bit 1 (cleared by its ack),
/// a new generation and the new capacity, and writes 4 KiB past the old
/// end. The VMM runs with its default seccomp filter (kill), its
/// request-channel thread included.
#[test]
fn probe_guest_sees_an_online_resize_announced_by_qemu_storage_daemon() {
    online_resize(
        Qsd::start_blk,
        |qsd| {
            qsd.qmp(
                "block_resize",
                serde_json::json!({ "node-name": "disk", "size": 128 << 20 }),
            )
            .unwrap_or_else(|e| panic!("block_resize: {e}"));
        },
        |qsd| {
            let (st, log) = qsd.quit();
            assert!(st.success(), "qemu-storage-daemon: {log}");
        },
    );
}

/// The same with rimg-vhost-blk, resized through its control socket.
#[test]
fn probe_guest_sees_an_online_resize_announced_by_rimg_vhost_blk() {
    online_resize(
        |img, sock| {
            let ctl = sock.with_extension("ctl");
            let d = Daemon::start(sock, img, &["--control", s(&ctl)]).unwrap();
            (d, ctl)
        },
        |(_, ctl)| {
            let r =
                rimg_tests::control::ok(ctl, "resize", serde_json::json!({ "size": 128 << 20 }));
            assert_eq!(r["frontend-notified"], true, "{r}");
        },
        |(d, _)| {
            let (st, log) = d.terminate();
            assert!(st.success(), "rimg-vhost-blk: {log}");
        },
    );
}

/// The probe guest in its resize mode on the disk served at `sock`
/// (with the VMM's control socket at `control`), once it waits for the
/// configuration change.
fn resize_guest(sock: &std::path::Path, control: Option<&std::path::Path>) -> VmmProcess {
    let disk = format!("socket={}", s(sock));
    let mut args = vec![
        "--kernel",
        s(probe_guest()),
        "--memory",
        "64M",
        "--disk",
        &disk,
        "--cmdline",
        "blk-resize",
    ];
    if let Some(c) = control {
        args.extend(["--control", s(c)]);
    }
    let vmm = VmmProcess::spawn(&args);
    assert!(
        vmm.wait_for_console("blk: waiting for a config change", T),
        "the guest never got to its wait:\n{}",
        vmm.console_so_far()
    );
    vmm
}

/// A 64 MiB qcow2 disk served by the backend `start` makes, grown to
/// 128 MiB by `resize` while the probe guest waits for the change; the
/// guest must take the config interrupt, see the new capacity and write
/// past the old end. `stop` ends the backend (its exit checked there).
fn online_resize<B>(
    start: impl FnOnce(&std::path::Path, &std::path::Path) -> B,
    resize: impl FnOnce(&mut B),
    stop: impl FnOnce(B),
) {
    let d = tempdir();
    let img = d.path().join("disk.qcow2");
    let sock = d.path().join("blk.sock");
    qemu_create(&img, "", "64M");
    let mut backend = start(&img, &sock);
    let vmm = resize_guest(&sock, None);
    let req = thread_seccomp(vmm.id())
        .into_iter()
        .find(|t| t.0 == "vhost-req")
        .expect("a request-channel thread (the backend offers BACKEND_REQ)");
    assert_eq!((req.1.as_str(), req.2.as_str()), ("2", "2"), "{req:?}");
    resize(&mut backend);
    let r = vmm.finish(T);
    assert!(
        !r.console.contains("blk: timeout"),
        "the guest saw no configuration change in time:\n{}\n{}",
        r.console,
        r.stderr
    );
    r.assert_clean_exit();
    for line in [
        "blk: capacity 0x20000 sectors",
        "blk: flush status 0x0",
        "blk: interrupt, InterruptStatus 0x3",
        "blk: InterruptStatus after the ack 0x1",
        "blk: new capacity 0x40000 sectors",
        "blk: past the old end: data verified",
        "probe: PASS",
    ] {
        assert!(r.console.contains(line), "missing {line:?}:\n{}", r.console);
    }
    let generations = r
        .console
        .lines()
        .find_map(|l| l.strip_prefix("blk: config generation "))
        .and_then(|g| g.split_once(" -> "))
        .unwrap_or_else(|| panic!("no generation line:\n{}", r.console));
    assert_ne!(generations.0, generations.1, "ConfigGeneration unchanged");
    assert!(!r.stderr.contains("request channel"), "{}", r.stderr);
    stop(backend);
    assert_qemu_check_clean(&img);
    let info = qemu_img(&["info", "--output=json", s(&img)]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 128 << 20, "{info}");
    // The guest's 4 KiB at the old end (sector 0x20000).
    let raw = qemu_raw_content(&img, &d.path().join("raw"));
    let at = 64 << 20;
    for i in 0..4096usize {
        let want = (i as u8) ^ 0x5a ^ ((i >> 8) as u8);
        assert_eq!(raw[at + i], want, "byte {i} past the old end");
    }
}

/// rimg-vmm's control socket: the owner's only, query-status and
/// query-devices, malformed input answered, `pause` holding the guest
/// while its disk grows under it (the config interrupt waits with the
/// parked vCPU: no guest output in that window), `resume`, and `quit`
/// ending the VMM with status 0; the seccomp filter in kill mode.
#[test]
fn vmm_control_socket_pauses_resumes_and_quits() {
    use rimg_tests::control::{error, ok, request};
    use serde_json::json;
    let d = tempdir();
    let img = d.path().join("disk.qcow2");
    let sock = d.path().join("blk.sock");
    let blk_ctl = d.path().join("blk.ctl");
    let vmm_ctl = d.path().join("vmm.ctl");
    qemu_create(&img, "", "64M");
    let daemon = Daemon::start(&sock, &img, &["--control", s(&blk_ctl)]).unwrap();
    let vmm = resize_guest(&sock, Some(&vmm_ctl));
    let mode = std::fs::metadata(&vmm_ctl).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let st = ok(&vmm_ctl, "query-status", json!({}));
    assert_eq!(st, json!({"status": "running", "running": true}));
    let devs = ok(&vmm_ctl, "query-devices", json!({}));
    assert_eq!(devs[0]["type"], "virtio-blk", "{devs}");
    assert_eq!(devs[0]["socket"], s(&sock), "{devs}");
    assert_eq!(devs[0]["failed"], false, "{devs}");
    assert_eq!(devs[0]["state"], "up", "{devs}");
    assert_eq!(devs[0]["reconnects"], 0, "{devs}");
    let bad = request(&vmm_ctl, "{not json");
    assert!(
        bad["error"]["desc"].as_str().unwrap().contains("JSON"),
        "{bad}"
    );
    assert!(error(&vmm_ctl, "no-such", json!({})).contains("not been found"));

    ok(&vmm_ctl, "pause", json!({}));
    assert_eq!(ok(&vmm_ctl, "query-status", json!({}))["status"], "paused");
    let r = ok(&blk_ctl, "resize", json!({ "size": 128 << 20 }));
    assert_eq!(r["frontend-notified"], true, "{r}");
    // An observation window, not a synchronisation: a paused guest must
    // not take the interrupt.
    assert!(
        !vmm.wait_for_console("blk: interrupt", Duration::from_millis(700)),
        "the guest ran while paused:\n{}",
        vmm.console_so_far()
    );
    ok(&vmm_ctl, "resume", json!({}));
    assert!(
        vmm.wait_for_console("probe: PASS", T),
        "the guest did not finish after resume:\n{}",
        vmm.console_so_far()
    );
    let r = vmm.finish(T);
    r.assert_clean_exit();
    assert!(
        r.console.contains("blk: new capacity 0x40000 sectors"),
        "{}",
        r.console
    );
    let (st, log) = daemon.terminate();
    assert!(st.success(), "rimg-vhost-blk: {log}");
    assert_qemu_check_clean(&img);
}

/// `quit` on the control socket ends a running guest's VMM with status 0.
#[test]
fn vmm_control_quit_ends_the_vmm() {
    let d = tempdir();
    let img = d.path().join("disk.qcow2");
    let sock = d.path().join("blk.sock");
    let vmm_ctl = d.path().join("vmm.ctl");
    qemu_create(&img, "", "64M");
    let daemon = Daemon::start(&sock, &img, &[]).unwrap();
    let vmm = resize_guest(&sock, Some(&vmm_ctl));
    let a = rimg_tests::control::request(&vmm_ctl, r#"{"execute":"quit"}"#);
    assert_eq!(a, serde_json::json!({"return": {}}));
    let r = vmm.finish(T);
    r.assert_clean_exit();
    assert!(r.stderr.contains("quit (control socket)"), "{}", r.stderr);
    let (st, log) = daemon.terminate();
    assert!(st.success(), "rimg-vhost-blk: {log}");
    assert_qemu_check_clean(&img);
}

#[test]
fn probe_guest_sends_and_receives_frames_through_vhost_net() {
    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let ns = Netns::new("vmm");
    let d = tempdir();
    let sock = d.path().join("net.sock");
    let daemon = NetDaemon::start_in(&ns, &sock, &["--tap-create", "vt0"]).unwrap();
    // No IPv6 on the TAP: only the guest's frames cross it.
    ns.command("sysctl")
        .args(["-qw", "net.ipv6.conf.vt0.disable_ipv6=1"])
        .status()
        .unwrap();
    let pkt = ns.run_in(|| packet_socket("vt0"));
    let net = format!("socket={},mac=52:54:00:12:34:56", s(&sock));
    let guest = probe_guest().to_path_buf();
    let vmm = std::thread::spawn(move || {
        run_vmm(
            &["--kernel", s(&guest), "--memory", "64M", "--net", &net],
            T,
        )
    });
    // The guest's frame: broadcast from its MAC, ethertype 0x88b5.
    let frame = guest_frame(&pkt, T);
    assert_eq!(&frame[..6], &[0xff; 6]);
    assert_eq!(&frame[6..12], &MAC, "the MAC given with --net mac=");
    assert_eq!(&frame[14..25], b"RIMG-VMM-TX");
    assert_eq!(frame.len(), 60);
    // A frame into the TAP, to the guest.
    send_frame(&pkt, &frame_to_guest(MAC));
    let r = vmm.join().unwrap();
    r.assert_clean_exit();
    for line in ["net: tx done", "net: rx payload RIMG-VMM-RX", "probe: PASS"] {
        assert!(r.console.contains(line), "missing {line:?}:\n{}", r.console);
    }
    let (st, log) = daemon.terminate();
    assert!(st.success(), "daemon: {log}");
}

/// The probe guest's frame with `payload` (ethertype 0x88b5); frames
/// with other payloads seen first are returned too, in order.
fn frames_until(pkt: &OwnedFd, payload: &[u8]) -> Vec<Vec<u8>> {
    let mut seen = Vec::new();
    loop {
        let f = guest_frame(pkt, T);
        let done = f[14..].starts_with(payload);
        seen.push(f);
        if done {
            return seen;
        }
    }
}

/// Two queue pairs behind rimg-vhost-net: the VMM offers MQ and CTRL_VQ
/// and runs the control queue. The probe guest finds pair 1 disabled at
/// DRIVER_OK (a frame queued on it does not go out), gets ERR or an
/// unused return for bad commands and chains, enables pair 1 with
/// VQ_PAIRS_SET 2 (OK), and then its frames leave on both pairs; the
/// daemon's per-pair counters confirm which pair carried them. After a
/// reset the guest takes CTRL_VQ without MQ: the control queue moves to
/// index 2 and pair 0 alone carries frames.
#[test]
fn probe_guest_enables_a_second_queue_pair_through_the_control_queue() {
    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];
    let ns = Netns::new("vmmmq");
    let d = tempdir();
    let sock = d.path().join("net.sock");
    // No IPv6 on the TAP from its creation: only the test's frames cross
    // it towards the guest.
    ns.command("sysctl")
        .args(["-qw", "net.ipv6.conf.default.disable_ipv6=1"])
        .status()
        .unwrap();
    let daemon = NetDaemon::start_in(
        &ns,
        &sock,
        &["--tap-create", "vq0", "--num-queue-pairs", "2"],
    )
    .unwrap();
    let pkt = ns.run_in(|| packet_socket("vq0"));
    let net = format!("socket={},mac=52:54:00:12:34:57", s(&sock));
    let guest = probe_guest().to_path_buf();
    let vmm = std::thread::spawn(move || {
        run_vmm(
            &["--kernel", s(&guest), "--memory", "64M", "--net", &net],
            T,
        )
    });
    // Pair 0's frame first: pair 1's early frame leaves only once the
    // guest has enabled the pair, after it saw pair 0's completion.
    let frames = frames_until(&pkt, b"RIMG-MQ-TX1\0");
    let payloads: Vec<String> = frames
        .iter()
        .map(|f| {
            let p = &f[14..];
            let end = p.iter().position(|&b| b == 0).unwrap_or(p.len());
            String::from_utf8_lossy(&p[..end]).into_owned()
        })
        .collect();
    assert_eq!(
        payloads,
        ["RIMG-MQ-TX0", "RIMG-MQ-TX1-EARLY", "RIMG-MQ-TX1"],
        "frames on the TAP, in order"
    );
    for f in &frames {
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(f.len(), 60);
    }
    send_frame(&pkt, &frame_to_guest(MAC));
    // After a device reset, CTRL_VQ without MQ: pair 0 only.
    let after = frames_until(&pkt, b"RIMG-CTRL-ONLY-TX0");
    assert_eq!(after.len(), 1, "unexpected frames after the reset");
    let r = vmm.join().unwrap();
    r.assert_clean_exit();
    for line in [
        "net: max_virtqueue_pairs 0x2",
        "net: tx0 done",
        "net: tx1 held while pair 1 disabled",
        "net: ctrl pairs-3 len 0x1 ack 0x1",
        "net: ctrl pairs-0 len 0x1 ack 0x1",
        "net: ctrl bogus len 0x1 ack 0x1",
        "net: ctrl short len 0x1 ack 0x1",
        "net: ctrl outside len 0x1 ack 0x1",
        "net: ctrl order len 0x1 ack 0x1",
        "net: ctrl no-ack len 0x0 ack 0xff",
        "net: ctrl loop len 0x0 ack 0xff",
        "net: ctrl runaway avail index ignored",
        "net: ctrl VQ_PAIRS_SET 2 len 0x1 ack 0x0",
        "net: tx1 early frame sent after VQ_PAIRS_SET",
        "net: tx1 done",
        "net: rx payload RIMG-VMM-RX on pair",
        "net: ctrl ctrl-only pairs-1 len 0x1 ack 0x1",
        "net: ctrl ctrl-only bogus len 0x1 ack 0x1",
        "net: ctrl-only tx done",
        "probe: PASS",
    ] {
        assert!(r.console.contains(line), "missing {line:?}:\n{}", r.console);
    }
    // Each bad chain was logged, and nothing panicked.
    for needle in [
        "VQ_PAIRS_SET 3 outside 1..=2",
        "VQ_PAIRS_SET 0 outside 1..=2",
        "class 127 command 127 not supported",
        "VQ_PAIRS_SET with 1 bytes of data instead of 2",
        "is outside guest memory",
        "device-readable descriptor after a device-writable one",
        "no device-writable byte for the ack",
        "chain cut short",
        "entries ahead (queue size 8): ignored",
        "chain 200 not returned",
        "VQ_PAIRS_SET without VIRTIO_NET_F_MQ",
        "class 9 command 9 not supported",
    ] {
        assert!(
            r.stderr.contains(needle),
            "no {needle:?} in the VMM's log:\n{}",
            r.stderr
        );
    }
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    let (st, log) = daemon.terminate();
    assert!(st.success(), "daemon: {log}");
    // (tx frames, tx gso, rx frames, rx gso) per pair, from the daemon's
    // disconnect log: two frames out on pair 0 (one before the reset, one
    // after), two on pair 1, and the test's frame in on one of them.
    let stats = pair_stats(&log);
    let tx = |p: usize| stats.iter().find(|s| s.0 == p).map_or(0, |s| s.1[0]);
    let rx: u64 = stats.iter().map(|s| s.1[2]).sum();
    assert_eq!((tx(0), tx(1)), (2, 2), "pair counters: {stats:?}\n{log}");
    assert!(rx >= 1, "pair counters: {stats:?}\n{log}");
}

/// The backend dies while the guest waits for a frame: the VMM marks the
/// device failed (NEEDS_RESET in its status, config interrupt), says so,
/// and still ends cleanly when the guest powers off.
#[test]
fn dead_backend_marks_the_device_failed() {
    let ns = Netns::new("vmmdead");
    let d = tempdir();
    let sock = d.path().join("net.sock");
    let daemon = NetDaemon::start_in(&ns, &sock, &["--tap-create", "vd0"]).unwrap();
    let pkt = ns.run_in(|| packet_socket("vd0"));
    let net = format!("socket={}", s(&sock));
    let guest = probe_guest().to_path_buf();
    let vmm = std::thread::spawn(move || {
        run_vmm(
            &["--kernel", s(&guest), "--memory", "64M", "--net", &net],
            T,
        )
    });
    guest_frame(&pkt, T);
    // SIGKILL (Drop), mid-run.
    drop(daemon);
    let r = vmm.join().unwrap();
    assert_eq!(r.code, Some(0), "{}\n{}", r.console, r.stderr);
    assert!(
        r.stderr.contains("disconnected; device marked failed"),
        "{}",
        r.stderr
    );
    // DRIVER_OK | FEATURES_OK | DRIVER | ACK with NEEDS_RESET (0x40).
    assert!(
        r.console
            .contains("net: no frame received, device status 0x4f"),
        "{}",
        r.console
    );
    assert!(r.console.contains("probe: FAIL"), "{}", r.console);
}

fn one_line_error(args: &[&str], needle: &str) {
    let r = run_vmm(args, T);
    assert_eq!(r.code, Some(1), "{args:?}: {}", r.stderr);
    let err = r.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(err.starts_with("rimg-vmm: "), "{err}");
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn usage_errors_are_one_clear_line() {
    let d = tempdir();
    let k = s(probe_guest());
    let missing = d.path().join("nothing");
    one_line_error(&["--kernel", s(&missing)], "cannot open kernel");
    one_line_error(&["--kernel", k, "--memory", "12Q"], "invalid size '12Q'");
    one_line_error(&["--kernel", k, "--memory", "1M"], "too small");
    one_line_error(&["--kernel", k, "--cpus", "0"], "--cpus 0");
    one_line_error(
        &["--kernel", k, "--disk", "readonly"],
        "socket=PATH is required",
    );
    one_line_error(
        &["--kernel", k, "--net", "socket=/x,mac=zz:00:00:00:00:00"],
        "invalid MAC",
    );
    let text = d.path().join("text");
    std::fs::write(&text, b"not a kernel").unwrap();
    one_line_error(&["--kernel", s(&text)], "neither an ELF");
    // A socket path nobody listens on: absent, and a stale socket file.
    let absent = format!("socket={}", s(&d.path().join("absent.sock")));
    one_line_error(&["--kernel", k, "--disk", &absent], "no such socket");
    let stale = d.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let stale_spec = format!("socket={}", s(&stale));
    one_line_error(&["--kernel", k, "--disk", &stale_spec], "stale.sock");
}

/// `cpuid LEAF SUB eax ebx ecx edx` lines of the CPU probe guest.
fn cpuid_line(console: &str, leaf: u32, sub: u32) -> [u32; 4] {
    let head = format!("cpuid {leaf:#x} {sub:#x} ");
    let line = console
        .lines()
        .find_map(|l| l.strip_prefix(&head))
        .unwrap_or_else(|| panic!("no {head:?} line:\n{console}"));
    let v: Vec<u32> = line
        .split_whitespace()
        .map(|w| u32::from_str_radix(w.trim_start_matches("0x"), 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

fn hex_field(line: &str, key: &str) -> u32 {
    let w = line
        .split(key)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {key:?} in {line:?}"));
    u32::from_str_radix(w.trim_start_matches("0x"), 16).unwrap()
}

/// Two vCPUs: vCPU 0 reports its CPUID and starts vCPU 1 with INIT and
/// two start-up IPIs (the path Linux takes); vCPU 1 reports what CPUID
/// tells it in real mode. Each vCPU has its own APIC ID in every
/// topology leaf, the x2APIC leaf describes a 2-core package (KVM alone
/// reports only its first subleaf), and nothing the VMM and KVM cannot
/// back is offered: no PMU (leaf 0xa, PDCM, AMD counter extensions,
/// PerfMonV2), no nested virtualisation.
#[test]
fn vcpus_see_their_topology_and_no_pmu_or_nested_virtualisation() {
    let r = run_vmm(
        &[
            "--kernel",
            s(cpu_guest()),
            "--memory",
            "64M",
            "--cpus",
            "2",
            "--cmdline",
            "twocpus",
        ],
        T,
    );
    r.assert_clean_exit();
    let c = &r.console;
    assert!(c.contains("cpu: done"), "{c}");
    let l1 = cpuid_line(c, 1, 0);
    assert_eq!(l1[1] >> 24, 0, "vCPU 0 APIC ID");
    assert_eq!((l1[1] >> 16) & 0xff, 2, "logical processors");
    assert_ne!(l1[2] & (1 << 31), 0, "hypervisor bit");
    assert_eq!(l1[2] & (1 << 5), 0, "VMX");
    assert_eq!(l1[2] & (1 << 15), 0, "PDCM");
    assert_eq!(cpuid_line(c, 0xa, 0), [0; 4], "architectural PMU leaf");
    let x1 = cpuid_line(c, 0x8000_0001, 0);
    for (bit, what) in [
        (2, "SVM"),
        (23, "PerfCtrExtCore"),
        (24, "PerfCtrExtNB"),
        (28, "PerfCtrExtLLC"),
    ] {
        assert_eq!(x1[2] & (1 << bit), 0, "{what} offered");
    }
    assert_eq!(cpuid_line(c, 0x8000_0022, 0), [0; 4], "PerfMonV2");
    let b0 = cpuid_line(c, 0xb, 0);
    let b1 = cpuid_line(c, 0xb, 1);
    assert_eq!((b0[1], (b0[2] >> 8) & 0xff, b0[3]), (1, 1, 0), "SMT level");
    assert_eq!(
        (b1[0], b1[1], (b1[2] >> 8) & 0xff, b1[3]),
        (1, 2, 2, 0),
        "core level"
    );
    assert_eq!(cpuid_line(c, 0x8000_0008, 0)[2] & 0xff, 1, "NC = cores - 1");
    let topoext = x1[2] & (1 << 22) != 0;
    if topoext {
        assert_eq!(
            cpuid_line(c, 0x8000_001e, 0)[0],
            0,
            "vCPU 0 extended APIC ID"
        );
    }
    let ap = c
        .lines()
        .find(|l| l.starts_with("ap: "))
        .unwrap_or_else(|| panic!("no AP line:\n{c}"));
    assert!(!ap.contains("no answer"), "vCPU 1 did not start:\n{c}");
    assert_eq!(hex_field(ap, "leaf1.ebx ") >> 24, 1, "vCPU 1 APIC ID: {ap}");
    assert_eq!(hex_field(ap, "b.edx "), 1, "vCPU 1 x2APIC ID: {ap}");
    if topoext {
        assert_eq!(hex_field(ap, "8000001e.eax "), 1, "{ap}");
        assert_eq!(hex_field(ap, "8000001e.ebx ") & 0xff, 1, "core ID: {ap}");
    }
}

/// A guest that triple-faults (empty IDT, then a divide error) ends the
/// VMM with status 1 (not a seccomp kill: the filter is on, in kill
/// mode) after a dump on stderr: registers, segments, control
/// registers, descriptor tables, pending events, and the vCPU's last
/// exits with the guest's marked ones (two POST-port writes and an MMIO
/// read) last, in order; and the dump of the other vCPU, stopped for it.
#[test]
fn triple_fault_dumps_registers_and_recent_exits() {
    let r = run_vmm(
        &[
            "--kernel",
            s(cpu_guest()),
            "--memory",
            "64M",
            "--cpus",
            "2",
            "--cmdline",
            "twocpus fault",
        ],
        T,
    );
    assert!(!r.timed_out, "{}\n{}", r.console, r.stderr);
    assert_eq!(r.code, Some(1), "{}\n{}", r.console, r.stderr);
    assert!(r.console.contains("fault: now"), "{}", r.console);
    let e = &r.stderr;
    assert!(!e.contains("panicked"), "{e}");
    assert!(
        e.contains("rimg-vmm: vCPU 0 state (triple fault (KVM_EXIT_SHUTDOWN)):"),
        "{e}"
    );
    for needle in [
        "registers:\n  rip 0x",
        " rsp 0x",
        " rflags 0x",
        "  rax 0x",
        " r15 0x",
        "  cs  sel 0x",
        "  ss  sel 0x",
        "  tr  sel 0x",
        "  gdt base 0x",
        "  idt base 0x",
        "  cr0 0x",
        " cr2 0x",
        " cr3 0x",
        " cr4 0x",
        "  efer 0x",
        "  events: exception injected ",
        "recent exits (16 of ",
    ] {
        assert!(e.contains(needle), "no {needle:?} in the dump:\n{e}");
    }
    // The state at the fault where the host keeps it (the guest's empty
    // IDT and its marker in rax), or KVM's INIT state, said so, where it
    // does not (AMD re-initialises a vCPU on a shutdown intercept).
    assert!(
        (e.contains("idt base 0x0000000000000000 limit 0x0000")
            && e.contains("rax 0x545249504c454654"))
            || e.contains("this is the INIT state"),
        "{e}"
    );
    let exits: Vec<&str> = e
        .lines()
        .skip_while(|l| !l.starts_with("recent exits"))
        .skip(1)
        .take_while(|l| l.starts_with("  -"))
        .collect();
    assert_eq!(exits.len(), 16, "{e}");
    let last3: Vec<String> = exits[13..]
        .iter()
        .map(|l| l.split_once("us ").unwrap().1.to_string())
        .collect();
    assert_eq!(
        last3,
        [
            "out        port 0x80 len 1 data 0xd1",
            "out        port 0x80 len 1 data 0xd2",
            "mmio-read  addr 0xd0000ff0 len 4 data 0xffffffff",
        ],
        "{e}"
    );
    // vCPU 1 (started, halted in its real-mode trampoline) was stopped
    // and dumped too, after vCPU 0 and before the VMM's last word.
    let other = e
        .find("rimg-vmm: vCPU 1 state (stopped after another vCPU failed):")
        .unwrap_or_else(|| panic!("no dump of vCPU 1:\n{e}"));
    assert!(other > e.find("vCPU 0 state").unwrap(), "{e}");
    assert!(
        e[other..].contains("  cs  sel 0x1000 base 0x0000000000010000"),
        "vCPU 1 not in its trampoline:\n{e}"
    );
    assert_eq!(
        e.lines().last(),
        Some("rimg-vmm: vCPU 0: triple fault (KVM_EXIT_SHUTDOWN)"),
        "{e}"
    );
}

/// SIGUSR1 while the guest runs (here: both vCPUs halted for good, a
/// guest that hangs): every vCPU writes its state dump on stderr and
/// the VMM runs on; a second SIGUSR1 gives a second round.
#[test]
fn sigusr1_dumps_every_vcpu_and_the_guest_runs_on() {
    let d = tempdir();
    let (out, err) = (d.path().join("out"), d.path().join("err"));
    let mut child = std::process::Command::new(rimg_tests::workspace_bin("rimg-vmm"))
        .args(["--kernel", s(cpu_guest()), "--memory", "64M", "--cpus", "2"])
        .args(["--cmdline", "twocpus stay"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    // Polls a file until `ok` holds for its text (the VMM writes it as it
    // goes); fails with both files after the deadline.
    let until = |p: &std::path::Path, ok: &dyn Fn(&str) -> bool| {
        let deadline = std::time::Instant::now() + T;
        while !ok(&read(p)) {
            assert!(
                std::time::Instant::now() < deadline,
                "stdout:\n{}\nstderr:\n{}",
                read(&out),
                read(&err)
            );
            // A poll interval, not a synchronisation: the condition decides.
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let dumps = |e: &str, id: u32| {
        e.matches(&format!(
            "rimg-vmm: vCPU {id} state (on request (SIGUSR1); running on):"
        ))
        .count()
    };
    // The AP reported, both vCPUs run: the handler is long installed.
    until(&out, &|o| o.contains("cpu: staying"));
    for round in 1..=2 {
        // SAFETY: kill(2) on our child, which has not been waited for.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) }, 0);
        until(&err, &|e| dumps(e, 0) == round && dumps(e, 1) == round);
        assert!(child.try_wait().unwrap().is_none(), "{}", read(&err));
    }
    let e = read(&err);
    for needle in [
        "registers:\n  rip 0x",
        "  cr0 0x",
        " cr3 0x",
        "recent exits (",
        "  events: ",
    ] {
        assert!(e.contains(needle), "{needle:?} in\n{e}");
    }
    assert!(!e.contains("panicked"), "{e}");
    child.kill().unwrap();
    child.wait().unwrap();
}
