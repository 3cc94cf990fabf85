//! `rimg measure`: how large a new image would be, computed as qemu-img
//! computes it (its numbers are matched exactly).

use clap::Args;
use qcow2::{Format, Image, OpenOptions, Preallocation};
use serde_json::{json, Map, Value};

use crate::create::{parse_options, Parsed};
use crate::info::Output;
use crate::opts::OptList;
use crate::size::parse_size;
use crate::CliError;

#[derive(Args)]
pub struct MeasureArgs {
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Input format (probed when absent)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Output format (default raw)
    #[arg(short = 'O', long = "target-format", value_name = "OUTPUT_FMT")]
    out_format: Option<String>,
    /// Output image options, as for create
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    options: Vec<String>,
    /// Measure a new empty image of this size instead of an input image
    #[arg(long, value_name = "SIZE", conflicts_with = "filename")]
    size: Option<String>,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The filename is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Measure internal snapshot SNAPSHOT of the input (an ID or name, or
    /// snapshot.id=ID / snapshot.name=NAME)
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    #[arg(required_unless_present = "size")]
    filename: Option<String>,
}

/// Refcount table and block bytes needed to count `clusters` clusters and
/// themselves.
fn refcount_metadata_size(clusters: u64, cs: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = cs * 8 / (1 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cs;
        }
    }
}

/// Bytes of a fully allocated qcow2 image: header, L2 and L1 tables
/// rounded to whole tables, refcount structures, data.
/// L2 entries are 16 bytes with extended L2 entries.
fn prealloc_size(size: u64, cs: u64, refcount_order: u32, extl2: bool) -> u64 {
    let data = size.next_multiple_of(cs);
    let l2e = if extl2 { 16 } else { 8 };
    let per_table = cs / 8;
    let l2_entries = (data / cs).next_multiple_of(cs / l2e);
    let l1_entries = (l2_entries * l2e / cs).next_multiple_of(per_table);
    let meta = cs + l2_entries * l2e + l1_entries * 8;
    meta + refcount_metadata_size((meta + data) / cs, cs, refcount_order) + data
}

