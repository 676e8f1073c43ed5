//! The ops a U-Net training step needs, forward and backward, behind one trait.
//!
//! Memory is owned by arenas that the model allocates once; ops receive `Buf` views
//! (pointer + length, `Copy`), llm.c style. The caller guarantees that a view written by
//! an op does not overlap a view the same op reads, unless the op says it works in place.

pub mod cpu;
pub mod cuda;
pub mod profile;

use crate::hostmem::{Heap, HostAlloc};
use crate::tensor::Dims;
use anyhow::Result;

/// Geometry of a 3D convolution: kernel 1 or 3 per axis, stride 1 or 2 per axis,
/// "same" padding (k/2), NDHWC activations, weights laid out [kd][kh][kw][cin][cout].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub cin: usize,
    pub cout: usize,
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
}

impl ConvGeom {
    pub fn new(cin: usize, cout: usize, kernel: [usize; 3], stride: [usize; 3]) -> ConvGeom {
        ConvGeom { cin, cout, kernel, stride }
    }
    pub fn pad(&self) -> [usize; 3] {
        self.kernel.map(|k| k / 2)
    }
    pub fn taps(&self) -> usize {
        self.kernel.iter().product()
    }
    pub fn weight_len(&self) -> usize {
        self.taps() * self.cin * self.cout
    }
    /// Output spatial size: floor((d + 2p - k) / s) + 1.
    pub fn out_spatial(&self, s: [usize; 3]) -> [usize; 3] {
        let p = self.pad();
        std::array::from_fn(|a| (s[a] + 2 * p[a] - self.kernel[a]) / self.stride[a] + 1)
    }
    pub fn out_dims(&self, x: Dims) -> Dims {
        assert_eq!(x.c, self.cin, "conv input channels");
        Dims::new(x.n, self.out_spatial(x.spatial()), self.cout)
    }
    /// Multiply-adds x2 of the forward pass for input `x`.
    pub fn flops(&self, x: Dims) -> f64 {
        2.0 * self.out_dims(x).rows() as f64 * (self.taps() * self.cin * self.cout) as f64
    }
}

/// Geometry of a transposed 3D convolution with kernel = stride (no overlap),
/// weights laid out [cin][sd][sh][sw][cout].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTGeom {
    pub cin: usize,
    pub cout: usize,
    pub stride: [usize; 3],
}

impl ConvTGeom {
    pub fn taps(&self) -> usize {
        self.stride.iter().product()
    }
    pub fn weight_len(&self) -> usize {
        self.cin * self.taps() * self.cout
    }
    pub fn out_dims(&self, x: Dims) -> Dims {
        assert_eq!(x.c, self.cin, "transposed conv input channels");
        let s = x.spatial();
        Dims::new(x.n, std::array::from_fn(|a| s[a] * self.stride[a]), self.cout)
    }
    pub fn flops(&self, x: Dims) -> f64 {
        2.0 * x.rows() as f64 * (self.cin * self.taps() * self.cout) as f64
    }
}

/// Soft Dice flavour: nnU-Net's "batch dice" sums over the batch before the ratio.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DiceMode {
    Batch,
    PerSample,
}

pub const DICE_SMOOTH: f64 = 1e-5;
pub const NORM_EPS: f64 = 1e-5;
pub const LEAKY_SLOPE: f64 = 0.01;

/// Most regions a region-based net may have (nnU-Net's BraTS has 3).
pub const MAX_REGIONS: usize = 8;
/// Label values a region may hold: 0..32.
pub const REGION_LABELS: usize = 32;

/// The regions of a region-based net (nnU-Net's labels given as lists, such as BraTS's
/// "whole tumor": [1, 2, 3]): per output channel, the label values it covers, as bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionMasks(pub [u32; MAX_REGIONS]);

impl RegionMasks {
    /// One mask per region, each a list of label values in 1..32.
    pub fn new(regions: &[Vec<i64>]) -> Result<RegionMasks> {
        anyhow::ensure!(!regions.is_empty() && regions.len() <= MAX_REGIONS, "{} regions: segk trains 1 to {MAX_REGIONS}", regions.len());
        let mut m = [0u32; MAX_REGIONS];
        for (c, r) in regions.iter().enumerate() {
            for &v in r {
                anyhow::ensure!((1..REGION_LABELS as i64).contains(&v), "region {r:?}: label value {v} is not in 1..{REGION_LABELS}");
                m[c] |= 1 << v;
            }
        }
        Ok(RegionMasks(m))
    }
    /// The ignore label of a region net with one: the value above the highest the regions
    /// cover (nnU-Net's ignore label is the highest label).
    pub fn ignore_value(&self) -> u8 {
        (32 - self.0.iter().fold(0, |a, m| a | m).leading_zeros()) as u8
    }
    /// Whether label `y` lies in region `c`.
    pub fn contains(&self, c: usize, y: u8) -> bool {
        (y as usize) < REGION_LABELS && self.0[c] >> y & 1 == 1
    }
    /// The masks two to a word, as the CUDA kernels take them.
    pub fn words(&self) -> [u64; MAX_REGIONS / 2] {
        std::array::from_fn(|i| self.0[2 * i] as u64 | (self.0[2 * i + 1] as u64) << 32)
    }
}

