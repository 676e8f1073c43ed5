//! 3D convolution on the CPU: forward, data gradient and weight gradient as tiled
//! implicit GEMMs. A tile of im2col rows is built per task (in L2) and multiplied by the
//! weight matrix [taps*cin x cout]; no task writes rows another task writes.

use super::{as_f32, as_f32_mut, axpby, bf16, bf16_isa, chunk_rows, gemm_rm, mm, threads, Float, Operands, SyncPtr};
use crate::backend::ConvGeom;
use crate::tensor::Dims;
use rayon::prelude::*;

/// Rows per im2col tile: about 1 MiB of tile, enough rows to amortise packing B.
fn tile_rows(m: usize, k: usize) -> usize {
    chunk_rows(m, 2, 16, ((1usize << 18) / k.max(1)).clamp(64, 512))
}

fn is_pointwise(g: &ConvGeom) -> bool {
    g.taps() == 1 && g.stride == [1, 1, 1]
}

/// Writes im2col rows r0.. of the forward conv into `tile` ([rows x row_len], the first
/// taps*cin of each row, zeros after them and for padding), each run of `cin` channels
/// through `put` (a copy, or rounding to bf16).
#[allow(clippy::too_many_arguments)]
fn im2col<T: Float, E: Copy>(x: &[T], xd: Dims, g: &ConvGeom, yd: Dims, r0: usize, row_len: usize, tile: &mut [E], zero: E, put: impl Fn(&[T], &mut [E])) {
    let cin = g.cin;
    let [kd, kh, kw] = g.kernel;
    let [sd, sh, sw] = g.stride;
    let p = g.pad();
    for (i, row) in tile.chunks_exact_mut(row_len).enumerate() {
        let [b, oz, oy, ox] = yd.unravel(r0 + i);
        let mut col = 0;
        for a in 0..kd {
            let iz = (oz * sd + a).wrapping_sub(p[0]);
            for bb in 0..kh {
                let iy = (oy * sh + bb).wrapping_sub(p[1]);
                for c in 0..kw {
                    let ix = (ox * sw + c).wrapping_sub(p[2]);
                    let dst = &mut row[col..col + cin];
                    if iz < xd.d && iy < xd.h && ix < xd.w {
                        let src = xd.ravel(b, iz, iy, ix) * cin;
                        put(&x[src..src + cin], dst);
                    } else {
                        dst.fill(zero);
                    }
                    col += cin;
                }
            }
        }
        row[col..].fill(zero);
    }
}

/// Whether `conv_direct_bf16` beats im2col: channels that pair up, stride 1 (a strided conv
/// would copy 8x the voxels it reads per output), and output lines of at least 8 voxels
/// (the micro-kernel takes 12 at a time; measured on nnU-Net's 5-stage net: 266 -> 323
/// GFLOP/s at 80 voxels per line, 382 -> 410 at 10, 288 -> 266 at 5).
fn direct_pays(cin: usize, stride: [usize; 3], out: Dims) -> bool {
    cin % 2 == 0 && stride == [1, 1, 1] && out.w >= 8
}

/// Every tap of a kernel in weight order (z, y, x), each mapped through `f`.
fn tap_offsets(kernel: [usize; 3], f: impl Fn([usize; 3]) -> [usize; 3]) -> Vec<[usize; 3]> {
    let mut v = Vec::with_capacity(kernel.iter().product());
    for a in 0..kernel[0] {
        for b in 0..kernel[1] {
            for c in 0..kernel[2] {
                v.push(f([a, b, c]));
            }
        }
    }
    v
}

fn copy<T: Copy>(src: &[T], dst: &mut [T]) {
    dst.copy_from_slice(src)
}

