// CPPO trust-region mask on CUDA (spec: shared/spec/CPPO.md).
//
// Same contract and, operation by operation, the same float64 arithmetic as
// python/cppo_native/reference.py and rust/src/core.rs; only the order of the prefix
// sums differs (a parallel scan), which the spec allows (|Z_t - c_t| <= 1e-9).
// Compile with --fmad=false so that no a*b+c is fused and rounded differently.
//
// The flat positions (padded: r * L + c; packed: cu_seqlens[r] + c) are cut into tiles
// of TILE positions; a tile can hold the end of one row and the start of the next, so
// each block walks the "pieces" (row r within tile t, id r + t) of its tile.
//
//   cppo_shuffle  (only for position_weight="shuffled") one block per row: the
//                 Fisher-Yates permutation of the row's weights (sequential by
//                 definition) into a per-position weight array.
//   cppo_stats    one block per tile: per piece, the number of valid tokens, the last
//                 valid column, the sums needed for S and W and, for the adaptive
//                 budget, how many divergences fall below / inside / above the clamp
//                 window (plus the largest below and the smallest above it).
//   cppo_rows     one block per row: horizon T, the per-row budget, and the exclusive
//                 prefix (S, W) at the start of each of the row's pieces. The exact
//                 quantile is selected only for rows where it can land inside the clamp
//                 window; those rows are re-read (radix histogram passes narrow the
//                 candidates until they fit in shared memory, usually one pass).
//   cppo_mask_tiles  one block per tile (last tile first, to reuse what the first pass
//                 left in L2): loads, validates, scans S and W inside each piece and
//                 writes mask / reason / threshold / gate and the reason counts.
//
// Every index is 64-bit. Strides are in elements and may be anything (zero, negative).
// Nothing here includes a header: NVRTC compiles it as is, and the CPU emulator used
// by the tests (tests/cuda_emu) compiles the same file with a small shim.

#ifndef CPPO_BLOCK
#define CPPO_BLOCK 256  // threads per block, a multiple of 32
#endif
#ifndef CPPO_ITEMS
#define CPPO_ITEMS 4  // positions per thread in a tile
#endif
#ifndef CPPO_SELECT_CAP
#define CPPO_SELECT_CAP 5120  // candidates selected in shared memory (8 bytes each)
#endif
#ifndef CPPO_SHUFFLE_CAP
#define CPPO_SHUFFLE_CAP 8192  // valid tokens of a row shuffled in shared memory
#endif

#define TILE (CPPO_BLOCK * CPPO_ITEMS)
#define NWARPS (CPPO_BLOCK / 32)
#define FULL_MASK 0xffffffffu

static_assert(CPPO_BLOCK % 32 == 0 && CPPO_BLOCK >= 64, "CPPO_BLOCK must be a multiple of 32, >= 64");
static_assert(CPPO_ITEMS * NWARPS <= 32, "the tile scan combines ITEMS * NWARPS warp totals in one warp");

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;
typedef double f64;

// Codes shared with _core/codes.py and _core/errors.py (tests/test_codes.py parses them).
enum { PW_LINEAR = 0, PW_NONE = 1, PW_SHUFFLED = 2 };
enum { DIV_TV = 0, DIV_KL = 1, DIV_GIVEN = 2 };
enum { F64 = 0, F32 = 1, F16 = 2, BF16 = 3, F_NONE = 4 };  // float inputs (template parameters)
enum { CU_I64 = 0, CU_I32 = 1, CU_U32 = 2 };                                     // cu_seqlens
enum { INVALID = 0, KEPT_TOWARD_MU = 1, KEPT_WITHIN = 2, MASKED_TOKEN = 3, MASKED_PREFIX = 4 };
// Bad-value fields, in the CPU backend's first-bad-value order (_core/errors.py FIELDS).
enum { FIELD_LOG_PROBS = 0, FIELD_OLD_LOG_PROBS = 1, FIELD_ADVANTAGES = 2, FIELD_DIVERGENCE = 3 };
// Fields of the per-piece statistics (doubles; counts are exact below 2^53).
enum { ST_N, ST_LAST, ST_A0, ST_A1, ST_S0, ST_S1, ST_BELOW, ST_CAND, ST_MAX_BELOW, ST_MIN_ABOVE, NSTAT };

#define LOG_PROB_TOLERANCE 1e-6
#define BINARY_KL_EPS 1e-12

// The launch arguments: one struct passed by value. Every field is 8 bytes, so the
// host packs it with struct.pack in this order; _cuda.py reads this list.
// BEGIN ARGS
#define CPPO_ARGS(X)                                                                     \
    X(u64, log_probs) X(u64, old_log_probs) X(u64, advantages) X(u64, valid)            \
    X(u64, divergence) X(u64, cu_seqlens)                                               \
    X(i64, lp_s0) X(i64, lp_s1) X(i64, lq_s0) X(i64, lq_s1) X(i64, adv_s0) X(i64, adv_s1) \
    X(i64, valid_s0) X(i64, valid_s1) X(i64, div_s0) X(i64, div_s1) X(i64, cu_s0)      \
    X(u64, valid_bits) X(i64, cu_type)                                                  \
    X(i64, rows) X(i64, cols) X(i64, positions) X(i64, packed) X(i64, tiles)            \
    X(i64, adv_per_row)                                                                 \
    X(f64, delta) X(f64, delta_b) X(f64, w_min) X(i64, horizon) X(i64, position_weight) \
    X(u64, shuffle_seed) X(u64, row_offset) X(i64, prefix_budget) X(i64, divergence_mode) X(i64, adaptive) \
    X(f64, budget_quantile) X(f64, budget_scale) X(f64, budget_ceiling)                 \
    X(f64, window_lo) X(f64, window_hi)                                                 \
    X(i64, check_offsets)                                                               \
    X(u64, piece_stats) X(u64, piece_prefix) X(u64, row_horizon) X(u64, row_budget)     \
    X(u64, shuffle_columns) X(u64, shuffle_weight) X(u64, error)                         \
    X(u64, out_mask) X(u64, out_reason) X(u64, out_threshold) X(u64, out_gate)         \
    X(u64, out_row_budget) X(u64, out_counts)
// END ARGS

