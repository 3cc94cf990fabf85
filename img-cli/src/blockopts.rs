//! Image specifications beyond a plain filename, as qemu-img takes them:
//! `json:{...}` filenames, `--image-opts` option strings
//! (`driver=qcow2,file.filename=X`), and the `blkdebug:CONFIG:FILE`
//! protocol prefix. Both forms become one flat map of dotted keys (as
//! QEMU flattens its option dicts), then a tree of nodes: format drivers
//! (qcow2, raw, luks, vdi, vpc, vmdk) over protocol ones (file, blkdebug, quorum,
//! null-co).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::Format;
use serde_json::Value;

use crate::blkdebug::Blkdebug;
use crate::CliError;

/// Option keys and their values, dotted keys for nested dicts
/// (`file.filename`) and list items (`inject-error.0.event`).
type Flat = BTreeMap<String, Value>;

#[derive(Debug)]
pub enum Node {
    Format {
        format: Format,
        file: Box<Node>,
        no_backing: bool,
    },
    File(String),
    Blkdebug {
        image: Box<Node>,
        config: Option<String>,
        faults: Arc<Blkdebug>,
        /// Rules given as options: the node has no plain name.
        has_options: bool,
    },
    Quorum(Vec<Node>),
    NullCo {
        size: u64,
    },
    /// No driver named: the format is probed on the file below.
    Probe(Box<Node>),
}

/// An image specification resolved for opening.
#[derive(Debug)]
pub struct Spec {
    pub node: Node,
    /// The name qemu-img shows for the image.
    pub name: String,
    /// Secret ids of `encrypt.key-secret` for the image, then for its
    /// backing images nearest first (`backing.encrypt.key-secret`,
    /// `backing.backing.encrypt.key-secret`, ...).
    pub keys: Vec<Option<String>>,
    /// The external data file given in place of the header's
    /// (`data-file.filename`).
    pub data_file: Option<PathBuf>,
    /// The vpc driver's `force_size_calc` option, as given.
    pub vpc_force_size_calc: Option<String>,
    /// `read-only=on` (or the file node's): no writable open.
    pub read_only: bool,
    /// `force-share=on`: for read-only opens only.
    pub force_share: bool,
}

impl Spec {
    /// The host file holding the image (a quorum's first child).
    pub fn host(&self) -> Option<PathBuf> {
        fn walk(n: &Node) -> Option<PathBuf> {
            match n {
                Node::Format { file, .. } | Node::Probe(file) => walk(file),
                Node::Blkdebug { image, .. } => walk(image),
                Node::File(f) => Some(qcow2::open::host_path(Path::new(f)).to_path_buf()),
                Node::Quorum(c) => c.first().and_then(walk),
                Node::NullCo { .. } => None,
            }
        }
        walk(&self.node)
    }

    /// The plain name of the node holding the image's bytes (the file
    /// node under the format node), when there is one: what qemu-img
    /// info shows as its child's filename.
    pub fn file_name(&self) -> Option<String> {
        match &self.node {
            Node::Format { file, .. } | Node::Probe(file) => plain_name(file),
            n => plain_name(n),
        }
    }

    /// The image format named (outermost format node), None to probe.
    pub fn format(&self) -> Option<Format> {
        fn walk(n: &Node) -> Option<Format> {
            match n {
                Node::Format { format, .. } => Some(*format),
                Node::Blkdebug { image, .. } => walk(image),
                _ => None,
            }
        }
        walk(&self.node)
    }

    pub fn no_backing(&self) -> bool {
        fn walk(n: &Node) -> bool {
            match n {
                Node::Format { no_backing, .. } => *no_backing,
                Node::Blkdebug { image, .. } => walk(image),
                _ => false,
            }
        }
        walk(&self.node)
    }

    /// The fault injector over the image's file, if any.
    pub fn faults(&self) -> Option<Arc<Blkdebug>> {
        fn walk(n: &Node) -> Option<Arc<Blkdebug>> {
            match n {
                Node::Format { file, .. } | Node::Probe(file) => walk(file),
                Node::Blkdebug { faults, image, .. } => {
                    walk(image).or_else(|| Some(faults.clone()))
                }
                _ => None,
            }
        }
        walk(&self.node)
    }