/// y = conv(x, w) + b.
pub fn conv_fwd<T: Float>(x: &[T], xd: Dims, w: &[T], b: &[T], y: &mut [T], g: &ConvGeom, ops: Operands) {
    let ops = ops.for_layer(g.cin, g.cout);
    let yd = g.out_dims(xd);
    assert_eq!(x.len(), xd.len(), "conv input");
    assert_eq!(y.len(), yd.len(), "conv output");
    assert_eq!(w.len(), g.weight_len(), "conv weight");
    assert_eq!(b.len(), g.cout, "conv bias");
    if let Some(isa) = bf16_isa::<T>(ops) {
        return conv_fwd_bf16(isa, as_f32(x), xd, as_f32(w), as_f32(b), as_f32_mut(y), g);
    }
    let (m, k, n) = (yd.rows(), g.taps() * g.cin, g.cout);
    let rows = tile_rows(m, k);
    let pointwise = is_pointwise(g);
    y.par_chunks_mut(rows * n).enumerate().for_each_init(Vec::new, |tile, (ci, yc)| {
        let (r0, nr) = (ci * rows, yc.len() / n);
        for row in yc.chunks_exact_mut(n) {
            row.copy_from_slice(b);
        }
        let a: &[T] = if pointwise {
            &x[r0 * k..(r0 + nr) * k]
        } else {
            tile.resize(nr * k, T::ZERO);
            im2col(x, xd, g, yd, r0, k, &mut tile[..nr * k], T::ZERO, copy);
            &tile[..nr * k]
        };
        gemm_rm(ops, nr, k, n, a, w, T::ONE, yc);
    });
}

/// conv_fwd with bf16 products, the weights packed once: direct from a padded bf16 copy of
/// the input where that pays (`direct_pays`), else through im2col tiles written straight in
/// bf16.
fn conv_fwd_bf16(isa: bf16::Isa, x: &[f32], xd: Dims, w: &[f32], b: &[f32], y: &mut [f32], g: &ConvGeom) {
    let yd = g.out_dims(xd);
    let (m, k, n) = (yd.rows(), g.taps() * g.cin, g.cout);
    let wp = isa.pack(k, n, w, n);
    if direct_pays(g.cin, g.stride, yd) {
        y.par_chunks_mut(n).for_each(|row| row.copy_from_slice(b));
        let offsets = tap_offsets(g.kernel, |t| t);
        return conv_direct_bf16(isa, x, xd, g.pad(), &offsets, g.stride, &wp, y, yd, 1.0);
    }
    let pairs = wp.pairs();
    let rows = tile_rows(m, k);
    y.par_chunks_mut(rows * n).enumerate().for_each_init(Vec::<u32>::new, |tile, (ci, yc)| {
        let (r0, nr) = (ci * rows, yc.len() / n);
        for row in yc.chunks_exact_mut(n) {
            row.copy_from_slice(b);
        }
        tile.resize(nr * pairs, 0);
        let t16: &mut [u16] = bytemuck::cast_slice_mut(&mut tile[..]);
        im2col(x, xd, g, yd, r0, 2 * pairs, t16, 0, |s, d| isa.round(s, d));
        isa.gemm_packed(nr, tile, pairs, &wp, 1.0, yc, n);
    });
}

/// out = conv(src) + beta * out in bf16 with no im2col: `src` ([n, d, h, w, c], c even)
/// rounded into bf16 planes padded by `pad` with zeros, then each output line's runs of voxels
/// multiplied tap by tap straight from them. Output voxel (z, y, x) reads the padded voxel
/// (z*s + o) for each tap's offset o, in the order of the packed weights' taps. Threads take
/// slabs of at most 8 output planes and copy only the input planes those read (a few MiB
/// each, where a copy of the whole input would be hundreds of MiB beside the arenas).
#[allow(clippy::too_many_arguments)]
fn conv_direct_bf16(isa: bf16::Isa, src: &[f32], sd: Dims, pad: [usize; 3], offsets: &[[usize; 3]], stride: [usize; 3], wp: &bf16::PackedB, out: &mut [f32], od: Dims, beta: f32) {
    let c2 = sd.c / 2;
    let pd = [sd.d + 2 * pad[0], sd.h + 2 * pad[1], sd.w + 2 * pad[2]];
    let line = pd[2] * c2;
    let taps: Vec<usize> = offsets.iter().map(|o| ((o[0] * pd[1] + o[1]) * pd[2] + o[2]) * c2).collect();
    let reach = offsets.iter().map(|o| o[0]).max().unwrap_or(0) + 1;
    let per_sample = (4 * threads()).div_ceil(od.n).max(1);
    let depth = od.d.div_ceil(per_sample).clamp(1, 8);
    let slabs: Vec<(usize, usize, usize)> = (0..od.n).flat_map(|b| (0..od.d).step_by(depth).map(move |z0| (b, z0, (z0 + depth).min(od.d)))).collect();
    let plane_out = od.h * od.w * od.c;
    let outp = SyncPtr(out.as_mut_ptr());
    slabs.par_iter().for_each_init(Vec::<u32>::new, |xp, &(b, z0, z1)| {
        let zp0 = z0 * stride[0];
        let planes = (z1 - 1 - z0) * stride[0] + reach;
        xp.clear();
        xp.resize(planes * pd[1] * line, 0);
        for (zl, plane) in xp.chunks_exact_mut(pd[1] * line).enumerate() {
            let Some(z) = (zp0 + zl).checked_sub(pad[0]).filter(|&z| z < sd.d) else { continue };
            for y in 0..sd.h {
                let at = (y + pad[1]) * line + pad[2] * c2;
                let from = sd.ravel(b, z, y, 0) * sd.c;
                isa.round(&src[from..from + sd.w * sd.c], bytemuck::cast_slice_mut(&mut plane[at..at + sd.w * c2]));
            }
        }
        // SAFETY: the slab's output planes are contiguous and no other slab's.
        let slab = unsafe { outp.rows((b * od.d + z0) * plane_out, (z1 - z0) * plane_out) };
        for (li, yline) in slab.chunks_exact_mut(od.w * od.c).enumerate() {
            let (zl, oy) = (li / od.h, li % od.h);
            let base = (zl * stride[0] * pd[1] + oy * stride[1]) * line;
            isa.gemm_taps(od.w, xp, base, &taps, stride[2] * c2, wp, beta, yline, od.c);
        }
    });
}

