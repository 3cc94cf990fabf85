//! `rimg create`.

use std::collections::HashMap;
use std::path::Path;

use clap::Args;
use qcow2::{CompressionType, CreateOptions, Format, OpenOptions, Preallocation};

use crate::opts::{parse_bool, OptList};
use crate::size::parse_size;
use crate::CliError;

#[derive(Args)]
pub struct CreateArgs {
    /// Image format: qcow2, raw or luks (default raw, as qemu-img)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Backing file (relative names resolve against the new image's directory)
    #[arg(short = 'b', long = "backing", value_name = "BACKING_FILE")]
    backing: Option<String>,
    /// Backing file format
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_fmt: Option<String>,
    /// Do not open the backing file (its size is then required)
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_backing: bool,
    /// Format options: cluster_size, compat, refcount_bits, lazy_refcounts,
    /// preallocation, backing_file, backing_fmt, compression_type, size,
    /// encrypt.format (luks, aes), encrypt.key-secret and the other
    /// encrypt.* options, encryption=on
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    options: Vec<String>,
    /// Quiet: print nothing on success
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    filename: String,
    /// Virtual size, with optional k/M/G/T suffix
    size: Option<String>,
}

const QCOW2_OPTS: &str = "Supported options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size
  compat=<str>           - Compatibility level (v2 [0.10], v3 [1.1])
  compression_type=<str> - Compression method used for image cluster compression (zlib, zstd)
  encrypt.cipher-alg=<str> - Name of encryption cipher algorithm
  encrypt.cipher-mode=<str> - Name of encryption cipher mode
  encrypt.format=<str>   - Encrypt the image, format choices: 'aes', 'luks'
  encrypt.hash-alg=<str> - Name of encryption hash algorithm
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.ivgen-alg=<str> - Name of IV generator algorithm
  encrypt.ivgen-hash-alg=<str> - Name of IV generator hash algorithm
  encrypt.key-secret=<str> - ID of secret providing qcow AES key or LUKS passphrase
  encryption=<bool (on/off)> - Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size";

const VDI_OPTS: &str = "Supported options:
  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable
  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)
  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)
  size=<size>            - Virtual disk size
  static=<bool (on/off)> - VDI static (pre-allocated) image";

const VPC_OPTS: &str = "Supported options:
  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable
  force_size=<bool (on/off)> - Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation
  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)
  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)
  size=<size>            - Virtual disk size
  subformat=<str>        - Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} ";

const VMDK_OPTS: &str = "Supported options:
  adapter_type=<str>     - Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Must be 'vmdk' if present
  compat6=<bool (on/off)> - VMDK version 6 image
  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable
  hwversion=<str>        - VMDK hardware version
  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)
  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)
  size=<size>            - Virtual disk size
  subformat=<str>        - VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} 
  toolsversion=<str>     - VMware guest tools version
  zeroed_grain=<bool (on/off)> - Enable efficient zero writes using the zeroed-grain GTE feature";

const VHDX_OPTS: &str = "Supported options:
  block_size=<size>      - Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.
  block_state_zero=<bool (on/off)> - Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to 'off' when using 'qemu-img convert' with subformat=dynamic.
  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable
  log_size=<size>        - Log size; min 1MB.
  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)
  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)
  size=<size>            - Virtual disk size; max of 64TB.
  subformat=<str>        - VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'.";

const RAW_OPTS: &str = "Supported options:
  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)
  size=<size>            - Virtual disk size";

