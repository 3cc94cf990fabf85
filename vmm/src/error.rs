//! The VMM's one error type: every failure names what it was doing.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("cannot open kernel {path}: {source}")]
    Kernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load kernel {path}: {msg}")]
    KernelLoad { path: PathBuf, msg: String },
    #[error("cannot read initrd {path}: {source}")]
    Initrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitrdTooBig { size: u64, limit: u64 },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vhost-user backend at {socket}: {what}: {msg}")]
    Vhost {
        socket: PathBuf,
        what: &'static str,
        msg: String,
    },
    /// The connection broke (the backend went away) during an exchange:
    /// a device that reconnects waits for the backend to come back.
    #[error("vhost-user backend at {socket}: {what}: connection lost ({msg})")]
    BackendLost {
        socket: PathBuf,
        what: &'static str,
        msg: String,
    },
    #[error(transparent)]
    Seccomp(#[from] rimg_seccomp::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the backend went away, rather than refused or broke the
    /// protocol.
    pub fn backend_lost(&self) -> bool {
        matches!(self, Error::BackendLost { .. })
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `.kvm("what")` on KVM results.
pub trait KvmContext<T> {
    fn kvm(self, what: &'static str) -> Result<T>;
}

impl<T> KvmContext<T> for std::result::Result<T, kvm_ioctls::Error> {
    fn kvm(self, what: &'static str) -> Result<T> {
        self.map_err(|source| Error::Kvm { what, source })
    }
}

/// `.io_ctx(|| "what")` on I/O results.
pub trait IoContext<T> {
    fn io_ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|source| Error::Io {
            what: what().into(),
            source,
        })
    }
}
