// Instance norm (affine, eps 1e-5, biased variance) fused with LeakyReLU(0.01), NDHWC.
// Statistics: Welford per thread over a chunk of voxels, Chan merges across threads and
// chunks (fp32 per thread, f64 for the final merge). Never E[x^2] - E[x]^2.
#include "common.cuh"

#define NORM_THREADS 256

// Thread layout for C channels: `lanes` channel lanes, blockDim / lanes row lanes.
__device__ __forceinline__ int channel_lanes(int C) { return C < NORM_THREADS ? C : NORM_THREADS; }

// part[((b * nchunks + k) * C + c) * 3] = (mean, M2, count) of chunk k of sample b.
template <class A>
__device__ __forceinline__ void norm_partial(const A* x, long V, int C, long chunk, float* part) {
    __shared__ float sm[NORM_THREADS], sm2[NORM_THREADS], sc[NORM_THREADS];
    int b = blockIdx.y, k = blockIdx.x, nchunks = gridDim.x;
    int lanes = channel_lanes(C), rl = blockDim.x / lanes;
    int cl = threadIdx.x % lanes, rlane = threadIdx.x / lanes;
    long r0 = k * chunk, r1 = min(V, r0 + chunk);
    for (int c0 = 0; c0 < C; c0 += lanes) {
        int c = c0 + cl;
        float mean = 0.f, m2 = 0.f, cnt = 0.f;
        if (rlane < rl && c < C) {
            for (long r = r0 + rlane; r < r1; r += rl) {
                float v = ld(x + ((long)b * V + r) * C + c);
                cnt += 1.f;
                float d = v - mean;
                mean += d / cnt;
                m2 += d * (v - mean);
            }
        }
        sm[threadIdx.x] = mean; sm2[threadIdx.x] = m2; sc[threadIdx.x] = cnt;
        __syncthreads();
        if (rlane == 0 && c < C) {
            for (int j = 1; j < rl; j++) {
                int o = j * lanes + cl;
                float nb = sc[o];
                if (nb == 0.f) continue;
                float n = cnt + nb, delta = sm[o] - mean;
                mean += delta * nb / n;
                m2 += sm2[o] + delta * delta * cnt * nb / n;
                cnt = n;
            }
            float* p = part + (((long)b * nchunks + k) * C + c) * 3;
            p[0] = mean; p[1] = m2; p[2] = cnt;
        }
        __syncthreads();
    }
}

// One thread per (sample, channel): Chan-merge the chunks, write mean and rstd.
extern "C" __global__ void segk_norm_finalize_f32(const float* part, int n, int nchunks, int C, float* mean, float* rstd) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * C) return;
    int b = i / C, c = i % C;
    double mu = 0.0, m2 = 0.0, cnt = 0.0;
    for (int k = 0; k < nchunks; k++) {
        const float* p = part + (((long)b * nchunks + k) * C + c) * 3;
        double nb = p[2];
        if (nb == 0.0) continue;
        double nn = cnt + nb, delta = (double)p[0] - mu;
        mu += delta * nb / nn;
        m2 += (double)p[1] + delta * delta * cnt * nb / nn;
        cnt = nn;
    }
    mean[i] = (float)mu;
    rstd[i] = (float)(1.0 / sqrt(m2 / cnt + 1e-5));
}

template <class A>
__device__ __forceinline__ void norm_act_fwd(const A* x, int n, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, A* y) {
    long total = (long)n * V * C;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        int c = (int)(i % C);
        int bc = (int)(i / ((long)V * C)) * C + c;
        float s = gamma[c] * rstd[bc];
        st(y + i, leaky(s * (ld(x + i) - mean[bc]) + beta[c]));
    }
}