    /// The size of a null-co image, when that is what this is.
    pub fn null_size(&self) -> Option<u64> {
        match &self.node {
            Node::NullCo { size } => Some(*size),
            Node::Probe(n) | Node::Format { file: n, .. } => match **n {
                Node::NullCo { size } => Some(size),
                _ => None,
            },
            _ => None,
        }
    }

    /// The directory relative backing names resolve against (QEMU's
    /// bdrv_dirname); None where QEMU cannot determine one (quorum).
    pub fn dirname(&self) -> Option<PathBuf> {
        fn walk(n: &Node) -> Option<PathBuf> {
            match n {
                Node::Format { file, .. } | Node::Probe(file) => walk(file),
                Node::Blkdebug { image, .. } => walk(image),
                Node::File(f) => Some(
                    Path::new(&crate::common::display_name(f))
                        .parent()
                        .map(Path::to_path_buf)
                        .unwrap_or_default(),
                ),
                Node::Quorum(_) | Node::NullCo { .. } => None,
            }
        }
        walk(&self.node)
    }
}

fn err(msg: impl Into<String>) -> CliError {
    CliError::new(msg)
}

/// Whether `name` needs this module (else it is a plain filename).
pub fn is_special(name: &str) -> bool {
    name.starts_with("json:") || name.starts_with("blkdebug:")
}

/// Parses a filename as qemu-img does (`json:`, `blkdebug:` or plain).
pub fn parse_filename(name: &str) -> Result<Spec, CliError> {
    if let Some(j) = name.strip_prefix("json:") {
        let v = crate::qjson::parse(j)
            .map_err(|e| err(format!("Could not parse the JSON options: {e}")))?;
        let Value::Object(_) = v else {
            return Err(err("Invalid JSON object given"));
        };
        let mut flat = Flat::new();
        flatten("", &v, &mut flat)?;
        return from_flat(&flat);
    }
    let node = parse_protocol(name)?;
    let name = plain_name(&node).unwrap_or_else(|| name.to_string());
    Ok(Spec {
        node: Node::Probe(Box::new(node)),
        name,
        keys: Vec::new(),
        data_file: None,
        vpc_force_size_calc: None,
        read_only: false,
        force_share: false,
    })
}

/// Parses an `--image-opts` string: `key=value` pairs split at commas,
/// `,,` standing for a comma.
pub fn parse_image_opts(s: &str) -> Result<Spec, CliError> {
    let mut flat = Flat::new();
    let items = crate::opts::split_options(s);
    for it in items.iter().filter(|i| !i.is_empty()) {
        let Some((k, v)) = it.split_once('=') else {
            return Err(err(format!("Invalid parameter '{it}'")));
        };
        flat.insert(k.to_string(), Value::String(v.to_string()));
    }
    from_flat(&flat)
}

/// Parses `name` as a filename or, with `image_opts`, as an option string.
pub fn parse(name: &str, image_opts: bool) -> Result<Spec, CliError> {
    if image_opts {
        parse_image_opts(name)
    } else {
        parse_filename(name)
    }
}

fn flatten(prefix: &str, v: &Value, out: &mut Flat) -> Result<(), CliError> {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                flatten(&key(k), x, out)?;
            }
        }
        Value::Array(a) if !prefix.is_empty() => {
            for (i, x) in a.iter().enumerate() {
                flatten(&key(&i.to_string()), x, out)?;
            }
        }
        x => {
            if out.insert(prefix.to_string(), x.clone()).is_some() {
                return Err(err(format!("Duplicate option '{prefix}'")));
            }
        }
    }
    Ok(())
}

/// The options under `prefix.` with the prefix taken off.
fn sub(flat: &Flat, prefix: &str) -> Flat {
    let p = format!("{prefix}.");
    flat.iter()
        .filter_map(|(k, v)| k.strip_prefix(&p).map(|r| (r.to_string(), v.clone())))
        .collect()
}

fn get_str(flat: &Flat, key: &str) -> Option<String> {
    flat.get(key).and_then(|v| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    })
}

