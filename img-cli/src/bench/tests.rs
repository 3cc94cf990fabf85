//! Unit tests of the request schedule and cache modes.

use qcow2::{Image, OpenOptions};

use super::options::{parse_cache, Params};
use super::ring::{execute, next_offset};

#[test]
fn offsets_wrap_inside_the_image() {
    // 64 KiB image, 4 KiB requests: the last request starts below
    // 60 KiB, never at it.
    let mut off = 0;
    let mut seen = Vec::new();
    for _ in 0..16 {
        seen.push(off);
        off = next_offset(off, 4096, 4096, 65536);
    }
    assert_eq!(seen[14], 14 * 4096);
    assert_eq!(seen[15], 0);
    assert!(seen.iter().all(|&o| o + 4096 <= 65536));
    assert_eq!(next_offset(100, 7, 4096, 4096), 0);
    assert_eq!(next_offset(0, 70000, 4096, 65536), 70000 % 61440);
}

/// A scratch raw image of `len` bytes, removed when dropped.
struct Scratch(std::path::PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
fn scratch(name: &str, len: u64) -> (Scratch, std::sync::Arc<dyn Image>) {
    let path =
        std::env::temp_dir().join(format!("rimg-bench-unit-{}-{name}.raw", std::process::id()));
    std::fs::File::create(&path).unwrap().set_len(len).unwrap();
    let img = qcow2::open(
        &path,
        &OpenOptions {
            writable: true,
            format: Some(qcow2::Format::Raw),
            ..Default::default()
        },
    )
    .unwrap();
    (Scratch(path), img)
}

fn params(count: u64, depth: usize, flush_interval: u64, cache: &str) -> Params {
    Params {
        count,
        depth,
        size: 4096,
        step: 4096,
        offset: 0,
        pattern: 0x5a,
        flush_interval,
        cache: parse_cache(cache).unwrap(),
        prealloc: 0,
    }
}

#[test]
fn flushes_on_qemu_img_schedule() {
    let (_f, img) = scratch("flush", 1 << 20);
    // Draining: a flush each time the requests not yet sent are a
    // multiple of 8 (96, 88, ..., 8 after the first four went out),
    // and one when all are done.
    let n = execute(&img, &params(100, 4, 8, "writeback"), true, true, None).unwrap();
    assert_eq!(n, 13);
    // Without draining: the same points, but at the end every request
    // still in flight completes with 0 unsent and flushes.
    let n = execute(&img, &params(100, 4, 8, "writeback"), true, false, None).unwrap();
    assert_eq!(n, 12 + 4);
    // No interval: no flushes; writethrough: one per request.
    let n = execute(&img, &params(100, 4, 0, "writeback"), true, true, None).unwrap();
    assert_eq!(n, 0);
    let n = execute(&img, &params(20, 4, 0, "writethrough"), true, true, None).unwrap();
    assert_eq!(n, 20);
    // The data went where the requests say: 100 requests of 4 KiB
    // from offset 0 cover the first 400 KiB with the pattern.
    let mut got = vec![0u8; 1 << 20];
    img.read_at(&mut got, 0).unwrap();
    assert!(got[..100 * 4096].iter().all(|&b| b == 0x5a));
    assert!(got[100 * 4096..].iter().all(|&b| b == 0));
}

#[test]
fn cache_modes_like_qemu() {
    let none = parse_cache("none").unwrap();
    assert!(none.direct && !none.writethrough && !none.no_flush);
    assert_eq!(parse_cache("off"), Some(none));
    let ds = parse_cache("directsync").unwrap();
    assert!(ds.direct && ds.writethrough);
    let wt = parse_cache("writethrough").unwrap();
    assert!(!wt.direct && wt.writethrough);
    assert!(parse_cache("unsafe").unwrap().no_flush);
    assert!(parse_cache("writeback").is_some_and(|c| !c.direct && !c.writethrough));
    assert_eq!(parse_cache("None"), None);
}
