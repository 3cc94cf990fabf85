//! Progress of long operations (`-p` of convert, commit, rebase,
//! compare, amend and checksum), shown only when asked for, as in
//! qemu-img.
//!
//! On a terminal (stderr is a TTY) it is an indicatif bar on stderr.
//! Anywhere else it is qemu-img's own progress output on stdout, which
//! scripts read: `    (12.34/100%)\r` each time the figure has moved by
//! more than the command's step (qemu_progress_init's min_skip), always
//! at 0 and 100 %, and a newline at the end.
//!
//! `--progress=json` prints one JSON object per line on stderr (stdout
//! keeps the command's own output), at the same steps and at the end:
//! `{"phase":"converting","done":N,"total":N,"percent":P,"rate":R,"elapsed":S}`,
//! with bytes (amend: ten-thousandths), bytes per second and seconds;
//! `done` never goes back, and the last line adds `"end":true`.
//!
//! SIGUSR1 never ends the command: without `-p` it prints the figure on
//! stderr (`    (12.34/100%)\n`) at the next step, as qemu-img does; with
//! `--progress=json` it prints a line at the next step.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use clap::Args;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Off,
    /// An indicatif bar on stderr.
    Bar,
    /// qemu-img's lines on stdout.
    Lines,
    /// JSON objects, one per line, on stderr.
    Json,
}

impl Target {
    /// The target for a command run with `-p` = `on`.
    pub fn detect(on: bool) -> Target {
        if !on {
            Target::Off
        } else if std::io::stderr().is_terminal() {
            Target::Bar
        } else {
            Target::Lines
        }
    }
}

/// The progress option every command that shows progress takes.
#[derive(Args, Debug, Clone, Default)]
pub struct ProgressOpt {
    /// Show progress (-p); --progress=json prints JSON lines on stderr
    #[arg(
        short = 'p',
        long = "progress",
        value_name = "FORMAT",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "human",
        value_parser = ["human", "json"]
    )]
    progress: Option<String>,
}

impl ProgressOpt {
    /// Where progress goes; `quiet` (-q) turns qemu-img's progress off,
    /// not the JSON lines a script asked for by name.
    pub fn target(&self, quiet: bool) -> Target {
        match self.progress.as_deref() {
            Some("json") => Target::Json,
            Some(_) if !quiet => Target::detect(true),
            _ => Target::Off,
        }
    }
}

/// Set by the SIGUSR1 handler, taken by the next step.
static USR1: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    USR1.store(true, Ordering::Relaxed);
}

/// Catches SIGUSR1 (whose default ends the process) for the figure;
/// `main` calls it first, so that no signal early on kills rimg, as none
/// kills qemu-img.
pub fn catch_usr1() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid value to fill in; the
        // handler only stores to an atomic, which is async-signal-safe;
        // sa_mask is initialised by sigfillset before use.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_usr1 as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigfillset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        }
    });
}

/// Progress of `total` units of work; shared by worker threads.
pub struct Progress {
    total: u64,
    done: AtomicU64,
    kind: Kind,
}

enum Kind {
    Off,
    Bar(ProgressBar),
    Json {
        phase: String,
        min_skip: f64,
        /// The percent and `done` last printed.
        last: Mutex<(f64, u64)>,
        start: Instant,
        out: Mutex<Box<dyn Write + Send>>,
    },
    Lines {
        min_skip: f64,
        /// The figure last printed.
        last: Mutex<f64>,
        out: Mutex<Box<dyn Write + Send>>,
    },
}

impl Progress {
    /// Starts showing progress for a command doing `what` (a word for the
    /// bar: "Converting") in steps of at least `min_skip` percent.
    pub fn new(target: Target, what: &str, total: u64, min_skip: f64) -> Progress {
        Self::with_target(target, what, total, min_skip, move || match target {
            Target::Json => Box::new(std::io::stderr()),
            _ => Box::new(std::io::stdout()),
        })
    }

    /// As [`new`](Self::new), qemu-img's lines or the JSON ones written
    /// to `out()` (for tests), SIGUSR1 left alone.
    pub fn with_target(
        target: Target,
        what: &str,
        total: u64,
        min_skip: f64,
        out: impl FnOnce() -> Box<dyn Write + Send>,
    ) -> Progress {
        let kind = match target {
            Target::Off => Kind::Off,
            Target::Bar => {
                let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
                let style = ProgressStyle::with_template(
                    "{prefix} [{bar:40}] {percent:>3}% {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
                )
                .expect("a valid template")
                .progress_chars("=> ");
                bar.set_style(style);
                bar.set_prefix(what.to_string());
                Kind::Bar(bar)
            }
            Target::Lines => Kind::Lines {
                min_skip,
                last: Mutex::new(0.0),
                out: Mutex::new(out()),
            },
            Target::Json => Kind::Json {
                phase: what.to_lowercase(),
                min_skip,
                last: Mutex::new((0.0, 0)),
                start: Instant::now(),
                out: Mutex::new(out()),
            },
        };
        let p = Progress {
            total,
            done: AtomicU64::new(0),
            kind,
        };
        match &p.kind {
            Kind::Json { last, .. } => p.print_json(&mut last.lock().unwrap(), true, false),
            _ => p.show(),
        }
        p
    }