fn from_flat(flat: &Flat) -> Result<Spec, CliError> {
    let node = node(flat, 0)?;
    let node = match node {
        n @ (Node::Format { .. } | Node::Probe(_)) => n,
        // `driver=file` names the file's bytes: raw, never probed.
        n @ Node::File(_) => Node::Format {
            format: Format::Raw,
            file: Box::new(n),
            no_backing: true,
        },
        Node::Blkdebug { ref image, .. } if matches!(**image, Node::Format { .. }) => node,
        n => Node::Probe(Box::new(n)),
    };
    // A key is one of qcow2's "strong" runtime options, force_size_calc
    // one of vpc's: with one, no plain filename says what was opened
    // (QEMU's bdrv_refresh_filename).
    let strong: Vec<&String> = flat
        .keys()
        .filter(|k| k.ends_with("key-secret") || *k == "force_size_calc")
        .collect();
    // A file node given as options (`file.filename=X`) has no driver.
    let host_file = |n: &Node| match n {
        Node::File(f) => Some(f.clone()),
        Node::Probe(f) => match &**f {
            Node::File(f) => Some(f.clone()),
            _ => None,
        },
        _ => None,
    };
    let name = match (plain_name(&node), &node) {
        (Some(n), _) if strong.is_empty() => n,
        // The top node's own strong options only (a backing node's
        // nest in QEMU's name).
        (_, Node::Format { format, file, .. })
            if host_file(file).is_some()
                && strong.iter().all(|k| {
                    ["force_size_calc", "key-secret", "encrypt.key-secret"].contains(&k.as_str())
                }) =>
        {
            strong_json_name(flat, &strong, *format, &host_file(file).unwrap())
        }
        _ => json_name(flat),
    };
    let mut keys = Vec::new();
    let mut prefix = String::new();
    // As deep as the keys given go (each level is a longer key).
    while flat.keys().any(|k| k.starts_with(&prefix)) {
        // qcow2 names its key `encrypt.key-secret`, luks `key-secret`.
        keys.push(
            get_str(flat, &format!("{prefix}encrypt.key-secret"))
                .or_else(|| get_str(flat, &format!("{prefix}key-secret"))),
        );
        prefix.push_str("backing.");
    }
    while keys.last().is_some_and(Option::is_none) {
        keys.pop();
    }
    let data_file = get_str(flat, "data-file.filename")
        .or_else(|| get_str(flat, "data-file.file.filename"))
        .map(PathBuf::from);
    Ok(Spec {
        node,
        name,
        keys,
        data_file,
        vpc_force_size_calc: get_str(flat, "force_size_calc"),
        read_only: ["read-only", "file.read-only"]
            .iter()
            .any(|k| get_str(flat, k).is_some_and(|v| on(&v))),
        force_share: get_str(flat, "force-share").is_some_and(|v| on(&v)),
    })
}

/// A boolean option's "yes", as QEMU spells it.
fn on(v: &str) -> bool {
    matches!(v, "on" | "true" | "yes")
}

/// Keys a node of each driver understands (the rest are refused, as
/// QEMU refuses options no driver took).
fn check_keys(
    flat: &Flat,
    driver: &str,
    known: &[&str],
    children: &[&str],
) -> Result<(), CliError> {
    for k in flat.keys() {
        let head = k.split('.').next().unwrap_or(k);
        if !known.contains(&k.as_str()) && !children.contains(&head) {
            return Err(err(if children.is_empty() {
                format!("Block protocol '{driver}' doesn't support the option '{k}'")
            } else {
                format!("Block format '{driver}' does not support the option '{k}'")
            }));
        }
    }
    Ok(())
}

/// The child under `key`: a dict of options, or a filename string.
fn child(flat: &Flat, key: &str, depth: usize) -> Result<Option<Node>, CliError> {
    if let Some(s) = get_str(flat, key) {
        return parse_protocol(&s).map(Some);
    }
    let s = sub(flat, key);
    if s.is_empty() {
        return Ok(None);
    }
    Ok(Some(node(&s, depth + 1)?))
}

