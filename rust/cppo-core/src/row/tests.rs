//! Tests of the row kernel against the spec (worked example, edge cases, both builds).

use super::*;
use crate::weights::SplitMix64;

fn params() -> Params {
    Params {
        delta: 0.15,
        delta_b: 0.02,
        w_min: 0.8,
        horizon: 0,
        adaptive_budget: false,
        budget_quantile: 0.9,
        budget_scale: 1.0,
        budget_ceiling: 2.0,
        position_weight: PositionWeight::Linear,
        shuffle_seed: 0,
        row_offset: 0,
        prefix_budget: true,
        divergence: Divergence::Given,
    }
}

/// The worked-example setting: lp = -1, lq = -1.1 (away from mu for adv > 0).
fn run(
    p: &Params,
    adv: f64,
    d: &[f64],
    valid: &[u8],
) -> (Vec<bool>, Vec<i8>, Vec<f64>, RowSummary) {
    let n = d.len();
    let (m, r, t, _, s) = eval_row(
        p,
        &vec![-1.0; n],
        &vec![-1.1; n],
        &vec![adv; n],
        valid,
        Some(d),
    )
    .unwrap();
    (m, r, t, s)
}

#[test]
fn worked_example() {
    let d = [0.10, 0.12, 0.30, 0.05, 0.14];
    let (m, r, t, s) = run(&params(), 1.0, &d, &[1; 5]);
    assert_eq!(m, [true, false, false, false, false]);
    assert_eq!(r, [2, 4, 3, 4, 4]);
    let want = [0.15, 0.07, -0.025, -0.277, -0.3025];
    for (a, b) in t.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
    assert_eq!(s.counts, [0, 0, 1, 1, 3]);
    let (m, r, _, _) = run(&params(), -1.0, &d, &[1; 5]);
    assert_eq!(m, [true; 5]);
    assert_eq!(r, [1; 5]);
}

#[test]
fn padding_is_never_kept_and_never_summed() {
    let d = [0.10, 9.0, 0.12];
    let (m, r, t, _) = run(&params(), 1.0, &d, &[1, 0, 1]);
    assert_eq!(r[1], INVALID);
    assert!(!m[1]);
    // The hole contributes nothing to S or W.
    assert!((t[2] - (0.15f64 + 0.02 * 1.0 - 0.10).min(0.15)).abs() < 1e-15);
}

#[test]
fn empty_row() {
    let (m, _, _, s) = run(&params(), 1.0, &[], &[]);
    assert!(m.is_empty());
    assert_eq!(s.budget, 0.02);
}

/// The row's inputs cut to its valid window, as the batch layer hands them over.
fn windowed<'a>(
    valid: &'a [u8],
    lp: &'a [f64],
    lq: &'a [f64],
    adv: &'a [f64],
    d: Option<&'a [f64]>,
) -> RowInput<'a> {
    let w = valid_window(valid);
    RowInput {
        valid,
        window: w.clone(),
        log_probs: &lp[w.clone()],
        old_log_probs: &lq[w.clone()],
        advantages: Advantage::Token(&adv[w.clone()]),
        divergence: d.map(|d| &d[w.clone()]),
        split: false,
    }
}

/// Every output of one row: (mask, reason, threshold, gate, summary).
#[allow(clippy::type_complexity)]
fn eval_row(
    p: &Params,
    lp: &[f64],
    lq: &[f64],
    adv: &[f64],
    valid: &[u8],
    d: Option<&[f64]>,
) -> Result<(Vec<bool>, Vec<i8>, Vec<f64>, Vec<f64>, RowSummary), BadValue> {
    let n = valid.len();
    let input = windowed(valid, lp, lq, adv, d);
    let (mut m, mut r, mut t, mut g) = (vec![false; n], vec![0i8; n], vec![0.0; n], vec![0.0; n]);
    let out = RowOutput {
        mask: &mut m,
        reason: Some(&mut r),
        threshold: Some(&mut t),
        gate: Some(&mut g),
    };
    let s = compute_row(p, 0, &input, &mut Scratch::default(), out)?;
    Ok((m, r, t, g, s))
}

#[allow(clippy::type_complexity)]
fn full_row(
    p: &Params,
    lp: &[f64],
    lq: &[f64],
    adv: &[f64],
    valid: &[u8],
    d: Option<&[f64]>,
) -> Result<(Vec<i8>, Vec<f64>, Vec<f64>, RowSummary), BadValue> {
    eval_row(p, lp, lq, adv, valid, d).map(|(_, r, t, g, s)| (r, t, g, s))
}

