// Optimizer and arena-wide ops: fill, scale, squared norm (per-block partials in f64),
// SGD with nesterov momentum and weight decay (torch.optim.SGD semantics).
#include "common.cuh"

template <class A>
__device__ __forceinline__ void fill(A* p, long n, float v) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) st(p + i, v);
}
extern "C" __global__ void segk_fill_f32(float* p, long n, float v) { fill(p, n, v); }
extern "C" __global__ void segk_fill_bf16(bf16* p, long n, float v) { fill(p, n, v); }

extern "C" __global__ void segk_scale_f32(float* p, long n, float s) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) p[i] *= s;
}

// partial[blockIdx.x] = sum of squares of this block's grid-stride share.
extern "C" __global__ void segk_sum_squares_f32(const float* p, long n, double* partial) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        double v = p[i];
        acc += v * v;
    }
    acc = block_sum_d(acc, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// g' = g + wd*p; m = first ? g' : mu*m + g'; p -= lr * (g' + mu*m)
extern "C" __global__ void segk_sgd_nesterov_f32(float* p, const float* g, float* m, long n, float lr, float mu, float wd, int first) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gi = g[i] + wd * p[i];
        float mi = first ? gi : mu * m[i] + gi;
        m[i] = mi;
        p[i] -= lr * (gi + mu * mi);
    }
}
