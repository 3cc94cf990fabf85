//! Image specifications beyond plain filenames, with qemu-img as the
//! judge: `json:{...}` names, `--image-opts` option strings, blkdebug
//! error injection (config files and options) and null-co sources. Each
//! step runs with both tools; their output must agree.

use std::path::Path;
use std::process::{Command, Output};

use rimg_tests::{assert_qemu_check_clean, qemu_img, qemu_io, tempdir, workspace_bin};

/// Status, stdout and stderr of `tool args`, the program name at the
/// start of error lines made neutral.
fn out(tool: &str, args: &[&str]) -> (i32, String, String) {
    let o: Output = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    let name = Path::new(tool).file_name().unwrap().to_str().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).replace(&format!("{name}:"), "PROG:");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        err,
    )
}

/// Runs `args` with rimg and with qemu-img; asserts the same result.
fn same(args: &[&str]) -> (i32, String, String) {
    let rimg = workspace_bin("rimg");
    let r = out(rimg.to_str().unwrap(), args);
    let q = out("qemu-img", args);
    assert_eq!(r, q, "rimg vs qemu-img for {args:?}");
    r
}

fn create(path: &Path, extra: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend(extra);
    args.push(path.to_str().unwrap());
    args.push("1M");
    let o = qemu_img(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn json_and_image_opts_names_in_info_and_map() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("a,b.qcow2");
    create(&base, &[]);
    create(&top, &["-b", base.to_str().unwrap(), "-F", "qcow2"]);
    qemu_io(&top, &["write -P 7 64k 64k"]);
    let t = top.to_str().unwrap();
    let json = format!("json:{{'driver':'qcow2','file':{{'driver':'file','filename':'{t}'}}}}");
    let (code, s, _) = same(&["info", &json]);
    assert_eq!(code, 0);
    assert!(s.starts_with(&format!("image: {t}\n")), "{s}");
    same(&[
        "info",
        &format!("json:{{\"driver\":\"qcow2\",\"file.filename\":\"{t}\"}}"),
    ]);
    // A comma in the filename is doubled in an option string.
    let opts = format!(
        "driver=qcow2,file.driver=file,file.filename={}",
        t.replace(',', ",,")
    );
    same(&["info", "--backing-chain", "--image-opts", &opts]);
    same(&["map", "--image-opts", &opts]);
    same(&[
        "map",
        "--image-opts",
        &format!(
            "driver=blkdebug,image.driver=qcow2,image.file.filename={}",
            t.replace(',', ",,")
        ),
    ]);
    let (code, _, _) = same(&["check", "--image-opts", &opts]);
    assert_eq!(code, 0);
    // A name no plain filename expresses: json:{...}, and no directory
    // to find the backing file in.
    let quorum = format!(
        "json:{{'driver':'qcow2','file':{{'driver':'quorum','vote-threshold':1,\
         'children':[{{'driver':'file','filename':'{t}'}}]}}}}"
    );
    let rimg = workspace_bin("rimg");
    let (code, s, e) = out(rimg.to_str().unwrap(), &["info", &quorum]);
    assert_eq!(code, 0, "{e}");
    assert!(s.starts_with("image: json:{"), "{s}");
    assert!(s.contains("(cannot determine actual path)"), "{s}");
    assert_qemu_check_clean(&top);
}

#[test]
fn blkdebug_read_errors_in_compare() {
    let dir = tempdir();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    create(&a, &[]);
    create(&b, &[]);
    qemu_io(&a, &["write -P 1 512 512"]);
    let conf = dir.path().join("blkdebug.conf");
    std::fs::write(
        &conf,
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nonce =\"off\"\n",
    )
    .unwrap();
    let spec = format!("blkdebug:{}:{}", conf.display(), a.display());
    let (code, _, e) = same(&["compare", &spec, b.to_str().unwrap()]);
    assert_eq!(code, 4);
    assert!(e.contains("Input/output error"), "{e}");
    assert_qemu_check_clean(&a);
}

#[test]
fn commit_into_a_failing_json_backing_file() {
    let dir = tempdir();
    for tool in [
        workspace_bin("rimg").to_str().unwrap().to_string(),
        "qemu-img".into(),
    ] {
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        create(&base, &[]);
        let backing = format!(
            "json:{{'driver': 'qcow2', 'file': {{ 'driver': 'blkdebug', 'inject-error': \
             [{{ 'event': 'write_aio', 'errno': 28, 'once': true }}], 'image': \
             {{ 'driver': 'file', 'filename': '{}' }}}}}}",
            base.display()
        );
        let (code, s, e) = out(
            &tool,
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                &backing,
                "-F",
                "qcow2",
                top.to_str().unwrap(),
                "1M",
            ],
        );
        assert_eq!(code, 0, "{tool}: {e}");
        assert!(
            s.contains("backing_file=json:{'driver': 'qcow2',, 'file'"),
            "{tool}: {s}"
        );
        qemu_io(&top, &["write 0 64k"]);
        let (code, _, e) = out(&tool, &["commit", top.to_str().unwrap()]);
        assert_eq!(code, 1, "{tool}");
        assert_eq!(
            e, "PROG: Block job failed: No space left on device\n",
            "{tool}"
        );
        assert_qemu_check_clean(&base);
        std::fs::remove_file(&top).unwrap();
        std::fs::remove_file(&base).unwrap();
    }
}