pub fn run(a: MeasureArgs) -> Result<u8, CliError> {
    if a.filename.is_none() && (a.image_opts || a.format.is_some() || a.snapshot.is_some()) {
        return Err(CliError::new(
            "--image-opts, -f, and -l require a filename argument.",
        ));
    }
    let fmt = crate::common::parse_format;
    let out_fmt = fmt(&a.out_format)?.unwrap_or(Format::Raw);
    let list = OptList::parse(&a.options).map_err(CliError::new)?;
    let Parsed { mut o, encrypt, .. } = parse_options(out_fmt, &list)?;
    // A LUKS header area takes whole clusters of its own in qcow2; the
    // luks format's payload follows it directly.
    let luks_header = match out_fmt {
        Format::Luks => crate::create::luks_encryption(&encrypt),
        _ => crate::object::encryption(&encrypt, "encrypt."),
    }
    .map_err(CliError::new)?;
    let luks_area = match &luks_header {
        Some((qcow2::encrypt::EncryptFormat::Luks(p), _)) => {
            let len = qcow2::luks::LuksHeader::area_len(p.key_bytes);
            match out_fmt {
                Format::Luks => len,
                _ => len.next_multiple_of(o.cluster_size),
            }
        }
        _ => 0,
    };
    o.encrypt = luks_header;
    o.validate().map_err(|e| match e {
        // qemu-img words these as sentences of their own.
        qcow2::Error::InvalidArgument(m) => CliError::new(crate::common::sentence(&m)),
        e => CliError::new(e.to_string()),
    })?;
    let input: Option<std::sync::Arc<dyn Image>> = match &a.filename {
        Some(f) => Some(
            crate::blockopts::open_image(
                f,
                a.image_opts,
                OpenOptions {
                    format: fmt(&a.format)?,
                    force_share: a.force_share,
                    ..Default::default()
                },
            )?
            .map_err(|e| CliError::new(format!("Could not open '{f}': {e}")))?,
        ),
        None => None,
    };
    if let (Some(sn), Some(img)) = (&a.snapshot, &input) {
        crate::common::load_snapshot(img.as_ref(), sn)?;
    }
    let size = match (&a.size, &input) {
        (Some(s), _) => parse_size(s)
            .ok_or_else(|| CliError::new(format!("Invalid image size specified: '{s}'")))?,
        (None, Some(i)) => i.size(),
        (None, None) => unreachable!("clap requires a size or a file"),
    };
    let mut m = Map::new();
    match out_fmt {
        // qemu-img's words, after opening the input as it does: QEMU's
        // vdi and vpc drivers cannot measure either.
        Format::Vdi | Format::Vpc | Format::Vmdk | Format::Vhdx => {
            return Err(CliError::new(format!(
                "Block driver '{}' does not support size measurement",
                out_fmt.name()
            )))
        }
        Format::Raw => {
            let required = size.next_multiple_of(512);
            m.insert("required".into(), json!(required));
            m.insert("fully-allocated".into(), json!(required));
        }
        Format::Luks => {
            m.insert("required".into(), json!(luks_area + size));
            m.insert("fully-allocated".into(), json!(luks_area + size));
        }
        Format::Qcow2 => {
            let cs = o.cluster_size;
            let virtual_size = size.next_multiple_of(cs);
            let mut required = 0u64;
            if let Some(i) = &input {
                if o.backing_file.is_some() {
                    // Nothing is known about what the backing file shares.
                    required = virtual_size;
                } else {
                    // Block status as QEMU's block layer gives it: data
                    // clusters of an image that looks metadata-preallocated
                    // are asked of the host file, whose holes are zeros.
                    use qcow2::blockstatus::{ALLOCATED, DATA, ZERO};
                    let chain = qcow2::blockstatus::Chain::new(i)?;
                    let mut pos = 0;
                    while pos < size {
                        let s = chain.status_above(pos, size - pos)?;
                        if s.len == 0 {
                            break;
                        }
                        let mut n = s.len;
                        if !s.has(ZERO) && s.has(DATA) && s.has(ALLOCATED) {
                            // Whole clusters, counted from the first one's start.
                            n = (pos + n).next_multiple_of(cs) - pos;
                            required += pos % cs + n;
                        }
                        pos += n;
                    }
                }
            }
            if matches!(o.preallocation, Preallocation::Falloc | Preallocation::Full) {
                required = virtual_size;
            }
            let cb = cs.trailing_zeros();
            let l2_bits = cb - if o.extended_l2 { 4 } else { 3 };
            if size > qcow2::Header::max_size_with(cb, l2_bits) {
                return Err(CliError::new(
                    "The image size is too large (try using a larger cluster size)",
                ));
            }
            let full = prealloc_size(
                virtual_size,
                cs,
                o.refcount_bits.trailing_zeros(),
                o.extended_l2,
            );
            let bitmaps = o.version >= 3
                && input
                    .as_ref()
                    .and_then(|i| i.as_qcow2())
                    .is_some_and(|q| q.header().version >= 3);
            if bitmaps {
                // Every bitmap of the input, inconsistent ones included
                // (QEMU loads those too); a directory that does not hold
                // counts as none.
                let q = input.as_ref().and_then(|i| i.as_qcow2()).unwrap();
                let list = qcow2::bitmap::track::read_directory(q.storage(), &q.header())
                    .ok()
                    .flatten()
                    .map(|(_, d)| d)
                    .unwrap_or_default();
                let b = if list.is_empty() {
                    0
                } else {
                    qcow2::bitmap::measure(&list, size, cs)
                };
                m.insert("bitmaps".into(), json!(b));
            }
            m.insert(
                "required".into(),
                json!(full - virtual_size + required + luks_area),
            );
            m.insert("fully-allocated".into(), json!(full + luks_area));
        }
    }
    match a.output {
        Output::Json => println!("{}", crate::json::to_qemu_string(&Value::Object(m))),
        Output::Human => {
            println!("required size: {}", m["required"]);
            println!("fully allocated size: {}", m["fully-allocated"]);
            if let Some(b) = m.get("bitmaps") {
                println!("bitmaps size: {b}");
            }
        }
    }
    Ok(0)
}
