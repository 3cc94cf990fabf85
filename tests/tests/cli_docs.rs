//! Shell completions and manual pages generated from rimg's command
//! definitions: the bash script names every subcommand that `rimg --help`
//! lists and completes them in a real bash; the other shells' scripts are
//! generated; the manual pages are roff with rimg's header and name every
//! subcommand (and a subcommand's page its options); the daemons and
//! rimg-vmm print theirs with `--man`.

use std::process::Output;

use rimg_tests::{run, workspace_bin};

fn rimg(args: &[&str]) -> Output {
    run(workspace_bin("rimg").to_str().unwrap(), args)
}

fn stdout_ok(args: &[&str]) -> String {
    let o = rimg(args);
    assert!(
        o.status.success(),
        "rimg {args:?}: exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8 output")
}

/// The subcommands `rimg --help` lists.
fn subcommands() -> Vec<String> {
    let help = stdout_ok(&["--help"]);
    let list: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|n| n != "help")
        .collect();
    // A broken parse must not pass as an empty list.
    for known in [
        "create", "convert", "bench", "commit", "rebase", "compare", "dd",
    ] {
        assert!(list.iter().any(|n| n == known), "{known} not in {list:?}");
    }
    list
}

#[test]
fn bash_completion_covers_every_subcommand() {
    let script = stdout_ok(&["completions", "bash"]);
    let subs = subcommands();
    for s in &subs {
        assert!(
            script.contains(&format!("rimg,{s})")),
            "bash completion does not handle {s}"
        );
    }
    // bash parses it and completes with it: "rimg co<TAB>" offers the
    // subcommands starting with "co" (completions too: hidden from the
    // help, not from completion), and "rimg bench --fl<TAB>" the option.
    let dir = rimg_tests::tempdir();
    let path = dir.path().join("rimg.bash");
    std::fs::write(&path, &script).unwrap();
    let complete = |words: &[&str]| -> Vec<String> {
        let line = words.join(" ");
        let prog = format!(
            "source {path}\nCOMP_WORDS=({line})\nCOMP_CWORD={cword}\nCOMP_LINE='{line}'\nCOMP_POINT={point}\n_rimg rimg '{cur}' '{prev}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
            path = path.display(),
            cword = words.len() - 1,
            point = line.len(),
            cur = words[words.len() - 1],
            prev = words[words.len() - 2],
        );
        let o = run("bash", &["--norc", "-c", &prog]);
        assert!(
            o.status.success(),
            "bash: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        complete(&["rimg", "co"]),
        ["commit", "compact", "compare", "completions", "convert"]
    );
    assert_eq!(complete(&["rimg", "bench", "--fl"]), ["--flush-interval"]);
}

#[test]
fn other_shells_get_scripts() {
    for (shell, marker) in [
        ("zsh", "#compdef rimg"),
        ("fish", "complete -c rimg"),
        ("elvish", "edit:completion:arg-completer[rimg]"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let script = stdout_ok(&["completions", shell]);
        assert!(script.contains(marker), "{shell}: no {marker:?}");
        assert!(script.contains("convert"), "{shell}: no convert");
    }
    let o = rimg(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn man_pages_render() {
    let page = stdout_ok(&["man"]);
    let th = page
        .lines()
        .find(|l| l.starts_with(".TH "))
        .expect("a .TH header");
    assert!(th.starts_with(".TH rimg 1 "), "{th}");
    assert!(th.contains(env!("CARGO_PKG_VERSION")), "{th}");
    for section in [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH DESCRIPTION",
        ".SH SUBCOMMANDS",
    ] {
        assert!(page.contains(section), "no {section}");
    }
    for s in subcommands() {
        assert!(
            page.contains(&format!("rimg\\-{s}")),
            "man page does not name {s}"
        );
    }
    // A subcommand's own page, with its options.
    let conv = stdout_ok(&["man", "convert"]);
    assert!(
        conv.lines().any(|l| l.starts_with(".TH rimg-convert 1 ")),
        "{}",
        &conv[..conv.len().min(400)]
    );
    assert!(conv.contains("\\-O"), "convert page without -O");
    let o = rimg(&["man", "nosuch"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "rimg: no subcommand 'nosuch'"
    );
}

#[test]
fn daemons_print_their_manual_pages() {
    for (bin, option) in [
        ("rimg-vhost-blk", "\\-\\-image"),
        ("rimg-vhost-net", "\\-\\-tap"),
        ("rimg-nbd", "\\-\\-socket"),
        ("rimg-vmm", "\\-\\-kernel"),
    ] {
        let path = workspace_bin(bin);
        let exe = path.to_str().unwrap();
        let o = run(exe, &["--man"]);
        assert!(o.status.success(), "{bin} --man: {o:?}");
        let page = String::from_utf8(o.stdout).expect("utf-8 page");
        let th = page
            .lines()
            .find(|l| l.starts_with(".TH "))
            .unwrap_or_else(|| panic!("{bin}: no .TH header"));
        assert!(th.starts_with(&format!(".TH {bin} 1 ")), "{th}");
        for want in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS", option] {
            assert!(page.contains(want), "{bin}: no {want} in its page");
        }
        // Only alone: with other arguments it is refused (status 2).
        let o = run(exe, &["--man", "--socket", "/nonexistent/s"]);
        assert_eq!(o.status.code(), Some(2), "{bin}: {o:?}");
    }
}