/// The input voxels whose coordinate along each axis is `residue` mod stride, and the
/// kernel taps that reach them: for stride 2 a 3-tap kernel touches even voxels with one
/// tap and odd voxels with two, so dgrad does exactly the forward's work, no zeros.
pub struct ParityClass {
    pub residue: [usize; 3],
    pub counts: [usize; 3],
    pub taps: [Vec<usize>; 3],
}

impl ParityClass {
    pub fn all(g: &ConvGeom, xd: Dims) -> Vec<ParityClass> {
        let (s, p, k, sp) = (g.stride, g.pad(), g.kernel, xd.spatial());
        let mut out = Vec::new();
        for rd in 0..s[0] {
            for rh in 0..s[1] {
                for rw in 0..s[2] {
                    let residue = [rd, rh, rw];
                    let counts = std::array::from_fn(|a| sp[a].saturating_sub(residue[a]).div_ceil(s[a]));
                    let taps = std::array::from_fn(|a| {
                        (0..k[a]).filter(|&t| (residue[a] + p[a] + s[a] * k[a] - t).is_multiple_of(s[a])).collect()
                    });
                    out.push(ParityClass { residue, counts, taps });
                }
            }
        }
        out
    }
    pub fn rows(&self, n: usize) -> usize {
        n * self.counts.iter().product::<usize>()
    }
    fn ntaps(&self) -> usize {
        self.taps.iter().map(Vec::len).product()
    }
    /// Class row -> (sample, z, y, x) of the input voxel.
    fn voxel(&self, q: usize, s: [usize; 3]) -> [usize; 4] {
        let [cd, ch, cw] = self.counts;
        let (ix, t) = (q % cw, q / cw);
        let (iy, t) = (t % ch, t / ch);
        let (iz, b) = (t % cd, t / cd);
        [b, self.residue[0] + iz * s[0], self.residue[1] + iy * s[1], self.residue[2] + ix * s[2]]
    }
    /// Tap indices (into the full kernel) of this class, in tile column order.
    fn tap_list(&self) -> Vec<[usize; 3]> {
        let mut v = Vec::new();
        for &a in &self.taps[0] {
            for &b in &self.taps[1] {
                for &c in &self.taps[2] {
                    v.push([a, b, c]);
                }
            }
        }
        v
    }
}

