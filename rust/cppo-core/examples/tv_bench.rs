//! Dev micro-benchmark of the Binary TV pass alone (`row::bench_tv_pass`): ns per
//! token for each instruction-set variant this CPU runs, f32 and f64 log-probs.
//! `cargo run --release -p cppo-core --example tv_bench --features phase-timing`.

use cppo_core::row::{bench_tv_pass, Isa};

fn main() {
    let n = 8192;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let lq: Vec<f64> = (0..n).map(|_| 0.35 * next().ln()).collect();
    let lp: Vec<f64> = lq
        .iter()
        .map(|&q| (q + 0.05 * (next() - 0.5)).min(0.0))
        .collect();
    let valid: Vec<u8> = (0..n).map(|_| (next() < 0.97) as u8).collect();
    let (lp32, lq32): (Vec<f32>, Vec<f32>) = (
        lp.iter().map(|&v| v as f32).collect(),
        lq.iter().map(|&v| v as f32).collect(),
    );
    for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
        if !isa.supported() || isa == Isa::Portable {
            continue;
        }
        let (t32, k32) = bench_tv_pass(isa, &lp32, &lq32, 0.7, &valid, 2001);
        let (t64, k64) = bench_tv_pass(isa, &lp, &lq, 0.7, &valid, 2001);
        println!(
            "{:8} f32 {t32:.3} ns/token  f64 {t64:.3} ns/token  ({k32} {k64})",
            isa.name()
        );
        // Many rows (inputs beyond L2, as in a batch), all valid.
        let rows = 256;
        let (blp, blq): (Vec<f32>, Vec<f32>) = (
            (0..rows).flat_map(|_| lp32.iter().copied()).collect(),
            (0..rows).flat_map(|_| lq32.iter().copied()).collect(),
        );
        let ones = vec![1u8; n];
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t0 = std::time::Instant::now();
            for r in 0..rows {
                let s = r * n..(r + 1) * n;
                bench_tv_pass(isa, &blp[s.clone()], &blq[s], 0.7, &ones, 1);
            }
            best = best.min(t0.elapsed().as_secs_f64() * 1e9 / (rows * n) as f64);
        }
        println!(
            "{:8} f32 {rows} rows of {n}, all valid: {best:.3} ns/token",
            isa.name()
        );
    }
}
