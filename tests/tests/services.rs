//! The daemons as systemd runs them: a listening socket passed on
//! descriptor 3 (socket activation), readiness and stopping told on
//! NOTIFY_SOCKET (Type=notify), seccomp in kill mode, SIGTERM at the end
//! with status 0; and the unit files in contrib/systemd pass
//! `systemd-analyze verify`, manual pages included.

use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rimg_tests::blk::Client;
use rimg_tests::daemon::{socket_activated, DaemonProcess};
use rimg_tests::{assert_qemu_check_clean, qemu_create, tempdir, workspace_bin};

/// `bin ARGS` socket-activated on `listener`, with NOTIFY_SOCKET naming
/// `notify`.
fn activated(bin: &str, args: &[&str], listener: &UnixListener, notify: &Path) -> Command {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let mut cmd = socket_activated(&workspace_bin(bin), &args, listener);
    cmd.env("NOTIFY_SOCKET", notify);
    cmd
}

/// The next message on the notify socket.
fn message(n: &UnixDatagram) -> String {
    let mut b = [0u8; 256];
    let len = n
        .recv(&mut b)
        .expect("a message on NOTIFY_SOCKET within 30 s");
    String::from_utf8_lossy(&b[..len]).into_owned()
}

fn notify_socket(dir: &Path) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.join("notify");
    let n = UnixDatagram::bind(&path).unwrap();
    n.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    (n, path)
}

