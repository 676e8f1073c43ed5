//! nnU-Net's intensity normalisation schemes, chosen per channel from its name in
//! dataset.json ("CT", "noNorm", "zscore", "rescale_to_0_1", "rgb_to_0_1"; anything else is
//! z-score). Statistics accumulate in f64; the volume stays f32.

use crate::plan::fingerprint::IntensityStats;
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Ct,
    ZScore,
    NoNorm,
    RescaleTo01,
    RgbTo01,
}

impl Scheme {
    /// The scheme nnU-Net maps a channel name to (case-insensitive).
    pub fn for_channel(name: &str) -> Scheme {
        match name.to_lowercase().as_str() {
            "ct" => Scheme::Ct,
            "nonorm" => Scheme::NoNorm,
            "rescale_to_0_1" => Scheme::RescaleTo01,
            "rgb_to_0_1" => Scheme::RgbTo01,
            _ => Scheme::ZScore,
        }
    }
    /// nnU-Net's class name, as plans.json spells it.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Ct => "CTNormalization",
            Scheme::ZScore => "ZScoreNormalization",
            Scheme::NoNorm => "NoNormalization",
            Scheme::RescaleTo01 => "RescaleTo01Normalization",
            Scheme::RgbTo01 => "RGBTo01Normalization",
        }
    }
    pub fn from_name(name: &str) -> Result<Scheme> {
        Ok(match name {
            "CTNormalization" => Scheme::Ct,
            "ZScoreNormalization" => Scheme::ZScore,
            "NoNormalization" => Scheme::NoNorm,
            "RescaleTo01Normalization" => Scheme::RescaleTo01,
            "RGBTo01Normalization" => Scheme::RgbTo01,
            other => bail!("unknown normalization scheme {other:?}"),
        })
    }
    /// Whether the scheme may normalise inside the nonzero mask only (only z-score keeps
    /// the outside at zero, so only it can).
    pub fn can_use_mask(self) -> bool {
        self == Scheme::ZScore
    }
}

const EPS: f64 = 1e-8;

/// Mean and (population) standard deviation of the selected voxels, two-pass in f64.
fn mean_std(img: &[f32], keep: impl Fn(usize) -> bool) -> (f64, f64) {
    let (mut n, mut sum) = (0usize, 0.0f64);
    for (i, &v) in img.iter().enumerate() {
        if keep(i) {
            n += 1;
            sum += v as f64;
        }
    }
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = sum / n as f64;
    let var = img.iter().enumerate().filter(|(i, _)| keep(*i)).map(|(_, &v)| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    (mean, var.sqrt())
}

/// Normalises one channel in place. `seg` marks voxels outside the nonzero mask with a
/// negative label; with `use_mask` z-score uses and changes only the voxels inside.
pub fn normalize(img: &mut [f32], scheme: Scheme, use_mask: bool, seg: &[i16], stats: &IntensityStats) -> Result<()> {
    match scheme {
        Scheme::Ct => {
            let (lo, hi) = (stats.percentile_00_5 as f32, stats.percentile_99_5 as f32);
            let (mean, inv) = (stats.mean as f32, (1.0 / stats.std.max(EPS)) as f32);
            img.iter_mut().for_each(|v| *v = (v.clamp(lo, hi) - mean) * inv);
        }
        Scheme::ZScore if use_mask => {
            let (mean, std) = mean_std(img, |i| seg[i] >= 0);
            let (m, inv) = (mean as f32, (1.0 / std.max(EPS)) as f32);
            img.iter_mut().zip(seg).filter(|(_, &s)| s >= 0).for_each(|(v, _)| *v = (*v - m) * inv);
        }
        Scheme::ZScore => {
            let (mean, std) = mean_std(img, |_| true);
            let (m, inv) = (mean as f32, (1.0 / std.max(EPS)) as f32);
            img.iter_mut().for_each(|v| *v = (*v - m) * inv);
        }
        Scheme::NoNorm => {}
        Scheme::RescaleTo01 => {
            let lo = img.iter().cloned().fold(f32::INFINITY, f32::min);
            let hi = img.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let inv = 1.0 / ((hi - lo) as f64).max(EPS) as f32;
            img.iter_mut().for_each(|v| *v = (*v - lo) * inv);
        }
        Scheme::RgbTo01 => {
            if img.iter().any(|&v| !(0.0..=255.0).contains(&v)) {
                bail!("rgb_to_0_1 expects values in 0..=255 (8-bit RGB), found values outside");
            }
            img.iter_mut().for_each(|v| *v /= 255.0);
        }
    }
    Ok(())
}
