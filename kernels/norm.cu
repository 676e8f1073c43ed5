// Instance norm (affine, eps 1e-5, biased variance) fused with LeakyReLU(0.01), NDHWC; or
// with no activation (`slope` 1), and optionally a residual added before it (a ResNet block's
// end: y = leaky(norm(x) + r)). And the LeakyReLU's gradient from its output (leaky_bwd).
// Statistics: Welford per thread over a chunk of voxels, Chan merges across threads and
// chunks (fp32 per thread, f64 for the final merge). Never E[x^2] - E[x]^2. Two paths: one
// channel per thread for any channel count, and eight per thread with 16-byte accesses where
// the channel count is a multiple of 8 (every norm of a U-Net); the partials they leave are
// laid out alike, so one pair of finalize kernels serves both.
#include "common.cuh"

#define NORM_THREADS COL_THREADS

// Thread layout for C channels: `lanes` channel lanes, blockDim / lanes row lanes.
__device__ __forceinline__ int channel_lanes(int C) { return C < NORM_THREADS ? C : NORM_THREADS; }

// Chan's merge of the statistics (mean, M2, count) of two disjoint sets into the first.
template <class F>
__device__ __forceinline__ void chan_merge(F& mean, F& m2, F& cnt, F mb, F m2b, F nb) {
    if (nb == F(0)) return;
    const F n = cnt + nb, delta = mb - mean, f = nb / n;
    mean += delta * f;
    m2 += m2b + delta * delta * cnt * f;
    cnt = n;
}

// --- any channel count: one channel per thread, one element per access ----------------------

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
                chan_merge(mean, m2, cnt, sm[o], sm2[o], sc[o]);
            }
            float* p = part + (((long)b * nchunks + k) * C + c) * 3;
            p[0] = mean; p[1] = m2; p[2] = cnt;
        }
        __syncthreads();
    }
}

// LeakyReLU with slope `slope` below zero (1: none).
__device__ __forceinline__ float act(float z, float slope) { return z > 0.f ? z : z * slope; }

// y = act(norm(x) [+ res]); res null for none.
template <class A>
__device__ __forceinline__ void norm_act_fwd(const A* x, int n, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, const A* res, float slope, A* y) {
    long total = (long)n * V * C;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        int c = (int)(i % C);
        int bc = (int)(i / ((long)V * C)) * C + c;
        float s = gamma[c] * rstd[bc];
        st(y + i, act(s * (ld(x + i) - mean[bc]) + beta[c] + (res ? ld(res + i) : 0.f), slope));
    }
}

// dx = dy * leaky'(y), from the activation's output y; dx may alias dy.
template <class A>
__device__ __forceinline__ void leaky_bwd(const A* dy, const A* y, long total, A* dx) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) st(dx + i, leaky_grad(ld(y + i), ld(dy + i)));
}

// part[((b * nchunks + k) * C + c) * 2] = (sum dz, sum dz*xhat) over chunk k of sample b.
template <class A>
__device__ __forceinline__ void norm_bwd_partial(const A* dy, const A* x, long V, int C, long chunk, const float* mean, const float* rstd, const float* gamma, const float* beta, float slope, float* part) {
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
                float dz = g * xh + be > 0.f ? g_ : g_ * slope;
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

// dx = gamma*rstd * (dz - mean(dz) - xhat * mean(dz*xhat)); dx may alias dy.
template <class A>
__device__ __forceinline__ void norm_bwd_apply(const A* dy, const A* x, int n, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, float slope, const float* sums, A* dx) {
    long total = (long)n * V * C;
    float inv_v = 1.f / (float)V;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        int c = (int)(i % C);
        int bc = (int)(i / ((long)V * C)) * C + c;
        float xh = (ld(x + i) - mean[bc]) * rstd[bc];
        float g = ld(dy + i);
        float dz = gamma[c] * xh + beta[c] > 0.f ? g : g * slope;
        st(dx + i, gamma[c] * rstd[bc] * (dz - sums[bc * 2] * inv_v - xh * sums[bc * 2 + 1] * inv_v));
    }
}

// --- channel counts that are multiples of 8: eight channels per thread, 16-byte accesses -----
// The scalar kernels above divide a 64-bit index twice per element and move 2 or 4 bytes per
// access: at H100 bandwidth that is more instructions than the SMs issue. Here a thread keeps a
// group of 8 channels: the statistics kernels fix it per thread (so their per-channel
// parameters sit in registers), the elementwise ones find it with one 32-bit remainder per 16
// bytes and read per-sample tables from shared memory. The host sends these kernels only
// 16-byte aligned tensors whose V * C / 8 is below 2^31.