#[test]
fn first_bad_value_is_reported_in_field_order() {
    let mut p = params();
    p.divergence = Divergence::BinaryTv;
    let lp = [-0.1, f64::NAN, -0.2, 0.5];
    let lq = [-0.1, -0.1, f64::INFINITY, -0.1];
    let adv = [1.0; 4];
    let e = full_row(&p, &lp, &lq, &adv, &[1, 1, 1, 1], None).unwrap_err();
    assert_eq!((e.column, e.field), (1, Field::LogProbs));
    // Invalid positions may hold anything.
    let e = full_row(&p, &lp, &lq, &adv, &[1, 0, 1, 1], None).unwrap_err();
    assert_eq!((e.column, e.field), (2, Field::OldLogProbs));
    let ok = full_row(&p, &lp, &lq, &adv, &[1, 0, 0, 0], None);
    assert!(ok.is_ok());
    let e = full_row(
        &p,
        &[-0.1, -0.1],
        &[-0.1, -0.1],
        &[1.0, f64::NAN],
        &[1, 1],
        None,
    )
    .unwrap_err();
    assert_eq!((e.column, e.field), (1, Field::Advantages));
    p.divergence = Divergence::Given;
    let e = full_row(
        &p,
        &[-0.1; 2],
        &[-0.1; 2],
        &[1.0; 2],
        &[1, 1],
        Some(&[0.0, -1e-9]),
    )
    .unwrap_err();
    assert_eq!((e.column, e.field, e.value), (1, Field::Divergence, -1e-9));
}

#[test]
fn adaptive_budget_is_clamped_quantile() {
    let mut p = params();
    p.adaptive_budget = true;
    let n = 11;
    let (lp, lq, adv) = (vec![-1.0; n], vec![-1.2; n], vec![1.0; n]);
    // D = 0, 0.003, ..., 0.03: Q_0.9 = 0.027 -> within [0.02, 0.04].
    let d: Vec<f64> = (0..n).map(|i| i as f64 * 0.003).collect();
    let (_, _, _, s) = full_row(&p, &lp, &lq, &adv, &vec![1; n], Some(&d)).unwrap();
    assert!((s.budget - 0.027).abs() < 1e-15, "{}", s.budget);
    let small: Vec<f64> = d.iter().map(|x| x * 0.1).collect();
    assert_eq!(
        full_row(&p, &lp, &lq, &adv, &vec![1; n], Some(&small))
            .unwrap()
            .3
            .budget,
        0.02
    );
    let big: Vec<f64> = d.iter().map(|x| x * 10.0).collect();
    assert_eq!(
        full_row(&p, &lp, &lq, &adv, &vec![1; n], Some(&big))
            .unwrap()
            .3
            .budget,
        0.04
    );
}

/// The ceiling m of the adaptive budget: clamp(k Q, delta_b, m delta_b).
#[test]
fn budget_ceiling_caps_the_adaptive_budget() {
    let n = 11;
    let (lp, lq, adv) = (vec![-1.0; n], vec![-1.2; n], vec![1.0; n]);
    let budget = |m: f64, scale: f64| {
        let mut p = params();
        p.adaptive_budget = true;
        p.budget_ceiling = m;
        // D = 0, 0.003 scale, ..., 0.03 scale: Q_0.9 = D[9] = 0.027 scale.
        let d: Vec<f64> = (0..n).map(|i| i as f64 * 0.003 * scale).collect();
        let s = full_row(&p, &lp, &lq, &adv, &vec![1; n], Some(&d))
            .unwrap()
            .3;
        (s.budget, d[9])
    };
    // m = 2 (the default, paper Eq. 22): as before this knob existed.
    assert_eq!(budget(2.0, 1.0).0, 0.027);
    assert_eq!(budget(2.0, 3.0).0, 2.0 * 0.02);
    assert_eq!(budget(2.0, 10.0).0, 2.0 * 0.02);
    assert_eq!(params().budget_ceiling, 2.0);
    // m = 5 (the authors' verl pull request): Q = 0.081 is no longer capped at 0.04,
    // and a row's budget reaches 5 delta_b.
    let (b, q) = budget(5.0, 3.0);
    assert_eq!(b, q);
    assert!(b > 2.0 * 0.02 && b < 5.0 * 0.02);
    assert_eq!(budget(5.0, 10.0).0, 5.0 * 0.02);
    assert_eq!(budget(5.0, 0.1).0, 0.02);
    // m = 1 pins the budget at delta_b.
    for scale in [0.1, 1.0, 3.0, 10.0] {
        assert_eq!(budget(1.0, scale).0, 0.02, "scale {scale}");
    }
}

