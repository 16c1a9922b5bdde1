//! The `exp` of the Binary TV hot loop: branch-free, written so that every variant of
//! the loop (the portable build, AVX2+FMA, AVX-512) returns the same bits.
//!
//! The spec (Numerics) allows `exp` from any implementation accurate to 1 ulp. This one
//! uses only IEEE-754 additions, multiplications and fused multiply-adds (`mul_add`,
//! correctly rounded by definition) in a fixed order, and a 16-entry table, with no
//! data-dependent branch. The vector passes (`row/tv_avx2.rs`) do the same operations
//! lane by lane and read the same table (AVX2: one load a lane; AVX-512: two register
//! permutes), so the results are bit-identical. (On an x86-64 CPU without FMA, i.e.
//! before 2013, the portable build's `mul_add` is libm's `fma`: the same bits, but many
//! times slower than the vector builds.) Its error, measured against a double-double
//! reference on 4 million arguments in the tests, is below 0.56 ulp for normal results
//! and 0.75 ulp for subnormal ones (`tests::error_below_one_ulp`); 0.5% of arguments
//! differ from glibc's `exp` by 1 ulp.
//!
//! Method: x = (16 e + j) ln2/16 + r with m = 16 e + j = round(16 x / ln2), j in 0..16
//! and |r| <= ln2/32 (about). 16 x / ln2 is rounded by adding 1.5 * 2^52, which leaves m
//! in the low bits; m ln2_hi/16 is exact and x - m ln2_hi/16 too (ln2_hi/16 has 38
//! significant bits), so r rounds once, and its error is below 2^-58 relative to the
//! result. exp(r) - 1 = r + r^2 q(r), q the Taylor polynomial of degree 5 (terms to
//! r^7/7!; the truncation is below 2^-59 relative), by Estrin's scheme. 2^(j/16) is a
//! table entry T_hi + T_lo (T_lo the rounding error of T_hi), and
//! exp(x) = 2^e (T_hi + (T_hi (exp(r) - 1) + T_lo)): one rounding at the result's scale
//! (the last addition) plus errors below 0.06 ulp. The scale 2^e goes into the exponent
//! bits. Arguments below `TINY` (results below 2^-1022, subnormal or zero) need a
//! two-step scale: `exp_tiny`.
//!
//! Before this table form, the reduction was to |r| <= ln2/2 with a degree-13 Taylor
//! polynomial and r's rounding error carried (0.69 ulp): twice the fused multiply-adds.

/// The fast form is exact-range for x >= TINY (the result stays a normal number).
pub const TINY: f64 = -708.0;

/// 16 / ln2.
pub(crate) const INV_LN2_16: f64 = 23.083120654223414;
/// ln2/16 split: 38 significant bits (m * LN2_16_HI is exact for |m| < 2^15) and the rest.
pub(crate) const LN2_16_HI: f64 = 0.04332169878489367; // 0x1.62e42fefa0000p-5
pub(crate) const LN2_16_LO: f64 = 1.0291218489310676e-13;
/// 1.5 * 2^52: adding it rounds to an integer, held in the low mantissa bits.
pub(crate) const SHIFTER: f64 = 6755399441055744.0;
/// q(r)'s coefficients: 1/2!, ..., 1/7! (rounded).
pub(crate) const Q: [f64; 6] = [
    0.5,
    0.16666666666666666,
    0.041666666666666664,
    0.008333333333333333,
    0.001388888888888889,
    0.0001984126984126984,
];
/// 2^(j/16) = T_HI[j] + T_LO[j] (to ~2^-106), computed with 200-bit arithmetic.
pub(crate) static T_HI: [f64; 16] = [
    1.0,
    1.0442737824274138,
    1.0905077326652577,
    1.1387886347566916,
    1.189207115002721,
    1.241857812073484,
    1.2968395546510096,
    1.3542555469368927,
    std::f64::consts::SQRT_2,
    1.4768261459394993,
    1.5422108254079407,
    1.6104903319492543,
    1.681792830507429,
    1.7562521603732995,
    1.8340080864093424,
    1.9152065613971474,
];
pub(crate) static T_LO: [f64; 16] = [
    0.0,
    8.551889705537965e-17,
    -3.046782079812471e-17,
    8.912812676025408e-17,
    3.982015231465646e-17,
    4.658027591836937e-17,
    2.5382502794888315e-17,
    7.70094837980299e-17,
    -9.667293313452913e-17,
    -3.483994556892796e-17,
    7.949834809697621e-17,
    2.4707192569797888e-17,
    8.199010020581497e-17,
    2.960140695448873e-17,
    3.283107224245627e-17,
    -1.0619946056195963e-16,
];

/// (bits of t: m = 16 e + j in the low bits, two's complement; r).
#[inline(always)]
fn reduce(x: f64) -> (u64, f64) {
    let t = x.mul_add(INV_LN2_16, SHIFTER);
    let m = t - SHIFTER;
    let hi = (-m).mul_add(LN2_16_HI, x); // exact
    let r = (-m).mul_add(LN2_16_LO, hi);
    (t.to_bits(), r)
}

