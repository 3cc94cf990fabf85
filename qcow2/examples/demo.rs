//! Writes a recognisable pattern through the library into an existing
//! image and the same bytes into a raw reference file, so the demo script
//! can have qemu-img judge the result.
//!
//! Usage: demo IMAGE RAW_REFERENCE

use std::fs::OpenOptions as FsOpen;
use std::os::unix::fs::FileExt;
use std::path::Path;

use qcow2::{open, OpenOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        return Err("usage: demo IMAGE RAW_REFERENCE".into());
    }
    let img = open(
        Path::new(&args[1]),
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )?;
    let raw = FsOpen::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&args[2])?;
    raw.set_len(img.size())?;
    // Unaligned, cluster-straddling writes spread over the disk.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut writes = 0;
    let mut bytes = 0;
    for i in 0..200u64 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = 1 + (seed % (192 << 10));
        let off = (seed >> 20) % (img.size() - len);
        let buf: Vec<u8> = (0..len).map(|k| (i as u8) ^ (k as u8)).collect();
        img.write_at(&buf, off)?;
        raw.write_all_at(&buf, off)?;
        writes += 1;
        bytes += len;
    }
    img.write_zeroes(0, 1 << 20, true)?;
    raw.write_all_at(&vec![0u8; 1 << 20], 0)?;
    img.flush()?;
    println!("wrote {writes} pieces ({bytes} bytes) and zeroed the first MiB through the library");
    Ok(())
}
