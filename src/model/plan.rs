//! The activation plan: where every activation and backward buffer lives in the
//! activation arena for a topology, patch, batch and checkpoint policy, and where the norm
//! statistics live in the (working-precision) statistics arena. The arenas are sized from this
//! plan, so the reported bytes are exactly what a step uses.

use super::topology::Topology;
use crate::tensor::Dims;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// What the forward pass keeps for the backward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Checkpointing {
    /// Keep every activation.
    None,
    /// Keep conv outputs and norm statistics; recompute normalize+LeakyReLU (and the skip
    /// concat) in backward.
    Level1,
    /// Keep stage outputs only; recompute each stage's forward in backward.
    Level2,
}

impl Checkpointing {
    pub fn from_level(l: u8) -> Result<Checkpointing> {
        Ok(match l {
            0 => Checkpointing::None,
            1 => Checkpointing::Level1,
            2 => Checkpointing::Level2,
            _ => bail!("checkpoint level must be 0, 1 or 2, got {l}"),
        })
    }
    pub fn level(&self) -> u8 {
        match self {
            Checkpointing::None => 0,
            Checkpointing::Level1 => 1,
            Checkpointing::Level2 => 2,
        }
    }
}

/// A tensor in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub offset: usize,
    pub dims: Dims,
}

impl Slot {
    pub fn len(&self) -> usize {
        self.dims.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Copy, Debug)]
pub struct BlockSlots {
    pub input: Dims,
    /// Conv output (pre-norm).
    pub x: Slot,
    /// Normalised + activated output.
    pub y: Slot,
    /// Offsets of the per-(sample, channel) statistics in the statistics arena.
    pub mean: usize,
    pub rstd: usize,
}

/// A ResNet-D block's tensors (see [`crate::model::topology::ResBlock`]).
#[derive(Clone, Copy, Debug)]
pub struct ResSlots {
    /// The block's input.
    pub input: Dims,
    /// conv1 -> norm -> LeakyReLU.
    pub c1: BlockSlots,
    /// conv2's output and its norm statistics.
    pub x2: Slot,
    pub mean2: usize,
    pub rstd2: usize,
    /// The input average-pooled by the stride (strided blocks).
    pub pooled: Option<Slot>,
    /// The skip projection's conv output, its statistics, and its normalised output (the
    /// residual) when the width changes.
    pub proj: Option<(Slot, usize, usize, Slot)>,
    /// The block's output, LeakyReLU(norm(conv2) + skip).
    pub y: Slot,
}

#[derive(Clone, Debug)]
pub struct ActPlan {
    pub policy: Checkpointing,
    pub training: bool,
    pub image: Slot,
    /// PlainConvUNet encoder blocks (empty for a residual encoder).
    pub enc: Vec<Vec<BlockSlots>>,
    /// Residual encoder: the stem, and the blocks of each stage.
    pub stem: Option<BlockSlots>,
    pub res: Vec<Vec<ResSlots>>,
    pub dec: Vec<Vec<BlockSlots>>,
    pub up: Vec<Slot>,
    pub cat: Vec<Slot>,
    /// Seg-head logits per resolution (gradients overwrite them in place); None = weight 0.
    pub logits: Vec<Option<Slot>>,
    /// Backward ping-pong buffers (largest block output; the concat gradient overwrites the
    /// concat itself, dead once the first decoder conv's weight gradient has read it); a
    /// residual encoder's backward rotates two more (`gd`, `gp`, sized to what
    /// [`res_bwd_roles`] asks of them; 0 for a PlainConvUNet).
    pub ga: usize,
    pub gb: usize,
    pub gd: usize,
    pub gp: usize,
    /// Gradient arriving at each encoder stage output from its skip connection.
    pub skip_grad: Vec<usize>,
    /// Elements of the activation arena.
    pub len: usize,
    /// Elements of the statistics arena (norm mean and rstd, kept in working precision).
    pub stats_len: usize,
    /// Label maps per resolution (offset into the label arena) for the loss.
    pub labels: Vec<Option<Slot>>,
    pub labels_len: usize,
}

/// Every tensor starts on a multiple of this many elements (128 bytes at bf16): the conv
/// kernels load 8 channels at once where a tensor is 16-byte aligned.
pub const ALIGN: usize = 64;

