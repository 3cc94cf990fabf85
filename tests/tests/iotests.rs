//! QEMU's own qemu-iotests as the judge of rimg as qemu-img (the bash
//! tests that run on qcow2 over plain files without a VM) and of
//! rimg-nbd as qemu-nbd (those that run on raw images over NBD), through
//! scripts/iotests.sh. Every selected test runs with rimg's program in
//! place of QEMU's; a test it does not pass runs again with QEMU's,
//! which tells rimg's regressions (QEMU's program passes) from the
//! environment's failures (it fails too). rimg's program must pass at
//! least its [`Limits::floor`] of tests, so a regression fails here; the
//! tests it fails are printed, with the first line where its output
//! differs.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rimg_tests::{spawn_watched, target_dir, workspace_bin};

/// What a run must show, for one program judged against its QEMU twin.
struct Limits {
    /// The program judged and the one that judges it (results files
    /// `<name>.txt`, as scripts/iotests.sh writes them).
    judged: &'static str,
    reference: &'static str,
    /// Tests the judged program must pass: a regression fails here.
    floor: usize,
    /// Fewer selected means the tarball or scripts/iotests_select.py
    /// broke, and the floor would judge too little.
    selected_min: usize,
    /// More tests failing with the reference means the harness or the
    /// machine broke, not rimg.
    environment_max: usize,
}

/// rimg as qemu-img: it passes 115 of the 120 tests of QEMU 10.0.2
/// measured (the issue asks for 105; qemu-img 10.0.2 passes 116, and the
/// 4 it fails rimg fails too). Two below that leaves room for a test
/// that is timing sensitive on a loaded machine, not for a regression of
/// a feature. A test rimg passes counts without a qemu-img run: its
/// expected output is qemu-img's.
const IMG: Limits = Limits {
    judged: "rimg",
    reference: "qemu-img",
    floor: 113,
    selected_min: 110,
    environment_max: 6,
};

/// rimg-nbd as qemu-nbd (`-nbd -raw`): it passes all 21 tests selected
/// of QEMU 10.0.2, as qemu-nbd does; one below leaves room for a timing
/// sensitive test.
const NBD: Limits = Limits {
    judged: "rimg-nbd",
    reference: "qemu-nbd",
    floor: 20,
    selected_min: 20,
    environment_max: 2,
};

/// Each whole run (each test also has its own deadline in the script).
const DEADLINE: Duration = Duration::from_secs(45 * 60);

/// What the two results files say.
#[derive(Debug)]
struct Verdict {
    /// Tests the run selected (all in results/rimg.txt).
    selected: usize,
    /// Tests rimg passes.
    passed: usize,
    /// Tests rimg does not pass and qemu-img does, with rimg's status.
    regressions: Vec<(String, String)>,
    /// Tests neither passes, with rimg's and qemu-img's statuses.
    environment: Vec<(String, String, String)>,
}

/// `"<test> <status>"` lines, in order; a test twice is an error.
fn statuses(text: &str, what: &str) -> Result<BTreeMap<String, String>, String> {
    let mut m = BTreeMap::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let (t, s) = l
            .split_once(' ')
            .ok_or_else(|| format!("{what}: no status in {l:?}"))?;
        if m.insert(t.to_string(), s.to_string()).is_some() {
            return Err(format!("{what}: {t} twice"));
        }
    }
    Ok(m)
}

/// Reads results/rimg.txt (every test) and results/qemu-img.txt (the
/// re-runs): qemu-img must have re-run exactly the tests rimg did not
/// pass, or the counts would mean nothing.
fn judge(rimg: &str, qemu_img: &str) -> Result<Verdict, String> {
    let ours = statuses(rimg, "rimg.txt")?;
    let base = statuses(qemu_img, "qemu-img.txt")?;
    let mut v = Verdict {
        selected: ours.len(),
        passed: 0,
        regressions: Vec::new(),
        environment: Vec::new(),
    };
    for (t, s) in &ours {
        match (s.as_str(), base.get(t)) {
            ("pass", None) => v.passed += 1,
            ("pass", Some(_)) => {
                return Err(format!("{t}: re-run with qemu-img though rimg passes"))
            }
            (_, None) => return Err(format!("{t}: rimg {s}, not re-run with qemu-img")),
            (_, Some(b)) if b == "pass" => v.regressions.push((t.clone(), s.clone())),
            (_, Some(b)) => v.environment.push((t.clone(), s.clone(), b.clone())),
        }
    }
    if let Some(t) = base.keys().find(|t| !ours.contains_key(*t)) {
        return Err(format!("{t}: in qemu-img.txt, not in rimg.txt"));
    }
    Ok(v)
}

/// The assertions, in order: a broken harness is named as such before
/// the program is judged.
fn check(v: &Verdict, l: &Limits) -> Result<(), String> {
    if v.selected < l.selected_min {
        return Err(format!(
            "only {} tests selected (at least {}): the harness is broken",
            v.selected, l.selected_min
        ));
    }
    if v.environment.len() > l.environment_max {
        return Err(format!(
            "{} itself fails {} tests (at most {}): the harness or the machine is broken: {:?}",
            l.reference,
            v.environment.len(),
            l.environment_max,
            v.environment
        ));
    }
    if v.passed < l.floor {
        return Err(format!(
            "{} passes {} of the {} iotests (floor {}); {} passes where it does not: {:?}; \
             both fail: {:?}",
            l.judged, v.passed, v.selected, l.floor, l.reference, v.regressions, v.environment
        ));
    }
    Ok(())
}

