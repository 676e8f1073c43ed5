// The pipelined path of the convolutions (forward, dgrad, wgrad; CPU twin: backend/cpu/conv.rs)
// for the shapes that dominate a U-Net step: bf16 activations, both operands read as 16-byte
// groups of 8 channels (the contiguous channel counts are multiples of 8), weights as a bf16
// copy. Against igemm in conv.cu: every operand element moves global -> shared with cp.async
// (no registers, no conversion), PSTAGES k-steps in flight so the gathers' latency hides behind
// the mma of earlier steps, 128-row tiles with 64x32 warp tiles fed by ldmatrix, and one
// barrier per k-step. Shapes outside it keep igemm. The problem structs (Fprop, Dgrad, Wgrad)
// and their epilogues (store) are conv.cu's.
#include "conv.cu"

#define PK 32       // k per stage: four 16-byte chunks of a k-major row
#define PSTAGES 4   // stages in shared memory, PSTAGES - 1 loads in flight
#define PBM 128     // rows of C per block
#define PCTX 2048   // bytes of shared memory for per-row / per-k contexts after the stages

// Tiles of 128 x BN with warps of 64 x 32 (2 x BN/32 warps): BN 128, 64 or 32 by the width
// of C, so a 32-channel layer wastes no tensor-core work.
// (conv.cu has BM and BN as macros: the tile sizes here are TM and TN.)
template <int BN_>
struct PTile {
    static constexpr int TM = PBM, TN = BN_, WARPS_N = BN_ / 32, THREADS = 64 * WARPS_N;
    static constexpr int MI = 4, NI = 4;
    static constexpr int A_BYTES = TM * PK * 2, STAGE_BYTES = (TM + TN) * PK * 2;
    static constexpr int SMEM = PSTAGES * STAGE_BYTES + PCTX;
};

// --- cp.async, ldmatrix --------------------------------------------------------------------

// L1: through L1 (.ca), for gathered activations that neighbouring taps read again; else
// L2 only (.cg), for operands each block reads once.
template <bool L1 = false>
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#ifdef SEGK_EMU
    emu_cp_async16(dst, src, valid);
#else
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    if (L1)
        asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
    else
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef SEGK_EMU
    emu_cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef SEGK_EMU
    emu_cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* row) {
#ifdef SEGK_EMU
    emu_ldmatrix_x4(r, row, TRANS);
#else
    unsigned a = (unsigned)__cvta_generic_to_shared(row);
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}
__device__ __forceinline__ unsigned dynamic_smem_bytes() {
#ifdef SEGK_EMU
    return emu_dynamic_shared_bytes();
#else
    unsigned v;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(v));
    return v;
#endif
}

// --- shared-memory tile layouts --------------------------------------------------------------
// K-major: one row per m (or n), PK k = four 16-byte chunks. MN-major: one row per k, W
// elements of m (or n). The chunk index is XOR-swizzled with the row so that the eight rows an
// ldmatrix reads at one logical chunk fall in eight different bank groups.

__device__ __forceinline__ int kmajor_off(int row, int chunk) { return row * (PK * 2) + ((chunk ^ ((row >> 1) & 3)) << 4); }

template <int W>
__device__ __forceinline__ int mnmajor_off(int krow, int chunk) {
    constexpr int CPR = W / 8;
    const int sw = CPR >= 8 ? (chunk ^ (krow & 7)) : (chunk ^ ((krow >> 1) & 3));
    return krow * (W * 2) + (sw << 4);
}

