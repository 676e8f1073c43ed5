//! Instance norm (affine, eps 1e-5, biased variance) fused with LeakyReLU(0.01), or with no
//! activation, and optionally a residual added before the activation (a ResNet block's end).
//! Statistics per (sample, channel): two-pass mean/M2 inside blocks of voxels that stay
//! in cache, blocks merged with Chan's formula, accumulated in f64. Never E[x^2]-E[x]^2.

use super::Float;
use crate::backend::{LEAKY_SLOPE, NORM_EPS};
use crate::tensor::Dims;
use rayon::prelude::*;

/// Voxels per statistics block.
const BLOCK: usize = 2048;

/// Partial (mean, M2, count) per channel of one block of one sample.
struct Moments {
    mean: Vec<f64>,
    m2: Vec<f64>,
    count: f64,
}

impl Moments {
    fn of_rows<T: Float>(rows: &[T], c: usize) -> Moments {
        let count = (rows.len() / c) as f64;
        let mut mean = vec![0.0; c];
        for row in rows.chunks_exact(c) {
            mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v.to_f64());
        }
        mean.iter_mut().for_each(|m| *m /= count);
        let mut m2 = vec![0.0; c];
        for row in rows.chunks_exact(c) {
            m2.iter_mut().zip(row).zip(&mean).for_each(|((s, &v), &m)| {
                let d = v.to_f64() - m;
                *s += d * d;
            });
        }
        Moments { mean, m2, count }
    }
    /// Chan et al.'s parallel merge.
    fn merge(&mut self, o: &Moments) {
        let n = self.count + o.count;
        for ch in 0..self.mean.len() {
            let delta = o.mean[ch] - self.mean[ch];
            self.mean[ch] += delta * o.count / n;
            self.m2[ch] += o.m2[ch] + delta * delta * self.count * o.count / n;
        }
        self.count = n;
    }
}

/// Runs `f(sample, rows)` over blocks of every sample in parallel; returns the results in
/// (sample, block) order.
fn per_block<T: Float, R: Send>(x: &[T], xd: Dims, f: impl Fn(usize, usize, &[T]) -> R + Sync) -> Vec<R> {
    let (v, c) = (xd.voxels(), xd.c);
    let nblk = v.div_ceil(BLOCK);
    (0..xd.n * nblk)
        .into_par_iter()
        .map(|i| {
            let (b, k) = (i / nblk, i % nblk);
            let (lo, hi) = (k * BLOCK, ((k + 1) * BLOCK).min(v));
            f(b, lo, &x[(b * v + lo) * c..(b * v + hi) * c])
        })
        .collect()
}

pub fn norm_stats<T: Float>(x: &[T], xd: Dims, mean: &mut [T], rstd: &mut [T]) {
    assert_eq!(x.len(), xd.len(), "norm input");
    assert_eq!(mean.len(), xd.n * xd.c, "norm mean");
    assert_eq!(rstd.len(), xd.n * xd.c, "norm rstd");
    let c = xd.c;
    let parts = per_block(x, xd, |_, _, rows| Moments::of_rows(rows, c));
    let nblk = parts.len() / xd.n;
    for (b, blocks) in parts.chunks(nblk).enumerate() {
        let mut acc = Moments { mean: blocks[0].mean.clone(), m2: blocks[0].m2.clone(), count: blocks[0].count };
        blocks[1..].iter().for_each(|m| acc.merge(m));
        for ch in 0..c {
            mean[b * c + ch] = T::from_f64(acc.mean[ch]);
            rstd[b * c + ch] = T::from_f64(1.0 / (acc.m2[ch] / acc.count + NORM_EPS).sqrt());
        }
    }
}