// Welford step for 8 channels of one voxel: one reciprocal serves the eight.
__device__ __forceinline__ void welford8(float* s, const float* v) {  // s: mean[8], m2[8], count
    s[16] += 1.f;
    const float inv = 1.f / s[16];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const float d = v[i] - s[i];
        s[i] += d * inv;
        s[8 + i] += d * (v[i] - s[i]);
    }
}

template <class A>
__device__ __forceinline__ void norm_partial8(const A* x, long V, int C, long chunk, float* part) {
    __shared__ float sh[NORM_THREADS * 17];
    const ColBlock<8> L(V, C, chunk);
    for (int g0 = 0; g0 < L.G; g0 += L.lanes) {  // every thread runs every pass (barriers)
        const int g = g0 + L.cl;
        const bool live = L.live(g);
        float acc[17] = {};
        if (live) {
            const A* p = x + (long)L.b * V * C + g * 8;
            long r = L.r0 + L.rlane;
            for (; r + L.rl < L.r1; r += 2 * L.rl) {  // two loads in flight
                float v[8], w[8];
                load8(p + r * C, v);
                load8(p + (r + L.rl) * C, w);
                welford8(acc, v);
                welford8(acc, w);
            }
            if (r < L.r1) {
                float v[8];
                load8(p + r * C, v);
                welford8(acc, v);
            }
        }
        tree_merge<17>(acc, sh, L, live, [](float* a, const float* o) {
#pragma unroll
            for (int i = 0; i < 8; i++) {
                float n = a[16];
                chan_merge(a[i], a[8 + i], n, o[i], o[8 + i], o[16]);
            }
            a[16] += o[16];
        });
        if (live && L.rlane == 0)
#pragma unroll
            for (int i = 0; i < 8; i++) {
                float* q = L.part_at(part, C, g * 8 + i, 3);
                q[0] = acc[i], q[1] = acc[8 + i], q[2] = acc[16];
            }
    }
}

// Per-sample table of `rows` x C floats in shared memory, row j filled with f(j, c); read 8
// channels at a time with load8 (16-byte aligned: C and the channel are multiples of 8).
template <class F>
__device__ __forceinline__ float* sample_table(int rows, int C, F f) {
    SEGK_DYNAMIC_SHARED(float, t);
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        for (int j = 0; j < rows; j++) t[j * C + c] = f(j, c);
    __syncthreads();
    return t;
}

// grid (blocks, samples); shared: mean, gamma * rstd, beta of sample blockIdx.y.
template <class A>
__device__ __forceinline__ void norm_act_fwd8(const A* x, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, const A* res, float slope, A* y) {
    const int b = blockIdx.y;
    const float* t = sample_table(3, C, [&](int j, int c) { return j == 0 ? mean[b * C + c] : j == 1 ? gamma[c] * rstd[b * C + c] : beta[c]; });
    const unsigned G = C / 8, n = (unsigned)(V * G);
    const A* xs = x + (long)b * V * C;
    const A* rs = res ? res + (long)b * V * C : nullptr;
    A* ys = y + (long)b * V * C;
    for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x) {
        const unsigned c = (j % G) * 8;
        float v[8], mu[8], s[8], be[8], r[8] = {};
        load8(xs + (long)j * 8, v);
        if (rs) load8(rs + (long)j * 8, r);
        load8(t + c, mu), load8(t + C + c, s), load8(t + 2 * C + c, be);
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = act(s[i] * (v[i] - mu[i]) + be[i] + r[i], slope);
        store8(ys + (long)j * 8, v);
    }
}

template <class A>
__device__ __forceinline__ void norm_bwd_partial8(const A* dy, const A* x, long V, int C, long chunk, const float* mean, const float* rstd, const float* gamma, const float* beta, float slope, float* part) {
    __shared__ float sh[NORM_THREADS * 16];
    const ColBlock<8> L(V, C, chunk);
    for (int g0 = 0; g0 < L.G; g0 += L.lanes) {  // every thread runs every pass (barriers)
        const int g = g0 + L.cl;
        const bool live = L.live(g);
        float acc[16] = {};  // sum dz, then sum dz * xhat, per channel
        if (live) {
            float mu[8], rs[8], ga[8], be[8];
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const int c = g * 8 + i;
                mu[i] = mean[L.b * C + c], rs[i] = rstd[L.b * C + c], ga[i] = gamma[c], be[i] = beta[c];
            }
            const long base = (long)L.b * V * C + g * 8;
            for (long r = L.r0 + L.rlane; r < L.r1; r += L.rl) {
                float xv[8], gv[8];
                load8(x + base + r * C, xv);
                load8(dy + base + r * C, gv);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const float xh = (xv[i] - mu[i]) * rs[i];
                    const float dz = ga[i] * xh + be[i] > 0.f ? gv[i] : gv[i] * slope;
                    acc[i] += dz;
                    acc[8 + i] += dz * xh;
                }
            }
        }
        tree_merge<16>(acc, sh, L, live, [](float* a, const float* o) {
#pragma unroll
            for (int i = 0; i < 16; i++) a[i] += o[i];
        });
        if (live && L.rlane == 0)
