// Shared device helpers: reductions and bf16 packing. Every kernel is extern "C" so the
// host finds it by its plain name in the fatbin.
#pragma once
#ifndef SEGK_EMU
#include <cuda_bf16.h>
#define SEGK_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
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