/// The nonlinearity after an instance norm: nnU-Net's LeakyReLU(0.01), or none (a residual
/// block's second norm, before the add, and its skip projection's norm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    LeakyRelu,
    Identity,
}

impl Act {
    /// The slope below zero (1: no activation).
    pub fn slope(self) -> f64 {
        match self {
            Act::LeakyRelu => LEAKY_SLOPE,
            Act::Identity => 1.0,
        }
    }
}

/// The shape avg_pool gives: each axis divided by its factor, rounded down.
pub fn pooled_dims(xd: Dims, k: [usize; 3]) -> Dims {
    xd.with_spatial(std::array::from_fn(|a| xd.spatial()[a] / k[a]))
}

/// Values a loss writes per output into its record (see `Backend::softmax_dice_ce`).
pub const LOSS_RECORD: usize = 3;

/// The two terms of nnU-Net's DC_and_CE loss for one output, before weighting.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossParts {
    /// Mean cross-entropy over all voxels.
    pub ce: f64,
    /// Negative mean soft Dice over foreground classes (nnU-Net's sign).
    pub dice: f64,
}

impl LossParts {
    pub fn total(&self) -> f64 {
        self.ce + self.dice
    }
}

/// SGD with nesterov momentum and weight decay, PyTorch semantics, after clipping the
/// gradients to a global norm (torch.nn.utils.clip_grad_norm_). The momentum buffer starts at
/// zero, which makes the first step's buffer the first gradient, as PyTorch's does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdParams {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
}

/// nnU-Net's poly schedule: lr0 * (1 - epoch / max_epochs)^0.9.
pub fn poly_lr(lr0: f64, epoch: usize, max_epochs: usize) -> f64 {
    lr0 * (1.0 - epoch as f64 / max_epochs as f64).max(0.0).powf(0.9)
}

/// A device allocation that did not fit: the backend says what it was for and the numbers, the
/// trainer turns it into the same advice as its pre-flight (anyhow keeps the type: downcast).
#[derive(Debug, Clone)]
pub struct OutOfMemory {
    pub what: String,
    /// Bytes asked for, when the failure was an allocation.
    pub requested: Option<u64>,
    pub free: Option<u64>,
}

impl std::fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::sysinfo::bytes_text;
        write!(f, "out of device memory in {}", self.what)?;
        if let Some(r) = self.requested {
            write!(f, ": asked for {}", bytes_text(r))?;
        }
        match self.free {
            Some(free) => write!(f, ", {} free", bytes_text(free)),
            None => Ok(()),
        }
    }
}

impl std::error::Error for OutOfMemory {}

/// torch.nn.utils.clip_grad_norm_: the factor that brings the norm to at most `max_norm`.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Whether a step whose guard values (squared gradient norm, loss parts) are `guard` is
/// applied: every backend's `sgd_update` decides the same way on the device.
pub fn step_applies(guard: &[f64]) -> bool {
    guard.iter().all(|v| v.is_finite())
}

/// Every op the model needs. `Buf` views working-precision memory, `LabelBuf` views u8
/// class maps. Forward ops overwrite their output; `beta = 1` asks an op to add instead.
pub trait Backend: Sync {
    type Buf: Copy + Send + Sync;
    type LabelBuf: Copy + Send + Sync;
    type Arena: Send;
    type LabelArena: Send;

    fn name(&self) -> String;
    /// True when the ops run on this process's CPU threads (the rayon pool the caller installs),
    /// so the thread policy splits the cores between them and the augmentation workers.
    fn computes_on_host_threads(&self) -> bool {
        false
    }