/// The adaptive budget's shortcuts (counting below/above the clamp window, selecting
/// inside it) give exactly the spec's formula over a sorted copy, for every ceiling.
#[test]
fn adaptive_budget_shortcuts_match_the_formula() {
    let mut rng = SplitMix64::new(11, 0);
    let mut uniform = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut scratch = Vec::new();
    for case in 0..400 {
        let n = 1 + (uniform() * 60.0) as usize;
        let spread = [0.001, 0.01, 0.05, 0.3][case % 4];
        let div: Vec<f64> = (0..n)
            .map(|_| -spread * uniform().max(1e-300).ln())
            .collect();
        let valid: Vec<u8> = (0..n).map(|_| (uniform() < 0.8) as u8).collect();
        let mut p = params();
        p.budget_ceiling = [1.0, 2.0, 5.0, 1.5, 3.7][case % 5];
        p.budget_quantile = [0.9, 0.0, 1.0, 0.5, 0.37][(case / 5) % 5];
        p.budget_scale = [1.0, 2.5, 0.5][case % 3];
        let mut values: Vec<f64> = div
            .iter()
            .zip(&valid)
            .filter(|&(_, &v)| v != 0)
            .map(|(&d, _)| d)
            .collect();
        let want = if values.is_empty() {
            p.delta_b
        } else {
            values.sort_by(f64::total_cmp);
            let h = p.budget_quantile * (values.len() - 1) as f64;
            let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
            let q = values[lo] + (h - h.floor()) * (values[hi] - values[lo]);
            (p.budget_scale * q)
                .max(p.delta_b)
                .min(p.budget_ceiling * p.delta_b)
        };
        let got = crate::budget::adaptive_budget(&p, &div, &valid, None, &mut scratch);
        assert_eq!(got.to_bits(), want.to_bits(), "case {case}");
    }
}

#[test]
fn fixed_horizon_and_ablation_switches() {
    let d = [0.10, 0.12, 0.30, 0.05, 0.14];
    let (lp, lq, adv) = ([-1.0; 5], [-1.2; 5], [1.0; 5]);
    // No prefix budget: c_t = delta everywhere, only the token threshold masks.
    let mut p = params();
    p.prefix_budget = false;
    let (r, t, _, _) = full_row(&p, &lp, &lq, &adv, &[1; 5], Some(&d)).unwrap();
    assert_eq!(r, [2, 2, 3, 2, 2]);
    assert!(t.iter().all(|&x| x == 0.15));
    // A long fixed horizon keeps weights near 1: Z_2 = 0.12 * (1 - 0.2 / 99) > c_2.
    let mut p = params();
    p.horizon = 100;
    let (r, _, _, _) = full_row(&p, &lp, &lq, &adv, &[1; 5], Some(&d)).unwrap();
    assert_eq!(r[..2], [2, 4]);
    // Shuffled weights are a permutation of the linear ones (same W at the end).
    let mut p = params();
    p.position_weight = PositionWeight::Shuffled;
    p.shuffle_seed = 7;
    let ones = [1.0; 5];
    let (_, t_shuf, _, _) = full_row(&p, &lp, &lq, &adv, &[1; 5], Some(&ones)).unwrap();
    let (_, t_lin, _, _) = full_row(&params(), &lp, &lq, &adv, &[1; 5], Some(&ones)).unwrap();
    // With D = 1 everywhere, S_{t-1} = W_{t-1}, so the prefix sums' order differs but
    // the first threshold (nothing summed yet) is the same.
    assert_eq!(t_shuf[0], t_lin[0]);
}

