// 3D convolution (NDHWC, weights [kd][kh][kw][cin][cout]) and transposed convolution
// (kernel = stride, weights [cin][sd][sh][sw][cout]) as implicit GEMMs on tensor cores:
// activations (f32 or bf16 storage, the template parameter A) and f32 weights are gathered tile
// by tile, rounded to bf16 in shared memory, multiplied with mma.sync.m16n8k16 and accumulated
// in fp32; outputs are stored as A. Bounds are checked per element, so channel
// counts that are not multiples of 8 (first conv, seg heads) take the same path.
// Each problem type says how to read A[m][k] and B[k][n] and where C[m][n] goes. Rows are
// decoded once per tile and columns once per k-step (a_row/a_col, b_row/b_col), so reading an
// element (a_at, b_at) costs no division.
#pragma once  // conv_pipe.cu includes it for the problem structs
#include "common.cuh"

#define BM 64
#define BN 64
#define BK 32
#define SPAD 8
#define GEMM_THREADS 128

typedef long long i64;

struct ConvShape {
    i64 n, id, ih, iw, cin;
    i64 od, oh, ow, cout;
    i64 kd, kh, kw, sd, sh, sw, pd, ph, pw;
};

// What the gathers need of a row or column, decoded once per tile (rows) or per k-step
// (columns) instead of once per element: integer division is the costly part of a gather.
// The input corner of an output voxel: its coordinates times the stride, minus the padding.
struct Origin {
    int b, z, y, x;
    bool ok;
};
// Column k = tap * cin + ci of the im2col matrix.
struct TapC {
    int td, th, tw, ci;
    bool ok;
};

// I: the type the divisions run in (the pipelined kernels decode in unsigned 32-bit, which is
// several times cheaper than 64-bit, for voxel counts below 2^31).
template <class I = i64>
__device__ __forceinline__ Origin origin_of(const ConvShape& s, i64 r, i64 rows) {
    Origin o = {0, 0, 0, 0, r < rows};
    if (!o.ok) return o;
    const I ow = (I)s.ow, oh = (I)s.oh, od = (I)s.od;
    I t = (I)r;
    const I ox = t % ow;
    t /= ow;
    const I oy = t % oh;
    t /= oh;
    o.b = (int)(t / od);
    o.z = (int)(t % od) * (int)s.sd - (int)s.pd;
    o.y = (int)oy * (int)s.sh - (int)s.ph;
    o.x = (int)ox * (int)s.sw - (int)s.pw;
    return o;
}

__device__ __forceinline__ TapC tap_of(const ConvShape& s, i64 k) {
    i64 tap = k / s.cin;
    TapC t;
    t.ok = true;
    t.ci = (int)(k - tap * s.cin);
    t.tw = (int)(tap % s.kw);
    t.th = (int)((tap / s.kw) % s.kh);
    t.td = (int)(tap / (s.kw * s.kh));
    return t;
}

// The input element of im2col column (tap, ci) for an output voxel, or null in the padding.
template <class A>
__device__ __forceinline__ const A* im2col_ptr(const ConvShape& s, const A* x, const Origin& o, const TapC& t) {
    int iz = o.z + t.td, iy = o.y + t.th, ix = o.x + t.tw;
    if (iz < 0 || iy < 0 || ix < 0 || iz >= s.id || iy >= s.ih || ix >= s.iw) return nullptr;
    return x + ((((i64)o.b * s.id + iz) * s.ih + iy) * s.iw + ix) * s.cin + t.ci;
}

// One value at a gathered address, zero where there is none (padding).
template <class A>
__device__ __forceinline__ float ld_or0(const A* p) { return p ? ld(p) : 0.f; }

// Eight bf16 values (16 bytes) of one operand row at once: where activations are stored as
// bf16, 16-byte aligned, and the operand's contiguous axis (channels) is a multiple of 8, a
// group of 8 consecutive k never crosses a tap, so one load replaces eight gathers.
__device__ __forceinline__ uint4 zero16() {
    uint4 z;
    z.x = z.y = z.z = z.w = 0u;
    return z;
}
template <class A>
__device__ __forceinline__ bool vec8_ok(const A* p, i64 channels) {
    return sizeof(A) == 2 && (reinterpret_cast<uintptr_t>(p) & 15) == 0 && channels % 8 == 0;
}
template <class A>
__device__ __forceinline__ uint4 load16_or0(const A* p) {
    if (!p) return zero16();
    SEGK_ALIGNED(p, 16);
    return *reinterpret_cast<const uint4*>(p);
}

