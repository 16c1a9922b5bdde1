// cppo-native: Top-K reduced TV / KL divergence straight from the policy's logits.
//
// UNVERIFIED ON HARDWARE: written without access to a GPU and only compile-checked
// (NVRTC, sm_90). The launcher is python/cppo_native/_topk_cuda.py; the semantics are
// those of cppo_native.divergence.topk_position_reference (docs/divergences.md).
//
// One block per row (position) of logits [N, V] (float32, or float16/bfloat16 passed
// as their 16-bit patterns). One pass over the row computes the log-sum-exp of
// logits / T online (per-thread running max of the raw logits, running sum in float64
// of float32 exp2 over chunks of one 16-byte load, merged in float64 across threads);
// the [N, V] log-softmax is never materialised. Then K + 1 gathers give pi's log-probs at mu's
// top-K ids and at the sampled token, and thread 0 evaluates the bucketed divergence
// in float64 in the reference's operation order.

typedef long long i64;

#define CPPO_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float f16_bits_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float bf16_bits_to_float(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// DT: 0 float32, 1 float16 bits, 2 bfloat16 bits.
template <int DT> struct Elem;
template <> struct Elem<0> {
    typedef float T;
    static __device__ __forceinline__ float f(float x) { return x; }
};
template <> struct Elem<1> {
    typedef unsigned short T;
    static __device__ __forceinline__ float f(unsigned short x) { return f16_bits_to_float(x); }
};
template <> struct Elem<2> {
    typedef unsigned short T;
    static __device__ __forceinline__ float f(unsigned short x) { return bf16_bits_to_float(x); }
};

// Online log-sum-exp state of one thread, in raw logit units: m = running max of x,
// s = sum over seen x of exp((x - m) / T) (float64). A chunk of N values is folded in
// with one max, N fast exp2 in float32 and one float64 add, so the per-element cost
// stays a handful of float32 ops (the pass must run at memory speed).
// -inf adds nothing; NaN is recorded in nan_seen; +inf poisons s (reported as bad logits).
template <int N>
__device__ __forceinline__ void online_chunk(const float* v, float c, double temp, float& m, double& s,
                                             bool& nan_seen) {
    float cm = -CPPO_INF;
#pragma unroll
    for (int j = 0; j < N; ++j) {
        cm = fmaxf(cm, v[j]);
        nan_seen |= (v[j] != v[j]);
    }
    if (cm == -CPPO_INF) return;
    if (cm > m) {
        if (m != -CPPO_INF) s *= exp(((double)m - (double)cm) / temp);
        m = cm;
    }
    float part = 0.0f;
#pragma unroll
    for (int j = 0; j < N; ++j) part += exp2f((v[j] - m) * c);  // c = log2(e) / T
    s += (double)part;
}

// Merges another thread's (m2, s2) into (m, s).
__device__ __forceinline__ void online_merge(float& m, double& s, float m2, double s2, double temp) {
    if (m2 == -CPPO_INF) return;
    if (m == -CPPO_INF) {
        m = m2;
        s = s2;
        return;
    }
    float mx = fmaxf(m, m2);
    s = s * exp(((double)m - (double)mx) / temp) + s2 * exp(((double)m2 - (double)mx) / temp);
    m = mx;
}

// -expm1(l_max) - sum of the other exp(l), floored at 0 (rest_mass_reference).
__device__ double rest_mass(const double* logs, int n) {
    if (n == 0) return 1.0;
    int j = 0;
    for (int i = 1; i < n; ++i)
        if (logs[i] > logs[j]) j = i;
    double rest = -expm1(logs[j]);
    for (int i = 0; i < n; ++i)
        if (i != j) rest -= exp(logs[i]);
    return rest > 0.0 ? rest : 0.0;
}

// Status codes: 0 ok, else 1 + field * 65536 + slot; fields as in _topk_cuda.FIELDS.
#define CPPO_BAD(field, slot) (1 + (field) * 65536 + (slot))

