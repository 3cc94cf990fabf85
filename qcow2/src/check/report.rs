//! What a check found. Its own module, below every format: the checks
//! of formats other than qcow2 report in the same terms without naming
//! the qcow2 check.

/// What a check found, in qemu-img check's terms.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems that may lose data: refcounts too low, invalid entries,
    /// wrong COPIED flags.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Problems that stopped parts of the check.
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    /// One line per problem (and per repair), as qemu-img prints them.
    pub messages: Vec<String>,
    pub allocated_clusters: u64,
    pub total_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    pub image_end_offset: u64,
    /// The check could not complete: qemu-img's "Check failed: " text
    /// (an errno's), after the messages; no report is printed then.
    pub failed: Option<String>,
}