pub fn run(a: CreateArgs) -> Result<u8, CliError> {
    let fmt_name = a.format.clone().unwrap_or_else(|| "raw".into());
    if fmt_name == "luks" {
        return create_luks(&a);
    }
    let format = Format::from_name(&fmt_name)
        .ok_or_else(|| CliError::new(format!("Unknown file format '{fmt_name}'")))?;
    let list = OptList::parse(&a.options).map_err(CliError::new)?;
    if list.wants_help() {
        println!(
            "{}",
            match format {
                Format::Qcow2 => QCOW2_OPTS,
                Format::Vdi => VDI_OPTS,
                Format::Vpc => VPC_OPTS,
                Format::Vmdk => VMDK_OPTS,
                Format::Vhdx => VHDX_OPTS,
                _ => RAW_OPTS,
            }
        );
        return Ok(0);
    }
    // create names the image in its option errors (convert does not).
    let Parsed {
        mut o,
        size: mut size_arg,
        prealloc: given_prealloc,
        compat: given_compat,
        given,
        encrypt,
    } = parse_options(format, &list)
        .map_err(|e| CliError::new(format!("{}: {}", a.filename, e.msg)))?;
    if a.size.is_some() {
        if size_arg.is_some() {
            return Err(twice(&a.filename));
        }
        size_arg = a.size.clone();
    }
    if a.backing.is_some() {
        o.backing_file = a.backing.clone();
    }
    if o.backing_file.as_deref() == Some("") {
        return Err(CliError::new(format!(
            "{}: Expected backing file name, got empty string",
            a.filename
        )));
    }
    if a.backing_fmt.is_some() {
        o.backing_format = a.backing_fmt.clone();
    }
    if o.backing_file.is_some() && !matches!(format, Format::Qcow2 | Format::Vmdk) {
        return Err(CliError::new(format!(
            "{}: Backing file not supported for file format '{}'",
            a.filename,
            format.name()
        )));
    }
    if let Some(b) = &o.backing_file {
        if o.backing_format.is_none() {
            // As qemu-img: the backing file is looked at first, and its
            // format never recorded on a guess.
            let path = qcow2::resolve_backing(Path::new(&a.filename), b);
            return Err(CliError::new(match qcow2::probe(&path) {
                Ok(f) => format!(
                    "{}: Backing file specified without backing format\nDetected format of {}.",
                    a.filename,
                    f.name()
                ),
                Err(e) => format!(
                    "{}: Could not open '{}': {}\nCould not open backing image.",
                    a.filename,
                    path.display(),
                    crate::common::os_error_text(&e)
                ),
            }));
        }
        if let Some(f) = &o.backing_format {
            if Format::from_name(f).is_none() {
                return Err(CliError::new(format!("Unknown backing file format '{f}'")));
            }
        }
    }
    let size = match &size_arg {
        Some(s) => parse_size(s)
            .ok_or_else(|| CliError::new(format!("Invalid image size specified: '{s}'.")))?,
        None => {
            let Some(b) = &o.backing_file else {
                return Err(CliError::new(format!(
                    "{}: Image creation needs a size parameter",
                    a.filename
                )));
            };
            if a.unsafe_backing {
                return Err(CliError::new(format!(
                    "{}: Image creation needs a size parameter",
                    a.filename
                )));
            }
            backing_size(&a.filename, b, o.backing_format.as_deref())?
        }
    };
    if size_arg.is_some() && !a.unsafe_backing {
        if let Some(b) = &o.backing_file {
            // qemu-img opens the backing file to check it exists.
            backing_size(&a.filename, b, o.backing_format.as_deref())?;
        }
    }
    o.size = if format == Format::Qcow2 {
        size.next_multiple_of(512)
    } else {
        size
    };
    if !a.quiet {
        println!(
            "{}",
            formatting_line(
                &a.filename,
                &o,
                size,
                given_prealloc.as_deref(),
                given_compat.as_deref(),
                &given,
                &encrypt,
            )
        );
    }
    let mut locked = false;
    let made = crate::object::encryption(&encrypt, "encrypt.")
        .map_err(|m| CliError::new(format!("{}: {m}", a.filename)))
        .and_then(|e| {
            o.encrypt = e;
            make(&a.filename, &o, format, &mut locked)
        });
    // qemu-img deletes what a failed qcow2 creation left; the other
    // drivers leave the file their file layer made (empty, or partial).
    // A file whose lock another holds was never touched: it stays.
    if format == Format::Qcow2 && !locked {
        discard_on_error(&a.filename, &made);
    }
    made
}

