//! `rimg info`: qemu-img info's human layout and JSON shape.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, ValueEnum};
use qcow2::{Format, Image, OpenOptions};
use serde_json::{json, Map, Value};

use crate::size::size_to_str;
use crate::CliError;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

#[derive(Args)]
pub struct InfoArgs {
    /// Image format (probed when absent)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Show every image of the backing chain
    #[arg(long)]
    backing_chain: bool,
    /// Open the image even if another process uses it (accepted for
    /// compatibility; info only reads)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The filename is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    filename: String,
}

/// Everything info reports about one image.
struct ImageInfo {
    filename: String,
    format: Format,
    virtual_size: u64,
    /// The allocation unit qemu-img info reports (qcow2's cluster, a vdi
    /// block); None for raw and luks.
    cluster_size: Option<u64>,
    /// Unknown for an image on an NBD server (QEMU: "unavailable").
    actual_size: Option<u64>,
    qcow2: Option<qcow2::Header>,
    snapshots: Vec<qcow2::Snapshot>,
    /// Backing name as stored and as resolved against the image's directory.
    /// (None: QEMU cannot determine a directory for this node.)
    backing: Option<(String, Option<String>)>,
    /// The backing file's format as the image records it (a VMDK
    /// parent's is always vmdk).
    backing_format: Option<String>,
    /// crypt_method 2 or the luks format: the LUKS header.
    luks: Option<qcow2::luks::LuksHeader>,
    /// Persistent dirty bitmaps (the `bitmaps` list of qemu-img info).
    bitmaps: Vec<qcow2::bitmap::DirEntry>,
    /// A VMDK image's format-specific data (QEMU's ImageInfoSpecificVmdk).
    vmdk: Option<Map<String, Value>>,
    /// The protocol nodes under the image, in QEMU's order: a VMDK
    /// descriptor's extent files (last first), then the image file.
    children: Vec<Child>,
    /// None where QEMU's get_info fails (VMDK extents of mixed types):
    /// no dirty flag is shown then.
    dirty_flag: Option<bool>,
}

/// A protocol node under the image: its name among the children, file
/// name, length in whole sectors and allocated bytes.
struct Child {
    name: String,
    /// QEMU's protocol driver: `file`, or `host_device` for a device
    /// (found by stat, whatever its name).
    protocol: &'static str,
    filename: String,
    length: u64,
    /// None: unknown (an NBD export).
    actual: Option<u64>,
}

impl Child {
    fn of(name: String, st: &qcow2::storage::Storage) -> Result<Child, CliError> {
        use std::os::unix::fs::FileTypeExt;
        let Some(file) = st.file() else {
            return Ok(Child::nbd(name, st));
        };
        let t = file
            .metadata()
            .map_err(|e| CliError::new(e.to_string()))?
            .file_type();
        let device = t.is_block_device() || t.is_char_device();
        Ok(Child {
            name,
            protocol: if device { "host_device" } else { "file" },
            filename: st.path().display().to_string(),
            length: st.len()?.next_multiple_of(512),
            actual: Some(st.allocated_bytes()?),
        })
    }

    /// An NBD export under a format (QEMU's nbd protocol node).
    fn nbd(name: String, st: &qcow2::storage::Storage) -> Child {
        Child {
            name,
            protocol: "nbd",
            filename: qcow2::nbd::display_name(&st.path().to_string_lossy()),
            length: st.nbd().map_or(0, |c| c.size),
            actual: None,
        }
    }
}