/// `n` elements rounded up to whole alignment units.
fn padded(n: usize) -> usize {
    n.next_multiple_of(ALIGN)
}

/// Sequential placement in one region, each tensor aligned.
struct Cursor(usize);
impl Cursor {
    fn take(&mut self, n: usize) -> usize {
        let o = self.0;
        self.0 += padded(n);
        o
    }
}

impl ActPlan {
    /// The plan for a training step (`training`) or a forward-only pass of the full-resolution
    /// head (`!training`, which ignores `policy` and keeps only what the skips need).
    pub fn new(t: &Topology, patch: [usize; 3], batch: usize, policy: Checkpointing, training: bool) -> Result<ActPlan> {
        let sp = t.stage_spatial(patch)?;
        let (ns, nc) = (t.stages(), t.convs_per_stage);
        let policy = if training { policy } else { Checkpointing::Level1 };
        let d = |s: usize, c: usize| Dims::new(batch, sp[s], c);
        let image_dims = Dims::new(batch, patch, t.in_channels);
        let enc_in = |s: usize, j: usize| if j > 0 { d(s, t.features[s]) } else if s == 0 { image_dims } else { d(s - 1, t.features[s - 1]) };
        let dec_in = |s: usize, j: usize| d(s, if j == 0 { 2 * t.features[s] } else { t.features[s] });
        let weights = t.ds_weights();
        let has_head = |s: usize| if training { weights[s] > 0.0 } else { s == 0 };

        // Scratch sizes first, so scratch regions sit at fixed offsets before the saved ones.
        let max_y = (0..ns).map(|s| d(s, t.features[s]).len()).max().unwrap_or(0);
        let max_cat = (0..ns - 1).map(|s| d(s, 2 * t.features[s]).len()).max().unwrap_or(0);
        let stage_scratch = |s: usize, dec: bool| {
            let out = padded(d(s, t.features[s]).len());
            if dec {
                // Convs, activations, upsampled, concat; the full-resolution stage's output
                // too (it is computed last, so backward finds it there without a recompute).
                return nc * out + (nc - 1) * out + out + 2 * out + if s == 0 { out } else { 0 };
            }
            if !t.is_residual() {
                return nc * out + (nc - 1) * out;
            }
            // Residual: the stem (stage 0), then per block conv1, its activation, conv2, the
            // pooled input, the projection and the residual, and the output but the last.
            let stem = if s == 0 { 2 * out } else { 0 };
            let blocks: usize = (0..t.blocks_per_stage[s])
                .map(|j| {
                    let rb = t.res_block(s, j);
                    let pooled = rb.pool.map_or(0, |_| padded(d(s, rb.conv1.cin).len()));
                    let proj = rb.proj.map_or(0, |_| 2 * out);
                    3 * out + pooled + proj + if j + 1 < t.blocks_per_stage[s] { out } else { 0 }
                })
                .sum();
            stem + blocks
        };
        let max_stage = (0..ns).map(|s| stage_scratch(s, false)).chain((0..ns - 1).map(|s| stage_scratch(s, true))).max().unwrap_or(0);

        let mut cur = Cursor(0);
        let (y_scr, cat_scr, stage_base) = match policy {
            Checkpointing::None => (0, 0, 0),
            Checkpointing::Level1 => (cur.take(max_y), cur.take(max_cat), 0),
            Checkpointing::Level2 => (0, 0, cur.take(max_stage)),
        };
        let image = Slot { offset: cur.take(image_dims.len()), dims: image_dims };
        let mut stage = Cursor(stage_base);
        // Where a tensor of this kind goes under the policy; `last` marks a stage output.
        let mut place = |cur: &mut Cursor, stage: &mut Cursor, kind: Kind, dims: Dims| -> Slot {
            let offset = match (policy, kind) {
                (Checkpointing::None, _) => cur.take(dims.len()),
                (Checkpointing::Level1, Kind::Y) => y_scr,
                (Checkpointing::Level1, Kind::Cat) => cat_scr,
                (Checkpointing::Level1, _) => cur.take(dims.len()),
                (Checkpointing::Level2, Kind::StageOut) => cur.take(dims.len()),
                (Checkpointing::Level2, _) => stage.take(dims.len()),
            };
            Slot { offset, dims }
        };
        let mut stats = Cursor(0);
        let block = |cur: &mut Cursor, stage: &mut Cursor, stats: &mut Cursor, place: &mut dyn FnMut(&mut Cursor, &mut Cursor, Kind, Dims) -> Slot, input: Dims, out: Dims, y_kind: Kind| {
            let x = place(cur, stage, Kind::X, out);
            let y = place(cur, stage, y_kind, out);
            let mean = stats.take(out.n * out.c);
            let rstd = stats.take(out.n * out.c);
            BlockSlots { input, x, y, mean, rstd }
        };
        let stage_out = |last: bool| if last && policy != Checkpointing::Level1 { Kind::StageOut } else { Kind::Y };
        let (mut enc, mut stem, mut res) = (Vec::new(), None, Vec::new());
        for s in 0..ns {
            stage.0 = stage_base;
            if !t.is_residual() {
                enc.push((0..nc).map(|j| block(&mut cur, &mut stage, &mut stats, &mut place, enc_in(s, j), d(s, t.features[s]), stage_out(j == nc - 1))).collect::<Vec<_>>());
                continue;
            }
            // The stem's output and the blocks' outputs are kept at level 1 (a block's output
            // is a sum, not recomputable from its conv output alone); its activations are not.
            let out = d(s, t.features[s]);
            if s == 0 {
                stem = Some(block(&mut cur, &mut stage, &mut stats, &mut place, image_dims, out, Kind::X));
            }
            let nb = t.blocks_per_stage[s];
            let blocks = (0..nb)
                .map(|j| {
                    let rb = t.res_block(s, j);
                    let input = if j > 0 || s == 0 { d(s, rb.conv1.cin) } else { d(s - 1, rb.conv1.cin) };
                    let c1 = block(&mut cur, &mut stage, &mut stats, &mut place, input, out, Kind::Y);
                    let x2 = place(&mut cur, &mut stage, Kind::X, out);
                    let (mean2, rstd2) = (stats.take(out.n * out.c), stats.take(out.n * out.c));
                    let pooled = rb.pool.map(|_| place(&mut cur, &mut stage, Kind::X, d(s, rb.conv1.cin)));
                    let proj = rb.proj.map(|_| {
                        let xs = place(&mut cur, &mut stage, Kind::X, out);
                        let (m, r) = (stats.take(out.n * out.c), stats.take(out.n * out.c));
                        (xs, m, r, place(&mut cur, &mut stage, Kind::X, out))
                    });
                    let y = place(&mut cur, &mut stage, if j + 1 == nb { Kind::StageOut } else { Kind::X }, out);
                    ResSlots { input, c1, x2, mean2, rstd2, pooled, proj, y }
                })
                .collect();
            res.push(blocks);
        }
        let mut dec = vec![Vec::new(); ns - 1];
        let mut up = vec![Slot { offset: 0, dims: Dims::default() }; ns - 1];
        let mut cat = up.clone();
        let mut logits = vec![None; ns - 1];
        for s in (0..ns - 1).rev() {
            stage.0 = stage_base;
            up[s] = place(&mut cur, &mut stage, Kind::Up, d(s, t.features[s]));
            cat[s] = place(&mut cur, &mut stage, Kind::Cat, d(s, 2 * t.features[s]));
            dec[s] = (0..nc).map(|j| block(&mut cur, &mut stage, &mut stats, &mut place, dec_in(s, j), d(s, t.features[s]), stage_out(j == nc - 1 && s > 0))).collect();
            if has_head(s) {
                logits[s] = Some(Slot { offset: cur.take(d(s, t.n_classes).len()), dims: d(s, t.n_classes) });
            }
        }
        let (mut ga, mut gb, mut gd, mut gp, mut skip_grad) = (0, 0, 0, 0, Vec::new());
        let mut labels = vec![None; ns - 1];
        let mut lab = Cursor(0);
        if training {
            let need = if t.is_residual() { res_rotation_need(t, &sp, batch) } else { [0; 4] };
            ga = cur.take(max_y.max(need[0]));
            gb = cur.take(max_y.max(need[1]));
            gd = cur.take(need[2]);
            gp = cur.take(need[3]);
            skip_grad = (0..ns - 1).map(|s| cur.take(d(s, t.features[s]).len())).collect();
            for s in 0..ns - 1 {
                if has_head(s) {
                    let ld = d(s, 1);
                    labels[s] = Some(Slot { offset: lab.take(ld.rows()), dims: ld });
                }
            }
        }
        Ok(ActPlan { policy, training, image, enc, stem, res, dec, up, cat, logits, ga, gb, gd, gp, skip_grad, len: cur.0, stats_len: stats.0, labels, labels_len: lab.0 })
    }