// part[((b * nchunks + k) * C + c) * 2] = (sum dz, sum dz*xhat) over chunk k of sample b.
template <class A>
__device__ __forceinline__ void norm_bwd_partial(const A* dy, const A* x, long V, int C, long chunk, const float* mean, const float* rstd, const float* gamma, const float* beta, float* part) {
    __shared__ float s1[NORM_THREADS], s2[NORM_THREADS];
    int b = blockIdx.y, k = blockIdx.x, nchunks = gridDim.x;
    int lanes = channel_lanes(C), rl = blockDim.x / lanes;
    int cl = threadIdx.x % lanes, rlane = threadIdx.x / lanes;
    long r0 = k * chunk, r1 = min(V, r0 + chunk);
    for (int c0 = 0; c0 < C; c0 += lanes) {
        int c = c0 + cl;
        float a = 0.f, d = 0.f;
        if (rlane < rl && c < C) {
            int bc = b * C + c;
            float mu = mean[bc], rs = rstd[bc], g = gamma[c], be = beta[c];
            for (long r = r0 + rlane; r < r1; r += rl) {
                long i = ((long)b * V + r) * C + c;
                float xh = (ld(x + i) - mu) * rs, g_ = ld(dy + i);
                float dz = g * xh + be > 0.f ? g_ : g_ * SEGK_LEAKY;
                a += dz;
                d += dz * xh;
            }
        }
        s1[threadIdx.x] = a; s2[threadIdx.x] = d;
        __syncthreads();
        if (rlane == 0 && c < C) {
            for (int j = 1; j < rl; j++) {
                a += s1[j * lanes + cl];
                d += s2[j * lanes + cl];
            }
            float* p = part + (((long)b * nchunks + k) * C + c) * 2;
            p[0] = a; p[1] = d;
        }
        __syncthreads();
    }
}

// One thread per channel: sums per (sample, channel) into `sums` and dgamma/dbeta.
extern "C" __global__ void segk_norm_bwd_finalize_f32(const float* part, int n, int nchunks, int C, float* sums, float* dgamma, float* dbeta) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double tg = 0.0, tb = 0.0;
    for (int b = 0; b < n; b++) {
        double a = 0.0, d = 0.0;
        for (int k = 0; k < nchunks; k++) {
            const float* p = part + (((long)b * nchunks + k) * C + c) * 2;
            a += p[0];
            d += p[1];
        }
        sums[(b * C + c) * 2] = (float)a;
        sums[(b * C + c) * 2 + 1] = (float)d;
        tb += a;
        tg += d;
    }
    dgamma[c] = (float)tg;
    dbeta[c] = (float)tb;
}

// dx = gamma*rstd * (dz - mean(dz) - xhat * mean(dz*xhat)); dx may alias dy.
template <class A>
__device__ __forceinline__ void norm_bwd_apply(const A* dy, const A* x, int n, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, const float* sums, A* dx) {
    long total = (long)n * V * C;
    float inv_v = 1.f / (float)V;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        int c = (int)(i % C);
        int bc = (int)(i / ((long)V * C)) * C + c;
        float xh = (ld(x + i) - mean[bc]) * rstd[bc];
        float g = ld(dy + i);
        float dz = gamma[c] * xh + beta[c] > 0.f ? g : g * SEGK_LEAKY;
        st(dx + i, gamma[c] * rstd[bc] * (dz - sums[bc * 2] * inv_v - xh * sums[bc * 2 + 1] * inv_v));
    }
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_partial_f32(const float* x, long V, int C, long chunk, float* part) { norm_partial(x, V, C, chunk, part); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_partial_bf16(const bf16* x, long V, int C, long chunk, float* part) { norm_partial(x, V, C, chunk, part); }
extern "C" __global__ void segk_norm_act_fwd_f32(const float* x, int n, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, float* y) { norm_act_fwd(x, n, V, C, mean, rstd, gamma, beta, y); }
extern "C" __global__ void segk_norm_act_fwd_bf16(const bf16* x, int n, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, bf16* y) { norm_act_fwd(x, n, V, C, mean, rstd, gamma, beta, y); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_bwd_partial_f32(const float* dy, const float* x, long V, int C, long chunk, const float* mean, const float* rstd, const float* gamma, const float* beta, float* part) { norm_bwd_partial(dy, x, V, C, chunk, mean, rstd, gamma, beta, part); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_bwd_partial_bf16(const bf16* dy, const bf16* x, long V, int C, long chunk, const float* mean, const float* rstd, const float* gamma, const float* beta, float* part) { norm_bwd_partial(dy, x, V, C, chunk, mean, rstd, gamma, beta, part); }
extern "C" __global__ void segk_norm_bwd_apply_f32(const float* dy, const float* x, int n, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, const float* sums, float* dx) { norm_bwd_apply(dy, x, n, V, C, mean, rstd, gamma, beta, sums, dx); }
extern "C" __global__ void segk_norm_bwd_apply_bf16(const bf16* dy, const bf16* x, int n, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, const float* sums, bf16* dx) { norm_bwd_apply(dy, x, n, V, C, mean, rstd, gamma, beta, sums, dx); }
