//! Image locks compatible with QEMU's: a writer excludes other writers and
//! consistent readers across rimg, qemu-img and qemu-io; -U (force share)
//! reads anyway. Writers racing to open an image at the same instant:
//! exactly one gets it, whether they are rimg or qemu-io processes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use qcow2::{open, Error, OpenOptions};
use rimg_tests::{qemu_img, run, tempdir, wait_unlocked, workspace_bin};

#[test]
fn rimg_writer_excludes_qemu_and_rimg() {
    let dir = tempdir();
    let img = dir.path().join("l.qcow2");
    let p = img.to_str().unwrap();
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", p, "16M"])
        .status
        .success());
    let w = open(
        &img,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    w.write_at(&[1u8; 4096], 0).unwrap();

    let info = qemu_img(&["info", p]);
    assert!(!info.status.success(), "qemu-img info while rimg writes");
    assert!(String::from_utf8_lossy(&info.stderr).contains("lock"));
    let io = run("qemu-io", &["-c", "write 0 4k", p]);
    assert!(
        String::from_utf8_lossy(&io.stderr).contains("\"write\" lock"),
        "qemu-io write while rimg writes"
    );
    assert!(
        qemu_img(&["info", "-U", p]).status.success(),
        "-U reads anyway"
    );

    match open(
        &img,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    ) {
        Err(Error::Locked(m)) => assert!(m.contains("\"write\" lock"), "{m}"),
        other => panic!("second writer: {other:?}"),
    }
    drop(w);
    assert!(
        qemu_img(&["check", p]).status.success(),
        "free again after close"
    );
}

#[test]
fn qemu_writer_excludes_rimg() {
    let rimg = workspace_bin("rimg");
    let rimg = rimg.to_str().unwrap();
    let dir = tempdir();
    let img = dir.path().join("q.qcow2");
    let p = img.to_str().unwrap();
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", p, "16M"])
        .status
        .success());
    // qemu-io keeps the image open (read-write) while its stdin is open.
    let mut child = Command::new("qemu-io")
        .arg(p)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    // Wait until it has opened the image: its answer to a command.
    writeln!(stdin, "write -P 7 0 4k").unwrap();
    let mut line = String::new();
    while !line.contains("wrote") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "qemu-io exited early"
        );
    }
    for args in [
        vec!["info", p],
        vec!["check", "-r", "all", p],
        vec!["snapshot", "-c", "s", p],
        vec!["bench", "-w", "-c", "1", p],
    ] {
        let r = run(rimg, &args);
        assert_eq!(
            r.status.code(),
            Some(1),
            "rimg {args:?} while qemu-io writes"
        );
        // QEMU's two lines: the lock, then the question.
        let err = String::from_utf8_lossy(&r.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "{err}");
        assert!(lines[0].ends_with("\"write\" lock"), "{err}");
        assert_eq!(
            lines[1],
            format!("Is another process using the image [{p}]?"),
            "{err}"
        );
    }
    assert!(
        run(rimg, &["info", "-U", p]).status.success(),
        "rimg info -U"
    );
    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    assert!(child.wait().unwrap().success());
    assert!(
        run(rimg, &["check", p]).status.success(),
        "free again after qemu-io quit"
    );
}

/// One process racing for the write lock.
struct Racer {
    child: std::process::Child,
    /// qemu-io's command pipe (closed to make it quit); None for a daemon.
    stdin: Option<std::process::ChildStdin>,
    name: String,
    /// Everything it printed, once it has exited.
    output: Option<std::thread::JoinHandle<String>>,
}

enum Event {
    /// Past `exec 3<fifo`: waiting at the barrier.
    Ready,
    /// Opened the image for writing (true), or failed to (false).
    Opened(bool),
}

