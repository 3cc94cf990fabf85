//! Mutations of images for the hostile-input test (`tests/hostile.rs`):
//! values and bytes every format shares, and one mutator per foreign
//! format aimed at its header and tables.

use rand::rngs::StdRng;
use rand::Rng;

pub const BOUNDARY: &[u64] = &[
    0,
    1,
    7,
    9,
    0x1ff,
    0x200,
    0x10000,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 40,
    1 << 62,
    u64::MAX >> 1,
    u64::MAX,
];

/// Random bytes anywhere (the mutation every format shares).
pub fn scribble(rng: &mut StdRng, v: &mut [u8]) {
    for _ in 0..rng.random_range(1..=32) {
        let i = rng.random_range(0..v.len());
        v[i] = rng.random();
    }
}

/// Truncation at a random length.
pub fn truncate(rng: &mut StdRng, v: &mut Vec<u8>) {
    let n = rng.random_range(0..v.len());
    v.truncate(n);
}

/// VDI header fields (offset, width), VirtualBox's VDI header as QEMU
/// reads it: signature, version, header size, type, flags, block map and
/// data offsets, sector size, disk size, block size, block counts, link
/// and parent UUIDs (their first bytes).
pub const VDI_FIELDS: &[(usize, usize)] = &[
    (0x40, 4),
    (0x44, 4),
    (0x48, 4),
    (0x4c, 4),
    (0x50, 4),
    (0x154, 4),
    (0x158, 4),
    (0x168, 4),
    (0x170, 8),
    (0x178, 4),
    (0x180, 4),
    (0x184, 4),
    (0x1a8, 4),
    (0x1b8, 4),
];