struct Args {
#define CPPO_FIELD(type, name) type name;
    CPPO_ARGS(CPPO_FIELD)
#undef CPPO_FIELD
};

#define CPPO_COUNT(type, name) +1
static_assert(sizeof(Args) == 8 * (0 CPPO_ARGS(CPPO_COUNT)), "Args must be packed 8-byte fields");
#undef CPPO_COUNT

// ---------------------------------------------------------------------------------
// Scalars

static __device__ __forceinline__ i64 imin(i64 a, i64 b) { return a < b ? a : b; }
static __device__ __forceinline__ i64 imax(i64 a, i64 b) { return a > b ? a : b; }
static __device__ __forceinline__ double pos_inf() { return __longlong_as_double(0x7ff0000000000000LL); }
static __device__ __forceinline__ double neg_inf() { return __longlong_as_double((i64)0xfff0000000000000ULL); }
static __device__ __forceinline__ bool is_finite(double x) {
    return (((u64)__double_as_longlong(x) >> 52) & 0x7ff) != 0x7ff;
}

// Python's min(a, b) and max(a, b) (the first argument wins ties), as the reference.
static __device__ __forceinline__ double py_min(double a, double b) { return b < a ? b : a; }
static __device__ __forceinline__ double py_max(double a, double b) { return b > a ? b : a; }

// ---------------------------------------------------------------------------------
// Input element types: template parameters of every kernel (one instantiation per
// dtype set, compiled on demand by name expression). Floats are loaded as raw bits and
// widened with integer operations plus exact float64 arithmetic only: no float32
// instruction ever touches an input, so CuPy's -ftz=true (under which (double)float
// becomes cvt.ftz.f64.f32) cannot flush float32/float16/bfloat16 subnormals to zero.

// float32 bits -> double, exactly (normal: rebias the exponent; subnormal: m * 2^-149,
// an exact float64 product; inf/NaN: all-ones exponent, payload kept). Branch-free.
static __device__ __forceinline__ double f32_bits_to_double(u32 b) {
    const u32 e = (b >> 23) & 0xffu, m = b & 0x7fffffu;
    const u64 sign = (u64)(b >> 31) << 63;
    const u64 normal = ((u64)(e + (1023u - 127u)) << 52) | ((u64)m << 29);
    const u64 special = 0x7ff0000000000000ULL | ((u64)m << 29);
    const u64 sub = (u64)__double_as_longlong((double)m * __longlong_as_double((i64)((1023ULL - 149) << 52)));
    const u64 mag = e == 0 ? sub : (e == 0xffu ? special : normal);
    return __longlong_as_double((i64)(mag | sign));
}

// float16 bits -> double, exactly (subnormal: m * 2^-24).
static __device__ __forceinline__ double f16_bits_to_double(u32 h) {
    const u32 e = (h >> 10) & 31u, m = h & 1023u;
    const u64 sign = (u64)((h >> 15) & 1u) << 63;
    const u64 normal = ((u64)(e + (1023u - 15u)) << 52) | ((u64)m << 42);
    const u64 special = 0x7ff0000000000000ULL | ((u64)m << 42);
    const u64 sub = (u64)__double_as_longlong((double)m * __longlong_as_double((i64)((1023ULL - 24) << 52)));
    const u64 mag = e == 0 ? sub : (e == 31u ? special : normal);
    return __longlong_as_double((i64)(mag | sign));
}

// Float inputs (F_NONE: no array, e.g. the divergence when it is computed).
template <int CODE> struct FloatIn;
template <> struct FloatIn<F64> {
    typedef u64 raw;
    static __device__ __forceinline__ double widen(u64 b) { return __longlong_as_double((i64)b); }
};
template <> struct FloatIn<F32> {
    typedef u32 raw;
    static __device__ __forceinline__ double widen(u32 b) { return f32_bits_to_double(b); }
};
template <> struct FloatIn<F16> {
    typedef unsigned short raw;
    static __device__ __forceinline__ double widen(unsigned short b) { return f16_bits_to_double(b); }
};
template <> struct FloatIn<BF16> {
    typedef unsigned short raw;
    static __device__ __forceinline__ double widen(unsigned short b) { return f32_bits_to_double((u32)b << 16); }
};
template <> struct FloatIn<F_NONE> {
    typedef unsigned char raw;
    static __device__ __forceinline__ double widen(unsigned char) { return 0.0; }
};

// Valid flags by element width (0: no array, every position valid). A flag is set when
// (bits & valid_bits) != 0, valid_bits chosen by the host: all ones for integers, all
// but the sign bit for floats (-0.0 is not valid, NaN is).
template <int W> struct FlagIn { typedef unsigned char raw; };
template <> struct FlagIn<2> { typedef unsigned short raw; };
template <> struct FlagIn<4> { typedef u32 raw; };
template <> struct FlagIn<8> { typedef u64 raw; };

// A load issued only where `pred` holds (a predicated load, not a branch).
template <class T>
static __device__ __forceinline__ T load_if(u64 base, i64 offset, bool pred) {
    return pred ? ((const T*)base)[offset] : T(0);
}

// ---------------------------------------------------------------------------------
// Layout: rows, positions and element offsets

static __device__ __forceinline__ i64 load_offset(const Args& a, i64 i) {
    const i64 at = i * a.cu_s0;
    switch (a.cu_type) {
        case CU_I64: return ((const i64*)a.cu_seqlens)[at];
        case CU_I32: return (i64)((const int*)a.cu_seqlens)[at];
        default: return (i64)((const u32*)a.cu_seqlens)[at];
    }
}

// First position of row r (r in [0, rows]); clamped so that bad cu_seqlens can never
// send a load out of bounds (they are reported when validate=True).
static __device__ i64 row_start(const Args& a, i64 r) {
    if (!a.packed) return r * a.cols;
    return imin(imax(load_offset(a, r), 0), a.positions);
}

