//! Two or four rows' mask-only scans at once (`compute_row_deferred` leaves them
//! pending).

use super::{sized, Isa, Scan, Scratch};
use crate::params::Params;

/// A row whose mask-only scan `compute_row_deferred` left pending: its window's valid
/// flags and mask, the scratch holding its D_t, v_t w_t and direction, and its budget.
pub struct PendingScan<'a> {
    pub valid: &'a [u8],
    pub scratch: &'a mut Scratch,
    pub budget: f64,
    pub mask: &'a mut [bool],
}

/// Finishes one pending row (the same loop as `compute_row`).
pub fn scan_mask_one(params: &Params, row: PendingScan) {
    let n = row.mask.len();
    let scan = Scan {
        delta: params.delta,
        budget: row.budget,
        prefix_budget: params.prefix_budget,
        valid: &row.valid[..n],
        toward_mu: &row.scratch.toward_mu[..n],
        divergence: &row.scratch.divergence[..n],
        weight: &row.scratch.weight[..n],
    };
    scan.mask_only(row.mask);
}

/// Finishes two pending rows. The prefix sums of both rows advance in one loop that
/// does only the chain and c_t (two rows' latency chains overlap), and the mask is then
/// a vectorised pass per row. Each row's S, W and c_t are computed by the same
/// operations in the same order as `Scan::mask_only`, so the bits are the same.
pub fn scan_mask_pair(params: &Params, a: PendingScan, b: PendingScan) {
    isa_variants!(
        Isa::current(),
        fn(params: &Params, a: PendingScan, b: PendingScan) -> (),
        |_v| scan_mask_pair_impl(params, a, b)
    )
}

#[inline(always)]
fn scan_mask_pair_impl(params: &Params, a: PendingScan, b: PendingScan) {
    if !params.prefix_budget {
        scan_mask_one(params, a);
        scan_mask_one(params, b);
        return;
    }
    let (delta, (ba, bb)) = (params.delta, (a.budget, b.budget));
    let (na, nb) = (a.mask.len(), b.mask.len());
    let (ca, cb) = (
        sized(&mut a.scratch.prefix_weight, na),
        sized(&mut b.scratch.prefix_weight, nb),
    );
    let (da, wa) = (&a.scratch.divergence[..na], &a.scratch.weight[..na]);
    let (db, wb) = (&b.scratch.divergence[..nb], &b.scratch.weight[..nb]);
    let m = na.min(nb);
    let (mut sa, mut swa, mut sb, mut swb) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for c in 0..m {
        let (w, v) = (wa[c], wb[c]);
        let (za, zb) = (w * da[c], v * db[c]);
        ca[c] = delta.min(delta + ba * swa - sa);
        cb[c] = delta.min(delta + bb * swb - sb);
        sa += za;
        swa += w;
        sb += zb;
        swb += v;
    }
    for c in m..na {
        let w = wa[c];
        ca[c] = delta.min(delta + ba * swa - sa);
        sa += w * da[c];
        swa += w;
    }
    for c in m..nb {
        let v = wb[c];
        cb[c] = delta.min(delta + bb * swb - sb);
        sb += v * db[c];
        swb += v;
    }
    let mask_pass =
        |mask: &mut [bool], valid: &[u8], toward: &[u8], d: &[f64], w: &[f64], ct: &[f64]| {
            let n = mask.len();
            let (valid, toward, d, w, ct) = (&valid[..n], &toward[..n], &d[..n], &w[..n], &ct[..n]);
            for c in 0..n {
                mask[c] = (valid[c] != 0) & ((toward[c] != 0) | (w[c] * d[c] <= ct[c]));
            }
        };
    mask_pass(a.mask, a.valid, &a.scratch.toward_mu, da, wa, ca);
    mask_pass(b.mask, b.valid, &b.scratch.toward_mu, db, wb, cb);
}

/// Finishes up to four pending rows (`batch::run_group`). With AVX2 the four rows'
/// prefix sums advance as the four lanes of one vector (`scan_group_avx2`); elsewhere
/// the rows go in pairs. Either way each row's S, W and c_t are computed by the same
/// operations in the same order as `Scan::mask_only`, so the bits are the same.
pub fn scan_mask_group(params: &Params, rows: Vec<PendingScan>) {
    assert!(rows.len() <= 4, "at most four rows a group");
    let mut clock = super::PhaseClock::start(); // the deferred scan + mask (phase 3)
    scan_mask_group_inner(params, rows);
    clock.lap(3);
}

fn scan_mask_group_inner(params: &Params, rows: Vec<PendingScan>) {
    #[cfg(target_arch = "x86_64")]
    if params.prefix_budget && rows.len() >= 2 && Isa::current_has_avx2() {
        // SAFETY: the CPU supports the features.
        return unsafe { scan_group_avx2(params, rows) };
    }
    let mut rows = rows.into_iter();
    while let Some(a) = rows.next() {
        match rows.next() {
            Some(b) => scan_mask_pair(params, a, b),
            None => scan_mask_one(params, a),
        }
    }
}

