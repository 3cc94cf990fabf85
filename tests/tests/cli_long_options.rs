//! qemu-img's long options (its `SUBCOMMAND --help` lists them) work in
//! rimg too: spelled out, shortened as getopt_long allows, and with the
//! same effect as the short ones; `-r` limits convert and commit to the
//! rate given; `measure -l` measures a snapshot.

use std::path::Path;
use std::time::Instant;

use rimg_tests::{ok, qemu_img, qemu_io, rimg, run, tempdir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The long options `help` lists, as `--name`.
fn long_options(help: &str) -> Vec<String> {
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == '=')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .collect()
}

/// Options qemu-img 10 lists that rimg does not take yet, with why; the
/// test fails when one of them starts working (drop it here then) or
/// when any other goes missing.
const NOT_YET: &[(&str, &str)] = &[];

#[test]
fn every_long_option_of_qemu_img_is_taken() {
    let mut missing = Vec::new();
    for cmd in [
        "amend", "bench", "bitmap", "check", "commit", "compare", "convert", "create", "dd",
        "info", "map", "measure", "rebase", "resize", "snapshot",
    ] {
        let q = run("qemu-img", &[cmd, "--help"]);
        let theirs: Vec<String> = String::from_utf8_lossy(&q.stdout)
            .lines()
            // The options are listed as "  -x, --name ARG" or "  --name"
            // (indented more in some commands).
            .filter(|l| l.starts_with("  ") && l.trim_start().starts_with('-'))
            .flat_map(long_options)
            .collect();
        assert!(
            theirs.iter().any(|o| o == "--help"),
            "qemu-img {cmd} --help lists no options: {q:?}"
        );
        let r = ok(rimg(&[cmd, "--help"]));
        let ours = long_options(&r);
        for o in theirs {
            // getopt_long takes a prefix (qemu-img amend lists
            // "--progres"); so does rimg.
            if !ours.iter().any(|x| x.starts_with(&o)) {
                missing.push(format!("{cmd} {o}"));
            }
        }
    }
    missing.sort();
    let mut known: Vec<String> = NOT_YET.iter().map(|(o, _)| o.to_string()).collect();
    known.sort();
    assert_eq!(
        missing, known,
        "long options rimg lacks (left) vs known gaps"
    );
}

#[test]
fn long_and_shortened_options_do_what_the_short_ones_do() {
    let d = tempdir();
    let dir = d.path();
    let raw = dir.join("a.raw");
    rimg_tests::write_mixed_raw(&raw, 4 << 20, 2);
    let short = dir.join("short.qcow2");
    let long = dir.join("long.qcow2");
    ok(rimg(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-c",
        s(&raw),
        s(&short),
    ]));
    ok(rimg(&[
        "convert",
        "--source-format=raw",
        "--target-form",
        "qcow2",
        "--target-options",
        "cluster_size=4k",
        "--compress",
        "--parallel=2",
        s(&raw),
        s(&long),
    ]));
    for img in [&short, &long] {
        let info = ok(qemu_img(&["info", "--output=json", s(img)]));
        assert!(info.contains("\"cluster-size\": 4096"), "{info}");
        rimg_tests::assert_qemu_check_clean(img);
        rimg_tests::assert_qemu_compare_equal(&raw, img);
    }
    // Both compressed (a cluster that does not shrink is stored plain).
    for img in [&short, &long] {
        let map = rimg_tests::qemu_map_without_offsets(img);
        assert!(
            map.iter().any(|e| e["compressed"] == true),
            "{}: nothing compressed",
            img.display()
        );
    }
    // info --out (shortened), create --backing / --backing-format.
    let top = dir.join("top.qcow2");
    ok(rimg(&[
        "create",
        "--format",
        "qcow2",
        "--backing",
        s(&long),
        "--backing-format",
        "qcow2",
        s(&top),
    ]));
    let info = ok(rimg(&["info", "--out=json", "--backing-chain", s(&top)]));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v[0]["backing-filename"], s(&long), "{info}");
    // An ambiguous prefix is refused, not guessed.
    let o = rimg(&["convert", "--target-", "qcow2", s(&raw), s(&short)]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
}