    // ---- memory ----
    /// Working-precision memory: parameters, their gradients, optimizer state, statistics.
    /// Every allocation starts zeroed (momentum and step records rely on it).
    fn alloc(&self, len: usize) -> Result<Self::Arena>;
    /// Activation memory (activations and their gradients): bf16 on a GPU by default, whose
    /// ops then store rounded values and compute in f32; working precision elsewhere.
    fn alloc_act(&self, len: usize) -> Result<Self::Arena> {
        self.alloc(len)
    }
    fn view(&self, arena: &Self::Arena, offset: usize, len: usize) -> Self::Buf;
    fn alloc_labels(&self, len: usize) -> Result<Self::LabelArena>;
    fn label_view(&self, arena: &Self::LabelArena, offset: usize, len: usize) -> Self::LabelBuf;
    /// Bytes of one working-precision element.
    fn elem_bytes(&self) -> usize;
    /// Bytes of one element of activation memory.
    fn act_bytes(&self) -> usize {
        self.elem_bytes()
    }
    fn upload(&self, dst: Self::Buf, src: &[f32]) -> Result<()>;
    fn download(&self, src: Self::Buf, dst: &mut [f32]) -> Result<()>;
    /// Working-precision values at their own precision (f64 on the f64 CPU reference, whose
    /// step records the gradient checks difference): a copy and a wait.
    fn download_exact(&self, src: Self::Buf, len: usize) -> Result<Vec<f64>> {
        let mut v = vec![0f32; len];
        self.download(src, &mut v)?;
        Ok(v.into_iter().map(f64::from).collect())
    }
    fn upload_labels(&self, dst: Self::LabelBuf, src: &[u8]) -> Result<()>;
    fn fill(&self, dst: Self::Buf, value: f32) -> Result<()>;
    /// dst = src, device to device, in order with the ops.
    fn copy(&self, dst: Self::Buf, src: Self::Buf) -> Result<()>;
    fn copy_labels(&self, dst: Self::LabelBuf, src: Self::LabelBuf) -> Result<()>;
    /// Where batch slots should live: page-locked memory on a GPU, so that `stage` is
    /// asynchronous; heap memory on the CPU.
    fn host_memory(&self) -> std::sync::Arc<dyn HostAlloc> {
        std::sync::Arc::new(Heap)
    }

    // ---- staged input: the upload of batch k+1 overlaps step k ----
    /// Starts copying a batch (image, labels) into the staging buffers `dst`/`ldst` on the copy
    /// stream, once the ops queued so far are done (the previous `take_staged` included); on a
    /// GPU it returns before the copy is done. The CPU reads the batch at `take_staged`.
    ///
    /// # Safety
    /// `src` and `lsrc` must stay alive and unwritten until the next `take_staged` returns
    /// (the copy engine may still be reading them).
    unsafe fn stage(&self, dst: Self::Buf, src: &[f32], ldst: Self::LabelBuf, lsrc: &[u8]) -> Result<()>;
    /// Orders the ops after the last `stage`, copies the staging buffers into the step's input
    /// (`dst`, `ldst`), and waits until the staged host memory has been read.
    fn take_staged(&self, src: Self::Buf, dst: Self::Buf, lsrc: Self::LabelBuf, ldst: Self::LabelBuf) -> Result<()>;
    /// Waits for the staged uploads still in flight (`sync` waits for the ops only); after it
    /// the host memory of the last `stage` is no longer borrowed.
    fn sync_staged(&self) -> Result<()>;
    /// Waits for queued work (a no-op on the CPU).
    fn sync(&self) -> Result<()>;
    /// Bytes the backend can still allocate (device memory free, or host memory available),
    /// when it can tell.
    fn memory_available(&self) -> Option<u64>;
    /// Device memory in use now (every process's, the driver's context included), for the
    /// per-epoch log; None where the backend is the host.
    fn memory_used(&self) -> Option<u64> {
        None
    }
    /// Upper bound of the workspace the ops allocate on their own (split-K partial sums and
    /// the like), for a net whose largest weight has `largest_weight` elements, whose widest
    /// layer has `widest` channels, at `batch`; the pre-flight adds it. Nothing on the CPU (its
    /// temporaries are per call and small).
    fn workspace_bytes(&self, _largest_weight: usize, _widest: usize, _batch: usize) -> usize {
        0
    }