// An index along M or N of a problem that decodes nothing ahead (the transposed convs).
struct Plain {
    i64 i;
    bool ok;
};

template <class A>
struct Fprop {
    ConvShape s;
    const A* x;
    const float* w;
    const float* bias;
    A* y;
    i64 M, N, K;
    __device__ i64 k_begin(int) const { return 0; }
    __device__ i64 k_end(int) const { return K; }
    __device__ i64 out_row(i64 m, int) const { return m * s.cout; }
    __device__ bool pairs() const { return s.cout % 2 == 0 && pair_aligned(y); }
    __device__ void out_at(i64 row, i64 n, float v0, float v1, bool both, bool paired) const {
        st_cols(y + row + n, v0 + bias[n], both ? v1 + bias[n + 1] : 0.f, both, paired);
    }
    // A: lanes along k read consecutive input channels; B: lanes along n, consecutive couts.
    typedef Origin ARow;
    typedef TapC ACol;
    typedef Plain BRow;
    typedef Plain BCol;
    static constexpr bool A_K_FAST = true, B_K_FAST = false, A_VEC = sizeof(A) == 2;
    __device__ Origin a_row(i64 m) const { return origin_of(s, m, M); }
    __device__ TapC a_col(i64 k) const { return tap_of(s, k); }
    __device__ Plain b_row(i64 n) const { return {n, n < N}; }
    __device__ Plain b_col(i64 k) const { return {k * s.cout, true}; }
    __device__ float a_at(const Origin& r, const TapC& c) const { return ld_or0(im2col_ptr(s, x, r, c)); }
    __device__ bool a_vec_ok() const { return vec8_ok(x, s.cin); }
    __device__ uint4 a_vec(const Origin& r, const TapC& c) const { return load16_or0(im2col_ptr(s, x, r, c)); }
    __device__ float b_at(const Plain& r, const Plain& c) const { return w[c.i + r.i]; }
};