// The row holding position p: the last r in [0, rows) with row_start(r) <= p.
static __device__ i64 row_of(const Args& a, i64 p) {
    if (!a.packed) return p / a.cols;
    i64 lo = 0, hi = a.rows - 1;
    while (lo < hi) {
        const i64 mid = lo + (hi - lo + 1) / 2;
        if (row_start(a, mid) <= p) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// Element offset of (row r, column c, flat position p) in an input with strides s0, s1.
static __device__ __forceinline__ i64 at(const Args& a, i64 s0, i64 s1, i64 r, i64 c, i64 p) {
    return a.packed ? p * s0 : r * s0 + c * s1;
}

template <int VW>
static __device__ __forceinline__ bool load_valid(const Args& a, i64 r, i64 c, i64 p, bool in_range) {
    if (VW == 0) return in_range;
    typedef typename FlagIn<VW>::raw F;
    return (load_if<F>(a.valid, at(a, a.valid_s0, a.valid_s1, r, c, p), in_range) & (F)a.valid_bits) != 0;
}

// ---------------------------------------------------------------------------------
// The spec's formulas (reference.py, core.rs)

static __device__ __forceinline__ double binary_tv(double lp, double lq) { return fabs(exp(lp) - exp(lq)); }

static __device__ double binary_kl(double lp, double lq) {
    const double a = py_min(lq, 0.0);
    const double b = py_min(lp, 0.0);
    const double p = exp(a);
    const double p_rest = py_max(-expm1(a), BINARY_KL_EPS);
    const double r_rest = py_max(-expm1(b), BINARY_KL_EPS);
    const double d = p * (a - b) + p_rest * log(p_rest / r_rest);
    return d > 0.0 ? d : 0.0;
}

// Template parameters of every kernel: the element types of log_probs, old_log_probs,
// advantages, divergence (F_NONE unless given) and the valid flags' width.
#define CPPO_TPARAMS int LP, int LQ, int ADV, int DV, int VW
#define CPPO_TARGS LP, LQ, ADV, DV, VW

// One thread's CPPO_ITEMS positions of a piece (p = begin + k * CPPO_BLOCK + threadIdx.x,
// those with p < end), held as raw bits until used. Round 1 loads every item's valid
// flag; round 2 every other input the caller asks for, of the valid items only
// (predicated on the flag, so padding is never fetched). Every load of a round is
// issued before any of its values is used.
template <CPPO_TPARAMS>
struct Items {
    bool valid[CPPO_ITEMS];
    typename FloatIn<LP>::raw lp[CPPO_ITEMS];
    typename FloatIn<LQ>::raw lq[CPPO_ITEMS];
    typename FloatIn<ADV>::raw adv[CPPO_ITEMS];
    typename FloatIn<DV>::raw dv[CPPO_ITEMS];

    __device__ __forceinline__ void load(const Args& a, i64 r, i64 rs, i64 begin, i64 end, bool want_lp,
                                         bool want_adv) {
#pragma unroll
        for (int k = 0; k < CPPO_ITEMS; ++k) {
            const i64 p = begin + (i64)k * CPPO_BLOCK + threadIdx.x;
            valid[k] = load_valid<VW>(a, r, p - rs, p, p < end);
        }
#pragma unroll
        for (int k = 0; k < CPPO_ITEMS; ++k) {
            const i64 p = begin + (i64)k * CPPO_BLOCK + threadIdx.x;
            const i64 c = p - rs;
            const bool v = valid[k];
            lp[k] = load_if<typename FloatIn<LP>::raw>(a.log_probs, at(a, a.lp_s0, a.lp_s1, r, c, p), v && want_lp);
            lq[k] = load_if<typename FloatIn<LQ>::raw>(a.old_log_probs, at(a, a.lq_s0, a.lq_s1, r, c, p),
                                                       v && want_lp);
            adv[k] = load_if<typename FloatIn<ADV>::raw>(a.advantages, at(a, a.adv_s0, a.adv_s1, r, c, p),
                                                         v && want_adv);
            dv[k] = load_if<typename FloatIn<DV>::raw>(a.divergence, at(a, a.div_s0, a.div_s1, r, c, p),
                                                       v && DV != F_NONE);
        }
    }
    __device__ __forceinline__ double log_prob(int k) const { return FloatIn<LP>::widen(lp[k]); }
    __device__ __forceinline__ double old_log_prob(int k) const { return FloatIn<LQ>::widen(lq[k]); }
    __device__ __forceinline__ double advantage(int k) const { return FloatIn<ADV>::widen(adv[k]); }
    // D_t: given, or computed from the log-probs (lp, lq passed when already widened).
    __device__ __forceinline__ double divergence(const Args& a, int k, double p, double q) const {
        if (DV != F_NONE) return FloatIn<DV>::widen(dv[k]);
        return a.divergence_mode == DIV_KL ? binary_kl(p, q) : binary_tv(p, q);
    }
    __device__ __forceinline__ double divergence(const Args& a, int k) const {
        if (DV != F_NONE) return FloatIn<DV>::widen(dv[k]);
        return divergence(a, k, log_prob(k), old_log_prob(k));
    }
};

// Paper Eq. 9 with t - 1 = column and T = horizon.
static __device__ __forceinline__ double position_weight(i64 column, i64 horizon, double w_min) {
    if (horizon <= 1) return 1.0;
    const double ratio = (double)column / (double)(horizon - 1);
    return 1.0 - (1.0 - w_min) * py_min(1.0, ratio);
}

// Order-preserving integer key of a double (-0.0 folded into +0.0, as core.rs does).
static __device__ __forceinline__ u64 order_key(double d) {
    const u64 b = (u64)__double_as_longlong(d + 0.0);
    return (b >> 63) ? ~b : (b | 0x8000000000000000ULL);
}
static __device__ __forceinline__ double key_value(u64 k) {
    return __longlong_as_double((i64)((k >> 63) ? (k & 0x7fffffffffffffffULL) : ~k));
}

// Where D falls relative to the adaptive budget's clamp window: 0 below, 1 inside,
// 2 above (NaN, only possible with validate=False, counts as above).
static __device__ __forceinline__ int window_class(const Args& a, double d) {
    if (d < a.window_lo) return 0;
    if (d <= a.window_hi) return 1;
    return 2;
}

// ---------------------------------------------------------------------------------
// Block-wide building blocks. Every thread of the block must call them.

static __device__ __forceinline__ int lane_id() { return (int)(threadIdx.x & 31); }
static __device__ __forceinline__ int warp_id() { return (int)(threadIdx.x >> 5); }

template <class T>
static __device__ __forceinline__ T warp_inclusive_sum(T x) {
    const int lane = lane_id();
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const T y = __shfl_up_sync(FULL_MASK, x, d);
        if (lane >= d) x += y;
    }
    return x;
}

// Exclusive prefix of one value per thread in thread order; `total` gets the block sum.
template <class T>
static __device__ T block_exclusive_sum(T x, T& total) {
    __shared__ T warp_totals[NWARPS];
    const int lane = lane_id(), warp = warp_id();
    const T incl = warp_inclusive_sum(x);
    T excl = __shfl_up_sync(FULL_MASK, incl, 1);
    if (lane == 0) excl = T(0);
    if (lane == 31) warp_totals[warp] = incl;
    __syncthreads();
    T before = T(0), sum = T(0);
    for (int w = 0; w < NWARPS; ++w) {
        if (w < warp) before += warp_totals[w];
        sum += warp_totals[w];
    }
    __syncthreads();
    total = sum;
    return before + excl;
}

// Exclusive prefix sums of NV values over the positions of a tile piece, laid out
// striped: item k of thread t is position k * BLOCK + t. out[k][j] = sum of value j over
// all earlier positions of the piece.
template <int NV>
static __device__ void tile_exclusive_sum(const double (&v)[CPPO_ITEMS][NV], double (&out)[CPPO_ITEMS][NV]) {
    __shared__ double totals[NV][32];
    const int lane = lane_id(), warp = warp_id();
#pragma unroll
    for (int k = 0; k < CPPO_ITEMS; ++k) {
#pragma unroll
        for (int j = 0; j < NV; ++j) {
            const double incl = warp_inclusive_sum(v[k][j]);
            double excl = __shfl_up_sync(FULL_MASK, incl, 1);
            out[k][j] = lane == 0 ? 0.0 : excl;
            if (lane == 31) totals[j][k * NWARPS + warp] = incl;
        }
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int j = 0; j < NV; ++j) {
            const double x = lane < CPPO_ITEMS * NWARPS ? totals[j][lane] : 0.0;
            const double incl = warp_inclusive_sum(x);
            const double excl = __shfl_up_sync(FULL_MASK, incl, 1);
            if (lane < CPPO_ITEMS * NWARPS) totals[j][lane] = lane == 0 ? 0.0 : excl;
        }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < CPPO_ITEMS; ++k) {
#pragma unroll
        for (int j = 0; j < NV; ++j) out[k][j] = totals[j][k * NWARPS + warp] + out[k][j];
    }
    __syncthreads();
}