/// T_hi + (T_hi (exp(r) - 1) + T_lo), in [2^(-1/32), 2^(31/32)] (about).
#[inline(always)]
fn unscaled(r: f64, t_hi: f64, t_lo: f64) -> f64 {
    // Estrin's scheme: r^2 q(r) in a chain of 4 operations.
    let r2 = r * r;
    let p01 = Q[1].mul_add(r, Q[0]);
    let p23 = Q[3].mul_add(r, Q[2]);
    let p45 = Q[5].mul_add(r, Q[4]);
    let p03 = p23.mul_add(r2, p01);
    let r4 = r2 * r2;
    let q = p45.mul_add(r4, p03);
    let em1 = r2.mul_add(q, r);
    t_hi + t_hi.mul_add(em1, t_lo)
}

/// exp(x) for TINY <= x <= 709 (finite). Outside that range the result is meaningless
/// but computing it is harmless (no trap, no UB): callers discard it.
#[inline(always)]
pub fn exp_fast(x: f64) -> f64 {
    let (t_bits, r) = reduce(x);
    let j = (t_bits & 15) as usize;
    let y = unscaled(r, T_HI[j], T_LO[j]);
    // Bits 4.. of t hold e (two's complement): adding e << 52 to y's bits scales it by
    // 2^e, exactly while the result is a normal number.
    f64::from_bits(y.to_bits().wrapping_add((t_bits >> 4) << 52))
}

/// exp(x) for any x <= 709 (NaN for NaN): the same arithmetic as `exp_fast`, with the
/// scale applied in two normal steps so that subnormal results round once.
#[inline(always)]
pub fn exp_tiny(x: f64) -> f64 {
    let x = if x < -746.0 { -746.0 } else { x };
    let (t_bits, r) = reduce(x);
    let j = (t_bits & 15) as usize;
    let y = unscaled(r, T_HI[j], T_LO[j]);
    let m = f64::from_bits(t_bits) - SHIFTER;
    let e = (m - j as f64) * 0.0625; // exact
    let e1 = ((e * 0.5 + SHIFTER) - SHIFTER).min(0.0);
    let e2 = e - e1;
    let s1 = f64::from_bits(((e1 + SHIFTER).to_bits().wrapping_add(1023)) << 52);
    let s2 = f64::from_bits(((e2 + SHIFTER).to_bits().wrapping_add(1023)) << 52);
    y * s1 * s2
}

