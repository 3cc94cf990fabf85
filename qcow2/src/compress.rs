//! Compressed clusters (qcow2.rst, "Compressed Clusters Descriptor" and
//! the compression type header field). zlib images hold raw deflate
//! streams; zstd images hold one zstd frame per cluster. The stored range
//! may end with bytes of the next compressed cluster, so decoders stop
//! once the output cluster is full.

use std::io::Read;

use crate::header::CompressionType;

/// Decompresses `input` into exactly `out.len()` bytes.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Zlib => {
            let mut d = flate2::read::DeflateDecoder::new(input);
            d.read_exact(out).map_err(|e| format!("deflate: {e}"))
        }
        CompressionType::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| format!("zstd: {e}"))?
                .single_frame();
            d.read_exact(out).map_err(|e| format!("zstd: {e}"))
        }
    }
}

/// Compresses one cluster into at most `input.len() - 1` bytes (as QEMU
/// does); None means "store it uncompressed".
pub fn compress(kind: CompressionType, input: &[u8]) -> Option<Vec<u8>> {
    let limit = input.len() - 1;
    let out = match kind {
        CompressionType::Zlib => {
            // Raw deflate with a 4 KiB window (-12): QEMU inflates with
            // windowBits -12 and rejects streams that reach further back.
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(limit);
            match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => out,
                _ => return None,
            }
        }
        CompressionType::Zstd => zstd::bulk::compress(input, 0).ok()?,
    };
    (out.len() <= limit).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut c = compress(kind, &data).unwrap();
            c.extend_from_slice(&[0xa5; 300]);
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn garbage_is_an_error() {
        let mut out = vec![0u8; 4096];
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            assert!(decompress(kind, &[0xff; 64], &mut out).is_err());
        }
    }
}

#[cfg(test)]
mod half {
    use super::*;
    #[test]
    fn half_zero_compresses() {
        let mut v = vec![0u8; 65536];
        let mut x = 1u32;
        for b in &mut v[..32768] {
            x = x.wrapping_mul(1103515245).wrapping_add(12345);
            *b = (x >> 16) as u8;
        }
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(kind, &v);
            assert!(c.is_some(), "{kind:?}");
            let mut out = vec![0u8; 65536];
            decompress(kind, &c.unwrap(), &mut out).unwrap();
            assert_eq!(out, v);
        }
    }
}
