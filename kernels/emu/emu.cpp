// The emulator's runtime (see emu.h): fibers per block, barriers, the mma, and the launch entry
// point. Built into one translation unit after every kernels/*.cu by build.rs, which also
// defines EMU_KERNELS(X) as the list of kernel names.
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <ucontext.h>
#include <type_traits>
#include <utility>

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace {
enum State { READY, AT_BLOCK, AT_WARP, DONE };
// A fiber starts through makecontext/setcontext once per block, then switches with
// _setjmp/_longjmp, which save no signal mask: no system call per barrier.
struct Fiber {
    ucontext_t ctx;
    jmp_buf jb;
    bool started;
    State state;
};
const size_t STACK = 256 * 1024;
const int WARP_WORDS = 32 * 8;
Fiber* fibers = nullptr;
char* stacks = nullptr;
uint64_t* slots = nullptr;
unsigned char* dyn = nullptr;
int capacity = 0;
size_t dyn_capacity = 0;
unsigned dyn_bytes = 0;
int nthreads = 0, cur = -1;
jmp_buf sched_jb;
void (*entry)(void**) = nullptr;
void** params = nullptr;
char err[512];
// The first misaligned vector access of the launch (a GPU stops the kernel there; the
// emulator finishes the block and fails the launch with it).
bool misaligned = false;

// A seeded schedule (0: off, blocks in grid order and threads in index order): blocks run in a
// shuffled order and, between barriers, the threads of a block in a fresh shuffled order each
// round, so that a result which depends on the order warps or blocks happen to run in (a float
// atomicAdd) changes with the seed, as it changes from run to run on a GPU.
uint64_t schedule_seed = 0, schedule_state = 0;
bool schedule_from_env = true;
int* order = nullptr;

uint64_t next_random() {
    // splitmix64
    uint64_t z = (schedule_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// order[0..n) = 0..n-1, shuffled when a schedule seed is set.
void fill_order(int* o, int n) {
    for (int i = 0; i < n; i++) o[i] = i;
    if (!schedule_seed) return;
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(next_random() % (uint64_t)(i + 1));
        int t = o[i];
        o[i] = o[j];
        o[j] = t;
    }
}

void yield(State s) {
    fibers[cur].state = s;
    if (!_setjmp(fibers[cur].jb)) _longjmp(sched_jb, 1);
}

void fiber_main() {
    entry(params);
    fibers[cur].state = DONE;
    _longjmp(sched_jb, 1);
}

// Runs fiber i until it yields or ends.
void resume(int i) {
    if (_setjmp(sched_jb)) return;
    if (fibers[i].started) _longjmp(fibers[i].jb, 1);
    fibers[i].started = true;
    setcontext(&fibers[i].ctx);
}

void set_thread(int i) {
    threadIdx.x = i % blockDim.x;
    threadIdx.y = (i / blockDim.x) % blockDim.y;
    threadIdx.z = i / (blockDim.x * blockDim.y);
}

// Runs every thread of the current block to completion; 2 when the threads wait at barriers
// that can never open (a barrier in divergent code, a warp exchange beside a block barrier).
int run_block() {
    for (int i = 0; i < nthreads; i++) {
        Fiber& f = fibers[i];
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks + (size_t)i * STACK;
        f.ctx.uc_stack.ss_size = STACK;
        f.ctx.uc_link = nullptr;  // never reached: fiber_main ends with a jump back
        makecontext(&f.ctx, fiber_main, 0);
        f.started = false;
        f.state = READY;
    }
    for (;;) {
        fill_order(order, nthreads);
        for (int k = 0; k < nthreads; k++) {
            int i = order[k];
            if (fibers[i].state != READY) continue;
            cur = i;
            set_thread(i);
            resume(i);
        }
        cur = -1;
        int done = 0, at_warp = 0;
        for (int i = 0; i < nthreads; i++) {
            done += fibers[i].state == DONE;
            at_warp += fibers[i].state == AT_WARP;
        }
        if (done == nthreads) return 0;
        bool released = false;
        for (int w = 0; w * 32 < nthreads; w++) {
            int lo = w * 32, hi = lo + 32 < nthreads ? lo + 32 : nthreads, waiting = 0, live = 0;
            for (int i = lo; i < hi; i++) {
                live += fibers[i].state != DONE;
                waiting += fibers[i].state == AT_WARP;
            }
            if (waiting > 0 && waiting == live) {
                for (int i = lo; i < hi; i++)
                    if (fibers[i].state == AT_WARP) fibers[i].state = READY;
                released = true;
            }
        }
        if (released) continue;
        if (at_warp > 0) {
            snprintf(err, sizeof err, "block (%u,%u,%u): a warp exchange waits for lanes stopped at __syncthreads (divergent warp-level code)", blockIdx.x, blockIdx.y, blockIdx.z);
            return 2;
        }
        for (int i = 0; i < nthreads; i++)
            if (fibers[i].state == AT_BLOCK) fibers[i].state = READY;
    }
}

struct Entry {
    const char* name;
    void (*call)(void**);
    int (*sizes)(unsigned*, int);
};

template <class... A, size_t... I>
void call_with(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<A*>(p[I])...);
}
template <class... A>
void invoke(void (*f)(A...), void** p) {
    call_with(f, p, std::index_sequence_for<A...>{});
}
// The byte size of each argument, in order (what a driver copies at launch), with the top bit
// set for pointers.
template <class... A>
int param_sizes(void (*)(A...), unsigned* out, int max) {
    const unsigned s[] = {(unsigned)sizeof(A) | (std::is_pointer<A>::value ? 0x80000000u : 0u)..., 0u};
    int n = (int)sizeof...(A);
    for (int i = 0; i < n && i < max; i++) out[i] = s[i];
    return n;
}

// The emulator's own test: half a warp at a warp exchange, the other half at __syncthreads.
void segk_emu_check_divergent(int* out) {
    if ((threadIdx.x & 31) < 16)
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
    else
        __syncthreads();
}

// And a vector access off its alignment, as a float pointer one element past an 8-byte boundary.
void segk_emu_check_misaligned(float* p) { emu_check_aligned(p + 1, 8); }

// And the order threads run in: out[0] counts turns, out[1 + flat thread index] gets its turn,
// so a schedule seed shows as another order (blocks and threads both).
void segk_emu_check_order(int* out) { out[1 + blockIdx.x * blockDim.x + threadIdx.x] = ++out[0]; }

#define EMU_ENTRY(name) {#name, [](void** p) { invoke(name, p); }, [](unsigned* s, int m) { return param_sizes(name, s, m); }},
const Entry table[] = {EMU_KERNELS(EMU_ENTRY) EMU_ENTRY(segk_emu_check_divergent) EMU_ENTRY(segk_emu_check_misaligned) EMU_ENTRY(segk_emu_check_order)};
}  // namespace