#[test]
fn null_co_sources_convert() {
    let dir = tempdir();
    let rimg = workspace_bin("rimg");
    let src = "json:{ 'driver': 'null-co', 'size': 1048576, 'read-zeroes': true }";
    for sparse in ["512", "0"] {
        let mut maps = Vec::new();
        for tool in [rimg.to_str().unwrap(), "qemu-img"] {
            let t = dir.path().join("t.qcow2");
            let (code, _, e) = out(
                tool,
                &[
                    "convert",
                    "-O",
                    "qcow2",
                    "-S",
                    sparse,
                    src,
                    t.to_str().unwrap(),
                ],
            );
            assert_eq!(code, 0, "{tool}: {e}");
            assert_qemu_check_clean(&t);
            maps.push(out("qemu-img", &["map", "--output=json", t.to_str().unwrap()]).1);
        }
        assert_eq!(maps[0], maps[1], "-S {sparse}");
    }
}

#[test]
fn hostile_specifications_are_refused_cleanly() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let deep = format!("json:{}", "[".repeat(100_000));
    let huge = format!("json:{{'driver': 'qcow2', 'x': '{}'}}", "a".repeat(120_000));
    let nested = format!(
        "json:{}'driver':'qcow2'{}",
        "{'file':".repeat(60),
        "}".repeat(60)
    );
    let cases = [
        deep.as_str(),
        huge.as_str(),
        nested.as_str(),
        "json:{'driver': 'qcow2'",
        "json:[1, 2]",
        "json:{'driver': 'nonesuch', 'file.filename': 'x'}",
        "json:{'driver': 'qcow2', 'file': {'driver': 'file'}}",
        "json:{'driver': 'qcow2', 'bogus-option': 1, 'file.filename': 'x'}",
        "blkdebug:/nonexistent/blkdebug.conf:x",
    ];
    for c in cases {
        let (code, _, e) = out(rimg, &["info", c]);
        assert_eq!(code, 1, "{}", &c[..c.len().min(80)]);
        assert!(e.starts_with("PROG: ") && !e.contains("panicked"), "{e}");
    }
    // Refusals worded as qemu-img words them.
    let dir = tempdir();
    let img = dir.path().join("t.qcow2");
    create(&img, &[]);
    let t = img.to_str().unwrap();
    for bad in [
        format!("json:{{'driver':'qcow2','bogus':1,'file.filename':'{t}'}}"),
        format!("json:{{'driver':'qcow2','file':{{'driver':'file','bogus':1,'filename':'{t}'}}}}"),
        format!("json:{{'driver':'nonesuch','file.filename':'{t}'}}"),
    ] {
        let (code, _, _) = same(&["info", &bad]);
        assert_eq!(code, 1);
    }
    for bad in [
        format!("driver=qcow2,bogus=1,file.filename={t}"),
        format!("driver=nonesuch,file.filename={t}"),
    ] {
        let (code, _, _) = same(&["info", "--image-opts", &bad]);
        assert_eq!(code, 1);
    }
    for o in [
        "driver=qcow2,file.filename",
        "file.driver=nonesuch,file.filename=x",
    ] {
        let (code, _, e) = out(rimg, &["info", "--image-opts", o]);
        assert_eq!(code, 1, "{o}");
        assert!(!e.contains("panicked"), "{e}");
    }
}

