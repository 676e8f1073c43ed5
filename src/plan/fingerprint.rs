//! nnU-Net v2's dataset fingerprint: per case, crop to the nonzero region (union over
//! channels, holes filled), record spacing and shape after cropping, and sample foreground
//! intensities per channel (1e8 / cases per case, with replacement, seeded); then pool the
//! samples into per-channel intensity statistics (what CT normalisation uses).

use crate::imageio;
use crate::dataset::{Case, Dataset};
use anyhow::{ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use rayon::prelude::*;

/// segk's own name for the file (its layout is not nnU-Net's dataset_fingerprint.json, which it
/// must not replace where both tools share $nnUNet_preprocessed).
pub const FILE: &str = "segk_fingerprint.json";
use serde::{Deserialize, Serialize};

/// nnU-Net's total foreground sample budget over the dataset.
pub const FOREGROUND_SAMPLES: usize = 100_000_000;
pub const SEED: u64 = 1234;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IntensityStats {
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub percentile_99_5: f64,
    pub percentile_00_5: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Per case, [z, y, x].
    pub spacings: Vec<[f64; 3]>,
    pub shapes_after_crop: Vec<[usize; 3]>,
    /// Voxels after cropping / before, per case.
    pub relative_size_after_cropping: Vec<f64>,
    pub foreground_intensity_properties_per_channel: Vec<IntensityStats>,
}

/// Mask of voxels nonzero in any channel, with enclosed holes filled (scipy's
/// binary_fill_holes: background not connected to the border becomes foreground).
pub fn nonzero_mask(channels: &[&[f32]], shape: [usize; 3]) -> Vec<bool> {
    let n = shape.iter().product();
    let mut mask: Vec<bool> = (0..n).map(|i| channels.iter().any(|c| c[i] != 0.0)).collect();
    // Flood the background from the border (6-connected); what it cannot reach is a hole.
    // Flat u32 indices on a stack: reachability does not care about visiting order.
    let [d, h, w] = shape;
    let mut outside = vec![false; n];
    let mut stack: Vec<u32> = Vec::new();
    let seed = |i: usize, outside: &mut Vec<bool>, stack: &mut Vec<u32>| {
        if !mask[i] && !outside[i] {
            outside[i] = true;
            stack.push(i as u32);
        }
    };
    for z in 0..d {
        for y in 0..h {
            let row = (z * h + y) * w;
            if z == 0 || z == d - 1 || y == 0 || y == h - 1 {
                (row..row + w).for_each(|i| seed(i, &mut outside, &mut stack));
            } else {
                seed(row, &mut outside, &mut stack);
                seed(row + w - 1, &mut outside, &mut stack);
            }
        }
    }
    let plane = h * w;
    while let Some(i) = stack.pop() {
        let i = i as usize;
        let (z, y, x) = (i / plane, (i / w) % h, i % w);
        let mut visit = |j: usize| {
            if !mask[j] && !outside[j] {
                outside[j] = true;
                stack.push(j as u32);
            }
        };
        if z > 0 { visit(i - plane) }
        if z + 1 < d { visit(i + plane) }
        if y > 0 { visit(i - w) }
        if y + 1 < h { visit(i + w) }
        if x > 0 { visit(i - 1) }
        if x + 1 < w { visit(i + 1) }
    }
    mask.iter_mut().zip(&outside).for_each(|(m, &o)| *m = !o);
    mask
}

/// Bounding box [lo, hi) per axis of the true voxels; the whole volume when none is.
pub fn bounding_box(mask: &[bool], shape: [usize; 3]) -> [[usize; 2]; 3] {
    let (mut lo, mut hi) = (shape, [0usize; 3]);
    let [d, h, w] = shape;
    for z in 0..d {
        for y in 0..h {
            let row = &mask[(z * h + y) * w..][..w];
            let (Some(first), Some(last)) = (row.iter().position(|&m| m), row.iter().rposition(|&m| m)) else { continue };
            let c = [z, y];
            for a in 0..2 {
                lo[a] = lo[a].min(c[a]);
                hi[a] = hi[a].max(c[a] + 1);
            }
            lo[2] = lo[2].min(first);
            hi[2] = hi[2].max(last + 1);
        }
    }
    if hi.contains(&0) {
        return std::array::from_fn(|a| [0, shape[a]]);
    }
    std::array::from_fn(|a| [lo[a], hi[a]])
}

/// Linear-interpolated percentile (numpy's default) of values sorted ascending.
pub fn percentile<T: Copy + Into<f64>>(sorted: &[T], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = p / 100.0 * (sorted.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos.fract());
    let a: f64 = sorted[i].into();
    let b: f64 = sorted[(i + 1).min(sorted.len() - 1)].into();
    // numpy's _lerp: from the nearer end, so that the result is exact at both ends.
    if f >= 0.5 {
        b - (b - a) * (1.0 - f)
    } else {
        a + (b - a) * f
    }
}

/// The same percentile by selection instead of a sort: O(n), reorders `v`.
fn select_percentile(v: &mut [f32], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let pos = p / 100.0 * (v.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos.fract());
    let (_, a, right) = v.select_nth_unstable_by(i, |x, y| x.total_cmp(y));
    let a = *a as f64;
    let b = if f > 0.0 { right.iter().copied().min_by(|x, y| x.total_cmp(y)).map_or(a, |b| b as f64) } else { a };
    a + (b - a) * f
}

/// Pooled foreground statistics (100 M samples in nnU-Net's default: selection, not a sort).
pub fn intensity_stats(mut v: Vec<f32>) -> IntensityStats {
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let (min, max) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| (lo.min(x as f64), hi.max(x as f64)));
    let empty = v.is_empty();
    IntensityStats {
        mean: if empty { f64::NAN } else { mean },
        median: select_percentile(&mut v, 50.0),
        std: if empty { f64::NAN } else { var.sqrt() },
        min: if empty { f64::NAN } else { min },
        max: if empty { f64::NAN } else { max },
        percentile_99_5: select_percentile(&mut v, 99.5),
        percentile_00_5: select_percentile(&mut v, 0.5),
    }
}