fn node(flat: &Flat, depth: usize) -> Result<Node, CliError> {
    if depth > 16 {
        return Err(err("Block node nesting is too deep"));
    }
    let driver = get_str(flat, "driver");
    match driver.as_deref() {
        Some(d @ ("qcow2" | "raw" | "luks" | "vdi" | "vpc" | "vmdk" | "vhdx")) => {
            let format = Format::from_name(d).unwrap();
            check_keys(
                flat,
                d,
                &[
                    "driver",
                    match format {
                        Format::Luks => "key-secret",
                        Format::Vpc => "force_size_calc",
                        _ => "driver",
                    },
                    "backing",
                    "node-name",
                    "read-only",
                    "filename",
                    // Runtime tuning rimg takes and has no use for.
                    "l2-cache-size",
                    "l2-cache-entry-size",
                    "refcount-cache-size",
                    "cache-size",
                    "cache-clean-interval",
                    "lazy-refcounts",
                    "pass-discard-request",
                    "pass-discard-snapshot",
                    "pass-discard-other",
                    "discard-no-unref",
                    "overlap-check",
                    "auto-read-only",
                    "discard",
                    "detect-zeroes",
                    "force-share",
                ],
                &[
                    "file",
                    "cache",
                    "data-file",
                    "overlap-check",
                    "encrypt",
                    "backing",
                ],
            )?;
            let file = match child(flat, "file", depth)? {
                Some(f) => f,
                None => match get_str(flat, "filename") {
                    Some(f) => parse_protocol(&f)?,
                    None => return Err(err("A block device must be specified for \"file\"")),
                },
            };
            let no_backing = matches!(flat.get("backing"), Some(Value::Null))
                || get_str(flat, "backing").as_deref() == Some("");
            Ok(Node::Format {
                format,
                file: Box::new(file),
                no_backing,
            })
        }
        Some("file") => {
            check_keys(
                flat,
                "file",
                &[
                    "driver",
                    "filename",
                    "node-name",
                    "read-only",
                    "aio",
                    "locking",
                ],
                &[],
            )?;
            let f =
                get_str(flat, "filename").ok_or_else(|| err("Parameter 'filename' is required"))?;
            Ok(Node::File(f))
        }
        Some("blkdebug") => {
            let image = child(flat, "image", depth)?
                .ok_or_else(|| err("Could not open blkdebug: no image given"))?;
            let config = get_str(flat, "config");
            let mut rules = Vec::new();
            if let Some(c) = &config {
                rules.extend(crate::blkdebug::read_config(c)?);
            }
            for (list, kind) in [("inject-error", true), ("set-state", false)] {
                let all = sub(flat, list);
                let mut i = 0;
                loop {
                    let one = sub(&all, &i.to_string());
                    if one.is_empty() {
                        break;
                    }
                    let kv: Vec<(String, String)> = one
                        .keys()
                        .map(|k| (k.clone(), get_str(&one, k).unwrap_or_default()))
                        .collect();
                    rules.push(crate::blkdebug::Rule::from_pairs(kind, &kv)?);
                    i += 1;
                }
            }
            let has_options = flat.keys().any(|k| {
                k != "driver" && k != "config" && k != "image" && !k.starts_with("image.")
            });
            Ok(Node::Blkdebug {
                image: Box::new(image),
                config,
                faults: Arc::new(Blkdebug::new(rules)),
                has_options,
            })
        }
        Some("quorum") => {
            let all = sub(flat, "children");
            let mut children = Vec::new();
            while let Some(c) = child(&all, &children.len().to_string(), depth)? {
                children.push(c);
            }
            if children.is_empty() {
                return Err(err("Number of provided children must be 1 or more"));
            }
            Ok(Node::Quorum(children))
        }
        Some("null-co") => {
            let size = match get_str(flat, "size") {
                Some(s) => s
                    .parse()
                    .map_err(|_| err("Parameter 'size' expects a number"))?,
                None => 1 << 30,
            };
            Ok(Node::NullCo { size })
        }
        Some(d) => Err(err(format!("Unknown driver '{d}'"))),
        None => {
            if let Some(f) = get_str(flat, "filename") {
                return Ok(Node::Probe(Box::new(parse_protocol(&f)?)));
            }
            match child(flat, "file", depth)? {
                Some(f) => Ok(Node::Probe(Box::new(f))),
                None => Err(err("Must specify either driver or file")),
            }
        }
    }
}