// dgrad for the input voxels of one stride-parity class: rows are those voxels, columns of
// A are (class tap, cout); only taps that reach the class contribute.
template <class A>
struct Dgrad {
    ConvShape s;
    const A* dy;
    const float* w;
    A* dx;
    // Taps per axis that reach this class: entry i of axis a is (tapcode[a] >> 2i) & 3.
    i64 res[3], cnt[3], tapcode[3], ntaps[3];
    i64 M, N, K;
    float beta, pad_;
    __device__ i64 k_begin(int) const { return 0; }
    __device__ i64 k_end(int) const { return K; }
    // Class voxel m as its batch and its index (j) per axis within the class.
    __device__ void class_index(i64 m, i64& b, i64& jz, i64& jy, i64& jx) const {
        jx = m % cnt[2];
        i64 t = m / cnt[2];
        jy = t % cnt[1];
        t /= cnt[1];
        jz = t % cnt[0];
        b = t / cnt[0];
    }
    __device__ void voxel(i64 m, i64& b, i64& z, i64& y, i64& x) const {
        class_index(m, b, z, y, x);
        z = res[0] + z * s.sd, y = res[1] + y * s.sh, x = res[2] + x * s.sw;
    }
    __device__ void tap(i64 t, i64& td, i64& th, i64& tw) const {
        tw = (tapcode[2] >> (2 * (t % ntaps[2]))) & 3;
        th = (tapcode[1] >> (2 * ((t / ntaps[2]) % ntaps[1]))) & 3;
        td = (tapcode[0] >> (2 * (t / (ntaps[2] * ntaps[1])))) & 3;
    }
    __device__ i64 out_row(i64 m, int) const {
        i64 b, z, y, x;
        voxel(m, b, z, y, x);
        return (((b * s.id + z) * s.ih + y) * s.iw + x) * s.cin;
    }
    __device__ bool pairs() const { return s.cin % 2 == 0 && pair_aligned(dx); }
    __device__ void out_at(i64 row, i64 n, float v0, float v1, bool both, bool paired) const { st_cols(dx + row + n, v0, v1, both, paired, beta); }
    // A row: the class voxel; A column: (tap offsets, cout) with lanes along cout; B: the
    // weight of (tap, cout) for input channel n, lanes along cout too.
    struct VoxelRow {
        int b, z, y, x;
        bool ok;
    };
    struct TapCo {
        int qd, qh, qw, co;  // padding minus tap offset, per axis
        i64 wbase;           // (tap * cin) * cout + co
    };
    typedef VoxelRow ARow;
    typedef TapCo ACol;
    typedef Plain BRow;
    typedef TapCo BCol;
    static constexpr bool A_K_FAST = true, B_K_FAST = true, A_VEC = sizeof(A) == 2;
    __device__ VoxelRow a_row(i64 m) const {
        VoxelRow r = {0, 0, 0, 0, m < M};
        if (!r.ok) return r;
        i64 b, z, y, x;
        voxel(m, b, z, y, x);
        r.b = (int)b, r.z = (int)z, r.y = (int)y, r.x = (int)x;
        return r;
    }
    __device__ TapCo a_col(i64 k) const {
        i64 co = k % s.cout, td, th, tw;
        tap(k / s.cout, td, th, tw);
        TapCo c;
        c.qd = (int)(s.pd - td), c.qh = (int)(s.ph - th), c.qw = (int)(s.pw - tw), c.co = (int)co;
        c.wbase = ((td * s.kh + th) * s.kw + tw) * s.cin * s.cout + co;
        return c;
    }
    __device__ Plain b_row(i64 n) const { return {n, n < N}; }
    __device__ TapCo b_col(i64 k) const { return a_col(k); }
    // The output gradient a class voxel reads through a tap, or null outside dy. The class's
    // taps make every q an exact multiple of the stride (1 or 2): a shift divides.
    __device__ const A* dy_ptr(const VoxelRow& r, const TapCo& c) const {
        int qz = r.z + c.qd, qy = r.y + c.qh, qx = r.x + c.qw;
        if (qz < 0 || qy < 0 || qx < 0) return nullptr;
        int oz = qz >> (s.sd == 2), oy = qy >> (s.sh == 2), ox = qx >> (s.sw == 2);
        if (oz >= s.od || oy >= s.oh || ox >= s.ow) return nullptr;
        return dy + ((((i64)r.b * s.od + oz) * s.oh + oy) * s.ow + ox) * s.cout + c.co;
    }
    __device__ float a_at(const VoxelRow& r, const TapCo& c) const { return ld_or0(dy_ptr(r, c)); }
    __device__ bool a_vec_ok() const { return vec8_ok(dy, s.cout); }
    __device__ uint4 a_vec(const VoxelRow& r, const TapCo& c) const { return load16_or0(dy_ptr(r, c)); }
    __device__ float b_at(const Plain& r, const TapCo& c) const { return w[c.wbase + r.i * s.cout]; }
};

// wgrad: C[taps*cin][cout] = im2col^T dy, reduction over output rows split across
// blockIdx.z; each split writes its own partial.
template <class A>
struct Wgrad {
    ConvShape s;
    const A* x;
    const A* dy;
    float* part;
    i64 M, N, R, per_split;
    __device__ i64 k_begin(int z) const { return z * per_split; }
    __device__ i64 k_end(int z) const { return min(R, (z + 1) * per_split); }
    __device__ i64 out_row(i64 m, int z) const { return ((i64)z * M + m) * N; }
    __device__ bool pairs() const { return N % 2 == 0 && pair_aligned(part); }
    __device__ void out_at(i64 row, i64 n, float v0, float v1, bool both, bool paired) const { st_cols(part + row + n, v0, v1, both, paired); }
    // A row: an im2col column (tap, input channel), lanes along it read consecutive input
    // channels; A column: an output voxel's input corner. B: dy, lanes along cout.
    typedef TapC ARow;
    typedef Origin ACol;
    typedef Plain BRow;
    typedef Plain BCol;
    static constexpr bool A_K_FAST = false, B_K_FAST = false, A_VEC = false;
    __device__ TapC a_row(i64 m) const {
        TapC t = tap_of(s, m < M ? m : 0);
        t.ok = m < M;
        return t;
    }
    __device__ Origin a_col(i64 k) const { return origin_of(s, k, R); }
    __device__ Plain b_row(i64 n) const { return {n, n < N}; }
    __device__ Plain b_col(i64 k) const { return {k * s.cout, true}; }
    __device__ float a_at(const TapC& r, const Origin& c) const { return c.ok ? ld_or0(im2col_ptr(s, x, c, r)) : 0.f; }
    __device__ float b_at(const Plain& r, const Plain& c) const { return ld(dy + c.i + r.i); }
};