    /// Bytes of activation memory a step uses: the activation arena at `act_bytes` per
    /// element, the statistics at `elem_bytes`, and the u8 label maps.
    pub fn bytes(&self, act_bytes: usize, elem_bytes: usize) -> usize {
        self.len * act_bytes + self.stats_len * elem_bytes + self.labels_len
    }
}

/// A gradient buffer of the residual encoder's backward: one of the four it rotates (ga, gb,
/// gd, gp), or the skip gradient of a stage (where the decoder left its share).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradBuf {
    Rot(usize),
    Skip(usize),
}

/// The buffers one residual block's backward uses: `g` holds d(output); `dst` receives
/// d(input), adding to it when it is a skip gradient; `h` and `q` are its scratch.
#[derive(Clone, Copy, Debug)]
pub struct ResBwdRoles {
    pub g: GradBuf,
    pub dst: GradBuf,
    pub h: usize,
    pub q: usize,
}

/// The residual encoder's backward, bottleneck first, as buffer roles per block ([s][j]):
/// d(bottleneck output) arrives in rotation buffer 1 (gb, where the decoder's backward
/// leaves it); every other stage starts from its skip gradient; the first block of a stage
/// adds its input gradient to the previous stage's skip gradient.
pub fn res_bwd_roles(blocks_per_stage: &[usize]) -> Vec<Vec<ResBwdRoles>> {
    let ns = blocks_per_stage.len();
    let mut roles: Vec<Vec<ResBwdRoles>> = blocks_per_stage.iter().map(|&nb| Vec::with_capacity(nb)).collect();
    let mut g = GradBuf::Rot(1);
    for s in (0..ns).rev() {
        if s + 1 < ns {
            g = GradBuf::Skip(s);
        }
        let mut stage = Vec::new();
        for j in (0..blocks_per_stage[s]).rev() {
            let free: Vec<usize> = (0..4).filter(|&i| GradBuf::Rot(i) != g).collect();
            let dst = if s > 0 && j == 0 { GradBuf::Skip(s - 1) } else { GradBuf::Rot(free[0]) };
            let scratch: Vec<usize> = free.into_iter().filter(|&i| GradBuf::Rot(i) != dst).collect();
            stage.push(ResBwdRoles { g, dst, h: scratch[0], q: scratch[1] });
            g = dst;
        }
        stage.reverse();
        roles[s] = stage;
    }
    roles
}