#pragma unroll
            for (int i = 0; i < 8; i++) {
                float* q = L.part_at(part, C, g * 8 + i, 2);
                q[0] = acc[i], q[1] = acc[8 + i];
            }
    }
}

// dx = a * dz - a * mean(dz) - a * mean(dz * xhat) * xhat with a = gamma * rstd; grid
// (blocks, samples), the per-channel factors of sample blockIdx.y in shared memory. dx may
// alias dy (each thread reads its 16 bytes before it writes them).
template <class A>
__device__ __forceinline__ void norm_bwd_apply8(const A* dy, const A* x, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, float slope, const float* sums, A* dx) {
    const int b = blockIdx.y;
    const float inv_v = 1.f / (float)V;
    // rows: mean, rstd, gamma, beta, a, a * mean(dz), a * mean(dz * xhat)
    const float* t = sample_table(7, C, [&](int j, int c) {
        const int bc = b * C + c;
        const float a = gamma[c] * rstd[bc];
        switch (j) {
            case 0: return mean[bc];
            case 1: return rstd[bc];
            case 2: return gamma[c];
            case 3: return beta[c];
            case 4: return a;
            case 5: return a * sums[bc * 2] * inv_v;
            default: return a * sums[bc * 2 + 1] * inv_v;
        }
    });
    const unsigned G = C / 8, n = (unsigned)(V * G);
    const long base = (long)b * V * C;
    for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x) {
        const unsigned c = (j % G) * 8;
        float xv[8], gv[8], mu[8], rs[8], ga[8], be[8], a[8], m1[8], m2[8];
        load8(x + base + (long)j * 8, xv);
        load8(dy + base + (long)j * 8, gv);
        load8(t + c, mu), load8(t + C + c, rs), load8(t + 2 * C + c, ga), load8(t + 3 * C + c, be);
        load8(t + 4 * C + c, a), load8(t + 5 * C + c, m1), load8(t + 6 * C + c, m2);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const float xh = (xv[i] - mu[i]) * rs[i];
            const float dz = ga[i] * xh + be[i] > 0.f ? gv[i] : gv[i] * slope;
            xv[i] = a[i] * dz - m1[i] - m2[i] * xh;
        }
        store8(dx + base + (long)j * 8, xv);
    }
}

// --- both paths ---------------------------------------------------------------------------

// One warp per (sample, channel): each lane Chan-merges every 32nd chunk in f64, then the
// lanes merge pairwise. Writes mean and rstd.
extern "C" __global__ void segk_norm_finalize_f32(const float* part, int n, int nchunks, int C, float* mean, float* rstd) {
    const int lane = threadIdx.x & 31, i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (i >= n * C) return;  // whole warps: i is the same across a warp
    const int b = i / C, c = i % C;
    double mu = 0.0, m2 = 0.0, cnt = 0.0;
    for (int k = lane; k < nchunks; k += 32) {
        const float* p = part + (((long)b * nchunks + k) * C + c) * 3;
        chan_merge<double>(mu, m2, cnt, p[0], p[1], p[2]);
    }
    for (int o = 16; o > 0; o >>= 1) {
        const double mb = __shfl_xor_sync(0xffffffffu, mu, o), m2b = __shfl_xor_sync(0xffffffffu, m2, o), nb = __shfl_xor_sync(0xffffffffu, cnt, o);
        chan_merge<double>(mu, m2, cnt, mb, m2b, nb);
    }
    if (lane == 0) {
        mean[i] = (float)mu;
        rstd[i] = (float)(1.0 / sqrt(m2 / cnt + 1e-5));
    }
}