// Per-piece statistics and their combination (sums, max of last/max_below, min of
// min_above), reduced over the block in a fixed order; the result is in every thread.
struct Stats {
    double v[NSTAT];
};

static __device__ __forceinline__ Stats stats_identity() {
    Stats s;
    for (int i = 0; i < NSTAT; ++i) s.v[i] = 0.0;
    s.v[ST_LAST] = -1.0;
    s.v[ST_MAX_BELOW] = neg_inf();
    s.v[ST_MIN_ABOVE] = pos_inf();
    return s;
}

static __device__ __forceinline__ void stats_combine(Stats& s, const Stats& o) {
    for (int i = 0; i < NSTAT; ++i) {
        if (i == ST_LAST || i == ST_MAX_BELOW) s.v[i] = o.v[i] > s.v[i] ? o.v[i] : s.v[i];
        else if (i == ST_MIN_ABOVE) s.v[i] = o.v[i] < s.v[i] ? o.v[i] : s.v[i];
        else s.v[i] += o.v[i];
    }
}

static __device__ Stats block_reduce_stats(Stats s) {
    __shared__ double partial[NSTAT][NWARPS];
    const int lane = lane_id(), warp = warp_id();
    for (int d = 16; d > 0; d >>= 1) {
        Stats o;
        for (int i = 0; i < NSTAT; ++i) o.v[i] = __shfl_down_sync(FULL_MASK, s.v[i], d);
        if (lane + d < 32) stats_combine(s, o);
    }
    if (lane == 0) {
        for (int i = 0; i < NSTAT; ++i) partial[i][warp] = s.v[i];
    }
    __syncthreads();
    Stats total = stats_identity();
    for (int w = 0; w < NWARPS; ++w) {
        Stats o;
        for (int i = 0; i < NSTAT; ++i) o.v[i] = partial[i][w];
        stats_combine(total, o);
    }
    __syncthreads();
    return total;
}

template <class T>
static __device__ T block_reduce_min(T x) {
    __shared__ T partial[NWARPS];
    for (int d = 16; d > 0; d >>= 1) {
        const T y = __shfl_down_sync(FULL_MASK, x, d);
        if (lane_id() + d < 32 && y < x) x = y;
    }
    if (lane_id() == 0) partial[warp_id()] = x;
    __syncthreads();
    T m = partial[0];
    for (int w = 1; w < NWARPS; ++w) m = partial[w] < m ? partial[w] : m;
    __syncthreads();
    return m;
}

template <class T>
static __device__ T block_reduce_sum(T x) {
    __shared__ T partial[NWARPS];
    for (int d = 16; d > 0; d >>= 1) {
        const T y = __shfl_down_sync(FULL_MASK, x, d);
        if (lane_id() + d < 32) x += y;
    }
    if (lane_id() == 0) partial[warp_id()] = x;
    __syncthreads();
    T s = T(0);
    for (int w = 0; w < NWARPS; ++w) s += partial[w];
    __syncthreads();
    return s;
}

// Calls on_piece(r, row_start, begin, end) for every row piece of tile [ts, te), in
// order, and on_orphan(begin, end) for positions that belong to no row (possible only
// with invalid cu_seqlens). Uniform across the block.
template <class OnPiece, class OnOrphan>
static __device__ void walk_tile(const Args& a, i64 ts, i64 te, OnPiece on_piece, OnOrphan on_orphan) {
    i64 pos = ts;
    i64 r = a.rows > 0 ? row_of(a, ts) : 0;
    while (pos < te) {
        if (r >= a.rows) {
            on_orphan(pos, te);
            break;
        }
        const i64 rs = row_start(a, r);
        if (pos < rs) {
            const i64 e = imin(rs, te);
            on_orphan(pos, e);
            pos = e;
            continue;
        }
        const i64 e = imin(row_start(a, r + 1), te);
        if (e > pos) {
            on_piece(r, rs, pos, e);
            pos = e;
        }
        ++r;
    }
}

