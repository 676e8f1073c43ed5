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

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float leaky(float z) { return z > 0.f ? z : z * SEGK_LEAKY; }

// Activation storage: f32, or bf16 (half the bytes of every activation and its gradient; math
// stays f32). Kernels that touch activations are templates over the storage type A, exported
// twice: segk_<name>_f32 and segk_<name>_bf16. Everything reads and writes them through these.
typedef __nv_bfloat16 bf16;
__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(bf16* p, float v) { *p = __float2bfloat16(v); }
