// A CPU emulator for segk's kernels: the .cu files compile as C++ with this header first
// (-DSEGK_EMU -include emu.h), and emu.cpp runs a launch block by block, each thread of a block
// a fiber on one OS thread, switching only at barriers (__syncthreads, warp exchanges). It
// checks the kernels' indexing, tails, barriers and fragment layouts against the CPU twins
// where no GPU is available; it says nothing about speed, and the mma is emulated from the
// PTX ISA's m16n8k16 fragment layout, not run on tensor cores.
#pragma once
// Fibers resume with _longjmp onto other stacks, which glibc's fortified longjmp check
// (__longjmp_chk) takes for a corrupt stack and aborts: this file is included before any
// libc header, so turning the fortification off here holds whatever the compiler flags say.
#undef _FORTIFY_SOURCE
#include <math.h>
#include <stdint.h>
#include <string.h>

struct uint3 { unsigned x, y, z; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) float2 { float x, y; };
struct dim3 { unsigned x, y, z; };

extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

void __syncthreads();
// A vector access of `bytes` at p: a GPU faults on a misaligned one, so the launch fails
// ("misaligned address", naming the thread) when one happens.
void emu_check_aligned(const void* p, unsigned bytes);
// All live lanes of the calling thread's warp meet here.
void emu_warp_sync();
// Per-warp exchange slots (one 8-byte word per lane) for shuffles and the mma.
uint64_t* emu_warp_slots();
void* emu_dynamic_shared();

#define __trap() __builtin_trap()

template <class T> inline T min(T a, T b) { return a < b ? a : b; }
template <class T> inline T max(T a, T b) { return a > b ? a : b; }
inline float __expf(float x) { return expf(x); }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __logf(float x) { return logf(x); }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
// A product rounded on its own (nvcc would otherwise contract it into a following add).
inline float __fmul_rn(float a, float b) { return a * b; }

// Fibers switch only at barriers, so a read-modify-write is never interleaved.
inline float atomicAdd(float* p, float v) { float o = *p; *p = o + v; return o; }
inline double atomicAdd(double* p, double v) { double o = *p; *p = o + v; return o; }
inline int atomicMax(int* p, int v) { int o = *p; if (v > o) *p = v; return o; }

template <class T> inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of a word");
    uint64_t* s = emu_warp_slots();
    int lane = threadIdx.x & 31;
    uint64_t w = 0;
    memcpy(&w, &v, sizeof(T));
    s[lane] = w;
    emu_warp_sync();
    T r;
    uint64_t got = s[lane ^ lane_mask];
    memcpy(&r, &got, sizeof(T));
    emu_warp_sync();
    return r;
}

struct __nv_bfloat16 { uint16_t x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };

// Round to nearest even, as __float2bfloat16 does; NaN stays NaN.
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    __nv_bfloat16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) { b.x = (uint16_t)((u >> 16) | 0x40); return b; }
    u += 0x7fffu + ((u >> 16) & 1u);
    b.x = (uint16_t)(u >> 16);
    return b;
}
inline float emu_bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline float __bfloat162float(__nv_bfloat16 b) { return emu_bf16_to_float(b.x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    __nv_bfloat162 v;
    v.x = __float2bfloat16(lo);
    v.y = __float2bfloat16(hi);
    return v;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with D = C (in place), one warp.
void emu_mma_m16n8k16_bf16(float* d, const uint32_t* a, const uint32_t* b);

#define SEGK_DYNAMIC_SHARED(T, name) T* name = (T*)emu_dynamic_shared()
// Bytes of dynamic shared memory this launch has.
unsigned emu_dynamic_shared_bytes();

// cp.async: a 16-byte copy (zeros when !valid) queued per thread in the open group, done only
// when a wait retires its group, so a read of shared memory that no wait and barrier orders
// after the copy finds the old bytes, as it can on a GPU.
void emu_cp_async16(void* dst, const void* src, bool valid);
void emu_cp_async_commit();
// Retires every committed group but the newest `pending`.
void emu_cp_async_wait(int pending);
// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane 8j+i gives row i of matrix j.
void emu_ldmatrix_x4(uint32_t* r, const void* row, bool trans);
