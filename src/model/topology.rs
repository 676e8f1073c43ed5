//! The U-Net described as data (nnU-Net's PlainConvUNet, or its ResidualEncoderUNet): what
//! the planner writes and the model builds from.

use crate::backend::{ConvGeom, ConvTGeom, DiceMode};
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

/// nnU-Net's PlainConvUNet: per stage `convs_per_stage` x (conv, instance norm, LeakyReLU),
/// the first conv of a stage strided; the decoder upsamples with a transposed conv, concats
/// the skip, runs `convs_per_stage` convs and has a 1x1x1 seg head per stage. With
/// `blocks_per_stage`, nnU-Net's ResidualEncoderUNet (the ResEnc presets): a stem conv, then
/// per encoder stage that many ResNet-D basic blocks ([`ResBlock`]); the same decoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    pub in_channels: usize,
    pub n_classes: usize,
    pub features: Vec<usize>,
    pub kernels: Vec<[usize; 3]>,
    pub strides: Vec<[usize; 3]>,
    /// Convs per decoder stage, and per encoder stage of a PlainConvUNet.
    #[serde(default = "two")]
    pub convs_per_stage: usize,
    /// Residual blocks per encoder stage (ResidualEncoderUNet's n_blocks_per_stage); empty
    /// for a PlainConvUNet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks_per_stage: Vec<usize>,
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
    /// nnU-Net's 2d network (Conv2d), run as a 3D net over patches one slice deep: kernels
    /// and strides 1 along the first axis; its weights have PyTorch's 2D shapes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub planar: bool,
}

/// One ResNet-D basic block (dynamic_network_architectures' BasicBlockD): conv1 -> norm ->
/// LeakyReLU -> conv2 -> norm, plus the skip, then LeakyReLU. The skip is the input, average
/// pooled by the stride when the block is strided, then projected by a 1x1x1 conv without
/// bias + norm when the width changes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResBlock {
    pub conv1: ConvGeom,
    pub conv2: ConvGeom,
    pub pool: Option<[usize; 3]>,
    pub proj: Option<ConvGeom>,
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
            blocks_per_stage: Vec::new(),
            planar: false,
        }
    }

    /// The same net as nnU-Net's 2d network: kernels and strides lose their first axis.
    pub fn as_2d(mut self) -> Topology {
        self.kernels.iter_mut().for_each(|k| k[0] = 1);
        self.strides.iter_mut().for_each(|s| s[0] = 1);
        self.planar = true;
        self
    }

    /// A residual-encoder U-Net (nnU-Net's ResEnc presets) with these blocks per stage and
    /// one conv per decoder stage, as the presets have.
    pub fn residual(mut self, blocks_per_stage: Vec<usize>) -> Topology {
        self.blocks_per_stage = blocks_per_stage;
        self.convs_per_stage = 1;
        self
    }

    /// The axes nnU-Net mirrors (in training and at test time): all three, a 2d net's two
    /// in-plane ones.
    pub fn mirror_axes(&self) -> Vec<usize> {
        if self.planar { vec![1, 2] } else { vec![0, 1, 2] }
    }

    /// Axes as nnU-Net numbers them for this net (a 2d net has axes 0 and 1), as segk's.
    pub fn axes_from_nnunet(&self, axes: &[usize]) -> Vec<usize> {
        axes.iter().map(|&a| a + usize::from(self.planar)).filter(|&a| a < 3).collect()
    }

    pub fn is_residual(&self) -> bool {
        !self.blocks_per_stage.is_empty()
    }

    /// A residual encoder's stem: one conv + norm + LeakyReLU at the first stage's width.
    pub fn stem_geom(&self) -> ConvGeom {
        ConvGeom::new(self.in_channels, self.features[0], self.kernels[0], [1, 1, 1])
    }

    /// Block `j` of residual encoder stage `s`.
    pub fn res_block(&self, s: usize, j: usize) -> ResBlock {
        let f = self.features[s];
        let cin = match (s, j) {
            (0, _) | (_, 1..) => f,
            _ => self.features[s - 1],
        };
        let stride = if j == 0 { self.strides[s] } else { [1, 1, 1] };
        ResBlock {
            conv1: ConvGeom::new(cin, f, self.kernels[s], stride),
            conv2: ConvGeom::new(f, f, self.kernels[s], [1, 1, 1]),
            pool: (stride != [1, 1, 1]).then_some(stride),
            proj: (cin != f).then(|| ConvGeom::new(cin, f, [1, 1, 1], [1, 1, 1])),
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
        ensure!(self.blocks_per_stage.is_empty() || (self.blocks_per_stage.len() == n && self.blocks_per_stage.iter().all(|&b| b >= 1)), "a residual encoder needs at least one block in each of its {n} stages, got {:?}", self.blocks_per_stage);
        ensure!(self.features.iter().all(|&f| f > 0), "features must be positive");
        ensure!(!self.planar || self.kernels.iter().chain(&self.strides).all(|k| k[0] == 1), "a 2d net has kernels and strides 1 along the first axis");
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
        let image = crate::tensor::Dims::new(batch, patch, self.in_channels);
        if self.is_residual() {
            fwd += self.stem_geom().flops(image);
            for s in 0..self.stages() {
                for j in 0..self.blocks_per_stage[s] {
                    let rb = self.res_block(s, j);
                    let input = if j == 0 && s > 0 { d(s - 1, rb.conv1.cin) } else { d(s, rb.conv1.cin) };
                    fwd += rb.conv1.flops(input) + rb.conv2.flops(d(s, rb.conv2.cin)) + rb.proj.map_or(0.0, |g| g.flops(d(s, g.cin)));
                }
            }
        }
        for s in (0..self.stages()).filter(|_| !self.is_residual()) {
            for j in 0..self.convs_per_stage {
                let cin = self.enc_geom(s, j).cin;
                let input = if j == 0 && s > 0 { d(s - 1, cin) } else if j == 0 { image } else { d(s, cin) };
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
        let first = if self.is_residual() { self.stem_geom() } else { self.enc_geom(0, 0) }.flops(image);
        Ok((fwd, 2.0 * fwd - first))
    }
}
