// Softmax + soft Dice + cross-entropy. Pass 1: per-block partial sums per class of
// intersection, prediction and ground truth, plus CE and the largest label seen; the host
// merges them (f64), computes each Dice term, and uploads (dc, 1/denominator) per
// (group, class). Pass 2: the gradient over the logits, in place.
#include "common.cuh"

#define LOSS_THREADS 256

// Up to this many classes, each thread keeps its sums in registers and the block merges them
// once per warp; above it, every voxel adds into shared memory (atomics, slower).
#define LOSS_REG_C 8

// part[block] = [inter C | pred C | gt C | ce | max label], block = (chunk, sample).
template <class A>
__device__ __forceinline__ void loss_partial(const A* z, const uint8_t* lab, long V, int C, long chunk, float* part) {
    SEGK_DYNAMIC_SHARED(float, acc);  // 3*C + 2
    int b = blockIdx.y, k = blockIdx.x, lane = threadIdx.x & 31;
    for (int i = threadIdx.x; i < 3 * C + 2; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
    long r0 = k * chunk, r1 = min(V, r0 + chunk);
    float ce = 0.f;
    int maxlab = 0;
    const bool regs = C <= LOSS_REG_C;
    float pi[LOSS_REG_C], pp[LOSS_REG_C], pg[LOSS_REG_C];
#pragma unroll
    for (int c = 0; c < LOSS_REG_C; c++) pi[c] = pp[c] = pg[c] = 0.f;
    for (long r = r0 + threadIdx.x; r < r1; r += blockDim.x) {
        long row = (long)b * V + r;
        const A* zr = z + row * C;
        int y = lab[row];
        maxlab = max(maxlab, y);
        float mx = ld(zr);
        for (int c = 1; c < C; c++) mx = fmaxf(mx, ld(zr + c));
        float s = 0.f;
        for (int c = 0; c < C; c++) s += __expf(ld(zr + c) - mx);
        float inv = 1.f / s;
        int yc = y < C ? y : 0;
        ce += mx + __logf(s) - ld(zr + yc);
        if (regs) {
#pragma unroll
            for (int c = 0; c < LOSS_REG_C; c++) {
                if (c < C) {
                    float p = __expf(ld(zr + c) - mx) * inv;
                    pp[c] += p;
                    pi[c] += c == yc ? p : 0.f;
                    pg[c] += c == yc ? 1.f : 0.f;
                }
            }
        } else {
            for (int c = 0; c < C; c++) atomicAdd(&acc[C + c], __expf(ld(zr + c) - mx) * inv);
            atomicAdd(&acc[yc], __expf(ld(zr + yc) - mx) * inv);
            atomicAdd(&acc[2 * C + yc], 1.f);
        }
    }
    if (regs) {
        // Every lane reaches this point (the voxel loop has ended for all), so the full-warp
        // sums are safe; lane 0 adds the warp's share.
#pragma unroll
        for (int c = 0; c < LOSS_REG_C; c++) {
            if (c < C) {
                float si = warp_sum(pi[c]), sp = warp_sum(pp[c]), sg = warp_sum(pg[c]);
                if (lane == 0) {
                    atomicAdd(&acc[c], si);
                    atomicAdd(&acc[C + c], sp);
                    atomicAdd(&acc[2 * C + c], sg);
                }
            }
        }
    }
    ce = warp_sum(ce);
    if (lane == 0) atomicAdd(&acc[3 * C], ce);
    atomicMax(reinterpret_cast<int*>(&acc[3 * C + 1]), maxlab);
    __syncthreads();
    float* p = part + ((long)b * gridDim.x + k) * (3 * C + 2);
    for (int i = threadIdx.x; i < 3 * C + 1; i += blockDim.x) p[i] = acc[i];
    if (threadIdx.x == 0) p[3 * C + 1] = (float)(*reinterpret_cast<int*>(&acc[3 * C + 1]));
}

// z <- weight * dL/dz; coef[(group * C + c) * 2] = (dc, 1/denominator), group = sample
// when per_sample else 0.
template <class A>
__device__ __forceinline__ void loss_grad(A* z, const uint8_t* lab, int n, long V, int C, const float* coef, int per_sample, float terms, float total_vox, float weight) {
    long rows = (long)n * V;
    for (long row = blockIdx.x * (long)blockDim.x + threadIdx.x; row < rows; row += (long)gridDim.x * blockDim.x) {
        A* zr = z + row * C;
        int y = lab[row];
        const float* cf = coef + (per_sample ? (row / V) * C * 2 : 0);
        float mx = ld(zr);
        for (int c = 1; c < C; c++) mx = fmaxf(mx, ld(zr + c));
        float s = 0.f;
        for (int c = 0; c < C; c++) s += __expf(ld(zr + c) - mx);
        float inv = 1.f / s;
        // g_c = dDice/dp_c = -(2 y_c - dc_c) / (denom_c * terms), g_0 = 0
        float pg = 0.f;
        for (int c = 1; c < C; c++) {
            float p = __expf(ld(zr + c) - mx) * inv;
            float g = -((c == y ? 2.f : 0.f) - cf[c * 2]) * cf[c * 2 + 1] / terms;
            pg += p * g;
        }
        for (int c = 0; c < C; c++) {
            float p = __expf(ld(zr + c) - mx) * inv;
            float g = c == 0 ? 0.f : -((c == y ? 2.f : 0.f) - cf[c * 2]) * cf[c * 2 + 1] / terms;
            float dce = (p - (c == y ? 1.f : 0.f)) / total_vox;
            st(zr + c, weight * (dce + p * (g - pg)));
        }
    }
}

extern "C" __global__ void __launch_bounds__(LOSS_THREADS) segk_loss_partial_f32(const float* z, const uint8_t* lab, long V, int C, long chunk, float* part) { loss_partial(z, lab, V, C, chunk, part); }
extern "C" __global__ void __launch_bounds__(LOSS_THREADS) segk_loss_partial_bf16(const bf16* z, const uint8_t* lab, long V, int C, long chunk, float* part) { loss_partial(z, lab, V, C, chunk, part); }
extern "C" __global__ void segk_loss_grad_f32(float* z, const uint8_t* lab, int n, long V, int C, const float* coef, int per_sample, float terms, float total_vox, float weight) { loss_grad(z, lab, n, V, C, coef, per_sample, terms, total_vox, weight); }
extern "C" __global__ void segk_loss_grad_bf16(bf16* z, const uint8_t* lab, int n, long V, int C, const float* coef, int per_sample, float terms, float total_vox, float weight) { loss_grad(z, lab, n, V, C, coef, per_sample, terms, total_vox, weight); }
