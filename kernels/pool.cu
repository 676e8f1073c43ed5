// Average pooling with the window equal to the stride (PyTorch's AvgPool3d(k, k): floor, no
// padding), NDHWC: the downsampling in a ResNet-D block's skip. One thread per output value;
// the backward one thread per input value (each reads the one output it fed), so no atomics
// and the same bits on every run. CPU twin: backend/cpu/pool.rs.
#include "common.cuh"

// Row r of an n x D x H x W grid -> (b, z, y, x).
__device__ __forceinline__ void pool_unravel(long r, int D, int H, int W, int* q) {
    q[3] = (int)(r % W), q[2] = (int)(r / W % H), q[1] = (int)(r / ((long)W * H) % D), q[0] = (int)(r / ((long)W * H * D));
}

// y[b, z, y, x, c] = mean of x over the window at (z k0, y k1, x k2); output dims D' H' W'.
template <class A>
__device__ __forceinline__ void avg_pool(const A* x, int n, int D, int H, int W, int C, int k0, int k1, int k2, A* y) {
    const int Do = D / k0, Ho = H / k1, Wo = W / k2;
    const long total = (long)n * Do * Ho * Wo * C;
    const float inv = 1.f / (float)(k0 * k1 * k2);
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        int q[4];
        pool_unravel(i / C, Do, Ho, Wo, q);
        const int c = (int)(i % C), b = q[0], zo = q[1], yo = q[2], xo = q[3];
        float s = 0.f;
        for (int dz = 0; dz < k0; dz++)
            for (int dy = 0; dy < k1; dy++)
                for (int dx = 0; dx < k2; dx++) s += ld(x + ((((long)b * D + zo * k0 + dz) * H + yo * k1 + dy) * W + xo * k2 + dx) * C + c);
        st(y + i, s * inv);
    }
}

// dx (beta 1: +=) dy / (k0 k1 k2) of the window holding each input voxel; 0 for the voxels a
// floor left out of every window.
template <class A>
__device__ __forceinline__ void avg_pool_bwd(const A* dy, int n, int D, int H, int W, int C, int k0, int k1, int k2, float beta, A* dx) {
    const int Do = D / k0, Ho = H / k1, Wo = W / k2;
    const long total = (long)n * D * H * W * C;
    const float inv = 1.f / (float)(k0 * k1 * k2);
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        int q[4];
        pool_unravel(i / C, D, H, W, q);
        const int c = (int)(i % C), b = q[0], zo = q[1] / k0, yo = q[2] / k1, xo = q[3] / k2;
        const float g = zo < Do && yo < Ho && xo < Wo ? ld(dy + ((((long)b * Do + zo) * Ho + yo) * Wo + xo) * C + c) * inv : 0.f;
        st(dx + i, beta == 0.f ? g : beta * ld(dx + i) + g);
    }
}

extern "C" __global__ void segk_avg_pool_f32(const float* x, int n, int D, int H, int W, int C, int k0, int k1, int k2, float* y) { avg_pool(x, n, D, H, W, C, k0, k1, k2, y); }
extern "C" __global__ void segk_avg_pool_bf16(const bf16* x, int n, int D, int H, int W, int C, int k0, int k1, int k2, bf16* y) { avg_pool(x, n, D, H, W, C, k0, k1, k2, y); }
extern "C" __global__ void segk_avg_pool_bwd_f32(const float* dy, int n, int D, int H, int W, int C, int k0, int k1, int k2, float beta, float* dx) { avg_pool_bwd(dy, n, D, H, W, C, k0, k1, k2, beta, dx); }
extern "C" __global__ void segk_avg_pool_bwd_bf16(const bf16* dy, int n, int D, int H, int W, int C, int k0, int k1, int k2, float beta, bf16* dx) { avg_pool_bwd(dy, n, D, H, W, C, k0, k1, k2, beta, dx); }
