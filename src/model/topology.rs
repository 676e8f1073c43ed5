//! PlainConvUNet described as data: what the planner writes and the model builds from.

use crate::backend::{ConvGeom, ConvTGeom, DiceMode};
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

/// nnU-Net's PlainConvUNet: per stage `convs_per_stage` x (conv, instance norm, LeakyReLU),
/// the first conv of a stage strided; the decoder upsamples with a transposed conv, concats
/// the skip, runs `convs_per_stage` convs and has a 1x1x1 seg head per stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    pub in_channels: usize,
    pub n_classes: usize,
    pub features: Vec<usize>,
    pub kernels: Vec<[usize; 3]>,
    pub strides: Vec<[usize; 3]>,
    #[serde(default = "two")]
    pub convs_per_stage: usize,
    #[serde(default = "yes")]
    pub deep_supervision: bool,
    #[serde(default = "batch_dice")]
    pub dice: DiceMode,
    /// Label value `label_limit()` (`n_classes`, or above the regions' highest) is nnU-Net's
    /// ignore label: no output, no loss, no score.
    #[serde(default)]
    pub ignore_label: bool,
    /// A region net (nnU-Net's region-based training): one sigmoid output per region
    /// (`n_classes` = their count), each the label values it covers; empty for a softmax net.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<Vec<i64>>,
}

fn two() -> usize {
    2
}
fn yes() -> bool {
    true
}
fn batch_dice() -> DiceMode {
    DiceMode::Batch
}

/// nnU-Net's feature rule: min(base * 2^i, max).
pub fn nnunet_features(stages: usize, base: usize, max: usize) -> Vec<usize> {
    (0..stages).map(|i| (base << i).min(max)).collect()
}

impl Topology {
    /// Isotropic 3x3x3 net with stride-2 pooling in every stage but the first.
    pub fn isotropic(in_channels: usize, n_classes: usize, features: Vec<usize>) -> Topology {
        let n = features.len();
        Topology {
            in_channels,
            n_classes,
            kernels: vec![[3, 3, 3]; n],
            strides: (0..n).map(|i| if i == 0 { [1, 1, 1] } else { [2, 2, 2] }).collect(),
            features,
            convs_per_stage: 2,
            deep_supervision: true,
            dice: DiceMode::Batch,
            ignore_label: false,
            regions: Vec::new(),
        }
    }

    /// Label values the loss takes: below this (the ignore label, this value, aside).
    pub fn label_limit(&self) -> usize {
        match self.regions.iter().flatten().max() {
            Some(&top) => top as usize + 1,
            None => self.n_classes,
        }
    }

    pub fn stages(&self) -> usize {
        self.features.len()
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.stages();
        ensure!(n >= 2, "a U-Net needs at least 2 stages, got {n}");
        ensure!(self.kernels.len() == n && self.strides.len() == n, "features, kernels and strides must list {n} stages each");
        if self.regions.is_empty() {
            ensure!(self.in_channels >= 1 && self.n_classes >= 2, "need >= 1 input channel and >= 2 classes (background included)");
        } else {
            ensure!(self.in_channels >= 1 && self.n_classes == self.regions.len(), "a region net has one output per region: {} outputs for {} regions", self.n_classes, self.regions.len());
            crate::backend::RegionMasks::new(&self.regions)?;
            ensure!(!self.ignore_label || self.label_limit() < crate::backend::REGION_LABELS, "with an ignore label, region label values must lie below {}", crate::backend::REGION_LABELS - 1);
        }
        ensure!(self.n_classes <= 256, "at most 256 classes (labels are u8)");
        ensure!(self.strides[0] == [1, 1, 1], "the first stage must have stride 1 (it runs at full resolution)");
        ensure!(self.convs_per_stage >= 1, "at least one conv per stage");
        ensure!(self.features.iter().all(|&f| f > 0), "features must be positive");
        for (i, (k, s)) in self.kernels.iter().zip(&self.strides).enumerate() {
            if k.iter().any(|&k| k != 1 && k != 3) || s.iter().any(|&s| s != 1 && s != 2) {
                bail!("stage {i}: kernels must be 1 or 3 and strides 1 or 2 per axis, got {k:?} / {s:?}");
            }
        }
        Ok(())
    }