// Fragments of a 16 x 16 A block (rows r0.., k kk..) and of two 8 x 16 B blocks (n c0.., k kk..)
// in mma.m16n8k16 order, from either layout.
template <bool KMAJOR, int W>
__device__ __forceinline__ void frag_a(uint32_t* a, const uint8_t* T, int r0, int kk, int lane) {
    if (KMAJOR) {
        ldmatrix_x4<false>(a, T + kmajor_off(r0 + (lane & 15), (kk >> 3) + (lane >> 4)));
    } else {
        const int j = lane >> 3;
        ldmatrix_x4<true>(a, T + mnmajor_off<W>(kk + (lane & 7) + (j >> 1) * 8, (r0 >> 3) + (j & 1)));
    }
}
template <bool KMAJOR, int W>
__device__ __forceinline__ void frag_b2(uint32_t* b, const uint8_t* T, int c0, int kk, int lane) {
    const int j = lane >> 3;
    if (KMAJOR)
        ldmatrix_x4<false>(b, T + kmajor_off(c0 + (lane & 7) + (j >> 1) * 8, (kk >> 3) + (j & 1)));
    else
        ldmatrix_x4<true>(b, T + mnmajor_off<W>(kk + (lane & 7) + (j & 1) * 8, (c0 >> 3) + (j >> 1)));
}

// --- operand loaders: which 16-byte chunks this thread copies for one k-step ------------------
// Each keeps its rows' contexts (decoded once) and its k position (advanced by PK per step
// without division). A gathered address is a row's base offset plus the column's offset, both
// 32-bit (the host sends only tensors under 2^31 values here), and in bounds where each
// coordinate sum is, one unsigned compare per axis. `issue` queues the copies of the step at
// the loader's k and moves on; `prepare` decodes what the next step needs ahead of a barrier.

// A row of a gather: the element offset of its corner and the corner's coordinates (a row
// outside M has z = NO_ROW, which no in-bounds test passes).
struct __align__(16) Row4 {
    int base, z, y, x;
};
#define NO_ROW (-(1 << 30))

__device__ __forceinline__ Row4 load_row(const Row4* r) {
    const int4 v = *reinterpret_cast<const int4*>(r);  // one 16-byte shared load
    return {v.x, v.y, v.z, v.w};
}

__device__ __forceinline__ bool inside(int v, int n) { return (unsigned)v < (unsigned)n; }

// The row of output voxel m of a forward conv (or wgrad voxel): its input corner. Decoded in
// 32-bit (voxel counts are below 2^31 here): wgrad decodes 32 of these every k-step.
__device__ __forceinline__ Row4 corner_row(const ConvShape& s, i64 m, i64 rows) {
    const Origin o = origin_of<unsigned>(s, m, rows);
    if (!o.ok) return {0, NO_ROW, 0, 0};
    return {(((o.b * (int)s.id + o.z) * (int)s.ih + o.y) * (int)s.iw + o.x) * (int)s.cin, o.z, o.y, o.x};
}

// Copies an MN-major tile W wide of one step from a plain [k][n] matrix: rows k .. k + PK (each
// thread the same column chunk `col`, its chunk index tid % (W / 8), in its rows), row kg at
// src + kg * stride + col, zeros past k_end or N.
template <int W, int THREADS>
__device__ __forceinline__ void copy_mn_rows(uint8_t* B, const bf16* src, i64 stride, i64 k, i64 k_end, i64 col, i64 N, int tid) {
    constexpr int CPR = W / 8;
#pragma unroll
    for (int i = 0; i < PK * CPR / THREADS; i++) {
        const int kr = tid / CPR + i * (THREADS / CPR);
        const bool ok = k + kr < k_end && col < N;
        cp_async16(B + mnmajor_off<W>(kr, tid % CPR), ok ? src + (k + kr) * stride + col : src, ok);
    }
}

// Copies the K-major B tile of one step: rows n0 .. n0 + TN of a matrix whose row n starts at
// src + n * stride, src already at this thread's 16-byte chunk of the step (chunk tid % 4);
// zeros past N, or everywhere when the chunk is past K (!kin).
template <class T>
__device__ __forceinline__ void copy_k_rows(uint8_t* B, const bf16* src, i64 stride, i64 n0, i64 N, bool kin, int tid) {
#pragma unroll
    for (int i = 0; i < T::TN * 4 / T::THREADS; i++) {
        const int r = (tid >> 2) + i * (T::THREADS / 4);
        const bool ok = kin && n0 + r < N;
        cp_async16(B + kmajor_off(r, tid & 3), ok ? src + (n0 + r) * stride : src, ok);
    }
}