    // ---- convolution ----
    fn conv_fwd(&self, x: Self::Buf, xd: Dims, w: Self::Buf, b: Self::Buf, y: Self::Buf, g: &ConvGeom) -> Result<()>;
    fn conv_dgrad(&self, dy: Self::Buf, w: Self::Buf, dx: Self::Buf, xd: Dims, g: &ConvGeom, beta: f32) -> Result<()>;
    fn conv_wgrad(&self, x: Self::Buf, xd: Dims, dy: Self::Buf, dw: Self::Buf, db: Self::Buf, g: &ConvGeom) -> Result<()>;
    fn convt_fwd(&self, x: Self::Buf, xd: Dims, w: Self::Buf, b: Self::Buf, y: Self::Buf, g: &ConvTGeom) -> Result<()>;
    fn convt_dgrad(&self, dy: Self::Buf, w: Self::Buf, dx: Self::Buf, xd: Dims, g: &ConvTGeom, beta: f32) -> Result<()>;
    fn convt_wgrad(&self, x: Self::Buf, xd: Dims, dy: Self::Buf, dw: Self::Buf, db: Self::Buf, g: &ConvTGeom) -> Result<()>;

    // ---- instance norm + LeakyReLU ----
    /// Per (sample, channel) mean and 1/sqrt(var + eps), biased variance; `mean`/`rstd` hold n*c.
    fn norm_stats(&self, x: Self::Buf, xd: Dims, mean: Self::Buf, rstd: Self::Buf) -> Result<()>;
    /// y = act(gamma * (x - mean) * rstd + beta [+ residual]); `residual` is not `y`.
    #[allow(clippy::too_many_arguments)]
    fn norm_fwd(&self, x: Self::Buf, xd: Dims, mean: Self::Buf, rstd: Self::Buf, gamma: Self::Buf, beta: Self::Buf, residual: Option<Self::Buf>, act: Act, y: Self::Buf) -> Result<()>;
    /// y = leaky_relu(gamma * (x - mean) * rstd + beta): a plain conv block's norm.
    #[allow(clippy::too_many_arguments)]
    fn norm_act_fwd(&self, x: Self::Buf, xd: Dims, mean: Self::Buf, rstd: Self::Buf, gamma: Self::Buf, beta: Self::Buf, y: Self::Buf) -> Result<()> {
        self.norm_fwd(x, xd, mean, rstd, gamma, beta, None, Act::LeakyRelu, y)
    }
    /// Backward of norm_fwd without a residual, from the saved pre-norm `x` and its
    /// statistics. `dx` may be the same view as `dy`.
    #[allow(clippy::too_many_arguments)]
    fn norm_bwd(&self, dy: Self::Buf, x: Self::Buf, xd: Dims, mean: Self::Buf, rstd: Self::Buf, gamma: Self::Buf, beta: Self::Buf, act: Act, dx: Self::Buf, dgamma: Self::Buf, dbeta: Self::Buf) -> Result<()>;
    /// Backward of norm_act_fwd.
    #[allow(clippy::too_many_arguments)]
    fn norm_act_bwd(&self, dy: Self::Buf, x: Self::Buf, xd: Dims, mean: Self::Buf, rstd: Self::Buf, gamma: Self::Buf, beta: Self::Buf, dx: Self::Buf, dgamma: Self::Buf, dbeta: Self::Buf) -> Result<()> {
        self.norm_bwd(dy, x, xd, mean, rstd, gamma, beta, Act::LeakyRelu, dx, dgamma, dbeta)
    }
    /// dx = dy * leaky_relu'(y) from the activation's output `y` (a residual block's last
    /// LeakyReLU, whose input is not kept). `dx` may be the same view as `dy`.
    fn leaky_bwd(&self, dy: Self::Buf, y: Self::Buf, dx: Self::Buf) -> Result<()>;

    // ---- pooling ----
    /// Average pooling with window = stride `k` per axis (floor): `y` has
    /// [`pooled_dims`]`(xd, k)`.
    fn avg_pool(&self, x: Self::Buf, xd: Dims, k: [usize; 3], y: Self::Buf) -> Result<()>;
    /// dx (+)= the backward of avg_pool (beta as in the dgrad ops).
    fn avg_pool_bwd(&self, dy: Self::Buf, k: [usize; 3], dx: Self::Buf, xd: Dims, beta: f32) -> Result<()>;

    // ---- tensor plumbing ----
    /// out = [a | b] along channels.
    fn concat(&self, a: Self::Buf, ca: usize, b: Self::Buf, cb: usize, rows: usize, out: Self::Buf) -> Result<()>;
    /// da = dout[:, :ca]; db (+)= dout[:, ca:] (beta as in the dgrad ops).
    fn concat_bwd(&self, dout: Self::Buf, ca: usize, cb: usize, rows: usize, da: Self::Buf, db: Self::Buf, beta_b: f32) -> Result<()>;
    /// Nearest-neighbour downsampling of a label map by integer factors per axis.
    fn downsample_labels(&self, src: Self::LabelBuf, sd: Dims, dst: Self::LabelBuf, dd: Dims) -> Result<()>;

