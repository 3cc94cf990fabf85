//! The two-host story, on one machine: a "storage host" network
//! namespace exports a golden image read-only with rimg-nbd over TCP; on
//! a "compute host" namespace, joined to it by a veth pair, rimg-vhost-blk
//! serves a qcow2 overlay whose backing file is the golden image's NBD
//! URL, and a Linux guest under QEMU reads the golden data through it and
//! writes its own (copy-on-write fills read the golden clusters over
//! NBD). No packet leaves the two namespaces.

use std::path::Path;

use rand::{RngCore, SeedableRng};
use rimg_tests::daemon::DaemonProcess;
use rimg_tests::guest::Guest;
use rimg_tests::net::Netns;
use rimg_tests::{run_ok, tempdir, workspace_bin};
use sha2::{Digest, Sha256};

const GOLDEN_MIB: u64 = 64;
/// The guest writes the pattern here: 3 MiB + 4 KiB lies inside a golden
/// cluster (a copy-on-write fill over NBD), 40 MiB past the golden data.
const WRITES: [u64; 2] = [(3 << 20) + 4096, 40 << 20];
const PATTERN_LEN: usize = 192 << 10;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_guest_boots_an_overlay_backed_by_a_golden_image_on_another_host() {
    let d = tempdir();
    // The golden image: 16 MiB of data at the start, the rest empty.
    let mut golden_bytes = vec![0u8; (GOLDEN_MIB << 20) as usize];
    rand::rngs::StdRng::seed_from_u64(0x901d).fill_bytes(&mut golden_bytes[..16 << 20]);
    let golden_raw = d.path().join("golden.raw");
    std::fs::write(&golden_raw, &golden_bytes).unwrap();
    let golden = d.path().join("golden.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&golden_raw),
            s(&golden),
        ],
    );
    let want_sum = format!("{:x}", Sha256::digest(&golden_bytes[..16 << 20]));

    let storage = Netns::new("nbd-a");
    let compute = Netns::new("nbd-b");
    let (va, vb) = (
        format!("rn{}a", std::process::id() % 10000),
        format!("rn{}b", std::process::id() % 10000),
    );
    run_ok(
        "ip",
        &["link", "add", &va, "type", "veth", "peer", "name", &vb],
    );
    run_ok("ip", &["link", "set", &va, "netns", &storage.name]);
    run_ok("ip", &["link", "set", &vb, "netns", &compute.name]);
    storage.ip(&["addr", "add", "10.77.0.1/24", "dev", &va]);
    storage.ip(&["link", "set", &va, "up"]);
    compute.ip(&["addr", "add", "10.77.0.2/24", "dev", &vb]);
    compute.ip(&["link", "set", &vb, "up"]);

    // The storage host: the golden image, read-only, many clients.
    let mut cmd = storage.command(workspace_bin("rimg-nbd"));
    cmd.env("RUST_LOG", "info")
        .args([
            "-b",
            "10.77.0.1",
            "-p",
            "10809",
            "-t",
            "-e",
            "0",
            "-r",
            "-x",
            "golden",
        ])
        .arg(&golden);
    let nbd = DaemonProcess::spawn(cmd, &golden).unwrap_or_else(|e| panic!("rimg-nbd: {e}"));

    // The compute host: an overlay on the NBD URL (created without
    // reaching the server: -u with the size given).
    let url = "nbd://10.77.0.1:10809/golden";
    let top = d.path().join("top.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            url,
            "-F",
            "raw",
            s(&top),
            &format!("{GOLDEN_MIB}M"),
        ],
    );
    let sock = d.path().join("blk.sock");
    let mut cmd = compute.command(workspace_bin("rimg-vhost-blk"));
    cmd.arg("--socket")
        .arg(&sock)
        .arg("--image")
        .arg(&top)
        .args(["--num-queues", "2"]);
    let blk = DaemonProcess::spawn(cmd, &sock).unwrap_or_else(|e| panic!("rimg-vhost-blk: {e}"));

    let mut pattern = vec![0u8; PATTERN_LEN];
    rand::rngs::StdRng::seed_from_u64(0x7a77).fill_bytes(&mut pattern);
    let writes: Vec<String> = WRITES.iter().map(|o| (o / 4096).to_string()).collect();
    let script = format!(
        r#"
sum=$(dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
echo "golden sum: $sum"
test "$sum" = "{want_sum}"
for b in {w}; do
  dd if=/pattern of=/dev/vda bs=4k seek=$b oflag=direct conv=notrunc 2>/dev/null
done
echo 3 > /proc/sys/vm/drop_caches
for b in {w}; do
  dd if=/dev/vda of=/tmp/rb bs=4k skip=$b count={n} iflag=direct 2>/dev/null
  cmp /tmp/rb /pattern
done
echo GUEST-OK
"#,
        w = writes.join(" "),
        n = PATTERN_LEN / 4096
    );
    let out = Guest::new(&script)
        .file("/pattern", pattern.clone(), 0o644)
        .vhost_user_blk(&sock, 2)
        .run();
    let (st, log) = blk.terminate();
    out.assert_success();
    assert!(out.console.contains("GUEST-OK"), "{}", out.console);
    assert!(st.success(), "rimg-vhost-blk exit {st}: {log}");

    // Judged on the compute host, through the same server: the overlay
    // checks clean and holds the golden data under the guest's writes.
    let check = compute
        .command("qemu-img")
        .args(["check", s(&top)])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let flat = d.path().join("flat.raw");
    let conv = compute
        .command("qemu-img")
        .args(["convert", "-O", "raw", s(&top), s(&flat)])
        .output()
        .unwrap();
    assert!(
        conv.status.success(),
        "{}",
        String::from_utf8_lossy(&conv.stderr)
    );
    let mut want = golden_bytes;
    for &o in &WRITES {
        want[o as usize..o as usize + PATTERN_LEN].copy_from_slice(&pattern);
    }
    assert!(
        std::fs::read(&flat).unwrap() == want,
        "the overlay's content differs"
    );
    let (st, log) = nbd.terminate();
    assert!(st.success(), "rimg-nbd exit {st}: {log}");
    // The golden image is untouched.
    let out = run_ok("qemu-img", &["compare", s(&golden), s(&golden_raw)]);
    assert!(out.contains("identical"), "{out}");
}
