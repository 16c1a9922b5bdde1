//! Two rows' mask-only scans at once (`compute_row_deferred` leaves them pending).

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
    #[cfg(target_arch = "x86_64")]
    if Isa::current() == Isa::Avx512 && Isa::Avx512.supported() {
        // SAFETY: the CPU supports the features.
        return unsafe { scan_mask_pair_avx512(params, a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if Isa::current() == Isa::Avx2 && Isa::Avx2.supported() {
        // SAFETY: the CPU supports the features.
        return unsafe { scan_mask_pair_avx2(params, a, b) };
    }
    scan_mask_pair_impl(params, a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scan_mask_pair_avx2(params: &Params, a: PendingScan, b: PendingScan) {
    scan_mask_pair_impl(params, a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512dq,avx512bw,avx512vl")]
unsafe fn scan_mask_pair_avx512(params: &Params, a: PendingScan, b: PendingScan) {
    scan_mask_pair_impl(params, a, b)
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