/// rimg-vhost-blk on a socket systemd made: it tells READY=1 once it
/// serves, serves libblkio on that socket (two queues), tells
/// STOPPING=1 on SIGTERM, exits 0 and leaves the socket, which is
/// systemd's, in place.
#[test]
fn vhost_blk_serves_a_passed_socket_and_notifies() {
    let d = tempdir();
    let img = d.path().join("disk.qcow2");
    qemu_create(&img, "", "64M");
    let sock = d.path().join("activated.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let (n, notify) = notify_socket(d.path());
    // --socket names another path: the passed socket is the one served.
    let named = d.path().join("unused.sock");
    let cmd = activated(
        "rimg-vhost-blk",
        &[
            "--socket",
            named.to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
            "--num-queues",
            "2",
        ],
        &listener,
        &notify,
    );
    let daemon = DaemonProcess::spawn(cmd, &sock).unwrap();
    drop(listener);
    assert_eq!(message(&n), "READY=1", "{}", daemon.log());
    let mut c = Client::connect(&sock, 2, false).unwrap();
    c.write(1, 4096, &[0x5a; 8192]).unwrap();
    assert_eq!(c.read(0, 4096, 8192).unwrap(), vec![0x5a; 8192]);
    drop(c);
    let (st, log) = daemon.terminate_within(Duration::from_secs(30));
    assert_eq!(message(&n), "STOPPING=1", "{log}");
    assert!(st.is_some_and(|s| s.success()), "{st:?}: {log}");
    assert!(sock.exists(), "the passed socket was removed");
    assert!(!named.exists(), "--socket was bound too");
    assert_qemu_check_clean(&img);
}

/// rimg-nbd notifies the same way.
#[test]
fn nbd_notifies_ready_and_stopping() {
    let d = tempdir();
    let img = d.path().join("disk.raw");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    let sock = d.path().join("nbd.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let (n, notify) = notify_socket(d.path());
    let mut cmd = activated(
        "rimg-nbd",
        &["-t", "-f", "raw", img.to_str().unwrap()],
        &listener,
        &notify,
    );
    // Its "serving" line is info-level (silent by default, as qemu-nbd).
    cmd.env("RUST_LOG", "info");
    let daemon = DaemonProcess::spawn(cmd, &sock).unwrap();
    drop(listener);
    assert_eq!(message(&n), "READY=1");
    let uri = rimg_tests::nbd::unix_uri(&sock, "");
    let mut io = Command::new("qemu-io");
    io.args(["-f", "raw", "-c", "read -P 7 0 1M", &uri]);
    let o = rimg_tests::run_watched(io, Duration::from_secs(60));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.is_some_and(|s| s.success()) && !out.contains("fail"),
        "qemu-io (timed out: {}): {out}",
        o.timed_out
    );
    let (st, log) = daemon.terminate_within(Duration::from_secs(30));
    assert_eq!(message(&n), "STOPPING=1", "{log}");
    assert!(st.is_some_and(|s| s.success()), "{st:?}: {log}");
}

/// Each unit in contrib/systemd, as an instance, passes
/// `systemd-analyze verify` without a word (warnings count: it exits 0 on
/// most of them), its binaries pointed at the ones built here, and the
/// manual pages its Documentation= names found (MANPATH: the pages the
/// daemons print with `--man`).
#[test]
fn unit_files_pass_systemd_analyze_verify() {
    rimg_tests::ensure_tool("systemd-analyze", "systemd");
    rimg_tests::ensure_tool("man", "man-db");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd");
    let d = tempdir();
    let man1 = d.path().join("man/man1");
    std::fs::create_dir_all(&man1).unwrap();
    for bin in ["rimg-vhost-blk", "rimg-vhost-net", "rimg-nbd"] {
        let o = rimg_tests::run(workspace_bin(bin).to_str().unwrap(), &["--man"]);
        assert!(o.status.success(), "{bin} --man: {o:?}");
        std::fs::write(man1.join(format!("{bin}.1")), o.stdout).unwrap();
    }
    let mut args = vec!["verify".to_string()];
    let mut seen = 0;
    for e in std::fs::read_dir(&units).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let text = std::fs::read_to_string(e.path()).unwrap();
        let mut text = text.clone();
        for bin in ["rimg-vhost-blk", "rimg-vhost-net", "rimg-nbd"] {
            let built = workspace_bin(bin);
            text = text.replace(
                &format!("/usr/bin/{bin} "),
                &format!("{} ", built.display()),
            );
        }
        std::fs::write(d.path().join(&name), text).unwrap();
        // The template, and an instance of it for verify.
        let instance = name.replace("@.", "@test0.");
        args.push(d.path().join(instance).to_str().unwrap().to_string());
        seen += 1;
    }
    assert!(seen >= 6, "{seen} units in {}", units.display());
    let o = Command::new("systemd-analyze")
        .args(&args)
        .env("MANPATH", d.path().join("man"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success() && said.trim().is_empty(), "{said}");
}

/// A directory `uid`/`gid` may write to (for the sockets a daemon that
/// gave up root removes at exit), with an image only root may open.
fn root_image_and_user_dir(
    d: &Path,
    uid: u32,
    gid: u32,
) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let img = d.join("disk.qcow2");
    qemu_create(&img, "", "64M");
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o600)).unwrap();
    let run = d.join("run");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(uid), Some(gid)).unwrap();
    (img, run)
}

/// `--user nobody`: rimg-vhost-blk opens an image only root may open and
/// binds its sockets (which stay root's: root's control client still
/// talks to it), then runs as nobody for good, every thread, no
/// capability left, while it serves two queues in kill mode; at SIGTERM
/// with no frontend (nobody may not connect to the socket) it removes its
/// sockets and exits 0.
#[test]
fn vhost_blk_gives_up_root_for_user() {
    use std::os::unix::fs::MetadataExt;
    let (uid, gid) = rimg_tests::daemon::account_ids("nobody");
    let d = tempdir();
    let (img, run) = root_image_and_user_dir(d.path(), uid, gid);
    let sock = run.join("blk.sock");
    let ctl = run.join("blk.ctl");
    let mut cmd = Command::new(workspace_bin("rimg-vhost-blk"));
    cmd.arg("--socket").arg(&sock).arg("--control").arg(&ctl);
    cmd.arg("--image").arg(&img);
    cmd.args(["--num-queues", "2", "--user", "nobody"]);
    let daemon = DaemonProcess::spawn(cmd, &sock).unwrap();
    for s in [&sock, &ctl] {
        let m = std::fs::symlink_metadata(s).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o022), (0, 0), "{}", s.display());
    }
    let mut c = Client::connect(&sock, 2, false).unwrap();
    rimg_tests::daemon::assert_runs_as(daemon.pid(), uid, gid);
    c.write(1, 4096, &[0x5a; 8192]).unwrap();
    assert_eq!(c.read(0, 4096, 8192).unwrap(), vec![0x5a; 8192]);
    c.flush(0).unwrap();
    drop(c);
    let st = rimg_tests::control::ok(&ctl, "query-status", serde_json::json!({}));
    assert_eq!(st["connections"], 1, "{st}");
    let (st, log) = daemon.terminate_within(Duration::from_secs(30));
    assert!(st.is_some_and(|s| s.success()), "{st:?}: {log}");
    assert!(!log.contains("cannot remove"), "{log}");
    assert!(!log.contains("Permission denied"), "{log}");
    assert!(!sock.exists() && !ctl.exists(), "{log}");
    assert_eq!(std::fs::metadata(&img).unwrap().uid(), 0);
    assert_qemu_check_clean(&img);
    let o = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x5a 4096 8192"])
        .arg(&img)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && !out.contains("fail"), "{out}");
}

