use super::*;
use crate::params::{Divergence, PositionWeight};
use ndarray::{ArrayD, IxDyn};

fn params() -> Params {
    Params {
        delta: 0.15,
        delta_b: 0.02,
        w_min: 0.8,
        horizon: 0,
        adaptive_budget: true,
        budget_quantile: 0.9,
        budget_scale: 1.0,
        budget_ceiling: 2.0,
        position_weight: PositionWeight::Linear,
        shuffle_seed: 0,
        row_offset: 0,
        prefix_budget: true,
        divergence: Divergence::BinaryTv,
    }
}

type Outputs = (
    Vec<bool>,
    Vec<i8>,
    Vec<u64>,
    Vec<u64>,
    Vec<u64>,
    Result<[u64; 5], BadValue>,
);

/// A right-padded batch with the given row lengths (cols = the longest); `bad`
/// puts a NaN log-prob at (row, 0).
/// `how`: None runs row by row (`compute_batch` on a one-thread pool, no groups),
/// Some(threads) `compute_batch_threads`; `info`: reasons, thresholds and gates too
/// (else the mask-only path, whose scans run in groups of up to four rows).
fn run(lengths: &[usize], bad: &[usize], how: Option<usize>, info: bool) -> Outputs {
    let (rows, cols) = (lengths.len(), *lengths.iter().max().unwrap());
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut rnd = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let lq: Vec<f32> = (0..rows * cols).map(|_| -(3.0 * rnd()) as f32).collect();
    let mut lp: Vec<f32> = lq
        .iter()
        .map(|&q| (q + (rnd() - 0.5) as f32).min(0.0))
        .collect();
    for &r in bad {
        lp[r * cols] = f32::NAN;
    }
    let valid: Vec<bool> = (0..rows * cols)
        .map(|i| i % cols < lengths[i / cols])
        .collect();
    let adv: Vec<f32> = (0..rows).map(|_| (rnd() - 0.5) as f32).collect();
    let (lp, lq) = (
        ArrayD::from_shape_vec(IxDyn(&[rows, cols]), lp).unwrap(),
        ArrayD::from_shape_vec(IxDyn(&[rows, cols]), lq).unwrap(),
    );
    let adv = ArrayD::from_shape_vec(IxDyn(&[rows]), adv).unwrap();
    let valid = ArrayD::from_shape_vec(IxDyn(&[rows, cols]), valid).unwrap();
    let input = BatchInput {
        layout: Layout::Padded { rows, cols },
        log_probs: FloatView::F32(lp.view()),
        old_log_probs: FloatView::F32(lq.view()),
        advantages: FloatView::F32(adv.view()),
        advantage_per_row: true,
        valid: Some(MaskView::Bool(valid.view())),
        divergence: None,
    };
    let n = rows * cols;
    let (mut m, mut r, mut t, mut g, mut b) = (
        vec![false; n],
        vec![0i8; n],
        vec![0.0; n],
        vec![0.0; n],
        vec![0.0; rows],
    );
    let output = BatchOutput {
        mask: &mut m,
        reason: info.then_some(&mut r[..]),
        threshold: info.then_some(&mut t[..]),
        gate: info.then_some(&mut g[..]),
        row_budget: Some(&mut b),
    };
    let p = params();
    let res = match how {
        None => crate::pool::with_threads(1, || compute_batch(&p, &input, output)).unwrap(),
        Some(threads) => compute_batch_threads(threads, &p, &input, output).unwrap(),
    };
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    (m, r, bits(&t), bits(&g), bits(&b), res)
}

#[test]
fn results_do_not_depend_on_threads_or_path() {
    // Row by row; serial (groups of 4, short tails); the caller with helpers (many rows, few equal rows); the pool with
    // split rows (one row above its share); small batches inline; bad values.
    let many: Vec<usize> = (0..96).map(|i| 200 + (i * 37) % 500).collect();
    let cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
        (many.clone(), vec![]),
        (vec![9000, 8000, 12000, 7000, 11000, 9500], vec![]),
        (vec![40000, 1000, 2000, 500], vec![]),
        (vec![50000], vec![]),
        (vec![30, 70, 5], vec![]),
        (vec![1, 9, 3, 4, 2, 6, 17], vec![]),
        (many, vec![70, 12]),
        (vec![40000, 1000, 2000, 500], vec![3, 1]),
    ];
    for ((lengths, bad), info) in cases
        .into_iter()
        .flat_map(|c| [(c.clone(), true), (c, false)])
    {
        let want = run(&lengths, &bad, None, info);
        assert_eq!(want.5.is_err(), !bad.is_empty());
        if let Err(e) = want.5 {
            assert_eq!(e.row, *bad.iter().min().unwrap());
        }
        for threads in [1, 2, 3, 0] {
            for _ in 0..3 {
                let got = run(&lengths, &bad, Some(threads), info);
                assert_eq!(got.0, want.0, "mask");
                assert_eq!(got.1, want.1, "reason");
                assert_eq!(got.2, want.2, "threshold");
                assert_eq!(got.3, want.3, "gate");
                assert_eq!(got.4, want.4, "budget");
                // (Debug: the bad value is a NaN)
                assert_eq!(
                    format!("{:?}", got.5),
                    format!("{:?}", want.5),
                    "{threads} threads, lengths {:?}",
                    &lengths[..lengths.len().min(6)]
                );
            }
        }
    }
}

