//! GEMM with bf16 operands and f32 accumulation on AVX512-BF16. `vdpbf16ps` multiplies two
//! bf16 pairs per f32 lane and adds both products to the lane: twice an f32 FMA's work per
//! instruction (measured 226 GFLOP/s on one Zen 4 core against 114 for f32 FMAs). Operands
//! arrive in f32 and are rounded to bf16 (nearest even) while being packed, so this computes
//! what `CpuBackend::with_bf16_operands` computes, to f32 accumulation error.
//!
//! Layout (oneDNN's "VNNI" form): A is packed row-major as u32 pairs (a[i][2p], a[i][2p+1]),
//! each pair broadcast to all lanes; B as [pairs][columns][2] bf16, so one 64-byte load holds
//! the pairs of 16 columns. The micro-kernel keeps a 12 x 32 block of C in 24 registers and
//! serves three forms: a GEMM (`gemm`, `Isa::gemm_packed`), a direct convolution whose K is
//! one segment per tap at that tap's offset into a padded input (`Isa::gemm_taps`), and sums
//! whose A has any row and pair stride and whose K runs over segments (`Isa::gemm_segments`:
//! a weight gradient over the lines of a plane).
//! AMX (tile instructions) is not used: Rust's AMX intrinsics and even its `amx-bf16`
//! feature detection are unstable (rust-lang/rust#126622), and no machine here has AMX to
//! test inline assembly on.

/// True when this CPU runs the bf16 kernels (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512bf16") && std::arch::is_x86_feature_detected!("avx512bw") && std::arch::is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Proof that this CPU has AVX512-BF16: the safe entry points take it.
#[derive(Clone, Copy, Debug)]
pub struct Isa(());

/// The instructions, where this CPU has them.
pub fn isa() -> Option<Isa> {
    available().then_some(Isa(()))
}

/// B [k x n] packed once for many products: pairs of rows interleaved, columns padded to 32.
/// Held as u32 (one bf16 pair each) so that it can be read as either width, aligned.
pub struct PackedB {
    pairs: usize,
    n: usize,
    npad: usize,
    data: Vec<u32>,
}

impl PackedB {
    pub fn pairs(&self) -> usize {
        self.pairs
    }

    /// The packed matrix's columns as rows of bf16 pairs ([n x pairs] u32): its transpose as
    /// the A operand of `gemm_packed`.
    pub fn columns_as_rows(&self) -> Vec<u32> {
        let mut out = vec![0u32; self.n * self.pairs];
        for (c, row) in out.chunks_exact_mut(self.pairs.max(1)).enumerate().take(self.n) {
            row.iter_mut().enumerate().for_each(|(q, v)| *v = self.data[q * self.npad + c]);
        }
        out
    }
}