/// Starts `prog args` behind the barrier FIFO `fifo`: a shell opens it,
/// says "ready", and execs the program once `cat` reads end of file
/// there, which every racer does at the same moment: when the test
/// closes the only writer. Events go to `tx`; `daemon` says how the
/// program reports success (rimg-vhost-blk: a "serving" line on stderr;
/// qemu-io: the "wrote" answer to a write on stdin).
fn racer(
    i: usize,
    fifo: &std::path::Path,
    prog: &std::path::Path,
    args: &[&str],
    daemon: bool,
    tx: std::sync::mpsc::Sender<(usize, Event)>,
) -> Racer {
    use std::io::Read;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"exec 3<"$0" && echo ready && cat <&3 >/dev/null && exec 3<&- && exec "$@""#)
        .arg(fifo)
        .arg(prog)
        .args(args)
        .stdin(if daemon {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn racer");
    let mut stdin = child.stdin.take();
    if let Some(s) = &mut stdin {
        // Read once the image is open.
        writeln!(s, "write -P 9 0 512").unwrap();
    }
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let output = std::thread::spawn(move || {
        let mut text = String::new();
        let mut line = String::new();
        if out.read_line(&mut line).unwrap_or(0) > 0 && line == "ready\n" {
            let _ = tx.send((i, Event::Ready));
        }
        text.push_str(&line);
        let won = if daemon {
            line.clear();
            let _ = err.read_line(&mut line);
            text.push_str(&line);
            line.contains("serving")
        } else {
            loop {
                line.clear();
                if out.read_line(&mut line).unwrap_or(0) == 0 {
                    break false;
                }
                text.push_str(&line);
                if line.contains("wrote") {
                    break true;
                }
            }
        };
        let _ = tx.send((i, Event::Opened(won)));
        let _ = out.read_to_string(&mut text);
        let _ = err.read_to_string(&mut text);
        text
    });
    Racer {
        child,
        stdin,
        name: format!("{} #{i}", prog.file_name().unwrap().to_string_lossy()),
        output: Some(output),
    }
}

/// Several rimg-vhost-blk and qemu-io processes open the same image for
/// writing at the same instant (released together from a FIFO barrier),
/// round after round. QEMU's locking protocol (take the lock bytes, then
/// look for conflicting ones) lets at most one of them win; rimg must
/// follow it, or a checker and a taker can both get through. Two that
/// take their bytes at the same moment both see the other: QEMU gives up,
/// rimg tries again after a random pause, so with rimg racers in the
/// round exactly one opener wins, every round.
#[test]
fn racing_writers_exactly_one_wins() {
    use std::sync::mpsc::channel;
    use std::time::{Duration, Instant};
    const ROUNDS: usize = 60;
    const DAEMONS: usize = 3;
    const QEMU_IOS: usize = 3;
    const WAIT: Duration = Duration::from_secs(30);
    let blk = workspace_bin("rimg-vhost-blk");
    let qemu_io = std::path::PathBuf::from("qemu-io");
    let dir = tempdir();
    let img = dir.path().join("race.qcow2");
    let p = img.to_str().unwrap();
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", p, "16M"])
        .status
        .success());
    let fifo = dir.path().join("barrier");
    assert!(run("mkfifo", &[fifo.to_str().unwrap()]).status.success());
    for round in 0..ROUNDS {
        // Our end, read-write so that opening it does not block and the
        // racers' opens do not either; closing it releases them.
        let gate = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .unwrap();
        let (tx, rx) = channel();
        let mut racers = Vec::new();
        for i in 0..DAEMONS + QEMU_IOS {
            racers.push(if i < DAEMONS {
                let sock = dir.path().join(format!("s{i}.sock"));
                let args = ["--socket", sock.to_str().unwrap(), "--image", p];
                racer(i, &fifo, &blk, &args, true, tx.clone())
            } else {
                racer(i, &fifo, &qemu_io, &[p], false, tx.clone())
            });
        }
        drop(tx);
        let end = Instant::now() + WAIT;
        let wait_all = |what: &str, want: fn(&Event) -> bool, got: &mut Vec<(usize, Event)>| {
            let mut n = 0;
            while n < racers.len() {
                let left = end.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(ev) => {
                        n += usize::from(want(&ev.1));
                        got.push(ev);
                    }
                    Err(e) => panic!("round {round}: {n} of {} {what}: {e}", racers.len()),
                }
            }
        };
        let mut events = Vec::new();
        wait_all("at the barrier", |e| matches!(e, Event::Ready), &mut events);
        drop(gate);
        wait_all("decided", |e| matches!(e, Event::Opened(_)), &mut events);
        let won: Vec<usize> = events
            .iter()
            .filter_map(|(i, e)| matches!(e, Event::Opened(true)).then_some(*i))
            .collect();
        // Let every winner go, then collect what everyone said.
        for (i, r) in racers.iter_mut().enumerate() {
            if won.contains(&i) && i < DAEMONS {
                // SAFETY: kill(2) on our child, not yet waited for.
                unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
            }
            drop(r.stdin.take());
        }
        let mut report = String::new();
        for (i, r) in racers.iter_mut().enumerate() {
            let st = loop {
                if let Some(st) = r.child.try_wait().unwrap() {
                    break st;
                }
                if Instant::now() >= end {
                    let _ = r.child.kill();
                    panic!("round {round}: {} did not exit", r.name);
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            let text = r.output.take().unwrap().join().unwrap();
            report.push_str(&format!("{} ({st}): {text}\n", r.name));
            if won.contains(&i) {
                assert!(st.success(), "round {round}: {} exit {st}: {text}", r.name);
            } else {
                assert!(!st.success(), "round {round}: {}: {text}", r.name);
                assert!(
                    text.contains("lock"),
                    "round {round}: {} failed: {text}",
                    r.name
                );
            }
        }
        assert!(
            won.len() == 1,
            "round {round}: {} writers opened the image:\n{report}",
            won.len()
        );
        wait_unlocked(&img, WAIT);
    }
    assert!(qemu_img(&["check", p]).status.success());
}

/// The same race within one process, many more rounds: threads released
/// together by a barrier each open the image for writing through the
/// library (each its own open file description, so their locks conflict
/// as separate processes' do). Exactly one open succeeds per round.
#[test]
fn racing_library_openers_exactly_one_wins() {
    use std::sync::{Arc, Barrier};
    const ROUNDS: usize = 300;
    const THREADS: usize = 4;
    let dir = tempdir();
    let img = dir.path().join("t.qcow2");
    let p = img.to_str().unwrap();
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", p, "16M"])
        .status
        .success());
    for round in 0..ROUNDS {
        let start = Arc::new(Barrier::new(THREADS));
        // Winners keep the image open until every thread has tried.
        let done = Arc::new(Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (start, done, img) = (start.clone(), done.clone(), img.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let r = open(
                        &img,
                        &OpenOptions {
                            writable: true,
                            ..Default::default()
                        },
                    );
                    done.wait();
                    match r {
                        Ok(_) => true,
                        Err(Error::Locked(_)) => false,
                        Err(e) => panic!("open: {e}"),
                    }
                })
            })
            .collect();
        let won = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|&w| w)
            .count();
        assert!(won == 1, "round {round}: {won} writers opened the image");
    }
}

