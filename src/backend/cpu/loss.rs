//! Softmax + soft Dice + cross-entropy (nnU-Net's DC_and_CE_loss, weights 1:1).
//! Pass 1 gathers per (sample, class) intersection / prediction / ground-truth sums and the
//! CE sum; pass 2 recomputes the softmax per voxel and writes the gradient over the logits.
//! With an ignore label (label value = class count) its voxels take no part: not in the Dice
//! sums (nnU-Net's loss mask), not in the CE or its mean (ignore_index), gradient zero.

use super::Float;
use crate::backend::{DiceMode, LossParts, DICE_SMOOTH, LOSS_RECORD};
use crate::tensor::Dims;
use anyhow::{ensure, Result};
use rayon::prelude::*;

const ROWS: usize = 4096;

/// Softmax of one voxel's logits into `p`; returns log-sum-exp.
fn softmax<T: Float>(z: &[T], p: &mut [f64]) -> f64 {
    let max = z.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.to_f64()));
    let mut sum = 0.0;
    for (p, v) in p.iter_mut().zip(z) {
        *p = (v.to_f64() - max).exp();
        sum += *p;
    }
    p.iter_mut().for_each(|p| *p /= sum);
    max + sum.ln()
}

/// Per-sample sums of one output: intersection, prediction and ground truth per class, and
/// the summed cross-entropy.
#[derive(Clone, Debug)]
pub struct Sums {
    pub inter: Vec<f64>,
    pub pred: Vec<f64>,
    pub gt: Vec<f64>,
    pub ce: f64,
}

impl Sums {
    pub fn zeros(n: usize) -> Sums {
        Sums { inter: vec![0.0; n], pred: vec![0.0; n], gt: vec![0.0; n], ce: 0.0 }
    }
    pub fn add(&mut self, o: &Sums) {
        for i in 0..self.inter.len() {
            self.inter[i] += o.inter[i];
            self.pred[i] += o.pred[i];
            self.gt[i] += o.gt[i];
        }
        self.ce += o.ce;
    }
}

/// The Dice terms the gradient needs, shared by every backend.
pub struct DiceTerms {
    pub parts: LossParts,
    /// Per group (the batch, or each sample), per class: (dc, 1 / denominator).
    pub coef: Vec<Vec<(f64, f64)>>,
    /// Number of averaged Dice terms (groups x foreground classes).
    pub terms: f64,
    /// Voxels the CE is averaged over: every labelled (not ignored) voxel of the batch.
    pub total_vox: f64,
}

/// Loss parts and gradient coefficients from per-sample sums (the CE 0 when no voxel is
/// labelled, as PyTorch's ignore_index makes nnU-Net's).
pub fn dice_terms(per_sample: &[Sums], mode: DiceMode) -> DiceTerms {
    let c = per_sample[0].inter.len();
    let groups: Vec<Sums> = match mode {
        DiceMode::Batch => {
            let mut all = Sums::zeros(c);
            per_sample.iter().for_each(|s| all.add(s));
            vec![all]
        }
        DiceMode::PerSample => per_sample.to_vec(),
    };
    let terms = (groups.len() * (c - 1)) as f64;
    let mut dice_sum = 0.0;
    let coef = groups
        .iter()
        .map(|s| {
            (0..c)
                .map(|k| {
                    let denom = (s.gt[k] + s.pred[k] + DICE_SMOOTH).max(1e-8);
                    let dc = (2.0 * s.inter[k] + DICE_SMOOTH) / denom;
                    if k > 0 {
                        dice_sum += dc;
                    }
                    (dc, 1.0 / denom)
                })
                .collect()
        })
        .collect();
    let total_vox: f64 = per_sample.iter().map(|s| s.gt.iter().sum::<f64>()).sum();
    let ce = if total_vox > 0.0 { per_sample.iter().map(|s| s.ce).sum::<f64>() / total_vox } else { 0.0 };
    DiceTerms { parts: LossParts { ce, dice: -dice_sum / terms }, coef, terms, total_vox }
}

/// Forward and backward in one call: returns the record the backend stores ([CE, Dice term,
/// largest label]) and overwrites `logits` with `weight * dL/dlogits`. With `ignore`, voxels
/// labelled with the class count are ignored; any other label not below the class count gives
/// NaN loss parts and leaves `logits` alone (the step is not applied).
pub fn softmax_dice_ce<T: Float>(logits: &mut [T], ld: Dims, labels: &[u8], mode: DiceMode, ignore: bool, weight: f64) -> Result<[f64; LOSS_RECORD]> {
    let (c, v, n) = (ld.c, ld.voxels(), ld.n);
    ensure!(c >= 2, "the loss needs at least 2 classes (background + 1), got {c}");
    ensure!(logits.len() == ld.len() && labels.len() == ld.rows(), "loss: logits {} and labels {} do not match {}", logits.len(), labels.len(), ld);
    let max_label = labels.iter().copied().max().unwrap_or(0) as f64;
    if max_label as usize >= c + ignore as usize {
        return Ok([f64::NAN, f64::NAN, max_label]);
    }
    // Pass 1: per-chunk sums, one chunk never spans two samples (v % ROWS handled by split).
    let chunks: Vec<(usize, usize)> = (0..n).flat_map(|b| (0..v.div_ceil(ROWS)).map(move |k| (b, k))).collect();
    let lref: &[T] = logits;
    let partial: Vec<(usize, Sums)> = chunks
        .par_iter()
        .map(|&(b, k)| {
            let (lo, hi) = (b * v + k * ROWS, b * v + ((k + 1) * ROWS).min(v));
            let mut s = Sums::zeros(c);
            let mut p = vec![0.0; c];
            for r in lo..hi {
                let y = labels[r] as usize;
                if y == c {
                    continue;
                }
                let lse = softmax(&lref[r * c..(r + 1) * c], &mut p);
                s.ce += lse - lref[r * c + y].to_f64();
                s.inter[y] += p[y];
                s.gt[y] += 1.0;
                s.pred.iter_mut().zip(&p).for_each(|(a, &p)| *a += p);
            }
            (b, s)
        })
        .collect();
    let mut per_sample = vec![Sums::zeros(c); n];
    for (b, s) in &partial {
        per_sample[*b].add(s);
    }
    let DiceTerms { parts, coef, terms, total_vox } = dice_terms(&per_sample, mode);

    // Pass 2: dL/dz = p * (g - sum_k p_k g_k), g = dL/dp.
    logits.par_chunks_mut(ROWS * c).enumerate().for_each(|(ci, lc)| {
        let (mut p, mut g) = (vec![0.0; c], vec![0.0; c]);
        for (i, z) in lc.chunks_exact_mut(c).enumerate() {
            let r = ci * ROWS + i;
            let y = labels[r] as usize;
            if y == c {
                z.iter_mut().for_each(|z| *z = T::from_f64(0.0));
                continue;
            }
            let cf = &coef[if mode == DiceMode::Batch { 0 } else { r / v }];
            softmax(z, &mut p);
            g[0] = 0.0;
            for k in 1..c {
                let yk = if k == y { 1.0 } else { 0.0 };
                g[k] = -(2.0 * yk - cf[k].0) * cf[k].1 / terms;
            }
            let pg: f64 = p.iter().zip(&g).map(|(p, g)| p * g).sum();
            for k in 0..c {
                let yk = if k == y { 1.0 } else { 0.0 };
                let dce = (p[k] - yk) / total_vox;
                z[k] = T::from_f64(weight * (dce + p[k] * (g[k] - pg)));
            }
        }
    });
    Ok([parts.ce, parts.dice, max_label])
}
