//! The C-ABI symbols that the prebuilt `core` and the crates we link (ring's
//! C/assembly, getrandom through libc's declarations) expect from a C
//! library. Images link with `-nostdlib`, so these are the only definitions.
//!
//! * `memcpy`/`memmove`/`memset` use `rep movsb`/`rep stosb` (fast strings on
//!   every CPU with ERMS, and written in assembly so the compiler cannot turn
//!   them back into calls to themselves);
//! * `memcmp`/`bcmp`/`strlen` are byte loops;
//! * `syscall` serves only `getrandom` (318) from [`crate::rng`]; anything
//!   else fails with `ENOSYS`;
//! * `__errno_location` points at one `errno` (a single CPU, no threads);
//! * `_Unwind_Resume`/`rust_eh_personality` exist for the landing pads in
//!   the prebuilt `core`; with `panic = "abort"` they are never reached.
//!
//! The algorithms are plain functions tested on the host; the exported
//! symbols are thin wrappers compiled only into images.

use core::arch::asm;

/// Copies `n` bytes forward.
///
/// # Safety
/// `src..src+n` readable, `dst..dst+n` writable; overlap only if `dst <= src`.
pub unsafe fn copy_forward(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller guarantees the ranges; DF is clear (boot code and
    // the SysV ABI keep it clear between calls).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
}

/// Copies `n` bytes backward (for overlapping moves with `dst > src`).
///
/// # Safety
/// As for [`copy_forward`], any overlap allowed.
pub unsafe fn copy_backward(dst: *mut u8, src: *const u8, n: usize) {
    if n == 0 {
        return;
    }
    // SAFETY: the caller guarantees the ranges; we point at the last byte,
    // copy with DF set and clear it again before returning.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dst.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack)
        );
    }
}

/// `memmove` semantics.
///
/// # Safety
/// Both ranges valid for `n` bytes.
pub unsafe fn move_bytes(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: forwarded contract; direction picked so overlap is safe.
    unsafe {
        if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
            copy_forward(dst, src, n)
        } else {
            copy_backward(dst, src, n)
        }
    }
}

/// Fills `n` bytes with `c`.
///
/// # Safety
/// `dst..dst+n` writable.
pub unsafe fn fill_bytes(dst: *mut u8, c: u8, n: usize) {
    // SAFETY: the caller guarantees the range; DF is clear.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c, options(nostack, preserves_flags));
    }
}

/// `memcmp` semantics.
///
/// # Safety
/// Both ranges readable for `n` bytes.
pub unsafe fn compare_bytes(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: `i < n` and the caller guarantees both ranges.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// `strlen` semantics.
///
/// # Safety
/// `s` points to a NUL-terminated string.
pub unsafe fn c_strlen(s: *const u8) -> usize {
    let mut n = 0;
    // SAFETY: the caller guarantees a terminator, so every read before it is
    // in bounds.
    while unsafe { s.add(n).read_volatile() } != 0 {
        n += 1;
    }
    n
}

const SYS_GETRANDOM: i64 = 318;
const ENOSYS: i32 = 38;
const EIO: i32 = 5;

/// The one `errno` of an image.
static mut ERRNO: i32 = 0;

#[cfg(not(test))]
mod exports {
    use super::*;

    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
        // SAFETY: C contract of memcpy: non-overlapping valid ranges.
        unsafe { copy_forward(dst, src, n) };
        dst
    }

    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
        // SAFETY: C contract of memmove: valid, possibly overlapping ranges.
        unsafe { move_bytes(dst, src, n) };
        dst
    }

    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
        // SAFETY: C contract of memset: writable range.
        unsafe { fill_bytes(dst, c as u8, n) };
        dst
    }

    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        // SAFETY: C contract of memcmp: readable ranges.
        unsafe { compare_bytes(a, b, n) }
    }

    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        // SAFETY: C contract of bcmp: readable ranges.
        unsafe { compare_bytes(a, b, n) }
    }

    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn strlen(s: *const u8) -> usize {
        // SAFETY: C contract of strlen: NUL-terminated string.
        unsafe { c_strlen(s) }
    }

    #[unsafe(no_mangle)]
    pub extern "C" fn __errno_location() -> *mut i32 {
        &raw mut ERRNO
    }

    /// `long syscall(long number, ...)`. Variadic on the C side; under the
    /// SysV ABI the first six integer arguments travel in the same registers
    /// either way, and getrandom passes three, so a fixed-arity definition
    /// receives them correctly.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn syscall(number: i64, a1: i64, a2: i64, _a3: i64) -> i64 {
        if number != SYS_GETRANDOM {
            set_errno(ENOSYS);
            return -1;
        }
        let len = a2 as usize;
        if len == 0 {
            return 0;
        }
        // SAFETY: getrandom(2) contract: `a1` points to `a2` writable bytes.
        let buf = unsafe { core::slice::from_raw_parts_mut(a1 as *mut u8, len) };
        match crate::rng::fill(buf) {
            Ok(()) => len as i64,
            Err(_) => {
                set_errno(EIO);
                -1
            }
        }
    }

    /// XSI `strerror_r`, referenced by getrandom's error formatting: writes
    /// "errno N" (there are no message tables in an image).
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn __xpg_strerror_r(errnum: i32, buf: *mut u8, buflen: usize) -> i32 {
        let mut s = crate::FixedString::<24>::new();
        let _ = core::fmt::Write::write_fmt(&mut s, format_args!("errno {errnum}"));
        let bytes = s.as_str().as_bytes();
        if buflen == 0 {
            return 34; // ERANGE
        }
        let n = bytes.len().min(buflen - 1);
        // SAFETY: C contract: `buf` holds `buflen` writable bytes; we write
        // `n + 1 <= buflen`.
        unsafe {
            copy_forward(buf, bytes.as_ptr(), n);
            buf.add(n).write(0);
        }
        0
    }

    #[unsafe(no_mangle)]
    pub extern "C" fn _Unwind_Resume() -> ! {
        crate::exit::fail(crate::exit::Failure::Panic, "_Unwind_Resume reached with panic=abort")
    }

    #[unsafe(no_mangle)]
    pub extern "C" fn rust_eh_personality() {}
}

