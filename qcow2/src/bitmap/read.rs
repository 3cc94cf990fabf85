//! Reading the bitmaps' on-disk structures: the directory and the
//! tables, checked as QEMU checks them, and what they reference.

use super::{
    entry, parse_directory, parse_table, table_size_for, BitmapError, BitmapsExt, DirEntry,
};
use crate::error::{Error, Result};
use crate::header::Header;
use crate::storage::Storage;

/// Reads `len` bytes at `off`, refusing ranges past the end of the file.
fn read_in_file(st: &Storage, off: u64, len: u64, past_end: BitmapError) -> Result<Vec<u8>> {
    let file_len = st.len()?;
    if off.checked_add(len).is_none_or(|e| e > file_len) {
        return Err(bad(past_end));
    }
    let mut buf = vec![0u8; len as usize];
    st.read_at(&mut buf, off)?;
    Ok(buf)
}

/// The bitmap directory of the image, if its bitmaps count (see
/// [`BitmapsExt::from_header`]), parsed and checked.
pub fn read_directory(st: &Storage, h: &Header) -> Result<Option<(BitmapsExt, Vec<DirEntry>)>> {
    let Some(e) = BitmapsExt::from_header(h).map_err(bad)? else {
        return Ok(None);
    };
    if e.directory_size == 0 {
        return Err(bad(BitmapError::DirectoryEmpty));
    }
    let buf = read_in_file(
        st,
        e.directory_offset,
        e.directory_size,
        BitmapError::DirectoryPastEnd {
            offset: e.directory_offset,
            size: e.directory_size,
        },
    )?;
    let dir = parse_directory(&buf, &e, h.cluster_size(), h.size).map_err(bad)?;
    Ok(Some((e, dir)))
}

/// Reads and checks the bitmap table of `d`. Bytes past the end of the
/// file read as zeros (unallocated entries), as QEMU reads them.
pub fn read_table(st: &Storage, d: &DirEntry, cluster_size: u64) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; d.table_size as usize * 8];
    st.read_at(&mut buf, d.table_offset)?;
    parse_table(&buf, d, cluster_size).map_err(|_| bad(BitmapError::TableLoad(d.name_str())))
}

/// The table of a consistent bitmap, checked as QEMU checks it when it
/// loads the bitmap: valid entries, then exactly the clusters the disk
/// needs.
pub(super) fn loadable_table(st: &Storage, d: &DirEntry, cs: u64, size: u64) -> Result<Vec<u64>> {
    let table = read_table(st, d, cs)?;
    if table_size_for(size, d.granularity_bits, cs) != d.table_size as u64 {
        return Err(bad(BitmapError::DataLoad(d.name_str())));
    }
    Ok(table)
}

/// What QEMU checks of the bitmaps at every open, read-only ones and
/// checks included: the extension and directory, and the table of every
/// consistent bitmap (it loads them all). Any failure refuses the open.
pub fn validate(st: &Storage, h: &Header) -> Result<()> {
    let Some((_, dir)) = read_directory(st, h)? else {
        return Ok(());
    };
    for d in dir.iter().filter(|d| !d.in_use()) {
        loadable_table(st, d, h.cluster_size(), h.size)?;
    }
    Ok(())
}

/// (offset, length) of what the bitmaps use, and the problems found.
pub type Referenced = (Vec<(u64, u64)>, Vec<String>);

/// What the bitmaps reference, for `check`: (offset, length) of the
/// directory, every table and every data cluster, and the problems found
/// (each one a corruption, in qemu-img's terms). A table that cannot be
/// loaded is an error: qemu-img's check fails then.
pub fn references(st: &Storage, h: &Header) -> Result<Referenced> {
    let mut refs = Vec::new();
    let mut errs = Vec::new();
    let e = match BitmapsExt::from_header(h) {
        Ok(Some(e)) => e,
        Ok(None) => return Ok((refs, errs)),
        Err(err) => {
            errs.push(format!("ERROR bitmaps extension: {err}"));
            return Ok((refs, errs));
        }
    };
    refs.push((e.directory_offset, e.directory_size));
    let dir = match read_directory(st, h) {
        Ok(Some((_, d))) => d,
        Ok(None) => return Ok((refs, errs)),
        Err(err) => {
            errs.push(format!("ERROR bitmap directory: {err}"));
            return Ok((refs, errs));
        }
    };
    let cs = h.cluster_size();
    for d in &dir {
        refs.push((d.table_offset, d.table_size as u64 * 8));
        // A table that does not load fails the check as in qemu-img (the
        // open already refused the image unless the bitmap is in use).
        let table = read_table(st, d, cs)?;
        refs.extend(table_ranges(d.table_offset, &table, cs).into_iter().skip(1));
    }
    Ok((refs, errs))
}

/// A bitmap problem as the engine's error.
pub(crate) fn bad(e: BitmapError) -> Error {
    Error::Bitmap(e)
}

/// The clusters a bitmap table and its data use.
pub(super) fn table_ranges(table_offset: u64, table: &[u64], cs: u64) -> Vec<(u64, u64)> {
    let mut r = vec![(table_offset, table.len() as u64 * 8)];
    r.extend(
        table
            .iter()
            .map(|e| e & entry::OFFSET)
            .filter(|&o| o != 0)
            .map(|o| (o, cs)),
    );
    r
}
