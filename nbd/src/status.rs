//! Block status for the metadata contexts, as qemu-nbd reports it: the
//! engine's QEMU view of the chain ([`qcow2::blockstatus::Chain`]) turned
//! into (length, flags) extents, runs of equal flags merged.

use nbd_proto::consts::state;
use qcow2::blockstatus::{ALLOCATED, DATA, ZERO};

use crate::export::{Context, Export};

/// Most extents in one reply: the spec allows fewer than the range
/// needs (the client asks again from where the reply ended), and this
/// bounds what one request can make the server build.
pub const MAX_EXTENTS: usize = 1 << 16;

/// The extents of `ctx` over [off, off + len), within the export; with
/// `one`, only the first.
pub fn extents(
    e: &Export,
    ctx: &Context,
    off: u64,
    len: u64,
    one: bool,
) -> qcow2::Result<Vec<(u64, u32)>> {
    let end = off + len;
    // A bitmap that records this export's writes: as it is now.
    let fresh = match ctx {
        Context::DirtyBitmap(i, name) if e.bitmaps[*i].2 => Some(e.bitmap_now(name)?),
        _ => None,
    };
    let mut v: Vec<(u64, u32)> = Vec::new();
    let mut pos = off;
    while pos < end {
        let (n, flags) = match ctx {
            Context::Allocation => {
                let s = e.chain.status_above(pos, end - pos)?;
                let mut f = 0;
                if !s.has(DATA) {
                    f |= state::HOLE;
                }
                if s.has(ZERO) {
                    f |= state::ZERO;
                }
                (s.len, f)
            }
            Context::AllocationDepth => {
                let (s, depth) = e.chain.map_status(pos, end - pos)?;
                let d = if s.has(ALLOCATED) {
                    depth as u32 + 1
                } else {
                    0
                };
                (s.len, d)
            }
            Context::DirtyBitmap(i, _) => {
                let bits = fresh.as_ref().unwrap_or(&e.bitmaps[*i].1);
                let (dirty, n) = bits.dirty_run(pos, end - pos);
                (n, dirty as u32)
            }
        };
        if n == 0 {
            // The chain answers nothing past its end: zeros, in no layer.
            let past = match ctx {
                Context::Allocation => state::HOLE | state::ZERO,
                Context::AllocationDepth | Context::DirtyBitmap(..) => 0,
            };
            push(&mut v, end - pos, past);
            break;
        }
        let n = n.min(end - pos);
        push(&mut v, n, flags);
        pos += n;
        if one || v.len() >= MAX_EXTENTS {
            break;
        }
    }
    if one {
        v.truncate(1);
    }
    Ok(v)
}

fn push(v: &mut Vec<(u64, u32)>, len: u64, flags: u32) {
    match v.last_mut() {
        Some(last) if last.1 == flags => last.0 += len,
        _ => v.push((len, flags)),
    }
}
