//! The Debian package (`scripts/deb.sh`, cargo-deb) installs with dpkg
//! and works as installed, without systemctl: the five binaries in
//! /usr/bin, every manual page where man finds it, the completions and
//! units in place; the units, as installed, pass `systemd-analyze
//! verify`; the installed rimg-vhost-blk, started on a passed listening
//! socket as systemd starts it, tells READY=1, serves libblkio (two
//! queues) and stops at SIGTERM with status 0. Its maintainer scripts
//! reload systemd where it runs, and only there. The package is removed
//! at the end, leaving none of its files; the test refuses to run where
//! a package of that name is installed already.

use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rimg_tests::blk::Client;
use rimg_tests::daemon::{socket_activated, DaemonProcess};
use rimg_tests::{assert_qemu_check_clean, ensure_tool, qemu_create, run, tempdir, workspace_bin};

/// Removes the package when dropped unless [`Installed::remove`] did:
/// on a failure, whatever happened.
struct Installed {
    removed: bool,
}

impl Installed {
    /// `dpkg --purge rimg`, which must succeed and leave none of its
    /// files, nor the package's record (its postrm kept after `-r`).
    fn remove(mut self) {
        self.removed = true;
        ok(run("dpkg", &["--purge", "rimg"]), "dpkg --purge rimg");
        assert!(!Path::new("/usr/bin/rimg").exists(), "/usr/bin/rimg left");
        assert!(
            !Path::new("/usr/lib/systemd/system/rimg-vhost-blk@.service").exists(),
            "a unit left"
        );
        let o = run("dpkg-query", &["-W", "rimg"]);
        assert!(
            !o.status.success(),
            "dpkg still knows rimg: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.removed {
            // Also after a dpkg -i that unpacked and failed.
            let o = run("dpkg", &["--purge", "rimg"]);
            if !o.status.success() {
                eprintln!("dpkg --purge rimg: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
    }
}

fn ok(o: std::process::Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs the installed maintainer script `script` with `arg` as dpkg
/// does, with `env` added and a `systemctl` first in PATH that records its arguments,
/// and returns them (a line per call); in a private mount namespace
/// whose /run holds systemd/system with `systemd`, as where it runs.
fn maintainer_script(
    dir: &Path,
    script: &str,
    arg: &str,
    systemd: bool,
    env: &[(&str, &str)],
) -> String {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = dir.join("calls");
    let fake = bin.join("systemctl");
    std::fs::write(&fake, "#!/bin/sh\necho \"$*\" >> \"$RIMG_CALLS\"\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _ = std::fs::remove_file(&calls);
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    // Both in a private mount namespace with a /run of its own, so that
    // the host's own (systemd or not) does not count.
    let setup = if systemd {
        "mkdir -p /run/systemd/system; "
    } else {
        ""
    };
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-ec"]);
    cmd.arg(format!(
        "mount -t tmpfs rimg-test /run; {setup}exec /var/lib/dpkg/info/rimg.{script} {arg}"
    ));
    cmd.env("PATH", path)
        .env("RIMG_CALLS", &calls)
        .envs(env.iter().copied());
    ok(cmd.output().unwrap(), &format!("{script} {arg}"));
    std::fs::read_to_string(&calls).unwrap_or_default()
}

#[test]
fn the_package_installs_verifies_and_serves() {
    ensure_tool("systemd-analyze", "systemd");
    ensure_tool("man", "man-db");
    ensure_tool("unshare", "util-linux");
    // The test installs and removes the package: never over one the
    // machine has for its own use.
    let o = run("dpkg-query", &["-W", "-f=${Status}", "rimg"]);
    // "install ok installed" (not "unknown ok not-installed").
    assert!(
        String::from_utf8_lossy(&o.stdout).split_whitespace().last() != Some("installed"),
        "a package named rimg is installed here; this test would replace \
         and remove it: remove it first (dpkg --purge rimg)"
    );
    let bins = [
        "rimg",
        "rimg-vhost-blk",
        "rimg-vhost-net",
        "rimg-nbd",
        "rimg-vmm",
    ];
    // The binaries as the suite builds them; compressed fast.
    for bin in bins {
        workspace_bin(bin);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = ok(
        Command::new(root.join("scripts/deb.sh"))
            .args(["dev", "--fast"])
            .env("RIMG_DEB_NO_BUILD", "1")
            .output()
            .unwrap(),
        "scripts/deb.sh",
    );
    let deb = out
        .lines()
        .last()
        .expect("the .deb's path")
        .trim()
        .to_string();
    let installed = Installed { removed: false };
    ok(run("dpkg", &["-i", &deb]), "dpkg -i");

    for bin in bins {
        let path = format!("/usr/bin/{bin}");
        let v = ok(run(&path, &["--version"]), &path);
        assert!(v.starts_with(bin), "{path} --version: {v}");
        let page = ok(run("man", &["-w", bin]), &format!("man -w {bin}"));
        assert_eq!(page.trim(), format!("/usr/share/man/man1/{bin}.1.gz"));
    }
    // Every page the package holds (one per subcommand too), where man
    // finds it.
    let files = ok(run("dpkg", &["-L", "rimg"]), "dpkg -L");
    let pages: Vec<&str> = files
        .lines()
        .filter(|f| f.starts_with("/usr/share/man/man1/") && f.ends_with(".1.gz"))
        .collect();
    assert!(pages.len() >= 20, "{} pages: {files}", pages.len());
    for page in &pages {
        let name = page.rsplit('/').next().unwrap().trim_end_matches(".1.gz");
        let found = ok(run("man", &["-w", name]), &format!("man -w {name}"));
        assert_eq!(found.trim(), *page);
    }
    for (f, says) in [
        ("/usr/share/bash-completion/completions/rimg", "convert"),
        ("/usr/share/zsh/vendor-completions/_rimg", "#compdef rimg"),
        (
            "/usr/share/fish/vendor_completions.d/rimg.fish",
            "complete -c rimg",
        ),
    ] {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        assert!(text.contains(says), "{f}: {} bytes", text.len());
    }

    // The units as installed: an instance of each template.
    let units: Vec<String> = ["rimg-vhost-blk", "rimg-vhost-net", "rimg-nbd"]
        .iter()
        .flat_map(|u| [format!("{u}@test0.service"), format!("{u}@test0.socket")])
        .collect();
    for u in &units {
        let file = format!("/usr/lib/systemd/system/{}", u.replace("@test0", "@"));
        assert!(Path::new(&file).is_file(), "{file}");
    }
    let mut args = vec!["verify"];
    args.extend(units.iter().map(String::as_str));
    let o = run("systemd-analyze", &args);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success() && said.trim().is_empty(), "{said}");

    // The maintainer scripts tell systemd to reread the templates where
    // systemd runs (dpkg ran them already, on whatever this host is).
    // Run again as under systemd and as without: a daemon-reload each
    // where systemd runs, nothing elsewhere, and nothing enabled or
    // started.
    let scripts = tempdir();
    for (script, arg) in [
        ("postinst", "configure"),
        ("postinst", "abort-upgrade"),
        ("postrm", "remove"),
        ("postrm", "purge"),
    ] {
        let calls = maintainer_script(scripts.path(), script, arg, true, &[]);
        assert_eq!(calls, "--system daemon-reload\n", "{script} {arg}");
        let calls = maintainer_script(scripts.path(), script, arg, false, &[]);
        assert_eq!(calls, "", "{script} {arg} without systemd");
        // Installing into another root: not this system's systemd.
        let other = [("DPKG_ROOT", "/srv/chroot")];
        let calls = maintainer_script(scripts.path(), script, arg, true, &other);
        assert_eq!(calls, "", "{script} {arg} with DPKG_ROOT");
    }
    for (script, arg) in [("postrm", "upgrade"), ("postinst", "triggered")] {
        let calls = maintainer_script(scripts.path(), script, arg, true, &[]);
        assert_eq!(calls, "", "{script} {arg}");
    }

    // The installed block daemon, socket-activated, with seccomp (kill
    // mode, its default) and two queues.
    let d = tempdir();
    let img = d.path().join("disk.qcow2");
    qemu_create(&img, "", "64M");
    let sock = d.path().join("activated.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let notify = d.path().join("notify");
    let n = UnixDatagram::bind(&notify).unwrap();
    n.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let args = [
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--num-queues",
        "2",
    ]
    .map(std::ffi::OsStr::new);
    let mut cmd = socket_activated(Path::new("/usr/bin/rimg-vhost-blk"), &args, &listener);
    cmd.env("NOTIFY_SOCKET", &notify);
    let daemon = DaemonProcess::spawn(cmd, &sock).unwrap();
    drop(listener);
    let mut b = [0u8; 64];
    let len = n.recv(&mut b).expect("READY=1 within 30 s");
    assert_eq!(&b[..len], b"READY=1", "{}", daemon.log());
    let mut c = Client::connect(&sock, 2, false).unwrap();
    c.write(1, 8192, &[0xa5; 16384]).unwrap();
    assert_eq!(c.read(0, 8192, 16384).unwrap(), vec![0xa5; 16384]);
    drop(c);
    let (st, log) = daemon.terminate_within(Duration::from_secs(30));
    assert!(st.is_some_and(|s| s.success()), "{st:?}: {log}");
    assert_qemu_check_clean(&img);
    installed.remove();
}
