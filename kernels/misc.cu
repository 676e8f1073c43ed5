// Tensor plumbing: channel concat for skips and its backward, nearest-exact label
// downsampling for deep supervision, argmax over classes.
#include "common.cuh"

template <class A>
__device__ __forceinline__ void concat(const A* a, int ca, const A* b, int cb, long rows, A* out) {
    long c = ca + cb, n = rows * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / c;
        int k = (int)(i - r * c);
        out[i] = k < ca ? a[r * ca + k] : b[r * cb + (k - ca)];
    }
}

// da = dout[:, :ca]; db = beta*db + dout[:, ca:] (beta 0 never reads db).
template <class A>
__device__ __forceinline__ void concat_bwd(const A* d, int ca, int cb, long rows, A* da, A* db, float beta) {
    long c = ca + cb, n = rows * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / c;
        int k = (int)(i - r * c);
        if (k < ca) {
            da[r * ca + k] = d[i];
        } else {
            long j = r * cb + (k - ca);
            st(db + j, beta == 0.f ? ld(d + i) : beta * ld(db + j) + ld(d + i));
        }
    }
}

// The same with 16-byte groups of 8 channels (ca and cb multiples of 8, 16-byte aligned, the
// output's group count within 32 bits): one 32-bit division per 16 bytes instead of a 64-bit
// one per element, which at HBM speed is what the SMs would otherwise spend their issue on.
template <class A>
__device__ __forceinline__ void concat8(const A* a, int ca, const A* b, int cb, unsigned groups, A* out) {
    const unsigned ga = ca / 8, g = ga + cb / 8;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < groups; i += gridDim.x * blockDim.x) {
        const unsigned r = i / g, k = i - r * g;
        const A* src = k < ga ? a + ((long)r * ca + k * 8) : b + ((long)r * cb + (k - ga) * 8);
        *reinterpret_cast<uint4*>(out + (long)i * 8) = *reinterpret_cast<const uint4*>(src);
        if (sizeof(A) == 4) reinterpret_cast<uint4*>(out + (long)i * 8)[1] = reinterpret_cast<const uint4*>(src)[1];
    }
}

template <class A>
__device__ __forceinline__ void concat_bwd8(const A* d, int ca, int cb, unsigned groups, A* da, A* db, float beta) {
    const unsigned ga = ca / 8, g = ga + cb / 8;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < groups; i += gridDim.x * blockDim.x) {
        const unsigned r = i / g, k = i - r * g;
        float v[8];
        load8(d + (long)i * 8, v);
        if (k < ga) {
            store8(da + ((long)r * ca + k * 8), v);
        } else {
            A* dst = db + ((long)r * cb + (k - ga) * 8);
            if (beta != 0.f) {
                float o[8];
                load8(dst, o);
#pragma unroll
                for (int j = 0; j < 8; j++) v[j] += beta * o[j];
            }
            store8(dst, v);
        }
    }
}

__device__ __forceinline__ int nearest_src(int i, int n_in, int n_out) {
    int s = (int)(((2L * i + 1) * n_in) / (2L * n_out));
    return s < n_in - 1 ? s : n_in - 1;
}

extern "C" __global__ void segk_downsample_labels(const uint8_t* src, int n, int sd, int sh, int sw, uint8_t* dst, int dd, int dh, int dw) {
    long total = (long)n * dd * dh * dw;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        int x = (int)(i % dw);
        long t = i / dw;
        int y = (int)(t % dh);
        t /= dh;
        int z = (int)(t % dd);
        int b = (int)(t / dd);
        long s = (((long)b * sd + nearest_src(z, sd, dd)) * sh + nearest_src(y, sh, dh)) * sw + nearest_src(x, sw, dw);
        dst[i] = src[s];
    }
}

template <class A>
__device__ __forceinline__ void argmax(const A* logits, long rows, int c, uint8_t* out) {
    for (long r = blockIdx.x * (long)blockDim.x + threadIdx.x; r < rows; r += (long)gridDim.x * blockDim.x) {
        const A* z = logits + r * c;
        int best = 0;
        float top = ld(z);
        for (int k = 1; k < c; k++) {
            float v = ld(z + k);
            if (v > top) best = k, top = v;
        }
        out[r] = (uint8_t)best;
    }
}

// Region nets: out[r] = bit k set where region k's logit is above 0 (sigmoid above 0.5),
// c <= 8 regions.
template <class A>
__device__ __forceinline__ void region_bits(const A* logits, long rows, int c, uint8_t* out) {
    for (long r = blockIdx.x * (long)blockDim.x + threadIdx.x; r < rows; r += (long)gridDim.x * blockDim.x) {
        const A* z = logits + r * c;
        unsigned bits = 0;
        for (int k = 0; k < c; k++) bits |= (ld(z + k) > 0.f ? 1u : 0u) << k;
        out[r] = (uint8_t)bits;
    }
}

// Host f32 data into bf16 activations and back (uploads, downloads, the staged batch).
extern "C" __global__ void segk_cast_f32_bf16(const float* src, long n, bf16* dst) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) st(dst + i, src[i]);
}
extern "C" __global__ void segk_cast_bf16_f32(const bf16* src, long n, float* dst) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) dst[i] = ld(src + i);
}

extern "C" __global__ void segk_concat_f32(const float* a, int ca, const float* b, int cb, long rows, float* out) { concat(a, ca, b, cb, rows, out); }
extern "C" __global__ void segk_concat_bf16(const bf16* a, int ca, const bf16* b, int cb, long rows, bf16* out) { concat(a, ca, b, cb, rows, out); }
extern "C" __global__ void segk_concat_bwd_f32(const float* d, int ca, int cb, long rows, float* da, float* db, float beta) { concat_bwd(d, ca, cb, rows, da, db, beta); }
extern "C" __global__ void segk_concat_bwd_bf16(const bf16* d, int ca, int cb, long rows, bf16* da, bf16* db, float beta) { concat_bwd(d, ca, cb, rows, da, db, beta); }
extern "C" __global__ void segk_argmax_f32(const float* logits, long rows, int c, uint8_t* out) { argmax(logits, rows, c, out); }
extern "C" __global__ void segk_argmax_bf16(const bf16* logits, long rows, int c, uint8_t* out) { argmax(logits, rows, c, out); }
extern "C" __global__ void segk_region_bits_f32(const float* logits, long rows, int c, uint8_t* out) { region_bits(logits, rows, c, out); }
extern "C" __global__ void segk_region_bits_bf16(const bf16* logits, long rows, int c, uint8_t* out) { region_bits(logits, rows, c, out); }
extern "C" __global__ void segk_concat8_f32(const float* a, int ca, const float* b, int cb, unsigned groups, float* out) { concat8(a, ca, b, cb, groups, out); }
extern "C" __global__ void segk_concat8_bf16(const bf16* a, int ca, const bf16* b, int cb, unsigned groups, bf16* out) { concat8(a, ca, b, cb, groups, out); }
extern "C" __global__ void segk_concat_bwd8_f32(const float* d, int ca, int cb, unsigned groups, float* da, float* db, float beta) { concat_bwd8(d, ca, cb, groups, da, db, beta); }
extern "C" __global__ void segk_concat_bwd8_bf16(const bf16* d, int ca, int cb, unsigned groups, bf16* da, bf16* db, float beta) { concat_bwd8(d, ca, cb, groups, da, db, beta); }
