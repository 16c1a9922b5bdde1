// Fiber scheduler for emu_cuda.h and the C entry point the tests call through ctypes:
//
//   int emu_launch(const char* kernel, unsigned grid, unsigned block,
//                  const void* args, unsigned long args_size, char* error, unsigned long error_size)
//
// returns 0, or nonzero with a message in `error` (unknown kernel, bad argument size,
// a barrier that not every thread reached).
// Build: g++ -std=c++17 -include emu_cuda.h cppo_mask.cu emu_main.cpp (see tests).

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include CPPO_KERNEL_SOURCE

namespace emu {
namespace {

constexpr size_t kStack = 256 * 1024;

enum class State { Runnable, BlockWait, WarpWait, Done };

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    State state = State::Runnable;
    uint64_t wait_generation = 0;
    unsigned parity = 0;  // alternates the shuffle slot banks
};

struct Launch {
    std::function<void()> body;  // runs the kernel for the current thread
    std::vector<double> dynamic;  // dynamic shared memory (reset per block)
    unsigned grid = 0, block = 0, block_idx = 0, current = 0;
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    unsigned block_arrived = 0;
    uint64_t block_generation = 0;
    std::vector<unsigned> warp_arrived;
    std::vector<uint64_t> warp_generation;
    std::vector<uint64_t> slots;  // [warp][bank][32]
};

Launch* L = nullptr;

void fiber_main() {
    L->body();
    L->fibers[L->current].state = State::Done;
    swapcontext(&L->fibers[L->current].ctx, &L->scheduler);
}

void yield() {
    swapcontext(&L->fibers[L->current].ctx, &L->scheduler);
}

bool runnable(const Fiber& f, unsigned tid) {
    switch (f.state) {
        case State::Runnable: return true;
        case State::BlockWait: return L->block_generation != f.wait_generation;
        case State::WarpWait: return L->warp_generation[tid / 32] != f.wait_generation;
        default: return false;
    }
}

// Runs one block to completion; false if the fibers deadlock on a barrier.
bool run_block(std::string& why) {
    const unsigned n = L->block;
    std::fill(L->dynamic.begin(), L->dynamic.end(), std::nan(""));  // garbage, as on a GPU
    L->block_arrived = 0;
    std::fill(L->warp_arrived.begin(), L->warp_arrived.end(), 0u);
    for (unsigned t = 0; t < n; ++t) {
        Fiber& f = L->fibers[t];
        f.state = State::Runnable;
        f.parity = 0;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_main, 0);
    }
    for (;;) {
        bool progressed = false, all_done = true;
        for (unsigned t = 0; t < n; ++t) {
            Fiber& f = L->fibers[t];
            if (f.state == State::Done) continue;
            all_done = false;
            if (!runnable(f, t)) continue;
            f.state = State::Runnable;
            L->current = t;
            swapcontext(&L->scheduler, &f.ctx);
            progressed = true;
        }
        if (all_done) return true;
        if (!progressed) {
            unsigned done = 0, at_block = 0, at_warp = 0;
            for (auto& f : L->fibers) {
                done += f.state == State::Done;
                at_block += f.state == State::BlockWait;
                at_warp += f.state == State::WarpWait;
            }
            why = "deadlock in block " + std::to_string(L->block_idx) + ": " + std::to_string(done) +
                  " threads finished, " + std::to_string(at_block) + " at __syncthreads, " +
                  std::to_string(at_warp) + " at a warp collective";
            return false;
        }
    }
}

}  // namespace

unsigned thread_index() { return L->current; }
unsigned block_index() { return L->block_idx; }
unsigned block_size() { return L->block; }
unsigned grid_size() { return L->grid; }

void block_barrier() {
    Fiber& f = L->fibers[L->current];
    if (++L->block_arrived == L->block) {
        L->block_arrived = 0;
        ++L->block_generation;
        return;
    }
    f.state = State::BlockWait;
    f.wait_generation = L->block_generation;
    yield();
}

