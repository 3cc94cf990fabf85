//! `-p` of convert, compare, commit and rebase, side by side with
//! qemu-img: off a terminal, qemu-img's progress lines on stdout (from
//! 0.00 to 100.00, never going back, then a newline) followed by the same
//! messages as qemu-img's; nothing without `-p` or with `-q`; on a
//! terminal (a pty from `script`), an indicatif bar on stderr instead.

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