/// One mutation of a VDI image: header bits and fields, block map
/// entries (little-endian u32 from 0x200), random bytes, truncation, or
/// a disk inflated together with its block count so that the header
/// holds and the map runs far past the end of the file.
pub fn mutate_vdi(rng: &mut StdRng, img: &[u8]) -> Vec<u8> {
    let mut v = img.to_vec();
    let le = |v: &mut Vec<u8>, off: usize, w: usize, val: u64| {
        v[off..off + w].copy_from_slice(&val.to_le_bytes()[..w]);
    };
    match rng.random_range(0..6) {
        0 => {
            for _ in 0..rng.random_range(1..=4) {
                let i = rng.random_range(0..512);
                v[i] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            let (off, w) = VDI_FIELDS[rng.random_range(0..VDI_FIELDS.len())];
            let val = BOUNDARY[rng.random_range(0..BOUNDARY.len())];
            le(&mut v, off, w, val);
        }
        2 => {
            // Map entries: boundary values, the two "no data" values,
            // blocks past the count or the file, duplicates.
            for _ in 0..rng.random_range(1..=8) {
                let at = 0x200 + 4 * rng.random_range(0..8);
                let val = match rng.random_range(0..4) {
                    0 => BOUNDARY[rng.random_range(0..BOUNDARY.len())],
                    1 => 0xffff_fffe,
                    _ => rng.random_range(0..16),
                };
                le(&mut v, at, 4, val);
            }
        }
        3 => scribble(rng, &mut v),
        4 => truncate(rng, &mut v),
        _ => {
            // Up to 0x1fffff80 blocks (QEMU's most) or a few more.
            let blocks: u64 = rng.random_range(0..=0x2000_0000);
            let size = (blocks << 20).saturating_sub(rng.random_range(0..4) * 512);
            le(&mut v, 0x170, 8, size);
            le(&mut v, 0x180, 4, blocks);
            if rng.random_bool(0.3) {
                // The map moved to the end of the file or past it.
                let at = (v.len() as u64 + rng.random_range(0..2) * (1 << 30)) & !511;
                le(&mut v, 0x154, 4, at.min(u32::MAX as u64 & !511));
            }
        }
    }
    v
}

/// VHD footer fields (offset, width; big-endian), Microsoft's VHD spec:
/// data offset (where the dynamic header is), timestamp, creator
/// application, current size, geometry (cylinders, heads, sectors), disk
/// type.
pub const VPC_FOOTER_FIELDS: &[(usize, usize)] = &[
    (16, 8),
    (24, 4),
    (28, 4),
    (48, 8),
    (56, 2),
    (58, 1),
    (59, 1),
    (60, 4),
];

/// VHD dynamic header fields (offset from the header, width): data
/// offset, BAT offset, version, BAT entries, block size, checksum.
pub const VPC_HEADER_FIELDS: &[(usize, usize)] =
    &[(8, 8), (16, 8), (24, 4), (28, 4), (32, 4), (36, 4)];

/// One mutation of a VHD image: footer bits and fields (at the start for
/// a dynamic disk, at the end for a fixed one), dynamic header fields and
/// BAT entries, random bytes, truncation, or a disk inflated to QEMU's
/// limits (2040 GiB, the largest BAT) with the BAT at or past the end of
/// the file. The footer's checksum is recomputed after most of them, or
/// the checksum alone would refuse every case.
pub fn mutate_vpc(rng: &mut StdRng, img: &[u8]) -> Vec<u8> {
    let mut v = img.to_vec();
    let be = |v: &mut Vec<u8>, off: usize, w: usize, val: u64| {
        if off + w <= v.len() {
            v[off..off + w].copy_from_slice(&val.to_be_bytes()[8 - w..]);
        }
    };
    let footer = if &v[..8] == b"conectix" {
        0
    } else {
        v.len() - 512
    };
    // The dynamic header and BAT of a dynamic seed (QEMU's layout).
    let (header, bat) = (512, 1536);
    match rng.random_range(0..7) {
        0 => {
            for _ in 0..rng.random_range(1..=4) {
                let i = footer + rng.random_range(0..512);
                v[i] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            let (off, w) = VPC_FOOTER_FIELDS[rng.random_range(0..VPC_FOOTER_FIELDS.len())];
            let val = match rng.random_range(0..3) {
                0 => BOUNDARY[rng.random_range(0..BOUNDARY.len())],
                // Creator apps that decide the size rule.
                1 => u32::from_be_bytes(
                    *[b"vpc ", b"qemu", b"win ", b"qem2"][rng.random_range(0..4)],
                ) as u64,
                _ => rng.random_range(0..v.len() as u64 * 2),
            };
            be(&mut v, footer + off, w, val);
        }
        2 => {
            let (off, w) = VPC_HEADER_FIELDS[rng.random_range(0..VPC_HEADER_FIELDS.len())];
            let val = match rng.random_range(0..3) {
                0 => BOUNDARY[rng.random_range(0..BOUNDARY.len())],
                1 => 1 << rng.random_range(0..32),
                _ => rng.random_range(0..v.len() as u64 * 2),
            };
            be(&mut v, header + off, w, val);
        }
        3 => {
            // BAT entries: boundary values, "unallocated", sectors inside
            // or past the file, duplicates.
            for _ in 0..rng.random_range(1..=8) {
                let at = bat + 4 * rng.random_range(0..8);
                let val = match rng.random_range(0..4) {
                    0 => BOUNDARY[rng.random_range(0..BOUNDARY.len())],
                    1 => 0xffff_ffff,
                    _ => rng.random_range(0..v.len() as u64 / 256),
                };
                be(&mut v, at, 4, val);
            }
        }
        4 => scribble(rng, &mut v),
        5 => truncate(rng, &mut v),
        _ => {
            // A Hyper-V footer (the current size counts) up to 2040 GiB
            // or a little more, a BAT as long as QEMU allows with small
            // blocks, maybe moved to the end of the file or past it.
            be(&mut v, footer + 28, 4, u32::from_be_bytes(*b"win ") as u64);
            let size = rng.random_range(0..=0xff00_0010u64) << 9;
            be(&mut v, footer + 48, 8, size);
            be(&mut v, header + 28, 4, rng.random_range(0..=0x2000_0000));
            be(&mut v, header + 32, 4, 512 << rng.random_range(0..13));
            if rng.random_bool(0.3) {
                let at = v.len() as u64 + rng.random_range(0..2) * (1 << 30);
                be(&mut v, header + 16, 8, at & !511);
            }
        }
    }
    if rng.random_bool(0.8) {
        crate::seal_vhd_footers(&mut v);
    }
    v
}

/// VMDK sparse header fields (offset, width; little-endian): version,
/// flags, capacity, grain, descriptor offset and size, GTEs per GT,
/// redundant GD, GD, first grain, compression.
pub const VMDK_FIELDS: &[(usize, usize)] = &[
    (4, 4),
    (8, 4),
    (12, 8),
    (20, 8),
    (28, 8),
    (36, 8),
    (44, 4),
    (48, 8),
    (56, 8),
    (64, 8),
    (77, 2),
];

/// One mutation of a VMDK sparse file: header bits and fields, GD and GT
/// entries (found through the header, as QEMU lays them out), the
/// descriptor's CIDs, random bytes, truncation, or a disk inflated to
/// QEMU's limits (2^54 sectors, 32 Mi GD entries, small grains and
/// tables) with the GD at or past the end of the file.
pub fn mutate_vmdk(rng: &mut StdRng, img: &[u8]) -> Vec<u8> {
    let mut v = img.to_vec();
    let le = |v: &mut Vec<u8>, off: usize, w: usize, val: u64| {
        if off + w <= v.len() {
            v[off..off + w].copy_from_slice(&val.to_le_bytes()[..w]);
        }
    };
    let rd = |v: &[u8], off: usize| u32::from_le_bytes(v[off..off + 4].try_into().unwrap());
    let gd = rd(&v, 56) as usize * 512;
    let gt = rd(&v, gd) as usize * 512;
    match rng.random_range(0..7) {
        0 => {
            for _ in 0..rng.random_range(1..=4) {
                let i = rng.random_range(0..512);
                v[i] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            let (off, w) = VMDK_FIELDS[rng.random_range(0..VMDK_FIELDS.len())];
            let val = match rng.random_range(0..3) {
                0 => BOUNDARY[rng.random_range(0..BOUNDARY.len())],
                1 => 1 << rng.random_range(0..40),
                _ => rng.random_range(0..v.len() as u64 / 256),
            };
            le(&mut v, off, w, val);
        }
        2 => {
            // GD and GT entries: boundary values, 0, 1 (a zeroed grain
            // or sector 1), sectors inside or past the file.
            for _ in 0..rng.random_range(1..=8) {
                let at = match rng.random_bool(0.2) {
                    true => gd + 4 * rng.random_range(0..4),
                    false => gt + 4 * rng.random_range(0..80),
                };
                let val = match rng.random_range(0..4) {
                    0 => BOUNDARY[rng.random_range(0..BOUNDARY.len())],
                    1 => rng.random_range(0..2),
                    _ => rng.random_range(0..v.len() as u64 / 256),
                };
                le(&mut v, at, 4, val);
            }
        }
        3 => {
            // The descriptor: CID keys and values, NULs, a parent's name.
            let at = 512 + rng.random_range(0..200);
            let junk: &[&[u8]] = &[
                b"CID=",
                b"parentCID=",
                b"\0",
                b"zz",
                b"-1",
                b"createType=\"",
            ];
            let j = junk[rng.random_range(0..junk.len())];
            v[at..at + j.len()].copy_from_slice(j);
        }
        4 => scribble(rng, &mut v),
        5 => truncate(rng, &mut v),
        _ => {
            // Small grains and tables over a huge disk: up to QEMU's 32 Mi
            // GD entries (a 128 MiB GD), a few more, or a count that
            // wraps its u32.
            let span = 1u64 << (rng.random_range(0..12) + rng.random_range(0..10));
            let grain = span >> rng.random_range(0..10).min(span.trailing_zeros());
            le(&mut v, 20, 8, grain);
            le(&mut v, 44, 4, span / grain);
            let cap = match rng.random_range(0..3) {
                0 => span * rng.random_range(0..=(32 << 20) + 2),
                1 => rng.random_range(0..=1u64 << 54),
                _ => span * ((1 << 32) + rng.random_range(0..64)),
            };
            le(&mut v, 12, 8, cap);
            if rng.random_bool(0.3) {
                let at = v.len() as u64 / 512 + rng.random_range(0..2) * (1 << 21);
                le(&mut v, 56, 8, at);
            }
        }
    }
    v
}

/// A VMDK text descriptor, mutated as text: a number (sectors, offset,
/// CID) replaced by a boundary value, a type or access word by another,
/// an extent file by another of `files`, a line repeated, dropped or
/// followed by a blank one, a quote, NUL or CR dropped in, or bytes
/// flipped and the text cut.
pub fn mutate_vmdk_descriptor(rng: &mut StdRng, text: &[u8], files: &[&str]) -> Vec<u8> {
    const NUMBERS: &[&str] = &[
        "0",
        "-1",
        "1",
        "7",
        "2147483648",
        "18014398509481984",
        "9223372036854775807",
        "99999999999999999999",
        "4194304",
    ];
    const TYPES: &[&str] = &[
        "FLAT",
        "SPARSE",
        "VMFS",
        "VMFSSPARSE",
        "SESPARSE",
        "ZERO",
        "flat",
    ];
    const ACCESS: &[&str] = &["RW", "RDONLY", "NOACCESS", "RWX"];
    let t = String::from_utf8_lossy(text).into_owned();
    let mut lines: Vec<String> = t.lines().map(String::from).collect();
    if lines.is_empty() {
        return text.to_vec();
    }
    let i = rng.random_range(0..lines.len());
    let mut words: Vec<String> = lines[i].split(' ').map(String::from).collect();
    let k = rng.random_range(0..words.len());
    fn pick(rng: &mut StdRng, list: &[&str]) -> String {
        list[rng.random_range(0..list.len())].to_string()
    }
    match rng.random_range(0..9) {
        0 => words[k] = pick(rng, NUMBERS),
        1 => words[k] = pick(rng, TYPES),
        2 => words[0] = pick(rng, ACCESS),
        3 => words[k] = format!("\"{}\"", pick(rng, files)),
        4 => lines.insert(i, lines[i].clone()),
        5 => drop(lines.remove(i)),
        6 => lines.insert(i, String::new()),
        7 => {
            let at = rng.random_range(0..=lines[i].len());
            if lines[i].is_char_boundary(at) {
                let junk = pick(rng, &["\"", "\0", "\r", " ", "\t", "="]);
                lines[i].insert_str(at, &junk);
            }
        }
        _ => {
            let mut v = text.to_vec();
            scribble(rng, &mut v);
            truncate(rng, &mut v);
            return v;
        }
    }
    if let (Some(l), true) = (
        lines.get_mut(i),
        words.join(" ") != t.lines().nth(i).unwrap_or(""),
    ) {
        *l = words.join(" ");
    }
    let mut out = lines.join("\n").into_bytes();
    out.push(b'\n');
    out
}

/// A VHDX image laid out as qemu-img makes a small one (headers at 64
/// and 128 KiB, region table at 192 KiB, BAT at 2 MiB, metadata at
/// 3 MiB, its items 64 KiB on): BAT entries (every state, offsets inside,
/// past and far past the file, in the header section), metadata items
/// (block size, disk size, sector sizes, flags), region table and header
/// fields (their checksums resealed, or left broken), or bytes scribbled
/// and the file cut.
pub fn mutate_vhdx(rng: &mut StdRng, img: &[u8]) -> Vec<u8> {
    use qcow2::foreign::crc32c::crc32c_without;
    let mut v = img.to_vec();
    let put = |v: &mut Vec<u8>, at: usize, w: usize, val: u64| {
        if at + w <= v.len() {
            v[at..at + w].copy_from_slice(&val.to_le_bytes()[..w]);
        }
    };
    let val = |rng: &mut StdRng, len: usize| match rng.random_range(0..4) {
        0 => BOUNDARY[rng.random_range(0..BOUNDARY.len())],
        1 => 1 << rng.random_range(0..64),
        _ => rng.random_range(0..len as u64 * 2),
    };
    match rng.random_range(0..6) {
        0 => {
            for _ in 0..rng.random_range(1..=6) {
                let i = 0x20_0000 + 8 * rng.random_range(0..8);
                let off = rng.random_range(0..v.len() as u64 * 2) & !0xf_ffff;
                let e = match rng.random_range(0..3) {
                    0 => val(rng, v.len()),
                    _ => off | rng.random_range(0..8),
                };
                put(&mut v, i, 8, e);
            }
        }
        1 => {
            // Items: block size, flags, disk size (8), sector sizes.
            let (at, w) = [(0, 4), (4, 4), (8, 8), (0x20, 4), (0x24, 4)][rng.random_range(0..5)];
            let x = val(rng, v.len());
            put(&mut v, 0x31_0000 + at, w, x);
        }
        2 => {
            // The metadata table: count, an entry's offset or flags.
            let at = [10, 48, 56, 80, 88][rng.random_range(0..5)];
            let x = val(rng, 64);
            put(&mut v, 0x30_0000 + at, if at == 10 { 2 } else { 4 }, x);
        }
        3 => {
            // Region table or header fields, resealed.
            let (base, len, fields): (usize, usize, &[(usize, usize)]) = match rng.random_bool(0.5)
            {
                true => (
                    0x3_0000,
                    65536,
                    &[(8, 4), (32, 8), (40, 4), (44, 4), (64, 8), (72, 4)],
                ),
                false => (
                    0x1_0000 * rng.random_range(1..=2),
                    4096,
                    &[(8, 8), (48, 8), (64, 2), (66, 2), (68, 4), (72, 8)],
                ),
            };
            let (at, w) = fields[rng.random_range(0..fields.len())];
            let x = val(rng, v.len());
            put(&mut v, base + at, w, x);
            if base + len <= v.len() && rng.random_bool(0.9) {
                let c = crc32c_without(&v[base..base + len], 4);
                put(&mut v, base + 4, 4, c as u64);
            }
        }
        4 => scribble(rng, &mut v),
        _ => truncate(rng, &mut v),
    }
    v
}
