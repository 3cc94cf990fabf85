// The kernel command line as the freestanding test guests read it (the
// VMM's --cmdline selects what they do), shared by them with `include!`.

/// Boot protocol: %rsi points here; cmd_line_ptr is at offset 0x228.
const ZERO_PAGE: u64 = 0x7000;

fn cmdline_has(word: &[u8]) -> bool {
    let p = r32(ZERO_PAGE + 0x228) as u64;
    if p == 0 {
        return false;
    }
    let mut i = 0u64;
    loop {
        // SAFETY: the command line is a NUL-terminated string in guest RAM.
        let at = |k: u64| unsafe { read_volatile((p + k) as *const u8) };
        if at(i) == 0 {
            return false;
        }
        if (0..word.len()).all(|k| at(i + k as u64) == word[k]) {
            return true;
        }
        i += 1;
    }
}