/// `row_cost` finds a row's valid window in every mask dtype, with the flags
/// `MaskView::row_into` reads (floats: +-0.0 invalid, NaN valid).
#[test]
fn row_cost_is_the_valid_window_in_every_mask_dtype() {
    let (rows, cols) = (6, 70);
    // Rows: empty, one valid at each end, a hole in the middle, all valid, late start.
    let spans: [&[usize]; 6] = [
        &[],
        &[0, 69],
        &[3, 4, 40],
        &[17],
        &(0..70).collect::<Vec<_>>(),
        &[50, 66],
    ];
    let mut flags = vec![0u8; rows * cols];
    for (r, cols_valid) in spans.iter().enumerate() {
        for &c in cols_valid.iter() {
            flags[r * cols + c] = 1;
        }
    }
    let shape = IxDyn(&[rows, cols]);
    let f64s: Vec<f64> = flags
        .iter()
        .enumerate()
        .map(|(i, &f)| match (f, i % 3) {
            (1, 0) => f64::NAN,
            (1, 1) => -2.5,
            (1, _) => 1.0,
            (_, 0) => -0.0,
            _ => 0.0,
        })
        .collect();
    let bools =
        ArrayD::from_shape_vec(shape.clone(), flags.iter().map(|&f| f != 0).collect()).unwrap();
    let u8s =
        ArrayD::from_shape_vec(shape.clone(), flags.iter().map(|&f| f * 200).collect()).unwrap();
    let i8s =
        ArrayD::from_shape_vec(shape.clone(), flags.iter().map(|&f| -(f as i8)).collect()).unwrap();
    let i32s = ArrayD::from_shape_vec(
        shape.clone(),
        flags.iter().map(|&f| (f as i32) << 20).collect(),
    )
    .unwrap();
    let i64s = ArrayD::from_shape_vec(
        shape.clone(),
        flags.iter().map(|&f| (f as i64) << 40).collect(),
    )
    .unwrap();
    let f32s =
        ArrayD::from_shape_vec(shape.clone(), f64s.iter().map(|&x| x as f32).collect()).unwrap();
    let f64s = ArrayD::from_shape_vec(shape.clone(), f64s).unwrap();
    let floats = ArrayD::<f64>::zeros(shape.clone());
    let adv = ArrayD::<f64>::zeros(IxDyn(&[rows]));
    let views = [
        MaskView::Bool(bools.view()),
        MaskView::U8(u8s.view()),
        MaskView::I8(i8s.view()),
        MaskView::I32(i32s.view()),
        MaskView::I64(i64s.view()),
        MaskView::F32(f32s.view()),
        MaskView::F64(f64s.view()),
    ];
    for view in views {
        let input = BatchInput {
            layout: Layout::Padded { rows, cols },
            log_probs: FloatView::F64(floats.view()),
            old_log_probs: FloatView::F64(floats.view()),
            advantages: FloatView::F64(adv.view()),
            advantage_per_row: true,
            valid: Some(view),
            divergence: None,
        };
        for r in 0..rows {
            let mut buf = Vec::new();
            let got = row_cost(&input, r);
            let mask = input.valid.as_ref().unwrap();
            let flags = mask.row_flags(&input.layout, r, &mut buf).to_vec();
            let window = row_window(&input, r).expect("a contiguous row");
            assert_eq!(window, valid_window(&flags), "row {r}");
            assert_eq!(got, [0, 70, 38, 1, 70, 17][r], "row {r}");
            // The window's flags alone, over a buffer of stale values.
            let mut stale = vec![7u8; cols];
            let part = mask.row_flags_in(&input.layout, r, &mut stale, window.clone());
            assert_eq!(part.len(), cols);
            assert_eq!(&part[window.clone()], &flags[window], "row {r}");
        }
    }
    assert_eq!(window_range(&[0i64; 40]), 0..0);
    assert_eq!(window_range(&[0i64, 0, 7]), 2..3);
    assert_eq!(window_range(&[-0.0f64, f64::NAN, 0.0]), 1..2);
}