// ---------------------------------------------------------------------------------
// cppo_shuffle: the shuffled ablation's weights, one block per row.

// SplitMix64 seeded with (seed, row), identical to reference.py / core.rs; `row` is the
// row's index in the whole input (row_offset + r), all arithmetic wrapping mod 2^64.
struct SplitMix64 {
    u64 state;
    __device__ SplitMix64(u64 seed, u64 row) : state(seed ^ ((row + 1) * 0xD1B54A32D192ED03ULL)) {}
    __device__ u64 next() {
        state += 0x9E3779B97F4A7C15ULL;
        u64 z = state;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }
};

// Applies the Fisher-Yates swaps of shuffle_permutation(n, seed, row) to `cols` (the
// row's valid columns in order): afterwards cols[k] = valid_columns[perm[k]].
template <class T>
static __device__ void fisher_yates(T* cols, i64 n, u64 seed, u64 row) {
    SplitMix64 rng(seed, row);
    for (i64 i = n - 1; i > 0; --i) {
        const i64 j = (i64)(rng.next() % (u64)(i + 1));
        const T tmp = cols[i];
        cols[i] = cols[j];
        cols[j] = tmp;
    }
}

template <CPPO_TPARAMS>
__global__ void __launch_bounds__(CPPO_BLOCK) cppo_shuffle(const Args a) {
    __shared__ int local_cols[CPPO_SHUFFLE_CAP];
    const i64 r = blockIdx.x;
    if (r >= a.rows) return;
    const i64 rs = row_start(a, r), re = imax(row_start(a, r + 1), rs);
    i64* cols = (i64*)a.shuffle_columns + rs;
    double* weight = (double*)a.shuffle_weight;

    // The row's valid columns, in order.
    i64 n = 0;
    for (i64 base = rs; base < re; base += CPPO_BLOCK) {
        const i64 p = base + threadIdx.x;
        const bool v = load_valid<VW>(a, r, p - rs, p, p < re);
        i64 total;
        const i64 rank = block_exclusive_sum<i64>(v ? 1 : 0, total);
        if (v) cols[n + rank] = p - rs;
        n += total;
    }
    __syncthreads();
    const i64 horizon = a.horizon > 0 ? a.horizon : (n > 0 ? cols[n - 1] + 1 : 0);
    __syncthreads();  // every thread has read cols[n - 1] before the swaps below

    const bool in_shared = n <= CPPO_SHUFFLE_CAP && re - rs <= 0x7fffffff;
    if (in_shared) {
        for (i64 k = threadIdx.x; k < n; k += CPPO_BLOCK) local_cols[k] = (int)cols[k];
        __syncthreads();
        if (threadIdx.x == 0) fisher_yates(local_cols, n, a.shuffle_seed, a.row_offset + (u64)r);
    } else if (threadIdx.x == 0) {
        fisher_yates(cols, n, a.shuffle_seed, a.row_offset + (u64)r);
    }
    __syncthreads();

    // Valid position number k takes the weight of column cols[k].
    i64 seen = 0;
    for (i64 base = rs; base < re; base += CPPO_BLOCK) {
        const i64 p = base + threadIdx.x;
        const bool v = load_valid<VW>(a, r, p - rs, p, p < re);
        i64 total;
        const i64 rank = block_exclusive_sum<i64>(v ? 1 : 0, total);
        if (v) {
            const i64 k = seen + rank;
            const i64 source = in_shared ? (i64)local_cols[k] : cols[k];
            weight[p] = position_weight(source, horizon, a.w_min);
        }
        seen += total;
    }
}

// ---------------------------------------------------------------------------------
// cppo_stats: per-piece statistics, one block per tile.

template <CPPO_TPARAMS>
__global__ void __launch_bounds__(CPPO_BLOCK, 3) cppo_stats(const Args a) {
    const i64 tile = blockIdx.x;
    if (tile == 0 && threadIdx.x == 0) {
        // Reset the error record and the counts (later kernels of this call write them).
        ((u64*)a.error)[0] = ~0ULL;
        ((u64*)a.error)[1] = ~0ULL;
        if (a.out_counts) {
            for (int i = 0; i < 5; ++i) ((i64*)a.out_counts)[i] = 0;
        }
    }
    if (tile >= a.tiles) return;
    const i64 ts = tile * TILE, te = imin(ts + TILE, a.positions);
    const bool seq_linear = a.position_weight == PW_LINEAR && a.horizon == 0;
    double* stats = (double*)a.piece_stats;

    walk_tile(
        a, ts, te,
        [&](i64 r, i64 rs, i64 begin, i64 end) {
            Items<CPPO_TARGS> in;
            in.load(a, r, rs, begin, end, DV == F_NONE, false);
            Stats s = stats_identity();
#pragma unroll
            for (int k = 0; k < CPPO_ITEMS; ++k) {
                if (!in.valid[k]) continue;
                const i64 p = begin + (i64)k * CPPO_BLOCK + threadIdx.x;
                const i64 c = p - rs;
                const double d = in.divergence(a, k);
                // w_t = a_t - kappa * b_t, with kappa known only once T is (cppo_rows).
                double wa, wb;
                if (seq_linear) {
                    wa = 1.0;
                    wb = (double)c;
                } else {
                    wb = 0.0;
                    if (a.position_weight == PW_LINEAR) wa = position_weight(c, a.horizon, a.w_min);
                    else if (a.position_weight == PW_NONE) wa = 1.0;
                    else wa = ((const double*)a.shuffle_weight)[p];
                }
                s.v[ST_N] += 1.0;
                s.v[ST_LAST] = (double)c;
                s.v[ST_A0] += wa;
                s.v[ST_A1] += wb;
                s.v[ST_S0] += wa * d;
                s.v[ST_S1] += wb * d;
                if (a.adaptive) {
                    const double d0 = d + 0.0;
                    const int cls = window_class(a, d0);
                    if (cls == 0) {
                        s.v[ST_BELOW] += 1.0;
                        if (d0 > s.v[ST_MAX_BELOW]) s.v[ST_MAX_BELOW] = d0;
                    } else if (cls == 1) {
                        s.v[ST_CAND] += 1.0;
                    } else if (d0 < s.v[ST_MIN_ABOVE]) {
                        s.v[ST_MIN_ABOVE] = d0;
                    }
                }
            }
            const Stats total = block_reduce_stats(s);
            if (threadIdx.x == 0) {
                double* out = stats + (r + tile) * NSTAT;
                for (int i = 0; i < NSTAT; ++i) out[i] = total.v[i];
            }
        },
        [&](i64, i64) {});
}

