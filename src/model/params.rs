//! Where every parameter lives in the parameter arena, its nnU-Net-style name, and He init.
//! The arena is [params | grads | momentum], each `len` long, same offsets in each.

use super::topology::Topology;
use crate::backend::{ConvGeom, ConvTGeom};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rand_pcg::Pcg64;

#[derive(Clone, Copy, Debug)]
pub struct ConvParams {
    pub w: usize,
    pub b: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct BlockParams {
    pub conv: ConvParams,
    pub gamma: usize,
    pub beta: usize,
}

/// One named parameter tensor (shape as stored: conv [kd,kh,kw,cin,cout], convT
/// [cin,sd,sh,sw,cout]).
#[derive(Clone, Debug)]
pub struct ParamTensor {
    pub name: String,
    pub offset: usize,
    pub shape: Vec<usize>,
    /// He-init standard deviation; None = constant `fill`.
    pub he_std: Option<f64>,
    pub fill: f32,
    /// Of a 2d net: PyTorch's shape has no first spatial axis (Conv2d).
    pub planar: bool,
}

impl ParamTensor {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A ResNet-D block's parameters; the skip projection's conv has no bias (as in
/// dynamic_network_architectures).
#[derive(Clone, Copy, Debug)]
pub struct ResParams {
    pub conv1: BlockParams,
    pub conv2: BlockParams,
    /// Projection weight, norm scale and shift.
    pub proj: Option<(usize, usize, usize)>,
}

#[derive(Clone, Debug)]
pub struct ParamLayout {
    /// PlainConvUNet encoder convs (empty for a residual encoder).
    pub enc: Vec<Vec<BlockParams>>,
    /// Residual encoder: the stem, and the blocks of each stage.
    pub stem: Option<BlockParams>,
    pub res: Vec<Vec<ResParams>>,
    /// Decoder blocks by resolution s (0 = full resolution).
    pub dec: Vec<Vec<BlockParams>>,
    /// up[s]: transposed conv from stage s+1 to s.
    pub up: Vec<ConvParams>,
    pub head: Vec<ConvParams>,
    pub tensors: Vec<ParamTensor>,
    pub len: usize,
}

/// kaiming_normal_(a=0.01): std = sqrt(2 / (1 + a^2)) / sqrt(fan_in).
fn he_std(fan_in: usize) -> f64 {
    (2.0 / (1.0 + 0.01f64 * 0.01)).sqrt() / (fan_in as f64).sqrt()
}

struct Builder {
    tensors: Vec<ParamTensor>,
    len: usize,
    planar: bool,
}

impl Builder {
    fn push(&mut self, name: String, shape: Vec<usize>, he_std: Option<f64>, fill: f32) -> usize {
        let offset = self.len;
        self.len += shape.iter().product::<usize>();
        self.tensors.push(ParamTensor { name, offset, shape, he_std, fill, planar: self.planar });
        offset
    }
    fn conv(&mut self, prefix: &str, g: &ConvGeom) -> ConvParams {
        let [kd, kh, kw] = g.kernel;
        let w = self.push(format!("{prefix}.weight"), vec![kd, kh, kw, g.cin, g.cout], Some(he_std(g.cin * g.taps())), 0.0);
        let b = self.push(format!("{prefix}.bias"), vec![g.cout], None, 0.0);
        ConvParams { w, b }
    }
    fn convt(&mut self, prefix: &str, g: &ConvTGeom) -> ConvParams {
        let [sd, sh, sw] = g.stride;
        // PyTorch computes ConvTranspose3d's fan_in from weight dim 1, i.e. cout * taps.
        let w = self.push(format!("{prefix}.weight"), vec![g.cin, sd, sh, sw, g.cout], Some(he_std(g.cout * g.taps())), 0.0);
        let b = self.push(format!("{prefix}.bias"), vec![g.cout], None, 0.0);
        ConvParams { w, b }
    }
    fn norm(&mut self, prefix: &str, c: usize) -> (usize, usize) {
        (self.push(format!("{prefix}.norm.weight"), vec![c], None, 1.0), self.push(format!("{prefix}.norm.bias"), vec![c], None, 0.0))
    }
    fn block(&mut self, prefix: &str, g: &ConvGeom) -> BlockParams {
        let conv = self.conv(&format!("{prefix}.conv"), g);
        let (gamma, beta) = self.norm(prefix, g.cout);
        BlockParams { conv, gamma, beta }
    }
    /// A ResNet-D block under dynamic_network_architectures' names: conv1, conv2, and the
    /// skip's projection as `skip.1` after a pooling (`skip.0`), else `skip.0`.
    fn res_block(&mut self, prefix: &str, b: &crate::model::topology::ResBlock) -> ResParams {
        let conv1 = self.block(&format!("{prefix}.conv1"), &b.conv1);
        let conv2 = self.block(&format!("{prefix}.conv2"), &b.conv2);
        // dynamic_network_architectures' init_last_bn_before_add_to_0: each block starts as
        // its skip alone.
        if let Some(t) = self.tensors.iter_mut().find(|t| t.offset == conv2.gamma) {
            t.fill = 0.0;
        }
        let proj = b.proj.map(|g| {
            let at = format!("{prefix}.skip.{}", b.pool.is_some() as usize);
            let w = self.push(format!("{at}.conv.weight"), vec![1, 1, 1, g.cin, g.cout], Some(he_std(g.cin)), 0.0);
            let (gamma, beta) = self.norm(&at, g.cout);
            (w, gamma, beta)
        });
        ResParams { conv1, conv2, proj }
    }
}

impl ParamLayout {
    pub fn new(t: &Topology) -> ParamLayout {
        let (n, c) = (t.stages(), t.convs_per_stage);
        let mut b = Builder { tensors: Vec::new(), len: 0, planar: t.planar };
        let (mut enc, mut stem, mut res) = (Vec::new(), None, Vec::new());
        if t.is_residual() {
            stem = Some(b.block("encoder.stem.convs.0", &t.stem_geom()));
            res = (0..n).map(|s| (0..t.blocks_per_stage[s]).map(|j| b.res_block(&format!("encoder.stages.{s}.blocks.{j}"), &t.res_block(s, j))).collect()).collect();
        } else {
            enc = (0..n).map(|s| (0..c).map(|j| b.block(&format!("encoder.stages.{s}.0.convs.{j}"), &t.enc_geom(s, j))).collect()).collect();
        }
        // nnU-Net numbers decoder modules from the bottom: index n-2-s.
        let mut dec = vec![Vec::new(); n - 1];
        let mut up = vec![ConvParams { w: 0, b: 0 }; n - 1];
        let mut head = vec![ConvParams { w: 0, b: 0 }; n - 1];
        for s in (0..n - 1).rev() {
            let i = n - 2 - s;
            up[s] = b.convt(&format!("decoder.transpconvs.{i}"), &t.up_geom(s));
            dec[s] = (0..c).map(|j| b.block(&format!("decoder.stages.{i}.convs.{j}"), &t.dec_geom(s, j))).collect();
            head[s] = b.conv(&format!("decoder.seg_layers.{i}"), &t.head_geom(s));
        }
        ParamLayout { enc, stem, res, dec, up, head, len: b.len, tensors: b.tensors }
    }

    /// He-normal weights (a = 0.01), zero biases, unit norm scales; deterministic in `seed`.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut rng = Pcg64::seed_from_u64(seed);
        let mut v = vec![0.0f32; self.len];
        for t in &self.tensors {
            let dst = &mut v[t.offset..t.offset + t.len()];
            match t.he_std {
                Some(std) => {
                    let d = Normal::new(0.0, std).expect("positive std");
                    dst.iter_mut().for_each(|x| *x = d.sample(&mut rng) as f32);
                }
                None => dst.fill(t.fill),
            }
        }
        v
    }
}
