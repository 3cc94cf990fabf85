//! `-p` of convert, compare, commit and rebase, side by side with
//! qemu-img: off a terminal, qemu-img's progress lines on stdout (from
//! 0.00 to 100.00, never going back, then a newline) followed by the same
//! messages as qemu-img's; nothing without `-p` or with `-q`; on a
//! terminal (a pty from `script`), an indicatif bar on stderr instead.
//! `--progress=json`: JSON lines on stderr that parse and never go back.
//! SIGUSR1 without `-p`: the figure on stderr, as qemu-img prints it,
//! and the command goes on.

use std::path::Path;
use std::process::Output;

use rimg_tests::{qemu_img, run, tempdir, workspace_bin};

fn rimg(args: &[&str]) -> Output {
    run(workspace_bin("rimg").to_str().unwrap(), args)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn out(o: &Output, what: &str, code: i32) -> String {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// Splits qemu-img's progress output off the front of `text`: checks its
/// form and returns the figures and what follows the closing newline.
fn progress(text: &str) -> (Vec<f64>, String) {
    let mut rest = text;
    let mut figures = Vec::new();
    while let Some(r) = rest.strip_prefix("    (") {
        let (fig, r) = r.split_once("/100%)\r").expect("a progress line");
        let (int, frac) = fig.split_once('.').expect("two decimals");
        assert!(frac.len() == 2 && !int.is_empty(), "{fig:?}");
        figures.push(fig.parse::<f64>().unwrap());
        rest = r;
    }
    assert!(!figures.is_empty(), "no progress in {text:?}");
    // qemu_progress_end's newline, unless a message came first (compare
    // prints its verdict, then the newline).
    let rest = match rest.strip_prefix('\n') {
        Some(r) => r.to_string(),
        None => {
            let (msg, tail) = rest.split_once('\n').expect("a message line");
            assert!(tail.starts_with('\n'), "no closing newline in {rest:?}");
            format!("{msg}\n{}", &tail[1..])
        }
    };
    assert_eq!(figures[0], 0.0, "{text:?}");
    assert!(figures.windows(2).all(|w| w[0] <= w[1]), "{figures:?}");
    (figures, rest)
}

fn make_chain(d: &Path) {
    let base = d.join("base.qcow2");
    let top = d.join("top.qcow2");
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "64M"])
        .status
        .success());
    let o = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 24M", s(&base)],
    );
    assert!(o.status.success());
    assert!(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top)
    ])
    .status
    .success());
    let o = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 2 16M 32M", s(&top)],
    );
    assert!(o.status.success());
}

/// Copies of the chain for one tool, in `d/tool/`.
fn copy_chain(d: &Path, tool: &str) -> std::path::PathBuf {
    let t = d.join(tool);
    std::fs::create_dir_all(&t).unwrap();
    for f in ["base.qcow2", "top.qcow2"] {
        std::fs::copy(d.join(f), t.join(f)).unwrap();
    }
    t
}

