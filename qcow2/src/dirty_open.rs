//! Opening a dirty image for writing repairs it as QEMU does.
//!
//! With lazy refcounts an image left dirty (the dirty bit set: refcounts
//! may be behind the tables) is repaired when opened for writing. QEMU
//! runs its full check with repairs and prints the check's lines on
//! stderr; scripts (iotest 061) read them, and the repaired layout. rimg
//! runs its check (whose words and rebuild layout are qemu-img's) and
//! keeps the lines for the tool to print ([`crate::Qcow2::take_open_messages`]).

use crate::check::{check, Repair};
use crate::error::{Error, Result};
use crate::qcow::{MetaCtx, Qcow2};

/// Repairs the dirty image; returns the check's lines and whether the
/// image is clean now (only then may the dirty bit go, as in QEMU).
pub(crate) fn repair(q: &Qcow2, ctx: &mut MetaCtx<'_>) -> Result<(Vec<String>, bool)> {
    let rep = check(q, ctx, Repair::All)?;
    if rep.check_errors > 0 {
        return Err(Error::Corrupt(format!(
            "Could not repair dirty image: {}",
            rep.messages.last().map_or("check failed", |m| m.as_str())
        )));
    }
    let clean = rep.corruptions == 0;
    Ok((rep.messages, clean))
}
