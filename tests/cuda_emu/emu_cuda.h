// A small CPU emulation of the CUDA features that cppo_mask.cu uses, so that the
// tests can run the kernel source itself without a GPU (g++ -include emu_cuda.h).
//
// Every CUDA thread of a block is a fiber (ucontext) run by one OS thread; blocks run
// one after another in blockIdx order. __syncthreads, __syncwarp and every warp
// collective (shuffles) are barriers: a fiber that reaches one yields until all fibers
// of its block (or warp) arrive. A barrier that some fibers never reach (divergent
// __syncthreads or shuffles, which are undefined behaviour on a GPU) is reported as an
// error instead of hanging. What this cannot show: memory-model races between blocks
// or warps on real hardware, the GPU's exp/log, occupancy and timing.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __restrict__
#define CPPO_EMU 1

namespace emu {

struct Idx {
    unsigned x, y, z;
};

// Provided by emu_main.cpp.
unsigned thread_index();
unsigned block_index();
unsigned block_size();
unsigned grid_size();
void block_barrier();
void warp_barrier();
uint64_t* shuffle_slots(unsigned& lane);  // this warp's slots for the next collective
void* dynamic_shared();                   // the launch's dynamic shared memory (per block)

inline float half_bits_to_float(unsigned short h) {  // exact float16 -> float32
    const unsigned s = (unsigned)(h >> 15) << 31, e = (h >> 10) & 31u, m = h & 1023u;
    unsigned bits;
    if (e == 31) bits = s | 0x7f800000u | (m << 13);
    else if (e != 0) bits = s | ((e + 112u) << 23) | (m << 13);
    else {
        float f = (float)m * 5.9604644775390625e-08f;  // m * 2^-24, exact
        std::memcpy(&bits, &f, 4);
        bits |= s;
    }
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

template <class T>
T exchange(T v, int src_lane) {
    static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
    unsigned lane;
    uint64_t* slots = shuffle_slots(lane);
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    slots[lane] = bits;
    warp_barrier();
    T out;
    std::memcpy(&out, &slots[src_lane], sizeof(T));
    return out;
}

}  // namespace emu

#define threadIdx (::emu::Idx{::emu::thread_index(), 0, 0})
#define blockIdx (::emu::Idx{::emu::block_index(), 0, 0})
#define blockDim (::emu::Idx{::emu::block_size(), 1, 1})
#define gridDim (::emu::Idx{::emu::grid_size(), 1, 1})

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <class T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int = 32) {
    const int lane = (int)(emu::thread_index() & 31);
    const int src = lane - (int)delta;
    return emu::exchange(v, src < 0 ? lane : src);
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
    const int lane = (int)(emu::thread_index() & 31);
    const int src = lane + (int)delta;
    return emu::exchange(v, src > 31 ? lane : src);
}
template <class T>
T __shfl_sync(unsigned, T v, int src, int = 32) {
    return emu::exchange(v, src & 31);
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int m, int = 32) {
    const int lane = (int)(emu::thread_index() & 31);
    return emu::exchange(v, (lane ^ m) & 31);
}

inline bool __any_sync(unsigned, bool pred) {
    unsigned lane;
    uint64_t* slots = emu::shuffle_slots(lane);
    slots[lane] = pred ? 1 : 0;
    emu::warp_barrier();
    bool any = false;
    for (int i = 0; i < 32; ++i) any |= slots[i] != 0;
    emu::warp_barrier();  // every lane has read the slots before they are reused
    return any;
}

#define CPPO_DYNAMIC_SHARED(T, name) T* name = (T*)::emu::dynamic_shared()

struct uint4 {
    unsigned x, y, z, w;
};
template <class T>
inline T __ldg(const T* p) {
    return *p;
}
inline float __int_as_float(int x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

// Atomics: fibers switch only at barriers, so plain read-modify-write is atomic here.
template <class T>
T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
template <class T>
T atomicMin(T* p, T v) {
    T old = *p;
    if (v < old) *p = v;
    return old;
}
template <class T>
T atomicMax(T* p, T v) {
    T old = *p;
    if (v > old) *p = v;
    return old;
}

inline double __longlong_as_double(long long x) {
    double d;
    std::memcpy(&d, &x, 8);
    return d;
}
inline long long __double_as_longlong(double d) {
    long long x;
    std::memcpy(&x, &d, 8);
    return x;
}
inline float __uint_as_float(unsigned x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned x;
    std::memcpy(&x, &f, 4);
    return x;
}

inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }

using std::ceil;
using std::exp;
using std::expm1;
using std::fabs;
using std::floor;
using std::isfinite;
using std::isnan;
using std::log;