/// QEMU's format-specific data of a VMDK image: CIDs, create type and
/// the extents (a sparse image file is its own, with an empty type word;
/// "compressed" only when it is, no "cluster-size" for a flat one).
fn vmdk_json(l: &qcow2::foreign::vmdk::VmdkLayout, file_name: &str) -> Map<String, Value> {
    let extents: Vec<Value> = l
        .extents_info()
        .iter()
        .map(|e| {
            let mut x = Map::new();
            if e.compressed {
                x.insert("compressed".into(), json!(true));
            }
            x.insert("virtual-size".into(), json!(e.virtual_size));
            let name = match e.file {
                0 => file_name.to_string(),
                k => l.extent_files()[k as usize - 1]
                    .path()
                    .display()
                    .to_string(),
            };
            x.insert("filename".into(), json!(name));
            if let Some(cs) = e.cluster_size {
                x.insert("cluster-size".into(), json!(cs));
            }
            x.insert("format".into(), json!(e.format));
            Value::Object(x)
        })
        .collect();
    let mut d = Map::new();
    d.insert("cid".into(), json!(l.cid()));
    d.insert("parent-cid".into(), json!(l.parent_cid()));
    d.insert("create-type".into(), json!(l.create_type()));
    d.insert("extents".into(), Value::Array(extents));
    d
}

