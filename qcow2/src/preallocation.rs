//! How much of an image's space is set up ahead of its data, at create
//! and at resize (qemu-img's `preallocation=` option).

/// `off`: nothing; `metadata`: qcow2 tables and cluster allocations, no
/// data; `falloc`: file space reserved; `full`: every byte written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    #[default]
    Off,
    Metadata,
    Falloc,
    Full,
}

impl Preallocation {
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => return None,
        })
    }
}
