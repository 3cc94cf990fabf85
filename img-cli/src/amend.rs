//! `rimg amend`: changes format options of an existing qcow2 image, or
//! the key slots of a luks volume.

use clap::Args;
use qcow2::{Amend, OpenOptions};

use crate::opts::{parse_bool, OptList};
use crate::progress::{Progress, ProgressOpt};
use crate::CliError;

#[derive(Args)]
pub struct AmendArgs {
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Options to change: compat, refcount_bits, lazy_refcounts,
    /// backing_file, backing_fmt
    #[arg(short = 'o', long = "options", value_name = "OPTIONS", required = true)]
    options: Vec<String>,
    #[command(flatten)]
    progress: ProgressOpt,
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Allow changes that qemu-img guards with --force (accepted)
    #[arg(long)]
    force: bool,
    /// The filename is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    filename: String,
}

pub fn run(a: AmendArgs) -> Result<u8, CliError> {
    let _ = &a.cache;
    let format = crate::common::parse_format(&a.format)?;
    let list = OptList::parse(&a.options).map_err(CliError::new)?;
    let (path, opts) = crate::blockopts::open_options(
        &a.filename,
        a.image_opts,
        OpenOptions {
            writable: true,
            format,
            ..Default::default()
        },
    )?;
    let img = qcow2::open(&path, &opts)
        .map_err(|e| CliError::new(format!("Could not open '{}': {e}", a.filename)))?;
    crate::blockopts::print_open_messages(img.as_ref());
    // As qemu-img: the image is opened first, and the options are parsed
    // against its driver's, if it has any.
    if !matches!(img.format(), qcow2::Format::Qcow2 | qcow2::Format::Luks) {
        return Err(CliError::new(format!(
            "Format driver '{}' does not support option amendment",
            img.format().name()
        )));
    }
    let mut luks = qcow2::luks_amend::LuksAmend {
        force: a.force,
        ..Default::default()
    };
    let mut luks_given = false;
    let mut am = Amend::default();
    let mut new_size = None;
    // The first option of each kind: qcow2's, and the luks format's
    // (its key slot options, unprefixed); each refuses the other's.
    let (mut qcow2_key, mut volume_key, mut state_given) = (None, None, false);
    for (k, v) in &list.items {
        if matches!(
            k.as_str(),
            "state" | "keyslot" | "iter-time" | "new-secret" | "old-secret"
        ) {
            encrypt_option(&mut luks, k, v)?;
            volume_key.get_or_insert(k.clone());
            state_given |= k == "state";
            continue;
        }
        qcow2_key.get_or_insert(k.clone());
        match k.as_str() {
            "compat" => {
                am.version = Some(match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(CliError::new(format!("Unknown compatibility level {v}"))),
                })
            }
            "refcount_bits" => {
                am.refcount_bits = Some(
                    v.parse()
                        .map_err(|_| CliError::new(format!("Invalid refcount_bits: '{v}'")))?,
                )
            }
            "lazy_refcounts" => am.lazy_refcounts = Some(parse_bool(k, v).map_err(CliError::new)?),
            "backing_file" => am.backing_file = Some((!v.is_empty()).then(|| v.clone())),
            "backing_fmt" => am.backing_format = Some((!v.is_empty()).then(|| v.clone())),
            "data_file" => am.data_file = Some(v.clone()),
            "data_file_raw" => am.data_file_raw = Some(parse_bool(k, v).map_err(CliError::new)?),
            // Options of qcow2's creation that amend does not take
            // (qemu-img's two lines).
            "extended_l2" | "cluster_size" | "preallocation" | "compression_type"
            | "encryption" | "nocow" => {
                return Err(CliError::new(format!(
                    "Invalid parameter '{k}'\nThis option is only supported for image creation"
                )))
            }
            "size" => {
                new_size = Some(crate::size::parse_size(v).ok_or_else(|| {
                    // QemuOpts' wording for a bad size option.
                    CliError::new(
                        "Parameter 'size' expects a non-negative number below 2^64\n\
                         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                         and exabytes, respectively.",
                    )
                })?)
            }
            k if k.starts_with("encrypt.") => {
                encrypt_option(&mut luks, k, v)?;
                luks_given = true;
            }
            _ => return Err(CliError::new(format!("Invalid parameter '{k}'"))),
        }
    }
    if img.format() == qcow2::Format::Luks {
        if let Some(k) = qcow2_key {
            return Err(CliError::new(format!("Invalid parameter '{k}'")));
        }
        if !state_given {
            return Err(CliError::new("Parameter 'state' is missing"));
        }
        luks.secret = opts.qcow2.encrypt_key.map(|k| k.0);
        qcow2::luks_amend::amend_luks_volume(img.storage(), &luks)
            .map_err(|e| CliError::new(e.to_string()))?;
        img.flush()?;
        return Ok(0);
    }
    if let Some(k) = volume_key {
        return Err(CliError::new(format!("Invalid parameter '{k}'")));
    }
    let Some(q) = img.as_qcow2() else {
        return Err(CliError::new(format!(
            "Format driver '{}' does not support option amendment",
            img.format().name()
        )));
    };
    // qemu-img prints 0 % before the driver's own figures and 100 % after
    // them, whether the amend worked or not.
    let progress = Progress::new(a.progress.target(a.quiet), "Amending", 10_000, 1.0);
    let r = amend_qcow2(q, &img, &am, &luks, luks_given, new_size, &progress);
    progress.set_percent(100.0);
    progress.finish();
    r
}

