//! Transposed 3D convolution with kernel = stride (nnU-Net's upsampling): every output
//! voxel receives exactly one input voxel, so forward is a GEMM plus a scatter and the
//! gradients are a gather plus a GEMM.

use super::conv::sum_partials;
use super::{chunk_rows, gemm_rm, mm, threads, Float, Operands, SyncPtr};
use crate::backend::ConvTGeom;
use crate::tensor::Dims;
use rayon::prelude::*;

fn tile_rows(m: usize, cols: usize) -> usize {
    chunk_rows(m, 2, 16, ((1usize << 18) / cols.max(1)).clamp(64, 512))
}

/// Output row of input voxel `row` and tap `t`.
fn out_row(xd: Dims, yd: Dims, s: [usize; 3], row: usize, t: usize) -> usize {
    let [b, z, y, x] = xd.unravel(row);
    let (tw, r) = (t % s[2], t / s[2]);
    let (th, td) = (r % s[1], r / s[1]);
    yd.ravel(b, z * s[0] + td, y * s[1] + th, x * s[2] + tw)
}

/// y = convT(x, w) + b.
pub fn convt_fwd<T: Float>(x: &[T], xd: Dims, w: &[T], b: &[T], y: &mut [T], g: &ConvTGeom, ops: Operands) {
    let ops = ops.for_layer(g.cin, g.cout);
    let yd = g.out_dims(xd);
    assert_eq!(x.len(), xd.len(), "convT input");
    assert_eq!(y.len(), yd.len(), "convT output");
    assert_eq!(w.len(), g.weight_len(), "convT weight");
    assert_eq!(b.len(), g.cout, "convT bias");
    let (m, taps, cout) = (xd.rows(), g.taps(), g.cout);
    let tc = taps * cout;
    let rows = tile_rows(m, tc);
    let yp = SyncPtr(y.as_mut_ptr());
    (0..m.div_ceil(rows)).into_par_iter().for_each_init(Vec::new, |tile, ci| {
        let (r0, nr) = (ci * rows, rows.min(m - ci * rows));
        tile.resize(nr * tc, T::ZERO);
        gemm_rm(ops, nr, g.cin, tc, &x[r0 * g.cin..(r0 + nr) * g.cin], w, T::ZERO, tile);
        for (i, trow) in tile.chunks_exact(tc).enumerate() {
            for (t, v) in trow.chunks_exact(cout).enumerate() {
                let o = out_row(xd, yd, g.stride, r0 + i, t) * cout;
                // SAFETY: each output row has exactly one (input row, tap) source.
                let d = unsafe { yp.rows(o, cout) };
                d.iter_mut().zip(v).zip(b).for_each(|((d, &v), &b)| *d = v + b);
            }
        }
    });
}

/// Gathers dy rows of input rows r0.. into `tile` ([rows x taps*cout]).
fn gather<T: Float>(dy: &[T], xd: Dims, yd: Dims, g: &ConvTGeom, r0: usize, tile: &mut [T]) {
    let cout = g.cout;
    for (i, trow) in tile.chunks_exact_mut(g.taps() * cout).enumerate() {
        for (t, d) in trow.chunks_exact_mut(cout).enumerate() {
            let o = out_row(xd, yd, g.stride, r0 + i, t) * cout;
            d.copy_from_slice(&dy[o..o + cout]);
        }
    }
}

/// dx (= or +=) gathered(dy) w^T.
pub fn convt_dgrad<T: Float>(dy: &[T], w: &[T], dx: &mut [T], xd: Dims, g: &ConvTGeom, beta: T, ops: Operands) {
    let ops = ops.for_layer(g.cin, g.cout);
    let yd = g.out_dims(xd);
    assert_eq!(dy.len(), yd.len(), "convT dgrad dy");
    assert_eq!(dx.len(), xd.len(), "convT dgrad dx");
    let (m, cin, tc) = (xd.rows(), g.cin, g.taps() * g.cout);
    let rows = tile_rows(m, tc);
    dx.par_chunks_mut(rows * cin).enumerate().for_each_init(Vec::new, |tile, (ci, dxc)| {
        let (r0, nr) = (ci * rows, dxc.len() / cin);
        tile.resize(nr * tc, T::ZERO);
        gather(dy, xd, yd, g, r0, tile);
        // dxc[nr x cin] = tile[nr x tc] w^T, w is [cin x tc] row-major.
        // SAFETY: shapes as described.
        unsafe {
            mm(ops, nr, tc, cin, tile.as_ptr(), tc as isize, 1, w.as_ptr(), 1, tc as isize, beta, dxc.as_mut_ptr(), cin as isize)
        };
    });
}

/// dw = x^T gathered(dy), db = column sums of dy; split-K per thread.
pub fn convt_wgrad<T: Float>(x: &[T], xd: Dims, dy: &[T], dw: &mut [T], db: &mut [T], g: &ConvTGeom, ops: Operands) {
    let ops = ops.for_layer(g.cin, g.cout);
    let yd = g.out_dims(xd);
    assert_eq!(x.len(), xd.len(), "convT wgrad x");
    assert_eq!(dy.len(), yd.len(), "convT wgrad dy");
    assert_eq!(dw.len(), g.weight_len(), "convT wgrad dw");
    let (m, cin, cout, tc) = (xd.rows(), g.cin, g.cout, g.taps() * g.cout);
    let rows = tile_rows(m, tc);
    let parts = threads().min(m.div_ceil(rows)).max(1);
    let per = m.div_ceil(parts);
    let partials: Vec<(Vec<T>, Vec<T>)> = (0..parts)
        .into_par_iter()
        .map(|pi| {
            let (mut pw, mut pb, mut tile) = (vec![T::ZERO; cin * tc], vec![T::ZERO; cout], Vec::new());
            let (mut r0, hi) = (pi * per, ((pi + 1) * per).min(m));
            while r0 < hi {
                let nr = rows.min(hi - r0);
                tile.resize(nr * tc, T::ZERO);
                gather(dy, xd, yd, g, r0, &mut tile[..nr * tc]);
                for v in tile[..nr * tc].chunks_exact(cout) {
                    pb.iter_mut().zip(v).for_each(|(s, &v)| *s += v);
                }
                let xc = &x[r0 * cin..(r0 + nr) * cin];
                // pw[cin x tc] += xc^T[cin x nr] tile[nr x tc]
                // SAFETY: shapes as described.
                unsafe {
                    mm(ops, cin, nr, tc, xc.as_ptr(), 1, cin as isize, tile.as_ptr(), tc as isize, 1, T::ONE, pw.as_mut_ptr(), tc as isize)
                };
                r0 += nr;
            }
            (pw, pb)
        })
        .collect();
    sum_partials(&partials, dw, db);
}