    /// Spatial size of every stage for a patch; errors unless the patch divides evenly.
    pub fn stage_spatial(&self, patch: [usize; 3]) -> Result<Vec<[usize; 3]>> {
        self.validate()?;
        let mut cur = patch;
        let mut out = Vec::new();
        for (i, s) in self.strides.iter().enumerate() {
            for a in 0..3 {
                ensure!(cur[a].is_multiple_of(s[a]) && cur[a] >= s[a], "patch {patch:?} is not divisible by the strides down to stage {i} (axis {a})");
            }
            cur = std::array::from_fn(|a| cur[a] / s[a]);
            out.push(cur);
        }
        Ok(out)
    }

    /// Input channels of conv `j` of encoder stage `s`.
    pub fn enc_geom(&self, s: usize, j: usize) -> ConvGeom {
        let cin = match (s, j) {
            (0, 0) => self.in_channels,
            (_, 0) => self.features[s - 1],
            _ => self.features[s],
        };
        let stride = if j == 0 { self.strides[s] } else { [1, 1, 1] };
        ConvGeom::new(cin, self.features[s], self.kernels[s], stride)
    }

    /// Conv `j` of the decoder stage at resolution `s` (its first conv sees the concat).
    pub fn dec_geom(&self, s: usize, j: usize) -> ConvGeom {
        let cin = if j == 0 { 2 * self.features[s] } else { self.features[s] };
        ConvGeom::new(cin, self.features[s], self.kernels[s], [1, 1, 1])
    }

    /// Transposed conv from stage s+1 up to stage s.
    pub fn up_geom(&self, s: usize) -> ConvTGeom {
        ConvTGeom { cin: self.features[s + 1], cout: self.features[s], stride: self.strides[s + 1] }
    }

    pub fn head_geom(&self, s: usize) -> ConvGeom {
        ConvGeom::new(self.features[s], self.n_classes, [1, 1, 1], [1, 1, 1])
    }

    /// Loss weight of the decoder output at resolution `s` (0 = full resolution): nnU-Net's
    /// 1/2^s, the lowest resolution at 0, normalised. Without deep supervision only s = 0.
    pub fn ds_weights(&self) -> Vec<f64> {
        let outs = self.stages() - 1;
        if !self.deep_supervision || outs == 1 {
            return (0..outs).map(|s| if s == 0 { 1.0 } else { 0.0 }).collect();
        }
        let mut w: Vec<f64> = (0..outs).map(|s| 0.5f64.powi(s as i32)).collect();
        w[outs - 1] = 0.0;
        let sum: f64 = w.iter().sum();
        w.iter().map(|v| v / sum).collect()
    }

    /// (forward, backward) FLOPs of one training step counted from the convolutions:
    /// 2 x MACs of every conv, transposed conv and supervised head; backward is dgrad plus
    /// wgrad of each, less the first conv's dgrad (the image needs no gradient).
    /// Recompute work of checkpointing is not counted: this is the useful work.
    pub fn step_flops(&self, patch: [usize; 3], batch: usize) -> Result<(f64, f64)> {
        let sp = self.stage_spatial(patch)?;
        let w = self.ds_weights();
        let d = |s: usize, c: usize| crate::tensor::Dims::new(batch, sp[s], c);
        let mut fwd = 0.0;
        for s in 0..self.stages() {
            for j in 0..self.convs_per_stage {
                let cin = self.enc_geom(s, j).cin;
                let input = if j == 0 && s > 0 { d(s - 1, cin) } else if j == 0 { crate::tensor::Dims::new(batch, patch, cin) } else { d(s, cin) };
                fwd += self.enc_geom(s, j).flops(input);
            }
        }
        for s in 0..self.stages() - 1 {
            fwd += self.up_geom(s).flops(d(s + 1, self.features[s + 1]));
            for j in 0..self.convs_per_stage {
                fwd += self.dec_geom(s, j).flops(d(s, self.dec_geom(s, j).cin));
            }
            if w[s] > 0.0 {
                fwd += self.head_geom(s).flops(d(s, self.features[s]));
            }
        }
        let first = self.enc_geom(0, 0).flops(crate::tensor::Dims::new(batch, patch, self.in_channels));
        Ok((fwd, 2.0 * fwd - first))
    }
}