void warp_barrier() {
    const unsigned w = L->current / 32;
    Fiber& f = L->fibers[L->current];
    if (++L->warp_arrived[w] == 32) {
        L->warp_arrived[w] = 0;
        ++L->warp_generation[w];
        return;
    }
    f.state = State::WarpWait;
    f.wait_generation = L->warp_generation[w];
    yield();
}

void* dynamic_shared() { return L->dynamic.data(); }

uint64_t* shuffle_slots(unsigned& lane) {
    Fiber& f = L->fibers[L->current];
    lane = L->current & 31;
    const unsigned bank = f.parity;
    f.parity ^= 1;
    return &L->slots[((L->current / 32) * 2 + bank) * 32];
}

}  // namespace emu

static int emu_run(unsigned grid, unsigned block, unsigned long shared_bytes, std::function<void()> body, char* error,
                   unsigned long error_size);

#ifndef CPPO_EMU_TOPK
struct KernelEntry {
    const char* name;
    void (*fn)(const Args);
};

// The kernels are templates on the input dtypes; a build instantiates one dtype set,
// CPPO_EMU_TARGS (e.g. -DCPPO_EMU_TARGS=1,1,1,4,1), as the GPU path's name expressions do.
#define EMU_STR2(...) #__VA_ARGS__
#define EMU_STR(...) EMU_STR2(__VA_ARGS__)

static const KernelEntry kKernels[] = {
    {"cppo_shuffle", cppo_shuffle<CPPO_EMU_TARGS>},
    {"cppo_stats", cppo_stats<CPPO_EMU_TARGS>},
    {"cppo_rows", cppo_rows<CPPO_EMU_TARGS>},
    {"cppo_mask_tiles", cppo_mask_tiles<CPPO_EMU_TARGS>},
};

extern "C" __attribute__((visibility("default"))) unsigned long emu_args_size() { return sizeof(Args); }
extern "C" __attribute__((visibility("default"))) const char* emu_targs() { return EMU_STR(CPPO_EMU_TARGS); }

extern "C" __attribute__((visibility("default"))) int emu_launch(const char* kernel, unsigned grid, unsigned block, const void* args,
                          unsigned long args_size, char* error, unsigned long error_size) {
    auto fail = [&](const std::string& msg) {
        std::snprintf(error, error_size, "%s", msg.c_str());
        return 1;
    };
    static Args a;
    void (*fn)(const Args) = nullptr;
    // `kernel` is the base name or the name expression of this build's instantiation.
    const std::string requested(kernel);
    for (const auto& k : kKernels) {
        const std::string base(k.name);
        if (requested == base || requested == base + "<" + emu_targs() + ">") fn = k.fn;
    }
    if (!fn) return fail(std::string("unknown kernel ") + kernel);
    if (args_size != sizeof(Args)) return fail("argument block has the wrong size");
    std::memcpy(&a, args, sizeof(Args));
    return emu_run(grid, block, 0, [fn] { fn(a); }, error, error_size);
}

#endif  // !CPPO_EMU_TOPK

// Runs `body` as a grid of blocks of fibers; 0 or 1 with a message in `error`.
static int emu_run(unsigned grid, unsigned block, unsigned long shared_bytes, std::function<void()> body, char* error,
                   unsigned long error_size) {
    auto fail = [&](const std::string& msg) {
        std::snprintf(error, error_size, "%s", msg.c_str());
        return 1;
    };
    static emu::Launch launch;
    emu::Launch& l = launch;
    if (block == 0 || block % 32 != 0) return fail("block size must be a positive multiple of 32");
    l.body = std::move(body);
    l.dynamic.assign((shared_bytes + 7) / 8, 0.0);
    l.grid = grid;
    l.block = block;
    if (l.fibers.size() < block) l.fibers.resize(block);
    for (auto& f : l.fibers) {
        if (f.stack.empty()) f.stack.resize(emu::kStack);
    }
    l.warp_arrived.assign(block / 32, 0);
    l.warp_generation.assign(block / 32, 0);
    l.slots.assign((block / 32) * 2 * 32, 0);
    emu::L = &l;
    for (unsigned b = 0; b < grid; ++b) {
        l.block_idx = b;
        std::string why;
        if (!emu::run_block(why)) {
            emu::L = nullptr;
            return fail(why);
        }
    }
    emu::L = nullptr;
    return 0;
}