struct CaseFingerprint {
    spacing: [f64; 3],
    shape_after_crop: [usize; 3],
    relative_size: f64,
    samples: Vec<Vec<f32>>,
}

fn analyze_case(case: &Case, samples_per_case: usize, seed: u64) -> Result<CaseFingerprint> {
    let seg = imageio::read(&case.label)?;
    let shape = seg.shape;
    let (images, _) = imageio::read_case(&case.images, Some(shape)).with_context(|| format!("case {}: image and label shapes differ (run segk check)", case.id))?;
    let chans: Vec<&[f32]> = images.iter().map(|v| v.as_slice()).collect();
    let bbox = bounding_box(&nonzero_mask(&chans, shape), shape);
    let crop: [usize; 3] = std::array::from_fn(|a| bbox[a][1] - bbox[a][0]);
    let [_, h, w] = shape;
    let inside = |i: usize| {
        let c = [i / (h * w), (i / w) % h, i % w];
        (0..3).all(|a| c[a] >= bbox[a][0] && c[a] < bbox[a][1])
    };
    // Foreground: label > 0 inside the crop (the crop never removes labelled voxels that
    // carry signal; nnU-Net samples from the cropped arrays).
    let fg: Vec<usize> = (0..seg.voxels()).filter(|&i| seg.data[i] > 0.0 && inside(i)).collect();
    let mut rng = Pcg64::seed_from_u64(seed);
    let samples = images
        .iter()
        .map(|v| if fg.is_empty() { Vec::new() } else { (0..samples_per_case).map(|_| v[fg[rng.random_range(0..fg.len())]]).collect() })
        .collect();
    Ok(CaseFingerprint {
        spacing: seg.spacing,
        shape_after_crop: crop,
        relative_size: crop.iter().product::<usize>() as f64 / seg.voxels() as f64,
        samples,
    })
}

/// The fingerprint of a raw dataset; `total_samples` is nnU-Net's 1e8 unless testing.
pub fn fingerprint(ds: &Dataset, total_samples: usize) -> Result<Fingerprint> {
    ensure!(!ds.cases.is_empty(), "{}: no training cases", ds.root.display());
    let per_case = total_samples / ds.cases.len();
    let mut cases: Vec<CaseFingerprint> = ds.cases.par_iter().map(|c| analyze_case(c, per_case, SEED).with_context(|| format!("fingerprinting case {}", c.id))).collect::<Result<_>>()?;
    let channels = ds.json.channels();
    // Pool each channel's samples by moving them case by case, so only one copy is resident.
    let foreground_intensity_properties_per_channel = (0..channels)
        .map(|ch| {
            let mut pooled = Vec::with_capacity(cases.iter().map(|c| c.samples[ch].len()).sum());
            for c in cases.iter_mut() {
                pooled.extend_from_slice(&std::mem::take(&mut c.samples[ch]));
            }
            intensity_stats(pooled)
        })
        .collect();
    Ok(Fingerprint {
        spacings: cases.iter().map(|c| c.spacing).collect(),
        shapes_after_crop: cases.iter().map(|c| c.shape_after_crop).collect(),
        relative_size_after_cropping: cases.iter().map(|c| c.relative_size).collect(),
        foreground_intensity_properties_per_channel,
    })
}
