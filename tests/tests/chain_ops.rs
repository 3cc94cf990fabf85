//! `rimg commit` and `rimg rebase` side by side with qemu-img on copies of
//! the same backing chains: every layer ends with the same content, every
//! image rimg wrote passes `qemu-img check`, exit codes agree.

use std::path::{Path, PathBuf};

use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, qemu_img, qemu_io, qemu_overlay, run,
    tempdir, workspace_bin,
};

/// base <- mid <- top in directory `d`, with overlapping writes, zero
/// clusters, partial-cluster zeros and a compressed cluster.
fn chain(d: &Path) -> [PathBuf; 3] {
    std::fs::create_dir_all(d).unwrap();
    let [b, m, t] = ["base.qcow2", "mid.qcow2", "top.qcow2"].map(|n| d.join(n));
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", b.to_str().unwrap(), "8M"])
            .status
            .success()
    );
    qemu_overlay(&m, "base.qcow2", &[]);
    qemu_overlay(&t, "mid.qcow2", &[]);
    qemu_io(&b, &["write -P 1 0 2M", "write -c -P 4 4M 64k"]);
    qemu_io(
        &m,
        &["write -P 2 512k 1M", "write -z 3M 64k", "write -P 5 4M 4k"],
    );
    qemu_io(
        &t,
        &[
            "write -P 3 1M 1M",
            "write -z 600k 10k",
            "write -P 6 7M 100k",
        ],
    );
    [b, m, t]
}

#[test]
fn commit_and_rebase_match_qemu_img() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    // (name, args with TOP/BASE/MID placeholders)
    let cases: &[(&str, &[&str])] = &[
        ("commit", &["commit", "TOP"]),
        ("commit -d", &["commit", "-d", "TOP"]),
        ("commit -b base", &["commit", "-b", "BASE", "TOP"]),
        ("commit mid", &["commit", "MID"]),
        (
            "rebase onto base",
            &["rebase", "-b", "base.qcow2", "-F", "qcow2", "TOP"],
        ),
        ("rebase flatten", &["rebase", "-b", "", "TOP"]),
        (
            "rebase -u",
            &["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "TOP"],
        ),
        (
            "rebase missing",
            &["rebase", "-b", "nonexistent.qcow2", "-F", "qcow2", "TOP"],
        ),
        ("commit without backing", &["commit", "BASE"]),
    ];
    for (i, (name, args)) in cases.iter().enumerate() {
        let ours = chain(&dir.path().join(format!("{i}-rimg")));
        let theirs = chain(&dir.path().join(format!("{i}-qemu")));
        let fill = |c: &[PathBuf; 3]| -> Vec<String> {
            args.iter()
                .map(|a| match *a {
                    "TOP" => c[2].to_str().unwrap().to_string(),
                    "MID" => c[1].to_str().unwrap().to_string(),
                    "BASE" => c[0].to_str().unwrap().to_string(),
                    x => x.to_string(),
                })
                .collect()
        };
        let a_ours = fill(&ours);
        let a_theirs = fill(&theirs);
        let r = run(rimg, &a_ours.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let q = qemu_img(&a_theirs.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        assert_eq!(
            r.status.code(),
            q.status.code(),
            "{name}: exit code; rimg: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        if !r.status.success() {
            assert_eq!(
                String::from_utf8_lossy(&r.stderr).lines().count(),
                1,
                "{name}: one error line"
            );
        }
        for k in 0..3 {
            assert_qemu_check_clean(&ours[k]);
            assert_qemu_compare_equal(&ours[k], &theirs[k]);
        }
        let backing = |p: &Path| {
            let o = qemu_img(&["info", "--output=json", "-U", p.to_str().unwrap()]);
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            (
                v["backing-filename"].clone(),
                v["backing-filename-format"].clone(),
            )
        };
        assert_eq!(
            backing(&ours[2]),
            backing(&theirs[2]),
            "{name}: backing fields"
        );
    }
}
