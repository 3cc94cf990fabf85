//! `rimg check`: qemu-img check's output, JSON shape and exit codes
//! (0 clean, 1 check could not complete, 2 corruptions, 3 leaks only,
//! 63 format without checks). qcow2 is checked and repaired; vdi and
//! vmdk are checked only (a repair gets 63, as with qemu-img).

use clap::{Args, ValueEnum};
use qcow2::{CheckReport, Format, OpenOptions, Repair};
use serde_json::{json, Map, Value};

use crate::info::Output;
use crate::CliError;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RepairArg {
    Leaks,
    All,
}

#[derive(Args)]
pub struct CheckArgs {
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Repair: leaks, or all (refcounts rebuilt, invalid entries and
    /// COPIED flags corrected; every change is reported)
    #[arg(short = 'r', long = "repair", value_enum)]
    repair: Option<RepairArg>,
    /// Cache mode (accepted for compatibility)
    #[arg(short = 'T', long = "cache", value_name = "SRC_CACHE")]
    cache: Option<String>,
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The filename is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    filename: String,
}

pub fn run(a: CheckArgs) -> Result<u8, CliError> {
    let _ = &a.cache;
    let format = crate::common::parse_format(&a.format)?;
    let repair = match a.repair {
        None => Repair::None,
        Some(RepairArg::Leaks) => Repair::Leaks,
        Some(RepairArg::All) => Repair::All,
    };
    // A repair may open images marked corrupt, and must see a dirty
    // image's refcounts as they are.
    let q2 = qcow2::Qcow2Options {
        repair: repair != Repair::None,
        ..Default::default()
    };
    let (path, mut opts) = crate::blockopts::open_options(
        &a.filename,
        a.image_opts,
        OpenOptions {
            writable: repair != Repair::None,
            format,
            // qemu-img opens the chain: a backing file that does not open
            // fails the check.
            force_share: a.force_share,
            for_check: true,
            qcow2: q2,
            ..Default::default()
        },
    )?;
    // qemu-img opens a foreign image for writing to repair it, then
    // finds it has no repair (or, vhdx, repairs nothing): rimg opens it
    // read-only and says the same.
    let foreign = |f: Format| matches!(f, Format::Vdi | Format::Vpc | Format::Vmdk | Format::Vhdx);
    let read_only = match opts.format {
        Some(f) => foreign(f),
        None => qcow2::probe(&path).is_ok_and(foreign),
    };
    if read_only {
        opts.writable = false;
    }
    let img = match qcow2::open(&path, &opts) {
        Err(qcow2::Error::SnapshotTableLimit { check, .. }) if repair == Repair::None => {
            // qemu-img opens the image for the check anyway and fails
            // there, with EFBIG.
            let p = crate::prog_name();
            eprintln!("{p}: {check}");
            eprintln!("{p}: Check failed: File too large");
            return Ok(1);
        }
        r => r.map_err(|e| CliError::new(format!("Could not open '{}': {e}", a.filename)))?,
    };
    let no_checks = || CliError {
        msg: "This image format does not support checks".into(),
        code: 63,
    };
    if let Some(rep) = qcow2::foreign::check(img.as_ref()) {
        // QEMU's vhdx check runs the same with -r (it repairs nothing).
        if repair != Repair::None && img.format() != Format::Vhdx {
            if let Some(conflict) = extent_lock_conflict(img.as_ref()) {
                // qemu-img's writable open of a descriptor that lists one
                // file twice conflicts with its own locks.
                return Err(CliError::new(format!(
                    "Could not open '{}': {conflict}",
                    a.filename
                )));
            }
            return Err(no_checks());
        }
        let rep = rep.map_err(|e| CliError::new(format!("Check failed: {e}")))?;
        for m in &rep.messages {
            eprintln!("{m}");
        }
        if let Some(why) = &rep.failed {
            // The check stopped (vmdk): no report, as qemu-img.
            eprintln!("{}: Check failed: {why}", crate::prog_name());
            return Ok(1);
        }
        print_report(&a, &rep, repair, img.format());
        return Ok(if rep.corruptions > 0 { 2 } else { 0 });
    }
    let Some(q) = img.as_qcow2() else {
        return Err(no_checks());
    };
    let rep = match q.check_repair(repair) {
        Ok(r) => r,
        Err(qcow2::Error::Bitmap(qcow2::bitmap::BitmapError::TableLoad(_))) => {
            // qemu-img's check stops at a bitmap table it cannot load
            // (EINVAL), with no report.
            eprintln!("{}: Check failed: Invalid argument", crate::prog_name());
            return Ok(1);
        }
        Err(e) => {
            // The check could not complete.
            eprintln!("{}: Check failed: {e}", crate::prog_name());
            let r = CheckReport {
                check_errors: 1,
                ..Default::default()
            };
            print_report(&a, &r, repair, img.format());
            return Ok(1);
        }
    };
    for m in &rep.messages {
        eprintln!("{m}");
    }
    if let Some(why) = &rep.failed {
        eprintln!("{}: Check failed: {why}", crate::prog_name());
        return Ok(1);
    }
    print_report(&a, &rep, repair, img.format());
    Ok(if rep.check_errors > 0 {
        1
    } else if rep.corruptions > 0 {
        2
    } else if rep.leaks > 0 {
        3
    } else {
        0
    })
}

fn print_report(a: &CheckArgs, r: &CheckReport, repair: Repair, format: Format) {
    match a.output {
        Output::Json => println!(
            "{}",
            crate::json::to_qemu_string(&to_json(&a.filename, r, format))
        ),
        Output::Human if !a.quiet => print!("{}", to_human(r, repair)),
        Output::Human => {}
    }
}

fn to_json(filename: &str, r: &CheckReport, format: Format) -> Value {
    let mut m = Map::new();
    let opt = |m: &mut Map<String, Value>, k: &str, v: u64| {
        if v != 0 {
            m.insert(k.into(), json!(v));
        }
    };
    opt(&mut m, "image-end-offset", r.image_end_offset);
    opt(&mut m, "total-clusters", r.total_clusters);
    opt(&mut m, "corruptions", r.corruptions);
    opt(&mut m, "leaks", r.leaks);
    opt(&mut m, "corruptions-fixed", r.corruptions_fixed);
    opt(&mut m, "leaks-fixed", r.leaks_fixed);
    m.insert("check-errors".into(), json!(r.check_errors));
    opt(&mut m, "allocated-clusters", r.allocated_clusters);
    opt(&mut m, "fragmented-clusters", r.fragmented_clusters);
    opt(&mut m, "compressed-clusters", r.compressed_clusters);
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!(format.name()));
    Value::Object(m)
}

