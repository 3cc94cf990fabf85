//! Twin directories for comparing rimg with qemu-img step for step: setup
//! commands run in both, the command under test runs with qemu-img in one
//! and rimg in the other, and the outputs must match (rimg's error prefix
//! read as qemu-img's).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{tempdir, workspace_bin};

pub struct Twins {
    _tmp: tempfile::TempDir,
    pub q: PathBuf,
    pub r: PathBuf,
    rimg: PathBuf,
}

impl Default for Twins {
    fn default() -> Self {
        Self::new()
    }
}

impl Twins {
    pub fn new() -> Twins {
        let tmp = tempdir();
        let (q, r) = (tmp.path().join("q"), tmp.path().join("r"));
        std::fs::create_dir(&q).unwrap();
        std::fs::create_dir(&r).unwrap();
        Twins {
            _tmp: tmp,
            q,
            r,
            rimg: workspace_bin("rimg"),
        }
    }

    /// Runs a setup command (qemu-img or qemu-io) in both; it must work.
    pub fn both(&self, tool: &str, args: &[&str]) {
        for d in [&self.q, &self.r] {
            let o = Command::new(tool)
                .args(args)
                .current_dir(d)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{tool} {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }

    /// Creates the qcow2 image `file` in both (`opts` as `-o` unless
    /// empty, over the qcow2 `backing` if any; an empty `size` for the
    /// backing file's).
    pub fn create(&self, file: &str, opts: &str, backing: Option<&str>, size: &str) {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        if let Some(b) = backing {
            args.extend(["-b", b, "-F", "qcow2"]);
        }
        args.push(file);
        if !size.is_empty() {
            args.push(size);
        }
        self.both("qemu-img", &args);
    }

    /// Runs qemu-io with one `-c` per command on `file` in both.
    pub fn io(&self, file: &str, cmds: &[&str]) {
        let mut args = Vec::new();
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(file);
        self.both("qemu-io", &args);
    }

    /// Writes `bytes` at `off` into `file` in both directories.
    pub fn poke(&self, file: &str, off: u64, bytes: &[u8]) {
        for d in [&self.q, &self.r] {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(d.join(file))
                .unwrap();
            f.write_all_at(bytes, off).unwrap();
        }
    }

    /// The big-endian u64 at `off` of `file` (qemu-img's twin).
    pub fn be64(&self, file: &str, off: u64) -> u64 {
        let f = std::fs::File::open(self.q.join(file)).unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).unwrap();
        u64::from_be_bytes(b)
    }

    /// Runs `args` with qemu-img and with rimg.
    pub fn run(&self, args: &[&str]) -> (Output, Output) {
        let q = Command::new("qemu-img")
            .args(args)
            .current_dir(&self.q)
            .output()
            .unwrap();
        let r = Command::new(&self.rimg)
            .args(args)
            .current_dir(&self.r)
            .output()
            .unwrap();
        (q, r)
    }

    /// Runs `args` with both tools and asserts the same exit code, stdout
    /// and stderr; returns stdout and stderr.
    pub fn same(&self, args: &[&str]) -> (String, String) {
        let (q, r) = self.run(args);
        let norm = |b: &[u8]| String::from_utf8_lossy(b).replace("rimg:", "qemu-img:");
        assert_eq!(
            (q.status.code(), norm(&q.stdout), norm(&q.stderr)),
            (r.status.code(), norm(&r.stdout), norm(&r.stderr)),
            "{args:?}: qemu-img (left) and rimg (right) differ"
        );
        (norm(&q.stdout), norm(&q.stderr))
    }

    /// Runs `tool` (qemu-io, qemu-img as the judge) on both twins and
    /// asserts the same exit code and output.
    pub fn same_judge(&self, tool: &str, args: &[&str]) -> String {
        let run = |d: &Path| {
            let o = Command::new(tool)
                .args(args)
                .current_dir(d)
                .output()
                .unwrap();
            // qemu-io's timing lines differ from run to run.
            let out = String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| !l.contains(" ops; "))
                .map(|l| format!("{l}\n"))
                .collect::<String>();
            (
                o.status.code(),
                out,
                String::from_utf8_lossy(&o.stderr).to_string(),
            )
        };
        let q = run(&self.q);
        assert_eq!(q, run(&self.r), "{tool} {args:?}");
        q.1
    }

    /// As [`Twins::same`], for exit code and messages only: where a rebuild
    /// puts the new refcount structures (and so the image end) differs.
    pub fn same_msgs(&self, args: &[&str]) {
        let (q, r) = self.run(args);
        let msgs = |o: &Output| {
            let e = String::from_utf8_lossy(&o.stderr).replace("rimg:", "qemu-img:");
            (o.status.code(), e)
        };
        assert_eq!(msgs(&q), msgs(&r), "{args:?}");
    }

    /// qemu-img's view of `file` in both twins: these lines of its
    /// `info` must be the same.
    pub fn same_info(&self, file: &str, keep: &str) {
        let lines = |d: &Path| {
            let o = Command::new("qemu-img")
                .args(["info", "-U", file])
                .current_dir(d)
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains(keep))
                .map(String::from)
                .collect::<Vec<_>>()
        };
        let q = lines(&self.q);
        assert!(!q.is_empty(), "no '{keep}' in qemu-img info");
        assert_eq!(q, lines(&self.r));
    }

    pub fn check_clean(&self, file: &str) {
        crate::assert_qemu_check_clean(&self.q.join(file));
        crate::assert_qemu_check_clean(&self.r.join(file));
    }
}
