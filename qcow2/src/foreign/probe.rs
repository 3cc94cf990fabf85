//! Recognising foreign formats from the first bytes of a file, as QEMU's
//! drivers' probes do.

use crate::image::Format;

/// Bytes of the file the probes look at, enough for every format's
/// header. A shorter file is zero-padded, as in QEMU's fixed-size probe
/// buffer: a 100-byte file with the VDI signature probes as VDI there
/// too (and fails to open).
pub const PROBE_LEN: usize = 2048;

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
        let mut b = vec![0u8; PROBE_LEN];
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