/// A protocol filename: `blkdebug:CONFIG:IMAGE`, else a host file.
fn parse_protocol(name: &str) -> Result<Node, CliError> {
    if let Some(rest) = name.strip_prefix("blkdebug:") {
        let (config, image) = rest
            .split_once(':')
            .ok_or_else(|| err("Could not parse the blkdebug filename"))?;
        let rules = if config.is_empty() {
            Vec::new()
        } else {
            crate::blkdebug::read_config(config)?
        };
        return Ok(Node::Blkdebug {
            image: Box::new(parse_protocol(image)?),
            config: (!config.is_empty()).then(|| config.to_string()),
            faults: Arc::new(Blkdebug::new(rules)),
            has_options: false,
        });
    }
    Ok(Node::File(name.to_string()))
}

/// The plain filename QEMU shows for a node, when its options allow one.
fn plain_name(n: &Node) -> Option<String> {
    match n {
        Node::File(f) => Some(crate::common::display_name(f)),
        Node::Format { file, .. } | Node::Probe(file) => plain_name(file),
        Node::Blkdebug {
            image,
            config,
            has_options: false,
            ..
        } => Some(format!(
            "blkdebug:{}:{}",
            config.as_deref().unwrap_or(""),
            plain_name(image)?
        )),
        _ => None,
    }
}

/// The `json:{...}` name QEMU gives a format node over a file when strong
/// options are set (bdrv_refresh_filename): those options, the driver,
/// and the file node (its driver and filename), in the order QEMU's QDict
/// hash table lists them, printed as QEMU prints JSON.
fn strong_json_name(flat: &Flat, strong: &[&String], format: Format, file: &str) -> String {
    let file = qdict_json(&[
        ("driver", "\"file\"".to_string()),
        ("filename", Value::from(file).to_string()),
    ]);
    let mut items: Vec<(&str, String)> = strong
        .iter()
        .map(|k| (k.as_str(), flat[*k].to_string()))
        .collect();
    items.push(("driver", Value::from(format.name()).to_string()));
    items.push(("file", file));
    format!("json:{}", qdict_json(&items))
}

/// A JSON object of already serialised values, keys in QEMU's QDict
/// order: by hash bucket (tdb_hash modulo 512), the later-inserted key
/// first within a bucket; `{"k": v, ...}` as QEMU's JSON writer spaces it.
fn qdict_json(items: &[(&str, String)]) -> String {
    fn bucket(key: &str) -> u32 {
        let mut v = 0x238f_13afu32.wrapping_mul(key.len() as u32);
        for (i, &c) in key.as_bytes().iter().enumerate() {
            v = v.wrapping_add((c as u32) << (i * 5 % 24));
        }
        1_103_515_249u32.wrapping_mul(v).wrapping_add(12345) % 512
    }
    let mut order: Vec<(u32, std::cmp::Reverse<usize>, usize)> = items
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (bucket(k), std::cmp::Reverse(i), i))
        .collect();
    order.sort();
    let body: Vec<String> = order
        .iter()
        .map(|&(_, _, i)| format!("{}: {}", Value::from(items[i].0), items[i].1))
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// The `json:{...}` name QEMU gives a node no plain name describes.
fn json_name(flat: &Flat) -> String {
    let mut root = serde_json::Map::new();
    for (k, v) in flat {
        let mut m = &mut root;
        let parts: Vec<&str> = k.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            let e = m
                .entry(p.to_string())
                .or_insert_with(|| Value::Object(Default::default()));
            if !e.is_object() {
                *e = Value::Object(Default::default());
            }
            m = e.as_object_mut().unwrap();
        }
        m.insert(parts[parts.len() - 1].to_string(), v.clone());
    }
    format!("json:{}", Value::Object(root))
}