/// Makes the image; `locked` tells that its file was in use (and left as
/// it was).
fn make(
    filename: &str,
    o: &CreateOptions,
    format: Format,
    locked: &mut bool,
) -> Result<u8, CliError> {
    qcow2::create(Path::new(filename), o).map_err(|e| match e {
        e @ qcow2::Error::Locked(_) => {
            *locked = true;
            CliError::new(format!("{filename}: {}", crate::common::error_text(&e)))
        }
        // qemu-img words these as sentences of their own.
        qcow2::Error::InvalidArgument(m) => {
            CliError::new(format!("{}: {}", filename, crate::common::sentence(&m)))
        }
        qcow2::Error::TooLarge(_) => CliError::new(format!(
            "{}: The image size is too large for file format '{}'{}",
            filename,
            format.name(),
            if format == Format::Qcow2 {
                " (try using a larger cluster size)"
            } else {
                ""
            }
        )),
        e => CliError::new(format!("{filename}: {}", crate::common::error_text(&e))),
    })?;
    Ok(0)
}

/// After a failed qcow2 or LUKS creation the file holds a partial image
/// (a file that existed was truncated first): qemu-img deletes it, so
/// nothing half-made is left to be opened later. Devices stay.
fn discard_on_error(filename: &str, made: &Result<u8, CliError>) {
    let path = qcow2::paths::host_path(Path::new(filename));
    if made.is_err() && std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        let _ = std::fs::remove_file(path);
    }
}

/// `create -f luks`: a LUKS volume (header, key material, payload).
fn create_luks(a: &CreateArgs) -> Result<u8, CliError> {
    let list = OptList::parse(&a.options).map_err(CliError::new)?;
    if list.wants_help() {
        println!("{LUKS_OPTS}");
        return Ok(0);
    }
    let Parsed {
        mut o,
        size: size_arg,
        prealloc,
        encrypt,
        ..
    } = parse_options(Format::Luks, &list)?;
    if a.size.is_some() && size_arg.is_some() {
        return Err(twice(&a.filename));
    }
    let Some(s) = a.size.clone().or(size_arg) else {
        return Err(CliError::new(format!(
            "{}: Image creation needs a size parameter",
            a.filename
        )));
    };
    o.size = parse_size(&s)
        .ok_or_else(|| CliError::new(format!("Invalid image size specified: '{s}'.")))?;
    if !a.quiet {
        let mut line = format!(
            "Formatting '{}', fmt=luks size={}{}",
            a.filename,
            o.size,
            crate::object::echo_encrypt(&encrypt, "")
        );
        if let Some(p) = prealloc {
            line += &format!(" preallocation={p}");
        }
        println!("{line}");
    }
    let fail = |m: String| CliError::new(format!("{}: {m}", a.filename));
    let mut locked = false;
    let made = luks_encryption(&encrypt).map_err(fail).and_then(|e| {
        o.encrypt = e;
        qcow2::create(Path::new(&a.filename), &o)
            .map(|()| 0)
            .map_err(|e| {
                locked = matches!(e, qcow2::Error::Locked(_));
                fail(crate::common::error_text(&e))
            })
    });
    if !locked {
        discard_on_error(&a.filename, &made);
    }
    made
}

const LUKS_OPTS: &str = "Supported luks options:
  cipher-alg=<str>       - Name of encryption cipher algorithm
  cipher-mode=<str>      - Name of encryption cipher mode
  detached-header=<bool (on/off)> - Create a detached LUKS header
  hash-alg=<str>         - Name of encryption hash algorithm
  iter-time=<num>        - Time to spend in PBKDF in milliseconds
  ivgen-alg=<str>        - Name of IV generator algorithm
  ivgen-hash-alg=<str>   - Name of IV generator hash algorithm
  key-secret=<str>       - ID of the secret that provides the keyslot passphrase
  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)
  size=<size>            - Virtual disk size";