/// exp(x) for any finite x <= 709 (scalar entry point; the hot loops call `exp_fast`
/// and patch arguments below TINY with `exp_tiny`).
#[inline]
pub fn exp(x: f64) -> f64 {
    if x >= TINY {
        exp_fast(x)
    } else {
        exp_tiny(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Double-double arithmetic (error-free transforms; mul_add is exact fma).
    #[derive(Clone, Copy)]
    struct Dd(f64, f64);
    fn two_sum(a: f64, b: f64) -> Dd {
        let s = a + b;
        let bb = s - a;
        Dd(s, (a - (s - bb)) + (b - bb))
    }
    fn add(a: Dd, b: Dd) -> Dd {
        let s = two_sum(a.0, b.0);
        let e = s.1 + a.1 + b.1;
        let hi = s.0 + e;
        Dd(hi, e - (hi - s.0))
    }
    fn mul(a: Dd, b: Dd) -> Dd {
        let p = a.0 * b.0;
        let e = a.0.mul_add(b.0, -p) + (a.0 * b.1 + a.1 * b.0);
        let hi = p + e;
        Dd(hi, e - (hi - p))
    }
    const LN2_DD: Dd = Dd(std::f64::consts::LN_2, 2.3190468138462996e-17);

    /// exp(x) to ~100 bits, as (m, k) with exp(x) = m 2^k, m in double-double
    /// (x = k ln2 + r, Taylor series for exp(r) with exact divisions).
    fn exp_dd(x: f64) -> (Dd, i32) {
        let k = (x / std::f64::consts::LN_2).round();
        let r = add(Dd(x, 0.0), mul(Dd(-k, 0.0), LN2_DD));
        let mut term = Dd(1.0, 0.0);
        let mut sum = Dd(1.0, 0.0);
        for i in 1..40 {
            term = mul(term, r);
            let q = term.0 / i as f64;
            let rem = (-q).mul_add(i as f64, term.0) + term.1;
            term = add(Dd(q, 0.0), Dd(rem / i as f64, 0.0));
            sum = add(sum, term);
            if term.0.abs() < 1e-40 {
                break;
            }
        }
        (sum, k as i32)
    }

    /// 2^e as f64 for any e in [-1074, 1023].
    fn pow2(e: i32) -> f64 {
        2f64.powi(e / 2) * 2f64.powi(e - e / 2)
    }

    /// Error of `got` against exp(x) (double-double reference), in ulps of the true
    /// value (the subnormal ulp below 2^-1022). Compared at scale 2^-k, where every
    /// operation is exact.
    fn ulp_error(got: f64, x: f64) -> f64 {
        let (m, k) = exp_dd(x);
        let e = m.0.log2().floor() as i32 + k; // exponent of the true value
        let ulp_exp = (e - 52).max(-1074);
        if ulp_exp - k < -1000 || k < -1074 - 60 {
            // The true value is below half the smallest subnormal by far: expect 0.
            return got / 5e-324;
        }
        let got_scaled = got * pow2(-k / 2) * pow2(-k - (-k / 2)); // exact (power of 2)
        ((got_scaled - m.0) - m.1).abs() / pow2(ulp_exp - k)
    }

    fn args(count: usize) -> Vec<f64> {
        let mut state = 0x1234_5678_9ABC_DEF1u64;
        let mut out = vec![
            0.0,
            -0.0,
            1e-6,
            -1e-300,
            -5e-324,
            -1e-17,
            -0.5,
            -1.0,
            -0.34657359027997264,
            0.34657359027997264,
            -0.3465735902799727,
            -700.0,
            -708.0,
            -708.3964185322641,
            -708.4,
            -709.0,
            -720.0,
            -744.0,
            -745.0,
            -745.1332191019411,
            -745.14,
            -746.0,
            -1e4,
            -1e300,
        ];
        // Around the reduction's boundaries (k ln2/32 for every k in range).
        for k in -34_450..64 {
            let b = k as f64 * std::f64::consts::LN_2 / 32.0;
            for d in [-2e-16, -1e-16, 0.0, 1e-16, 2e-16] {
                out.push(b + d * b.abs().max(1.0));
            }
        }
        while out.len() < count {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 11) as f64 / (1u64 << 53) as f64;
            let scale =
                [1e-12, 1e-6, 1e-3, 0.1, 0.35, 1.0, 5.0, 30.0, 300.0, 746.0][(state % 10) as usize];
            out.push(-u * scale);
        }
        out
    }

    #[test]
    fn table_is_two_to_the_j_sixteenths() {
        // (T_hi + T_lo)^16 = 2^j to ~2^-100 relative, and T_hi is 2^(j/16) rounded.
        for j in 0..16 {
            let t = Dd(T_HI[j], T_LO[j]);
            let mut p = t;
            for _ in 0..4 {
                p = mul(p, p);
            }
            let want = 2f64.powi(j as i32);
            let err = ((p.0 - want) + p.1).abs() / want;
            assert!(err < 1e-29, "j = {j}: (T_hi + T_lo)^16 off by {err:e}");
            assert!(
                T_LO[j].abs() <= 0.5 * (T_HI[j] * f64::EPSILON),
                "j = {j}: T_lo too big"
            );
        }
        // The reduction constants: ln2/16 to ~2^-100, LN2_16_HI with 38 significant bits.
        let c = add(Dd(LN2_16_HI, 0.0), Dd(LN2_16_LO, 0.0));
        let want = mul(LN2_DD, Dd(0.0625, 0.0));
        assert!(((c.0 - want.0) + (c.1 - want.1)).abs() < 2e-29); // LO rounded: 2^-96
        assert_eq!(LN2_16_HI.to_bits() & ((1 << 15) - 1), 0);
    }

    #[test]
    fn reference_is_sound() {
        // The double-double reference agrees with the system libm (accurate to < 1 ulp).
        for &x in &args(200_000) {
            if x < -745.2 {
                continue;
            }
            let e = ulp_error(x.exp(), x);
            assert!(
                e < 1.0,
                "libm exp({x:e}) = {:e} is {e} ulps from the reference",
                x.exp()
            );
        }
    }

    #[test]
    fn error_below_one_ulp() {
        let mut worst = (0.0f64, 0.0f64);
        let mut worst_normal = 0.0f64;
        let xs = args(4_000_000);
        for &x in &xs {
            let got = exp(x);
            let e = ulp_error(got, x);
            if e > worst.0 {
                worst = (e, x);
            }
            if x >= TINY {
                worst_normal = worst_normal.max(e);
                assert_eq!(got.to_bits(), exp_fast(x).to_bits());
            }
            assert_eq!(got.to_bits(), exp_tiny(x).to_bits(), "exp_tiny({x:e})");
        }
        eprintln!(
            "max error {} ulp at x = {:e} ({} args); {} ulp for normal results",
            worst.0,
            worst.1,
            xs.len(),
            worst_normal
        );
        assert!(
            worst.0 < 1.0,
            "max error {} ulp at x = {:e}",
            worst.0,
            worst.1
        );
    }

    #[test]
    fn within_one_ulp_of_libm_and_mostly_equal() {
        let xs = args(2_000_000);
        let mut differ = 0usize;
        for &x in &xs {
            let (a, b) = (exp(x), x.exp());
            let d = (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(d <= 1, "exp({x:e}): {a:e} vs libm {b:e}");
            differ += (d != 0) as usize;
        }
        eprintln!("{differ} of {} differ from libm by 1 ulp", xs.len());
    }

    #[test]
    fn edge_values() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(-746.0), 0.0);
        assert_eq!(exp(-1e300), 0.0);
        assert_eq!(exp(-745.2), 0.0);
        assert_eq!(exp(-745.0), 5e-324);
        assert!(exp(f64::NAN).is_nan() || exp(f64::NAN) >= 0.0); // no panic
    }
}