/// The host path and open options for `name` (a plain filename stays
/// as it is; a specification sets format, backing and fault injection).
pub fn open_options(
    name: &str,
    image_opts: bool,
    mut opts: qcow2::OpenOptions,
) -> Result<(PathBuf, qcow2::OpenOptions), CliError> {
    if !image_opts && !is_special(name) {
        return Ok((PathBuf::from(name), opts));
    }
    let spec =
        parse(name, image_opts).map_err(|e| err(format!("Could not open '{name}': {}", e.msg)))?;
    if opts.writable && spec.read_only {
        return Err(err(format!(
            "Could not open '{name}': Block node is read-only"
        )));
    }
    if opts.writable && spec.force_share {
        return Err(err(format!(
            "Could not open '{name}': force-share=on can only be used with read-only images"
        )));
    }
    let path = spec.host().ok_or_else(|| {
        err(format!(
            "Could not open '{}': the driver cannot be opened here",
            spec.name
        ))
    })?;
    if let Some(f) = spec.format() {
        if opts.format.is_some_and(|g| g != f) {
            return Err(err(format!(
                "Cannot use image format '{}' with driver '{}'",
                opts.format.unwrap().name(),
                f.name()
            )));
        }
        opts.format = Some(f);
    }
    opts.no_backing |= spec.no_backing();
    if spec.data_file.is_some() {
        opts.qcow2.data_file = spec.data_file.clone();
    }
    if spec.vpc_force_size_calc.is_some() {
        opts.vpc_force_size_calc = spec.vpc_force_size_calc.clone();
    }
    if let Some(f) = spec.faults() {
        opts.faults = Some(f);
    }
    // An open that reads no data (info) needs no key, and qemu-img does
    // not look the secret up then.
    let no_io = opts.qcow2.no_io;
    let secret = |id: &Option<String>| -> Result<_, CliError> {
        match id.as_deref().map(crate::object::passphrase) {
            Some(Ok(k)) => Ok(Some(qcow2::encrypt::Secret(k))),
            Some(Err(_)) if no_io => Ok(None),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    };
    if let Some((top, backing)) = spec.keys.split_first() {
        opts.qcow2.encrypt_key = secret(top)?;
        opts.backing_keys = backing.iter().map(secret).collect::<Result<_, _>>()?;
    }
    Ok((path, opts))
}

/// [`open_options`] for the backing file `name` of `image`: a plain name
/// resolves against the image's directory; a `json:` or `blkdebug:` name
/// stands as it is.
pub fn backing_options(
    image: &Path,
    name: &str,
    opts: qcow2::OpenOptions,
) -> Result<(PathBuf, qcow2::OpenOptions), CliError> {
    if is_special(name) {
        open_options(name, false, opts)
    } else {
        Ok((qcow2::resolve_backing(image, name), opts))
    }
}

/// The null-co image `name` names, if it names one: a sparse anonymous
/// file of its size reads as zeros and reports no data, as null-co with
/// read-zeroes does.
pub fn open_null(name: &str, image_opts: bool) -> Result<Option<Arc<dyn qcow2::Image>>, CliError> {
    if !image_opts && !is_special(name) {
        return Ok(None);
    }
    let Some(size) = parse(name, image_opts)?.null_size() else {
        return Ok(None);
    };
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it
    // returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"null-co".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(err(format!(
            "Could not open '{name}': {}",
            crate::common::strerror(&std::io::Error::last_os_error())
        )));
    }
    // SAFETY: `fd` is a descriptor just created and owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| {
        err(format!(
            "Could not open '{name}': {}",
            crate::common::strerror(&e)
        ))
    })?;
    let st = qcow2::storage::Storage::from_file(file, Path::new(name), false);
    Ok(Some(Arc::new(qcow2::Raw::open(st)?)))
}

/// Opens `name` (a filename or, with `image_opts`, an option string):
/// specification errors are the outer error, the engine's the inner one.
pub fn open_image(
    name: &str,
    image_opts: bool,
    opts: qcow2::OpenOptions,
) -> Result<qcow2::Result<Arc<dyn qcow2::Image>>, CliError> {
    let (path, opts) = open_options(name, image_opts, opts)?;
    let img = qcow2::open(&path, &opts);
    if let Ok(i) = &img {
        print_open_messages(i.as_ref());
    }
    Ok(img)
}

/// Prints what opening an image for writing says on stderr, as
/// qemu-img's drivers print it: the probed-raw warning, the lines of the
/// repair a dirty image had.
pub fn print_open_messages(img: &dyn qcow2::Image) {
    // QEMU's raw driver warns at every writable open of a probed raw.
    if img.guards_first_sector() {
        eprintln!("{}", qcow2::raw::probed_warning(img.path()));
    }
    if let Some(q) = img.as_qcow2() {
        for line in q.take_open_messages().unwrap_or_default() {
            eprintln!("{line}");
        }
    }
}
