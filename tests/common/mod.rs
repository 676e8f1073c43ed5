#![allow(dead_code)]
//! Shared test helpers: seeded random tensors (seed printed, fresh per run unless
//! SEGK_TEST_SEED is set) and error measures.

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

pub fn rng(tag: &str) -> Pcg64 {
    let seed = std::env::var("SEGK_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{tag}: seed {seed} (set SEGK_TEST_SEED={seed} to repeat)");
    Pcg64::seed_from_u64(seed)
}

/// Like [`rng`], but seeded with `default` unless SEGK_TEST_SEED is set: for checks where
/// some inputs are legitimately unusable (finite differences straddling a LeakyReLU kink deep
/// in a net) and a fresh seed would make CI flaky rather than find bugs.
pub fn rng_seeded(tag: &str, default: u64) -> Pcg64 {
    let seed = std::env::var("SEGK_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    eprintln!("{tag}: seed {seed} (set SEGK_TEST_SEED to try another)");
    Pcg64::seed_from_u64(seed)
}

pub fn randn(rng: &mut Pcg64, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// ||a - b|| / max(||b||, tiny); NaN anywhere gives infinity.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

/// Central finite differences of `f` at `x` for the listed indices.
pub fn numeric_grad(x: &mut [f64], idx: &[usize], f: &mut dyn FnMut(&[f64]) -> f64) -> Vec<f64> {
    let eps = 1e-6;
    idx.iter()
        .map(|&i| {
            let v = x[i];
            x[i] = v + eps;
            let fp = f(x);
            x[i] = v - eps;
            let fm = f(x);
            x[i] = v;
            (fp - fm) / (2.0 * eps)
        })
        .collect()
}

/// Up to `k` distinct random indices below `n`.
pub fn pick(rng: &mut Pcg64, n: usize, k: usize) -> Vec<usize> {
    if n <= k {
        return (0..n).collect();
    }
    let mut v: Vec<usize> = (0..k).map(|_| rng.random_range(0..n)).collect();
    v.sort();
    v.dedup();
    v
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