/// Writes the dgrad tile of class rows q0.. into `tile` ([rows x row_len]): per tap, the
/// `cout` values of dy at the output voxel that tap connects to the row's input voxel (zeros
/// where none), through `put`; zeros after the taps.
#[allow(clippy::too_many_arguments)]
fn gather_dy<T: Float, E: Copy>(dy: &[T], yd: Dims, g: &ConvGeom, class: &ParityClass, taps: &[[usize; 3]], q0: usize, row_len: usize, tile: &mut [E], zero: E, put: impl Fn(&[T], &mut [E])) {
    let (cout, s, p) = (g.cout, g.stride, g.pad());
    for (i, trow) in tile.chunks_exact_mut(row_len).enumerate() {
        let [b, z, y, x] = class.voxel(q0 + i, s);
        for (t, tap) in taps.iter().enumerate() {
            let dst = &mut trow[t * cout..(t + 1) * cout];
            // Output voxel o with o*s - p + tap = input voxel (exact by class).
            let o = [(z + p[0]).wrapping_sub(tap[0]), (y + p[1]).wrapping_sub(tap[1]), (x + p[2]).wrapping_sub(tap[2])];
            let o = [o[0] / s[0], o[1] / s[1], o[2] / s[2]];
            let inside = (z + p[0]) >= tap[0] && (y + p[1]) >= tap[1] && (x + p[2]) >= tap[2];
            if inside && o[0] < yd.d && o[1] < yd.h && o[2] < yd.w {
                let src = yd.ravel(b, o[0], o[1], o[2]) * cout;
                put(&dy[src..src + cout], dst);
            } else {
                dst.fill(zero);
            }
        }
        trow[taps.len() * cout..].fill(zero);
    }
}

/// dx (= or +=) conv_dgrad(dy, w): beta 0 overwrites dx, beta 1 adds.
pub fn conv_dgrad<T: Float>(dy: &[T], w: &[T], dx: &mut [T], xd: Dims, g: &ConvGeom, beta: T, ops: Operands) {
    let ops = ops.for_layer(g.cin, g.cout);
    let yd = g.out_dims(xd);
    assert_eq!(dy.len(), yd.len(), "dgrad dy");
    assert_eq!(dx.len(), xd.len(), "dgrad dx");
    assert_eq!(w.len(), g.weight_len(), "dgrad weight");
    let (cin, cout, s, k) = (g.cin, g.cout, g.stride, g.kernel);
    let dxp = SyncPtr(dx.as_mut_ptr());
    let direct = s == [1, 1, 1];
    for class in ParityClass::all(g, xd) {
        let m = class.rows(xd.n);
        if m == 0 {
            continue;
        }
        let taps = class.tap_list();
        let kc = taps.len() * cout;
        // B = [taps*cout x cin], the weight transposed per tap.
        let mut bm = vec![T::ZERO; kc * cin];
        for (t, tap) in taps.iter().enumerate() {
            let tap = (tap[0] * k[1] + tap[1]) * k[2] + tap[2];
            for ci in 0..cin {
                for co in 0..cout {
                    bm[(t * cout + co) * cin + ci] = w[(tap * cin + ci) * cout + co];
                }
            }
        }
        let isa = bf16_isa::<T>(ops);
        let packed = isa.map(|isa| isa.pack(kc, cin, as_f32(&bm), cin));
        if let (Some(isa), Some(bp)) = (isa, &packed) {
            if direct && direct_pays(cout, s, xd) {
                // Stride 1: dx is the convolution of dy with the kernel flipped, over dy padded
                // alike; tap t reads dy at padded offset 2 * pad - t.
                let p = g.pad();
                let offsets: Vec<[usize; 3]> = taps.iter().map(|t| [2 * p[0] - t[0], 2 * p[1] - t[1], 2 * p[2] - t[2]]).collect();
                return conv_direct_bf16(isa, as_f32(dy), yd, p, &offsets, [1, 1, 1], bp, as_f32_mut(dx), xd, beta.to_f64() as f32);
            }
        }
        let rows = tile_rows(m, kc.max(1));
        (0..m.div_ceil(rows)).into_par_iter().for_each_init(
            || (Vec::new(), Vec::<u32>::new(), Vec::new()),
            |(tile, tile16, out), ci| {
                let (q0, nr) = (ci * rows, rows.min(m - ci * rows));
                if class.ntaps() == 0 {
                    for q in q0..q0 + nr {
                        let [b, z, y, x] = class.voxel(q, s);
                        let row = xd.ravel(b, z, y, x) * cin;
                        // SAFETY: each class row is one input voxel, owned by this task.
                        let d = unsafe { dxp.rows(row, cin) };
                        d.iter_mut().for_each(|v| axpby(v, beta, T::ZERO));
                    }
                    return;
                }
                if let (Some(isa), Some(bp)) = (isa, &packed) {
                    // bf16: the tile rounded as it is gathered, the product into f32 rows.
                    let pairs = bp.pairs();
                    tile16.resize(nr * pairs, 0);
                    gather_dy(dy, yd, g, &class, &taps, q0, 2 * pairs, bytemuck::cast_slice_mut(&mut tile16[..]), 0u16, |s, d| isa.round(as_f32(s), d));
                    let beta32 = beta.to_f64() as f32;
                    if direct {
                        // SAFETY: rows q0..q0+nr belong to this task.
                        let d = unsafe { dxp.rows(q0 * cin, nr * cin) };
                        isa.gemm_packed(nr, tile16, pairs, bp, beta32, as_f32_mut(d), cin);
                        return;
                    }
                    out.resize(nr * cin, T::ZERO);
                    isa.gemm_packed(nr, tile16, pairs, bp, 0.0, as_f32_mut(out), cin);
                } else {
                    tile.resize(nr * kc, T::ZERO);
                    gather_dy(dy, yd, g, &class, &taps, q0, kc, tile, T::ZERO, copy);
                    if direct {
                        // Class rows are the input rows in order: write straight into dx.
                        // SAFETY: rows q0..q0+nr belong to this task.
                        let d = unsafe { dxp.rows(q0 * cin, nr * cin) };
                        gemm_rm(ops, nr, kc, cin, tile, &bm, beta, d);
                        return;
                    }
                    out.resize(nr * cin, T::ZERO);
                    gemm_rm(ops, nr, kc, cin, tile, &bm, T::ZERO, out);
                }
                for (i, orow) in out.chunks_exact(cin).enumerate() {
                    let [b, z, y, x] = class.voxel(q0 + i, s);
                    // SAFETY: each class row is one input voxel, owned by this task.
                    let d = unsafe { dxp.rows(xd.ravel(b, z, y, x) * cin, cin) };
                    d.iter_mut().zip(orow).for_each(|(d, &o)| axpby(d, beta, o));
                }
            },
        );
    }
}