/// Per (sample, channel) affine map z = scale * x + shift of the normalisation.
fn affine<T: Float>(mean: &[T], rstd: &[T], gamma: &[T], beta: &[T], c: usize) -> (Vec<T>, Vec<T>) {
    let scale: Vec<T> = (0..mean.len()).map(|i| gamma[i % c] * rstd[i]).collect();
    let shift = (0..mean.len()).map(|i| beta[i % c] - mean[i] * scale[i]).collect();
    (scale, shift)
}

fn leaky<T: Float>(z: T, slope: T) -> T {
    z * if z > T::ZERO { T::ONE } else { slope }
}

/// y = act(gamma * (x - mean) * rstd + beta [+ residual]); `slope` is the LeakyReLU's
/// (1 for no activation).
#[allow(clippy::too_many_arguments)]
pub fn norm_fwd<T: Float>(x: &[T], xd: Dims, mean: &[T], rstd: &[T], gamma: &[T], beta: &[T], residual: Option<&[T]>, slope: f64, y: &mut [T]) {
    assert_eq!(x.len(), xd.len(), "norm input");
    assert_eq!(y.len(), xd.len(), "norm output");
    assert!(residual.is_none_or(|r| r.len() == xd.len()), "norm residual");
    let (c, v) = (xd.c, xd.voxels());
    let (scale, shift) = affine(mean, rstd, gamma, beta, c);
    let slope = T::from_f64(slope);
    let rows = 1024;
    y.par_chunks_mut(rows * c).zip(x.par_chunks(rows * c)).enumerate().for_each(|(ci, (yc, xc))| {
        let res = residual.map(|r| &r[ci * rows * c..ci * rows * c + yc.len()]);
        for (i, (yr, xr)) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)).enumerate() {
            let b = (ci * rows + i) / v;
            let (sc, sh) = (&scale[b * c..(b + 1) * c], &shift[b * c..(b + 1) * c]);
            for ch in 0..c {
                let r = res.map_or(T::ZERO, |r| r[i * c + ch]);
                yr[ch] = leaky(sc[ch] * xr[ch] + sh[ch] + r, slope);
            }
        }
    });
}

/// dx = dy * LeakyReLU'(y), read off the activation's output (positive exactly where its
/// input was); `d` holds dy on entry and dx on return.
pub fn leaky_bwd_inplace<T: Float>(d: &mut [T], y: &[T]) {
    assert_eq!(d.len(), y.len(), "leaky_bwd shapes");
    let slope = T::from_f64(LEAKY_SLOPE);
    d.par_chunks_mut(1 << 14).zip(y.par_chunks(1 << 14)).for_each(|(d, y)| {
        let (one, zero) = (T::ONE, T::ZERO);
        d.iter_mut().zip(y).for_each(|(d, &y)| *d = *d * if y > zero { one } else { slope });
    });
}