struct TShape {
    i64 n, id, ih, iw, cin, cout, sd, sh, sw;
};

__device__ __forceinline__ i64 tout_row(const TShape& s, i64 r, i64 t) {
    i64 x = r % s.iw, q = r / s.iw;
    i64 y = q % s.ih;
    q /= s.ih;
    i64 z = q % s.id, b = q / s.id;
    i64 tw = t % s.sw, th = (t / s.sw) % s.sh, td = t / (s.sw * s.sh);
    return ((b * s.id * s.sd + z * s.sd + td) * (s.ih * s.sh) + y * s.sh + th) * (s.iw * s.sw) + x * s.sw + tw;
}

// For the transposed-conv gathers: an input voxel with its coordinates already scaled by the
// stride (the corner of its output block), and a tap of that block with an output channel.
struct TVox {
    int b, z, y, x;
    bool ok;
};
struct TTap {
    int td, th, tw, co;
    bool ok;
};

__device__ __forceinline__ TVox tvox_of(const TShape& s, i64 r, i64 rows) {
    TVox v = {0, 0, 0, 0, r < rows};
    if (!v.ok) return v;
    i64 x = r % s.iw, q = r / s.iw;
    i64 y = q % s.ih;
    q /= s.ih;
    v.z = (int)((q % s.id) * s.sd);
    v.b = (int)(q / s.id);
    v.y = (int)(y * s.sh);
    v.x = (int)(x * s.sw);
    return v;
}

// Index k = tap * cout + co.
__device__ __forceinline__ TTap ttap_of(const TShape& s, i64 k) {
    i64 t = k / s.cout;
    TTap p;
    p.co = (int)(k - t * s.cout);
    p.tw = (int)(t % s.sw);
    p.th = (int)((t / s.sw) % s.sh);
    p.td = (int)(t / (s.sw * s.sh));
    p.ok = true;
    return p;
}

// dy at the output voxel (v + tap), channel tap.co (always inside: kernel = stride).
template <class A>
__device__ __forceinline__ const A* tout_ptr(const TShape& s, const A* dy, const TVox& v, const TTap& t) {
    i64 od = s.id * s.sd, oh = s.ih * s.sh, ow = s.iw * s.sw;
    return dy + ((((i64)v.b * od + v.z + t.td) * oh + v.y + t.th) * ow + v.x + t.tw) * s.cout + t.co;
}

// Transposed conv forward for one tap: rows are input voxels.
template <class A>
struct TFprop {
    TShape s;
    const A* x;
    const float* w;
    const float* bias;
    A* y;
    i64 tap, M, N, K;
    __device__ i64 k_begin(int) const { return 0; }
    __device__ i64 k_end(int) const { return K; }
    __device__ i64 out_row(i64 m, int) const { return tout_row(s, m, tap) * s.cout; }
    __device__ bool pairs() const { return s.cout % 2 == 0 && pair_aligned(y); }
    __device__ void out_at(i64 row, i64 n, float v0, float v1, bool both, bool paired) const {
        st_cols(y + row + n, v0 + bias[n], both ? v1 + bias[n + 1] : 0.f, both, paired);
    }
    typedef Plain ARow;
    typedef Plain ACol;
    typedef Plain BRow;
    typedef Plain BCol;
    static constexpr bool A_K_FAST = true, B_K_FAST = false, A_VEC = sizeof(A) == 2;
    __device__ Plain a_row(i64 m) const { return {m, m < M}; }
    __device__ Plain a_col(i64 k) const { return {k, true}; }
    __device__ bool a_vec_ok() const { return vec8_ok(x, s.cin); }
    __device__ uint4 a_vec(const Plain& r, const Plain& c) const { return load16_or0(x + r.i * s.cin + c.i); }
    __device__ Plain b_row(i64 n) const { return {n, n < N}; }
    __device__ Plain b_col(i64 k) const { return {(k * s.sd * s.sh * s.sw + tap) * s.cout, true}; }
    __device__ float a_at(const Plain& r, const Plain& c) const { return ld(x + r.i * s.cin + c.i); }
    __device__ float b_at(const Plain& r, const Plain& c) const { return w[c.i + r.i]; }
};

