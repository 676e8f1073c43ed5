// Softmax + soft Dice + cross-entropy, with every sum in a fixed order (the same bits on every
// run). Pass 1: per-block partial sums per class of intersection, prediction and ground truth,
// plus CE and the largest label seen. Dice: one block merges the partials in index order, writes
// (dc, 1/denominator) per (group, class) for pass 2 and the loss parts into the step's record on
// the device (nothing goes back to the host). Pass 2: the gradient over the logits, in place.
// With `ignore`, voxels labelled C (the ignore label) take no part: not in any sum, CE averaged
// over the labelled voxels (counted in pass 1), gradient zero; as the CPU twin. Region nets
// likewise, their ignore label the value above the regions' highest.
#include "common.cuh"

#define LOSS_THREADS 256
#define LOSS_WARPS (LOSS_THREADS / 32)

// Classes summed per pass over a block's voxels: each thread keeps this many sums of each kind
// in registers; more classes take more passes (the logits are re-read, no atomics).
#define LOSS_REG_C 8

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Lane 0 of each warp lands the warp's sums of classes c0.. (this pass's) in its shared row;
// every lane must call it (full-warp shuffles).
__device__ __forceinline__ void warp_class_sums(float* row_sums, int C, int c0, const float* pi, const float* pp, const float* pg) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int c = 0; c < LOSS_REG_C; c++) {
        if (c0 + c < C) {
            const float si = warp_sum(pi[c]), sp = warp_sum(pp[c]), sg = warp_sum(pg[c]);
            if (lane == 0) {
                row_sums[c0 + c] = si;
                row_sums[C + c0 + c] = sp;
                row_sums[2 * C + c0 + c] = sg;
            }
        }
    }
}

// Lane 0 of each warp lands the warp's summed (B)CE, largest label and labelled-voxel count
// after the class sums.
__device__ __forceinline__ void warp_ce_and_label(float* row_sums, int C, float ce, float maxlab, float labelled) {
    ce = warp_sum(ce);
    maxlab = warp_max(maxlab);
    labelled = warp_sum(labelled);
    if ((threadIdx.x & 31) == 0) {
        row_sums[3 * C] = ce;
        row_sums[3 * C + 1] = maxlab;
        row_sums[3 * C + 2] = labelled;
    }
}

// The block's partials from the warps' rows: thread i adds column i over the warps in warp
// order (the largest label by max).
__device__ __forceinline__ void block_partials(const float* wacc, int C, float* part) {
    __syncthreads();
    const int W = 3 * C + 3;
    float* p = part + ((long)blockIdx.y * gridDim.x + blockIdx.x) * W;
    const int nw = (blockDim.x + 31) >> 5;
    for (int i = threadIdx.x; i < W; i += blockDim.x) {
        float v = wacc[i];
        for (int w = 1; w < nw; w++) v = i == 3 * C + 1 ? fmaxf(v, wacc[w * W + i]) : v + wacc[w * W + i];
        p[i] = v;
    }
}

