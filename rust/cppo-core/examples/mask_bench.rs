//! Dev micro-benchmark of the batch kernel (no Python): synthetic right-padded batches
//! like `cppo_native.sample.make_rollout_batch` (lengths uniform in [L/4, L], Binary TV
//! from log-probs, adaptive budget, per-row advantages, bool mask), timed at 1 and 2
//! threads. `cargo run --release --example mask_bench [--features phase-timing] [-- f64] [info] [pad] [reps]`
//! (`pad`: every position is padding, which times the per-call work outside the rows'
//! arithmetic: reading the response mask, writing the output mask, handing out rows).

use std::time::Instant;

use cppo_core::batch::{compute_batch_threads, BatchInput, BatchOutput, Layout};
use cppo_core::params::{Divergence, Params, PositionWeight};
use cppo_core::views::{FloatView, MaskView};
use ndarray::{ArrayD, IxDyn};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.next(), self.next());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

struct Batch {
    b: usize,
    l: usize,
    lp: Vec<f64>,
    lq: Vec<f64>,
    adv: Vec<f64>,
    valid: Vec<bool>,
}

fn make(b: usize, l: usize, seed: u64) -> Batch {
    let mut rng = Rng(seed | 1);
    let (mut lp, mut lq, mut valid) = (vec![0.0; b * l], vec![0.0; b * l], vec![false; b * l]);
    let mut adv = vec![0.0; b];
    for r in 0..b {
        let len = l / 4 + ((rng.next() * (l - l / 4 + 1) as f64) as usize).min(l - l / 4);
        let drift = 0.03 * (0.6 * rng.normal()).exp();
        adv[r] = rng.normal();
        for c in 0..l {
            let old = 0.35 * rng.next().ln();
            let ramp = 0.5 + c as f64 / l as f64;
            lq[r * l + c] = old;
            lp[r * l + c] = (old + rng.normal() * drift * ramp).min(0.0);
            valid[r * l + c] = c < len;
        }
    }
    Batch {
        b,
        l,
        lp,
        lq,
        adv,
        valid,
    }
}

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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let f64_inputs = args.iter().any(|a| a == "f64");
    let info = args.iter().any(|a| a == "info");
    let pad = args.iter().any(|a| a == "pad");
    let reps: usize = args
        .iter()
        .filter_map(|a| a.parse().ok())
        .next()
        .unwrap_or(20);
    let p = params();
    for (b, l) in [(256, 8192), (64, 8192), (16, 16384)] {
        let mut data = make(b, l, 1234);
        if pad {
            data.valid.fill(false);
        }
        let shape = IxDyn(&[b, l]);
        let lp64 = ArrayD::from_shape_vec(shape.clone(), data.lp.clone()).unwrap();
        let lq64 = ArrayD::from_shape_vec(shape.clone(), data.lq.clone()).unwrap();
        let lp32 = lp64.mapv(|x| x as f32);
        let lq32 = lq64.mapv(|x| x as f32);
        let adv = ArrayD::from_shape_vec(IxDyn(&[b]), data.adv.clone()).unwrap();
        let valid = ArrayD::from_shape_vec(shape, data.valid.clone()).unwrap();
        let valid_tokens = data.valid.iter().filter(|&&v| v).count();
        let mut mask = vec![false; b * l];
        let mut reason = vec![0i8; b * l];
        let mut threshold = vec![0f64; b * l];
        let mut gate = vec![0f64; b * l];
        let mut budget = vec![0f64; b];
        let mut times = [0.0f64; 2];
        for (ti, threads) in [1usize, 2].into_iter().enumerate() {
            let mut best = f64::INFINITY;
            let mut all = Vec::new();
            for rep in 0..reps + 2 {
                let input = BatchInput {
                    layout: Layout::Padded {
                        rows: data.b,
                        cols: data.l,
                    },
                    log_probs: if f64_inputs {
                        FloatView::F64(lp64.view())
                    } else {
                        FloatView::F32(lp32.view())
                    },
                    old_log_probs: if f64_inputs {
                        FloatView::F64(lq64.view())
                    } else {
                        FloatView::F32(lq32.view())
                    },
                    advantages: FloatView::F64(adv.view()),
                    advantage_per_row: true,
                    valid: Some(MaskView::Bool(valid.view())),
                    divergence: None,
                };
                let output = BatchOutput {
                    mask: &mut mask,
                    reason: info.then_some(&mut reason[..]),
                    threshold: info.then_some(&mut threshold[..]),
                    gate: info.then_some(&mut gate[..]),
                    row_budget: Some(&mut budget),
                };
                let t0 = Instant::now();
                compute_batch_threads(threads, &p, &input, output)
                    .unwrap()
                    .unwrap();
                let dt = t0.elapsed().as_secs_f64();
                if rep >= 2 {
                    best = best.min(dt);
                    all.push(dt);
                }
            }
            #[cfg(feature = "phase-timing")]
            {
                let ph: Vec<f64> = cppo_core::row::PHASE_NS
                    .iter()
                    .map(|a| {
                        a.swap(0, std::sync::atomic::Ordering::Relaxed) as f64
                            / ((reps + 2) * b * l) as f64
                    })
                    .collect();
                println!("    phases, ns per padded token summed over threads (checks+divergence, budget, weights, scan+outputs): {ph:.2?}");
            }
            all.sort_by(f64::total_cmp);
            let med = all[all.len() / 2];
            times[ti] = med;
            println!(
                "{b:4} x {l:5} {} {}T: median {:7.3} ms  best {:7.3} ms  {:5.2} ns/padded token/core  {:5.2} ns/valid token/core",
                if f64_inputs { "f64" } else { "f32" },
                threads,
                med * 1e3,
                best * 1e3,
                med * 1e9 * threads as f64 / (b * l) as f64,
                med * 1e9 * threads as f64 / valid_tokens as f64,
            );
        }
        let kept = mask.iter().filter(|&&m| m).count();
        println!(
            "    1->2 threads {:.2}x; kept {kept}; budget[0..4] {:?}",
            times[0] / times[1],
            &budget[..4]
        );
    }
}