#[test]
fn progress_lines_match_qemu_img() {
    let d = tempdir();
    make_chain(d.path());
    let top = d.path().join("top.qcow2");
    // convert
    for (tool, args) in [
        ("qemu-img", vec!["convert", "-p", "-O", "qcow2"]),
        ("rimg", vec!["convert", "-p", "-O", "qcow2"]),
    ] {
        let dst = d.path().join(format!("conv-{tool}.qcow2"));
        let mut a = args.clone();
        a.extend([s(&top), s(&dst)]);
        let o = if tool == "rimg" {
            rimg(&a)
        } else {
            qemu_img(&a)
        };
        let (figs, rest) = progress(&out(&o, &format!("{tool} convert"), 0));
        assert_eq!(*figs.last().unwrap(), 100.0, "{tool}");
        assert_eq!(rest, "", "{tool}");
    }
    // compare: identical, then different; the verdict as qemu-img's.
    let conv = d.path().join("conv-qemu-img.qcow2");
    let mut verdicts = Vec::new();
    for (i, (code, edit)) in [(0, None), (1, Some("write -P 9 40M 4k"))]
        .iter()
        .enumerate()
    {
        if let Some(cmd) = edit {
            assert!(run("qemu-io", &["-f", "qcow2", "-c", cmd, s(&conv)])
                .status
                .success());
        }
        let q = out(
            &qemu_img(&["compare", "-p", s(&top), s(&conv)]),
            "qemu-img compare",
            *code,
        );
        let r = out(
            &rimg(&["compare", "-p", s(&top), s(&conv)]),
            "rimg compare",
            *code,
        );
        let (qf, qrest) = progress(&q);
        let (rf, rrest) = progress(&r);
        assert_eq!(rrest, qrest, "compare {i}");
        if i == 0 {
            assert_eq!(*rf.last().unwrap(), 100.0);
            assert_eq!(*qf.last().unwrap(), 100.0);
        } else {
            // Stopped at the mismatch (40 of 64 MiB).
            assert!(*rf.last().unwrap() < 100.0, "{rf:?}");
        }
        verdicts.push(rrest);
    }
    assert_eq!(verdicts[0], "Images are identical.\n");
    assert!(verdicts[1].starts_with("Content mismatch at offset "));
    // commit and rebase, each tool on its own copy of the chain.
    for tool in ["qemu-img", "rimg"] {
        let t = copy_chain(d.path(), tool);
        let top = t.join("top.qcow2");
        let new = t.join("new.qcow2");
        assert!(qemu_img(&["create", "-q", "-f", "qcow2", s(&new), "64M"])
            .status
            .success());
        let a = ["rebase", "-p", "-b", "new.qcow2", "-F", "qcow2", s(&top)];
        let o = if tool == "rimg" {
            rimg(&a)
        } else {
            qemu_img(&a)
        };
        let (figs, rest) = progress(&out(&o, &format!("{tool} rebase"), 0));
        assert_eq!(*figs.last().unwrap(), 100.0, "{tool}");
        assert_eq!(rest, "", "{tool}");
        let a = ["commit", "-p", s(&top)];
        let o = if tool == "rimg" {
            rimg(&a)
        } else {
            qemu_img(&a)
        };
        let (figs, rest) = progress(&out(&o, &format!("{tool} commit"), 0));
        assert_eq!(*figs.last().unwrap(), 100.0, "{tool}");
        assert_eq!(rest, "Image committed.\n", "{tool}");
    }
    // The two tools' results agree.
    let o = qemu_img(&[
        "compare",
        s(&d.path().join("qemu-img/new.qcow2")),
        s(&d.path().join("rimg/new.qcow2")),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn no_progress_without_p_or_with_q() {
    let d = tempdir();
    make_chain(d.path());
    let top = d.path().join("top.qcow2");
    for (i, extra) in [&[][..], &["-p", "-q"][..]].iter().enumerate() {
        let dst = d.path().join(format!("c{i}.qcow2"));
        let mut a = vec!["convert", "-O", "qcow2"];
        a.extend(*extra);
        a.extend([s(&top), s(&dst)]);
        assert_eq!(out(&rimg(&a), "convert", 0), "");
        let mut a = vec!["compare"];
        a.extend(*extra);
        a.extend([s(&top), s(&dst)]);
        let want = if extra.is_empty() {
            "Images are identical.\n"
        } else {
            ""
        };
        assert_eq!(out(&rimg(&a), "compare", 0), want);
    }
}

#[test]
fn a_bar_on_a_terminal() {
    let d = tempdir();
    make_chain(d.path());
    let top = d.path().join("top.qcow2");
    let dst = d.path().join("tty.qcow2");
    let cmd = format!(
        "{} convert -p -O qcow2 {} {}",
        workspace_bin("rimg").display(),
        s(&top),
        s(&dst)
    );
    // `script` runs the command on a pty: stdout and stderr are both the
    // terminal, captured in our stdout.
    let o = run("script", &["-qec", &cmd, "/dev/null"]);
    let text = out(&o, "script", 0);
    assert!(text.contains("Converting ["), "{text:?}");
    assert!(text.contains("100%"), "{text:?}");
    assert!(
        !text.contains("/100%)"),
        "qemu-img lines on a terminal: {text:?}"
    );
    // The copy is complete.
    let o = qemu_img(&["compare", s(&top), s(&dst)]);
    assert!(o.status.success());
}

/// iotest 086: convert's progress counts the data to copy, not the holes:
/// four 1 MiB extents in a 128 MiB image step by 25%, exactly as
/// qemu-img's lines.
#[test]
fn convert_progress_counts_data() {
    let d = tempdir();
    let src = d.path().join("src.qcow2");
    out(
        &qemu_img(&["create", "-q", "-f", "qcow2", s(&src), "128M"]),
        "create",
        0,
    );
    for at in ["0", "2M", "4M", "32M"] {
        let cmd = format!("write {at} 1M");
        assert!(run("qemu-io", &["-f", "qcow2", "-c", &cmd, s(&src)])
            .status
            .success());
    }
    let mut lines = Vec::new();
    for tool in ["qemu-img", "rimg"] {
        let dst = d.path().join(format!("{tool}.qcow2"));
        let a = ["convert", "-p", "-O", "qcow2", s(&src), s(&dst)];
        let o = if tool == "rimg" {
            rimg(&a)
        } else {
            qemu_img(&a)
        };
        lines.push(out(&o, tool, 0));
    }
    assert_eq!(lines[1], lines[0], "rimg's progress, then qemu-img's");
    assert!(lines[0].contains("(25.00/100%)"), "{:?}", lines[0]);
}

/// The JSON progress lines of `stderr`: each parses, names `phase`,
/// keeps its total, never goes back; the first is at 0 and only the last
/// ends. Returns the last `done` and whether it reached the total.
fn json_lines(stderr: &[u8], phase: &str) -> (u64, bool) {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}\n{text}")))
        .collect();
    assert!(lines.len() >= 2, "{text}");
    let total = lines[0]["total"].as_u64().unwrap();
    let mut done = 0;
    let mut pct = 0.0;
    for (i, v) in lines.iter().enumerate() {
        assert_eq!(v["phase"], phase, "{text}");
        assert_eq!(v["total"].as_u64(), Some(total), "{text}");
        let d = v["done"].as_u64().unwrap();
        let p = v["percent"].as_f64().unwrap();
        assert!(
            d >= done && p >= pct && d <= total,
            "went back at line {i}: {text}"
        );
        assert!(
            v["rate"].is_u64() && v["elapsed"].as_f64().unwrap() >= 0.0,
            "{v}"
        );
        assert_eq!(v.get("end").is_some(), i == lines.len() - 1, "{text}");
        (done, pct) = (d, p);
    }
    assert_eq!(lines[0]["done"], 0, "{text}");
    (done, done == total)
}

#[test]
fn json_progress_lines_parse_and_never_go_back() {
    let d = tempdir();
    make_chain(d.path());
    let top = d.path().join("top.qcow2");
    let dst = d.path().join("conv.qcow2");
    let o = rimg(&[
        "convert",
        "--progress=json",
        "-O",
        "qcow2",
        s(&top),
        s(&dst),
    ]);
    assert_eq!(out(&o, "convert", 0), "");
    assert_eq!(json_lines(&o.stderr, "converting"), (48 << 20, true));
    // -q silences qemu-img's progress, not JSON asked for by name.
    let o = rimg(&["compare", "-q", "--progress=json", s(&top), s(&dst)]);
    assert_eq!(out(&o, "compare", 0), "");
    assert!(json_lines(&o.stderr, "comparing").1);
    let o = rimg(&["compare", "--progress=json", s(&top), s(&dst)]);
    assert_eq!(out(&o, "compare", 0), "Images are identical.\n");
    let o = rimg(&["checksum", "--progress=json", s(&top)]);
    assert!(out(&o, "checksum", 0).ends_with(&format!("  {}\n", s(&top))));
    assert_eq!(json_lines(&o.stderr, "checksumming"), (64 << 20, true));
    let t = copy_chain(d.path(), "json");
    let top = t.join("top.qcow2");
    let new = t.join("new.qcow2");
    out(
        &qemu_img(&["create", "-q", "-f", "qcow2", s(&new), "64M"]),
        "create",
        0,
    );
    let o = rimg(&[
        "rebase",
        "--progress=json",
        "-b",
        "new.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    assert_eq!(out(&o, "rebase", 0), "");
    assert!(json_lines(&o.stderr, "rebasing").1);
    let o = rimg(&["commit", "--progress=json", s(&top)]);
    assert_eq!(out(&o, "commit", 0), "Image committed.\n");
    assert!(json_lines(&o.stderr, "committing").1);
    let o = rimg(&["amend", "--progress=json", "-o", "compat=0.10", s(&new)]);
    out(&o, "amend", 0);
    assert!(json_lines(&o.stderr, "amending").1);
    let copy = d.path().join("dd.raw");
    let o = rimg(&[
        "dd",
        "--progress=json",
        "bs=1M",
        &format!("if={}", s(&top)),
        &format!("of={}", s(&copy)),
    ]);
    assert_eq!(out(&o, "dd", 0), "");
    assert!(json_lines(&o.stderr, "copying").1);
    let o = rimg(&["compact", "--progress=json", s(&top)]);
    assert!(out(&o, "compact", 0).starts_with("Image compacted: "));
    assert!(json_lines(&o.stderr, "compacting").1);
    // A format it does not know is refused.
    let o = rimg(&["checksum", "--progress=xml", s(&top)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("xml"));
}

/// Whether `pid` has a handler for SIGUSR1 (bit 10 of SigCgt).
fn catches_usr1(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & (1 << (libc::SIGUSR1 - 1)) != 0)
}

/// SIGUSR1 without -p prints the figure on stderr at the next step, as
/// qemu-img does, and the command goes on. The source is an NBD export
/// that qemu-storage-daemon throttles to 16 MiB/s, so that 64 MiB take
/// seconds, whatever the machine.
#[test]
fn sigusr1_prints_the_figure_and_the_command_goes_on() {
    use rimg_tests::qsd::Qsd;
    use serde_json::json;
    use std::time::{Duration, Instant};
    let d = tempdir();
    let img = d.path().join("data.qcow2");
    out(
        &qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]),
        "create",
        0,
    );
    assert!(run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 7 0 64M", s(&img)]
    )
    .status
    .success());
    let sock = d.path().join("nbd.sock");
    let mut qsd = Qsd::start_nbd(&img, &sock, "disk", false);
    qsd.qmp(
        "object-add",
        json!({"qom-type": "throttle-group", "id": "tg", "limits": {"bps-read": 16 << 20}}),
    )
    .unwrap();
    qsd.qmp(
        "blockdev-add",
        json!({"driver": "throttle", "node-name": "slow", "throttle-group": "tg", "file": "disk"}),
    )
    .unwrap();
    qsd.qmp(
        "block-export-add",
        json!({"type": "nbd", "id": "slowexp", "node-name": "slow", "name": "slow"}),
    )
    .unwrap();
    let uri = format!("nbd+unix:///slow?socket={}", s(&sock));
    for tool in ["qemu-img", "rimg"] {
        let bin = match tool {
            "rimg" => workspace_bin("rimg"),
            _ => "qemu-img".into(),
        };
        let dst = d.path().join(format!("{tool}.raw"));
        let mut cmd = std::process::Command::new(bin);
        cmd.args(["convert", "-f", "raw", "-O", "raw", &uri, s(&dst)]);
        let child = rimg_tests::spawn_watched(cmd, std::process::Stdio::null());
        let end = Instant::now() + Duration::from_secs(20);
        while !catches_usr1(child.id()) {
            assert!(Instant::now() < end, "{tool} never caught SIGUSR1");
            std::thread::sleep(Duration::from_millis(1));
        }
        // SAFETY: kill(2) on our child, running (watched, not reaped).
        unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
        let w = child.wait(Duration::from_secs(60));
        assert!(
            w.status.is_some_and(|s| s.success()),
            "{tool}: {:?}",
            w.status
        );
        let err = String::from_utf8(w.stderr).unwrap();
        let fig: f64 = err
            .strip_prefix("    (")
            .and_then(|r| r.strip_suffix("/100%)\n"))
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("{tool}'s stderr: {err:?}"));
        assert!((0.0..100.0).contains(&fig), "{tool}: {fig}");
        assert!(w.stdout.is_empty(), "{tool}");
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), 64 << 20);
    }
    let (st, log) = qsd.quit();
    assert!(st.success(), "{log}");
}