template <class A>
struct TDgrad {
    TShape s;
    const A* dy;
    const float* w;
    A* dx;
    i64 M, N, K;
    float beta, pad_;
    __device__ i64 k_begin(int) const { return 0; }
    __device__ i64 k_end(int) const { return K; }
    __device__ i64 out_row(i64 m, int) const { return m * s.cin; }
    __device__ bool pairs() const { return s.cin % 2 == 0 && pair_aligned(dx); }
    __device__ void out_at(i64 row, i64 n, float v0, float v1, bool both, bool paired) const { st_cols(dx + row + n, v0, v1, both, paired, beta); }
    // A row: the input voxel (scaled); A column: (tap, cout), lanes along cout. B: w[n][k].
    typedef TVox ARow;
    typedef TTap ACol;
    typedef Plain BRow;
    typedef Plain BCol;
    static constexpr bool A_K_FAST = true, B_K_FAST = true, A_VEC = sizeof(A) == 2;
    __device__ TVox a_row(i64 m) const { return tvox_of(s, m, M); }
    __device__ bool a_vec_ok() const { return vec8_ok(dy, s.cout); }
    __device__ uint4 a_vec(const TVox& r, const TTap& c) const { return load16_or0(tout_ptr(s, dy, r, c)); }
    __device__ TTap a_col(i64 k) const { return ttap_of(s, k); }
    __device__ Plain b_row(i64 n) const { return {n * K, n < N}; }
    __device__ Plain b_col(i64 k) const { return {k, true}; }
    __device__ float a_at(const TVox& r, const TTap& c) const { return ld(tout_ptr(s, dy, r, c)); }
    __device__ float b_at(const Plain& r, const Plain& c) const { return w[r.i + c.i]; }
};

template <class A>
struct TWgrad {
    TShape s;
    const A* x;
    const A* dy;
    float* part;
    i64 M, N, R, per_split;
    __device__ i64 k_begin(int z) const { return z * per_split; }
    __device__ i64 k_end(int z) const { return min(R, (z + 1) * per_split); }
    __device__ i64 out_row(i64 m, int z) const { return ((i64)z * M + m) * N; }
    __device__ bool pairs() const { return N % 2 == 0 && pair_aligned(part); }
    __device__ void out_at(i64 row, i64 n, float v0, float v1, bool both, bool paired) const { st_cols(part + row + n, v0, v1, both, paired); }
    // A: x[k][m], lanes along m (input channels). B row: (tap, cout), lanes along it; B column:
    // the input voxel (scaled).
    typedef Plain ARow;
    typedef Plain ACol;
    typedef TTap BRow;
    typedef TVox BCol;
    static constexpr bool A_K_FAST = false, B_K_FAST = false, A_VEC = false;
    __device__ Plain a_row(i64 m) const { return {m, m < M}; }
    __device__ Plain a_col(i64 k) const { return {k * s.cin, true}; }
    __device__ TTap b_row(i64 n) const {
        TTap t = ttap_of(s, n < N ? n : 0);
        t.ok = n < N;
        return t;
    }
    __device__ TVox b_col(i64 k) const { return tvox_of(s, k, R); }
    __device__ float a_at(const Plain& r, const Plain& c) const { return ld(x + c.i + r.i); }
    __device__ float b_at(const TTap& r, const TVox& c) const { return c.ok ? ld(tout_ptr(s, dy, c, r)) : 0.f; }
};