fn open_one(
    name: &str,
    image_opts: bool,
    format: Option<Format>,
    force_share: bool,
) -> Result<ImageInfo, CliError> {
    let (path, opts) = crate::blockopts::open_options(
        name,
        image_opts,
        OpenOptions {
            format,
            no_backing: true,
            force_share,
            qcow2: qcow2::Qcow2Options {
                no_io: true,
                ..Default::default()
            },
            ..Default::default()
        },
    )?;
    let img: Arc<dyn Image> = qcow2::open(&path, &opts)
        .map_err(|e| CliError::new(format!("Could not open '{name}': {e}")))?;
    let (actual_size, file_length) = match img.as_qcow2() {
        _ if img.storage().nbd().is_some() => (None, img.storage().len()?),
        Some(q) => (Some(q.storage().allocated_bytes()?), q.storage().len()?),
        None => {
            let md = std::fs::metadata(qcow2::open::host_path(&path))
                .map_err(|e| CliError::new(format!("{name}: {e}")))?;
            use std::os::unix::fs::MetadataExt;
            (Some(md.blocks() * 512), md.len())
        }
    };
    let (qh, snapshots) = match img.as_qcow2() {
        Some(q) => (Some(q.header()), q.snapshots()),
        None => (None, Vec::new()),
    };
    let luks = match (img.as_qcow2(), &qh) {
        (Some(q), Some(h)) if h.crypt_method == qcow2::header::crypt::LUKS => {
            Some(qcow2::encrypt::read_luks(q.storage(), h)?)
        }
        _ if img.format() == Format::Luks => {
            let mut b = vec![0u8; qcow2::luks::HEADER_LEN];
            img.storage().read_at(&mut b, 0)?;
            Some(qcow2::luks::LuksHeader::parse(&b)?)
        }
        _ => None,
    };
    // A directory that does not hold is left out (it refuses writing).
    let bitmaps = match (img.as_qcow2(), &qh) {
        (Some(q), Some(h)) => qcow2::bitmap::track::read_directory(q.storage(), h)
            .ok()
            .flatten()
            .map(|(_, d)| d)
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let (shown, dir, file_name) = if image_opts || crate::blockopts::is_special(name) {
        let spec = crate::blockopts::parse(name, image_opts)?;
        let dir = spec.dirname();
        let file_name = spec.file_name().unwrap_or_else(|| spec.name.clone());
        (spec.name, dir, file_name)
    } else {
        let shown = crate::common::display_name(name);
        let dir = Path::new(&shown).parent().map(Path::to_path_buf);
        (shown.clone(), Some(dir.unwrap_or_default()), shown)
    };
    let vmdk_layout = img
        .as_any()
        .downcast_ref::<qcow2::Vmdk>()
        .map(|v| v.layout());
    let (backing_name, backing_format) = match (&qh, vmdk_layout) {
        (Some(h), _) => (h.backing_file.clone(), h.backing_format.clone()),
        (None, Some(l)) => (l.parent(), l.parent().map(|_| "vmdk".to_string())),
        _ => (None, None),
    };
    let backing = backing_name.map(|b| {
        let full = dir.map(|d| {
            let full = if Path::new(&b).is_absolute()
                || d.as_os_str().is_empty()
                || qcow2::nbd::is_nbd(&b)
            {
                PathBuf::from(&b)
            } else {
                d.join(&b)
            };
            full.to_string_lossy().into_owned()
        });
        (b, full)
    });
    // QEMU reports the length of the file node in whole 512-byte sectors.
    let file_length = file_length.next_multiple_of(512);
    let vmdk = vmdk_layout.map(|l| vmdk_json(l, &file_name));
    let mut children = Vec::new();
    let file_actual = actual_size;
    let mut actual_size = actual_size;
    if let Some(l) = vmdk_layout {
        for (i, st) in l.extent_files().iter().enumerate().rev() {
            let c = Child::of(format!("extents.{i}"), st)?;
            actual_size = actual_size.zip(c.actual).map(|(a, b)| a + b);
            children.push(c);
        }
    }
    // The file under the format node: its plain name even where the
    // image's is a json: one.
    children.push(match img.storage().nbd() {
        Some(_) => Child::nbd("file".into(), img.storage()),
        None => Child {
            name: "file".into(),
            protocol: "file",
            filename: file_name.clone(),
            length: file_length,
            actual: file_actual,
        },
    });
    let dirty_flag = match vmdk_layout {
        Some(l) if !l.uniform() => None,
        // QEMU's raw driver asks its file, and the nbd driver has no
        // such information to give.
        _ if img.format() == Format::Raw && img.storage().nbd().is_some() => None,
        _ => Some(qh.as_ref().is_some_and(|h| h.is_dirty())),
    };
    Ok(ImageInfo {
        filename: shown,
        format: img.format(),
        // QEMU counts a raw file in whole sectors.
        virtual_size: crate::common::qemu_len(img.as_ref()),
        cluster_size: match &qh {
            Some(h) => Some(h.cluster_size()),
            None => img.cluster_size(),
        },
        actual_size,
        qcow2: qh,
        snapshots,
        backing,
        backing_format,
        luks,
        bitmaps,
        vmdk,
        children,
        dirty_flag,
    })
}

impl ImageInfo {
    fn encrypted(&self) -> bool {
        self.format == Format::Luks || self.qcow2.as_ref().is_some_and(|h| h.crypt_method != 0)
    }
}

/// The `bitmaps` list of format-specific information.
fn bitmaps_json(list: &[qcow2::bitmap::DirEntry]) -> Option<Value> {
    if list.is_empty() {
        return None;
    }
    let v = list
        .iter()
        .map(|d| {
            let mut flags = Vec::new();
            if d.in_use() {
                flags.push("in-use");
            }
            if d.auto() {
                flags.push("auto");
            }
            json!({"flags": flags, "name": d.name_str(), "granularity": d.granularity()})
        })
        .collect();
    Some(Value::Array(v))
}

/// The `encrypt` block of format-specific information, keys in
/// qemu-img's order.
fn encrypt_json(h: &qcow2::Header, luks: Option<&qcow2::luks::LuksHeader>) -> Option<Value> {
    if h.crypt_method == 0 {
        return None;
    }
    let Some(l) = luks else {
        return Some(json!({"format": "aes"}));
    };
    Some(Value::Object(luks_json(l, true)))
}

/// A LUKS header as QEMU's info describes it, keys in its order; with
/// `format` (inside qcow2) the `"format": "luks"` key QEMU adds there.
fn luks_json(l: &qcow2::luks::LuksHeader, format: bool) -> Map<String, Value> {
    let mut e = Map::new();
    e.insert("ivgen-alg".into(), json!(l.ivgen.name()));
    e.insert("detached-header".into(), json!(false));
    e.insert("hash-alg".into(), json!(l.hash.name()));
    e.insert("cipher-alg".into(), json!(l.cipher_alg_name()));
    e.insert("uuid".into(), json!(l.uuid));
    if let Some(ih) = l.ivhash {
        e.insert("ivgen-hash-alg".into(), json!(ih.name()));
    }
    if format {
        e.insert("format".into(), json!("luks"));
    }
    e.insert("cipher-mode".into(), json!(l.mode.name()));
    let slots: Vec<Value> = l
        .slots
        .iter()
        .map(|s| {
            let off = s.key_offset_sector as u64 * 512;
            if s.active {
                json!({"active": true, "iters": s.iterations, "key-offset": off, "stripes": s.stripes})
            } else {
                json!({"active": false, "key-offset": off})
            }
        })
        .collect();
    e.insert("slots".into(), Value::Array(slots));
    e.insert("payload-offset".into(), json!(l.payload_offset()));
    e.insert("master-key-iters".into(), json!(l.mk_iterations));
    e
}

/// qemu-img's human rendering of a JSON value, nested by 4 spaces.
fn human_value(name: &str, v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) => {
            *out += &format!("{pad}{name}:\n");
            for (k, v) in m {
                human_value(&k.replace('-', " "), v, indent + 4, out);
            }
        }
        Value::Array(a) => {
            *out += &format!("{pad}{name}:\n");
            for (i, v) in a.iter().enumerate() {
                human_value(&format!("[{i}]"), v, indent + 4, out);
            }
        }
        Value::String(s) => *out += &format!("{pad}{name}: {s}\n"),
        v => *out += &format!("{pad}{name}: {v}\n"),
    }
}

