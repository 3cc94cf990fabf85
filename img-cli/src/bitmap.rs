//! `rimg bitmap`: edits the persistent dirty bitmaps of a qcow2 image,
//! with qemu-img bitmap's syntax (actions applied in command-line order),
//! checks and messages.

use clap::Args;
use qcow2::{Format, Image, OpenOptions};

use crate::CliError;

#[derive(Args)]
#[command(
    disable_help_flag = true,
    override_usage = "rimg bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [--object OBJECTDEF] [--image-opts | -f fmt] filename bitmap"
)]
pub struct BitmapArgs {
    /// Options and operands, as for qemu-img bitmap
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    fn op(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

#[derive(Default)]
struct Parsed {
    actions: Vec<Action>,
    fmt: Option<String>,
    src_fmt: Option<String>,
    src_file: Option<String>,
    granularity: Option<u64>,
    image_opts: bool,
    objects: Vec<String>,
    operands: Vec<String>,
}

const HELP: &str = "\
Edit the persistent dirty bitmaps of a qcow2 image (as qemu-img bitmap)

Usage: rimg bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
       [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [--object OBJECTDEF]
       [--image-opts | -f FMT] FILENAME BITMAP

Actions, applied in command-line order to BITMAP:
      --add                add an enabled, empty bitmap
      --remove             remove it
      --clear              clear all its bits
      --enable             record writes in it from now on
      --disable            stop recording writes in it
      --merge SOURCE       set in it every bit set in bitmap SOURCE
Options:
  -g, --granularity SIZE   granularity of a new bitmap (with --add)
  -b, --source-file FILE   the image SOURCE is in (with --merge)
  -F, --source-format FMT  its format
  -f, --format FMT         the image's format
      --image-opts         FILENAME is an option string
      --object OBJECTDEF   a secret, as for the other commands
  -h, --help               print this help";

/// Usage errors are printed as getopt and qemu-img print them, with the
/// subcommand in the prefix; `code` 2 marks them (exit status 1).
fn usage_error(msg: String) -> CliError {
    CliError {
        msg: format!(
            "{0} bitmap: {msg}\nTry '{0} bitmap --help' for more info",
            crate::prog_name()
        ),
        code: 2,
    }
}

/// getopt_long as qemu-img uses it: options and operands in any order,
/// `--` ends the options, `--opt=value` and `-gVALUE` forms.
fn parse(args: &[String]) -> Result<Parsed, CliError> {
    let mut p = Parsed::default();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        if a == "--" {
            p.operands.extend(it.by_ref().cloned());
            break;
        }
        let (name, inline) = match a.strip_prefix("--") {
            Some(long) => match long.split_once('=') {
                Some((n, v)) => (full_name(&format!("--{n}"))?, Some(v.to_string())),
                None => (full_name(a)?, None),
            },
            None if a.starts_with('-') && a.len() > 2 => (a[..2].to_string(), Some(a[2..].into())),
            None => (a.clone(), None),
        };
        let mut value = |opt: &str| -> Result<String, CliError> {
            match inline.clone().or_else(|| it.next().cloned()) {
                Some(v) => Ok(v),
                None => Err(usage_error(match opt.strip_prefix("--") {
                    Some(_) => format!("option '{opt}' requires an argument"),
                    None => format!("option requires an argument -- '{}'", &opt[1..]),
                })),
            }
        };
        match name.as_str() {
            "--add" => p.actions.push(Action::Add),
            "--remove" => p.actions.push(Action::Remove),
            "--clear" => p.actions.push(Action::Clear),
            "--enable" => p.actions.push(Action::Enable),
            "--disable" => p.actions.push(Action::Disable),
            "--merge" => p.actions.push(Action::Merge(value(a)?)),
            "--image-opts" => p.image_opts = true,
            "--object" => p.objects.push(value(a)?),
            "-g" | "--granularity" => {
                let v = value(a)?;
                p.granularity = Some(
                    crate::size::cvtnum("granularity", &v, 0, i64::MAX as u64)
                        .map_err(CliError::new)?,
                );
            }
            "-b" | "--source-file" => p.src_file = Some(value(a)?),
            "-F" | "--source-format" => p.src_fmt = Some(value(a)?),
            "-f" | "--format" => p.fmt = Some(value(a)?),
            "-h" | "--help" => {
                return Err(CliError {
                    msg: HELP.into(),
                    code: 0,
                })
            }
            _ if a.starts_with('-') && a.len() > 1 => {
                return Err(usage_error(format!("unrecognized option '{a}'")))
            }
            _ => p.operands.push(a.clone()),
        }
    }
    Ok(p)
}

/// The long options, for getopt_long's shortening (`--gran=64k`).
const LONG: &[&str] = &[
    "--add",
    "--remove",
    "--clear",
    "--enable",
    "--disable",
    "--merge",
    "--image-opts",
    "--object",
    "--granularity",
    "--source-file",
    "--source-format",
    "--format",
    "--help",
];

/// `opt` spelled out: itself when it is a long option, else the one long
/// option it begins; an ambiguous prefix is refused as getopt_long
/// refuses it, one that matches none is left to be reported.
fn full_name(opt: &str) -> Result<String, CliError> {
    if LONG.contains(&opt) {
        return Ok(opt.to_string());
    }
    let m: Vec<&str> = LONG
        .iter()
        .copied()
        .filter(|l| l.starts_with(opt))
        .collect();
    match m.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Ok(opt.to_string()),
        _ => Err(usage_error(format!(
            "option '{opt}' is ambiguous; possibilities: {}",
            m.iter()
                .map(|x| format!("'{x}'"))
                .collect::<Vec<_>>()
                .join(" ")
        ))),
    }
}

fn format_of(f: &Option<String>) -> Result<Option<Format>, CliError> {
    crate::common::parse_format(f)
}

fn open(
    name: &str,
    image_opts: bool,
    fmt: Option<Format>,
    writable: bool,
) -> Result<std::sync::Arc<dyn qcow2::Image>, CliError> {
    let opts = OpenOptions {
        writable,
        format: fmt,
        no_backing: true,
        ..Default::default()
    };
    let (path, opts) = crate::blockopts::open_options(name, image_opts, opts)?;
    qcow2::open(&path, &opts).map_err(|e| CliError::new(format!("Could not open '{name}': {e}")))
}

pub fn run(a: BitmapArgs) -> Result<u8, CliError> {
    let p = match parse(&a.args) {
        Ok(p) => p,
        Err(e) if e.code == 0 => {
            println!("{}", e.msg);
            return Ok(0);
        }
        Err(e) if e.code == 2 => {
            eprintln!("{}", e.msg);
            return Ok(1);
        }
        Err(e) => return Err(e),
    };
    if !p.objects.is_empty() {
        crate::object::init(&p.objects)?;
    }
    if p.actions.is_empty() {
        return Err(CliError::new(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    let add = p.actions.iter().any(|x| matches!(x, Action::Add));
    let merge = p.actions.iter().any(|x| matches!(x, Action::Merge(_)));
    if p.granularity.is_some_and(|g| g != 0) && !add {
        return Err(CliError::new("granularity only supported with --add"));
    }
    if p.src_fmt.is_some() && p.src_file.is_none() {
        return Err(CliError::new("-F only supported with -b"));
    }
    if p.src_file.is_some() && !merge {
        return Err(CliError::new(
            "Merge bitmap source file only supported with --merge",
        ));
    }
    let [filename, bitmap] = p.operands.as_slice() else {
        return Err(CliError::new("Expecting filename and bitmap name"));
    };
    let img = open(filename, p.image_opts, format_of(&p.fmt)?, true)?;
    let src = match &p.src_file {
        Some(f) => Some(open(f, false, format_of(&p.src_fmt)?, false)?),
        None => None,
    };
    let Some(q) = img.as_qcow2() else {
        return Err(CliError::new(format!(
            "Operation {} on bitmap {bitmap} failed: Block format '{}' used by node '#block000' does not support feature 'dirty bitmaps'",
            p.actions[0].op(),
            img.format().name()
        )));
    };
    let t = q
        .bitmap_tracker()
        .ok_or_else(|| CliError::new("image opened without bitmap support"))?;
    // The granularity option is an optional value (0: the default).
    let granularity = p.granularity.filter(|&g| g != 0);
    for act in &p.actions {
        let r = match act {
            Action::Add => t.add(q, bitmap, granularity, false),
            Action::Remove => t.remove(q, bitmap),
            Action::Clear => t.clear(bitmap),
            Action::Enable => t.set_enabled(bitmap, true),
            Action::Disable => t.set_enabled(bitmap, false),
            Action::Merge(from) => {
                let s = match &src {
                    Some(si) => match si.as_qcow2() {
                        Some(sq) => qcow2::bitmap::edit::source_from(sq, from),
                        None => Err(qcow2::Error::InvalidArgument(format!(
                            "Dirty bitmap '{from}' not found"
                        ))),
                    },
                    None => qcow2::bitmap::edit::source_from(q, from),
                };
                s.and_then(|s| t.merge(q, bitmap, &s))
            }
        };
        if let Err(e) = r {
            let msg = match e {
                qcow2::Error::InvalidArgument(m) => m,
                e => e.to_string(),
            };
            return Err(CliError::new(format!(
                "Operation {} on bitmap {bitmap} failed: {msg}",
                act.op()
            )));
        }
    }
    drop(src);
    q.store_bitmaps().map_err(|e| {
        CliError::new(format!(
            "Lost persistent bitmaps during inactivation of node '#block000': {e}"
        ))
    })?;
    img.flush()?;
    Ok(0)
}

// ----- convert --bitmaps -----

/// The option rule qemu-img checks before opening anything.
pub fn convert_flags(bitmaps: bool, skip_broken: bool) -> Result<(), CliError> {
    if skip_broken && !bitmaps {
        return Err(CliError::new(
            "Use of --skip-broken-bitmaps requires --bitmaps",
        ));
    }
    Ok(())
}

/// With `bitmaps`: the source's bitmaps to copy (`convert --bitmaps`),
/// checked as qemu-img checks them before converting.
pub fn convert_check(
    srcs: &[std::sync::Arc<dyn qcow2::Image>],
    bitmaps: bool,
    skip_broken: bool,
) -> Result<Option<Vec<qcow2::bitmap::DirEntry>>, CliError> {
    if !bitmaps {
        return Ok(None);
    }
    if srcs.len() > 1 {
        return Err(CliError::new(
            "Copying bitmaps only possible with single source",
        ));
    }
    let Some(q) = srcs[0].as_qcow2().filter(|q| q.header().version >= 3) else {
        return Err(CliError::new("Source lacks bitmap support"));
    };
    let list = qcow2::bitmap::track::read_directory(q.storage(), &q.header())?
        .map(|(_, d)| d)
        .unwrap_or_default();
    // QEMU walks its bitmaps newest first: the last inconsistent one in
    // the directory is the one it names.
    if !skip_broken {
        if let Some(d) = list.iter().rev().find(|d| d.in_use()) {
            return Err(CliError::new(format!(
                "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
                d.name_str()
            )));
        }
    }
    Ok(Some(list))
}

/// With bitmaps to copy, the target must store them (qcow2 version 3).
pub fn convert_target_check(copy: bool, target: &dyn qcow2::Image) -> Result<(), CliError> {
    let ok = !copy
        || target
            .as_qcow2()
            .is_some_and(|q| q.header().version >= 3 && q.bitmap_tracker().is_some());
    if !ok {
        return Err(CliError::new(format!(
            "Format driver '{}' does not support bitmaps",
            target.format().name()
        )));
    }
    Ok(())
}

/// After the data: creates each bitmap in the target with its
/// granularity and state, and merges the source's bits into it.
pub fn convert_copy(
    list: &Option<Vec<qcow2::bitmap::DirEntry>>,
    src: &dyn qcow2::Image,
    target: &dyn qcow2::Image,
) -> Result<(), CliError> {
    let (Some(list), Some(sq), Some(tq)) = (list, src.as_qcow2(), target.as_qcow2()) else {
        return Ok(());
    };
    let t = tq
        .bitmap_tracker()
        .ok_or_else(|| CliError::new("target opened without bitmap support"))?;
    // Warnings in QEMU's order (newest first); the copies keep the
    // directory's order, as QEMU's target ends up with.
    for d in list.iter().rev().filter(|d| d.in_use()) {
        eprintln!(
            "{}: warning: Skipping inconsistent bitmap '{}'",
            crate::prog_name(),
            d.name_str()
        );
    }
    for d in list.iter().filter(|d| !d.in_use()) {
        let name = d.name_str();
        t.add(tq, &name, Some(d.granularity()), !d.auto())
            .map_err(|e| CliError::new(format!("Failed to create bitmap {name}: {e}")))?;
        let merged =
            qcow2::bitmap::edit::source_from(sq, &name).and_then(|s| t.merge(tq, &name, &s));
        if let Err(e) = merged {
            let _ = t.remove(tq, &name);
            return Err(CliError::new(format!(
                "Failed to populate bitmap {name}: {e}"
            )));
        }
    }
    tq.store_bitmaps()?;
    Ok(())
}