/// The amend proper, once the image is open.
fn amend_qcow2(
    q: &qcow2::Qcow2,
    img: &std::sync::Arc<dyn qcow2::Image>,
    am: &Amend,
    luks: &qcow2::luks_amend::LuksAmend,
    luks_given: bool,
    new_size: Option<u64>,
    progress: &Progress,
) -> Result<u8, CliError> {
    let mut luks = luks.clone();
    if luks_given {
        luks.secret = q.encrypt_key().map(|k| k.0.clone());
        qcow2::luks_amend::amend_luks(q, &luks).map_err(|e| CliError::new(e.to_string()))?;
    }
    if am.backing_changes(&q.header()) {
        return Err(CliError::new(
            "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
        ));
    }
    // QEMU's order: an upgrade and the other changes, then the size,
    // then a downgrade (which must see the new size).
    let downgrade = am.version.is_some_and(|v| v < q.header().version);
    let resize = || -> Result<(), CliError> {
        match new_size {
            Some(n) if n != img.size() => img.resize(n).map_err(|e| {
                CliError::new(match e {
                    qcow2::Error::InvalidArgument(m) => crate::common::sentence(&m),
                    e => e.to_string(),
                })
            }),
            _ => Ok(()),
        }
    };
    if downgrade {
        resize()?;
    }
    let mut report = |done: u64, total: u64| {
        // amend_status_cb's arithmetic, in single precision.
        progress.set_percent(100.0f32 * done as f32 / total as f32)
    };
    q.amend_with_progress(am, &mut report).map_err(|e| {
        CliError::new(match e {
            // The downgrade's zero expansion met a snapshot's invalid L1
            // table: qemu-img's two lines.
            qcow2::Error::SnapshotL1(p) => format!(
                "{p}\n{}: Failed to turn zero into data clusters: {}",
                crate::prog_name(),
                p.errno_text()
            ),
            // qemu-img prints the driver's reason as it is (a sentence,
            // unless it starts with an option name).
            qcow2::Error::InvalidArgument(m)
                if m.starts_with("data-file") || m.starts_with("compat=") =>
            {
                m
            }
            qcow2::Error::InvalidArgument(m) => crate::common::sentence(&m),
            e => e.to_string(),
        })
    })?;
    if !downgrade {
        resize()?;
    }
    Ok(0)
}

/// One LUKS key slot management option: qcow2's `encrypt.*`, or the
/// luks format's, the same unprefixed.
fn encrypt_option(l: &mut qcow2::luks_amend::LuksAmend, k: &str, v: &str) -> Result<(), CliError> {
    let bad = || CliError::new(format!("Parameter '{k}' does not accept value '{v}'"));
    let name = match k.strip_prefix("encrypt.") {
        Some(n) => n,
        None => k,
    };
    match name {
        "format" if v == "luks" && k != name => {}
        "state" => {
            l.active = match v {
                "active" => true,
                "inactive" => false,
                _ => return Err(bad()),
            }
        }
        "keyslot" => l.keyslot = Some(v.parse().map_err(|_| bad())?),
        "iter-time" => l.iter_time_ms = Some(v.parse().map_err(|_| bad())?),
        "new-secret" => l.new_secret = Some(crate::object::passphrase(v)?),
        "old-secret" => l.old_secret = Some(crate::object::passphrase(v)?),
        _ => return Err(CliError::new(format!("Invalid parameter '{k}'"))),
    }
    Ok(())
}