impl Isa {
    /// `src` rounded to bf16 (nearest even) into `dst` (as long).
    pub fn round(self, src: &[f32], dst: &mut [u16]) {
        assert_eq!(src.len(), dst.len(), "bf16 round");
        // SAFETY: self proves the instructions; lengths checked.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            imp::round_run(src.as_ptr(), src.len(), dst.as_mut_ptr())
        }
    }

    /// B [k x n] (row-major f32, row stride `rsb`) packed for `gemm_packed`.
    pub fn pack(self, k: usize, n: usize, b: &[f32], rsb: usize) -> PackedB {
        assert!(k == 0 || n == 0 || b.len() >= (k - 1) * rsb + n, "bf16 pack of {k} x {n} from {} values", b.len());
        let (pairs, npad) = (k.div_ceil(2), n.next_multiple_of(32));
        let mut data = vec![0u32; pairs * npad];
        if pairs * npad > 0 {
            // Deep layers' weights are millions of values: packed on every thread.
            use rayon::prelude::*;
            let per = pairs.div_ceil(4 * rayon::current_num_threads()).max(64);
            data.par_chunks_mut(per * npad).enumerate().for_each(|(i, out)| {
                let (p0, kc) = (i * per, out.len() / npad);
                // SAFETY: self proves the instructions; b addresses k rows of n at stride
                // rsb; each chunk packs its own pairs.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    imp::pack_b(b.as_ptr(), rsb as isize, 1, k, n, p0, kc, npad, bytemuck::cast_slice_mut(out))
                };
            });
        }
        PackedB { pairs, n, npad, data }
    }

    /// C[m x n] = sum over taps t of A_t B_t + beta C, where row i of A_t is the `pairs / taps`
    /// u32 pairs at a[base + i * lda + taps[t]] and B_t the t-th run of that many pairs of `b`:
    /// a direct convolution over a padded bf16 input, with no im2col. C row-major at `rsc`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_taps(self, m: usize, a: &[u32], base: usize, taps: &[usize], lda: usize, b: &PackedB, beta: f32, c: &mut [f32], rsc: usize) {
        if m == 0 || taps.is_empty() {
            return;
        }
        let seg = b.pairs / taps.len();
        assert_eq!(seg * taps.len(), b.pairs, "bf16 taps: {} pairs over {} taps", b.pairs, taps.len());
        let last = base + (m - 1) * lda + taps.iter().max().unwrap() + seg;
        assert!(last <= a.len(), "bf16 taps: A of {} values, rows reach {last}", a.len());
        assert!(c.len() >= (m - 1) * rsc + b.n && rsc >= b.n, "bf16 taps: C of {} for {m} rows of {}", c.len(), b.n);
        // SAFETY: self proves the instructions; bounds checked above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            imp::gemm_taps(m, a.as_ptr().add(base), taps, seg, lda, b, beta, c.as_mut_ptr(), rsc as isize)
        }
    }

    /// Columns padded to hold `n`: what `pack_rows` pads to and `gemm_segments` reads.
    pub fn padded(n: usize) -> usize {
        n.next_multiple_of(32)
    }

    /// Rows of `src` ([rows x n] f32, row-major) rounded and packed in pairs into `dst`
    /// ([ceil(rows / 2)][padded(n)][2] bf16: consecutive rows interleaved column by column, a
    /// missing odd row and the padding columns zero).
    pub fn pack_rows(self, src: &[f32], rows: usize, n: usize, dst: &mut [u16]) {
        let npad = Self::padded(n);
        assert!(src.len() >= rows * n, "bf16 pack_rows: {} values for {rows} x {n}", src.len());
        assert_eq!(dst.len(), rows.div_ceil(2) * npad * 2, "bf16 pack_rows destination");
        if rows == 0 {
            return;
        }
        // SAFETY: self proves the instructions; sizes checked.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            imp::pack_b(src.as_ptr(), n as isize, 1, rows, n, 0, rows.div_ceil(2), npad, dst)
        }
    }

    /// C[m x n] = sum over segments s of A_s B_s + beta C, where A_s[i][p] is the u32 pair at
    /// a[segs[s] + i * rs + p * ps] and B_s the s-th run of `kc` pairs of `b` (as `pack_rows`
    /// writes it for `n` columns). C row-major at `rsc`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_segments(self, m: usize, a: &[u32], segs: &[usize], rs: usize, ps: usize, kc: usize, b: &[u16], n: usize, beta: f32, c: &mut [f32], rsc: usize) {
        if m == 0 || n == 0 || segs.is_empty() {
            return;
        }
        let npad = Self::padded(n);
        let last = segs.iter().max().unwrap() + (m - 1) * rs + kc.saturating_sub(1) * ps + 1;
        assert!(kc == 0 || last <= a.len(), "bf16 segments: A of {} values, rows reach {last}", a.len());
        assert!(b.len() >= segs.len() * kc * npad * 2, "bf16 segments: B of {} for {} x {kc} pairs", b.len(), segs.len());
        assert!(c.len() >= (m - 1) * rsc + n && rsc >= n, "bf16 segments: C of {} for {m} rows of {n}", c.len());
        // SAFETY: self proves the instructions; bounds checked above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            imp::gemm_segments(m, a.as_ptr(), segs, rs, ps, kc, b.as_ptr(), n, npad, beta, c.as_mut_ptr(), rsc as isize)
        }
    }

    /// C[m x n] = A B + beta C: A row-major bf16 pairs ([m x pairs] u32 at row stride `lda`,
    /// as `round` writes rows of 2 * pairs values), C row-major f32 at row stride `rsc`.
    pub fn gemm_packed(self, m: usize, a: &[u32], lda: usize, b: &PackedB, beta: f32, c: &mut [f32], rsc: usize) {
        assert!(m == 0 || (a.len() >= (m - 1) * lda + b.pairs && lda >= b.pairs), "bf16 gemm: A of {} for {m} rows of {} pairs", a.len(), b.pairs);
        assert!(m == 0 || (c.len() >= (m - 1) * rsc + b.n && rsc >= b.n), "bf16 gemm: C of {} for {m} rows of {}", c.len(), b.n);
        // SAFETY: self proves the instructions; bounds checked above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            imp::gemm_packed(m, a.as_ptr(), lda, b, beta, c.as_mut_ptr(), rsc as isize)
        }
    }
}