// ---------------------------------------------------------------------------------
// cppo_rows: horizon, budget and piece prefixes, one block per row.

// Candidate sources for the selection: each thread visits a share of the keys.
struct SharedKeys {
    const u64* keys;
    i64 count;
    template <class F>
    __device__ void each(F f) const {
        for (i64 i = threadIdx.x; i < count; i += CPPO_BLOCK) f(keys[i]);
    }
};

// The row's divergences inside the clamp window, recomputed from the inputs exactly
// as cppo_stats computed them.
template <CPPO_TPARAMS>
struct RowKeys {
    const Args* a;
    i64 r, rs, re;
    template <class F>
    __device__ void each(F f) const {
        for (i64 begin = rs; begin < re; begin += TILE) {  // a tile's loads in flight at once
            Items<CPPO_TARGS> in;
            in.load(*a, r, rs, begin, re, DV == F_NONE, false);
#pragma unroll
            for (int k = 0; k < CPPO_ITEMS; ++k) {
                if (!in.valid[k]) continue;
                const double d0 = in.divergence(*a, k) + 0.0;
                if (window_class(*a, d0) == 1) f(order_key(d0));
            }
        }
    }
};

// One MSB-first radix step: among the keys with (key & known) == prefix, the next
// (up to) 8 unknown bits of the key of rank k. Updates prefix/known/low (number of
// bits still unknown), k (rank inside the chosen bucket) and count (keys in it).
template <class Src>
static __device__ void radix_step(const Src& src, u64& prefix, u64& known, int& low, i64& k, i64& count) {
    __shared__ unsigned long long hist[256];
    __shared__ u64 chosen_digit;
    __shared__ i64 chosen_rank, chosen_count;
    const int width = low >= 8 ? 8 : low;
    const int shift = low - width;
    const u64 digit_mask = (1ULL << width) - 1;
    for (int i = threadIdx.x; i < 256; i += CPPO_BLOCK) hist[i] = 0;
    if (threadIdx.x == 0) {
        chosen_digit = digit_mask;  // kept only if k is out of range (inconsistent input)
        chosen_rank = 0;
        chosen_count = 0;
    }
    __syncthreads();
    const u64 pre = prefix, kn = known;
    src.each([&](u64 key) {
        if ((key & kn) == pre) atomicAdd(&hist[(key >> shift) & digit_mask], 1ULL);
    });
    __syncthreads();
    if (warp_id() == 0) {
        const int lane = lane_id();
        u64 sum = 0;
        for (int j = 0; j < 8; ++j) sum += hist[lane * 8 + j];
        const u64 incl = warp_inclusive_sum(sum);
        const u64 before = incl - sum;
        if ((u64)k >= before && (u64)k < incl) {
            u64 c = before;
            for (int j = 0; j < 8; ++j) {
                const u64 h = hist[lane * 8 + j];
                if ((u64)k < c + h) {
                    chosen_digit = (u64)(lane * 8 + j);
                    chosen_rank = k - (i64)c;
                    chosen_count = (i64)h;
                    break;
                }
                c += h;
            }
        }
    }
    __syncthreads();
    prefix |= chosen_digit << shift;
    known |= digit_mask << shift;
    low = shift;
    k = chosen_rank;
    count = chosen_count;
    __syncthreads();
}

template <class Src>
static __device__ u64 radix_finish(const Src& src, u64 prefix, u64 known, int low, i64 k) {
    i64 count;
    while (low > 0) radix_step(src, prefix, known, low, k, count);
    return prefix;
}

// The key of rank k (0-based, ascending) among the row's `count` candidates and, if
// want_next, the key of rank k + 1 (has_next false when k is the last candidate).
// Keys inside the window share its bounds' common leading bits; radix steps over the
// re-read row narrow to a bucket that fits in shared memory (none if all fit), one
// more pass gathers it together with the smallest key above it, and the rest of the
// selection runs in shared memory.
template <class Row>
static __device__ void select_candidates(const Args& a, const Row& row, i64 count, i64 k, bool want_next,
                                         u64& key, u64& next, bool& has_next) {
    __shared__ u64 gathered_keys[CPPO_SELECT_CAP];
    __shared__ u32 gathered;
    const u64 lo_key = order_key(a.window_lo), hi_key = order_key(a.window_hi);
    const u64 diff = lo_key ^ hi_key;
    int low = diff ? 64 - __clzll((long long)diff) : 0;
    u64 known = low >= 64 ? 0ULL : ~((1ULL << low) - 1);
    u64 prefix = lo_key & known;
    i64 bucket = count;
    while (low > 0 && bucket > CPPO_SELECT_CAP) radix_step(row, prefix, known, low, k, bucket);

    if (threadIdx.x == 0) gathered = 0;
    __syncthreads();
    const u64 pre = prefix, kn = known, bucket_max = prefix | ~known;
    u64 above = ~0ULL;
    row.each([&](u64 x) {
        if ((x & kn) == pre) {
            const u32 i = atomicAdd(&gathered, 1u);
            if (i < CPPO_SELECT_CAP) gathered_keys[i] = x;
        } else if (x > bucket_max && x < above) {
            above = x;
        }
    });
    const u64 next_above = block_reduce_min<u64>(above);  // (its syncs also publish `gathered`)
    const SharedKeys keys{gathered_keys, imin((i64)gathered, CPPO_SELECT_CAP)};
    key = radix_finish(keys, prefix, known, low, k);
    has_next = false;
    if (want_next) {
        // Rank k + 1 without a second descent: the same key if it repeats past rank k,
        // else the smallest bucket key above it, else the smallest candidate above the
        // bucket. (low == 0: every bucket key is equal, possibly more than were gathered.)
        i64 at_most = 0;
        u64 above_in = ~0ULL;
        keys.each([&](u64 x) {
            if (x <= key) ++at_most;
            else if (x < above_in) above_in = x;
        });
        const i64 not_above = block_reduce_sum<i64>(at_most);
        const u64 next_in = block_reduce_min<u64>(above_in);
        if (k + 1 < bucket && (low == 0 || not_above > k + 1)) {
            next = key;
            has_next = true;
        } else if (k + 1 < bucket && next_in != ~0ULL) {
            next = next_in;
            has_next = true;
        } else if (next_above != ~0ULL) {
            next = next_above;
            has_next = true;
        }
    }
}