// One warp per channel: sums per (sample, channel) into `sums` (lanes over the chunks, f64),
// and dgamma/dbeta over the samples.
extern "C" __global__ void segk_norm_bwd_finalize_f32(const float* part, int n, int nchunks, int C, float* sums, float* dgamma, float* dbeta) {
    const int lane = threadIdx.x & 31, c = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (c >= C) return;  // whole warps
    double tg = 0.0, tb = 0.0;
    for (int b = 0; b < n; b++) {
        double a = 0.0, d = 0.0;
        for (int k = lane; k < nchunks; k += 32) {
            const float* p = part + (((long)b * nchunks + k) * C + c) * 2;
            a += p[0];
            d += p[1];
        }
        a = warp_sum_d(a);
        d = warp_sum_d(d);
        if (lane == 0) sums[(b * C + c) * 2] = (float)a, sums[(b * C + c) * 2 + 1] = (float)d;
        tb += a;
        tg += d;
    }
    if (lane == 0) dgamma[c] = (float)tg, dbeta[c] = (float)tb;
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_partial_f32(const float* x, long V, int C, long chunk, float* part) { norm_partial(x, V, C, chunk, part); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_partial_bf16(const bf16* x, long V, int C, long chunk, float* part) { norm_partial(x, V, C, chunk, part); }
extern "C" __global__ void segk_norm_act_fwd_f32(const float* x, int n, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, const float* res, float slope, float* y) { norm_act_fwd(x, n, V, C, mean, rstd, gamma, beta, res, slope, y); }
extern "C" __global__ void segk_norm_act_fwd_bf16(const bf16* x, int n, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, const bf16* res, float slope, bf16* y) { norm_act_fwd(x, n, V, C, mean, rstd, gamma, beta, res, slope, y); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_bwd_partial_f32(const float* dy, const float* x, long V, int C, long chunk, const float* mean, const float* rstd, const float* gamma, const float* beta, float slope, float* part) { norm_bwd_partial(dy, x, V, C, chunk, mean, rstd, gamma, beta, slope, part); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_bwd_partial_bf16(const bf16* dy, const bf16* x, long V, int C, long chunk, const float* mean, const float* rstd, const float* gamma, const float* beta, float slope, float* part) { norm_bwd_partial(dy, x, V, C, chunk, mean, rstd, gamma, beta, slope, part); }
extern "C" __global__ void segk_norm_bwd_apply_f32(const float* dy, const float* x, int n, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, float slope, const float* sums, float* dx) { norm_bwd_apply(dy, x, n, V, C, mean, rstd, gamma, beta, slope, sums, dx); }
extern "C" __global__ void segk_norm_bwd_apply_bf16(const bf16* dy, const bf16* x, int n, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, float slope, const float* sums, bf16* dx) { norm_bwd_apply(dy, x, n, V, C, mean, rstd, gamma, beta, slope, sums, dx); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_partial8_f32(const float* x, long V, int C, long chunk, float* part) { norm_partial8(x, V, C, chunk, part); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_partial8_bf16(const bf16* x, long V, int C, long chunk, float* part) { norm_partial8(x, V, C, chunk, part); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_act_fwd8_f32(const float* x, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, const float* res, float slope, float* y) { norm_act_fwd8(x, V, C, mean, rstd, gamma, beta, res, slope, y); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_act_fwd8_bf16(const bf16* x, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, const bf16* res, float slope, bf16* y) { norm_act_fwd8(x, V, C, mean, rstd, gamma, beta, res, slope, y); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_bwd_partial8_f32(const float* dy, const float* x, long V, int C, long chunk, const float* mean, const float* rstd, const float* gamma, const float* beta, float slope, float* part) { norm_bwd_partial8(dy, x, V, C, chunk, mean, rstd, gamma, beta, slope, part); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_bwd_partial8_bf16(const bf16* dy, const bf16* x, long V, int C, long chunk, const float* mean, const float* rstd, const float* gamma, const float* beta, float slope, float* part) { norm_bwd_partial8(dy, x, V, C, chunk, mean, rstd, gamma, beta, slope, part); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_bwd_apply8_f32(const float* dy, const float* x, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, float slope, const float* sums, float* dx) { norm_bwd_apply8(dy, x, V, C, mean, rstd, gamma, beta, slope, sums, dx); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) segk_norm_bwd_apply8_bf16(const bf16* dy, const bf16* x, long V, int C, const float* mean, const float* rstd, const float* gamma, const float* beta, float slope, const float* sums, bf16* dx) { norm_bwd_apply8(dy, x, V, C, mean, rstd, gamma, beta, slope, sums, dx); }
extern "C" __global__ void segk_leaky_bwd_f32(const float* dy, const float* y, long total, float* dx) { leaky_bwd(dy, y, total, dx); }
extern "C" __global__ void segk_leaky_bwd_bf16(const bf16* dy, const bf16* y, long total, bf16* dx) { leaky_bwd(dy, y, total, dx); }