/// Socket-activated with `--user`, on a socket of root's alone (mode
/// 0600, as the unit's SocketMode=): the daemon cannot connect to it, yet
/// SIGTERM with no frontend ends it at once, status 0, socket left.
#[test]
fn vhost_blk_as_user_on_a_passed_socket_stops_at_sigterm() {
    use std::os::unix::fs::PermissionsExt;
    let (uid, gid) = rimg_tests::daemon::account_ids("nobody");
    let d = tempdir();
    let (img, run) = root_image_and_user_dir(d.path(), uid, gid);
    let sock = run.join("activated.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (n, notify) = notify_socket(d.path());
    let args = [
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--user",
        "nobody",
    ];
    let daemon = DaemonProcess::spawn(
        activated("rimg-vhost-blk", &args, &listener, &notify),
        &sock,
    )
    .unwrap();
    drop(listener);
    assert_eq!(message(&n), "READY=1", "{}", daemon.log());
    rimg_tests::daemon::assert_runs_as(daemon.pid(), uid, gid);
    let (st, log) = daemon.terminate_within(Duration::from_secs(30));
    assert_eq!(message(&n), "STOPPING=1", "{log}");
    assert!(st.is_some_and(|s| s.success()), "{st:?}: {log}");
    assert!(sock.exists(), "the passed socket was removed");
}

/// rimg-nbd gives up root the same way, and a user that does not exist
/// is refused before anything is served (status 2, clap's error).
#[test]
fn nbd_gives_up_root_for_user() {
    use std::os::unix::fs::MetadataExt;
    let (uid, gid) = rimg_tests::daemon::account_ids("nobody");
    let d = tempdir();
    let (img, run) = root_image_and_user_dir(d.path(), uid, gid);
    let sock = run.join("nbd.sock");
    let user = format!("nobody:{gid}");
    let s = rimg_tests::nbd::serve(
        &sock,
        &["-f", "qcow2", "--user", &user, img.to_str().unwrap()],
    );
    assert_eq!(std::fs::symlink_metadata(&sock).unwrap().uid(), 0);
    let uri = rimg_tests::nbd::unix_uri(&sock, "");
    let mut io = Command::new("qemu-io");
    io.args([
        "-f",
        "raw",
        "-c",
        "write -P 7 1M 64k",
        "-c",
        "read -P 7 1M 64k",
        &uri,
    ]);
    let o = rimg_tests::run_watched(io, Duration::from_secs(60));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.is_some_and(|s| s.success()) && !out.contains("fail"),
        "{out}"
    );
    rimg_tests::daemon::assert_runs_as(s.pid(), uid, gid);
    rimg_tests::nbd::stop(s);
    assert!(!sock.exists());
    assert_qemu_check_clean(&img);

    let o = rimg_tests::run(
        workspace_bin("rimg-nbd").to_str().unwrap(),
        &[
            "-k",
            sock.to_str().unwrap(),
            "--user",
            "no-such-user-rimg",
            img.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("no user named \"no-such-user-rimg\""), "{err}");
    assert!(!sock.exists());
}
