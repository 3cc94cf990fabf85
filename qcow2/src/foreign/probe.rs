//! Recognising foreign formats from the first bytes of a file, as QEMU's
//! drivers' probes do.

use crate::image::Format;

/// Bytes of the file the probes look at: QEMU's probe buffer
/// (BLOCK_PROBE_BUF_SIZE), so that a signature further on is not seen
/// here either. A shorter file is zero-padded, as in that fixed-size
/// buffer: a 100-byte file with the VDI signature probes as VDI there
/// too (and fails to open).
pub const PROBE_LEN: usize = 512;

/// Whether some QEMU format driver other than raw would claim a file
/// whose first [`PROBE_LEN`] bytes are `first` (QEMU's bdrv_probe_all):
/// the formats rimg reads, and QEMU's others (qcow version 1, QED,
/// Bochs, cloop, Parallels) by their magic. What the first sector of a
/// raw image whose format was probed may never become: the next probe
/// would open it as that format, with whatever backing file or extents
/// its writer named (QEMU's raw driver refuses such writes).
pub fn claimed_by_a_format(first: &[u8]) -> bool {
    let starts = |magic: &[u8]| first.starts_with(magic);
    first.starts_with(&crate::header::MAGIC.to_be_bytes())
        || crate::luks_image::is_luks(first)
        || probe(first).is_some()
        || qemu_only_format(first).is_some()
        // Broader than QEMU's probes (magic alone): one write more may
        // complete the rest of such a header.
        || starts(b"WithoutFreeSpace")
        || starts(b"WithouFreSpacExt")
        || starts(b"Bochs Virtual HD Image\0")
        || starts(b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0")
}

/// The QEMU format rimg does not read that QEMU's own probe finds in
/// `first` (the first [`PROBE_LEN`] bytes, zero-padded), exactly as it
/// decides: QED (its magic), Parallels (a signature and version 2),
/// Bochs (magic, "Redolog", "Growing", version 1 or 2), cloop (its
/// whole script line).
pub fn qemu_only_format(first: &[u8]) -> Option<&'static str> {
    let at = |off: usize, bytes: &[u8]| first.get(off..off + bytes.len()) == Some(bytes);
    let le32 = |off: usize| {
        first
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    if at(0, b"QED\0") {
        Some("qed")
    } else if (at(0, b"WithoutFreeSpace") || at(0, b"WithouFreSpacExt")) && le32(16) == Some(2) {
        Some("parallels")
    } else if at(0, b"Bochs Virtual HD Image\0")
        && at(32, b"Redolog\0")
        && at(48, b"Growing\0")
        && matches!(le32(64), Some(0x0002_0000 | 0x0001_0000))
    {
        Some("bochs")
    } else if at(
        0,
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n",
    ) {
        Some("cloop")
    } else {
        None
    }
}

/// The foreign format whose signature `first` (the first [`PROBE_LEN`]
/// bytes of the file, zero-padded) carries, if any.
pub fn probe(first: &[u8]) -> Option<Format> {
    // VHDX: its file identifier (a VDI signature in its creator text
    // loses, as in QEMU).
    if super::vhdx::probe(first) {
        return Some(Format::Vhdx);
    }
    // VHD: the footer's cookie at 0 (dynamic disks; a fixed disk has its
    // footer at the end only and probes as raw). Tested before VDI, whose
    // signature could sit in a footer's checksum field: QEMU prefers vpc.
    if super::vpc::probe(first) {
        return Some(Format::Vpc);
    }
    // VDI: the signature after the 64-byte text of the header
    // (VirtualBox's VDIPREHEADER, as QEMU's vdi_probe reads it).
    if let Some(sig) = first.get(super::vdi::SIGNATURE_AT..super::vdi::SIGNATURE_AT + 4) {
        if u32::from_le_bytes(sig.try_into().unwrap()) == super::vdi::SIGNATURE {
            return Some(Format::Vdi);
        }
    }
    // VMDK: a sparse magic at 0, or a descriptor's text.
    if super::vmdk::probe(first) {
        return Some(Format::Vmdk);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At open, only what QEMU's own probe would open as that format is
    /// refused; a raw disk that merely starts with a signature opens.
    #[test]
    fn formats_rimg_does_not_read_as_qemu_probes_them() {
        let mut b = vec![0u8; PROBE_LEN];
        b[..16].copy_from_slice(b"WithoutFreeSpace");
        assert_eq!(qemu_only_format(&b), None);
        assert!(claimed_by_a_format(&b));
        b[16] = 2;
        assert_eq!(qemu_only_format(&b), Some("parallels"));
        let mut b = vec![0u8; PROBE_LEN];
        b[..23].copy_from_slice(b"Bochs Virtual HD Image\0");
        b[32..40].copy_from_slice(b"Redolog\0");
        b[48..56].copy_from_slice(b"Growing\0");
        assert_eq!(qemu_only_format(&b), None);
        b[64..68].copy_from_slice(&0x0002_0000u32.to_le_bytes());
        assert_eq!(qemu_only_format(&b), Some("bochs"));
        let mut b = vec![0u8; PROBE_LEN];
        b[..4].copy_from_slice(b"QED\0");
        assert_eq!(qemu_only_format(&b), Some("qed"));
    }

    #[test]
    fn every_qemu_format_claims_its_magic() {
        let sector = |magic: &[u8], at: usize| {
            let mut b = vec![0u8; PROBE_LEN];
            b[at..at + magic.len()].copy_from_slice(magic);
            b
        };
        assert!(!claimed_by_a_format(&[0u8; PROBE_LEN]));
        assert!(!claimed_by_a_format(b"an MBR or anything else"));
        for m in [
            &b"QFI\xfb\0\0\0\x01"[..],
            b"QFI\xfb\0\0\0\x03",
            b"LUKS\xba\xbe",
            b"QED\0",
            b"WithoutFreeSpace",
            b"WithouFreSpacExt",
            b"Bochs Virtual HD Image\0",
            b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount",
            b"vhdxfile",
            b"conectix",
            b"KDMV",
            b"# Disk DescriptorFile\nversion=1\n",
        ] {
            assert!(claimed_by_a_format(&sector(m, 0)), "{m:?}");
            // One byte off is no longer that format.
            let mut b = sector(m, 0);
            b[0] ^= 0x20;
            assert!(!claimed_by_a_format(&b), "{m:?} altered");
        }
        assert!(claimed_by_a_format(&sector(
            &0xbeda_107fu32.to_le_bytes(),
            0x40
        )));
    }

    #[test]
    fn vdi_signature_at_0x40() {
        let mut b = vec![0u8; PROBE_LEN];
        assert_eq!(probe(&b), None);
        b[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        assert_eq!(probe(&b), Some(Format::Vdi));
        b[0x40] ^= 1;
        assert_eq!(probe(&b), None);
        assert_eq!(probe(&b[..0x42]), None);
    }

    #[test]
    fn vmdk_magic_or_descriptor_text() {
        let mut b = vec![0u8; PROBE_LEN];
        b[..4].copy_from_slice(b"KDMV");
        assert_eq!(probe(&b), Some(Format::Vmdk));
        b[..4].copy_from_slice(b"COWD");
        assert_eq!(probe(&b), Some(Format::Vmdk));
        b[..4].copy_from_slice(b"KDMW");
        assert_eq!(probe(&b), None);
        let text = |t: &[u8]| {
            let mut b = t.to_vec();
            b.resize(PROBE_LEN, 0);
            probe(&b)
        };
        assert_eq!(text(b"# c\n   \n \r\nversion=1\nCID=1"), Some(Format::Vmdk));
        assert_eq!(text(b"version=3\r\n"), Some(Format::Vmdk));
        assert_eq!(text(b"version=4\n"), None);
        assert_eq!(text(b"version=1"), None);
        assert_eq!(text(b"\nversion=1\n"), None);
        assert_eq!(text(b"  x\nversion=1\n"), None);
    }

    #[test]
    fn vpc_cookie_at_0_only() {
        let mut b = vec![0u8; 1024];
        b[512..520].copy_from_slice(b"conectix");
        assert_eq!(probe(&b), None);
        b[..8].copy_from_slice(b"conectix");
        assert_eq!(probe(&b), Some(Format::Vpc));
        // Ahead of a VDI signature in the same bytes.
        b[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        assert_eq!(probe(&b), Some(Format::Vpc));
        b[7] = b'X';
        assert_eq!(probe(&b), Some(Format::Vdi));
    }
}
