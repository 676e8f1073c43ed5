// Shared device helpers: reductions and bf16 packing. Every kernel is extern "C" so the
// host finds it by its plain name in the fatbin.
#pragma once
#ifndef SEGK_EMU
#include <cuda_bf16.h>
// 16-byte aligned: cp.async and ldmatrix need it.
#define SEGK_DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
#endif
#include <stdint.h>

#define SEGK_LEAKY 0.01f

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block; the result is valid in thread 0. `sh` holds 32 doubles.
__device__ __forceinline__ double block_sum_d(double v, double* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_d(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = threadIdx.x < nw ? sh[threadIdx.x] : 0.0;
    if (warp == 0) v = warp_sum_d(v);
    __syncthreads();
    return v;
}

// A vector access must be aligned to its size on a GPU (else "misaligned address"); the
// emulator's CPU does not care, so it checks each one here.
#ifdef SEGK_EMU
#define SEGK_ALIGNED(p, bytes) emu_check_aligned((const void*)(p), bytes)
#else
#define SEGK_ALIGNED(p, bytes) ((void)0)
#endif

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float leaky(float z) { return z > 0.f ? z : z * SEGK_LEAKY; }
// The gradient through LeakyReLU at pre-activation z of an incoming gradient g.
__device__ __forceinline__ float leaky_grad(float z, float g) { return z > 0.f ? g : g * SEGK_LEAKY; }

// Activation storage: f32, or bf16 (half the bytes of every activation and its gradient; math
// stays f32). Kernels that touch activations are templates over the storage type A, exported
// twice: segk_<name>_f32 and segk_<name>_bf16. Everything reads and writes them through these.
typedef __nv_bfloat16 bf16;
__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(bf16* p, float v) { *p = __float2bfloat16(v); }

// Eight consecutive activations (16-byte aligned) as f32, and back: one 16-byte access for bf16
// storage, two for f32. The memory-bound kernels move their tensors this way where the channel
// count is a multiple of 8, so that a voxel's channels never straddle a group.
__device__ __forceinline__ void unpack2(uint32_t w, float* v) {
    v[0] = __uint_as_float(w << 16);
    v[1] = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void load8(const bf16* p, float* v) {
    SEGK_ALIGNED(p, 16);
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    unpack2(u.x, v), unpack2(u.y, v + 2), unpack2(u.z, v + 4), unpack2(u.w, v + 6);
}
__device__ __forceinline__ void load8(const float* p, float* v) {
    SEGK_ALIGNED(p, 16);
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void store8(bf16* p, const float* v) {
    SEGK_ALIGNED(p, 16);
    uint4 u;
    u.x = pack_bf16(v[0], v[1]), u.y = pack_bf16(v[2], v[3]), u.z = pack_bf16(v[4], v[5]), u.w = pack_bf16(v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = u;
}
__device__ __forceinline__ void store8(float* p, const float* v) {
    SEGK_ALIGNED(p, 16);
    float4 a, b;
    a.x = v[0], a.y = v[1], a.z = v[2], a.w = v[3], b.x = v[4], b.y = v[5], b.z = v[6], b.w = v[7];
    reinterpret_cast<float4*>(p)[0] = a, reinterpret_cast<float4*>(p)[1] = b;
}

// Two consecutive activations in one 4-byte (bf16) or 8-byte (f32) access: the conv
// epilogues write each mma fragment's column pair this way.
template <class T>
__device__ __forceinline__ bool pair_aligned(const T* p) { return (reinterpret_cast<uintptr_t>(p) & (2 * sizeof(T) - 1)) == 0; }
__device__ __forceinline__ void ld2(const bf16* p, float* v) {
    SEGK_ALIGNED(p, 4);
    unpack2(*reinterpret_cast<const uint32_t*>(p), v);
}
__device__ __forceinline__ void ld2(const float* p, float* v) {
    SEGK_ALIGNED(p, 8);
    const float2 a = *reinterpret_cast<const float2*>(p);
    v[0] = a.x, v[1] = a.y;
}
__device__ __forceinline__ void st2(bf16* p, float a, float b) {
    SEGK_ALIGNED(p, 4);
    *reinterpret_cast<uint32_t*>(p) = pack_bf16(a, b);
}
__device__ __forceinline__ void st2(float* p, float a, float b) {
    SEGK_ALIGNED(p, 8);
    float2 v;
    v.x = a, v.y = b;
    *reinterpret_cast<float2*>(p) = v;
}
// Output columns n and n+1 of one row (`both`: n+1 exists) at p: one access where `paired`
// (the pair is aligned, the same for the whole tensor), else one element at a time. A nonzero
// beta adds beta times what is there.
template <class T>
__device__ __forceinline__ void st_cols(T* p, float v0, float v1, bool both, bool paired, float beta = 0.f) {
    if (both && paired) {
        if (beta != 0.f) {
            float o[2];
            ld2(p, o);
            v0 = beta * o[0] + v0, v1 = beta * o[1] + v1;
        }
        st2(p, v0, v1);
    } else {
        st(p, beta == 0.f ? v0 : beta * ld(p) + v0);
        if (both) st(p + 1, beta == 0.f ? v1 : beta * ld(p + 1) + v1);
    }
}

// --- reductions over the rows of an [rows x C] tensor, per channel ---------------------------
// (instance-norm statistics, bias gradients). A block of COL_THREADS takes a chunk of rows
// (blockIdx.x; blockIdx.y a sample of `rows` rows each, where there are several): `lanes`
// groups of W channels side by side, `rl` row lanes (a power of two) stepping through the rows,
// then a tree merge of the row lanes' results in shared memory.
#define COL_THREADS 256

template <int W>
struct ColBlock {
    int b, k, G, lanes, rl, cl, rlane;
    long r0, r1;
    __device__ ColBlock(long rows, int C, long chunk) : b(blockIdx.y), k(blockIdx.x), G(C / W) {
        lanes = min(G, COL_THREADS);
        for (rl = 1; rl * 2 * lanes <= COL_THREADS;) rl *= 2;
        cl = threadIdx.x % lanes, rlane = threadIdx.x / lanes;
        r0 = k * chunk, r1 = min(rows, r0 + chunk);
    }
    // Whether this thread works on channel group g (every thread runs every pass over the
    // groups: the merges have barriers).
    __device__ bool live(int g) const { return rlane < rl && g < G; }
    // Where this block's `width` partials of channel c go: part[((b * chunks + k) * C + c) * width].
    __device__ float* part_at(float* part, int C, int c, int width) const { return part + (((long)b * gridDim.x + k) * C + c) * width; }
};

// Merges row lane pairs, halving: after it, row lane 0 holds the block's result in v[] for its
// channel group. v[] (V floats) is exchanged through sh[COL_THREADS * V].
template <int V, int W, class Merge>
__device__ __forceinline__ void tree_merge(float* v, float* sh, const ColBlock<W>& L, bool live, Merge merge) {
    for (int s = L.rl / 2; s > 0; s >>= 1) {
        if (live && L.rlane >= s && L.rlane < 2 * s)
#pragma unroll
            for (int i = 0; i < V; i++) sh[threadIdx.x * V + i] = v[i];
        __syncthreads();
        if (live && L.rlane < s) merge(v, sh + (threadIdx.x + s * L.lanes) * V);
        __syncthreads();
    }
}