#[test]
fn soft_gate_matches_spec() {
    let d = [0.10, 0.12, 0.30];
    let (_, _, g, _) = full_row(
        &params(),
        &[-1.0; 3],
        &[-1.2; 3],
        &[1.0; 3],
        &[1; 3],
        Some(&d),
    )
    .unwrap();
    assert_eq!(g[0], 1.0);
    // T = 3, so w_2 = 0.9: x_2 = max(0.108 / 0.15, 0.208 / (0.15 + 0.02 * 1.0)) = 1.2235...
    let x2 = (0.9f64 * 0.12 / 0.15).max((0.1 + 0.9 * 0.12) / (0.15 + 0.02 * 1.0));
    assert_eq!(g[1], 1.0 / x2);
    // Toward mu: gate 1 whatever the divergence.
    let (_, _, g, _) = full_row(
        &params(),
        &[-1.0; 3],
        &[-1.2; 3],
        &[-1.0; 3],
        &[1; 3],
        Some(&d),
    )
    .unwrap();
    assert_eq!(g, [1.0; 3]);
}

/// Reasons and thresholds without the soft gate equal those computed with it, on
/// rows with holes, padding on both sides and every outcome.
#[test]
fn outputs_without_the_gate_match() {
    let p = params();
    // Valid 1..=8 but 3: within, token threshold, toward (A = 0), prefix budget,
    // toward, away, away, away.
    let lp = [-0.1, -0.1, -0.05, -2.0, -0.2, -0.01, -4.0, -0.1, -0.1, -0.2];
    let lq = [-0.2, -0.2, -0.1, -0.1, -0.3, -2.0, -0.2, -0.3, -0.3, -0.2];
    let adv = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, -1.0];
    let valid = [0u8, 1, 1, 0, 1, 1, 1, 1, 1, 0];
    let d = [0.0, 0.01, 0.2, 0.5, 0.16, 0.05, 0.1, 0.14, 0.001, 0.3];
    let (m, r, t, _, s) = eval_row(&p, &lp, &lq, &adv, &valid, Some(&d)).unwrap();
    let n = valid.len();
    let input = windowed(&valid, &lp, &lq, &adv, Some(&d));
    let (mut m2, mut r2, mut t2) = (vec![true; n], vec![9i8; n], vec![9.0; n]);
    let out = RowOutput {
        mask: &mut m2,
        reason: Some(&mut r2),
        threshold: Some(&mut t2),
        gate: None,
    };
    let s2 = compute_row(&p, 0, &input, &mut Scratch::default(), out).unwrap();
    assert_eq!((m, r, t, s), (m2, r2, t2, s2));
    assert!(
        s.counts.iter().all(|&c| c > 0),
        "every outcome occurs: {:?}",
        s.counts
    );
}

/// Every instruction-set variant this CPU runs (portable, AVX2, AVX-512) gives
/// bit-identical outputs on random rows with holes, for the main knob settings
/// (exact equality between variants; log-probs down to -800 reach `vexp`'s
/// subnormal path).
#[test]
fn all_isa_variants_agree() {
    let isas = Isa::available();
    eprintln!("variants compared: {isas:?}");
    let mut rng = SplitMix64::new(7, 0);
    let mut uniform = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    for case in 0..60 {
        let n = 1 + (uniform() * 700.0) as usize;
        let scale = if case % 7 == 3 { 800.0 } else { 3.0 };
        let lp: Vec<f64> = (0..n).map(|_| -scale * uniform()).collect();
        let lq: Vec<f64> = (0..n).map(|_| -3.0 * uniform()).collect();
        let adv: Vec<f64> = (0..n).map(|_| uniform() - 0.5).collect();
        let valid: Vec<u8> = (0..n).map(|_| (uniform() < 0.9) as u8).collect();
        let mut p = params();
        p.divergence = if case % 2 == 0 {
            Divergence::BinaryTv
        } else {
            Divergence::BinaryKl
        };
        p.prefix_budget = case % 3 != 0;
        p.adaptive_budget = case % 4 == 1;
        p.budget_ceiling = if case % 8 == 5 { 5.0 } else { 2.0 };
        p.position_weight = [
            PositionWeight::Linear,
            PositionWeight::None,
            PositionWeight::Shuffled,
        ][case % 3];
        p.horizon = if case % 5 == 0 { 512 } else { 0 };
        let input = windowed(&valid, &lp, &lq, &adv, None);
        let call = |isa: Isa, out: RowOutput| {
            let mut scratch = Scratch::default();
            compute_row_isa(isa, &p, case, &input, &mut scratch, out).unwrap()
        };
        let run = |isa: Isa, gate: bool| {
            let (mut m, mut r, mut t, mut g) =
                (vec![false; n], vec![0i8; n], vec![0.0; n], vec![0.0; n]);
            let out = RowOutput {
                mask: &mut m,
                reason: Some(&mut r),
                threshold: Some(&mut t),
                gate: if gate { Some(&mut g) } else { None },
            };
            let s = call(isa, out);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            (m, r, bits(&t), bits(&g), s.budget.to_bits(), s.counts)
        };
        for gate in [false, true] {
            for &isa in &isas[1..] {
                assert_eq!(
                    run(isa, gate),
                    run(Isa::Portable, gate),
                    "case {case} {isa:?}"
                );
            }
        }
        let mask_only = |isa: Isa| {
            let mut m = vec![false; n];
            let out = RowOutput {
                mask: &mut m,
                reason: None,
                threshold: None,
                gate: None,
            };
            let s = call(isa, out);
            (m, s.budget.to_bits())
        };
        for &isa in &isas[1..] {
            assert_eq!(
                mask_only(isa),
                mask_only(Isa::Portable),
                "case {case} {isa:?}"
            );
        }
        assert_eq!(
            mask_only(Isa::Portable).0,
            run(Isa::Portable, false).0,
            "case {case}"
        );
    }
}