template <int DT, int VEC>
__global__ void topk_divergence_from_logits(
    const typename Elem<DT>::T* __restrict__ logits,
    i64 n_rows, i64 vocab, i64 row_stride,
    double temp,  // temperature T > 0: pi = softmax(logits / T)
    float c,      // log2(e) / T in float32
    int kind,  // 0 TV, 1 KL
    int k,
    const i64* __restrict__ topk_ids,       // [N, K] contiguous
    const double* __restrict__ topk_old,    // [N, K] log mu at the top-K ids
    const i64* __restrict__ sampled_ids,    // [N]
    const double* __restrict__ old_lp,      // [N] log mu(y)
    const unsigned char* __restrict__ valid, int has_valid,
    double* __restrict__ out_div,           // [N]
    double* __restrict__ out_lp, int has_out_lp,            // [N] log pi(y)
    double* __restrict__ out_topk_lp, int has_out_topk_lp,  // [N, K] log pi at top-K ids
    int* __restrict__ status)               // [N]
{
    typedef typename Elem<DT>::T T;
    const i64 row = blockIdx.x;
    if (row >= n_rows) return;
    const int tid = threadIdx.x;
    const T* x = logits + row * row_stride;

    if (has_valid && !valid[row]) {
        if (tid == 0) {
            out_div[row] = 0.0;
            status[row] = 0;
            if (has_out_lp) out_lp[row] = 0.0;
        }
        if (has_out_topk_lp)
            for (int j = tid; j < k; j += blockDim.x) out_topk_lp[row * k + j] = 0.0;
        return;
    }

    // ---- pass over the row: online log-sum-exp of x / T ----
    float m = -CPPO_INF;
    double s = 0.0;
    bool nan_seen = false;
    i64 done = 0;
    if (VEC > 1) {
        // 16-byte loads; the launcher guarantees alignment of x and of row_stride.
        const i64 n_vec = vocab / VEC;
        const uint4* xv = reinterpret_cast<const uint4*>(x);
        float va[VEC], vb[VEC];
        i64 v = tid;
        for (; v + blockDim.x < n_vec; v += 2 * (i64)blockDim.x) {  // two loads in flight
            uint4 a = __ldg(xv + v);
            uint4 b = __ldg(xv + v + blockDim.x);
            const T* ea = reinterpret_cast<const T*>(&a);
            const T* eb = reinterpret_cast<const T*>(&b);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                va[j] = Elem<DT>::f(ea[j]);
                vb[j] = Elem<DT>::f(eb[j]);
            }
            online_chunk<VEC>(va, c, temp, m, s, nan_seen);
            online_chunk<VEC>(vb, c, temp, m, s, nan_seen);
        }
        for (; v < n_vec; v += blockDim.x) {
            uint4 a = __ldg(xv + v);
            const T* ea = reinterpret_cast<const T*>(&a);
#pragma unroll
            for (int j = 0; j < VEC; ++j) va[j] = Elem<DT>::f(ea[j]);
            online_chunk<VEC>(va, c, temp, m, s, nan_seen);
        }
        done = n_vec * VEC;
    }
    for (i64 i = done + tid; i < vocab; i += blockDim.x) {
        float one = Elem<DT>::f(x[i]);
        online_chunk<1>(&one, c, temp, m, s, nan_seen);
    }

    // ---- block reduction of (m, s) ----
    for (int off = 16; off > 0; off >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, off);
        double s2 = __shfl_xor_sync(0xffffffffu, s, off);
        online_merge(m, s, m2, s2, temp);
    }
    __shared__ float warp_m[32];
    __shared__ double warp_s[32];
    __shared__ double lse_shared;
    const int warp = tid >> 5, lane = tid & 31, n_warps = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        warp_m[warp] = m;
        warp_s[warp] = s;
    }
    const bool any_nan = __syncthreads_or(nan_seen);
    if (warp == 0) {
        m = lane < n_warps ? warp_m[lane] : -CPPO_INF;
        s = lane < n_warps ? warp_s[lane] : 0.0;
        for (int off = 16; off > 0; off >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, off);
            double s2 = __shfl_xor_sync(0xffffffffu, s, off);
            online_merge(m, s, m2, s2, temp);
        }
        // log Z of pi = softmax(x / T); NaN/inf flags a bad row (NaN or +inf logits,
        // or every logit -inf).
        if (lane == 0) lse_shared = any_nan ? __longlong_as_double(0x7ff8000000000000LL) : (double)m / temp + log(s);
    }
    __syncthreads();
    const double lse = lse_shared;

    // ---- gathers: pi's log-probs at the top-K ids (dynamic shared memory) ----
    extern __shared__ double dyn[];  // 2 (K + 1) doubles: room for the sampled bucket
    double* pi_k = dyn;
    double* mu_k = dyn + (k + 1);
    for (int j = tid; j < k; j += blockDim.x) {
        const i64 id = topk_ids[row * k + j];
        double b = 0.0;
        if (id >= 0 && id < vocab) b = (double)Elem<DT>::f(x[id]) / temp - lse;
        pi_k[j] = b;
        mu_k[j] = topk_old[row * k + j];
        if (has_out_topk_lp) out_topk_lp[row * k + j] = b;
    }
    __syncthreads();
    if (tid != 0) return;

    // ---- thread 0: validation (documented order) and the divergence ----
    const i64 y = sampled_ids[row];
    const double lq = old_lp[row];
    double lp = 0.0;
    if (y >= 0 && y < vocab) lp = (double)Elem<DT>::f(x[y]) / temp - lse;
    if (has_out_lp) out_lp[row] = lp;
    int bad = 0;
    const double tol = 1e-6;
    if (!isfinite(lse)) bad = CPPO_BAD(6, 0);
    else if (y < 0) bad = CPPO_BAD(2, 0);
    else if (y >= vocab) bad = CPPO_BAD(8, 0);
    else if (!isfinite(lp)) bad = CPPO_BAD(0, 0);
    else if (!(isfinite(lq) && lq <= tol)) bad = CPPO_BAD(1, 0);
    else {
        for (int j = 0; j < k && !bad; ++j) {
            const i64 id = topk_ids[row * k + j];
            if (id < 0) continue;
            if (id >= vocab) { bad = CPPO_BAD(7, j); break; }
            for (int i = 0; i < j; ++i)
                if (topk_ids[row * k + i] == id) { bad = CPPO_BAD(3, j); break; }
            if (bad) break;
            if (isnan(mu_k[j]) || mu_k[j] > tol) bad = CPPO_BAD(4, j);
        }
    }
    status[row] = bad;
    if (bad) {
        out_div[row] = 0.0;
        return;
    }

    // Buckets in the reference's order: listed top-K slots, then the sampled token when
    // it is not listed. Reuse the shared arrays: compact (a, b) in place.
    int n = 0;
    bool sampled_listed = false;
    for (int j = 0; j < k; ++j) {
        const i64 id = topk_ids[row * k + j];
        if (id < 0) continue;
        if (id == y) sampled_listed = true;
        const double a = mu_k[j] < 0.0 ? mu_k[j] : 0.0;
        const double b = pi_k[j] < 0.0 ? pi_k[j] : 0.0;
        mu_k[n] = a;
        pi_k[n] = b;
        ++n;
    }
    if (!sampled_listed) {
        mu_k[n] = lq < 0.0 ? lq : 0.0;
        pi_k[n] = lp < 0.0 ? lp : 0.0;
        ++n;
    }
    const double other_mu = rest_mass(mu_k, n);
    const double other_pi = rest_mass(pi_k, n);
    double acc = 0.0;
    if (kind == 0) {
        for (int j = 0; j < n; ++j) acc += fabs(exp(mu_k[j]) - exp(pi_k[j]));
        out_div[row] = 0.5 * (acc + fabs(other_mu - other_pi));
    } else {
        const double eps = 1e-12;
        const double log_eps = log(eps);
        for (int j = 0; j < n; ++j) {
            const double mm = exp(mu_k[j]);
            if (mm > 0.0) acc += mm * (fmax(mu_k[j], log_eps) - fmax(pi_k[j], log_eps));
        }
        if (other_mu > 0.0) acc += other_mu * (log(fmax(other_mu, eps)) - log(fmax(other_pi, eps)));
        out_div[row] = acc > 0.0 ? acc : 0.0;
    }
}