fn to_json(i: &ImageInfo) -> Value {
    let mut m = Map::new();
    let children: Vec<Value> = i
        .children
        .iter()
        .map(|c| match c.actual {
            Some(actual) => json!({
                "name": c.name,
                "info": {
                    "children": [],
                    "virtual-size": c.length,
                    "filename": c.filename,
                    "format": c.protocol,
                    "actual-size": actual,
                    "format-specific": {"type": "file", "data": {}},
                    "dirty-flag": false
                }
            }),
            // QEMU's nbd node: no size on disk, no format-specific data.
            None => json!({
                "name": c.name,
                "info": {
                    "children": [],
                    "virtual-size": c.length,
                    "filename": c.filename,
                    "format": c.protocol
                }
            }),
        })
        .collect();
    m.insert("children".into(), Value::Array(children));
    if let Some(f) = &i.backing_format {
        m.insert("backing-filename-format".into(), json!(f));
    }
    // Only qcow2 images have snapshots.
    if !i.snapshots.is_empty() {
        let snaps: Vec<Value> = i
            .snapshots
            .iter()
            .map(|s| {
                let mut o = Map::new();
                if let Some(ic) = s.icount {
                    o.insert("icount".into(), json!(ic));
                }
                o.insert(
                    "vm-clock-nsec".into(),
                    json!(s.vm_clock_nsec % 1_000_000_000),
                );
                o.insert("name".into(), json!(s.name));
                o.insert("date-sec".into(), json!(s.date_sec));
                o.insert("date-nsec".into(), json!(s.date_nsec));
                o.insert(
                    "vm-clock-sec".into(),
                    json!(s.vm_clock_nsec / 1_000_000_000),
                );
                o.insert("id".into(), json!(s.id));
                o.insert("vm-state-size".into(), json!(s.vm_state_size));
                Value::Object(o)
            })
            .collect();
        m.insert("snapshots".into(), Value::Array(snaps));
    }
    m.insert("virtual-size".into(), json!(i.virtual_size));
    m.insert("filename".into(), json!(i.filename));
    if let Some(cs) = i.cluster_size {
        m.insert("cluster-size".into(), json!(cs));
    }
    m.insert("format".into(), json!(i.format.name()));
    if let Some(a) = i.actual_size {
        m.insert("actual-size".into(), json!(a));
    }
    if let Some(h) = &i.qcow2 {
        let mut d = Map::new();
        d.insert(
            "compat".into(),
            json!(if h.version == 2 { "0.10" } else { "1.1" }),
        );
        d.insert("compression-type".into(), json!(h.compression_type.name()));
        if h.version == 3 {
            d.insert("lazy-refcounts".into(), json!(h.lazy_refcounts()));
        }
        if let Some(b) = bitmaps_json(&i.bitmaps) {
            d.insert("bitmaps".into(), b);
        }
        d.insert("refcount-bits".into(), json!(h.refcount_bits()));
        if let Some(f) = h.data_file() {
            d.insert("data-file".into(), json!(f));
        }
        if h.has_data_file() {
            d.insert("data-file-raw".into(), json!(h.data_file_raw()));
        }
        if let Some(e) = encrypt_json(h, i.luks.as_ref()) {
            d.insert("encrypt".into(), e);
        }
        if h.version == 3 {
            d.insert("corrupt".into(), json!(h.is_corrupt()));
            d.insert("extended-l2".into(), json!(h.extended_l2()));
        }
        m.insert(
            "format-specific".into(),
            json!({"type": "qcow2", "data": Value::Object(d)}),
        );
    }
    if let (Format::Luks, Some(l)) = (i.format, &i.luks) {
        m.insert(
            "format-specific".into(),
            json!({"type": "luks", "data": Value::Object(luks_json(l, false))}),
        );
    }
    if let Some(d) = &i.vmdk {
        m.insert(
            "format-specific".into(),
            json!({"type": "vmdk", "data": Value::Object(d.clone())}),
        );
    }
    if let Some((b, full)) = &i.backing {
        if let Some(full) = full {
            m.insert("full-backing-filename".into(), json!(full));
        }
        m.insert("backing-filename".into(), json!(b));
    }
    if i.encrypted() {
        m.insert("encrypted".into(), json!(true));
    }
    if let Some(d) = i.dirty_flag {
        m.insert("dirty-flag".into(), json!(d));
    }
    Value::Object(m)
}