fn to_human(r: &CheckReport, repair: Repair) -> String {
    let mut s = String::new();
    if repair != Repair::None && (r.leaks_fixed > 0 || r.corruptions_fixed > 0) {
        s += "The following inconsistencies were found and repaired:\n\n";
        s += &format!("    {} leaked clusters\n", r.leaks_fixed);
        s += &format!("    {} corruptions\n\n", r.corruptions_fixed);
        s += "Double checking the fixed image now...\n";
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s += "No errors were found on the image.\n";
    } else {
        if r.corruptions > 0 {
            s += &format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            s += &format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            s += &format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            );
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let alloc = r.allocated_clusters as f64;
        s += &format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            alloc * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / alloc,
            r.compressed_clusters as f64 * 100.0 / alloc
        );
    }
    if r.image_end_offset != 0 {
        s += &format!("Image end offset: {}\n", r.image_end_offset);
    }
    s
}

/// The lock conflict qemu-img's writable open of a VMDK descriptor runs
/// into when it names one file twice (or itself), in its words: opening a
/// sparse extent (data and tables) conflicts with an earlier sparse one
/// or the descriptor ("write") or flat one ("resize"), a flat extent
/// (data only) with an earlier sparse one or the descriptor (shared
/// "resize"), each named as the later one; two flat extents conflict
/// only once all are open ("resize", named as the earlier).
fn extent_lock_conflict(img: &dyn qcow2::Image) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let v = img.as_any().downcast_ref::<qcow2::Vmdk>()?;
    let l = v.layout();
    let id = |st: &qcow2::storage::Storage| {
        let md = st.file()?.metadata().ok()?;
        Some((md.dev(), md.ino()))
    };
    // The descriptor first (None: it holds tables, as a sparse one),
    // then each extent file with whether it is flat.
    let mut opened = vec![(id(img.storage())?, false, img.storage())];
    let mut flat_pair = None;
    for (e, st) in l.extents_info().iter().zip(l.extent_files()) {
        let flat = matches!(e.format, "FLAT" | "VMFS");
        let me = id(st)?;
        for &(other, other_flat, other_st) in &opened {
            if other != me {
                continue;
            }
            let lock = match (other_flat, flat) {
                (true, true) => {
                    flat_pair.get_or_insert(other_st);
                    continue;
                }
                (false, false) => "\"write\"",
                (true, false) => "\"resize\"",
                (false, true) => "shared \"resize\"",
            };
            return Some(lock_message(lock, st));
        }
        opened.push((me, flat, st));
    }
    flat_pair.map(|st| lock_message("\"resize\"", st))
}

fn lock_message(lock: &str, st: &qcow2::storage::Storage) -> String {
    format!(
        "Failed to get {lock} lock\nIs another process using the image [{}]?",
        st.path().display()
    )
}
