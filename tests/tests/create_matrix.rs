//! Acceptance: every `rimg create` combination of cluster size, compat,
//! refcount width, preallocation and backing file yields an image that
//! `qemu-img check` finds clean, that reads as zeros (or as its backing
//! file), and whose `qemu-img info` agrees with `rimg info` and with an
//! image qemu-img made with the same options.

use std::path::Path;

use rimg_tests::{
    assert_qemu_check_clean, assert_qemu_compare_equal, qemu_img, run, tempdir, workspace_bin,
};
use serde_json::Value;

const SIZE: &str = "24M";

fn info_json(cmd: &str, path: &Path) -> Value {
    let out = run(cmd, &["info", "--output=json", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{cmd} info {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{cmd} info json: {e}"))
}

/// The fields the acceptance criterion names.
fn key_fields(v: &Value) -> Vec<(String, Value)> {
    [
        "virtual-size",
        "cluster-size",
        "format",
        "format-specific",
        "backing-filename",
        "backing-filename-format",
        "full-backing-filename",
        "dirty-flag",
    ]
    .iter()
    .map(|k| (k.to_string(), v.get(*k).cloned().unwrap_or(Value::Null)))
    .collect()
}

#[test]
fn create_matrix_matches_qemu_img() {
    let rimg = workspace_bin("rimg");
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), SIZE])
            .status
            .success()
    );
    let io = run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x5a 1000 300k",
            "-c",
            "write -P 0x33 20M 70k",
            base.to_str().unwrap(),
        ],
    );
    assert!(io.status.success());

    let mut cases = 0;
    for cluster in ["512", "4096", "65536", "2M"] {
        for compat in ["0.10", "1.1"] {
            for refbits in ["1", "16", "64"] {
                if compat == "0.10" && refbits != "16" {
                    continue;
                }
                for prealloc in ["off", "metadata", "falloc", "full", "backing"] {
                    cases += 1;
                    let name = format!("c{cluster}-v{compat}-r{refbits}-{prealloc}");
                    let ours = dir.path().join(format!("{name}.rimg.qcow2"));
                    let theirs = dir.path().join(format!("{name}.qemu.qcow2"));
                    let mut opts =
                        format!("cluster_size={cluster},compat={compat},refcount_bits={refbits}");
                    let mut extra: Vec<&str> = Vec::new();
                    if prealloc == "backing" {
                        extra.extend(["-b", "base.qcow2", "-F", "qcow2"]);
                    } else {
                        opts += &format!(",preallocation={prealloc}");
                    }
                    for (cmd, path) in [(rimg.to_str().unwrap(), &ours), ("qemu-img", &theirs)] {
                        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
                        args.extend(&extra);
                        args.push(path.to_str().unwrap());
                        args.push(SIZE);
                        let out = run(cmd, &args);
                        assert!(
                            out.status.success(),
                            "{cmd} create {name}: {}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                    assert_qemu_check_clean(&ours);
                    let (q_ours, r_ours, q_theirs) = (
                        info_json("qemu-img", &ours),
                        info_json(rimg.to_str().unwrap(), &ours),
                        info_json("qemu-img", &theirs),
                    );
                    assert_eq!(
                        key_fields(&q_ours),
                        key_fields(&r_ours),
                        "{name}: qemu-img info vs rimg info"
                    );
                    assert_eq!(
                        key_fields(&q_ours),
                        key_fields(&q_theirs),
                        "{name}: ours vs qemu-img's image"
                    );
                    // Same guest content as qemu-img's image (zeros, or the
                    // backing file's data).
                    assert_qemu_compare_equal(&ours, &theirs);
                    if prealloc != "off" && prealloc != "backing" {
                        // Preallocated: every cluster is allocated, as in
                        // qemu-img's image.
                        let map = |p: &Path| {
                            let o = qemu_img(&["map", "--output=json", p.to_str().unwrap()]);
                            let v: Value = serde_json::from_slice(&o.stdout).unwrap();
                            v.as_array()
                                .unwrap()
                                .iter()
                                .map(|e| {
                                    (e["length"].as_u64().unwrap(), e["data"].as_bool().unwrap())
                                })
                                .filter(|&(_, d)| d)
                                .map(|(l, _)| l)
                                .sum::<u64>()
                        };
                        assert_eq!(map(&ours), map(&theirs), "{name}: allocated bytes");
                    }
                }
            }
        }
    }
    assert_eq!(cases, 4 * (3 * 5 + 5));
}

#[test]
fn create_rejects_what_qemu_img_rejects() {
    let rimg = workspace_bin("rimg");
    let dir = tempdir();
    let p = dir.path().join("x.qcow2");
    let p = p.to_str().unwrap();
    let bad: &[&[&str]] = &[
        &["create", "-f", "qcow2", p, "12x"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=1",
            p,
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,lazy_refcounts=on",
            p,
            "1M",
        ],
        &["create", "-f", "qcow2", "-o", "cluster_size=1000", p, "1M"],
        &["create", "-f", "qcow2", "-o", "cluster_size=4M", p, "1M"],
        &["create", "-f", "qcow2", "-o", "refcount_bits=3", p, "1M"],
        &["create", "-f", "qcow2", "-o", "nonsense=1", p, "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            p,
            "1M",
        ],
        &["create", "-f", "qcow2", "-b", "missing.qcow2", p, "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            p,
        ],
        &["create", "-f", "qcow2", p],
        &["create", "-f", "nosuchformat", p, "1M"],
    ];
    for args in bad {
        let q = qemu_img(args);
        let r = run(rimg.to_str().unwrap(), args);
        assert_eq!(q.status.code(), Some(1), "qemu-img {args:?} should fail");
        assert_eq!(
            r.status.code(),
            Some(1),
            "rimg {args:?}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let err = String::from_utf8_lossy(&r.stderr);
        // As many lines as qemu-img's (one, or a message and its hint).
        let theirs = String::from_utf8_lossy(&q.stderr);
        assert_eq!(
            err.lines().count(),
            theirs.lines().count(),
            "rimg {args:?}: got {err:?}, qemu-img {theirs:?}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}