__device__ __forceinline__ void mma_bf16_16816(float* d, const uint32_t* a, const uint32_t* b) {
#ifdef SEGK_EMU
    emu_mma_m16n8k16_bf16(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Fills a BR x BK tile T[row][k] (rows along M for A, along N for B) with at(row, col) as
// bf16. K_FAST: consecutive lanes take consecutive k (the operand is contiguous along k), else
// consecutive rows; either way each element costs no division (rows and columns are decoded).
template <bool K_FAST, int BR, class Row, class Col, class At>
__device__ __forceinline__ void fill_tile(__nv_bfloat16 (*T)[BK + SPAD], const Row* rows, const Col* cols, const bool* kok, int tid, At at) {
    if (K_FAST) {
        const int c = tid % BK;
        for (int r = tid / BK; r < BR; r += GEMM_THREADS / BK) T[r][c] = __float2bfloat16(kok[c] && rows[r].ok ? at(rows[r], cols[c]) : 0.f);
    } else {
        const int r = tid % BR;
        for (int c = tid / BR; c < BK; c += GEMM_THREADS / BR) T[r][c] = __float2bfloat16(kok[c] && rows[r].ok ? at(rows[r], cols[c]) : 0.f);
    }
}

// fill_tile for an operand read 8 k at a time (a_vec): each thread stores 16-byte groups.
// Every group is wholly in or out of K (K and every group start are multiples of 8).
template <int BR, class Row, class Col, class AtVec>
__device__ __forceinline__ void fill_tile_vec(__nv_bfloat16 (*T)[BK + SPAD], const Row* rows, const Col* cols, const bool* kok, int tid, AtVec at) {
    const int g = tid % (BK / 8), c = g * 8;
    for (int r = tid / (BK / 8); r < BR; r += GEMM_THREADS / (BK / 8))
        *reinterpret_cast<uint4*>(&T[r][c]) = kok[c] && rows[r].ok ? at(rows[r], cols[c]) : zero16();
}

// Stores a warp's MI x NI fragments of C (rows from r0, columns from c0): each output row is
// located once (out_row: the dgrad one decodes a voxel), then each lane writes its fragment's
// two adjacent columns, in one access where the output allows it.
template <int MI, int NI, class P>
__device__ __forceinline__ void store_tile(const P& p, const float (*acc)[NI][4], i64 r0, i64 c0, int lane, int z) {
    const int g = lane >> 2, t = lane & 3;
    const bool paired = p.pairs();
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const i64 m = r0 + mi * 16 + g + h * 8;
            if (m >= p.M) continue;
            const i64 row = p.out_row(m, z);
#pragma unroll
            for (int ni = 0; ni < NI; ni++) {
                const i64 n = c0 + ni * 8 + t * 2;
                if (n < p.N) p.out_at(row, n, acc[mi][ni][h * 2], acc[mi][ni][h * 2 + 1], n + 1 < p.N, paired);
            }
        }
}

// One 64x64 tile of C per block, four warps of 32x32, K in steps of 32.
template <class P>
__device__ __forceinline__ void igemm(const P& p) {
    __shared__ __align__(16) __nv_bfloat16 As[BM][BK + SPAD];
    __shared__ __align__(16) __nv_bfloat16 Bs[BN][BK + SPAD];  // n-major: k pairs contiguous
    __shared__ typename P::ARow arow[BM];
    __shared__ typename P::BRow brow[BN];
    __shared__ typename P::ACol acol[BK];
    __shared__ typename P::BCol bcol[BK];
    __shared__ bool kok[BK];
    const i64 m0 = (i64)blockIdx.x * BM, n0 = (i64)blockIdx.y * BN;
    const int z = blockIdx.z;
    const i64 kb = p.k_begin(z), ke = p.k_end(z);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    const int g = lane >> 2, t = lane & 3;  // this lane's row and column pair in a fragment
    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.f;
    for (int i = tid; i < BM; i += GEMM_THREADS) arow[i] = p.a_row(m0 + i);
    bool avec = false;
    if constexpr (P::A_VEC) avec = p.a_vec_ok();
    for (int i = tid; i < BN; i += GEMM_THREADS) brow[i] = p.b_row(n0 + i);

    for (i64 k0 = kb; k0 < ke; k0 += BK) {
        // The previous step's fills read the column contexts before its first barrier.
        for (int c = tid; c < BK; c += GEMM_THREADS) {
            const i64 k = k0 + c < ke ? k0 + c : kb;
            kok[c] = k0 + c < ke;
            acol[c] = p.a_col(k);
            bcol[c] = p.b_col(k);
        }
        __syncthreads();
        bool a_vectorised = false;
        if constexpr (P::A_VEC) {
            if (avec) {
                fill_tile_vec<BM>(As, arow, acol, kok, tid, [&](const typename P::ARow& r, const typename P::ACol& c) { return p.a_vec(r, c); });
                a_vectorised = true;
            }
        }
        if (!a_vectorised) fill_tile<P::A_K_FAST, BM>(As, arow, acol, kok, tid, [&](const typename P::ARow& r, const typename P::ACol& c) { return p.a_at(r, c); });
        fill_tile<P::B_K_FAST, BN>(Bs, brow, bcol, kok, tid, [&](const typename P::BRow& r, const typename P::BCol& c) { return p.b_at(r, c); });
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[2][4], bf[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; mi++) {
                int r = wm + mi * 16 + g;
                af[mi][0] = *reinterpret_cast<const uint32_t*>(&As[r][kk + t * 2]);
                af[mi][1] = *reinterpret_cast<const uint32_t*>(&As[r + 8][kk + t * 2]);
                af[mi][2] = *reinterpret_cast<const uint32_t*>(&As[r][kk + t * 2 + 8]);
                af[mi][3] = *reinterpret_cast<const uint32_t*>(&As[r + 8][kk + t * 2 + 8]);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                int c = wn + ni * 8 + g;
                bf[ni][0] = *reinterpret_cast<const uint32_t*>(&Bs[c][kk + t * 2]);
                bf[ni][1] = *reinterpret_cast<const uint32_t*>(&Bs[c][kk + t * 2 + 8]);
            }
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++) mma_bf16_16816(acc[mi][ni], af[mi], bf[ni]);
        }
        __syncthreads();
    }
    store_tile<2, 4>(p, acc, m0 + wm, n0 + wn, lane, z);
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) segk_conv_fprop_f32(Fprop<float> p) { igemm(p); }
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) segk_conv_fprop_bf16(Fprop<bf16> p) { igemm(p); }
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) segk_conv_dgrad_f32(Dgrad<float> p) { igemm(p); }
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) segk_conv_dgrad_bf16(Dgrad<bf16> p) { igemm(p); }
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) segk_conv_wgrad_f32(Wgrad<float> p) { igemm(p); }
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) segk_conv_wgrad_bf16(Wgrad<bf16> p) { igemm(p); }
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) segk_convt_fprop_f32(TFprop<float> p) { igemm(p); }
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) segk_convt_fprop_bf16(TFprop<bf16> p) { igemm(p); }
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) segk_convt_dgrad_f32(TDgrad<float> p) { igemm(p); }
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) segk_convt_dgrad_bf16(TDgrad<bf16> p) { igemm(p); }
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) segk_convt_wgrad_f32(TWgrad<float> p) { igemm(p); }
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) segk_convt_wgrad_bf16(TWgrad<bf16> p) { igemm(p); }

