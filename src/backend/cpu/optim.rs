//! Optimizer ops over the whole parameter arena: squared norm and SGD with nesterov momentum,
//! weight decay and gradient clipping, as torch.optim.SGD and clip_grad_norm_ compute them.

use super::Float;
use crate::backend::{clip_factor, step_applies, SgdParams};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// Per-chunk sums, then the chunks in order: the same bits whatever the thread count.
pub fn sum_squares<T: Float>(x: &[T]) -> f64 {
    let chunks: Vec<f64> = x.par_chunks(CHUNK).map(|c| c.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>()).collect();
    chunks.iter().sum()
}

/// Clips by the norm sqrt(guard[0]) to p.max_grad_norm, then g' = g*f + wd*p;
/// buf = mu*buf + g'; p -= lr * (g' + mu*buf). Nothing when a guard value is not finite.
pub fn sgd_update<T: Float>(params: &mut [T], grads: &[T], momentum: &mut [T], p: &SgdParams, guard: &[T]) {
    assert!(params.len() == grads.len() && params.len() == momentum.len(), "sgd arena sizes");
    let guard: Vec<f64> = guard.iter().map(|v| v.to_f64()).collect();
    if !step_applies(&guard) {
        return;
    }
    let f = clip_factor(guard[0].sqrt(), p.max_grad_norm);
    let (lr, mu, wd, f) = (T::from_f64(p.lr), T::from_f64(p.momentum), T::from_f64(p.weight_decay), T::from_f64(f));
    let clip = f < T::ONE;
    params.par_chunks_mut(CHUNK).zip(grads.par_chunks(CHUNK).zip(momentum.par_chunks_mut(CHUNK))).for_each(|(pc, (gc, mc))| {
        for ((w, &g), m) in pc.iter_mut().zip(gc).zip(mc.iter_mut()) {
            let g = if clip { g * f } else { g } + wd * *w;
            *m = mu * *m + g;
            *w -= lr * (g + mu * *m);
        }
    });
}
