//! Softmax + soft Dice + cross-entropy (nnU-Net's DC_and_CE_loss, weights 1:1).
//! Pass 1 gathers per (sample, class) intersection / prediction / ground-truth sums and the
//! CE sum; pass 2 recomputes the softmax per voxel and writes the gradient over the logits.
//! With an ignore label (label value = class count) its voxels take no part: not in the Dice
//! sums (nnU-Net's loss mask), not in the CE or its mean (ignore_index), gradient zero.
//! Region-based nets: a sigmoid per region, soft Dice over every region and binary CE
//! (nnU-Net's DC_and_BCE_loss), the targets the region masks of the label map; an ignore
//! label masks its voxels out as nnU-Net's loss mask does.

use super::Float;
use crate::backend::{DiceMode, LossParts, RegionMasks, DICE_SMOOTH, LOSS_RECORD, MAX_REGIONS, REGION_LABELS};
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
    /// Number of averaged Dice terms (groups x scored classes).
    pub terms: f64,
    /// Voxels the CE is averaged over: every labelled (not ignored) voxel of the batch.
    pub total_vox: f64,
}

/// Loss parts and gradient coefficients from per-sample sums: Dice over the classes from
/// `first` on (1: foreground of a softmax; 0: every region), the CE averaged over `ce_count`
/// (0 when that is 0, as PyTorch's ignore_index makes nnU-Net's with nothing labelled).
pub fn dice_terms(per_sample: &[Sums], mode: DiceMode, first: usize, ce_count: f64) -> DiceTerms {
    let c = per_sample[0].inter.len();
    let groups: Vec<Sums> = match mode {
        DiceMode::Batch => {
            let mut all = Sums::zeros(c);
            per_sample.iter().for_each(|s| all.add(s));
            vec![all]
        }
        DiceMode::PerSample => per_sample.to_vec(),
    };
    let terms = (groups.len() * (c - first)) as f64;
    let mut dice_sum = 0.0;
    let coef = groups
        .iter()
        .map(|s| {
            (0..c)
                .map(|k| {
                    let denom = (s.gt[k] + s.pred[k] + DICE_SMOOTH).max(1e-8);
                    let dc = (2.0 * s.inter[k] + DICE_SMOOTH) / denom;
                    if k >= first {
                        dice_sum += dc;
                    }
                    (dc, 1.0 / denom)
                })
                .collect()
        })
        .collect();
    let ce = if ce_count > 0.0 { per_sample.iter().map(|s| s.ce).sum::<f64>() / ce_count } else { 0.0 };
    DiceTerms { parts: LossParts { ce, dice: -dice_sum / terms }, coef, terms, total_vox: ce_count }
}

