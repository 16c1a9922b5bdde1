// cppo-native: Top-K reduced TV / KL divergence straight from the policy's logits.
//
// UNVERIFIED ON HARDWARE: written without access to a GPU; compile-checked with NVRTC
// under CuPy 14.2's options (tests/test_topk_logits_gpu.py). The launcher is
// python/cppo_native/_backends/cuda/topk.py; the semantics are those of
// cppo_native.divergence.topk_position_reference (docs/divergences.md).
//
// One block per row (position) of logits [N, V] (float32, or float16/bfloat16 passed
// as their 16-bit patterns). One pass over the row computes the log-sum-exp of
// logits / T online (per-thread running max of the raw logits, running sum in float64
// of float32 exp2 over chunks of one 16-byte load, merged in float64 across threads);
// the [N, V] log-softmax is never materialised. Then K + 1 gathers give pi's log-probs at mu's
// top-K ids and at the sampled token; the block checks the slots in parallel (each
// thread its slots: id range, duplicate among the earlier slots, mu's log-prob; the
// first bad slot wins by a shared atomicMin) and warp 0 evaluates the bucketed
// divergence in float64 (lane-strided sums and warp reductions; the rest masses
// exclude the largest bucket exactly as the reference does).

typedef long long i64;
typedef unsigned long long u64;