/// Backward of norm_fwd without a residual (`slope` 1: no activation); `d` holds dy on entry
/// and dx on return. Recomputes the pre-activation from x and the statistics (checkpoint
/// level 1 costs nothing extra here).
/// Inner loops run over channels on per-sample slices so they vectorise; block sums are
/// accumulated in T over at most BLOCK voxels and merged in f64.
pub fn norm_bwd_inplace<T: Float>(
    d: &mut [T],
    x: &[T],
    xd: Dims,
    (mean, rstd, gamma, beta): (&[T], &[T], &[T], &[T]),
    slope: f64,
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    assert_eq!(x.len(), xd.len(), "norm bwd x");
    assert_eq!(d.len(), xd.len(), "norm bwd dy");
    let (c, v) = (xd.c, xd.voxels());
    let slope = T::from_f64(slope);
    // Pass 1: sum(dz) and sum(dz * xhat) per (sample, channel).
    let dref: &[T] = d;
    let sums = per_block(x, xd, |b, lo, xr| {
        // Locals, not captures: a value read through the closure's reference may alias the
        // stores below, which keeps LLVM from vectorising.
        let (slope, one, zero) = (slope, T::ONE, T::ZERO);
        let (mu, rs) = (&mean[b * c..(b + 1) * c], &rstd[b * c..(b + 1) * c]);
        let (g, be) = (&gamma[..c], &beta[..c]);
        let (mut sdz, mut sdzx) = (vec![T::ZERO; c], vec![T::ZERO; c]);
        let dr = &dref[(b * v + lo) * c..(b * v + lo) * c + xr.len()];
        // Zipped iterators, no indexing: the loop vectorises into compares and blends. With
        // bounds-checked indexing it stayed scalar and branched on the sign of z, which is
        // random for real activations (5x slower than on regular test data).
        for (xrow, drow) in xr.chunks_exact(c).zip(dr.chunks_exact(c)) {
            let per_channel = sdz.iter_mut().zip(sdzx.iter_mut()).zip(xrow.iter().zip(drow)).zip(mu.iter().zip(rs)).zip(g.iter().zip(be));
            for ((((sz, szx), (&xv, &dv)), (&m, &r)), (&gg, &bb)) in per_channel {
                let xhat = (xv - m) * r;
                let dz = dv * if gg * xhat + bb > zero { one } else { slope };
                *sz += dz;
                *szx += dz * xhat;
            }
        }
        (sdz, sdzx)
    });
    let nblk = sums.len() / xd.n;
    let mut sdz = vec![0.0f64; xd.n * c];
    let mut sdzx = vec![0.0f64; xd.n * c];
    for (i, (a, b)) in sums.iter().enumerate() {
        let s = i / nblk;
        for ch in 0..c {
            sdz[s * c + ch] += a[ch].to_f64();
            sdzx[s * c + ch] += b[ch].to_f64();
        }
    }
    for ch in 0..c {
        dgamma[ch] = T::from_f64((0..xd.n).map(|s| sdzx[s * c + ch]).sum());
        dbeta[ch] = T::from_f64((0..xd.n).map(|s| sdz[s * c + ch]).sum());
    }
    // Pass 2: dx = gamma*rstd * (dz - mean(dz) - xhat * mean(dz*xhat)).
    let inv_v = 1.0 / v as f64;
    let mdz: Vec<T> = sdz.iter().map(|s| T::from_f64(s * inv_v)).collect();
    let mdzx: Vec<T> = sdzx.iter().map(|s| T::from_f64(s * inv_v)).collect();
    let rows = 1024;
    d.par_chunks_mut(rows * c).zip(x.par_chunks(rows * c)).enumerate().for_each(|(ci, (dc, xc))| {
        let (slope, one, zero) = (slope, T::ONE, T::ZERO);
        let mut r0 = ci * rows;
        let mut rest = (dc, xc);
        while !rest.0.is_empty() {
            // Rows of one sample at a time, so the per-sample slices stay fixed.
            let b = r0 / v;
            let n = (((b + 1) * v - r0) * c).min(rest.0.len());
            let (dh, dt) = std::mem::take(&mut rest.0).split_at_mut(n);
            let (xh, xt) = rest.1.split_at(n);
            let k = b * c..(b + 1) * c;
            let (mu, rs, md, mdx) = (&mean[k.clone()], &rstd[k.clone()], &mdz[k.clone()], &mdzx[k]);
            let (g, be) = (&gamma[..c], &beta[..c]);
            for (dr, xr) in dh.chunks_exact_mut(c).zip(xh.chunks_exact(c)) {
                let per_channel = dr.iter_mut().zip(xr).zip(mu.iter().zip(rs)).zip(g.iter().zip(be)).zip(md.iter().zip(mdx));
                for ((((d, &xv), (&m, &r)), (&gg, &bb)), (&a, &bx)) in per_channel {
                    let xhat = (xv - m) * r;
                    let dz = *d * if gg * xhat + bb > zero { one } else { slope };
                    *d = gg * r * (dz - a - xhat * bx);
                }
            }
            r0 += n / c;
            rest = (dt, xt);
        }
    });
}