#[test]
fn snapshot_delete_with_failing_frees_leaks_as_qemu_img() {
    let dir = tempdir();
    let conf = dir.path().join("blkdebug.conf");
    std::fs::write(
        &conf,
        "[inject-error]\nevent = \"cluster_free\"\nerrno = \"5\"\n",
    )
    .unwrap();
    let mut checks = Vec::new();
    for tool in [
        workspace_bin("rimg").to_str().unwrap().to_string(),
        "qemu-img".into(),
    ] {
        let img = dir.path().join("t.qcow2");
        let _ = std::fs::remove_file(&img);
        let o = qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
        assert!(o.status.success());
        qemu_io(&img, &["write 0 64k"]);
        let o = qemu_img(&["snapshot", "-c", "foo", img.to_str().unwrap()]);
        assert!(o.status.success());
        let spec = format!("blkdebug:{}:{}", conf.display(), img.display());
        let (code, _, e) = out(&tool, &["snapshot", "-d", "foo", &spec]);
        assert_eq!(code, 1, "{tool}");
        assert_eq!(
            e,
            "qcow2_free_clusters failed: Input/output error\nPROG: Could not delete snapshot \
             'foo': Failed to free the cluster and L1 table: Input/output error\n",
            "{tool}"
        );
        // The same leaks; both tools repair them (and the COPIED flags
        // the leaks hid) alike.
        checks.push(out("qemu-img", &["check", img.to_str().unwrap()]));
        let copy = dir.path().join("copy.qcow2");
        std::fs::copy(&img, &copy).unwrap();
        let mut repairs = Vec::new();
        for fixer in [
            workspace_bin("rimg").to_str().unwrap().to_string(),
            "qemu-img".into(),
        ] {
            std::fs::copy(&copy, &img).unwrap();
            let (code, s, e) = out(&fixer, &["check", "-r", "leaks", img.to_str().unwrap()]);
            repairs.push((code, s, e));
            assert_qemu_check_clean(&img);
        }
        assert_eq!(repairs[0], repairs[1]);
        assert!(
            repairs[0].2.contains("Repairing OFLAG_COPIED"),
            "{:?}",
            repairs[0]
        );
    }
    assert_eq!(checks[0], checks[1]);
}

/// A source read failing in the middle of a convert, while several
/// workers copy in guest order (each waits for the chunk before it to
/// map its writes): the convert ends with the error as qemu-img's does,
/// no worker waits for good, and the partial target is consistent.
#[test]
fn convert_stops_cleanly_at_a_failing_source_read() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    let o = qemu_img(&["create", "-q", "-f", "raw", src.to_str().unwrap(), "32M"]);
    assert!(o.status.success());
    qemu_io(&src, &["write -P 7 0 32M"]);
    let conf = dir.path().join("blkdebug.conf");
    // 20 MiB in: chunks before it and after it are being copied.
    std::fs::write(
        &conf,
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"40960\"\nonce = \"off\"\n",
    )
    .unwrap();
    let spec = format!("blkdebug:{}:{}", conf.display(), src.display());
    let rimg = workspace_bin("rimg");
    for tool in [rimg.to_str().unwrap(), "qemu-img"] {
        let dst = dir.path().join("dst.qcow2");
        let _ = std::fs::remove_file(&dst);
        // A worker waiting for good would be killed here: status 124.
        let (code, _, e) = out(
            "timeout",
            &[
                "60",
                tool,
                "convert",
                "-O",
                "qcow2",
                &spec,
                dst.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 1, "{tool}: {e}");
        let name = Path::new(tool).file_name().unwrap().to_str().unwrap();
        assert_eq!(
            e,
            format!("{name}: error while reading at byte 20971520: Input/output error\n")
        );
        assert_qemu_check_clean(&dst);
    }
}
