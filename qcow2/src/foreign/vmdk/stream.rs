//! Stream-optimized sparse extents (createType streamOptimized, what
//! OVF/OVA exports carry): grains compressed with deflate in zlib format,
//! each after a 12-byte marker (the grain's LBA, the compressed length)
//! when the header's marker flag is set; and, as VMware writes a stream,
//! the grain directory's place given only by a footer at the end of the
//! file (the header's GD offset is then [`GD_AT_END`](super::GD_AT_END)).
//! QEMU reads both ways; so does rimg, with QEMU's checks and answers.

use flate2::{Decompress, FlushDecompress, Status};

use super::{le32, le64, refuse, Header, HEADER_LEN, MAGIC, SECTOR};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// The footer: a footer marker sector, the header (magic first), an
/// end-of-stream marker sector; the file's last three sectors.
const FOOTER_LEN: u64 = 3 * SECTOR;
const MARKER_FOOTER: u32 = 3;
const MARKER_EOS: u32 = 0;
/// A grain marker: LBA (u64), compressed length (u32).
const GRAIN_MARKER_LEN: u64 = 12;
/// Inflate works through input and output this much at a time.
const CHUNK: usize = 64 << 10;
/// Grains up to this size are inflated whole and the last one kept;
/// larger ones are inflated piecewise for each read (memory stays
/// bounded whatever the header claims).
pub(super) const CACHED_GRAIN: u64 = 1 << 20;

/// The header a stream's footer holds, as QEMU reads it: the last 1536
/// bytes of the file (in whole sectors), with a footer marker before and
/// an end-of-stream marker after it.
pub(super) fn footer_header(st: &Storage, file_len: u64) -> Result<Header> {
    // QEMU reads at a negative offset for shorter files: EIO.
    let at = file_len
        .checked_sub(FOOTER_LEN)
        .ok_or_else(|| refuse("Failed to read footer: Input/output error"))?;
    let mut f = [0u8; FOOTER_LEN as usize];
    st.read_at(&mut f, at)?;
    let h = &f[HEADER_LEN..2 * HEADER_LEN];
    let eos = 2 * HEADER_LEN;
    let valid = &h[..4] == MAGIC
        && le32(&f, 8) == 0
        && le32(&f, 12) == MARKER_FOOTER
        && le64(&f, eos) == 0
        && le32(&f, eos + 8) == 0
        && le32(&f, eos + 12) == MARKER_EOS;
    if !valid {
        return Err(refuse("Invalid footer"));
    }
    Ok(Header::parse(h.try_into().unwrap()))
}

/// QEMU's answer to a compressed grain it cannot read.
pub(super) fn einval() -> Error {
    Error::io(
        "compressed grain",
        std::io::Error::from_raw_os_error(libc::EINVAL),
    )
}

/// Inflates the grain stored compressed at `host` (`grain` bytes when
/// whole), as QEMU's vmdk_read_extent does: with markers, the compressed
/// length from the marker (0, or more than two grains, refused); without,
/// one grain of input. Bytes past the end of the file are zeros. The zlib
/// stream must end within its input, its output fit in the grain, and
/// cover `need` bytes; otherwise EINVAL. `sink` gets each piece of output
/// with its offset in the grain.
pub(super) fn inflate(
    st: &Storage,
    host: u64,
    grain: u64,
    marker: bool,
    need: u64,
    mut sink: impl FnMut(u64, &[u8]),
) -> Result<()> {
    let (data_at, data_len) = if marker {
        let mut m = [0u8; GRAIN_MARKER_LEN as usize];
        st.read_at(&mut m, host)?;
        let n = le32(&m, 8) as u64;
        if n == 0 || n > 2 * grain {
            return Err(einval());
        }
        (host + GRAIN_MARKER_LEN, n)
    } else {
        (host, grain)
    };
    let file_len = st.len()?;
    let mut d = Decompress::new(true);
    let mut input = Vec::new();
    let mut used = 0usize;
    let mut out = vec![0u8; CHUNK];
    loop {
        if used == input.len() {
            let pos = d.total_in();
            if pos == data_len {
                // The input ended before the stream did.
                return Err(einval());
            }
            input.resize((data_len - pos).min(CHUNK as u64) as usize, 0);
            if data_at + pos < file_len {
                st.read_at(&mut input, data_at + pos)?;
            } else {
                input.fill(0);
            }
            used = 0;
        }
        let (in0, out0) = (d.total_in(), d.total_out());
        let status = d
            .decompress(&input[used..], &mut out, FlushDecompress::None)
            .map_err(|_| einval())?;
        used += (d.total_in() - in0) as usize;
        let produced = (d.total_out() - out0) as usize;
        if d.total_out() > grain {
            // zlib's uncompress into one grain: Z_BUF_ERROR.
            return Err(einval());
        }
        sink(out0, &out[..produced]);
        match status {
            Status::StreamEnd => break,
            _ if produced == 0 && d.total_in() == in0 => return Err(einval()),
            _ => {}
        }
    }
    if d.total_out() < need {
        return Err(einval());
    }
    Ok(())
}

/// Copies the part of `piece` (at `at` in the grain) that falls in
/// [skip, skip + buf.len()) into `buf`.
pub(super) fn copy_overlap(piece: &[u8], at: u64, skip: u64, buf: &mut [u8]) {
    let end = at + piece.len() as u64;
    let (a, b) = (at.max(skip), end.min(skip + buf.len() as u64));
    if a < b {
        buf[(a - skip) as usize..(b - skip) as usize]
            .copy_from_slice(&piece[(a - at) as usize..(b - at) as usize]);
    }
}
