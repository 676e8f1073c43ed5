//! nnU-Net v2's intensity augmentations, each on one channel [D][H][W] in place (f32, sums
//! in f64). Parameters are drawn by the caller; these are the transforms themselves.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// nnU-Net's BGContrast: half the time U(lo, 1), else U(1, hi).
pub fn bg_contrast(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    if rng.random::<f64>() < 0.5 && lo < 1.0 {
        rng.random_range(lo..1.0)
    } else {
        rng.random_range(lo.max(1.0)..hi)
    }
}

/// Adds N(0, sigma^2) noise (nnU-Net draws "variance" in (0, 0.1) and uses it as sigma).
pub fn gaussian_noise(x: &mut [f32], sigma: f32, rng: &mut impl Rng) {
    for v in x.iter_mut() {
        let z: f32 = StandardNormal.sample(rng);
        *v += sigma * z;
    }
}

/// The odd kernel width of a gaussian of `sigma` truncated at 6 sigma, rounded as nnU-Net
/// rounds it (3, 5 or 7 for sigma in 0.5..1).
fn kernel(sigma: f64) -> Vec<f32> {
    let n = 6.0 * sigma + 0.5;
    let r = n.round_ties_even() as i64;
    let k = if r % 2 == 1 { r } else if n >= r as f64 { r + 1 } else { r - 1 };
    let half = (k - 1) / 2;
    let w: Vec<f64> = (-half..=half).map(|i| (-0.5 * (i as f64 / sigma).powi(2)).exp()).collect();
    let s: f64 = w.iter().sum();
    w.iter().map(|v| (v / s) as f32).collect()
}

/// Reflect (mirror without repeating the edge) an index into 0..n.
fn reflect(i: i64, n: i64) -> usize {
    if n == 1 {
        return 0;
    }
    let p = 2 * (n - 1);
    let m = i.rem_euclid(p);
    (if m >= n { p - m } else { m }) as usize
}

/// Separable gaussian blur, axis 0, then 1, then 2, reflect borders. `tmp` holds one volume.
pub fn gaussian_blur(x: &mut [f32], shape: [usize; 3], sigmas: [f64; 3], tmp: &mut Vec<f32>) {
    for axis in 0..3 {
        let k = kernel(sigmas[axis]);
        let half = (k.len() / 2) as i64;
        let n = shape[axis] as i64;
        let inner: usize = shape[axis + 1..].iter().product();
        tmp.clear();
        tmp.extend_from_slice(x);
        if inner == 1 {
            // Contiguous rows: reflect only near the ends.
            for (orow, irow) in x.chunks_mut(shape[axis]).zip(tmp.chunks(shape[axis])) {
                for i in 0..n {
                    let interior = i >= half && i + half < n;
                    orow[i as usize] = if interior {
                        let s = &irow[(i - half) as usize..(i + half + 1) as usize];
                        s.iter().zip(&k).map(|(&v, &w)| v * w).sum()
                    } else {
                        k.iter().enumerate().map(|(t, &w)| w * irow[reflect(i + t as i64 - half, n)]).sum()
                    };
                }
            }
            continue;
        }
        for (ob, ib) in x.chunks_mut(shape[axis] * inner).zip(tmp.chunks(shape[axis] * inner)) {
            for i in 0..n {
                let orow = &mut ob[i as usize * inner..][..inner];
                orow.iter_mut().for_each(|v| *v = 0.0);
                for (t, &w) in k.iter().enumerate() {
                    let j = reflect(i + t as i64 - half, n);
                    let irow = &ib[j * inner..][..inner];
                    orow.iter_mut().zip(irow).for_each(|(o, &v)| *o += w * v);
                }
            }
        }
    }
}

pub fn brightness(x: &mut [f32], m: f32) {
    x.iter_mut().for_each(|v| *v *= m);
}

fn mean(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64).sum::<f64>() / x.len().max(1) as f64
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)))
}

/// (x - mean) m + mean, clamped back to the channel's range.
pub fn contrast(x: &mut [f32], m: f32) {
    let mu = mean(x) as f32;
    let (lo, hi) = min_max(x);
    x.iter_mut().for_each(|v| *v = ((*v - mu) * m + mu).clamp(lo, hi));
}

