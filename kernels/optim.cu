// Optimizer and arena-wide ops: fill, squared norm (per-block partials in f64, merged in a
// fixed order), SGD with nesterov momentum, weight decay and gradient clipping
// (torch.optim.SGD and clip_grad_norm_ semantics).
#include "common.cuh"

template <class A>
__device__ __forceinline__ void fill(A* p, long n, float v) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) st(p + i, v);
}
extern "C" __global__ void segk_fill_f32(float* p, long n, float v) { fill(p, n, v); }
extern "C" __global__ void segk_fill_bf16(bf16* p, long n, float v) { fill(p, n, v); }

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

// One block: out[0] = the sum of partial[0..n), each thread's share in index order and the
// shares in thread order, so the total has the same bits on every run.
extern "C" __global__ void segk_sum_partials_f64(const double* partial, int n, float* out) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    acc = block_sum_d(acc, sh);
    if (threadIdx.x == 0) out[0] = (float)acc;
}

// The step is applied only when every guard value is finite (the squared gradient norm and the
// loss parts of the step: a non-finite one skips the step without the host looking). Gradients
// are clipped to norm max_norm (torch.nn.utils.clip_grad_norm_'s factor), then
// g' = g*f + wd*p; m = mu*m + g' (m starts at zero, so the first step sets m = g');
// p -= lr * (g' + mu*m).
extern "C" __global__ void segk_sgd_nesterov_f32(float* p, const float* g, float* m, long n, float lr, float mu, float wd, const float* guard, int guard_len, float max_norm) {
    for (int i = 0; i < guard_len; i++)
        if (!isfinite(guard[i])) return;
    const double norm = sqrt((double)guard[0]);
    const float f = (float)fmin(1.0, (double)max_norm / (norm + 1e-6));
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        // The clipped gradient rounded on its own, as the CPU twin scales it (not fused into the add).
        float gi = (f < 1.f ? __fmul_rn(g[i], f) : g[i]) + wd * p[i];
        float mi = mu * m[i] + gi;
        m[i] = mi;
        p[i] -= lr * (gi + mu * mi);
    }
}
