//! Finding zeros in buffers: where convert, compare and checksum may
//! skip data that reads as zeros anyway.

/// Whether `b` is all zeros.
pub fn is_zero(b: &[u8]) -> bool {
    zero_prefix(b) == b.len()
}

/// The length of the all-zero prefix of `b`. Whole blocks are OR-ed
/// together without an early exit, which the compiler turns into vector
/// instructions: a long zero run scans at memory speed.
pub fn zero_prefix(b: &[u8]) -> usize {
    const BLOCK: usize = 256;
    // Data usually shows in its first bytes: judged there, without
    // reading a whole block.
    let head = b.len().min(16);
    if let Some(p) = b[..head].iter().position(|&x| x != 0) {
        return p;
    }
    let mut i = head;
    for block in b[head..].chunks_exact(BLOCK) {
        if block.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            break;
        }
        i += BLOCK;
    }
    i + b[i..].iter().position(|&x| x != 0).unwrap_or(b.len() - i)
}