// delta_b_row (Eq. 22) for an adaptive row with n >= 1 valid tokens. Order statistics
// below the window (Q <= window_lo: budget delta_b) or above it (Q > window_hi:
// m delta_b, m = budget_ceiling) need no selection; otherwise x[floor h] and x[ceil h]
// are found exactly.
template <CPPO_TPARAMS>
static __device__ double adaptive_budget(const Args& a, i64 r, i64 rs, i64 re, const Stats& row) {
    const i64 n = (i64)row.v[ST_N];
    const i64 below = (i64)row.v[ST_BELOW], cand = (i64)row.v[ST_CAND];
    const double h = a.budget_quantile * (double)(n - 1);
    const double h_floor = floor(h);
    const i64 lo = (i64)h_floor, hi = (i64)ceil(h);
    if (hi < below) return a.delta_b;
    if (lo >= below + cand) return a.budget_ceiling * a.delta_b;
    const RowKeys<CPPO_TARGS> keys{&a, r, rs, re};
    u64 key = 0, next = 0;
    bool has_next = false;
    double x_lo, x_hi;
    if (lo < below) {
        // lo = below - 1 and hi = below: the largest value under the window, then the
        // smallest candidate (or the smallest value above the window).
        x_lo = row.v[ST_MAX_BELOW];
        if (cand > 0) select_candidates(a, keys, cand, 0, false, key, next, has_next);
        x_hi = cand > 0 ? key_value(key) : row.v[ST_MIN_ABOVE];
    } else {
        select_candidates(a, keys, cand, lo - below, hi != lo, key, next, has_next);
        x_lo = key_value(key);
        x_hi = hi == lo ? x_lo : (has_next ? key_value(next) : row.v[ST_MIN_ABOVE]);
    }
    const double q = x_lo + (h - h_floor) * (x_hi - x_lo);
    const double budget = py_max(a.budget_scale * q, a.delta_b);
    return py_min(budget, a.budget_ceiling * a.delta_b);
}

template <CPPO_TPARAMS>
__global__ void __launch_bounds__(CPPO_BLOCK) cppo_rows(const Args a) {
    __shared__ double carry[4];
    const i64 r = blockIdx.x;
    u64* error = (u64*)a.error;
    if (a.check_offsets && a.packed && threadIdx.x == 0) {
        // cu_seqlens: starts at 0, non-decreasing, ends at the number of tokens.
        if (r == 0 && load_offset(a, 0) != 0) atomicMin(&error[1], 0ULL);
        if (r < a.rows && load_offset(a, r + 1) < load_offset(a, r)) atomicMin(&error[1], (u64)(r + 1));
        if (r == 0 && load_offset(a, a.rows) != a.positions) atomicMin(&error[1], (u64)(a.rows + 1));
    }
    if (r >= a.rows) return;
    const i64 rs = row_start(a, r), re = imax(row_start(a, r + 1), rs);
    const i64 first_tile = rs / TILE;
    const i64 pieces = re > rs ? (re - 1) / TILE - first_tile + 1 : 0;
    const double* stats = (const double*)a.piece_stats;

    Stats s = stats_identity();
    for (i64 i = threadIdx.x; i < pieces; i += CPPO_BLOCK) {
        Stats o;
        for (int j = 0; j < NSTAT; ++j) o.v[j] = stats[(r + first_tile + i) * NSTAT + j];
        stats_combine(s, o);
    }
    const Stats row = block_reduce_stats(s);
    const i64 n = (i64)row.v[ST_N];
    const i64 horizon = a.horizon > 0 ? a.horizon : (n > 0 ? (i64)row.v[ST_LAST] + 1 : 0);
    const bool seq_linear = a.position_weight == PW_LINEAR && a.horizon == 0;
    const double kappa = (seq_linear && horizon > 1) ? (1.0 - a.w_min) / (double)(horizon - 1) : 0.0;

    // S and W before each piece: exclusive prefix over the row's pieces, in order.
    if (threadIdx.x < 4) carry[threadIdx.x] = 0.0;
    __syncthreads();
    double* prefix = (double*)a.piece_prefix;
    for (i64 base = 0; base < pieces; base += CPPO_BLOCK) {
        const i64 i = base + threadIdx.x;
        double mine[4] = {0.0, 0.0, 0.0, 0.0};
        if (i < pieces) {
            const double* st = stats + (r + first_tile + i) * NSTAT;
            mine[0] = st[ST_A0];
            mine[1] = st[ST_A1];
            mine[2] = st[ST_S0];
            mine[3] = st[ST_S1];
        }
        double before[4], total[4];
        for (int j = 0; j < 4; ++j) before[j] = carry[j] + block_exclusive_sum<double>(mine[j], total[j]);
        if (i < pieces) {
            double* out = prefix + (r + first_tile + i) * 2;
            out[0] = before[2] - kappa * before[3];  // S before the piece
            out[1] = before[0] - kappa * before[1];  // W before the piece
        }
        __syncthreads();
        if (threadIdx.x < 4) carry[threadIdx.x] += total[threadIdx.x];
        __syncthreads();
    }

    double budget = a.delta_b;
    if (a.adaptive && n > 0) budget = adaptive_budget<CPPO_TARGS>(a, r, rs, re, row);
    if (threadIdx.x == 0) {
        ((i64*)a.row_horizon)[r] = horizon;
        ((double*)a.row_budget)[r] = budget;
        if (a.out_row_budget) ((double*)a.out_row_budget)[r] = budget;
    }
}