/// The prefix scans of up to four rows, row l in lane l of `__m256d` vectors. Four
/// tokens of each row are loaded and transposed (lanes = rows), then advanced one token
/// at a time: Z = w d, c_t = min(delta, delta + b W - S), S += Z, W += w, exactly the
/// scalar operations, lane by lane (no fused multiply-add). The comparison Z_t <= c_t
/// of each token is kept as one bit per row (`Scratch::lane_bits`); a vectorised pass
/// per row then writes the mask. The span up to the shortest remaining row runs with all
/// its rows in lanes, a finished row's lane reading zeros (its bits are ignored).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scan_group_avx2(params: &Params, rows: Vec<PendingScan>) {
    use std::arch::x86_64::*;
    let mut rows = rows;
    let k = rows.len();
    let delta = params.delta;
    let mut bits = std::mem::take(&mut rows[0].scratch.lane_bits);
    let longest = rows.iter().map(|r| r.mask.len()).max().unwrap_or(0);
    let lane_bits = sized(&mut bits, longest);
    let zeros = [0.0f64; 4];
    let (mut n, mut budget) = ([0usize; 4], [0.0f64; 4]);
    let (mut wp, mut dp) = ([zeros.as_ptr(); 4], [zeros.as_ptr(); 4]);
    for (l, r) in rows.iter().enumerate() {
        n[l] = r.mask.len();
        budget[l] = r.budget;
        let (w, d) = (&r.scratch.weight[..n[l]], &r.scratch.divergence[..n[l]]);
        wp[l] = w.as_ptr();
        dp[l] = d.as_ptr();
    }
    // 4x4 transpose: rows of 4 tokens in, tokens of 4 rows out.
    #[inline(always)]
    unsafe fn transpose(r: [__m256d; 4]) -> [__m256d; 4] {
        let t0 = _mm256_unpacklo_pd(r[0], r[1]);
        let t1 = _mm256_unpackhi_pd(r[0], r[1]);
        let t2 = _mm256_unpacklo_pd(r[2], r[3]);
        let t3 = _mm256_unpackhi_pd(r[2], r[3]);
        [
            _mm256_permute2f128_pd::<0x20>(t0, t2),
            _mm256_permute2f128_pd::<0x20>(t1, t3),
            _mm256_permute2f128_pd::<0x31>(t0, t2),
            _mm256_permute2f128_pd::<0x31>(t1, t3),
        ]
    }
    let (mut s, mut sw) = ([0.0f64; 4], [0.0f64; 4]); // S_{t-1}, W_{t-1} per row
    let mut c = 0;
    while let Some(end) = (0..k).filter(|&l| n[l] > c).map(|l| n[l]).min() {
        // Lanes of finished rows read 4 zeros without advancing.
        let (mut bw, mut bd, mut step) = ([zeros.as_ptr(); 4], [zeros.as_ptr(); 4], [0usize; 4]);
        for l in (0..k).filter(|&l| n[l] > c) {
            bw[l] = wp[l].add(c);
            bd[l] = dp[l].add(c);
            step[l] = 4;
        }
        let blocks = (end - c) / 4;
        let (vdelta, vb) = (_mm256_set1_pd(delta), _mm256_loadu_pd(budget.as_ptr()));
        let (mut vs, mut vsw) = (_mm256_loadu_pd(s.as_ptr()), _mm256_loadu_pd(sw.as_ptr()));
        let out = lane_bits[c..c + 4 * blocks].as_mut_ptr();
        for i in 0..blocks {
            let load = |p: &[*const f64; 4], l: usize| _mm256_loadu_pd(p[l].add(i * step[l]));
            let w = transpose([load(&bw, 0), load(&bw, 1), load(&bw, 2), load(&bw, 3)]);
            let d = transpose([load(&bd, 0), load(&bd, 1), load(&bd, 2), load(&bd, 3)]);
            for j in 0..4 {
                let z = _mm256_mul_pd(w[j], d[j]);
                let sum = _mm256_add_pd(vdelta, _mm256_mul_pd(vb, vsw));
                let c_t = _mm256_min_pd(_mm256_sub_pd(sum, vs), vdelta);
                let within = _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_LE_OQ>(z, c_t));
                *out.add(4 * i + j) = within as u8;
                vs = _mm256_add_pd(vs, z);
                vsw = _mm256_add_pd(vsw, w[j]);
            }
        }
        _mm256_storeu_pd(s.as_mut_ptr(), vs);
        _mm256_storeu_pd(sw.as_mut_ptr(), vsw);
        let rest = c + 4 * blocks;
        for (i, byte) in lane_bits[rest..end].iter_mut().enumerate() {
            let t = rest + i;
            let mut b = 0u8;
            for l in 0..k {
                if n[l] > c {
                    let w = *wp[l].add(t);
                    let z = w * *dp[l].add(t);
                    let c_t = delta.min(delta + budget[l] * sw[l] - s[l]);
                    b |= ((z <= c_t) as u8) << l;
                    s[l] += z;
                    sw[l] += w;
                }
            }
            *byte = b;
        }
        c = end;
    }
    for (l, r) in rows.iter_mut().enumerate() {
        let m = r.mask.len();
        let (mask, valid) = (&mut r.mask[..m], &r.valid[..m]);
        let (toward, lane) = (&r.scratch.toward_mu[..m], &lane_bits[..m]);
        let bit = 1u8 << l;
        for c in 0..m {
            mask[c] = (valid[c] != 0) & ((toward[c] != 0) | (lane[c] & bit != 0));
        }
    }
    rows[0].scratch.lane_bits = bits;
}