    // ---- loss ----
    /// Softmax + soft Dice (foreground classes) + cross-entropy over `logits` (c = classes).
    /// Overwrites `logits` with weight * d(loss)/d(logits) and writes the unweighted parts into
    /// `record` ([`LOSS_RECORD`] values: CE, the Dice term (nnU-Net's sign), the largest label
    /// seen), where they stay until read: a step never waits for its loss. With `ignore`, voxels
    /// labelled c (nnU-Net's ignore label, the highest value) take no part in either term and
    /// get a zero gradient; any other label not below c makes the Dice term NaN (the step is
    /// then not applied) and its gradient meaningless.
    #[allow(clippy::too_many_arguments)]
    fn softmax_dice_ce(&self, logits: Self::Buf, ld: Dims, labels: Self::LabelBuf, mode: DiceMode, ignore: bool, weight: f64, record: Self::Buf) -> Result<()>;
    /// Sigmoid per region + soft Dice over the regions + binary cross-entropy (nnU-Net's
    /// DC_and_BCE_loss for region-based nets, weights 1:1), the targets the region masks of the
    /// label map (`labels`, the ground-truth label values; c = regions). As `softmax_dice_ce`:
    /// `logits` become weight * d(loss)/d(logits), `record` gets [BCE, Dice term, largest
    /// label]; a label value of 32 or more makes the Dice term NaN. With `ignore`, voxels
    /// labelled `regions.ignore_value()` take no part (nnU-Net's loss mask; the BCE is then
    /// averaged over the labelled voxels, not voxels x regions, as nnU-Net's).
    #[allow(clippy::too_many_arguments)]
    fn sigmoid_dice_bce(&self, logits: Self::Buf, ld: Dims, labels: Self::LabelBuf, regions: &RegionMasks, mode: DiceMode, ignore: bool, weight: f64, record: Self::Buf) -> Result<()>;
    /// Argmax over channels into a label map (prediction).
    fn argmax(&self, logits: Self::Buf, ld: Dims, out: Self::LabelBuf) -> Result<()>;
    /// Region nets' prediction: per voxel, bit k set where region k's logit is above 0 (its
    /// sigmoid above 0.5, nnU-Net's threshold); at most 8 regions.
    fn region_bits(&self, logits: Self::Buf, ld: Dims, out: Self::LabelBuf) -> Result<()>;
    fn download_labels(&self, src: Self::LabelBuf, dst: &mut [u8]) -> Result<()>;

    // ---- optimizer ----
    /// out[0] = the sum of squares of `x`, summed in an order fixed by the length (and, on a GPU,
    /// its SM count): the same bits on every run on one GPU model.
    fn sum_squares(&self, x: Self::Buf, out: Self::Buf) -> Result<()>;
    /// One fused SGD-nesterov step over the whole parameter arena, applied only when every
    /// value of `guard` is finite ([`step_applies`]); the gradients are first clipped to
    /// `p.max_grad_norm` by the norm sqrt(guard[0]).
    fn sgd_update(&self, params: Self::Buf, grads: Self::Buf, momentum: Self::Buf, p: &SgdParams, guard: Self::Buf) -> Result<()>;

    // ---- ranks (training on several GPUs, `crate::dist`) ----
    /// NCCL's unique id for a new group of ranks (rank 0 makes it; the others receive it).
    fn group_id(&self) -> Result<Vec<u8>> {
        anyhow::bail!("{}: training on several ranks needs GPUs (the CUDA backend and NCCL)", self.name())
    }
    /// Joins the group `id` names as `rank` of `size`. From then on each loss sees every rank's
    /// samples (the Dice and cross-entropy sums of the whole global batch: the loss and its
    /// gradient are the single-process ones) and `all_reduce_sum` sums over the ranks.
    fn join_group(&self, _rank: usize, _size: usize, _id: &[u8]) -> Result<()> {
        anyhow::bail!("{}: training on several ranks needs GPUs (the CUDA backend and NCCL)", self.name())
    }
    /// (this rank, ranks): (0, 1) until a group is joined.
    fn ranks(&self) -> (usize, usize) {
        (0, 1)
    }
    /// Starts x <- the sum of x over the ranks, after the ops queued so far and beside those
    /// queued after it (a bucket of gradients summed while the backward pass goes on); nothing to
    /// do for one rank. Every rank must start the same sums in the same order.
    fn start_sum(&self, _x: Self::Buf) -> Result<()> {
        Ok(())
    }
    /// Ops queued from here wait for every sum started.
    fn join_sums(&self) -> Result<()> {
        Ok(())
    }
}