fn local_date(sec: u32) -> String {
    let t = sec as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which we own; `t` is a
    // valid time_t on the stack.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return "?".into();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// "Snapshot list:" and its table, as qemu-img prints it (empty when
/// there are no snapshots).
pub fn snapshot_list(snaps: &[qcow2::Snapshot]) -> String {
    let mut s = String::new();
    if snaps.is_empty() {
        return s;
    }
    s += "Snapshot list:\n";
    s += &format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snaps {
        let secs = sn.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (sn.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = sn.icount.map(|c| c.to_string()).unwrap_or_default();
        s += &format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            sn.id,
            sn.name,
            size_to_str(sn.vm_state_size),
            local_date(sn.date_sec),
            clock,
            icount
        );
    }
    s
}

fn to_human(i: &ImageInfo) -> String {
    let mut s = String::new();
    s += &format!("image: {}\n", i.filename);
    s += &format!("file format: {}\n", i.format.name());
    s += &format!(
        "virtual size: {} ({} bytes)\n",
        size_to_str(i.virtual_size),
        i.virtual_size
    );
    s += &format!("disk size: {}\n", disk_size(i.actual_size));
    if i.encrypted() {
        s += "encrypted: yes\n";
    }
    if let (Format::Luks, Some(l)) = (i.format, &i.luks) {
        s += "Format specific information:\n";
        for (k, v) in luks_json(l, false) {
            human_value(&k.replace('-', " "), &v, 4, &mut s);
        }
    }
    if let Some(cs) = i.cluster_size {
        s += &format!("cluster_size: {cs}\n");
    }
    if let Some((b, full)) = &i.backing {
        match full {
            Some(full) if b == full => s += &format!("backing file: {b}\n"),
            Some(full) => s += &format!("backing file: {b} (actual path: {full})\n"),
            None => s += &format!("backing file: {b} (cannot determine actual path)\n"),
        }
    }
    if let Some(f) = &i.backing_format {
        s += &format!("backing file format: {f}\n");
    }
    if let Some(h) = &i.qcow2 {
        if h.is_dirty() {
            s += "cleanly shut down: no\n";
        }
        s += &snapshot_list(&i.snapshots);
        s += "Format specific information:\n";
        s += &format!(
            "    compat: {}\n",
            if h.version == 2 { "0.10" } else { "1.1" }
        );
        s += &format!("    compression type: {}\n", h.compression_type.name());
        if h.version == 3 {
            s += &format!("    lazy refcounts: {}\n", h.lazy_refcounts());
        }
        if let Some(b) = bitmaps_json(&i.bitmaps) {
            human_value("bitmaps", &b, 4, &mut s);
        }
        s += &format!("    refcount bits: {}\n", h.refcount_bits());
        if let Some(f) = h.data_file() {
            s += &format!("    data file: {f}\n");
        }
        if h.has_data_file() {
            s += &format!("    data file raw: {}\n", h.data_file_raw());
        }
        if let Some(e) = encrypt_json(h, i.luks.as_ref()) {
            human_value("encrypt", &e, 4, &mut s);
        }
        if h.version == 3 {
            s += &format!("    corrupt: {}\n", h.is_corrupt());
            s += &format!("    extended l2: {}\n", h.extended_l2());
        }
    }
    if let Some(d) = &i.vmdk {
        s += "Format specific information:\n";
        for (k, v) in d {
            human_value(&k.replace('-', " "), v, 4, &mut s);
        }
    }
    for c in &i.children {
        s += &format!("Child node '/{}':\n", c.name);
        s += &format!("    filename: {}\n", c.filename);
        s += &format!("    protocol type: {}\n", c.protocol);
        s += &format!(
            "    file length: {} ({} bytes)\n",
            size_to_str(c.length),
            c.length
        );
        s += &format!("    disk size: {}\n", disk_size(c.actual));
    }
    s
}

/// A size on disk as qemu-img prints it, "unavailable" when unknown.
fn disk_size(n: Option<u64>) -> String {
    n.map_or_else(|| "unavailable".into(), size_to_str)
}

pub fn run(a: InfoArgs) -> Result<u8, CliError> {
    let fmt = crate::common::parse_format(&a.format)?;
    let mut chain = vec![open_one(&a.filename, a.image_opts, fmt, a.force_share)?];
    if a.backing_chain {
        let top =
            crate::blockopts::open_options(&a.filename, a.image_opts, OpenOptions::default())?.0;
        let mut seen = vec![std::fs::canonicalize(&top).unwrap_or(top)];
        while let Some((_, Some(full))) = chain.last().unwrap().backing.clone() {
            let bfmt = chain.last().unwrap().backing_format.clone();
            let canon = std::fs::canonicalize(&full).unwrap_or_else(|_| PathBuf::from(&full));
            if seen.contains(&canon) {
                return Err(CliError::new(format!(
                    "Backing file '{full}' creates an infinite loop."
                )));
            }
            if seen.len() > qcow2::open::MAX_CHAIN_DEPTH {
                return Err(CliError::new("backing chain is too deep"));
            }
            seen.push(canon);
            chain.push(open_one(
                &full,
                false,
                bfmt.as_deref().and_then(Format::from_name),
                a.force_share,
            )?);
        }
    }
    match a.output {
        Output::Json => {
            let v = if a.backing_chain {
                Value::Array(chain.iter().map(to_json).collect())
            } else {
                to_json(&chain[0])
            };
            println!("{}", crate::json::to_qemu_string(&v));
        }
        Output::Human => {
            let parts: Vec<String> = chain.iter().map(to_human).collect();
            print!("{}", parts.join("\n"));
        }
    }
    Ok(0)
}