/// C[m x n] = A B + beta C, with A [m x k] and B [k x n] in f32 at any strides and C
/// row-major with row stride `rsc`; beta 0 never reads C. Single-threaded: callers split C.
///
/// # Safety
/// `available()` must be true; the pointers must address the matrices their strides describe.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(m: usize, k: usize, n: usize, a: *const f32, rsa: isize, csa: isize, b: *const f32, rsb: isize, csb: isize, beta: f32, c: *mut f32, rsc: isize) {
    debug_assert!(available());
    imp::gemm(m, k, n, a, rsa, csa, b, rsb, csb, beta, c, rsc)
}

/// Never called where `available()` is false.
///
/// # Safety
/// Unreachable: `available()` is false on this architecture.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(_m: usize, _k: usize, _n: usize, _a: *const f32, _rsa: isize, _csa: isize, _b: *const f32, _rsb: isize, _csb: isize, _beta: f32, _c: *mut f32, _rsc: isize) {
    unreachable!("bf16 GEMM without AVX512-BF16")
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// Rows and columns of C per micro-kernel call (24 accumulators of 32 registers).
    const MR: usize = 12;
    const NR: usize = 32;
    /// Pairs of k per packed block: B's micro-panel (KC x NR bf16 pairs, 32 KiB) stays in L2
    /// next to A's block, A's micro-panel (MR x KC) in L1.
    const KC: usize = 256;
    /// Rows of A packed at once (128 KiB).
    const MC: usize = 128;

    thread_local! {
        /// Packed A (u32 pairs) and B (bf16) of the calling thread, reused across calls.
        static PACKS: RefCell<(Vec<u32>, Vec<u16>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(m: usize, k: usize, n: usize, a: *const f32, rsa: isize, csa: isize, b: *const f32, rsb: isize, csb: isize, beta: f32, c: *mut f32, rsc: isize) {
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            for i in 0..m {
                let row = std::slice::from_raw_parts_mut(c.offset(i as isize * rsc), n);
                row.iter_mut().for_each(|v| *v = if beta == 0.0 { 0.0 } else { beta * *v });
            }
            return;
        }
        let k2 = k.div_ceil(2);
        let npad = n.next_multiple_of(NR);
        PACKS.with_borrow_mut(|(pa, pb)| {
            for p0 in (0..k2).step_by(KC) {
                let kc = KC.min(k2 - p0);
                pb.resize(kc * npad * 2, 0);
                pack_b(b, rsb, csb, k, n, p0, kc, npad, pb);
                let beta = if p0 == 0 { beta } else { 1.0 };
                for i0 in (0..m).step_by(MC) {
                    let mc = MC.min(m - i0);
                    pa.resize(mc * kc, 0);
                    pack_a(a.offset(i0 as isize * rsa), rsa, csa, k, mc, p0, kc, pa);
                    block(mc, kc, pa.as_ptr(), kc, pb.as_ptr(), npad, n, beta, c.offset(i0 as isize * rsc), rsc);
                }
            }
        });
    }

    /// `gemm` on A already rounded (row-major pairs) and B already packed.
    pub(super) unsafe fn gemm_packed(m: usize, a: *const u32, lda: usize, b: &super::PackedB, beta: f32, c: *mut f32, rsc: isize) {
        if m == 0 || b.n == 0 {
            return;
        }
        for p0 in (0..b.pairs).step_by(KC) {
            let kc = KC.min(b.pairs - p0);
            let beta = if p0 == 0 { beta } else { 1.0 };
            for i0 in (0..m).step_by(MC) {
                block(MC.min(m - i0), kc, a.add(i0 * lda + p0), lda, (b.data.as_ptr() as *const u16).add(p0 * b.npad * 2), b.npad, b.n, beta, c.offset(i0 as isize * rsc), rsc);
            }
        }
    }

    /// C[m x n] (= or +=) the sum over taps t of A_t B_t, A_t's rows at a + taps[t] + i * lda
    /// (`seg` pairs each), B_t pairs t * seg.. of the packed B; every micro-kernel of it.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    pub(super) unsafe fn gemm_taps(m: usize, a: *const u32, taps: &[usize], seg: usize, lda: usize, b: &super::PackedB, beta: f32, c: *mut f32, rsc: isize) {
        for j0 in (0..b.n).step_by(NR) {
            for ir in (0..m).step_by(MR) {
                let cp = c.offset(ir as isize * rsc + j0 as isize);
                micro(MR.min(m - ir), taps, seg, a.add(ir * lda), lda, 1, (b.data.as_ptr() as *const u16).add(j0 * 2), b.npad * 2, cp, rsc, NR.min(b.n - j0), beta);
            }
        }
    }

    /// C[m x n] (= or +=) the sum over segments s of A_s B_s: A_s[i][p] the u32 pair at
    /// a + segs[s] + i * rs + p * ps, B_s the s-th run of kc pairs of b (VNNI, npad columns).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    pub(super) unsafe fn gemm_segments(m: usize, a: *const u32, segs: &[usize], rs: usize, ps: usize, kc: usize, b: *const u16, n: usize, npad: usize, beta: f32, c: *mut f32, rsc: isize) {
        for j0 in (0..n).step_by(NR) {
            for ir in (0..m).step_by(MR) {
                let cp = c.offset(ir as isize * rsc + j0 as isize);
                micro(MR.min(m - ir), segs, kc, a.add(ir * rs), rs, ps, b.add(j0 * 2), npad * 2, cp, rsc, NR.min(n - j0), beta);
            }
        }
    }

    /// C[mc x n] (= or +=) A[mc x kc pairs] B[kc pairs x npad]: every micro-kernel of a block.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    unsafe fn block(mc: usize, kc: usize, a: *const u32, lda: usize, b: *const u16, npad: usize, n: usize, beta: f32, c: *mut f32, rsc: isize) {
        for j0 in (0..n).step_by(NR) {
            for ir in (0..mc).step_by(MR) {
                let cp = c.offset(ir as isize * rsc + j0 as isize);
                micro(MR.min(mc - ir), &[0], kc, a.add(ir * lda), lda, 1, b.add(j0 * 2), npad * 2, cp, rsc, NR.min(n - j0), beta);
            }
        }
    }

    /// Dispatches the micro-kernel by the number of rows left (the last block of A).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    unsafe fn micro(mr: usize, segs: &[usize], kc: usize, a: *const u32, lda: usize, ps: usize, b: *const u16, ldb: usize, c: *mut f32, rsc: isize, ncols: usize, beta: f32) {
        macro_rules! rows {
            ($($r:literal)*) => {
                match mr {
                    $($r => kernel::<$r>(segs, kc, a, lda, ps, b, ldb, c, rsc, ncols, beta),)*
                    _ => unreachable!("{mr} rows"),
                }
            };
        }
        rows!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    /// C[R x ncols] (= or +=) A[R x K] B[K x 32]: B one VNNI micro-panel (row stride `ldb`
    /// bf16), C masked to `ncols`. K is `segs.len()` segments of `kc` pairs; segment s of row
    /// i is the `kc` u32 pairs at a + segs[s] + i * lda + p * ps (one segment at 0 and ps 1 for
    /// a GEMM; for a direct convolution, one per tap at that tap's offset in the padded input;
    /// for its weight gradient, one per output line, rows the channels, ps the pair stride).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    unsafe fn kernel<const R: usize>(segs: &[usize], kc: usize, a: *const u32, lda: usize, ps: usize, b: *const u16, ldb: usize, c: *mut f32, rsc: isize, ncols: usize, beta: f32) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for (s, &off) in segs.iter().enumerate() {
            let (a, b) = (a.add(off), b.add(s * kc * ldb));
            for p in 0..kc {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * ldb) as *const _));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * ldb + 32) as *const _));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(i * lda + p * ps) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], ai, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], ai, b1);
                }
            }
        }
        let masks = [lanes(ncols), lanes(ncols.saturating_sub(16))];
        for (i, acc) in acc.iter().enumerate() {
            let row = c.offset(i as isize * rsc);
            for h in 0..2 {
                let dst = row.add(16 * h);
                let mut v = acc[h];
                if beta != 0.0 {
                    v = _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(masks[h], dst), v);
                }
                _mm512_mask_storeu_ps(dst, masks[h], v);
            }
        }
    }

    /// The first `n` (at most 16) of 16 lanes.
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// Rows 0..mc, pairs p0..p0+kc of A into `dst` as row-major u32 pairs; a missing
    /// element (odd k) is zero.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    unsafe fn pack_a(a: *const f32, rsa: isize, csa: isize, k: usize, mc: usize, p0: usize, kc: usize, dst: &mut [u32]) {
        let (k0, k1) = (2 * p0, (2 * (p0 + kc)).min(k));
        for (i, out) in dst.chunks_exact_mut(kc).take(mc).enumerate() {
            let row = a.offset(i as isize * rsa);
            if csa == 1 {
                let out16 = out.as_mut_ptr() as *mut u16;
                round_run(row.add(k0), k1 - k0, out16);
                if (k1 - k0) % 2 == 1 {
                    *out16.add(k1 - k0) = 0;
                }
            } else {
                for (p, o) in out.iter_mut().enumerate() {
                    let (e0, e1) = (k0 + 2 * p, k0 + 2 * p + 1);
                    let lo = bits(*row.offset(e0 as isize * csa));
                    let hi = if e1 < k1 { bits(*row.offset(e1 as isize * csa)) } else { 0 };
                    *o = lo as u32 | (hi as u32) << 16;
                }
            }
        }
    }

    /// Pairs p0..p0+kc of B's rows into `dst` as [kc][npad][2] bf16: the two rows of a pair
    /// interleaved column by column; columns n..npad and a missing odd row are zero.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    pub(super) unsafe fn pack_b(b: *const f32, rsb: isize, csb: isize, k: usize, n: usize, p0: usize, kc: usize, npad: usize, dst: &mut [u16]) {
        // Lane 2j takes bf16 j of the first row, lane 2j+1 bf16 j of the second.
        let zip = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        for q in 0..kc {
            let (e0, e1) = (2 * (p0 + q), 2 * (p0 + q) + 1);
            let r0 = b.offset(e0 as isize * rsb);
            let r1 = (e1 < k).then(|| b.offset(e1 as isize * rsb));
            let out = dst.as_mut_ptr().add(q * npad * 2);
            if csb == 1 {
                for j0 in (0..npad).step_by(16) {
                    let m = lanes(n.saturating_sub(j0));
                    let lo = _mm512_maskz_loadu_ps(m, r0.add(j0));
                    let hi = r1.map_or(_mm512_setzero_ps(), |r1| _mm512_maskz_loadu_ps(m, r1.add(j0)));
                    let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                    _mm512_storeu_si512(out.add(2 * j0) as *mut _, _mm512_permutexvar_epi16(zip, both));
                }
            } else {
                for j in 0..npad {
                    let (lo, hi) = if j < n {
                        let at = j as isize * csb;
                        (bits(*r0.offset(at)), r1.map_or(0, |r1| bits(*r1.offset(at))))
                    } else {
                        (0, 0)
                    };
                    *out.add(2 * j) = lo;
                    *out.add(2 * j + 1) = hi;
                }
            }
        }
    }

    /// `len` contiguous f32 rounded to bf16 into `dst`, 32 at a time (the vector
    /// conversion rounds to nearest even, as `bits` does).
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    pub(super) unsafe fn round_run(src: *const f32, len: usize, dst: *mut u16) {
        for j0 in (0..len).step_by(32) {
            let left = len - j0;
            let (m0, m1) = (lanes(left), lanes(left.saturating_sub(16)));
            let lo = _mm512_maskz_loadu_ps(m0, src.add(j0));
            let hi = _mm512_maskz_loadu_ps(m1, src.add(j0 + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            let m = if left >= 32 { u32::MAX } else { (1u32 << left) - 1 };
            _mm512_mask_storeu_epi16(dst.add(j0) as *mut _, m, v);
        }
    }

    /// The bf16 nearest to `v` (ties to even), as bits.
    fn bits(v: f32) -> u16 {
        half::bf16::from_f32(v).to_bits()
    }
}
