//! 3D convolution on the CPU: forward, data gradient and weight gradient as tiled
//! implicit GEMMs. A tile of im2col rows is built per task (in L2) and multiplied by the
//! weight matrix [taps*cin x cout]; no task writes rows another task writes.

use super::{axpby, chunk_rows, gemm_rm, threads, Float, SyncPtr};
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

/// Writes im2col rows r0.. of the forward conv into `tile` ([rows x taps*cin]); zeros
/// stand for padding.
fn im2col<T: Float>(x: &[T], xd: Dims, g: &ConvGeom, yd: Dims, r0: usize, tile: &mut [T]) {
    let cin = g.cin;
    let [kd, kh, kw] = g.kernel;
    let [sd, sh, sw] = g.stride;
    let p = g.pad();
    for (i, row) in tile.chunks_exact_mut(g.taps() * cin).enumerate() {
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
                        dst.copy_from_slice(&x[src..src + cin]);
                    } else {
                        dst.fill(T::ZERO);
                    }
                    col += cin;
                }
            }
        }
    }
}

/// y = conv(x, w) + b.
pub fn conv_fwd<T: Float>(x: &[T], xd: Dims, w: &[T], b: &[T], y: &mut [T], g: &ConvGeom) {
    let yd = g.out_dims(xd);
    assert_eq!(x.len(), xd.len(), "conv input");
    assert_eq!(y.len(), yd.len(), "conv output");
    assert_eq!(w.len(), g.weight_len(), "conv weight");
    assert_eq!(b.len(), g.cout, "conv bias");
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
            im2col(x, xd, g, yd, r0, &mut tile[..nr * k]);
            &tile[..nr * k]
        };
        gemm_rm(nr, k, n, a, w, T::ONE, yc);
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

/// dx (= or +=) conv_dgrad(dy, w): beta 0 overwrites dx, beta 1 adds.
pub fn conv_dgrad<T: Float>(dy: &[T], w: &[T], dx: &mut [T], xd: Dims, g: &ConvGeom, beta: T) {
    let yd = g.out_dims(xd);
    assert_eq!(dy.len(), yd.len(), "dgrad dy");
    assert_eq!(dx.len(), xd.len(), "dgrad dx");
    assert_eq!(w.len(), g.weight_len(), "dgrad weight");
    let (cin, cout, s, p, k) = (g.cin, g.cout, g.stride, g.pad(), g.kernel);
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
        let rows = tile_rows(m, kc.max(1));
        (0..m.div_ceil(rows)).into_par_iter().for_each_init(
            || (Vec::new(), Vec::new()),
            |(tile, out), ci| {
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
                tile.resize(nr * kc, T::ZERO);
                for (i, trow) in tile.chunks_exact_mut(kc).enumerate() {
                    let [b, z, y, x] = class.voxel(q0 + i, s);
                    for (t, tap) in taps.iter().enumerate() {
                        let dst = &mut trow[t * cout..(t + 1) * cout];
                        // Output voxel o with o*s - p + tap = input voxel (exact by class).
                        let o = [(z + p[0]).wrapping_sub(tap[0]), (y + p[1]).wrapping_sub(tap[1]), (x + p[2]).wrapping_sub(tap[2])];
                        let o = [o[0] / s[0], o[1] / s[1], o[2] / s[2]];
                        let inside = (z + p[0]) >= tap[0] && (y + p[1]) >= tap[1] && (x + p[2]) >= tap[2];
                        if inside && o[0] < yd.d && o[1] < yd.h && o[2] < yd.w {
                            let src = yd.ravel(b, o[0], o[1], o[2]) * cout;
                            dst.copy_from_slice(&dy[src..src + cout]);
                        } else {
                            dst.fill(T::ZERO);
                        }
                    }
                }
                if direct {
                    // Class rows are the input rows in order: write straight into dx.
                    // SAFETY: rows q0..q0+nr belong to this task.
                    let d = unsafe { dxp.rows(q0 * cin, nr * cin) };
                    gemm_rm(nr, kc, cin, tile, &bm, beta, d);
                } else {
                    out.resize(nr * cin, T::ZERO);
                    gemm_rm(nr, kc, cin, tile, &bm, T::ZERO, out);
                    for (i, orow) in out.chunks_exact(cin).enumerate() {
                        let [b, z, y, x] = class.voxel(q0 + i, s);
                        // SAFETY: each class row is one input voxel, owned by this task.
                        let d = unsafe { dxp.rows(xd.ravel(b, z, y, x) * cin, cin) };
                        d.iter_mut().zip(orow).for_each(|(d, &o)| axpby(d, beta, o));
                    }
                }
            },
        );
    }
}

/// dw = im2col(x)^T dy, db = column sums of dy. Split-K over output rows: one partial per
/// thread, summed at the end in a fixed order (deterministic for a given thread count).
pub fn conv_wgrad<T: Float>(x: &[T], xd: Dims, dy: &[T], dw: &mut [T], db: &mut [T], g: &ConvGeom) {
    let yd = g.out_dims(xd);
    assert_eq!(x.len(), xd.len(), "wgrad x");
    assert_eq!(dy.len(), yd.len(), "wgrad dy");
    assert_eq!(dw.len(), g.weight_len(), "wgrad dw");
    assert_eq!(db.len(), g.cout, "wgrad db");
    let (m, k, n) = (yd.rows(), g.taps() * g.cin, g.cout);
    let rows = ((1usize << 18) / k.max(1)).clamp(64, 1024);
    let parts = threads().min(m.div_ceil(rows)).max(1);
    let per = m.div_ceil(parts);
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
                    im2col(x, xd, g, yd, r0, &mut tile[..nr * k]);
                    &tile[..nr * k]
                };
                // pw[k x n] += a^T[k x nr] dyc[nr x n]
                // SAFETY: a is nr x k row-major, dyc nr x n, pw k x n.
                unsafe {
                    T::gemm(k, nr, n, T::ONE, a.as_ptr(), 1, k as isize, dyc.as_ptr(), n as isize, 1, T::ONE, pw.as_mut_ptr(), n as isize, 1)
                };
                r0 += nr;
            }
            (pw, pb)
        })
        .collect();
    sum_partials(&partials, dw, db);
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
