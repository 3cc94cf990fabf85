//! QEMU's own qemu-iotests as the judge of rimg as qemu-img: the bash
//! tests that run on qcow2 over plain files without a VM
//! (scripts/iotests.sh), once with the installed qemu-img and once with
//! rimg in its place. rimg must pass at least [`FLOOR`] of the tests that
//! qemu-img passes, so a regression fails here; the tests it still fails
//! are printed, with the first line where its output differs.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rimg_tests::{spawn_watched, target_dir, workspace_bin};

/// Tests qemu-img passes that rimg passes too: 115 measured (the issue
/// asks for 105); two below that leaves room for a test that is timing
/// sensitive on a loaded machine, not for a regression of a feature.
const FLOOR: usize = 113;
/// The baseline: qemu-img 10.0.2 passes 116 of the 120 selected tests
/// here. Fewer means the harness or the machine broke, not rimg.
const BASELINE_MIN: usize = 110;
/// The whole run (each test also has its own deadline in the script).
const DEADLINE: Duration = Duration::from_secs(45 * 60);

fn passing(results: &Path) -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(results).unwrap_or_else(|e| panic!("{}: {e}", results.display()));
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, status)| *status == "pass")
        .map(|(t, _)| t.to_string())
        .collect()
}

#[test]
fn qemu_iotests_judge_rimg_as_qemu_img() {
    let rimg = workspace_bin("rimg");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut cmd = Command::new(root.join("scripts/iotests.sh"));
    cmd.env("RIMG", &rimg).current_dir(root);
    // Its own process group, so that a deadline takes down every test
    // it started, not only the script.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = spawn_watched(cmd, std::process::Stdio::null());
    let pgid = child.id() as i32;
    let w = child.wait(DEADLINE);
    // SAFETY: kill(2) on the process group the script led; after its exit
    // only the group's leftovers (if any) can carry that id.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let out = String::from_utf8_lossy(&w.stdout);
    println!("{out}");
    assert!(
        !w.timed_out,
        "scripts/iotests.sh still running after {DEADLINE:?}; stderr:\n{}",
        String::from_utf8_lossy(&w.stderr)
    );
    assert!(
        w.status.is_some_and(|s| s.success()),
        "scripts/iotests.sh failed: {:?}\n{}",
        w.status,
        String::from_utf8_lossy(&w.stderr)
    );
    let results = target_dir().join("iotests/results");
    let base = passing(&results.join("qemu-img.txt"));
    let ours = passing(&results.join("rimg.txt"));
    assert!(
        base.len() >= BASELINE_MIN,
        "qemu-img itself passes only {} tests: the harness is broken\n{out}",
        base.len()
    );
    let both = base.intersection(&ours).count();
    let missing: Vec<&String> = base.difference(&ours).collect();
    assert!(
        both >= FLOOR,
        "rimg passes {both} of the {} iotests qemu-img passes (floor {FLOOR}); failing: {missing:?}\n{out}",
        base.len()
    );
}