/// dw = im2col(x)^T dy, db = column sums of dy. Split-K over output rows: one partial per
/// thread, summed at the end in a fixed order (deterministic for a given thread count).
/// In bf16 each partial is dw transposed (dy^T im2col(x)), so that the packed operand with
/// the long rows, the im2col tile, is read row by row; it is transposed back at the end.
pub fn conv_wgrad<T: Float>(x: &[T], xd: Dims, dy: &[T], dw: &mut [T], db: &mut [T], g: &ConvGeom, ops: Operands) {
    let ops = ops.for_layer(g.cin, g.cout);
    let yd = g.out_dims(xd);
    assert_eq!(x.len(), xd.len(), "wgrad x");
    assert_eq!(dy.len(), yd.len(), "wgrad dy");
    assert_eq!(dw.len(), g.weight_len(), "wgrad dw");
    assert_eq!(db.len(), g.cout, "wgrad db");
    let (m, k, n) = (yd.rows(), g.taps() * g.cin, g.cout);
    if let Some(isa) = bf16_isa::<T>(ops).filter(|_| g.stride == [1, 1, 1] && yd.w >= 8 && m * k > WGRAD_WHOLE) {
        return conv_wgrad_direct_bf16(isa, as_f32(x), xd, as_f32(dy), as_f32_mut(dw), as_f32_mut(db), g);
    }
    if let Some(isa) = bf16_isa::<T>(ops).filter(|_| m * k <= WGRAD_WHOLE) {
        let mut dwt = vec![0.0; n * k];
        conv_wgrad_bf16_whole(isa, as_f32(x), xd, as_f32(dy), &mut dwt, g);
        transpose_into(&dwt, n, k, as_f32_mut(dw));
        db.fill(T::ZERO);
        for row in dy.chunks_exact(n) {
            db.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
        }
        return;
    }
    conv_wgrad_split(x, xd, dy, dw, db, g, ops)
}