/// A long row's Binary TV pass split into `SPLIT_CHUNK` chunks over a rayon pool gives
/// bit-identical outputs to the unsplit pass, at any pool size (exact equality).
#[test]
fn split_pass_matches_unsplit() {
    let mut rng = SplitMix64::new(9, 0);
    let mut uniform = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let n = 3 * SPLIT_CHUNK + 123;
    let lp: Vec<f64> = (0..n).map(|_| -2.0 * uniform()).collect();
    let lq: Vec<f64> = (0..n).map(|_| -2.0 * uniform()).collect();
    let adv: Vec<f64> = (0..n).map(|_| uniform() - 0.5).collect();
    let valid: Vec<u8> = (0..n).map(|_| (uniform() < 0.95) as u8).collect();
    for (adaptive, weight) in [
        (true, PositionWeight::Linear),
        (false, PositionWeight::None),
        (true, PositionWeight::Shuffled),
    ] {
        let mut p = params();
        p.divergence = Divergence::BinaryTv;
        p.adaptive_budget = adaptive;
        p.position_weight = weight;
        let run = |split: bool, threads: usize| {
            let mut input = windowed(&valid, &lp, &lq, &adv, None);
            input.split = split;
            let (mut m, mut r, mut t, mut g) =
                (vec![false; n], vec![0i8; n], vec![0.0; n], vec![0.0; n]);
            let s = crate::pool::with_threads(threads, || {
                let out = RowOutput {
                    mask: &mut m,
                    reason: Some(&mut r),
                    threshold: Some(&mut t),
                    gate: Some(&mut g),
                };
                compute_row(&p, 3, &input, &mut Scratch::default(), out).unwrap()
            })
            .unwrap();
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            (m, r, bits(&t), bits(&g), s.budget.to_bits(), s.counts)
        };
        let want = run(false, 1);
        for threads in [1, 2, 3] {
            assert_eq!(run(true, threads), want, "{threads} threads");
        }
    }
}

#[test]
fn row_offset_shifts_the_shuffle_seed() {
    // Row r of a call with row_offset k is seeded as row k + r (wrapping): the same
    // permutation, whatever the split into calls; errors still name the row in the call.
    let n = 12;
    let d: Vec<f64> = (0..n).map(|i| 0.01 * (i % 5) as f64).collect();
    let (lp, lq, adv) = (vec![-1.0; n], vec![-1.1; n], vec![1.0; n]);
    let valid = vec![1u8; n];
    let thresholds = |row_offset: u64, row: usize| {
        let mut p = params();
        p.position_weight = PositionWeight::Shuffled;
        p.shuffle_seed = 11;
        p.row_offset = row_offset;
        let input = windowed(&valid, &lp, &lq, &adv, Some(&d));
        let (mut m, mut r, mut t) = (vec![false; n], vec![0i8; n], vec![0.0; n]);
        let out = RowOutput {
            mask: &mut m,
            reason: Some(&mut r),
            threshold: Some(&mut t),
            gate: None,
        };
        compute_row(&p, row, &input, &mut Scratch::default(), out).unwrap();
        t
    };
    assert_eq!(thresholds(5, 0), thresholds(0, 5));
    assert_eq!(thresholds(3, 4), thresholds(0, 7));
    assert_eq!(thresholds(u64::MAX, 1), thresholds(0, 0));
    assert_ne!(thresholds(5, 0), thresholds(0, 0));
}