    /// Counts `n` more units done.
    pub fn add(&self, n: u64) {
        if n == 0 {
            // Nothing done (a hole): qemu-img prints no step for it.
            return;
        }
        match &self.kind {
            // Counted and judged under the lock: two workers adding at
            // once print the steps the same adds in a row would (a step
            // is not swallowed by the other's larger total).
            Kind::Lines { last, .. } => {
                let mut last = last.lock().unwrap();
                self.done.fetch_add(n, Ordering::Relaxed);
                self.print_line(&mut last);
            }
            Kind::Json { last, .. } => {
                let mut last = last.lock().unwrap();
                self.done.fetch_add(n, Ordering::Relaxed);
                self.print_json(&mut last, false, false);
            }
            _ => {
                self.done.fetch_add(n, Ordering::Relaxed);
                self.show();
            }
        }
        self.poked();
    }

    /// The figure now, in percent.
    fn percent(&self) -> f64 {
        let done = self.done.load(Ordering::Relaxed);
        if self.total == 0 {
            100.0
        } else {
            (done.min(self.total) as f64 * 100.0 / self.total as f64).min(100.0)
        }
    }

    /// After SIGUSR1: the figure on stderr without -p (qemu-img's
    /// dummy progress), a JSON line with --progress=json.
    fn poked(&self) {
        if !USR1.load(Ordering::Relaxed) || !USR1.swap(false, Ordering::Relaxed) {
            return;
        }
        match &self.kind {
            Kind::Off => eprintln!("    ({:.2}/100%)", self.percent()),
            Kind::Json { last, .. } => {
                let mut last = last.lock().unwrap();
                self.print_json(&mut last, true, false);
            }
            _ => {}
        }
    }

    /// Prints a JSON line if the figure moved by the step since `last`
    /// (the percent and `done` printed before, its lock held), or
    /// `force`; `end` marks the last line.
    fn print_json(&self, last: &mut (f64, u64), force: bool, end: bool) {
        let Kind::Json {
            phase,
            min_skip,
            start,
            out,
            ..
        } = &self.kind
        else {
            return;
        };
        let cur = self.percent();
        let moved = (cur - last.0).abs() > *min_skip || (cur == 100.0 && last.0 != 100.0);
        if !(force || end || moved) {
            return;
        }
        let done = self
            .done
            .load(Ordering::Relaxed)
            .min(self.total)
            .max(last.1);
        *last = (cur, done);
        let secs = start.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let mut v = serde_json::json!({
            "phase": phase,
            "done": done,
            "total": self.total,
            "percent": (cur * 100.0).round() / 100.0,
            "rate": rate.round() as u64,
            "elapsed": (secs * 1000.0).round() / 1000.0,
        });
        if end {
            v["end"] = true.into();
        }
        let mut out = out.lock().unwrap();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }

    /// Shows `pct` percent as qemu_progress_print(pct, 0) does, for
    /// commands whose figure is computed rather than counted (amend's may
    /// go back). qemu-img works in single precision; so does this, so the
    /// same steps print.
    pub fn set_percent(&self, pct: f32) {
        let pct = pct.clamp(0.0, 100.0);
        let pos = (f64::from(pct) / 100.0 * self.total as f64) as u64;
        match &self.kind {
            // Recorded for SIGUSR1's figure.
            Kind::Off => self.done.store(pos, Ordering::Relaxed),
            Kind::Json { last, .. } => {
                let mut last = last.lock().unwrap();
                self.done.store(pos, Ordering::Relaxed);
                self.print_json(&mut last, false, false);
            }
            Kind::Bar(b) => {
                self.done.store(pos, Ordering::Relaxed);
                b.set_position(pos);
            }
            Kind::Lines {
                min_skip,
                last,
                out,
            } => {
                let mut last = last.lock().unwrap();
                let (l, skip) = (*last as f32, *min_skip as f32);
                if pct > l + skip || pct < l - skip || pct == 0.0 || pct == 100.0 {
                    *last = f64::from(pct);
                    let mut out = out.lock().unwrap();
                    let _ = write!(out, "    ({pct:.2}/100%)\r");
                    let _ = out.flush();
                }
            }
        }
        self.poked();
    }