// Forward. A = im2col(x), k-major, chunk column c = tid % 4 fixed per thread; B = w[k][cout]
// (bf16 copy), MN-major.
template <class T>
struct FpropLoad {
    const Fprop<bf16>& p;
    const bf16* wb;
    Row4* rows;
    int tid, id, ih, iw, ci, td, th, tw, coff;  // coff: the column's offset from a row's corner
    i64 k, bcol;                                  // k of this step; this thread's B column n
    __device__ FpropLoad(const Fprop<bf16>& p_, const bf16* wb_, uint8_t* ctx, i64 m0, i64 n0, int tid_) : p(p_), wb(wb_), rows((Row4*)ctx), tid(tid_) {
        const ConvShape& s = p.s;
        for (int i = tid; i < T::TM; i += T::THREADS) rows[i] = corner_row(s, m0 + i, p.M);
        id = (int)s.id, ih = (int)s.ih, iw = (int)s.iw;
        const TapC t = tap_of(s, (tid & 3) * 8);
        ci = t.ci, td = t.td, th = t.th, tw = t.tw;
        k = 0;
        bcol = n0 + (tid % (T::TN / 8)) * 8;
        locate();
    }
    __device__ void locate() { coff = ((td * ih + th) * iw + tw) * (int)p.s.cin + ci; }
    __device__ void issue(uint8_t* A, uint8_t* B) {
        const int c = tid & 3;
        const bool kin = td < p.s.kd;
#pragma unroll
        for (int i = 0; i < T::TM * 4 / T::THREADS; i++) {
            const int r = (tid >> 2) + i * (T::THREADS / 4);
            const Row4 o = load_row(rows + r);
            const bool ok = kin && inside(o.z + td, id) && inside(o.y + th, ih) && inside(o.x + tw, iw);
            cp_async16<true>(A + kmajor_off(r, c), ok ? p.x + (o.base + coff) : p.x, ok);
        }
        copy_mn_rows<T::TN, T::THREADS>(B, wb, p.N, k, p.K, bcol, p.N, tid);
        k += PK;
        for (ci += PK; ci >= p.s.cin;) {
            ci -= (int)p.s.cin;
            if (++tw == p.s.kw) {
                tw = 0;
                if (++th == p.s.kh) th = 0, ++td;
            }
        }
        locate();
    }
    __device__ void prepare(int, i64) {}
};

