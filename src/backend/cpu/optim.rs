//! Optimizer ops over the whole parameter arena: squared norm, scaling (gradient clipping)
//! and SGD with nesterov momentum and weight decay, as torch.optim.SGD computes them.

use super::Float;
use crate::backend::SgdParams;
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

pub fn sum_squares<T: Float>(x: &[T]) -> f64 {
    x.par_chunks(CHUNK).map(|c| c.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>()).sum()
}

pub fn scale<T: Float>(x: &mut [T], s: T) {
    x.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}

/// g' = g + wd*p; buf = mu*buf + g' (buf = g' on the first step); p -= lr * (g' + mu*buf).
pub fn sgd_update<T: Float>(params: &mut [T], grads: &[T], momentum: &mut [T], p: &SgdParams) {
    assert!(params.len() == grads.len() && params.len() == momentum.len(), "sgd arena sizes");
    let (lr, mu, wd) = (T::from_f64(p.lr), T::from_f64(p.momentum), T::from_f64(p.weight_decay));
    let first = p.first_step;
    params.par_chunks_mut(CHUNK).zip(grads.par_chunks(CHUNK).zip(momentum.par_chunks_mut(CHUNK))).for_each(|(pc, (gc, mc))| {
        for ((w, &g), m) in pc.iter_mut().zip(gc).zip(mc.iter_mut()) {
            let g = g + wd * *w;
            *m = if first { g } else { mu * *m + g };
            *w -= lr * (g + mu * *m);
        }
    });
}
