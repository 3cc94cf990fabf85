//! The daemon's life: open the image (taking QEMU-compatible locks), then
//! serve frontends with the shared connection loop (`rimg_vhost_server`):
//! each connection gets a fresh backend on the same image; a disconnect
//! drains in-flight requests and flushes. SIGTERM or SIGINT ends the
//! current connection; the image is flushed and `run` returns.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::encrypt::Secret;
use qcow2::{Format, Image, OpenOptions, Qcow2Options};

use log::{debug, warn};

use crate::backend::BlkBackend;
use crate::config::DeviceConfig;
use crate::control::BlkControl;
use crate::worker::DataFiles;
use rimg_vhost_server::Control;

/// Everything the daemon is started with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub socket: PathBuf,
    pub image: PathBuf,
    pub format: Option<Format>,
    /// Password of an encrypted image (`--key-file`); its Debug form
    /// never shows the bytes.
    pub key: Option<Secret>,
    pub readonly: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: String,
    pub direct: bool,
    pub l2_cache_bytes: Option<u64>,
    /// Busy-polling time of each worker, in microseconds (0: none).
    pub poll_us: u32,
    /// Keep copy-on-write mappings in the image's intent log rather than
    /// syncing each fill (`Qcow2Options::intent_log`).
    pub intent_log: bool,
    /// The control socket to create (`--control`).
    pub control: Option<PathBuf>,
    /// The user to become once set up (`--user`).
    pub user: Option<rimg_vhost_server::seccomp::RunAs>,
    /// What a syscall outside the daemon's seccomp list does (or no
    /// filter).
    pub seccomp: rimg_vhost_server::SeccompAction,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Image(PathBuf, qcow2::Error),
    #[error("{0}: the image is encrypted ({1}): give its password with --key-file FILE")]
    KeyRequired(PathBuf, &'static str),
    #[error("{0}: cannot open for O_DIRECT: {1}")]
    Direct(PathBuf, std::io::Error),
    #[error(transparent)]
    Serve(#[from] rimg_vhost_server::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// The format the image is served as: the one given, else the one
/// probed, as QEMU probes it. A disk a guest encrypted whole with LUKS
/// must be served with `--format raw` (probed, it is a LUKS volume, as in
/// QEMU, and a guest of a probed raw disk cannot write a LUKS header to
/// its first sector: see `Image::guards_first_sector`).
fn served_format(image: &Path, given: Option<Format>) -> qcow2::Result<Format> {
    if let Some(f) = given {
        return Ok(f);
    }
    // As probed: a LUKS volume then needs its key, and a foreign image
    // is served as what it is (read-only), never as raw bytes its guest
    // could rewrite into a header naming other files.
    qcow2::probe(image)
}

/// What the image served as `format` is encrypted with, when it cannot be
/// opened without a password. Asked only when none was given, so that the
/// error names the daemon's option (the engine's names QEMU's).
fn encryption_of(image: &Path, format: Format) -> qcow2::Result<Option<&'static str>> {
    Ok(match format {
        Format::Raw | Format::Vdi | Format::Vpc | Format::Vmdk | Format::Vhdx => None,
        Format::Luks => Some("luks"),
        Format::Qcow2 => {
            let st = qcow2::storage::Storage::open(qcow2::open::host_path(image), false)?;
            // The header and its extensions lie in the first cluster.
            let len = st.len()?.min(1 << qcow2::header::MAX_CLUSTER_BITS);
            let mut first = vec![0u8; len as usize];
            st.read_at(&mut first, 0)?;
            match qcow2::Header::parse(&first)?.crypt_method {
                qcow2::header::crypt::NONE => None,
                qcow2::header::crypt::LUKS => Some("qcow2, encrypt.format=luks"),
                _ => Some("qcow2, encrypt.format=aes"),
            }
        }
    })
}

/// One line for the repair of an image a killed daemon left dirty (the
/// clusters it had reserved leak, if it had any): the leak count, and
/// whatever else the check said (a corruption would be worth every line).
fn log_open_repair(image: &std::path::Path, lines: &[String]) {
    let per_cluster =
        |l: &&String| l.starts_with("Leaked cluster") || l.starts_with("Repairing cluster");
    let leaks = lines
        .iter()
        .filter(|l| l.starts_with("Leaked cluster"))
        .count();
    warn!(
        "{}: not closed cleanly; repaired as it was opened ({leaks} leaked clusters)",
        image.display()
    );
    for l in lines
        .iter()
        .filter(|l| !per_cluster(l) && !l.trim().is_empty())
    {
        warn!("{}: {l}", image.display());
    }
}

/// Serves the image until a termination signal; returns after the final
/// flush.
pub fn run(mut cfg: ServerConfig) -> Result<(), Error> {
    debug!("{cfg:?}");
    if cfg.num_queues == 0 || cfg.num_queues > 64 {
        return Err(Error::Config("--num-queues must be 1..=64".into()));
    }
    if !cfg.queue_size.is_power_of_two() || cfg.queue_size > 1024 {
        return Err(Error::Config(
            "--queue-size must be a power of two up to 1024".into(),
        ));
    }
    // A restarted daemon must find every write it answered (issue 20).
    let mut qopts = Qcow2Options {
        metadata_persistence: qcow2::MetadataPersistence::ProcessDeath,
        intent_log: cfg.intent_log,
        ..Default::default()
    };
    if let Some(b) = cfg.l2_cache_bytes {
        qopts.l2_cache_bytes = b;
    }
    let format =
        served_format(&cfg.image, cfg.format).map_err(|e| Error::Image(cfg.image.clone(), e))?;
    // The workers write guest data where the engine's split data path
    // maps it, which only raw, qcow2 and luks images have.
    if !cfg.readonly && !matches!(format, Format::Raw | Format::Qcow2 | Format::Luks) {
        return Err(Error::Config(format!(
            "{} images are served read-only (use --readonly)",
            format.name()
        )));
    }
    let key_given = cfg.key.is_some();
    if !key_given {
        if let Some(how) =
            encryption_of(&cfg.image, format).map_err(|e| Error::Image(cfg.image.clone(), e))?
        {
            return Err(Error::KeyRequired(cfg.image.clone(), how));
        }
    }
    // Moved, not copied: the engine keeps what it needs of it.
    qopts.encrypt_key = cfg.key.take();
    // The format as given: a probed raw image has its first sector
    // guarded by the engine (see `Image::guards_first_sector`).
    let img: Arc<dyn Image> = qcow2::open(
        &cfg.image,
        &OpenOptions {
            writable: !cfg.readonly,
            format: cfg.format,
            qcow2: qopts,
            ..Default::default()
        },
    )
    .map_err(|e| Error::Image(cfg.image.clone(), e))?;
    if img.guards_first_sector() {
        warn!("{}", qcow2::raw::probed_warning(&cfg.image));
    }
    // A daemon killed before leaves its image dirty; the open repaired it.
    if let Some(q) = img.as_qcow2() {
        if let Some(lines) = q.take_open_messages() {
            log_open_repair(&cfg.image, &lines);
        }
    }
    // The workers' io_uring needs the data's host file.
    if img.data_storage().file().is_none() {
        return Err(Error::Config(format!(
            "{}: guest data on an NBD server cannot be served here (the queue workers \
             need a host file)",
            cfg.image.display()
        )));
    }
    // Encrypted guest data is never moved by the workers' io_uring: the
    // engine decrypts it (see `worker::engine_io`).
    let in_clear = img.data_in_clear();
    if in_clear && key_given {
        warn!("--key-file ignored: the image is not encrypted");
    }
    // Guest data moves between guest memory and the file that holds it at
    // the offsets the engine maps: the image file, or its external data
    // file (the engine keeps its own metadata in the image file).
    let data = img.data_storage();
    let data_path = data.path().to_path_buf();
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let small_clusters = img.cluster_size().filter(|&cs| cs < page);
    let direct = if let (true, Some(cluster_size)) = (cfg.direct, small_clusters) {
        // Guest data would share pages with other clusters and with
        // metadata, which the engine writes through the page cache: the
        // kernel cannot keep both paths coherent on one page.
        warn!(
            "--direct ignored: {cluster_size}-byte clusters share {page}-byte pages with each \
             other and with metadata; guest data goes through the page cache"
        );
        None
    } else if cfg.direct {
        // Only the file holding guest data is opened with O_DIRECT: with
        // a data file, the image file holds metadata alone, which the
        // engine keeps writing through the page cache.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(!cfg.readonly)
            .custom_flags(libc::O_DIRECT)
            .open(&data_path)
            .map_err(|e| Error::Direct(data_path.clone(), e))?;
        qcow2::storage::check_direct_alignment(&f)
            .map_err(|e| Error::Direct(data_path.clone(), e))?;
        // The engine's own guest-data writes (copy-on-write fill, partial
        // write-zeroes, and all of an encrypted image's) bypass the cache
        // too; its reads go through the cache, which O_DIRECT writes keep
        // coherent.
        let engine = f
            .try_clone()
            .map_err(|e| Error::Direct(data_path.clone(), e))?;
        data.set_direct(engine);
        // The workers move no encrypted data themselves.
        in_clear.then_some(f)
    } else {
        None
    };
    // Asked now: fstatfs is on no seccomp list.
    let reads_here = direct.is_none()
        && data
            .file()
            .is_some_and(rimg_vhost_server::inline::reads_here);
    let files = Arc::new(DataFiles { direct, reads_here });
    let opt_io = img
        .cluster_size()
        .map(|cs| cs as u32)
        .unwrap_or(4096)
        .max(512);
    let file_id = std::fs::metadata(qcow2::open::host_path(&cfg.image))
        .ok()
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        });
    let control = Arc::new(BlkControl::new(
        img.clone(),
        cfg.num_queues.into(),
        cfg.readonly,
        file_id,
    ));
    let dev = DeviceConfig {
        capacity: control.capacity.clone(),
        num_queues: cfg.num_queues,
        queue_size: cfg.queue_size,
        readonly: cfg.readonly,
        serial: cfg.serial.as_bytes().iter().copied().take(20).collect(),
        opt_io_size: opt_io,
        blk_size: 512,
        poll: crate::worker::Polling::new(std::time::Duration::from_micros(cfg.poll_us.into())),
    };

    let name = cfg.socket.display().to_string();
    let announce = || {
        eprintln!(
            "rimg-vhost-blk: serving {} ({}, {} bytes) on {name}",
            cfg.image.display(),
            img.format().name(),
            img.size(),
        )
    };
    let commands = cfg.control.clone().map(|path| {
        // Published for `rimg resize IMAGE`, which then asks this daemon
        // instead of failing on the image's lock. Not for a read-only
        // disk: it cannot be resized, and several read-only daemons may
        // serve one image. Nor under --user: the link would be in the
        // starting user's runtime directory, where the daemon could not
        // remove it at exit.
        let links = (!cfg.readonly && cfg.user.is_none())
            .then(|| std::fs::metadata(qcow2::open::host_path(&cfg.image)).ok())
            .flatten()
            .map(|m| qcow2::paths::control_link(&m))
            .and_then(|link| match crate::control::publish_link(&link, &path) {
                Ok(()) => Some(link),
                Err(e) => {
                    warn!("{}: not published: {e}", link.display());
                    None
                }
            });
        Control {
            path,
            commands: control.clone(),
            links: links.into_iter().collect(),
        }
    });
    // An image of the chain on an NBD server (a backing file's URL).
    let on_nbd = {
        let mut cur = Some(img.clone());
        let mut any = false;
        while let Some(i) = cur {
            any |= i.storage().nbd().is_some();
            cur = i.backing().cloned();
        }
        any
    };
    rimg_vhost_server::serve(
        "rimg-vhost-blk",
        &cfg.socket,
        commands,
        cfg.seccomp,
        &rimg_vhost_server::Sandbox {
            run_as: cfg.user.clone(),
            ..crate::seccomp::sandbox(on_nbd)
        },
        announce,
        |mem| {
            Ok(Arc::new(BlkBackend::new(
                img.clone(),
                files.clone(),
                dev.clone(),
                mem,
                &control.stats,
            )?))
        },
    )?;
    // Flushed, and the clusters reserved ahead given back, here rather
    // than when the last reference is dropped (a thread may still hold
    // one as the process ends).
    img.finish()
        .map_err(|e| Error::Image(cfg.image.clone(), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_is_served_as_probed_unless_a_format_is_given() {
        let p = std::env::temp_dir().join(format!("rimg-served-format-{}", std::process::id()));
        let mut disk = vec![0u8; 1 << 20];
        disk[..6].copy_from_slice(b"LUKS\xba\xbe");
        std::fs::write(&p, &disk).unwrap();
        assert_eq!(qcow2::probe(&p).unwrap(), Format::Luks);
        // Probed, a LUKS header is LUKS (its key is then needed); only
        // --format raw serves those bytes raw.
        assert_eq!(served_format(&p, None).unwrap(), Format::Luks);
        assert_eq!(served_format(&p, Some(Format::Raw)).unwrap(), Format::Raw);
        let q = p.with_extension("qcow2");
        qcow2::create(
            &q,
            &qcow2::CreateOptions {
                size: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(served_format(&q, None).unwrap(), Format::Qcow2);
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(&q);
    }

    #[test]
    fn encryption_is_told_from_the_header() {
        let p = std::env::temp_dir().join(format!("rimg-encryption-of-{}", std::process::id()));
        let create = |encrypt| {
            qcow2::create(
                &p,
                &qcow2::CreateOptions {
                    size: 1 << 20,
                    encrypt,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        create(None);
        assert_eq!(encryption_of(&p, Format::Qcow2).unwrap(), None);
        assert_eq!(encryption_of(&p, Format::Raw).unwrap(), None);
        // What the file holds does not matter for a luks volume: it
        // always needs its password.
        assert_eq!(encryption_of(&p, Format::Luks).unwrap(), Some("luks"));
        let _ = std::fs::remove_file(&p);
        let key = Secret(b"pw".to_vec());
        create(Some((qcow2::encrypt::EncryptFormat::Aes, key)));
        assert_eq!(
            encryption_of(&p, Format::Qcow2).unwrap(),
            Some("qcow2, encrypt.format=aes")
        );
        let _ = std::fs::remove_file(&p);
    }
}