#define CPPO_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float f16_bits_to_float(unsigned short h) {
#ifdef CPPO_EMU  // the CPU emulator of the tests (tests/cuda_emu): no PTX
    return ::emu::half_bits_to_float(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

#ifndef CPPO_DYNAMIC_SHARED  // the emulator defines its own
#define CPPO_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

__device__ __forceinline__ float bf16_bits_to_float(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// float32 bits -> double exactly, whatever -ftz says (CuPy adds -ftz=true, under which
// (double)float flushes subnormals): used for the K + 1 gathered logits.
__device__ __forceinline__ double f32_exact(float f) {
    const unsigned int b = __float_as_uint(f);
    const unsigned int e = (b >> 23) & 0xffu, m = b & 0x7fffffu;
    if (e != 0) return (double)f;  // normal, inf, NaN: cvt is exact
    const double mag = (double)m * 1.401298464324817e-45;  // m * 2^-149, exact
    return (b >> 31) ? -mag : mag;
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

// Status codes (1 + field * 65536 + slot) and fields, as _backends/cuda/topk.py FIELDS
// (tests/test_codes.py parses this enum).
enum {
    TK_LOG_PROBS = 0, TK_OLD_LOG_PROBS = 1, TK_SAMPLED_IDS = 2, TK_TOPK_IDS = 3, TK_TOPK_OLD_LOG_PROBS = 4,
    TK_TOPK_LOG_PROBS = 5, TK_LOGITS = 6, TK_TOPK_IDS_RANGE = 7, TK_SAMPLED_IDS_RANGE = 8
};
#define CPPO_BAD(field, slot) (1 + (field) * 65536 + (slot))
#define TK_ROW_SHIFT 20  // error key: (global row << 20) | status; status < 2^20 (K <= 2048)

// Online log-sum-exp state of one thread, in raw logit units: m = running max of x,
// s = sum over seen x of exp((x - m) / T) (float64). A chunk of N values is folded in
// with one max, N fast exp2 in float32 and one float64 add, so the per-element cost
// stays a handful of float32 ops (the pass must run at memory speed).
// -inf adds nothing. A NaN makes the chunk's max NaN (the max below propagates it), so
// s becomes NaN and stays NaN through every merge; +inf makes s NaN too (inf - inf).
// Either way the row's log-sum-exp is not finite and the row is reported as bad logits.
template <int N>
__device__ __forceinline__ void online_chunk(const float* v, float c, double temp, float& m, double& s) {
    float cm = -CPPO_INF;
#pragma unroll
    for (int j = 0; j < N; ++j) cm = (v[j] > cm || v[j] != v[j]) ? v[j] : cm;  // NaN-propagating max
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

// Merges another thread's (m2, s2) into (m, s). A state with m = -inf has s = 0, or
// NaN when it saw a NaN: added as is, so the NaN survives.
__device__ __forceinline__ void online_merge(float& m, double& s, float m2, double s2, double temp) {
    if (m2 == -CPPO_INF) {
        s += s2;
        return;
    }
    if (m == -CPPO_INF) {
        m = m2;
        s = s2 + s;
        return;
    }
    float mx = fmaxf(m, m2);
    s = s * exp(((double)m - (double)mx) / temp) + s2 * exp(((double)m2 - (double)mx) / temp);
    m = mx;
}

__device__ __forceinline__ double warp_sum(double x) {
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    return x;
}

// Warp argmax of (value, index): the largest value, the smallest index among equal
// values (the reference keeps the first maximum). Every lane gets the result.
__device__ __forceinline__ void warp_argmax(double& v, int& i) {
    for (int off = 16; off > 0; off >>= 1) {
        const double v2 = __shfl_xor_sync(0xffffffffu, v, off);
        const int i2 = __shfl_xor_sync(0xffffffffu, i, off);
        if (v2 > v || (v2 == v && i2 < i)) {
            v = v2;
            i = i2;
        }
    }
}

template <int DT, int VEC>
__global__ void __launch_bounds__(256) topk_divergence_from_logits(
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
    u64* __restrict__ error,                // min over bad rows of (row_base + row) << 20 | status
    i64 row_base)                           // index of this launch's first row in the whole call
{
    typedef typename Elem<DT>::T T;
    const i64 row = blockIdx.x;
    if (row >= n_rows) return;
    const int tid = threadIdx.x;
    const T* x = logits + row * row_stride;

    if (has_valid && !valid[row]) {
        if (tid == 0) {
            out_div[row] = 0.0;
            if (has_out_lp) out_lp[row] = 0.0;
        }
        if (has_out_topk_lp)
            for (int j = tid; j < k; j += blockDim.x) out_topk_lp[row * k + j] = 0.0;
        return;
    }

    // ---- pass over the row: online log-sum-exp of x / T ----
    float m = -CPPO_INF;
    double s = 0.0;
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
            online_chunk<VEC>(va, c, temp, m, s);
            online_chunk<VEC>(vb, c, temp, m, s);
        }
        for (; v < n_vec; v += blockDim.x) {
            uint4 a = __ldg(xv + v);
            const T* ea = reinterpret_cast<const T*>(&a);
#pragma unroll
            for (int j = 0; j < VEC; ++j) va[j] = Elem<DT>::f(ea[j]);
            online_chunk<VEC>(va, c, temp, m, s);
        }
        done = n_vec * VEC;
    }
    for (i64 i = done + tid; i < vocab; i += blockDim.x) {
        float one = Elem<DT>::f(x[i]);
        online_chunk<1>(&one, c, temp, m, s);
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
    __shared__ int first_bad_slot;  // min over bad slots of slot * 4 + check (0 range, 1 duplicate, 2 mu)
    __shared__ int row_status;
    const int warp = tid >> 5, lane = tid & 31, n_warps = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        warp_m[warp] = m;
        warp_s[warp] = s;
    }
    if (tid == 0) first_bad_slot = 0x7fffffff;
    __syncthreads();
    if (warp == 0) {
        m = lane < n_warps ? warp_m[lane] : -CPPO_INF;
        s = lane < n_warps ? warp_s[lane] : 0.0;
        for (int off = 16; off > 0; off >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, off);
            double s2 = __shfl_xor_sync(0xffffffffu, s, off);
            online_merge(m, s, m2, s2, temp);
        }
        // log Z of pi = softmax(x / T); not finite for NaN or +inf logits or all -inf.
        if (lane == 0) lse_shared = (double)m / temp + log(s);
    }
    __syncthreads();
    const double lse = lse_shared;

    // ---- gathers: pi's log-probs at the top-K ids (dynamic shared memory) ----
    // [pi_k: K + 1 doubles][mu_k: K + 1 doubles][id_k: K ints]; 20 (K + 1) bytes.
    CPPO_DYNAMIC_SHARED(double, dyn);
    double* pi_k = dyn;
    double* mu_k = dyn + (k + 1);
    int* id_k = reinterpret_cast<int*>(dyn + 2 * (k + 1));
    const double tol = 1e-6;
    for (int j = tid; j < k; j += blockDim.x) {
        const i64 id = topk_ids[row * k + j];
        double b = 0.0;
        if (id >= 0 && id < vocab) b = f32_exact(Elem<DT>::f(x[id])) / temp - lse;
        pi_k[j] = b;
        mu_k[j] = topk_old[row * k + j];
        id_k[j] = id < 0 ? -1 : (id < vocab ? (int)id : -2);  // vocab < 2^31 (checked on the host)
        if (has_out_topk_lp) out_topk_lp[row * k + j] = b;
    }
    __syncthreads();

    // ---- validation, slots in parallel: the first bad slot in slot order wins ----
    for (int j = tid; j < k; j += blockDim.x) {
        const int id = id_k[j];
        if (id == -1) continue;  // padding
        int check = -1;
        if (id == -2) check = 0;  // id >= V
        else {
            for (int i = 0; i < j; ++i)
                if (id_k[i] == id) { check = 1; break; }
            if (check < 0 && (isnan(mu_k[j]) || mu_k[j] > tol)) check = 2;
        }
        if (check >= 0) {
            atomicMin(&first_bad_slot, j * 4 + check);
            break;  // this thread's later slots cannot come first
        }
    }
    const i64 y = sampled_ids[row];
    const double lq = old_lp[row];
    double lp = 0.0;
    if (y >= 0 && y < vocab) lp = f32_exact(Elem<DT>::f(x[y])) / temp - lse;
    __syncthreads();
    if (tid == 0) {
        if (has_out_lp) out_lp[row] = lp;
        int bad = 0;
        if (!isfinite(lse)) bad = CPPO_BAD(TK_LOGITS, 0);
        else if (y < 0) bad = CPPO_BAD(TK_SAMPLED_IDS, 0);
        else if (y >= vocab) bad = CPPO_BAD(TK_SAMPLED_IDS_RANGE, 0);
        else if (!isfinite(lp)) bad = CPPO_BAD(TK_LOG_PROBS, 0);
        else if (!(isfinite(lq) && lq <= tol)) bad = CPPO_BAD(TK_OLD_LOG_PROBS, 0);
        else if (first_bad_slot != 0x7fffffff) {
            const int slot = first_bad_slot >> 2, check = first_bad_slot & 3;
            const int field = check == 0 ? TK_TOPK_IDS_RANGE : (check == 1 ? TK_TOPK_IDS : TK_TOPK_OLD_LOG_PROBS);
            bad = CPPO_BAD(field, slot);
        }
        row_status = bad;
        if (bad) {
            out_div[row] = 0.0;
            atomicMin(error, ((u64)(row_base + row) << TK_ROW_SHIFT) | (u64)bad);
        }
    }
    __syncthreads();
    if (row_status != 0 || warp != 0) return;

    // ---- warp 0: the bucketed divergence ----
    // Buckets: the listed slots (slot order), then the sampled token when not listed
    // (index k). a = min(log mu, 0), b = min(log pi, 0).
    bool listed = false;
    double max_a = -CPPO_INF, max_b = -CPPO_INF;
    int arg_a = 0x7fffffff, arg_b = 0x7fffffff;
    for (int j = lane; j < k; j += 32) {
        if (id_k[j] < 0) continue;
        listed |= (i64)id_k[j] == y;
        const double a = mu_k[j] < 0.0 ? mu_k[j] : 0.0, b = pi_k[j] < 0.0 ? pi_k[j] : 0.0;
        mu_k[j] = a;
        pi_k[j] = b;
        if (a > max_a) { max_a = a; arg_a = j; }  // lanes visit slots in increasing order
        if (b > max_b) { max_b = b; arg_b = j; }
    }
    listed = __any_sync(0xffffffffu, listed);
    const int nb = listed ? k : k + 1;  // bucket indices 0..nb-1 (padding slots skipped)
    if (!listed && lane == 0) {
        const double a = lq < 0.0 ? lq : 0.0, b = lp < 0.0 ? lp : 0.0;
        mu_k[k] = a;
        pi_k[k] = b;
        if (a > max_a) { max_a = a; arg_a = k; }
        if (b > max_b) { max_b = b; arg_b = k; }
    }
    __syncwarp();
    warp_argmax(max_a, arg_a);
    warp_argmax(max_b, arg_b);
    const bool any_bucket = arg_a != 0x7fffffff;
    // rest = -expm1(l_max) - sum of exp(l) over the other buckets, floored at 0.
    double sum_a = 0.0, sum_b = 0.0, acc = 0.0;
    const double eps = 1e-12;
    const double log_eps = log(eps);
    for (int j = lane; j < nb; j += 32) {
        if (j < k && id_k[j] < 0) continue;
        const double a = mu_k[j], b = pi_k[j];
        const double ea = exp(a), eb = exp(b);
        if (j != arg_a) sum_a += ea;
        if (j != arg_b) sum_b += eb;
        if (kind == 0) acc += fabs(ea - eb);
        else if (ea > 0.0) acc += ea * (fmax(a, log_eps) - fmax(b, log_eps));
    }
    sum_a = warp_sum(sum_a);
    sum_b = warp_sum(sum_b);
    acc = warp_sum(acc);
    if (lane != 0) return;
    double other_mu = 1.0, other_pi = 1.0;
    if (any_bucket) {
        other_mu = -expm1(max_a) - sum_a;
        other_pi = -expm1(max_b) - sum_b;
        other_mu = other_mu > 0.0 ? other_mu : 0.0;
        other_pi = other_pi > 0.0 ? other_pi : 0.0;
    }
    if (kind == 0) {
        out_div[row] = 0.5 * (acc + fabs(other_mu - other_pi));
    } else {
        if (other_mu > 0.0) acc += other_mu * (log(fmax(other_mu, eps)) - log(fmax(other_pi, eps)));
        out_div[row] = acc > 0.0 ? acc : 0.0;
    }
}