// dgrad for one stride-parity class. A = dy at (class voxel, (class tap, cout)), k-major;
// B = w[tap][cin][cout] read as (n = cin, k = (class tap, cout)), k-major: both with chunk
// column c = tid % 4, so one k position serves both. Within a class the output voxel a tap
// reaches is the voxel's index in the class plus a per-tap offset (exact: the stride divides
// the class's reach), so dy rows are bases too.
template <class T>
struct DgradLoad {
    const Dgrad<bf16>& p;
    const bf16* wb;
    Row4* rows;
    i64 n0;
    int tid, od, oh, ow, co, t0, t1, t2;  // cout and the class tap's index per axis at this k
    int cz, cy, cx, coff, woff;           // the tap's output offset per axis; dy and w offsets
    __device__ DgradLoad(const Dgrad<bf16>& p_, const bf16* wb_, uint8_t* ctx, i64 m0, i64 n0_, int tid_) : p(p_), wb(wb_), rows((Row4*)ctx), n0(n0_), tid(tid_) {
        const ConvShape& s = p.s;
        od = (int)s.od, oh = (int)s.oh, ow = (int)s.ow;
        for (int i = tid; i < T::TM; i += T::THREADS) {
            const i64 m = m0 + i;
            if (m >= p.M) {
                rows[i] = {0, NO_ROW, 0, 0};
                continue;
            }
            i64 b, jz, jy, jx;
            p.class_index(m, b, jz, jy, jx);
            rows[i] = {((((int)b * od + (int)jz) * oh + (int)jy) * ow + (int)jx) * (int)s.cout, (int)jz, (int)jy, (int)jx};
        }
        co = (tid & 3) * 8, t0 = t1 = t2 = 0;
        settle();
    }
    // Carries cout past its end into the next class tap, and locates the tap.
    __device__ void settle() {
        const ConvShape& s = p.s;
        for (; co >= s.cout;) {
            co -= (int)s.cout;
            if (++t2 == p.ntaps[2]) {
                t2 = 0;
                if (++t1 == p.ntaps[1]) t1 = 0, ++t0;
            }
        }
        const int td = (int)(p.tapcode[0] >> (2 * t0)) & 3, th = (int)(p.tapcode[1] >> (2 * t1)) & 3, tw = (int)(p.tapcode[2] >> (2 * t2)) & 3;
        cz = ((int)(p.res[0] + s.pd) - td) >> (s.sd == 2);
        cy = ((int)(p.res[1] + s.ph) - th) >> (s.sh == 2);
        cx = ((int)(p.res[2] + s.pw) - tw) >> (s.sw == 2);
        coff = ((cz * oh + cy) * ow + cx) * (int)s.cout + co;
        woff = ((td * (int)s.kh + th) * (int)s.kw + tw) * (int)s.cin * (int)s.cout + co;
    }
    __device__ void issue(uint8_t* A, uint8_t* B) {
        const int c = tid & 3;
        const bool kin = t0 < p.ntaps[0];
#pragma unroll
        for (int i = 0; i < T::TM * 4 / T::THREADS; i++) {
            const int r = (tid >> 2) + i * (T::THREADS / 4);
            const Row4 o = load_row(rows + r);
            const bool ok = kin && inside(o.z + cz, od) && inside(o.y + cy, oh) && inside(o.x + cx, ow);
            cp_async16<true>(A + kmajor_off(r, c), ok ? p.dy + (o.base + coff) : p.dy, ok);
        }
        copy_k_rows<T>(B, wb + woff, p.s.cout, n0, p.N, kin, tid);
        co += PK;
        settle();
    }
    __device__ void prepare(int, i64) {}
};

// wgrad (one split of the voxels). A = x at (voxel k, (tap, cin) m), MN-major with chunk column
// m fixed per thread; the k rows' voxel corners are decoded one step ahead into a ring in
// shared memory. B = dy[voxel][cout], MN-major.
template <class T>
struct WgradLoad {
    const Wgrad<bf16>& p;
    Row4* ring;  // [2][PK]
    i64 k, ke, bcol;
    int tid, step, id, ih, iw, td, th, tw, toff;  // this thread's A tap and its offset
    bool mok;
    __device__ WgradLoad(const Wgrad<bf16>& p_, const bf16*, uint8_t* ctx, i64 m0, i64 n0, int tid_) : p(p_), ring((Row4*)ctx), tid(tid_), step(0) {
        const ConvShape& s = p.s;
        k = p.k_begin(blockIdx.z), ke = p.k_end(blockIdx.z);
        id = (int)s.id, ih = (int)s.ih, iw = (int)s.iw;
        const i64 m = m0 + (tid % (T::TM / 8)) * 8;
        mok = m < p.M;
        const TapC t = tap_of(s, mok ? m : 0);
        td = t.td, th = t.th, tw = t.tw;
        toff = ((td * ih + th) * iw + tw) * (int)s.cin + t.ci;
        bcol = n0 + (tid % (T::TN / 8)) * 8;
    }
    // Decodes the voxel corners of step `step` (at k0) into its ring slot.
    __device__ void prepare(int step, i64 k0) {
        if (tid < PK) ring[(step & 1) * PK + tid] = corner_row(p.s, k0 + tid, ke);
    }
    __device__ void issue(uint8_t* A, uint8_t* B) {
        const Row4* org = ring + (step & 1) * PK;
        constexpr int ACPR = T::TM / 8;
#pragma unroll
        for (int i = 0; i < PK * ACPR / T::THREADS; i++) {
            const int kr = tid / ACPR + i * (T::THREADS / ACPR);
            const Row4 o = load_row(org + kr);
            const bool ok = mok && inside(o.z + td, id) && inside(o.y + th, ih) && inside(o.x + tw, iw);
            cp_async16<true>(A + mnmajor_off<T::TM>(kr, tid % ACPR), ok ? p.x + (o.base + toff) : p.x, ok);
        }
        copy_mn_rows<T::TN, T::THREADS>(B, p.dy, p.s.cout, k, ke, bcol, p.N, tid);
        k += PK;
        step++;
    }
};