// out[i] = sum over splits of part[z * len + i] (split-K reduction, fixed order).
extern "C" __global__ void segk_sum_splits_f32(const float* part, int splits, i64 len, float* out) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < len; i += (i64)gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int z = 0; z < splits; z++) s += part[z * len + i];
        out[i] = s;
    }
}

// part[blockIdx.x][c] = column sums of the rows in this block's chunk (bias gradients), W
// channels per thread: 8 with 16-byte loads (C a multiple of 8, 16-byte aligned), else 1.
template <int W, class A>
__device__ __forceinline__ void colsum_partial(const A* x, i64 rows, int C, i64 chunk, float* part) {
    __shared__ float sh[COL_THREADS * W];
    const ColBlock<W> L(rows, C, chunk);
    for (int g0 = 0; g0 < L.G; g0 += L.lanes) {
        const int g = g0 + L.cl;
        const bool live = L.live(g);
        float acc[W] = {}, v[W];
        if (live)
            for (i64 r = L.r0 + L.rlane; r < L.r1; r += L.rl) {
                if (W == 8)
                    load8(x + r * C + g * 8, v);
                else
                    v[0] = ld(x + r * C + g);
#pragma unroll
                for (int i = 0; i < W; i++) acc[i] += v[i];
            }
        tree_merge<W>(acc, sh, L, live, [](float* a, const float* o) {
#pragma unroll
            for (int i = 0; i < W; i++) a[i] += o[i];
        });
        if (live && L.rlane == 0)
#pragma unroll
            for (int i = 0; i < W; i++) *L.part_at(part, C, g * W + i, 1) = acc[i];
    }
}
extern "C" __global__ void __launch_bounds__(COL_THREADS) segk_colsum_partial_f32(const float* x, i64 rows, int C, i64 chunk, float* part) { colsum_partial<1>(x, rows, C, chunk, part); }
extern "C" __global__ void __launch_bounds__(COL_THREADS) segk_colsum_partial_bf16(const bf16* x, i64 rows, int C, i64 chunk, float* part) { colsum_partial<1>(x, rows, C, chunk, part); }
extern "C" __global__ void __launch_bounds__(COL_THREADS) segk_colsum_partial8_f32(const float* x, i64 rows, int C, i64 chunk, float* part) { colsum_partial<8>(x, rows, C, chunk, part); }
extern "C" __global__ void __launch_bounds__(COL_THREADS) segk_colsum_partial8_bf16(const bf16* x, i64 rows, int C, i64 chunk, float* part) { colsum_partial<8>(x, rows, C, chunk, part); }