    /// Runs `f` (which prints to the terminal) with the bar out of the way.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.kind {
            Kind::Bar(b) => b.suspend(f),
            _ => f(),
        }
    }

    /// The work is done, whatever was counted: shows 100 %
    /// (qemu_progress_print(100, 0)).
    pub fn complete(&self) {
        self.done.store(self.total, Ordering::Relaxed);
        self.show();
    }

    /// Ends the progress output (qemu_progress_end): the bar stays as it
    /// is (full unless the command stopped early); qemu-img's lines end
    /// with a newline.
    pub fn finish(&self) {
        match &self.kind {
            Kind::Off => {}
            Kind::Bar(b) => {
                if self.done.load(Ordering::Relaxed) >= self.total {
                    b.finish();
                } else {
                    b.abandon();
                }
            }
            Kind::Lines { out, .. } => {
                let mut out = out.lock().unwrap();
                let _ = writeln!(out);
                let _ = out.flush();
            }
            Kind::Json { last, .. } => {
                let mut last = last.lock().unwrap();
                self.print_json(&mut last, false, true);
            }
        }
    }

    fn show(&self) {
        match &self.kind {
            Kind::Off => {}
            Kind::Bar(b) => b.set_position(self.done.load(Ordering::Relaxed).min(self.total)),
            Kind::Lines { last, .. } => {
                // Read under the lock: with several workers adding, each
                // prints at least what the one before it printed.
                let mut last = last.lock().unwrap();
                self.print_line(&mut last);
            }
            Kind::Json { last, .. } => {
                let mut last = last.lock().unwrap();
                self.print_json(&mut last, false, false);
            }
        }
    }

    /// Prints the current figure if qemu_progress_print would; `last` is
    /// the figure printed before (its lock held).
    fn print_line(&self, last: &mut f64) {
        let Kind::Lines { min_skip, out, .. } = &self.kind else {
            return;
        };
        let cur = self.percent();
        // qemu_progress_print's rule.
        if cur > *last + min_skip || cur < *last - min_skip || cur == 0.0 || cur == 100.0 {
            *last = cur;
            let mut out = out.lock().unwrap();
            let _ = write!(out, "    ({cur:.2}/100%)\r");
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A writer whose bytes the test can read.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(total: u64, min_skip: f64, steps: &[u64], complete: bool) -> String {
        let buf = Shared::default();
        let b2 = buf.clone();
        let p = Progress::with_target(Target::Lines, "x", total, min_skip, move || Box::new(b2));
        for &s in steps {
            p.add(s);
        }
        if complete {
            p.complete();
        }
        p.finish();
        let v = buf.0.lock().unwrap().clone();
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn prints_qemu_img_lines() {
        // Three thirds with a 1 % step: every third shows, and 100 %
        // again when the command says it is done (as qemu-img convert).
        assert_eq!(
            lines(300, 1.0, &[100, 100, 100], true),
            "    (0.00/100%)\r    (33.33/100%)\r    (66.67/100%)\r    (100.00/100%)\r    (100.00/100%)\r\n"
        );
        // Steps of 1 % with a 2 % minimum: only every third one passes;
        // stopped early (compare's mismatch), it just ends the line.
        assert_eq!(
            lines(100, 2.0, &[1; 7], false),
            "    (0.00/100%)\r    (3.00/100%)\r    (6.00/100%)\r\n"
        );
        assert_eq!(
            lines(100, 2.0, &[1; 7], true),
            "    (0.00/100%)\r    (3.00/100%)\r    (6.00/100%)\r    (100.00/100%)\r\n"
        );
        // Nothing to do: straight to 100 %.
        assert_eq!(lines(0, 1.0, &[], false), "    (100.00/100%)\r\n");
    }

    #[test]
    fn figures_never_go_back_with_several_workers() {
        let buf = Shared::default();
        let b2 = buf.clone();
        let p = Progress::with_target(Target::Lines, "x", 8 * 2000, 0.1, move || Box::new(b2));
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| (0..2000).for_each(|_| p.add(1)));
            }
        });
        p.finish();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let figs: Vec<f64> = text
            .split('\r')
            .filter_map(|l| {
                l.trim()
                    .strip_prefix('(')?
                    .strip_suffix("/100%)")?
                    .parse()
                    .ok()
            })
            .collect();
        assert!(figs.len() > 100, "{}", figs.len());
        assert!(figs.windows(2).all(|w| w[0] <= w[1]), "{figs:?}");
        assert_eq!(figs.last(), Some(&100.0));
    }

    #[test]
    fn percent_figures_may_go_back() {
        let buf = Shared::default();
        let b2 = buf.clone();
        let p = Progress::with_target(Target::Lines, "x", 10000, 1.0, move || Box::new(b2));
        for f in [0.0, 0.5, 1.04, 66.67, 50.0, 50.5, 100.0] {
            p.set_percent(f);
        }
        p.complete();
        p.finish();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "    (0.00/100%)\r    (0.00/100%)\r    (1.04/100%)\r    (66.67/100%)\r    (50.00/100%)\r    (100.00/100%)\r    (100.00/100%)\r\n"
        );
    }

    #[test]
    fn off_prints_nothing_and_counts() {
        let buf = Shared::default();
        let b2 = buf.clone();
        let p = Progress::with_target(Target::Off, "x", 10, 1.0, move || Box::new(b2));
        p.add(5);
        p.finish();
        assert!(buf.0.lock().unwrap().is_empty());
        assert_eq!(p.done.load(Ordering::Relaxed), 5);
        assert_eq!(Target::detect(false), Target::Off);
    }
}