// --- transposed convolutions (kernel = stride): every output voxel has one input voxel ------
// Their gathers never leave the tensors (no padding, no tap outside), so the only bounds are
// M, N and K.

// The dy offset of the output block corner of input voxel r (kernel = stride), in 32 bits.
__device__ __forceinline__ int tcorner(const TShape& s, unsigned r) {
    const unsigned iw = (unsigned)s.iw, ih = (unsigned)s.ih, id = (unsigned)s.id;
    const unsigned x = r % iw, y = (r / iw) % ih, q = r / (iw * ih), z = q % id, b = q / id;
    const unsigned od = id * (unsigned)s.sd, oh = ih * (unsigned)s.sh, ow = iw * (unsigned)s.sw;
    return (int)((((b * od + z * (unsigned)s.sd) * oh + y * (unsigned)s.sh) * ow + x * (unsigned)s.sw) * (unsigned)s.cout);
}

// The dy offset of tap t of an output block, channel co.
__device__ __forceinline__ int ttap_offset(const TShape& s, int t, int co) {
    const int tw = t % (int)s.sw, th = (t / (int)s.sw) % (int)s.sh, td = t / (int)(s.sw * s.sh);
    return ((td * (int)(s.ih * s.sh) + th) * (int)(s.iw * s.sw) + tw) * (int)s.cout + co;
}

// Forward, one tap: A = x[voxel][cin] (k-major, plain rows), B = w[cin][tap][cout] at this
// tap (MN-major, row stride taps * cout).
template <class T>
struct TFpropLoad {
    const TFprop<bf16>& p;
    const bf16* wb;
    i64 k, bcol;
    int tid, rowoff, nrows;  // the x offset of this block's first row; its rows inside M
    __device__ TFpropLoad(const TFprop<bf16>& p_, const bf16* wb_, uint8_t*, i64 m0, i64 n0, int tid_) : p(p_), wb(wb_ + p_.tap * p_.s.cout), k(0), tid(tid_) {
        rowoff = (int)(m0 * p.s.cin);
        nrows = (int)min(p.M - m0, (i64)T::TM);
        bcol = n0 + (tid % (T::TN / 8)) * 8;
    }
    __device__ void issue(uint8_t* A, uint8_t* B) {
        const int c = tid & 3, cin = (int)p.s.cin;
        const bool kin = k + c * 8 < p.K;
#pragma unroll
        for (int i = 0; i < T::TM * 4 / T::THREADS; i++) {
            const int r = (tid >> 2) + i * (T::THREADS / 4);
            const bool ok = kin && r < nrows;
            cp_async16(A + kmajor_off(r, c), ok ? p.x + (rowoff + r * cin + (int)k + c * 8) : p.x, ok);
        }
        copy_mn_rows<T::TN, T::THREADS>(B, wb, p.s.sd * p.s.sh * p.s.sw * p.s.cout, k, p.K, bcol, p.N, tid);
        k += PK;
    }
    __device__ void prepare(int, i64) {}
};