/// The encryption of a new luks image from its options (the LUKS
/// options without qcow2's `encrypt.` prefix; `key-secret` required).
pub fn luks_encryption(
    given: &[(String, String)],
) -> Result<Option<(qcow2::encrypt::EncryptFormat, qcow2::encrypt::Secret)>, String> {
    match crate::object::encryption(given, "")? {
        Some(e @ (qcow2::encrypt::EncryptFormat::Luks(_), _)) => Ok(Some(e)),
        _ => Err("Parameter 'format' does not accept value 'aes'".into()),
    }
}

/// Image options from `-o`, as qemu-img create and convert take them.
pub struct Parsed {
    pub o: CreateOptions,
    pub size: Option<String>,
    /// Values given explicitly (qemu-img echoes only those).
    pub prealloc: Option<String>,
    pub compat: Option<String>,
    /// The foreign formats' options as given (the last value of each),
    /// for the "Formatting" line.
    pub given: HashMap<&'static str, String>,
    /// `encryption` and `encrypt.*` options as given (built into
    /// `o.encrypt` by [`crate::object::encryption`] once echoed).
    pub encrypt: Vec<(String, String)>,
}

pub fn parse_options(format: Format, list: &OptList) -> Result<Parsed, CliError> {
    let mut o = CreateOptions {
        format,
        ..Default::default()
    };
    let mut size_arg = None;
    let mut given_prealloc = None;
    let mut given_compat = None;
    let mut given = HashMap::new();
    let mut encrypt = Vec::new();
    for (k, v) in &list.items {
        let bad = || CliError::new(format!("Invalid value '{v}' for option '{k}'"));
        // A size option's value, refused in QEMU's words.
        let size_value = || {
            parse_size(v).ok_or_else(|| {
                CliError::new(format!(
                    "Parameter '{k}' expects a non-negative number below 2^64\n\
                     Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                     and exabytes, respectively."
                ))
            })
        };
        match (format, k.as_str()) {
            (_, "size") => size_arg = Some(v.clone()),
            (_, "preallocation") => {
                o.preallocation = Preallocation::from_name(v)
                    .ok_or_else(|| CliError::new(format!("Invalid preallocation mode: '{v}'")))?;
                given_prealloc = Some(v.clone());
            }
            (Format::Qcow2, "cluster_size") => o.cluster_size = size_value()?,
            (Format::Qcow2, "compat") => {
                o.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(CliError::new(format!("Invalid compatibility level: '{v}'"))),
                };
                given_compat = Some(v.clone());
            }
            (Format::Qcow2, "refcount_bits") => {
                // A number as QEMU parses one (strtoull: "-1" wraps); a
                // width that does not fit is left to create's check.
                let n = v
                    .parse::<u64>()
                    .or_else(|_| v.parse::<i64>().map(|x| x as u64))
                    .map_err(|_| bad())?;
                o.refcount_bits = u32::try_from(n).unwrap_or(u32::MAX);
            }
            (Format::Qcow2, "lazy_refcounts") => {
                o.lazy_refcounts = parse_bool(k, v).map_err(CliError::new)?
            }
            (Format::Qcow2, "compression_type") => {
                o.compression_type = CompressionType::from_name(v)
                    .ok_or_else(|| CliError::new(format!("Invalid compression type '{v}'")))?
            }
            // btrfs's NOCOW attribute on the new file (a hint elsewhere).
            (_, "nocow") => {
                o.nocow = parse_bool(k, v).map_err(CliError::new)?;
                given.insert("nocow", if o.nocow { "on" } else { "off" }.into());
            }
            // A hint to the host filesystem (XFS extent size); rimg
            // leaves extent sizes to the filesystem.
            (_, "extent_size_hint") => {
                parse_size(v).ok_or_else(bad)?;
            }
            (Format::Qcow2, "backing_file") => o.backing_file = Some(v.clone()),
            (Format::Qcow2, "backing_fmt") => o.backing_format = Some(v.clone()),
            (Format::Qcow2, "extended_l2") => {
                o.extended_l2 = parse_bool(k, v).map_err(CliError::new)?;
            }
            (Format::Qcow2, "data_file") => o.data_file = Some(v.clone()),
            (Format::Qcow2, "data_file_raw") => {
                o.data_file_raw = parse_bool(k, v).map_err(CliError::new)?
            }
            (Format::Qcow2, k) if k == "encryption" || k.starts_with("encrypt.") => {
                encrypt.push((k.to_string(), v.clone()))
            }
            (Format::Vpc, "subformat") => {
                o.foreign.subformat = Some(v.clone());
                given.insert("subformat", v.clone());
            }
            (Format::Vpc, "force_size") => {
                o.foreign.force_size = parse_bool(k, v).map_err(CliError::new)?;
                given.insert("force_size", v.clone());
            }
            (Format::Vmdk, "adapter_type") => {
                o.foreign.adapter_type = Some(v.clone());
                given.insert("adapter_type", v.clone());
            }
            (Format::Vmdk, "hwversion") => {
                // "undefined" is the option's default: no version given.
                o.foreign.hwversion = (v != "undefined").then(|| v.clone());
                given.insert("hwversion", v.clone());
            }
            (Format::Vmdk, "toolsversion") => {
                o.foreign.toolsversion = Some(v.clone());
                given.insert("toolsversion", v.clone());
            }
            (Format::Vmdk, "compat6") => {
                o.foreign.compat6 = parse_bool(k, v).map_err(CliError::new)?;
                given.insert("compat6", v.clone());
            }
            (Format::Vmdk, "zeroed_grain") => {
                o.foreign.zeroed_grain = parse_bool(k, v).map_err(CliError::new)?;
                given.insert("zeroed_grain", v.clone());
            }
            (Format::Vmdk, "subformat") => {
                o.foreign.subformat = Some(v.clone());
                given.insert("subformat", v.clone());
            }
            (Format::Vmdk, "backing_file") => o.backing_file = Some(v.clone()),
            (Format::Vmdk, "backing_fmt") => o.backing_format = Some(v.clone()),
            (Format::Vhdx, "log_size") => {
                let n = size_value()?;
                o.foreign.log_size = Some(n);
                given.insert("log_size", n.to_string());
            }
            (Format::Vhdx, "block_size") => {
                let n = size_value()?;
                o.foreign.block_size = Some(n);
                given.insert("block_size", n.to_string());
            }
            (Format::Vhdx, "subformat") => {
                o.foreign.subformat = Some(v.clone());
                given.insert("subformat", v.clone());
            }
            (Format::Vhdx, "block_state_zero") => {
                o.foreign.block_state_zero = Some(parse_bool(k, v).map_err(CliError::new)?);
                given.insert("block_state_zero", v.clone());
            }
            (Format::Vdi, "static") => {
                o.foreign.is_static = parse_bool(k, v).map_err(CliError::new)?;
                given.insert("static", v.clone());
            }
            (Format::Luks, "detached-header") => {
                if parse_bool(k, v).map_err(CliError::new)? {
                    return Err(CliError::new(
                        "detached LUKS headers are not supported by rimg (use detached-header=off)",
                    ));
                }
            }
            (Format::Luks, k) if crate::object::is_luks_option(k) => {
                encrypt.push((k.to_string(), v.clone()))
            }
            _ => return Err(CliError::new(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(Parsed {
        o,
        size: size_arg,
        prealloc: given_prealloc,
        compat: given_compat,
        given,
        encrypt,
    })
}

fn backing_size(image: &str, backing: &str, fmt: Option<&str>) -> Result<u64, CliError> {
    let (path, opts) = crate::blockopts::backing_options(
        Path::new(image),
        backing,
        OpenOptions {
            format: fmt.and_then(Format::from_name),
            no_backing: true,
            // Only the size is wanted: an encrypted backing file needs
            // no key for that (QEMU opens it without I/O).
            qcow2: qcow2::Qcow2Options {
                no_io: true,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .map_err(|e| CliError::new(format!("{image}: {}\nCould not open backing image.", e.msg)))?;
    let img = qcow2::open(&path, &opts).map_err(|e| match e {
        qcow2::Error::Open { .. } => CliError::new(format!(
            "{image}: Could not open '{}': {}\nCould not open backing image.",
            path.display(),
            crate::common::os_error_text(&e)
        )),
        e => CliError::new(format!("{image}: Could not open backing file: {e}")),
    })?;
    Ok(img.size())
}

/// qemu-img's "Formatting ..." line, options in its order.
fn formatting_line(
    name: &str,
    o: &CreateOptions,
    size: u64,
    prealloc: Option<&str>,
    compat: Option<&str>,
    given: &HashMap<&'static str, String>,
    encrypt: &[(String, String)],
) -> String {
    let mut s = format!("Formatting '{name}', fmt={}", o.format.name());
    s += &crate::object::echo_encrypt(encrypt, "encrypt.");
    match o.format {
        Format::Raw | Format::Luks | Format::Vdi | Format::Vpc | Format::Vmdk | Format::Vhdx => {
            s += &format!(" size={size}");
            s += &driver_options(o, given);
            // The file layer's option, after the driver's (QEMU's list).
            if let Some(n) = given.get("nocow") {
                s += &format!(" nocow={n}");
            }
            if let Some(p) = prealloc {
                s += &format!(" preallocation={p}");
            }
        }
        Format::Qcow2 => {
            s += &format!(
                " cluster_size={} extended_l2={}",
                o.cluster_size,
                if o.extended_l2 { "on" } else { "off" }
            );
            if let Some(p) = prealloc {
                s += &format!(" preallocation={p}");
            }
            s += &format!(
                " compression_type={} size={size}",
                o.compression_type.name()
            );
            if let Some(b) = &o.backing_file {
                // Option values print with commas doubled, as qemu-img
                // prints them.
                s += &format!(" backing_file={}", b.replace(',', ",,"));
            }
            if let Some(f) = &o.backing_format {
                s += &format!(" backing_fmt={f}");
            }
            if let Some(d) = &o.data_file {
                s += &format!(" data_file={d}");
            }
            if o.data_file_raw {
                s += " data_file_raw=on";
            }
            if let Some(c) = compat {
                s += &format!(" compat={c}");
            }
            s += &format!(
                " lazy_refcounts={} refcount_bits={}",
                if o.lazy_refcounts { "on" } else { "off" },
                o.refcount_bits
            );
            if let Some(n) = given.get("nocow") {
                s += &format!(" nocow={n}");
            }
        }
    }
    s
}

/// A foreign driver's options for the "Formatting" line, in the order
/// of its option list: those given (the last value of each), and those
/// QEMU echoes with their defaults.
fn driver_options(o: &CreateOptions, given: &HashMap<&'static str, String>) -> String {
    let (keys, defaults): (&[&str], &[(&str, &str)]) = match o.format {
        Format::Vdi => (&["static"], &[("static", "off")]),
        Format::Vpc => (&["subformat", "force_size"], &[]),
        Format::Vhdx => (
            &["log_size", "block_size", "subformat", "block_state_zero"],
            &[("log_size", "1048576"), ("block_size", "0")],
        ),
        Format::Vmdk => (
            &[
                "adapter_type",
                "backing_file",
                "backing_fmt",
                "compat6",
                "hwversion",
                "toolsversion",
                "subformat",
                "zeroed_grain",
            ],
            &[("compat6", "off"), ("hwversion", "undefined")],
        ),
        _ => (&[], &[]),
    };
    let mut s = String::new();
    for &k in keys {
        let v = match k {
            "backing_file" => o.backing_file.as_ref().map(|b| b.replace(',', ",,")),
            "backing_fmt" => o.backing_format.clone(),
            _ => given.get(k).cloned(),
        };
        let v = v.or_else(|| defaults.iter().find(|d| d.0 == k).map(|d| d.1.to_string()));
        if let Some(v) = v {
            s += &format!(" {k}={v}");
        }
    }
    s
}

/// The size given both as `-o size=` and as an argument (QEMU's words).
fn twice(filename: &str) -> CliError {
    CliError::new(format!(
        "{filename}: The image size must be specified only once"
    ))
}
