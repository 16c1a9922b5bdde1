//! `exp` without glibc's errno wrapper.
//!
//! On glibc, the public `exp` symbol is a thin wrapper (errno handling) around the
//! CPU-dispatched implementation; in the mask's hot loop the wrapper and its extra
//! indirect call cost about a third of the time spent in `exp`. glibc still exports
//! that implementation as `__exp_finite` (a compatibility symbol, resolved through the
//! same CPU dispatch), which returns bit-identical results for every finite argument.
//! We look it up once and then *verify* it against `f64::exp` (the function the
//! reference's `math.exp` calls) on a spread of arguments; on any difference, or on
//! other C libraries, we use `f64::exp`. Arguments here are finite and <= 1e-6.

use std::sync::OnceLock;

type ExpFn = extern "C" fn(f64) -> f64;

extern "C" fn std_exp(x: f64) -> f64 {
    x.exp()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn lookup() -> Option<ExpFn> {
    use std::ffi::{c_char, c_void};
    // dlvsym lives in libdl before glibc 2.34 (a stub library since): link it explicitly
    // so that builds on older manylinux images resolve it too.
    #[link(name = "dl")]
    extern "C" {
        fn dlvsym(
            handle: *mut c_void,
            symbol: *const c_char,
            version: *const c_char,
        ) -> *mut c_void;
    }
    // RTLD_DEFAULT is the null handle on glibc.
    let ptr = unsafe {
        dlvsym(
            std::ptr::null_mut(),
            c"__exp_finite".as_ptr(),
            c"GLIBC_2.15".as_ptr(),
        )
    };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `__exp_finite` has the C signature `double (double)`.
    Some(unsafe { std::mem::transmute::<*mut c_void, ExpFn>(ptr) })
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn lookup() -> Option<ExpFn> {
    None
}

/// True when `f` agrees bit for bit with `f64::exp` on a deterministic spread of
/// arguments covering the log-prob range (and the edges of the fast path).
fn agrees_with_std(f: ExpFn) -> bool {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut args: Vec<f64> = vec![
        0.0, -0.0, 1e-6, -1e-300, -5e-324, -1e-17, -0.5, -1.0, -700.0, -708.5, -745.2, -746.0, -1e4,
    ];
    for _ in 0..20_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let u = (state >> 11) as f64 / (1u64 << 53) as f64;
        let scale = [1e-8, 1e-3, 0.1, 1.0, 10.0, 100.0][(state % 6) as usize];
        args.push(-u * scale);
    }
    args.iter().all(|&x| f(x).to_bits() == x.exp().to_bits())
}

fn resolve() -> ExpFn {
    match lookup() {
        Some(f) if agrees_with_std(f) => f,
        _ => std_exp,
    }
}

static EXP: OnceLock<ExpFn> = OnceLock::new();

/// The exp function to use in hot loops (bit-identical to `f64::exp`).
#[inline]
pub fn exp_fn() -> ExpFn {
    *EXP.get_or_init(resolve)
}

/// Whether the wrapper-free glibc implementation is in use (for diagnostics).
pub fn uses_glibc_fast_path() -> bool {
    exp_fn() as usize != std_exp as ExpFn as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_bit_identical() {
        let f = exp_fn();
        let mut x = -60.0f64;
        while x <= 0.0 {
            assert_eq!(f(x).to_bits(), x.exp().to_bits(), "exp({x})");
            x += 0.000_731;
        }
        assert!(agrees_with_std(f));
    }
}