#ifndef CPPO_EMU_TOPK
// The kernels' input widening (FloatIn<CODE>::widen, the code the GPU runs) over n raw
// values: code 1 float32 bits (uint32), 2 float16 bits, 3 bfloat16 bits (uint16).
extern "C" __attribute__((visibility("default"))) int emu_widen(int code, const void* in, double* out,
                                                                unsigned long n) {
    for (unsigned long i = 0; i < n; ++i) {
        switch (code) {
            case F32: out[i] = FloatIn<F32>::widen(((const uint32_t*)in)[i]); break;
            case F16: out[i] = FloatIn<F16>::widen(((const uint16_t*)in)[i]); break;
            case BF16: out[i] = FloatIn<BF16>::widen(((const uint16_t*)in)[i]); break;
            default: return 1;
        }
    }
    return 0;
}
#endif  // !CPPO_EMU_TOPK

#ifdef CPPO_EMU_TOPK
// The Top-K kernel (topk_logits.cu) with its arguments in one C struct (filled by
// tests/cuda_emulator.py from the launcher's argument tuple).
struct TopkArgs {
    const void* logits;
    long long n_rows, vocab, row_stride;
    double temp;
    float c;
    int kind, k;
    const long long* topk_ids;
    const double* topk_old;
    const long long* sampled_ids;
    const double* old_lp;
    const unsigned char* valid;
    int has_valid;
    double* out_div;
    double* out_lp;
    int has_out_lp;
    double* out_topk_lp;
    int has_out_topk_lp;
    unsigned long long* error;
    long long row_base;
};

template <int DT, int VEC>
static void topk_call(const TopkArgs& a) {
    typedef typename Elem<DT>::T T;
    topk_divergence_from_logits<DT, VEC>((const T*)a.logits, a.n_rows, a.vocab, a.row_stride, a.temp, a.c, a.kind,
                                         a.k, a.topk_ids, a.topk_old, a.sampled_ids, a.old_lp, a.valid,
                                         a.has_valid, a.out_div, a.out_lp, a.has_out_lp, a.out_topk_lp,
                                         a.has_out_topk_lp, a.error, a.row_base);
}

extern "C" __attribute__((visibility("default"))) unsigned long emu_topk_args_size() { return sizeof(TopkArgs); }

extern "C" __attribute__((visibility("default"))) int emu_topk_launch(int dt, int vec, unsigned grid, unsigned block,
                                                                      const TopkArgs* args, unsigned long shared,
                                                                      char* error, unsigned long error_size) {
    static TopkArgs a;
    a = *args;
    void (*fn)(const TopkArgs&) = nullptr;
    if (dt == 0 && vec == 4) fn = topk_call<0, 4>;
    if (dt == 1 && vec == 8) fn = topk_call<1, 8>;
    if (dt == 2 && vec == 8) fn = topk_call<2, 8>;
    if (dt == 0 && vec == 1) fn = topk_call<0, 1>;
    if (dt == 1 && vec == 1) fn = topk_call<1, 1>;
    if (dt == 2 && vec == 1) fn = topk_call<2, 1>;
    if (!fn) {
        std::snprintf(error, error_size, "no instantiation <%d, %d>", dt, vec);
        return 1;
    }
    return emu_run(grid, block, shared, [fn] { fn(a); }, error, error_size);
}
#endif  // CPPO_EMU_TOPK