/// Every instruction-set variant's Binary TV pass (`tv::tv_span_for`: the AVX2
/// intrinsics for float32/float64, the generic loop otherwise) returns exactly what the
/// portable generic pass returns: D_t, direction bytes, weights and stats, for float32
/// and float64 log-probs, row and token advantages, every weight mode, any span length
/// and start column, with bad values, NaN and arguments below `vexp::TINY` at valid and
/// at padding positions.
#[test]
fn tv_pass_variants_agree() {
    use super::tv::{tv_span, tv_span_for, Span, TvConsts, TvStats, Weights};
    let mut rng = SplitMix64::new(11, 0);
    let mut uniform = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    #[allow(clippy::too_many_arguments)]
    fn check<T: Widen>(
        isa: Isa,
        k: &TvConsts,
        col0: usize,
        lp: &[T],
        lq: &[T],
        adv: Advantage,
        valid: &[u8],
        case: usize,
    ) {
        let n = valid.len();
        let run = |v: Option<Isa>| {
            let (mut d, mut t, mut w) = (vec![7.0; n], vec![9u8; n], vec![5.0; n]);
            let span = Span {
                col0,
                lp,
                lq,
                adv,
                valid,
                div: &mut d,
                toward: &mut t,
                weight: &mut w,
            };
            let s: TvStats = match v {
                Some(isa) => tv_span_for(isa, k, span),
                None => tv_span(k, span),
            };
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let c = s.counts;
            (
                bits(&d),
                t,
                bits(&w),
                s.bad,
                s.tiny,
                c.valid,
                c.below,
                c.above,
            )
        };
        assert_eq!(run(Some(isa)), run(None), "case {case} {isa:?}");
    }
    for case in 0..400 {
        let n = (uniform() * [3.0, 9.0, 40.0, 300.0][case % 4]) as usize;
        let special = |u: f64| match (u * 40.0) as usize {
            0 => f64::NAN,
            1 => 0.5,
            2 => f64::NEG_INFINITY,
            3 => -720.0 - u,
            4 => -1e-7,
            5 => 1e-7,
            _ => -3.0 * u,
        };
        let spiky = case % 3 == 0;
        let mut value = |scale: f64| {
            let u = uniform();
            if spiky {
                special(u)
            } else {
                -scale * u
            }
        };
        // Some cases over the whole exponent range of the fast path (every table entry
        // and scale of `vexp`).
        let scale = if case % 4 == 1 { 236.0 } else { 1.0 };
        let lp: Vec<f64> = (0..n).map(|_| value(3.0 * scale)).collect();
        // Some tokens with lp = lq, and zero advantages: a (p - q) = 0 (kept toward mu).
        let lq: Vec<f64> = (0..n)
            .map(|i| {
                if i % 11 == 3 {
                    lp[i]
                } else {
                    value(2.0 * scale)
                }
            })
            .collect();
        let adv: Vec<f64> = (0..n)
            .map(|i| match i % 17 {
                5 if spiky => f64::INFINITY,
                9 => 0.0,
                _ => uniform() - 0.5,
            })
            .collect();
        let valid: Vec<u8> = (0..n)
            .map(|_| (uniform() < 0.8) as u8 * (1 + (uniform() * 3.0) as u8))
            .collect();
        // Window edges at D = 0 (tokens with lp = lq) test the strict comparisons.
        let (low, high) = match case % 5 {
            0 => (f64::NEG_INFINITY, f64::INFINITY),
            1 => (0.0, 0.0),
            _ => (0.05, 0.3),
        };
        let k = TvConsts {
            low,
            high,
            weights: [Weights::Linear, Weights::Ones, Weights::Skip][case % 3],
            horizon_m1: (1 + (uniform() * 400.0) as usize) as f64,
            one_minus_w_min: 0.2,
        };
        let col0 = (uniform() * 5000.0) as usize;
        let lp32: Vec<f32> = lp.iter().map(|&x| x as f32).collect();
        let lq32: Vec<f32> = lq.iter().map(|&x| x as f32).collect();
        let row_adv = Advantage::Row(if spiky && case % 7 == 0 {
            f64::NAN
        } else {
            adv.first().copied().unwrap_or(0.3)
        });
        for isa in Isa::available() {
            for a in [row_adv, Advantage::Token(&adv)] {
                check(isa, &k, col0, &lp, &lq, a, &valid, case);
                check(isa, &k, col0, &lp32, &lq32, a, &valid, case);
            }
        }
    }
}