void __syncthreads() { yield(AT_BLOCK); }
void emu_check_aligned(const void* p, unsigned bytes) {
    if (misaligned || ((uintptr_t)p & (bytes - 1)) == 0) return;
    misaligned = true;
    snprintf(err, sizeof err, "block (%u,%u,%u) thread %d: misaligned address: a %u-byte access at %p", blockIdx.x, blockIdx.y, blockIdx.z, cur, bytes, p);
}
void emu_warp_sync() { yield(AT_WARP); }
uint64_t* emu_warp_slots() { return slots + (size_t)(cur / 32) * WARP_WORDS; }
void* emu_dynamic_shared() { return dyn; }
unsigned emu_dynamic_shared_bytes() { return dyn_bytes; }

// Per thread: copies queued by cp.async, each tagged with the group it was issued in.
struct AsyncCopy {
    void* dst;
    const void* src;
    int group;
};
const int MAX_ASYNC = 64;
static AsyncCopy* async_q = nullptr;
static int* async_n = nullptr;       // copies queued per thread
static int* async_groups = nullptr;  // groups committed per thread

void emu_cp_async16(void* dst, const void* src, bool valid) {
    if (async_n[cur] == MAX_ASYNC) {
        fprintf(stderr, "segk emulator: more than %d cp.async in flight in one thread\n", MAX_ASYNC);
        abort();
    }
    async_q[(size_t)cur * MAX_ASYNC + async_n[cur]++] = {dst, valid ? src : nullptr, async_groups[cur]};
}

void emu_cp_async_commit() { async_groups[cur]++; }

void emu_cp_async_wait(int pending) {
    AsyncCopy* q = async_q + (size_t)cur * MAX_ASYNC;
    int kept = 0;
    for (int i = 0; i < async_n[cur]; i++) {
        if (q[i].group < async_groups[cur] - pending) {
            if (q[i].src) memcpy(q[i].dst, q[i].src, 16);
            else memset(q[i].dst, 0, 16);
        } else {
            q[kept++] = q[i];
        }
    }
    async_n[cur] = kept;
}