/// Nearest-exact downsampling to round(shape x s) per axis, then trilinear back
/// (align_corners false), as nnU-Net simulates a low-resolution acquisition; an axis of
/// scale 1 is left as it is.
pub fn low_resolution(x: &mut [f32], shape: [usize; 3], s: [f32; 3], small: &mut Vec<f32>) {
    let down: [usize; 3] = std::array::from_fn(|a| ((shape[a] as f64 * s[a] as f64).round_ties_even() as usize).max(1));
    let near = |i: usize, n_in: usize, n_out: usize| (((i as f64 + 0.5) * (n_in as f32 / n_out as f32) as f64).floor() as usize).min(n_in - 1);
    small.clear();
    for z in 0..down[0] {
        let sz = near(z, shape[0], down[0]);
        for y in 0..down[1] {
            let sy = near(y, shape[1], down[1]);
            let row = (sz * shape[1] + sy) * shape[2];
            small.extend((0..down[2]).map(|xx| x[row + near(xx, shape[2], down[2])]));
        }
    }
    let lin = |o: usize, n_in: usize, n_out: usize| {
        let src = ((n_in as f64 / n_out as f64) * (o as f64 + 0.5) - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = if i0 + 1 < n_in { i0 + 1 } else { i0 };
        (i0, i1, (src - i0 as f64) as f32)
    };
    let tz: Vec<_> = (0..shape[0]).map(|o| lin(o, down[0], shape[0])).collect();
    let ty: Vec<_> = (0..shape[1]).map(|o| lin(o, down[1], shape[1])).collect();
    let tx: Vec<_> = (0..shape[2]).map(|o| lin(o, down[2], shape[2])).collect();
    let at = |z: usize, y: usize, xx: usize| small[(z * down[1] + y) * down[2] + xx];
    let mut o = 0;
    for &(z0, z1, wz) in &tz {
        for &(y0, y1, wy) in &ty {
            for &(x0, x1, wx) in &tx {
                let c = |z: usize, y: usize| at(z, y, x0) * (1.0 - wx) + at(z, y, x1) * wx;
                let a = c(z0, y0) * (1.0 - wy) + c(z0, y1) * wy;
                let b = c(z1, y0) * (1.0 - wy) + c(z1, y1) * wy;
                x[o] = a * (1.0 - wz) + b * wz;
                o += 1;
            }
        }
    }
}

/// x^g for x in [0, 1] through exp2(g log2 x) with short series (relative error below 1e-5,
/// tested): no libm call, so the gamma loop vectorises, about 3x faster than powf here.
#[inline]
pub fn pow01(x: f32, g: f32) -> f32 {
    if x <= 1e-30 {
        return 0.0;
    }
    // x = m 2^e with m in [1, 2); ln m = 2 atanh((m - 1) / (m + 1)).
    let bits = x.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let u = (m - 1.0) / (m + 1.0);
    let u2 = u * u;
    let ln_m = 2.0 * u * (1.0 + u2 * (1.0 / 3.0 + u2 * (1.0 / 5.0 + u2 * (1.0 / 7.0 + u2 * (1.0 / 9.0)))));
    let y = g * (e as f32 + ln_m * std::f32::consts::LOG2_E);
    // 2^y = 2^i 2^f, f in [0, 1): Taylor series of e^(f ln 2) to degree 7.
    let i = y.floor();
    let z = (y - i) * std::f32::consts::LN_2;
    let p = 1.0 + z * (1.0 + z * (0.5 + z * (1.0 / 6.0 + z * (1.0 / 24.0 + z * (1.0 / 120.0 + z * (1.0 / 720.0 + z * (1.0 / 5040.0)))))));
    let i = i.max(-126.0) as i32;
    p * f32::from_bits(((i + 127) as u32) << 23)
}

/// Mean and unbiased standard deviation.
fn mean_std(x: &[f32]) -> (f64, f64) {
    let m = mean(x);
    let var = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / (x.len().max(2) - 1) as f64;
    (m, var.sqrt())
}

/// nnU-Net's gamma: rescale to [0, 1], raise to `gamma`, scale back, then restore the
/// mean and standard deviation; `invert` applies it to -x.
pub fn gamma(x: &mut [f32], gamma: f32, invert: bool) {
    const EPS: f64 = 1e-7;
    if invert {
        x.iter_mut().for_each(|v| *v = -*v);
    }
    let (mu, sd) = mean_std(x);
    let (lo, hi) = min_max(x);
    let r = hi - lo;
    let inv_r = 1.0 / (r as f64).max(EPS) as f32;
    x.iter_mut().for_each(|v| *v = pow01(((*v - lo) * inv_r).clamp(0.0, 1.0), gamma) * r + lo);
    let (mu2, sd2) = mean_std(x);
    let k = (sd / sd2.max(EPS)) as f32;
    x.iter_mut().for_each(|v| *v = (*v - mu2 as f32) * k + mu as f32);
    if invert {
        x.iter_mut().for_each(|v| *v = -*v);
    }
}
