// The C library functions the freestanding test guests need, shared
// by them with `include!` (each guest is one file built by rustc).

// The host target's compiler_builtins leaves these to libc; loops over
// volatile accesses keep the compiler from turning them into calls to
// themselves.
#[no_mangle]
unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: the caller passes a writable range of n bytes.
        unsafe { write_volatile(d.add(i), c as u8) };
    }
    d
}

#[no_mangle]
unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: the caller passes non-overlapping ranges of n bytes.
        unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
    }
    d
}

#[no_mangle]
unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) < (s as usize) {
        for i in 0..n {
            // SAFETY: ranges of n bytes; forward copy is safe when d < s.
            unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
        }
    } else {
        for i in (0..n).rev() {
            // SAFETY: ranges of n bytes; backward copy is safe when d > s.
            unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
        }
    }
    d
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller passes two readable ranges of n bytes.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

/// The host target's precompiled libcore references the unwinder's
/// personality routine; with panic=abort it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