// dgrad: A = dy at (input voxel, (tap, cout)), k-major, rows located by their output block's
// corner; B = w[cin][tap * cout] read as (n = cin, k), k-major.
template <class T>
struct TDgradLoad {
    const TDgrad<bf16>& p;
    const bf16* wb;
    int* rows;  // each row's corner offset in dy, -1 past M
    i64 n0, k;
    int tid, t, co, coff;  // this thread's chunk: tap, channel, their offset from a corner
    __device__ TDgradLoad(const TDgrad<bf16>& p_, const bf16* wb_, uint8_t* ctx, i64 m0, i64 n0_, int tid_) : p(p_), wb(wb_), rows((int*)ctx), n0(n0_), k(0), tid(tid_) {
        for (int i = tid; i < T::TM; i += T::THREADS) rows[i] = m0 + i < p.M ? tcorner(p.s, (unsigned)(m0 + i)) : -1;
        t = 0, co = (tid & 3) * 8;
        settle();
    }
    __device__ void settle() {
        for (; co >= p.s.cout; co -= (int)p.s.cout) t++;
        coff = ttap_offset(p.s, t, co);
    }
    __device__ void issue(uint8_t* A, uint8_t* B) {
        const int c = tid & 3;
        const bool kin = k + c * 8 < p.K;
#pragma unroll
        for (int i = 0; i < T::TM * 4 / T::THREADS; i++) {
            const int r = (tid >> 2) + i * (T::THREADS / 4);
            const int base = rows[r];
            const bool ok = kin && base >= 0;
            cp_async16(A + kmajor_off(r, c), ok ? p.dy + (base + coff) : p.dy, ok);
        }
        copy_k_rows<T>(B, wb + k + c * 8, p.K, n0, p.N, kin, tid);
        k += PK;
        co += PK;
        settle();
    }
    __device__ void prepare(int, i64) {}
};

// wgrad (one split of the input voxels): A = x[voxel][cin], MN-major (plain rows); B = dy at
// (voxel, (tap, cout) n), MN-major with this thread's column chunk fixed, so its tap offset is
// too; the k rows' corners are decoded one step ahead into a ring in shared memory.
template <class T>
struct TWgradLoad {
    const TWgrad<bf16>& p;
    int* ring;  // [2][PK] corner offsets in dy, -1 past the split
    i64 k, ke, acol;
    int tid, step, toff;
    bool nok;
    __device__ TWgradLoad(const TWgrad<bf16>& p_, const bf16*, uint8_t* ctx, i64 m0, i64 n0, int tid_) : p(p_), ring((int*)ctx), tid(tid_), step(0) {
        k = p.k_begin(blockIdx.z), ke = p.k_end(blockIdx.z);
        acol = m0 + (tid % (T::TM / 8)) * 8;
        const i64 n = n0 + (tid % (T::TN / 8)) * 8;
        nok = n < p.N;
        toff = nok ? ttap_offset(p.s, (int)(n / p.s.cout), (int)(n % p.s.cout)) : 0;
    }
    __device__ void prepare(int step, i64 k0) {
        if (tid < PK) ring[(step & 1) * PK + tid] = k0 + tid < ke ? tcorner(p.s, (unsigned)(k0 + tid)) : -1;
    }
    __device__ void issue(uint8_t* A, uint8_t* B) {
        copy_mn_rows<T::TM, T::THREADS>(A, p.x, p.s.cin, k, ke, acol, p.M, tid);
        const int* corner = ring + (step & 1) * PK;
        constexpr int CPR = T::TN / 8;
#pragma unroll
        for (int i = 0; i < PK * CPR / T::THREADS; i++) {
            const int kr = tid / CPR + i * (T::THREADS / CPR);
            const int base = corner[kr];
            const bool ok = nok && base >= 0;
            cp_async16(B + mnmajor_off<T::TN>(kr, tid % CPR), ok ? p.dy + (base + toff) : p.dy, ok);
        }
        k += PK;
        step++;
    }
};

// --- the pipeline -----------------------------------------------------------------------------
// Per k-step: wait for the oldest stage in flight, one barrier (which also frees the stage
// computed last step), queue the loads PSTAGES - 1 steps ahead into that freed stage, then the
// mma of this stage. Wgrad's next origins are decoded before the barrier that publishes them.
template <class T, bool A_KMAJOR, bool B_KMAJOR, class L, class P>
__device__ __forceinline__ void igemm_pipe(const P& p, L& ld, uint8_t* smem, i64 m0, i64 n0, i64 kb, i64 ke) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = (warp % 2) * 64, wn = (warp / 2) * 32;
    const int steps = (int)((ke - kb + PK - 1) / PK);
    float acc[T::MI][T::NI][4];
