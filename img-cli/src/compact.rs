//! `rimg compact`: shrinks a qcow2 image in place (qemu-img has no such
//! command; `qemu-img convert` needs a second copy). How clusters move
//! and why a kill at any moment leaks at most: `qcow2::qcow::compact`.

use clap::Args;

use crate::common::{parse_format, sentence};
use crate::progress::{Progress, ProgressOpt};
use crate::CliError;

#[derive(Args)]
pub struct CompactArgs {
    /// Image format (probed when absent; only qcow2 can be compacted)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// The filename is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// First make data clusters that hold only zeros zero clusters
    #[arg(long = "zero-detect")]
    zero_detect: bool,
    /// Quiet: print nothing on success
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[command(flatten)]
    progress: ProgressOpt,
    /// Clusters moved per batch (each batch syncs four to six times);
    /// for tests, which cut between any two moves with 1
    #[arg(long = "batch-clusters", hide = true, default_value_t = qcow2::qcow::DEFAULT_BATCH,
          value_parser = clap::value_parser!(usize))]
    batch_clusters: usize,
    filename: String,
}

pub fn run(a: CompactArgs) -> Result<u8, CliError> {
    // The bitmaps stay on disk as they are (`Qcow2Options::bitmaps_on_disk`).
    let opts = qcow2::OpenOptions {
        writable: true,
        format: parse_format(&a.format)?,
        qcow2: qcow2::Qcow2Options {
            bitmaps_on_disk: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let (path, opts) = crate::blockopts::open_options(&a.filename, a.image_opts, opts)?;
    let img = qcow2::open(&path, &opts)
        .map_err(|e| CliError::new(format!("Could not open '{}': {e}", a.filename)))?;
    crate::blockopts::print_open_messages(img.as_ref());
    let Some(q) = img.as_qcow2() else {
        return Err(CliError::new(format!(
            "compact: '{}' is not a qcow2 image: only qcow2 images can be compacted",
            a.filename
        )));
    };
    let target = a.progress.target(a.quiet);
    let mut bar: Option<Progress> = None;
    let mut shown = 0;
    let copts = qcow2::qcow::CompactOptions {
        zero_detect: a.zero_detect,
        batch: a.batch_clusters,
    };
    let r = q.compact(&copts, &mut |done, total| {
        let p = bar.get_or_insert_with(|| Progress::new(target, "Compacting", total.max(1), 1.0));
        p.add(done - shown);
        shown = done;
    });
    // Nothing to move: the progress still starts and ends.
    let p = bar.unwrap_or_else(|| {
        let p = Progress::new(target, "Compacting", 1, 1.0);
        if r.is_ok() {
            p.add(1);
        }
        p
    });
    p.finish();
    let s = r.map_err(|e| CliError::new(sentence(&format!("compact: {e}"))))?;
    img.finish()
        .map_err(|e| CliError::new(sentence(&format!("compact: {e}"))))?;
    if !a.quiet {
        println!(
            "Image compacted: {} clusters moved, {} zero clusters made, {} empty L2 tables and {} leaked clusters freed; {} -> {} bytes",
            s.moved, s.zeroed, s.tables_dropped, s.leaks_freed, s.len_before, s.len_after
        );
    }
    Ok(0)
}