/// Closing an image lets go of its locks at once, even while a child
/// process forked meanwhile still holds a copy of the descriptor (until
/// it executes its program; here it waits there for a second): the next
/// program opens the image for writing. Closing the descriptor alone
/// would leave the locks to the child's copy.
#[test]
fn closing_releases_the_locks_a_forked_child_still_shares() {
    use std::os::unix::process::CommandExt;
    let dir = tempdir();
    let img = dir.path().join("c.qcow2");
    let p = img.to_str().unwrap();
    rimg_tests::qemu_create(&img, "", "16M");
    let w = rimg_tests::image::open_rw(&img);
    // The child tells it has been forked through a pipe, then waits a
    // second before its exec.
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the two-element array we own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (rd, wr) = (fds[0], fds[1]);
    let child = std::thread::spawn(move || {
        let mut cmd = Command::new("true");
        // SAFETY: the closure runs in the forked child before exec and
        // calls only async-signal-safe functions (write, nanosleep) on a
        // descriptor the parent keeps open until the child has run.
        unsafe {
            cmd.pre_exec(move || {
                libc::write(wr, b"x".as_ptr().cast(), 1);
                let ts = libc::timespec {
                    tv_sec: 1,
                    tv_nsec: 0,
                };
                libc::nanosleep(&ts, std::ptr::null_mut());
                Ok(())
            });
        }
        // Returns once the child has executed `true`.
        cmd.status().unwrap()
    });
    let mut b = [0u8; 1];
    // SAFETY: reads one byte into a buffer we own from our pipe.
    assert_eq!(unsafe { libc::read(rd, b.as_mut_ptr().cast(), 1) }, 1);
    // The child exists now and holds the image's descriptor.
    drop(w);
    let o = run("qemu-io", &["-c", "write 0 4k", p]);
    assert!(
        o.status.success(),
        "the image stayed locked after the close: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(child.join().unwrap().success());
    // SAFETY: both ends are ours and no longer used.
    unsafe {
        libc::close(rd);
        libc::close(wr);
    }
}

/// A new image is made only once its file's write lock is held, as QEMU's
/// file layer makes it: create, convert and dd over an image in use, or
/// over their own source, are refused in qemu-img's words and leave the
/// file as it was (rimg used to truncate it first). A writable open with
/// -U is refused.
#[test]
fn making_an_image_over_one_in_use_leaves_it_alone() {
    use rimg_tests::same_as_qemu as same;
    let d = tempdir();
    let dir = d.path();
    let img = dir.join("busy.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"])
            .status
            .success()
    );
    std::fs::write(dir.join("src.raw"), vec![7u8; 1 << 20]).unwrap();
    let holder = open(
        &img,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    holder.write_at(&[9u8; 4096], 0).unwrap();
    holder.flush().unwrap();
    let before = std::fs::read(&img).unwrap();
    for args in [
        &["create", "-f", "vdi", "busy.qcow2", "1M"][..],
        &["create", "-f", "qcow2", "busy.qcow2", "1M"],
        &["create", "-f", "raw", "busy.qcow2", "1M"],
        &["convert", "-O", "raw", "src.raw", "busy.qcow2"],
        &["convert", "-O", "vmdk", "src.raw", "busy.qcow2"],
        &["dd", "-O", "vpc", "if=src.raw", "of=busy.qcow2"],
        &["snapshot", "-c", "s1", "-U", "busy.qcow2"],
    ] {
        let (code, ..) = same(dir, args);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{args:?} changed the image"
        );
    }
    drop(holder);
    // Its own source as the target.
    let src = std::fs::read(dir.join("src.raw")).unwrap();
    for args in [
        &["convert", "-f", "raw", "-O", "raw", "src.raw", "src.raw"][..],
        &["convert", "-f", "raw", "-O", "qcow2", "src.raw", "src.raw"],
        &["snapshot", "-c", "s1", "-U", "busy.qcow2"],
    ] {
        let (code, ..) = same(dir, args);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(
            std::fs::read(dir.join("src.raw")).unwrap() == src,
            "{args:?}"
        );
    }
}