// part[block] = [inter C | pred C | gt C | ce | max label | labelled voxels], block = (chunk,
// sample). Each warp
// reduces its lanes with shuffles, lands its sums in its own shared row, and thread i adds row
// i's column over the warps in warp order.
template <class A>
__device__ __forceinline__ void loss_partial(const A* z, const uint8_t* lab, long V, int C, int ignore, long chunk, float* part) {
    SEGK_DYNAMIC_SHARED(float, wacc);  // LOSS_WARPS rows of 3*C + 3
    const int W = 3 * C + 3, b = blockIdx.y, warp = threadIdx.x >> 5;
    float* row_sums = wacc + warp * W;
    const long r0 = blockIdx.x * chunk, r1 = min(V, r0 + chunk);
    for (int c0 = 0; c0 < C; c0 += LOSS_REG_C) {
        float pi[LOSS_REG_C], pp[LOSS_REG_C], pg[LOSS_REG_C], ce = 0.f, maxlab = 0.f, labelled = 0.f;
#pragma unroll
        for (int c = 0; c < LOSS_REG_C; c++) pi[c] = pp[c] = pg[c] = 0.f;
        for (long r = r0 + threadIdx.x; r < r1; r += blockDim.x) {
            const long row = (long)b * V + r;
            const A* zr = z + row * C;
            const int y = lab[row], yc = y < C ? y : 0;
            if (c0 == 0) maxlab = fmaxf(maxlab, (float)y);
            if (ignore && y == C) continue;
            labelled += 1.f;
            float mx = ld(zr);
            for (int c = 1; c < C; c++) mx = fmaxf(mx, ld(zr + c));
            float s = 0.f;
            for (int c = 0; c < C; c++) s += __expf(ld(zr + c) - mx);
            const float inv = 1.f / s;
            if (c0 == 0) ce += mx + __logf(s) - ld(zr + yc);
#pragma unroll
            for (int c = 0; c < LOSS_REG_C; c++) {
                if (c0 + c < C) {
                    const float p = __expf(ld(zr + c0 + c) - mx) * inv;
                    pp[c] += p;
                    pi[c] += c0 + c == yc ? p : 0.f;
                    pg[c] += c0 + c == yc ? 1.f : 0.f;
                }
            }
        }
        // Every lane reaches this point (the voxel loop has ended for all), so the full-warp
        // reductions are safe.
        warp_class_sums(row_sums, C, c0, pi, pp, pg);
        if (c0 == 0) warp_ce_and_label(row_sums, C, ce, maxlab, labelled);
    }
    block_partials(wacc, C, part);
}

// One block. sums[(b * C + c) * 3 + {0,1,2}] = per-sample (inter, pred, gt), f64, each summed
// over the chunks in order; then per group (the batch, or each sample) coef[(g * C + c) * 2] =
// (dc, 1/denominator) as the CPU twin's dice_terms, and after them the count the CE is averaged
// over: the labelled voxels, times C for a region net without an ignore label (`ce_per_output`,
// BCE's mean over every output); out = [ce, -mean dc over the classes from `first` on (1: a
// softmax's foreground; 0: every region), max label], the Dice term NaN when a label is not
// below `label_limit` (the step is then not applied, and the host names the label when it reads
// the record).
extern "C" __global__ void __launch_bounds__(LOSS_THREADS) segk_loss_dice(const float* part, int n, int nchunks, int C, int per_sample, int first, int ce_per_output, float label_limit, double* sums, float* coef, float* out) {
    const int W = 3 * C + 3;
    for (int t = threadIdx.x; t < n * C * 3; t += blockDim.x) {
        const int b = t / (3 * C), c = t % (3 * C);
        double s = 0.0;
        for (int k = 0; k < nchunks; k++) s += part[((long)b * nchunks + k) * W + c];
        sums[(b * C + c % C) * 3 + c / C] = s;
    }
    __syncthreads();
    const int groups = per_sample ? n : 1;
    for (int t = threadIdx.x; t < groups * C; t += blockDim.x) {
        const int g = t / C, c = t % C;
        double inter = 0.0, pred = 0.0, gt = 0.0;
        for (int b = per_sample ? g : 0; b < (per_sample ? g + 1 : n); b++) {
            const double* s = sums + (b * C + c) * 3;
            inter += s[0];
            pred += s[1];
            gt += s[2];
        }
        const double denom = fmax(gt + pred + 1e-5, 1e-8);
        const double dc = (2.0 * inter + 1e-5) / denom;
        coef[t * 2] = (float)dc;
        coef[t * 2 + 1] = (float)(1.0 / denom);
        sums[(long)n * C * 3 + t] = dc;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double ce = 0.0, dice = 0.0, labelled = 0.0;
        float maxlab = 0.f;
        for (long i = 0; i < (long)n * nchunks; i++) {
            ce += part[i * W + 3 * C];
            maxlab = fmaxf(maxlab, part[i * W + 3 * C + 1]);
            labelled += part[i * W + 3 * C + 2];
        }
        if (ce_per_output) labelled *= C;
        coef[groups * C * 2] = (float)labelled;
        for (int g = 0; g < groups; g++)
            for (int c = first; c < C; c++) dice += sums[(long)n * C * 3 + g * C + c];
        out[0] = labelled > 0.0 ? (float)(ce / labelled) : 0.f;
        out[1] = maxlab < label_limit ? (float)(-dice / (double)(groups * (C - first))) : __int_as_float(0x7fc00000);
        out[2] = maxlab;
    }
}