#pragma unroll
    for (int i = 0; i < T::MI; i++)
#pragma unroll
        for (int j = 0; j < T::NI; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.f;

    ld.prepare(0, kb);
    __syncthreads();  // row contexts and the first origins
#pragma unroll
    for (int s = 0; s < PSTAGES - 1; s++) {
        if (s < steps) {
            ld.issue(smem + s * T::STAGE_BYTES, smem + s * T::STAGE_BYTES + T::A_BYTES);
            ld.prepare(s + 1, kb + (s + 1) * PK);
        }
        cp_async_commit();
        __syncthreads();  // the origins just decoded, before the next issue reads them
    }
    for (int kt = 0; kt < steps; kt++) {
        cp_async_wait<PSTAGES - 2>();
        __syncthreads();
        const int nk = kt + PSTAGES - 1;
        if (nk < steps) {
            uint8_t* st = smem + (nk % PSTAGES) * T::STAGE_BYTES;
            ld.issue(st, st + T::A_BYTES);
            ld.prepare(nk + 1, kb + (i64)(nk + 1) * PK);
        }
        cp_async_commit();
        const uint8_t* As = smem + (kt % PSTAGES) * T::STAGE_BYTES;
        const uint8_t* Bs = As + T::A_BYTES;
#pragma unroll
        for (int kk = 0; kk < PK; kk += 16) {
            uint32_t af[T::MI][4], bf[T::NI][2];
#pragma unroll
            for (int mi = 0; mi < T::MI; mi++) frag_a<A_KMAJOR, T::TM>(af[mi], As, wm + mi * 16, kk, lane);
#pragma unroll
            for (int nj = 0; nj < T::NI; nj += 2) {
                uint32_t r[4];
                frag_b2<B_KMAJOR, T::TN>(r, Bs, wn + nj * 8, kk, lane);
                bf[nj][0] = r[0], bf[nj][1] = r[1], bf[nj + 1][0] = r[2], bf[nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < T::MI; mi++)
#pragma unroll
                for (int ni = 0; ni < T::NI; ni++) mma_bf16_16816(acc[mi][ni], af[mi], bf[ni]);
        }
    }
    cp_async_wait<0>();
    store_tile<T::MI, T::NI>(p, acc, m0 + wm, n0 + wn, lane, blockIdx.z);
}

// A launch with less dynamic shared memory than the tile needs is a host bug: stop loudly.
template <class T>
__device__ __forceinline__ uint8_t* pipe_smem() {
    SEGK_DYNAMIC_SHARED(uint8_t, smem);
    if (dynamic_smem_bytes() < (unsigned)T::SMEM) __trap();
    return smem;
}

// One pass: Load<T> fills the stages; A_KMAJOR / B_KMAJOR say how the tiles lie in them.
template <class T, template <class> class Load, bool A_KMAJOR, bool B_KMAJOR, class P>
__device__ __forceinline__ void conv_pipe(const P& p, const bf16* wb) {
    uint8_t* smem = pipe_smem<T>();
    const i64 m0 = (i64)blockIdx.x * T::TM, n0 = (i64)blockIdx.y * T::TN;
    Load<T> ld(p, wb, smem + PSTAGES * T::STAGE_BYTES, m0, n0, threadIdx.x);
    igemm_pipe<T, A_KMAJOR, B_KMAJOR>(p, ld, smem, m0, n0, p.k_begin(blockIdx.z), p.k_end(blockIdx.z));
}

// One kernel per tile width and pass (build.rs and the emulator find kernels by their written names).
extern "C" __global__ void __launch_bounds__(PTile<32>::THREADS) segk_conv_fprop_pipe_n32(Fprop<bf16> p, const bf16* wb) { conv_pipe<PTile<32>, FpropLoad, true, false>(p, wb); }
extern "C" __global__ void __launch_bounds__(PTile<32>::THREADS) segk_conv_dgrad_pipe_n32(Dgrad<bf16> p, const bf16* wb) { conv_pipe<PTile<32>, DgradLoad, true, true>(p, wb); }
extern "C" __global__ void __launch_bounds__(PTile<32>::THREADS) segk_conv_wgrad_pipe_n32(Wgrad<bf16> p) { conv_pipe<PTile<32>, WgradLoad, false, false>(p, nullptr); }
extern "C" __global__ void __launch_bounds__(PTile<64>::THREADS) segk_conv_fprop_pipe_n64(Fprop<bf16> p, const bf16* wb) { conv_pipe<PTile<64>, FpropLoad, true, false>(p, wb); }
extern "C" __global__ void __launch_bounds__(PTile<64>::THREADS) segk_conv_dgrad_pipe_n64(Dgrad<bf16> p, const bf16* wb) { conv_pipe<PTile<64>, DgradLoad, true, true>(p, wb); }
extern "C" __global__ void __launch_bounds__(PTile<64>::THREADS) segk_conv_wgrad_pipe_n64(Wgrad<bf16> p) { conv_pipe<PTile<64>, WgradLoad, false, false>(p, nullptr); }
extern "C" __global__ void __launch_bounds__(PTile<128>::THREADS) segk_conv_fprop_pipe_n128(Fprop<bf16> p, const bf16* wb) { conv_pipe<PTile<128>, FpropLoad, true, false>(p, wb); }
extern "C" __global__ void __launch_bounds__(PTile<128>::THREADS) segk_conv_dgrad_pipe_n128(Dgrad<bf16> p, const bf16* wb) { conv_pipe<PTile<128>, DgradLoad, true, true>(p, wb); }
extern "C" __global__ void __launch_bounds__(PTile<128>::THREADS) segk_conv_wgrad_pipe_n128(Wgrad<bf16> p) { conv_pipe<PTile<128>, WgradLoad, false, false>(p, nullptr); }
extern "C" __global__ void __launch_bounds__(PTile<32>::THREADS) segk_convt_fprop_pipe_n32(TFprop<bf16> p, const bf16* wb) { conv_pipe<PTile<32>, TFpropLoad, true, false>(p, wb); }
extern "C" __global__ void __launch_bounds__(PTile<32>::THREADS) segk_convt_dgrad_pipe_n32(TDgrad<bf16> p, const bf16* wb) { conv_pipe<PTile<32>, TDgradLoad, true, true>(p, wb); }
extern "C" __global__ void __launch_bounds__(PTile<32>::THREADS) segk_convt_wgrad_pipe_n32(TWgrad<bf16> p) { conv_pipe<PTile<32>, TWgradLoad, false, false>(p, nullptr); }
extern "C" __global__ void __launch_bounds__(PTile<64>::THREADS) segk_convt_fprop_pipe_n64(TFprop<bf16> p, const bf16* wb) { conv_pipe<PTile<64>, TFpropLoad, true, false>(p, wb); }
extern "C" __global__ void __launch_bounds__(PTile<64>::THREADS) segk_convt_dgrad_pipe_n64(TDgrad<bf16> p, const bf16* wb) { conv_pipe<PTile<64>, TDgradLoad, true, true>(p, wb); }
extern "C" __global__ void __launch_bounds__(PTile<64>::THREADS) segk_convt_wgrad_pipe_n64(TWgrad<bf16> p) { conv_pipe<PTile<64>, TWgradLoad, false, false>(p, nullptr); }
extern "C" __global__ void __launch_bounds__(PTile<128>::THREADS) segk_convt_fprop_pipe_n128(TFprop<bf16> p, const bf16* wb) { conv_pipe<PTile<128>, TFpropLoad, true, false>(p, wb); }
extern "C" __global__ void __launch_bounds__(PTile<128>::THREADS) segk_convt_dgrad_pipe_n128(TDgrad<bf16> p, const bf16* wb) { conv_pipe<PTile<128>, TDgradLoad, true, true>(p, wb); }
extern "C" __global__ void __launch_bounds__(PTile<128>::THREADS) segk_convt_wgrad_pipe_n128(TWgrad<bf16> p) { conv_pipe<PTile<128>, TWgradLoad, false, false>(p, nullptr); }
