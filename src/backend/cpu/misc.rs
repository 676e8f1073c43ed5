//! Tensor plumbing: fill, channel concat for skips, nearest target downsampling, argmax.

use super::{axpby, Float};
use crate::tensor::Dims;
use rayon::prelude::*;

pub fn fill<T: Float>(x: &mut [T], v: T) {
    x.par_chunks_mut(1 << 16).for_each(|c| c.fill(v));
}

pub fn concat<T: Float>(a: &[T], ca: usize, b: &[T], cb: usize, rows: usize, out: &mut [T]) {
    assert!(a.len() == rows * ca && b.len() == rows * cb && out.len() == rows * (ca + cb), "concat shapes");
    out.par_chunks_mut(ca + cb).zip(a.par_chunks(ca).zip(b.par_chunks(cb))).for_each(|(o, (a, b))| {
        o[..ca].copy_from_slice(a);
        o[ca..].copy_from_slice(b);
    });
}

pub fn concat_bwd<T: Float>(dout: &[T], ca: usize, cb: usize, rows: usize, da: &mut [T], db: &mut [T], beta_b: T) {
    assert!(da.len() == rows * ca && db.len() == rows * cb && dout.len() == rows * (ca + cb), "concat_bwd shapes");
    dout.par_chunks(ca + cb).zip(da.par_chunks_mut(ca).zip(db.par_chunks_mut(cb))).for_each(|(d, (a, b))| {
        a.copy_from_slice(&d[..ca]);
        b.iter_mut().zip(&d[ca..]).for_each(|(b, &v)| axpby(b, beta_b, v));
    });
}

/// Source index of output index `i` for nearest-exact resizing (PyTorch's 'nearest-exact',
/// what nnU-Net v2's deep-supervision target transform uses).
pub fn nearest_src(i: usize, n_in: usize, n_out: usize) -> usize {
    (((2 * i + 1) * n_in) / (2 * n_out)).min(n_in - 1)
}

pub fn downsample_labels(src: &[u8], sd: Dims, dst: &mut [u8], dd: Dims) {
    assert!(sd.n == dd.n && src.len() == sd.rows() && dst.len() == dd.rows(), "downsample shapes");
    dst.par_chunks_mut(dd.w).enumerate().for_each(|(r, row)| {
        let (y, t) = (r % dd.h, r / dd.h);
        let (z, b) = (t % dd.d, t / dd.d);
        let (sz, sy) = (nearest_src(z, sd.d, dd.d), nearest_src(y, sd.h, dd.h));
        for (x, o) in row.iter_mut().enumerate() {
            *o = src[sd.ravel(b, sz, sy, nearest_src(x, sd.w, dd.w))];
        }
    });
}

/// Region nets: bit k of out[r] set where region k's logit is above 0 (sigmoid above 0.5).
pub fn region_bits<T: Float>(logits: &[T], ld: Dims, out: &mut [u8]) {
    assert!(logits.len() == ld.len() && out.len() == ld.rows() && ld.c <= 8, "region_bits shapes");
    out.par_iter_mut().zip(logits.par_chunks(ld.c)).for_each(|(o, z)| {
        *o = z.iter().enumerate().fold(0u8, |bits, (k, v)| bits | ((v.to_f64() > 0.0) as u8) << k);
    });
}

pub fn argmax<T: Float>(logits: &[T], ld: Dims, out: &mut [u8]) {
    assert!(logits.len() == ld.len() && out.len() == ld.rows(), "argmax shapes");
    out.par_iter_mut().zip(logits.par_chunks(ld.c)).for_each(|(o, z)| {
        let mut best = 0;
        for k in 1..z.len() {
            if z[k] > z[best] {
                best = k;
            }
        }
        *o = best as u8;
    });
}