/// Forward and backward in one call: returns the record the backend stores ([CE, Dice term,
/// largest label]) and overwrites `logits` with `weight * dL/dlogits`. With `ignore`, voxels
/// labelled with the class count are ignored; any other label not below the class count gives
/// NaN loss parts and leaves `logits` alone (the step is not applied).
pub fn softmax_dice_ce<T: Float>(logits: &mut [T], ld: Dims, labels: &[u8], mode: DiceMode, ignore: bool, weight: f64) -> Result<[f64; LOSS_RECORD]> {
    let (c, v) = (ld.c, ld.voxels());
    ensure!(c >= 2, "the loss needs at least 2 classes (background + 1), got {c}");
    ensure!(logits.len() == ld.len() && labels.len() == ld.rows(), "loss: logits {} and labels {} do not match {}", logits.len(), labels.len(), ld);
    let max_label = labels.iter().copied().max().unwrap_or(0) as f64;
    if max_label as usize >= c + ignore as usize {
        return Ok([f64::NAN, f64::NAN, max_label]);
    }
    let lref: &[T] = logits;
    let per_sample = per_sample_sums(ld, |rows, s| {
        let mut p = vec![0.0; c];
        for r in rows {
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
    });
    // Every labelled voxel is in exactly one class's ground truth.
    let labelled: f64 = per_sample.iter().map(|s| s.gt.iter().sum::<f64>()).sum();
    let DiceTerms { parts, coef, terms, total_vox } = dice_terms(&per_sample, mode, 1, labelled);

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

/// Pass 1 of both losses: per-sample sums of one output, `add` summing rows into a chunk's
/// sums, chunks of ROWS voxels that never span two samples, merged in chunk order.
fn per_sample_sums(ld: Dims, add: impl Fn(std::ops::Range<usize>, &mut Sums) + Sync) -> Vec<Sums> {
    let (c, v, n) = (ld.c, ld.voxels(), ld.n);
    let chunks: Vec<(usize, usize)> = (0..n).flat_map(|b| (0..v.div_ceil(ROWS)).map(move |k| (b, k))).collect();
    let partial: Vec<(usize, Sums)> = chunks
        .par_iter()
        .map(|&(b, k)| {
            let mut s = Sums::zeros(c);
            add(b * v + k * ROWS..b * v + ((k + 1) * ROWS).min(v), &mut s);
            (b, s)
        })
        .collect();
    let mut per_sample = vec![Sums::zeros(c); n];
    for (b, s) in &partial {
        per_sample[*b].add(s);
    }
    per_sample
}

/// Per-sample region sums of one output; voxels labelled `ignore` left out.
fn region_sums<T: Float>(logits: &[T], ld: Dims, labels: &[u8], regions: &RegionMasks, ignore: Option<u8>) -> Vec<Sums> {
    let c = ld.c;
    per_sample_sums(ld, |rows, s| {
        for r in rows.filter(|&r| Some(labels[r]) != ignore) {
            for j in 0..c {
                let z = logits[r * c + j].to_f64();
                let (p, y) = (sigmoid(z), regions.contains(j, labels[r]) as u8 as f64);
                // -[y ln p + (1 - y) ln(1 - p)], stable for large |z|.
                s.ce += z.max(0.0) - z * y + (-z.abs()).exp().ln_1p();
                s.inter[j] += p * y;
                s.pred[j] += p;
                s.gt[j] += y;
            }
        }
    })
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Region-based loss, forward and backward in one call (see `Backend::sigmoid_dice_bce`):
/// returns [BCE, Dice term, largest label] and overwrites `logits` with `weight * dL/dlogits`.
/// A label value of 32 or more gives NaN parts and leaves `logits` alone. With `ignore`, voxels
/// labelled `regions.ignore_value()` take no part (nnU-Net's loss mask): not in the Dice sums,
/// gradient zero, and the BCE summed over the other voxels' regions is divided by their count
/// alone (not times the regions, as nnU-Net's masked DC_and_BCE_loss does).
pub fn sigmoid_dice_bce<T: Float>(logits: &mut [T], ld: Dims, labels: &[u8], regions: &RegionMasks, mode: DiceMode, ignore: bool, weight: f64) -> Result<[f64; LOSS_RECORD]> {
    let (c, v) = (ld.c, ld.voxels());
    ensure!((1..=MAX_REGIONS).contains(&c), "the region loss needs 1 to {MAX_REGIONS} regions, got {c}");
    ensure!(logits.len() == ld.len() && labels.len() == ld.rows(), "loss: logits {} and labels {} do not match {}", logits.len(), labels.len(), ld);
    let max_label = labels.iter().copied().max().unwrap_or(0) as f64;
    if max_label as usize >= REGION_LABELS {
        return Ok([f64::NAN, f64::NAN, max_label]);
    }
    let ignore = ignore.then(|| regions.ignore_value());
    let per_sample = region_sums(logits, ld, labels, regions, ignore);
    let ce_count = match ignore {
        Some(i) => labels.iter().filter(|&&l| l != i).count() as f64,
        None => ld.len() as f64,
    };
    let DiceTerms { parts, coef, terms, total_vox } = dice_terms(&per_sample, mode, 0, ce_count);
    logits.par_chunks_mut(ROWS * c).enumerate().for_each(|(ci, lc)| {
        for (i, z) in lc.chunks_exact_mut(c).enumerate() {
            let r = ci * ROWS + i;
            if Some(labels[r]) == ignore {
                z.iter_mut().for_each(|z| *z = T::from_f64(0.0));
                continue;
            }
            let cf = &coef[if mode == DiceMode::Batch { 0 } else { r / v }];
            for (j, zj) in z.iter_mut().enumerate() {
                let (p, y) = (sigmoid(zj.to_f64()), regions.contains(j, labels[r]) as u8 as f64);
                let g = -(2.0 * y - cf[j].0) * cf[j].1 / terms;
                *zj = T::from_f64(weight * ((p - y) / total_vox + p * (1.0 - p) * g));
            }
        }
    });
    Ok([parts.ce, parts.dice, max_label])
}