// z <- weight * dL/dz for this rank's n samples (global indices first.., of n_all over every
// rank); coef[(group * C + c) * 2] = (dc, 1/denominator), group = global sample when
// per_sample else 0, then the labelled-voxel count (groups = n_all when per_sample else 1).
template <class A>
__device__ __forceinline__ void loss_grad(A* z, const uint8_t* lab, int n, int first, int n_all, long V, int C, const float* coef, int per_sample, int ignore, float terms, float weight) {
    long rows = (long)n * V;
    const float total_vox = coef[(per_sample ? n_all : 1) * C * 2];
    for (long row = blockIdx.x * (long)blockDim.x + threadIdx.x; row < rows; row += (long)gridDim.x * blockDim.x) {
        A* zr = z + row * C;
        int y = lab[row];
        if (ignore && y == C) {
            for (int c = 0; c < C; c++) st(zr + c, 0.f);
            continue;
        }
        const float* cf = coef + (per_sample ? (first + row / V) * C * 2 : 0);
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

// Region nets: whether label y lies in region c (masks two to a word, as RegionMasks::words).
__device__ __forceinline__ float in_region(const unsigned long long* m, int c, int y) {
    return y < 32 && ((m[c >> 1] >> (32 * (c & 1) + y)) & 1ull) ? 1.f : 0.f;
}

// Region nets (C <= 8 regions, one pass): part[block] as loss_partial's, with sigmoid
// probabilities, the region masks as targets and the summed BCE in place of the CE; voxels
// labelled `ignore` (-1: none) left out.
template <class A>
__device__ __forceinline__ void region_partial(const A* z, const uint8_t* lab, long V, int C, unsigned long long m01, unsigned long long m23, unsigned long long m45, unsigned long long m67, int ignore, long chunk, float* part) {
    SEGK_DYNAMIC_SHARED(float, wacc);  // LOSS_WARPS rows of 3*C + 3
    const unsigned long long m[4] = {m01, m23, m45, m67};
    const int W = 3 * C + 3, b = blockIdx.y, warp = threadIdx.x >> 5;
    float* row_sums = wacc + warp * W;
    const long r0 = blockIdx.x * chunk, r1 = min(V, r0 + chunk);
    float pi[LOSS_REG_C], pp[LOSS_REG_C], pg[LOSS_REG_C], bce = 0.f, maxlab = 0.f, labelled = 0.f;
#pragma unroll
    for (int c = 0; c < LOSS_REG_C; c++) pi[c] = pp[c] = pg[c] = 0.f;
    for (long r = r0 + threadIdx.x; r < r1; r += blockDim.x) {
        const long row = (long)b * V + r;
        const int y = lab[row];
        maxlab = fmaxf(maxlab, (float)y);
        if (y == ignore) continue;
        labelled += 1.f;
#pragma unroll
        for (int c = 0; c < LOSS_REG_C; c++) {
            if (c < C) {
                const float x = ld(z + row * C + c), t = in_region(m, c, y), p = 1.f / (1.f + __expf(-x));
                bce += fmaxf(x, 0.f) - x * t + log1pf(__expf(-fabsf(x)));
                pp[c] += p;
                pi[c] += p * t;
                pg[c] += t;
            }
        }
    }
    warp_class_sums(row_sums, C, 0, pi, pp, pg);
    warp_ce_and_label(row_sums, C, bce, maxlab, labelled);
    block_partials(wacc, C, part);
}

// z <- weight * dL/dz for region nets: (p - t) / count + p (1 - p) g, g = dDice/dp as in
// loss_grad over every region; count (after the coefficients) as segk_loss_dice wrote it;
// zero at voxels labelled `ignore`.
template <class A>
__device__ __forceinline__ void region_grad(A* z, const uint8_t* lab, int n, int first, int n_all, long V, int C, unsigned long long m01, unsigned long long m23, unsigned long long m45, unsigned long long m67, int ignore, const float* coef, int per_sample, float terms, float weight) {
    const unsigned long long m[4] = {m01, m23, m45, m67};
    const long rows = (long)n * V;
    const float count = coef[(per_sample ? n_all : 1) * C * 2];
    for (long row = blockIdx.x * (long)blockDim.x + threadIdx.x; row < rows; row += (long)gridDim.x * blockDim.x) {
        const int y = lab[row];
        if (y == ignore) {
            for (int c = 0; c < C; c++) st(z + row * C + c, 0.f);
            continue;
        }
        const float* cf = coef + (per_sample ? (first + row / V) * C * 2 : 0);
        for (int c = 0; c < C; c++) {
            const float x = ld(z + row * C + c), t = in_region(m, c, y), p = 1.f / (1.f + __expf(-x));
            const float g = -(2.f * t - cf[c * 2]) * cf[c * 2 + 1] / terms;
            st(z + row * C + c, weight * ((p - t) / count + p * (1.f - p) * g));
        }
    }
}

#define REGION_MASKS unsigned long long m01, unsigned long long m23, unsigned long long m45, unsigned long long m67
extern "C" __global__ void __launch_bounds__(LOSS_THREADS) segk_region_partial_f32(const float* z, const uint8_t* lab, long V, int C, REGION_MASKS, int ignore, long chunk, float* part) { region_partial(z, lab, V, C, m01, m23, m45, m67, ignore, chunk, part); }
extern "C" __global__ void __launch_bounds__(LOSS_THREADS) segk_region_partial_bf16(const bf16* z, const uint8_t* lab, long V, int C, REGION_MASKS, int ignore, long chunk, float* part) { region_partial(z, lab, V, C, m01, m23, m45, m67, ignore, chunk, part); }
extern "C" __global__ void segk_region_grad_f32(float* z, const uint8_t* lab, int n, int first, int n_all, long V, int C, REGION_MASKS, int ignore, const float* coef, int per_sample, float terms, float weight) { region_grad(z, lab, n, first, n_all, V, C, m01, m23, m45, m67, ignore, coef, per_sample, terms, weight); }
extern "C" __global__ void segk_region_grad_bf16(bf16* z, const uint8_t* lab, int n, int first, int n_all, long V, int C, REGION_MASKS, int ignore, const float* coef, int per_sample, float terms, float weight) { region_grad(z, lab, n, first, n_all, V, C, m01, m23, m45, m67, ignore, coef, per_sample, terms, weight); }

extern "C" __global__ void __launch_bounds__(LOSS_THREADS) segk_loss_partial_f32(const float* z, const uint8_t* lab, long V, int C, int ignore, long chunk, float* part) { loss_partial(z, lab, V, C, ignore, chunk, part); }
extern "C" __global__ void __launch_bounds__(LOSS_THREADS) segk_loss_partial_bf16(const bf16* z, const uint8_t* lab, long V, int C, int ignore, long chunk, float* part) { loss_partial(z, lab, V, C, ignore, chunk, part); }
extern "C" __global__ void segk_loss_grad_f32(float* z, const uint8_t* lab, int n, int first, int n_all, long V, int C, const float* coef, int per_sample, int ignore, float terms, float weight) { loss_grad(z, lab, n, first, n_all, V, C, coef, per_sample, ignore, terms, weight); }
extern "C" __global__ void segk_loss_grad_bf16(bf16* z, const uint8_t* lab, int n, int first, int n_all, long V, int C, const float* coef, int per_sample, int ignore, float terms, float weight) { loss_grad(z, lab, n, first, n_all, V, C, coef, per_sample, ignore, terms, weight); }