/// qemu-img counts only data copied against `-r` (holes and zeros are
/// free): 12 MiB of data in a 64 MiB image at 4 MiB/s take at least 2 s
/// (the first slice aside), however fast the machine.
#[test]
fn rate_limits_convert_and_commit() {
    let d = tempdir();
    let dir = d.path();
    let base = dir.join("base.qcow2");
    ok(qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "64M"]));
    qemu_io(&base, &["write -P 1 0 12M", "write -z 20M 20M"]);
    let took = |args: &[&str]| {
        let t = Instant::now();
        ok(rimg(args));
        t.elapsed().as_secs_f64()
    };
    let out = dir.join("out.raw");
    let t = took(&["convert", "-r", "4M", "-O", "raw", s(&base), s(&out)]);
    assert!(t >= 2.0, "convert -r 4M of 12 MiB took {t:.2} s");
    rimg_tests::assert_qemu_compare_equal(&base, &out);
    let t = took(&["convert", "--rate=4M", "-O", "qcow2", s(&base), s(&out)]);
    assert!(t >= 2.0, "convert --rate=4M of 12 MiB took {t:.2} s");
    rimg_tests::assert_qemu_check_clean(&out);
    let top = dir.join("top.qcow2");
    ok(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
    ]));
    qemu_io(&top, &["write -P 2 4M 8M"]);
    let t = took(&["commit", "-r", "4M", s(&top)]);
    assert!(t >= 1.5, "commit -r 4M of 8 MiB took {t:.2} s");
    rimg_tests::assert_qemu_check_clean(&base);
    let o = run(
        "qemu-io",
        &["-c", "read -P 2 4M 8M", "-c", "read -P 1 0 4M", s(&base)],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && !text.contains("fail"), "{text}");
    // Bad rates: qemu-img's words.
    for (rate, msg) in [
        ("abc", "Invalid rate limit specified: 'abc'."),
        (
            "-1",
            "Invalid rate limit specified. Must be between 0 and 9223372036854775807.",
        ),
    ] {
        for cmd in [
            vec!["convert", "-r", rate, "-O", "raw", s(&base), s(&out)],
            vec!["commit", "-r", rate, s(&top)],
        ] {
            let r = rimg(&cmd);
            let q = qemu_img(&cmd);
            assert_eq!(r.status.code(), Some(1), "{cmd:?}");
            assert_eq!(q.status.code(), Some(1), "{cmd:?}");
            let err = String::from_utf8_lossy(&r.stderr);
            assert!(err.contains(msg), "{cmd:?}: {err}");
            assert_eq!(
                err.replacen("rimg:", "qemu-img:", 1),
                String::from_utf8_lossy(&q.stderr),
                "{cmd:?}"
            );
        }
    }
}

#[test]
fn measure_l_measures_a_snapshot_as_qemu_img_does() {
    let d = tempdir();
    let img = d.path().join("sn.qcow2");
    ok(qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]));
    qemu_io(&img, &["write 0 8M"]);
    ok(qemu_img(&["snapshot", "-c", "s1", s(&img)]));
    qemu_io(&img, &["write 8M 16M"]);
    let raw = d.path().join("a.raw");
    ok(qemu_img(&["create", "-q", "-f", "raw", s(&raw), "1M"]));
    for args in [
        vec!["measure", "-O", "qcow2", "-l", "s1", s(&img)],
        vec![
            "measure",
            "--output=json",
            "-O",
            "qcow2",
            "--snapshot",
            "snapshot.name=s1",
            s(&img),
        ],
        vec!["measure", "-O", "qcow2", s(&img)],
        vec!["measure", "-O", "qcow2", "-l", "nope", s(&img)],
        vec!["measure", "-O", "qcow2", "-l", "s1", "--size", "1G"],
        vec!["measure", "-O", "qcow2", "-f", "qcow2", "--size", "1G"],
        vec!["measure", "-O", "raw", "-l", "s1", s(&raw)],
    ] {
        let r = rimg(&args);
        let q = qemu_img(&args);
        assert_eq!(r.status.code(), q.status.code(), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&q.stdout),
            "{args:?}"
        );
        assert_eq!(
            String::from_utf8_lossy(&r.stderr).replacen("rimg:", "qemu-img:", 1),
            String::from_utf8_lossy(&q.stderr),
            "{args:?}"
        );
    }
}