/// Runs scripts/iotests.sh with `env` and judges its results.
fn run_suite(env: &[(&str, std::path::PathBuf)], l: &Limits) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut cmd = Command::new(root.join("scripts/iotests.sh"));
    cmd.envs(env.iter().map(|(k, v)| (k, v))).current_dir(root);
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
    let read = |name: &str| {
        let p = results.join(format!("{name}.txt"));
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let verdict = judge(&read(l.judged), &read(l.reference))
        .unwrap_or_else(|e| panic!("results: {e}\n{out}"));
    if let Err(e) = check(&verdict, l) {
        panic!("{e}\n{out}");
    }
}

#[test]
fn qemu_iotests_judge_rimg_as_qemu_img() {
    run_suite(&[("RIMG", workspace_bin("rimg"))], &IMG);
}

/// QEMU's NBD tests with rimg-nbd where they start qemu-nbd (qemu-img
/// and qemu-io stay QEMU's): what a script written for qemu-nbd sees.
#[test]
fn qemu_iotests_judge_rimg_nbd_as_qemu_nbd() {
    run_suite(
        &[
            ("IOTESTS_MODE", "nbd".into()),
            ("RIMG_NBD", workspace_bin("rimg-nbd")),
        ],
        &NBD,
    );
}

/// The counting on crafted results files: the 120 tests of a real run
/// (115 pass; 1 regression; 4 fail with qemu-img too), then each way
/// the judgement must go wrong.
mod counting {
    use super::*;

    /// rimg.txt and qemu-img.txt of 120 tests: the first `regressions`
    /// fail with rimg and pass with qemu-img, the next `environment` run
    /// with neither, rimg passes the rest.
    fn files(regressions: usize, environment: usize) -> (String, String) {
        let (mut rimg, mut qemu_img) = (String::new(), String::new());
        for i in 0..120 {
            let t = format!("{:03}", i + 1);
            if i < regressions {
                rimg += &format!("{t} fail\n");
                qemu_img += &format!("{t} pass\n");
            } else if i < regressions + environment {
                rimg += &format!("{t} not run\n");
                qemu_img += &format!("{t} not run\n");
            } else {
                rimg += &format!("{t} pass\n");
            }
        }
        (rimg, qemu_img)
    }

    fn verdict(regressions: usize, environment: usize) -> Verdict {
        let (r, q) = files(regressions, environment);
        judge(&r, &q).unwrap()
    }

    #[test]
    fn a_real_run_passes() {
        let v = verdict(1, 4);
        assert_eq!((v.selected, v.passed), (120, 115));
        assert_eq!(v.regressions, [("001".to_string(), "fail".to_string())]);
        assert_eq!(v.environment.len(), 4);
        check(&v, &IMG).unwrap();
    }

    #[test]
    fn each_regression_lowers_the_count() {
        // 113 is the floor: 3 regressions pass, 4 fail.
        check(&verdict(3, 4), &IMG).unwrap();
        assert_eq!(verdict(4, 4).passed, 112);
        let e = check(&verdict(4, 4), &IMG).unwrap_err();
        assert!(e.starts_with("rimg passes 112 of the 120"), "{e}");
        assert!(e.contains("(\"004\", \"fail\")"), "{e}");
    }

    #[test]
    fn a_broken_environment_is_named() {
        check(&verdict(0, IMG.environment_max), &IMG).unwrap();
        let e = check(&verdict(0, IMG.environment_max + 1), &IMG).unwrap_err();
        assert!(e.contains("the harness or the machine is broken"), "{e}");
    }

    /// `text` without the lines `keep` refuses.
    fn only(text: &str, keep: impl Fn(usize) -> bool) -> String {
        let lines = text.lines().enumerate().filter(|(i, _)| keep(*i));
        lines.map(|(_, l)| l.to_string() + "\n").collect()
    }

    #[test]
    fn a_short_selection_is_named() {
        let (r, q) = files(0, 0);
        let r = only(&r, |i| i < IMG.selected_min - 1);
        let e = check(&judge(&r, &q).unwrap(), &IMG).unwrap_err();
        assert!(e.contains("the harness is broken"), "{e}");
    }

    #[test]
    fn a_missing_or_stray_rerun_is_an_error() {
        let (r, q) = files(1, 4);
        let err = |q: &str| judge(&r, q).unwrap_err();
        // rimg failed 001, qemu-img's line for it is lost.
        assert!(err(&only(&q, |i| i > 0)).contains("001: rimg fail, not re-run"));
        // qemu-img ran a test rimg passed (a stale log).
        assert!(err(&(q.clone() + "120 pass\n")).contains("120: re-run with qemu-img"));
        assert!(err(&(q + "999 pass\n")).contains("999: in qemu-img.txt"));
    }
}