/// conv_wgrad split over output rows: one partial dw per thread (dw^T in bf16), summed in
/// index order.
fn conv_wgrad_split<T: Float>(x: &[T], xd: Dims, dy: &[T], dw: &mut [T], db: &mut [T], g: &ConvGeom, ops: Operands) {
    let yd = g.out_dims(xd);
    let (m, k, n) = (yd.rows(), g.taps() * g.cin, g.cout);
    // Only where the bf16 GEMM runs: elsewhere the f32/f64 GEMM keeps its own orientation.
    let transposed = bf16_isa::<T>(ops).is_some();
    let rows = ((1usize << 18) / k.max(1)).clamp(64, 1024);
    let parts = threads().min(m.div_ceil(rows)).max(1);
    let per = m.div_ceil(parts);
    // Transposed, each tile's product reads and writes all of dw^T (n x k f32): tiles of at
    // least 2n rows keep that traffic below the tile's own (deep layers: k 8640, n 320).
    let rows = if transposed { rows.max((2 * n).min(per).min(1024)) } else { rows };
    let pointwise = is_pointwise(g);
    let partials: Vec<(Vec<T>, Vec<T>)> = (0..parts)
        .into_par_iter()
        .map(|pi| {
            let (mut pw, mut pb, mut tile) = (vec![T::ZERO; k * n], vec![T::ZERO; n], Vec::new());
            let (mut r0, hi) = (pi * per, ((pi + 1) * per).min(m));
            while r0 < hi {
                let nr = rows.min(hi - r0);
                let dyc = &dy[r0 * n..(r0 + nr) * n];
                for row in dyc.chunks_exact(n) {
                    pb.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
                }
                let a: &[T] = if pointwise {
                    &x[r0 * k..(r0 + nr) * k]
                } else {
                    tile.resize(nr * k, T::ZERO);
                    im2col(x, xd, g, yd, r0, k, &mut tile[..nr * k], T::ZERO, copy);
                    &tile[..nr * k]
                };
                // SAFETY: a is nr x k row-major, dyc nr x n, pw k x n (n x k transposed).
                unsafe {
                    if transposed {
                        // pw^T[n x k] += dyc^T[n x nr] a[nr x k]
                        mm(ops, n, nr, k, dyc.as_ptr(), 1, n as isize, a.as_ptr(), k as isize, 1, T::ONE, pw.as_mut_ptr(), k as isize)
                    } else {
                        // pw[k x n] += a^T[k x nr] dyc[nr x n]
                        mm(ops, k, nr, n, a.as_ptr(), 1, k as isize, dyc.as_ptr(), n as isize, 1, T::ONE, pw.as_mut_ptr(), n as isize)
                    }
                };
                r0 += nr;
            }
            (pw, pb)
        })
        .collect();
    if transposed {
        let mut dwt = vec![T::ZERO; k * n];
        sum_partials(&partials, &mut dwt, db);
        transpose_into(&dwt, n, k, dw);
    } else {
        sum_partials(&partials, dw, db);
    }
}

/// Output planes per slab of `conv_wgrad_direct_bf16`: a thread's bf16 copies of them stay a
/// few MiB.
const WGRAD_SLAB: usize = 8;