#[cfg_attr(test, allow(dead_code))]
fn set_errno(e: i32) {
    // SAFETY: images run one CPU with interrupts off: no concurrent access.
    unsafe { (&raw mut ERRNO).write(e) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_copy_copies_every_length_and_alignment() {
        let src: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for off in 0..8 {
            for n in [0, 1, 15, 16, 17, 31, 32, 33, 64, 255] {
                let mut dst = vec![0xaau8; 300];
                // SAFETY: both buffers hold 300 bytes; off + n < 300.
                unsafe { copy_forward(dst.as_mut_ptr().add(off), src.as_ptr(), n) };
                assert_eq!(&dst[off..off + n], &src[..n]);
                assert!(dst[off + n..].iter().all(|&b| b == 0xaa), "wrote past the end");
            }
        }
    }

    #[test]
    fn overlapping_move_matches_slice_copy_within() {
        for (from, to, n) in [(0, 5, 100), (5, 0, 100), (10, 11, 50), (11, 10, 50), (3, 3, 20)] {
            let mut a: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
            let mut b = a.clone();
            // SAFETY: ranges lie inside the 200-byte buffer.
            unsafe { move_bytes(a.as_mut_ptr().add(to), a.as_ptr().add(from), n) };
            b.copy_within(from..from + n, to);
            assert_eq!(a, b, "from {from} to {to} n {n}");
        }
    }

    #[test]
    fn fill_compare_and_strlen_follow_c_semantics() {
        let mut a = [0u8; 40];
        // SAFETY: 30 bytes inside a 40-byte buffer.
        unsafe { fill_bytes(a.as_mut_ptr().add(5), 0x5a, 30) };
        assert!(a[..5].iter().all(|&b| b == 0) && a[35..].iter().all(|&b| b == 0));
        assert!(a[5..35].iter().all(|&b| b == 0x5a));
        let (x, y) = (*b"abcdef", *b"abcxef");
        // SAFETY: 6-byte arrays.
        unsafe {
            assert_eq!(compare_bytes(x.as_ptr(), x.as_ptr(), 6), 0);
            assert!(compare_bytes(x.as_ptr(), y.as_ptr(), 6) < 0);
            assert!(compare_bytes(y.as_ptr(), x.as_ptr(), 6) > 0);
            assert_eq!(compare_bytes(x.as_ptr(), y.as_ptr(), 3), 0);
            assert_eq!(c_strlen(c"hello".as_ptr().cast()), 5);
        }
    }
}