void emu_ldmatrix_x4(uint32_t* r, const void* row, bool trans) {
    uint64_t* s = emu_warp_slots();
    int lane = cur & 31;
    s[lane] = (uint64_t)(uintptr_t)row;
    emu_warp_sync();
    for (int j = 0; j < 4; j++) {
        if (!trans) {
            // Lane l holds row l/4 of matrix j, elements 2(l%4) and 2(l%4)+1.
            const unsigned char* p = (const unsigned char*)(uintptr_t)s[8 * j + (lane >> 2)];
            memcpy(&r[j], p + (lane & 3) * 4, 4);
        } else {
            // Transposed: column l/4, rows 2(l%4) (low half) and 2(l%4)+1 (high half).
            const unsigned char* lo = (const unsigned char*)(uintptr_t)s[8 * j + (lane & 3) * 2];
            const unsigned char* hi = (const unsigned char*)(uintptr_t)s[8 * j + (lane & 3) * 2 + 1];
            uint16_t a, b;
            memcpy(&a, lo + (lane >> 2) * 2, 2);
            memcpy(&b, hi + (lane >> 2) * 2, 2);
            r[j] = (uint32_t)a | ((uint32_t)b << 16);
        }
    }
    emu_warp_sync();
}

// Per warp: whether the current mma's products are computed, and the 16x8 products.
static bool* mma_done = nullptr;
static float* mma_out = nullptr;