/// dw, db of a stride-1 convolution in bf16 with no im2col. Per tap t, dw_t [cin x cout] is
/// the sum over output voxels v of x(v + t) dy(v)^T: the voxels pair up along x, so each
/// output line of dy is packed once as pairs of consecutive voxels (B), and each padded
/// input line twice (pairs starting at even and at odd x, A, one per tap parity); a tap's
/// product over a plane is one kernel call whose segments are the plane's lines. Threads
/// take slabs of planes with partial dw, summed in index order.
fn conv_wgrad_direct_bf16(isa: bf16::Isa, x: &[f32], xd: Dims, dy: &[f32], dw: &mut [f32], db: &mut [f32], g: &ConvGeom) {
    let yd = g.out_dims(xd);
    let (cin, cout, p, kern) = (g.cin, g.cout, g.pad(), g.kernel);
    let pd = [xd.d + 2 * p[0], xd.h + 2 * p[1], xd.w + 2 * p[2]];
    let (cinp, coutp) = (bf16::Isa::padded(cin), bf16::Isa::padded(cout));
    let (wq, jp) = (yd.w.div_ceil(2), pd[2].div_ceil(2));
    let (line_x, line_dy) = (jp * cinp, wq * coutp * 2);
    let planes = yd.n * yd.d;
    let parts = threads().min(planes).max(1);
    let per = planes.div_ceil(parts);
    let taps = tap_offsets(kern, |t| t);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = (0..parts)
        .into_par_iter()
        .map(|pi| {
            let (mut pw, mut pb) = (vec![0.0f32; g.weight_len()], vec![0.0f32; cout]);
            let (mut xs, mut dys, mut line) = (Vec::<u32>::new(), Vec::<u16>::new(), vec![0.0f32; pd[2] * cin]);
            let mut q = pi * per;
            let hi = ((pi + 1) * per).min(planes);
            while q < hi {
                // A slab: output planes q..q1 of one sample.
                let (b, z0) = (q / yd.d, q % yd.d);
                let q1 = hi.min((b + 1) * yd.d).min(q + WGRAD_SLAB);
                let nz = q1 - q;
                let xz = nz + kern[0] - 1;
                // x: padded planes z0 .. z0 + xz, both parities, [parity][plane][line][jp][cinp].
                let half = xz * pd[1] * line_x;
                xs.clear();
                xs.resize(2 * half, 0);
                for zp in 0..xz {
                    let Some(z) = (z0 + zp).checked_sub(p[0]).filter(|&z| z < xd.d) else { continue };
                    for y in 0..xd.h {
                        let from = xd.ravel(b, z, y, 0) * cin;
                        line[p[2] * cin..(p[2] + xd.w) * cin].copy_from_slice(&x[from..from + xd.w * cin]);
                        let at = (zp * pd[1] + y + p[1]) * line_x;
                        isa.pack_rows(&line, pd[2], cin, bytemuck::cast_slice_mut(&mut xs[at..at + line_x]));
                        let odd = (pd[2] - 1).div_ceil(2) * cinp;
                        isa.pack_rows(&line[cin..], pd[2] - 1, cin, bytemuck::cast_slice_mut(&mut xs[half + at..half + at + odd]));
                    }
                }
                // dy: the slab's lines, pairs of voxels.
                dys.clear();
                dys.resize(nz * yd.h * line_dy, 0);
                for (l, out) in dys.chunks_exact_mut(line_dy).enumerate() {
                    let from = yd.ravel(b, z0 + l / yd.h, l % yd.h, 0) * cout;
                    let row = &dy[from..from + yd.w * cout];
                    isa.pack_rows(row, yd.w, cout, out);
                    for v in row.chunks_exact(cout) {
                        pb.iter_mut().zip(v).for_each(|(s, &v)| *s += v);
                    }
                }
                let mut segs = vec![0usize; yd.h];
                for zl in 0..nz {
                    let bp = &dys[zl * yd.h * line_dy..(zl + 1) * yd.h * line_dy];
                    for (t, tap) in taps.iter().enumerate() {
                        let base = (tap[2] % 2) * half + tap[2] / 2 * cinp;
                        for (oy, s) in segs.iter_mut().enumerate() {
                            *s = base + ((zl + tap[0]) * pd[1] + oy + tap[1]) * line_x;
                        }
                        let c = &mut pw[t * cin * cout..(t + 1) * cin * cout];
                        isa.gemm_segments(cin, &xs, &segs, 1, cinp, wq, bp, cout, 1.0, c, cout);
                    }
                }
                q = q1;
            }
            (pw, pb)
        })
        .collect();
    sum_partials(&partials, dw, db);
}

/// Layers whose im2col (rows x k) has at most this many values take `conv_wgrad_bf16_whole`.
pub(crate) const WGRAD_WHOLE: usize = 1 << 23;

/// dst[k x n] = src[n x k] transposed, in blocks of 64 dst rows (64 x n values stay in L2
/// while every src row streams through; deep layers' dw has millions of values).
fn transpose_into<T: Copy + Send + Sync>(src: &[T], n: usize, k: usize, dst: &mut [T]) {
    const ROWS: usize = 64;
    dst[..k * n].par_chunks_mut(ROWS * n).enumerate().for_each(|(bi, block)| {
        let k0 = bi * ROWS;
        for (co, row) in src.chunks_exact(k).enumerate().take(n) {
            for (i, &v) in row[k0..k0 + block.len() / n].iter().enumerate() {
                block[i * n + co] = v;
            }
        }
    });
}

