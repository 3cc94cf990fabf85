//! The disk model of the power-loss test: a recorder of how the engine
//! changes its files, and the crash images that model allows.
//!
//! Every file the engine writes (the image, and an external data file)
//! is snapshotted before each write and each sync the engine makes (the
//! fault-injection hook sees every one, synchronously), and at the end
//! of each guest operation. A sync makes everything written to that file
//! before it durable; it says nothing of the other file. After a crash,
//! each 4 KiB page changed since its file's last sync holds any one of
//! its versions since that sync, chosen independently of the other
//! pages: the kernel writes dirty pages back in any order and at any
//! time, and ext4 journals file size and extent changes apart from the
//! data (sector atomicity within a page is assumed, as the kernel writes
//! a page as a whole).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use qcow2::storage::{Faults, IoKind};
use rand::rngs::StdRng;
use rand::Rng;

pub const PAGE: usize = 4096;

/// One change of a file (by index) as the engine made it.
#[derive(Debug)]
pub enum Ev {
    /// Pages whose content differs from the snapshot before: (page, bytes).
    Pages(usize, Vec<(usize, Vec<u8>)>),
    /// The file's new length (a write past the end, a truncate, a
    /// reserve's one byte: ext4 journals it apart from the data).
    Len(usize, usize),
    /// An fdatasync of the file: everything written to it before is
    /// durable.
    Sync(usize),
}

#[derive(Debug, Default)]
pub struct TapeState {
    /// Each file's content at the last snapshot.
    pub cur: Vec<Vec<u8>>,
    pub events: Vec<Ev>,
}

/// The recorder under the engine: one per workload, over all its files.
#[derive(Debug)]
pub struct Tape {
    files: Vec<File>,
    pub st: Mutex<TapeState>,
}

impl Tape {
    pub fn new(paths: &[&Path]) -> Arc<Tape> {
        let files: Vec<File> = paths.iter().map(|p| File::open(p).unwrap()).collect();
        let cur = files.iter().map(read_all).collect();
        Arc::new(Tape {
            files,
            st: Mutex::new(TapeState {
                cur,
                events: Vec::new(),
            }),
        })
    }

    /// Records how the files changed since the last snapshot; then a
    /// sync of file `sync`, if any. Returns the number of events so far.
    pub fn snap(&self, sync: Option<usize>) -> usize {
        let mut st = self.st.lock().unwrap();
        for (f, file) in self.files.iter().enumerate() {
            let now = read_all(file);
            let cur = &st.cur[f];
            let pages = now.len().max(cur.len()).div_ceil(PAGE);
            let changed: Vec<_> = (0..pages)
                .map(|p| (p, page_of(&now, p)))
                .filter(|(p, b)| page_of(cur, *p) != *b)
                .collect();
            let len_changed = now.len() != cur.len();
            if !changed.is_empty() {
                st.events.push(Ev::Pages(f, changed));
            }
            if len_changed {
                st.events.push(Ev::Len(f, now.len()));
            }
            st.cur[f] = now;
        }
        if let Some(f) = sync {
            st.events.push(Ev::Sync(f));
        }
        st.events.len()
    }

    /// The fault hook to set on the storage of file `file`.
    pub fn hook(self: &Arc<Tape>, file: usize) -> Arc<Hook> {
        Arc::new(Hook {
            tape: self.clone(),
            file,
        })
    }
}

/// The fault hook of one file: snapshots before each write and sync.
#[derive(Debug)]
pub struct Hook {
    tape: Arc<Tape>,
    file: usize,
}

impl Faults for Hook {
    fn event(&self, _name: &str) {}
    fn check(&self, kind: IoKind, _off: u64, _len: u64) -> Option<i32> {
        match kind {
            IoKind::Read => {}
            IoKind::Flush => {
                self.tape.snap(Some(self.file));
            }
            _ => {
                self.tape.snap(None);
            }
        }
        None
    }
    fn swallowed(&self, what: &str, err: &qcow2::Error) {
        panic!("the engine carried on after a failure: {what}: {err}");
    }
}

fn read_all(f: &File) -> Vec<u8> {
    let len = f.metadata().unwrap().len() as usize;
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, 0).unwrap();
    v
}

/// Page `p` of `img`, zero-padded past its end (a file extended by a
/// truncate reads as zeros there).
fn page_of(img: &[u8], p: usize) -> Vec<u8> {
    let mut v = vec![0u8; PAGE];
    let a = (p * PAGE).min(img.len());
    let b = ((p + 1) * PAGE).min(img.len());
    v[..b - a].copy_from_slice(&img[a..b]);
    v
}

/// How to pick each dirty page's version in a crash image.
#[derive(Debug, Clone, Copy)]
pub enum Pick {
    Newest,
    Oldest,
    Random,
}

/// The content of file `f` after a crash at event `p`.
pub fn crash_file(
    events: &[Ev],
    f: usize,
    init: &[u8],
    p: usize,
    pick: Pick,
    rng: &mut StdRng,
) -> Vec<u8> {
    let last_sync = events[..p]
        .iter()
        .rposition(|e| matches!(e, Ev::Sync(g) if *g == f))
        .map_or(0, |i| i + 1);
    let mut img = init.to_vec();
    let mut len = init.len();
    let put = |img: &mut Vec<u8>, pg: usize, b: &[u8]| {
        let end = (pg + 1) * PAGE;
        if img.len() < end {
            img.resize(end, 0);
        }
        img[pg * PAGE..end].copy_from_slice(b);
    };
    for e in &events[..last_sync] {
        match e {
            Ev::Pages(g, v) if *g == f => {
                for (pg, b) in v {
                    put(&mut img, *pg, b);
                }
            }
            Ev::Len(g, n) if *g == f => len = *n,
            _ => {}
        }
    }
    // Each page's versions written since the last sync, oldest first.
    let mut versions: std::collections::BTreeMap<usize, Vec<&[u8]>> = Default::default();
    let mut lens = vec![len];
    for e in &events[last_sync..p] {
        match e {
            Ev::Pages(g, v) if *g == f => {
                for (pg, b) in v {
                    versions.entry(*pg).or_default().push(b);
                }
            }
            Ev::Len(g, n) if *g == f => lens.push(*n),
            _ => {}
        }
    }
    for (pg, vs) in versions {
        // Index 0: the durable version (kept); k: the k-th new one.
        let k = match pick {
            Pick::Newest => vs.len(),
            Pick::Oldest => 0,
            Pick::Random => rng.random_range(0..=vs.len()),
        };
        if k > 0 {
            put(&mut img, pg, vs[k - 1]);
        }
    }
    // The length is one of those it had since the sync; nothing past it
    // is seen.
    let len = match pick {
        Pick::Newest => lens[lens.len() - 1],
        Pick::Oldest => lens[0],
        Pick::Random => lens[rng.random_range(0..lens.len())],
    };
    img.resize(len, 0);
    img
}