void emu_mma_m16n8k16_bf16(float* d, const uint32_t* a, const uint32_t* b) {
    uint64_t* s = emu_warp_slots();
    int lane = cur & 31, warp = cur / 32;
    for (int j = 0; j < 4; j++) s[lane * 8 + j] = a[j];
    for (int j = 0; j < 2; j++) s[lane * 8 + 4 + j] = b[j];
    mma_done[warp] = false;
    emu_warp_sync();
    float* out = mma_out + warp * 128;
    // The first lane to resume multiplies for the whole warp; fibers never interleave
    // between barriers, so the others find the products ready.
    if (!mma_done[warp]) {
        float A[16][16], B[16][8];
        for (int l = 0; l < 32; l++) {
            int g = l >> 2, t = l & 3;
            const uint64_t* r = s + l * 8;
            // A row-major: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..);
            // B column: b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g); the lower index in the low half.
            const int ar[4] = {g, g + 8, g, g + 8}, ac[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
            for (int j = 0; j < 4; j++) {
                A[ar[j]][ac[j]] = emu_bf16_to_float((uint16_t)(r[j] & 0xffff));
                A[ar[j]][ac[j] + 1] = emu_bf16_to_float((uint16_t)(r[j] >> 16));
            }
            for (int j = 0; j < 2; j++) {
                B[2 * t + 8 * j][g] = emu_bf16_to_float((uint16_t)(r[4 + j] & 0xffff));
                B[2 * t + 8 * j + 1][g] = emu_bf16_to_float((uint16_t)(r[4 + j] >> 16));
            }
        }
        for (int i = 0; i < 16; i++)
            for (int j = 0; j < 8; j++) {
                float acc = 0.f;
                for (int k = 0; k < 16; k++) acc += A[i][k] * B[k][j];
                out[i * 8 + j] = acc;
            }
        mma_done[warp] = true;
    }
    // D fragment: d0 (g, 2t), d1 (g, 2t+1), d2 (g+8, 2t), d3 (g+8, 2t+1).
    int g = lane >> 2, t = lane & 3;
    d[0] += out[g * 8 + 2 * t];
    d[1] += out[g * 8 + 2 * t + 1];
    d[2] += out[(g + 8) * 8 + 2 * t];
    d[3] += out[(g + 8) * 8 + 2 * t + 1];
    emu_warp_sync();
}

// The argument count of kernel `name` (sizes as param_sizes gives them, up to `max`), -1 for
// no such kernel.
extern "C" int segk_emu_param_sizes(const char* name, unsigned* sizes, int max) {
    for (const Entry& t : table)
        if (strcmp(t.name, name) == 0) return t.sizes(sizes, max);
    return -1;
}

// Runs kernel `name` over the grid, block after block; 0 on success, else see segk_emu_error.
extern "C" int segk_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shared_bytes, void** p) {
    const Entry* e = nullptr;
    for (const Entry& t : table)
        if (strcmp(t.name, name) == 0) e = &t;
    if (!e) {
        snprintf(err, sizeof err, "no kernel named %s", name);
        return 1;
    }
    int n = (int)(bx * by * bz);
    if (n < 1 || n > 1024 || gx == 0 || gy == 0 || gz == 0) {
        snprintf(err, sizeof err, "%s: launch of (%u,%u,%u) blocks of (%u,%u,%u) threads is invalid", name, gx, gy, gz, bx, by, bz);
        return 3;
    }
    if (n > capacity) {
        free(fibers);
        free(stacks);
        free(slots);
        free(order);
        order = (int*)calloc(n, sizeof(int));
        fibers = (Fiber*)calloc(n, sizeof(Fiber));
        stacks = (char*)malloc((size_t)n * STACK);
        slots = (uint64_t*)calloc((size_t)((n + 31) / 32) * WARP_WORDS, 8);
        free(mma_done);
        free(mma_out);
        free(async_q);
        free(async_n);
        free(async_groups);
        async_q = (AsyncCopy*)calloc((size_t)n * MAX_ASYNC, sizeof(AsyncCopy));
        async_n = (int*)calloc(n, sizeof(int));
        async_groups = (int*)calloc(n, sizeof(int));
        mma_done = (bool*)calloc((size_t)(n + 31) / 32, sizeof(bool));
        mma_out = (float*)calloc((size_t)((n + 31) / 32) * 128, sizeof(float));
        if (!fibers || !order || !stacks || !slots || !mma_done || !mma_out || !async_q || !async_n || !async_groups) {
            snprintf(err, sizeof err, "out of host memory for %d emulated threads", n);
            capacity = 0;
            return 4;
        }
        capacity = n;
    }
    if (shared_bytes > dyn_capacity) {
        free(dyn);
        dyn = (unsigned char*)malloc(shared_bytes);
        dyn_capacity = dyn ? shared_bytes : 0;
        if (!dyn) {
            snprintf(err, sizeof err, "out of host memory for %u bytes of shared memory", shared_bytes);
            return 4;
        }
    }
    nthreads = n;
    dyn_bytes = shared_bytes;
    blockDim = {bx, by, bz};
    gridDim = {gx, gy, gz};
    entry = e->call;
    params = p;
    if (schedule_from_env) {
        const char* env = getenv("SEGK_EMU_SCHEDULE");
        schedule_seed = env ? strtoull(env, nullptr, 10) : 0;
        schedule_from_env = false;
    }
    // Every launch draws its own order from the seed and the launch's position in the run.
    static uint64_t launch_count = 0;
    schedule_state = schedule_seed * 0x2545f4914f6cdd1dull + ++launch_count;
    size_t nblocks = (size_t)gx * gy * gz;
    int* block_order = nullptr;
    if (schedule_seed) {
        if (nblocks > (size_t)1 << 30 || !(block_order = (int*)malloc(nblocks * sizeof(int)))) {
            snprintf(err, sizeof err, "%s: out of host memory for a shuffled order of %zu blocks", name, nblocks);
            return 4;
        }
        fill_order(block_order, (int)nblocks);
    }
    for (size_t b = 0; b < nblocks; b++) {
        size_t i = block_order ? (size_t)block_order[b] : b;
        blockIdx = {(unsigned)(i % gx), (unsigned)(i / gx % gy), (unsigned)(i / gx / gy)};
        // Shared memory starts as garbage on a GPU: make reads before writes visible.
        if (shared_bytes) memset(dyn, 0xff, shared_bytes);
        // Copies a block left in flight die with it.
        memset(async_n, 0, n * sizeof(int));
        memset(async_groups, 0, n * sizeof(int));
        misaligned = false;
        int rc = run_block();
        if (!rc && misaligned) rc = 5;
        if (rc) {
            free(block_order);
            char tmp[512];
            snprintf(tmp, sizeof tmp, "%s: %s", name, err);
            memcpy(err, tmp, sizeof err);
            return rc;
        }
    }
    free(block_order);
    return 0;
}

extern "C" const char* segk_emu_error() { return err; }

// Sets the schedule seed (0: grid and thread order), over SEGK_EMU_SCHEDULE from then on.
extern "C" void segk_emu_set_schedule(uint64_t seed) {
    schedule_seed = seed;
    schedule_from_env = false;
}