/// Elements each rotation buffer must hold for [`res_bwd_roles`]: a block's output and input
/// gradients, its conv1 input gradient in `h` (and the projection's gradient), and in `q`
/// the pooled input's gradient of a block that both pools and projects.
fn res_rotation_need(t: &Topology, sp: &[[usize; 3]], batch: usize) -> [usize; 4] {
    let mut need = [0; 4];
    let mut want = |b: GradBuf, n: usize| {
        if let GradBuf::Rot(i) = b {
            need[i] = need[i].max(padded(n));
        }
    };
    for (s, stage) in res_bwd_roles(&t.blocks_per_stage).iter().enumerate() {
        let out = Dims::new(batch, sp[s], t.features[s]).len();
        for (j, r) in stage.iter().enumerate() {
            let rb = t.res_block(s, j);
            let input_sp = if j == 0 && s > 0 { sp[s - 1] } else { sp[s] };
            want(r.g, out);
            want(r.dst, Dims::new(batch, input_sp, rb.conv1.cin).len());
            want(GradBuf::Rot(r.h), out);
            if rb.pool.is_some() && rb.proj.is_some() {
                want(GradBuf::Rot(r.q), Dims::new(batch, sp[s], rb.conv1.cin).len());
            }
        }
    }
    need
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    X,
    Y,
    StageOut,
    Up,
    Cat,
}

/// The activation bytes a training step needs (the memory planner's model).
pub fn activation_bytes(t: &Topology, patch: [usize; 3], batch: usize, policy: Checkpointing, act_bytes: usize, elem_bytes: usize) -> Result<usize> {
    Ok(ActPlan::new(t, patch, batch, policy, true)?.bytes(act_bytes, elem_bytes))
}