// ---------------------------------------------------------------------------------
// cppo_mask_tiles: the mask, one block per tile.

static __device__ __forceinline__ bool bad_log_prob(double x) { return !(is_finite(x) && x <= LOG_PROB_TOLERANCE); }

template <CPPO_TPARAMS>
__global__ void __launch_bounds__(CPPO_BLOCK) cppo_mask_tiles(const Args a) {
    const i64 tile = a.tiles - 1 - (i64)blockIdx.x;  // reverse order: reuse the stats pass's L2 lines
    const i64 ts = tile * TILE, te = imin(ts + TILE, a.positions);
    const bool info = a.out_reason != 0;
    bool* mask = (bool*)a.out_mask;
    signed char* reason = (signed char*)a.out_reason;
    double* threshold = (double*)a.out_threshold;
    double* gate = (double*)a.out_gate;
    u64 first_bad = ~0ULL;
    i64 n_invalid = 0, n_toward = 0, n_within = 0, n_token = 0, n_prefix = 0;

    walk_tile(
        a, ts, te,
        [&](i64 r, i64 rs, i64 begin, i64 end) {
            const i64 horizon = ((const i64*)a.row_horizon)[r];
            const double budget = ((const double*)a.row_budget)[r];
            const double* pre = (const double*)a.piece_prefix + (r + tile) * 2;
            const double s_before = pre[0], w_before = pre[1];
            const double row_advantage =
                FloatIn<ADV>::widen(load_if<typename FloatIn<ADV>::raw>(a.advantages, r * a.adv_s0, a.adv_per_row));

            Items<CPPO_TARGS> in;
            in.load(a, r, rs, begin, end, true, !a.adv_per_row);
            const bool* valid = in.valid;
            bool toward_mu[CPPO_ITEMS];
            double zw[CPPO_ITEMS][2];  // (Z_t, v_t w_t)
#pragma unroll
            for (int k = 0; k < CPPO_ITEMS; ++k) {
                const i64 p = begin + (i64)k * CPPO_BLOCK + threadIdx.x;
                const i64 c = p - rs;
                toward_mu[k] = false;
                zw[k][0] = 0.0;
                zw[k][1] = 0.0;
                if (valid[k]) {
                    const double lp = in.log_prob(k);
                    const double lq = in.old_log_prob(k);
                    const double adv = a.adv_per_row ? row_advantage : in.advantage(k);
                    const double d = in.divergence(a, k, lp, lq);
                    // Bad input: the first field that breaks the spec's rule here.
                    int field = -1;
                    if (bad_log_prob(lp)) field = FIELD_LOG_PROBS;
                    else if (bad_log_prob(lq)) field = FIELD_OLD_LOG_PROBS;
                    else if (!is_finite(adv)) field = FIELD_ADVANTAGES;
                    else if (DV != F_NONE && !(is_finite(d) && d >= 0.0)) field = FIELD_DIVERGENCE;
                    if (field >= 0) {
                        const u64 key = (u64)p * 4 + (u64)field;
                        if (key < first_bad) first_bad = key;
                    }
                    double w;
                    if (a.position_weight == PW_LINEAR) w = position_weight(c, horizon, a.w_min);
                    else if (a.position_weight == PW_NONE) w = 1.0;
                    else w = ((const double*)a.shuffle_weight)[p];
                    zw[k][0] = w * d;
                    zw[k][1] = w;
                    toward_mu[k] = adv * (lp - lq) <= 0.0;
                }
            }

            double before[CPPO_ITEMS][2];
            tile_exclusive_sum<2>(zw, before);

#pragma unroll
            for (int k = 0; k < CPPO_ITEMS; ++k) {
                const i64 p = begin + (i64)k * CPPO_BLOCK + threadIdx.x;
                if (p < end) {
                    const double s_sum = s_before + before[k][0];  // S_{t-1}
                    const double w_sum = w_before + before[k][1];  // W_{t-1}
                    const double c_t =
                        a.prefix_budget ? py_min(a.delta, a.delta + budget * w_sum - s_sum) : a.delta;
                    int code = INVALID;
                    double g = 0.0;
                    if (valid[k]) {
                        const double z = zw[k][0];
                        if (toward_mu[k]) {
                            code = KEPT_TOWARD_MU;
                            g = 1.0;
                        } else {
                            code = z <= c_t ? KEPT_WITHIN : (z > a.delta ? MASKED_TOKEN : MASKED_PREFIX);
                            double x = z / a.delta;
                            if (a.prefix_budget) x = py_max(x, (s_sum + z) / (a.delta + budget * w_sum));
                            g = x <= 1.0 ? 1.0 : 1.0 / x;
                        }
                    }
                    mask[p] = code == KEPT_TOWARD_MU || code == KEPT_WITHIN;
                    if (info) {
                        reason[p] = (signed char)code;
                        threshold[p] = c_t;
                        gate[p] = g;
                    }
                    n_invalid += code == INVALID;
                    n_toward += code == KEPT_TOWARD_MU;
                    n_within += code == KEPT_WITHIN;
                    n_token += code == MASKED_TOKEN;
                    n_prefix += code == MASKED_PREFIX;
                }
            }
        },
        [&](i64 begin, i64 end) {
            for (i64 p = begin + threadIdx.x; p < end; p += CPPO_BLOCK) {
                mask[p] = false;
                if (info) {
                    reason[p] = INVALID;
                    threshold[p] = 0.0;
                    gate[p] = 0.0;
                }
            }
        });

    const u64 bad = block_reduce_min<u64>(first_bad);
    if (threadIdx.x == 0 && bad != ~0ULL) atomicMin(&((u64*)a.error)[0], bad);
    if (a.out_counts) {
        const i64 counts[5] = {n_invalid, n_toward, n_within, n_token, n_prefix};
#pragma unroll
        for (int i = 0; i < 5; ++i) {
            const i64 total = block_reduce_sum<i64>(counts[i]);
            if (threadIdx.x == 0 && total != 0) atomicAdd((u64*)a.out_counts + i, (u64)total);
        }
    }
}