/// dw^T [n x k] in bf16 for layers with few output rows (the deep stages: 300 rows, k 8640,
/// n 320), where per-thread partials of dw would cost more traffic than the products: the
/// im2col of all rows packed once, dw^T's rows split over the threads, no partial sums.
pub(crate) fn conv_wgrad_bf16_whole(isa: bf16::Isa, x: &[f32], xd: Dims, dy: &[f32], dwt: &mut [f32], g: &ConvGeom) {
    let yd = g.out_dims(xd);
    let (m, k, n) = (yd.rows(), g.taps() * g.cin, g.cout);
    let cols = if is_pointwise(g) {
        isa.pack(m, k, x, k)
    } else {
        let rows = tile_rows(m, k);
        let mut tile = vec![0.0f32; m * k];
        tile.par_chunks_mut(rows * k).enumerate().for_each(|(i, t)| im2col(x, xd, g, yd, i * rows, k, t, 0.0, copy));
        isa.pack(m, k, &tile, k)
    };
    let dyt = isa.pack(m, n, dy, n).columns_as_rows();
    let pairs = cols.pairs();
    let per = n.div_ceil(2 * threads()).next_multiple_of(12);
    dwt.par_chunks_mut(per * k).enumerate().for_each(|(i, c)| {
        isa.gemm_packed(c.len() / k, &dyt[i * per * pairs..], pairs, &cols, 0.0, c, k);
    });
}

/// dw, db = the sum of per-thread partial (dw, db) in index order.
pub(crate) fn sum_partials<T: Float>(partials: &[(Vec<T>, Vec<T>)], dw: &mut [T], db: &mut [T]) {
    dw.copy_from_slice(&partials[0].0);
    db.copy_from_slice(&partials[0].1);
    for (pw, pb) in &partials[1..] {
        dw.par_chunks_mut(1 << 14).zip(pw.par_chunks(1 << 14)).for_each(|(d, s)| {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d += s);
        });
        db.iter_mut().zip(pb).for_each(|(d, &s)| *d += s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The bf16 wgrad strategies (split over rows with partial sums; whole, split over dw's
    /// rows; direct, for stride 1) agree to f32 summation order on every geometry, lines of 13
    /// voxels (odd: a last pair with one voxel) and of 8.
    #[test]
    fn bf16_wgrad_strategies_agree() {
        let Some(isa) = bf16::isa() else {
            println!("SKIPPED bf16_wgrad_strategies_agree: this CPU has no AVX512-BF16");
            return;
        };
        let mut r = rand_pcg::Pcg64::seed_from_u64(7);
        for (kern, s, w) in [([3, 3, 3], [1, 1, 1], 13), ([3, 3, 3], [1, 1, 1], 8), ([1, 1, 1], [1, 1, 1], 13), ([3, 1, 3], [1, 1, 1], 9), ([3, 3, 3], [2, 2, 2], 7), ([1, 3, 3], [1, 2, 2], 7)] {
            let xd = Dims::new(2, [6, 5, w], 9);
            let g = ConvGeom::new(9, 26, kern, s);
            let yd = g.out_dims(xd);
            let x: Vec<f32> = (0..xd.len()).map(|_| r.random_range(-1.0..1.0)).collect();
            let dy: Vec<f32> = (0..yd.len()).map(|_| r.random_range(-1.0..1.0)).collect();
            let (mut split, mut db) = (vec![f32::NAN; g.weight_len()], vec![f32::NAN; 26]);
            // Forced onto the split path: transposed partials through the generic bf16 GEMM.
            conv_wgrad_split(&x, xd, &dy, &mut split, &mut db, &g, Operands::Bf16);
            let mut dwt = vec![f32::NAN; g.weight_len()];
            conv_wgrad_bf16_whole(isa, &x, xd, &dy, &mut dwt, &g);
            let mut whole = vec![0.0; g.weight_len()];
            transpose_into(&dwt, g.cout, g.taps() * g.cin, &mut whole);
            let rel = |a: &[f32], b: &[f32]| {
                let num: f64 = a.iter().zip(b).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                (num / b.iter().map(|b| (*b as f64).powi(2)).sum::<f64>()).sqrt()
            };
            assert!(rel(&split, &whole) < 1e-6, "{kern:?} {s:?}: split vs whole {}", rel(&split, &whole));
            if s == [1, 1, 1] {
                let (mut direct, mut db2) = (vec![f32::NAN; g.weight_len()], vec![f32::NAN; 26]);
                conv_wgrad_direct_bf16(isa, &x, xd, &dy, &mut direct, &mut db2, &g);
                assert!(rel(&direct, &whole) < 1e-6, "{kern:?} w {w}: direct vs whole {}", rel(&direct, &whole));
                assert!(rel(&db2, &db) < 1e-6, "{kern:?} w {w}: bias gradients");
            }
        }
    }
}
