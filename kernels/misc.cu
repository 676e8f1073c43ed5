// Tensor plumbing: channel concat for skips and its backward, nearest-exact label
// downsampling for deep supervision, argmax over classes.
#include "common.cuh"

extern "C" __global__ void segk_concat_f32(const float* a, int ca, const float* b, int cb, long rows, float* out) {
    long c = ca + cb, n = rows * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / c;
        int k = (int)(i - r * c);
        out[i] = k < ca ? a[r * ca + k] : b[r * cb + (k - ca)];
    }
}

// da = dout[:, :ca]; db = beta*db + dout[:, ca:] (beta 0 never reads db).
extern "C" __global__ void segk_concat_bwd_f32(const float* d, int ca, int cb, long rows, float* da, float* db, float beta) {
    long c = ca + cb, n = rows * c;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / c;
        int k = (int)(i - r * c);
        if (k < ca) {
            da[r * ca + k] = d[i];
        } else {
            long j = r * cb + (k - ca);
            db[j] = beta == 0.f ? d[i] : beta * db[j] + d[i];
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

extern "C" __global__ void segk_argmax_f32(const float* logits, long rows, int c, uint8_t* out) {
    for (long r = blockIdx.x * (long)blockDim.x + threadIdx.x; r < rows; r += (long)gridDim.x * blockDim.x) {
        const float* z = logits + r * c;
        int best = 0;
        for (int k = 1; k < c; k++)
            if (z[k] > z[best]) best = k;
        out[r] = (uint8_t)best;
    }
}
