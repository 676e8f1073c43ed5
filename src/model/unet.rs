//! PlainConvUNet forward and backward, written out op by op (llm.c style). Parameters,
//! gradients and momentum share one arena; activations live in another (the backend's
//! activation storage: bf16 on a GPU), norm statistics in a third (working precision), laid
//! out by [`ActPlan`]. The net never knows which backend runs it.

use super::params::{BlockParams, ConvParams, ParamLayout};
use super::plan::{ActPlan, BlockSlots, Checkpointing, Slot};
use super::topology::Topology;
pub use super::ledger::StepLoss;
use super::ledger::Ledger;
use crate::backend::{Backend, ConvGeom, SgdParams};
use crate::tensor::Dims;
use anyhow::{ensure, Result};
use std::cell::Cell;

pub const MOMENTUM: f64 = 0.99;
pub const WEIGHT_DECAY: f64 = 3e-5;
pub const GRAD_CLIP: f64 = 12.0;
/// Several ranks: gradient values summed per NCCL call while the backward pass goes on
/// (PyTorch DDP's 25 MB buckets); SEGK_GRAD_BUCKET_KB sets another size.
pub const GRAD_BUCKET: usize = (25 << 20) / 4;

fn grad_bucket() -> usize {
    std::env::var("SEGK_GRAD_BUCKET_KB").ok().and_then(|v| v.parse::<usize>().ok()).map_or(GRAD_BUCKET, |kb| (kb * 1024 / 4).max(1))
}

pub struct UNet<B: Backend> {
    pub topo: Topology,
    pub layout: ParamLayout,
    /// [params | grads | momentum], or [params] for an inference net.
    pub arena: B::Arena,
    /// Optimizer steps applied, as of the last read of the ledger ([`UNet::take_steps`]).
    pub steps: u64,
    /// False for `for_inference` nets: no gradients or optimizer state.
    trainable: bool,
    /// Step records on the device (training nets only), and those read early because the
    /// ledger filled up.
    ledger: Option<Ledger<B>>,
    read_early: Vec<StepLoss>,
    /// Each step synchronises around forward and backward and records their times (bench).
    pub timed: bool,
    /// A residual encoder's skip projections have no bias: zeros for their convs to add and
    /// a place for their bias gradient to go, each as wide as the widest stage.
    pub(super) spare: Option<B::Arena>,
    /// Several ranks: gradient values per sum started during the backward pass.
    pub grad_bucket: usize,
}

/// Activation memory for one input shape, plus what the level-1 recompute has resident.
pub struct Acts<B: Backend> {
    pub plan: ActPlan,
    pub arena: B::Arena,
    /// Norm mean and rstd per block.
    pub stats: B::Arena,
    pub labels: B::LabelArena,
    y_resident: Cell<Option<BlockId>>,
    cat_resident: Cell<Option<usize>>,
}

impl<B: Backend> Acts<B> {
    pub fn new(be: &B, t: &Topology, patch: [usize; 3], batch: usize, policy: Checkpointing, training: bool) -> Result<Acts<B>> {
        let plan = ActPlan::new(t, patch, batch, policy, training)?;
        let arena = be.alloc_act(plan.len)?;
        let stats = be.alloc(plan.stats_len.max(1))?;
        let labels = be.alloc_labels(plan.labels_len.max(1))?;
        Ok(Acts { plan, arena, stats, labels, y_resident: Cell::new(None), cat_resident: Cell::new(None) })
    }
    /// Bytes this activation memory takes.
    pub fn bytes(&self, be: &B) -> usize {
        self.plan.bytes(be.act_bytes(), be.elem_bytes())
    }
    /// The step's input image on the device, for a feed that puts batches there itself.
    pub fn input_image(&self, be: &B) -> B::Buf {
        be.view(&self.arena, self.plan.image.offset, self.plan.image.len())
    }
    /// The step's full-resolution labels on the device (training plans only).
    pub fn input_labels(&self, be: &B) -> Result<B::LabelBuf> {
        let top = self.plan.labels.first().copied().flatten().ok_or_else(|| anyhow::anyhow!("this activation plan has no labels (it was made for inference)"))?;
        Ok(be.label_view(&self.labels, top.offset, top.dims.rows()))
    }
}

/// Where a training step's batch is: host slices the step uploads, or already in the plan's
/// input slots on the device (put there by [`crate::feed::Feed`]).
#[derive(Clone, Copy)]
pub enum Input<'a> {
    Host { image: &'a [f32], labels: &'a [u8] },
    Resident,
}

/// A conv -> norm -> LeakyReLU block of the net.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BlockId {
    Enc(usize, usize),
    Dec(usize, usize),
    /// A residual encoder's stem.
    Stem,
    /// conv1 of residual block (stage, block).
    Res(usize, usize),
}

/// Zeros and a discard area for the bias-free projections of a residual encoder.
fn spare<B: Backend>(be: &B, topo: &Topology) -> Result<Option<B::Arena>> {
    let widest = topo.features.iter().copied().max().unwrap_or(0);
    topo.is_residual().then(|| be.alloc(2 * widest)).transpose()
}

impl<B: Backend> UNet<B> {
    pub fn new(be: &B, topo: Topology, seed: u64) -> Result<UNet<B>> {
        topo.validate()?;
        let layout = ParamLayout::new(&topo);
        let arena = be.alloc(3 * layout.len)?;
        be.upload(be.view(&arena, 0, layout.len), &layout.init(seed))?;
        let ledger = Some(Ledger::new(be, topo.ds_weights().len())?);
        let spare = spare(be, &topo)?;
        Ok(UNet { topo, layout, arena, steps: 0, trainable: true, ledger, read_early: Vec::new(), timed: false, spare, grad_bucket: grad_bucket() })
    }
    /// A net for inference: parameters only (zero until loaded), a third of the training
    /// arena; gradients, momentum and training steps are refused.
    pub fn for_inference(be: &B, topo: Topology) -> Result<UNet<B>> {
        topo.validate()?;
        let layout = ParamLayout::new(&topo);
        let arena = be.alloc(layout.len)?;
        let spare = spare(be, &topo)?;
        Ok(UNet { topo, layout, arena, steps: 0, trainable: false, ledger: None, read_early: Vec::new(), timed: false, spare, grad_bucket: grad_bucket() })
    }
    pub fn trainable(&self) -> bool {
        self.trainable
    }
    pub fn n_params(&self) -> usize {
        self.layout.len
    }
    pub fn params(&self, be: &B) -> B::Buf {
        be.view(&self.arena, 0, self.layout.len)
    }
    pub fn grads(&self, be: &B) -> B::Buf {
        assert!(self.trainable, "an inference net has no gradients");
        be.view(&self.arena, self.layout.len, self.layout.len)
    }
    pub fn momentum(&self, be: &B) -> B::Buf {
        assert!(self.trainable, "an inference net has no optimizer state");
        be.view(&self.arena, 2 * self.layout.len, self.layout.len)
    }
    /// Bytes of parameters, gradients and optimizer state (parameters only for inference).
    pub fn param_bytes(&self, be: &B) -> usize {
        (if self.trainable { 3 } else { 1 }) * self.layout.len * be.elem_bytes()
    }

    fn ledger(&self) -> Result<&Ledger<B>> {
        self.ledger.as_ref().ok_or_else(|| anyhow::anyhow!("training needs a trainable net (this one was made for inference)"))
    }

    /// Forward, loss and backward: leaves the gradients in the grads region and returns the
    /// step's numbers (it waits for them: for checks and tests; training steps do not wait).
    pub fn compute_gradients(&self, be: &B, acts: &Acts<B>, image: &[f32], labels: &[u8]) -> Result<StepLoss> {
        let times = self.gradients(be, acts, Input::Host { image, labels })?;
        self.ledger()?.peek(be, &self.topo.ds_weights(), times)
    }

    /// nnU-Net's loss of one output: DC_and_CE over a softmax (the ignore label masked), or
    /// for a region net DC_and_BCE over a sigmoid per region.
    fn loss(&self, be: &B, logits: B::Buf, ld: Dims, labels: B::LabelBuf, weight: f64, record: B::Buf) -> Result<()> {
        if self.topo.regions.is_empty() {
            return be.softmax_dice_ce(logits, ld, labels, self.topo.dice, self.topo.ignore_label, weight, record);
        }
        be.sigmoid_dice_bce(logits, ld, labels, &crate::backend::RegionMasks::new(&self.topo.regions)?, self.topo.dice, self.topo.ignore_label, weight, record)
    }

    /// Forward, loss and backward with the batch wherever `input` says, into the ledger's next
    /// record. Returns the phase times when the net is `timed`.
    fn gradients(&self, be: &B, acts: &Acts<B>, input: Input) -> Result<(f64, f64)> {
        ensure!(acts.plan.training, "compute_gradients needs a training activation plan");
        ensure!(self.trainable, "compute_gradients needs a trainable net (this one was made for inference)");
        let ledger = self.ledger()?;
        ensure!(!ledger.is_full(), "the step ledger is full: read it (take_steps) first");
        let pass = Pass::new(be, self, acts);
        if let Input::Host { image, labels } = input {
            pass.load(image, Some(labels))?;
        }
        pass.downsample_labels()?;
        let timer = Phases::start(be, self.timed)?;
        pass.forward(true)?;
        let weights = self.topo.ds_weights();
        for (s, slot) in acts.plan.logits.iter().enumerate() {
            match (slot, acts.plan.labels[s]) {
                (Some(lg), Some(lb)) => self.loss(be, pass.act(lg), lg.dims, pass.label(lb), weights[s], ledger.next_loss(be, s))?,
                // An output without a loss this step: zeros, not a record left by another plan.
                _ => be.fill(ledger.next_loss(be, s), 0.0)?,
            }
        }
        let timer = timer.lap(be)?;
        pass.backward()?;
        // Several ranks: the sum of every rank's gradients (each loss already scaled by the
        // global batch), the same bits on every rank, so every rank applies the same update.
        pass.sum_ready(true)?;
        let times = timer.lap(be)?.times();
        be.sum_squares(self.grads(be), ledger.next_norm(be))?;
        Ok(times)
    }

    /// One training step, queued: forward, loss, backward, and the update clipped to norm 12,
    /// which the device skips when a loss or the gradient is not finite. Nothing waits for the
    /// device here (unless the ledger is full); [`UNet::take_steps`] reads the steps' numbers.
    pub fn step(&mut self, be: &B, acts: &Acts<B>, input: Input, lr: f64) -> Result<()> {
        ensure!(self.trainable, "a training step needs a trainable net (this one was made for inference)");
        if self.ledger()?.is_full() {
            let early = self.read_ledger(be)?;
            self.read_early.extend(early);
        }
        let times = self.gradients(be, acts, input)?;
        let guard = self.ledger()?.next(be);
        let p = SgdParams { lr, momentum: MOMENTUM, weight_decay: WEIGHT_DECAY, max_grad_norm: GRAD_CLIP };
        be.sgd_update(self.params(be), self.grads(be), self.momentum(be), &p, guard)?;
        if let Some(l) = self.ledger.as_mut() {
            l.push(times);
        }
        Ok(())
    }

    fn read_ledger(&mut self, be: &B) -> Result<Vec<StepLoss>> {
        let weights = self.topo.ds_weights();
        let Some(l) = self.ledger.as_mut() else { return Ok(Vec::new()) };
        let read = l.read(be, &weights)?;
        self.steps += read.iter().filter(|s| s.applied).count() as u64;
        Ok(read)
    }

    /// The numbers of every step queued since the last call, in order (waits for the device).
    pub fn take_steps(&mut self, be: &B) -> Result<Vec<StepLoss>> {
        let mut all = std::mem::take(&mut self.read_early);
        all.extend(self.read_ledger(be)?);
        Ok(all)
    }

    /// One training step from host memory, waited for (tests, benches).
    pub fn train_step(&mut self, be: &B, acts: &Acts<B>, image: &[f32], labels: &[u8], lr: f64) -> Result<StepLoss> {
        self.step(be, acts, Input::Host { image, labels }, lr)?;
        let mut all = self.take_steps(be)?;
        all.pop().ok_or_else(|| anyhow::anyhow!("a step left no record"))
    }

    /// Full-resolution logits for `image` (acts from a forward-only plan).
    pub fn forward_logits(&self, be: &B, acts: &Acts<B>, image: &[f32]) -> Result<Slot> {
        let pass = Pass::new(be, self, acts);
        pass.load(image, None)?;
        pass.forward(true)?;
        Ok(acts.plan.logits[0].expect("the full-resolution head is always planned"))
    }
}

/// Wall times of a step's phases, measured only when asked (each lap synchronises).
struct Phases {
    on: bool,
    at: std::time::Instant,
    laps: Vec<f64>,
}

impl Phases {
    fn start<B: Backend>(be: &B, on: bool) -> Result<Phases> {
        if on {
            be.sync()?;
        }
        Ok(Phases { on, at: std::time::Instant::now(), laps: Vec::new() })
    }
    fn lap<B: Backend>(mut self, be: &B) -> Result<Phases> {
        if self.on {
            be.sync()?;
            let now = std::time::Instant::now();
            self.laps.push((now - self.at).as_secs_f64());
            self.at = now;
        }
        Ok(self)
    }
    fn times(&self) -> (f64, f64) {
        (self.laps.first().copied().unwrap_or(0.0), self.laps.get(1).copied().unwrap_or(0.0))
    }
}

/// One pass over the net: the backend, the weights and the activation memory.
pub(super) struct Pass<'a, B: Backend> {
    pub(super) be: &'a B,
    pub(super) net: &'a UNet<B>,
    pub(super) a: &'a Acts<B>,
    /// Gradient ranges (offset, length) handed to ops and not yet summed over the ranks.
    written: std::cell::RefCell<Vec<(usize, usize)>>,
    /// Gradient ranges whose sum over the ranks has started.
    summed: std::cell::RefCell<Vec<(usize, usize)>>,
}

impl<'a, B: Backend> Pass<'a, B> {
    fn new(be: &'a B, net: &'a UNet<B>, a: &'a Acts<B>) -> Pass<'a, B> {
        Pass { be, net, a, written: Default::default(), summed: Default::default() }
    }

    /// Several ranks: starts summing the gradients the ops queued so far have written, in
    /// contiguous runs of at least a bucket (every one left when `last`: then the update waits
    /// for all of them). Called between stages of the backward pass, so the sums of the
    /// layers done overlap the layers still to do.
    pub(super) fn sum_ready(&self, last: bool) -> Result<()> {
        if self.be.ranks().1 == 1 {
            return Ok(());
        }
        let mut written = self.written.borrow_mut();
        written.sort_unstable();
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for &(o, n) in written.iter() {
            match runs.last_mut() {
                Some(r) if o <= r.1 => r.1 = r.1.max(o + n),
                _ => runs.push((o, o + n)),
            }
        }
        written.clear();
        for (start, end) in runs {
            if last || end - start >= self.net.grad_bucket {
                self.be.start_sum(self.be.view(&self.net.arena, self.net.layout.len + start, end - start))?;
                self.summed.borrow_mut().push((start, end));
            } else {
                written.push((start, end - start));
            }
        }
        if last {
            // Every gradient is summed exactly once a step: a value summed twice (or never)
            // would leave the ranks' updates apart.
            let mut summed = self.summed.borrow_mut();
            summed.sort_unstable();
            let tiled = summed.windows(2).all(|w| w[0].1 == w[1].0) && summed.first().is_some_and(|f| f.0 == 0) && summed.last().is_some_and(|l| l.1 == self.net.layout.len);
            ensure!(tiled, "the backward pass's gradients do not cover the {} parameters once (summed over the ranks: {:?}): a layer's gradient is missing or written twice", self.net.layout.len, *summed);
            summed.clear();
            self.be.join_sums()?;
        }
        Ok(())
    }
}

impl<B: Backend> Pass<'_, B> {
    pub(super) fn act(&self, s: &Slot) -> B::Buf {
        self.be.view(&self.a.arena, s.offset, s.len())
    }
    pub(super) fn act_at(&self, offset: usize, len: usize) -> B::Buf {
        self.be.view(&self.a.arena, offset, len)
    }
    pub(super) fn stat(&self, offset: usize, len: usize) -> B::Buf {
        self.be.view(&self.a.stats, offset, len)
    }
    fn label(&self, s: Slot) -> B::LabelBuf {
        self.be.label_view(&self.a.labels, s.offset, s.dims.rows())
    }
    pub(super) fn par(&self, offset: usize, len: usize) -> B::Buf {
        self.be.view(&self.net.arena, offset, len)
    }
    pub(super) fn grad(&self, offset: usize, len: usize) -> B::Buf {
        self.written.borrow_mut().push((offset, len));
        self.be.view(&self.net.arena, self.net.layout.len + offset, len)
    }
    pub(super) fn policy(&self) -> Checkpointing {
        self.a.plan.policy
    }
    fn last(&self) -> usize {
        self.net.topo.convs_per_stage - 1
    }

    fn slots(&self, id: BlockId) -> &BlockSlots {
        let p = &self.a.plan;
        match id {
            BlockId::Enc(s, j) => &p.enc[s][j],
            BlockId::Dec(s, j) => &p.dec[s][j],
            BlockId::Stem => p.stem.as_ref().expect("a residual encoder's plan has a stem"),
            BlockId::Res(s, j) => &p.res[s][j].c1,
        }
    }
    fn params(&self, id: BlockId) -> (&BlockParams, ConvGeom) {
        let (l, t) = (&self.net.layout, &self.net.topo);
        match id {
            BlockId::Enc(s, j) => (&l.enc[s][j], t.enc_geom(s, j)),
            BlockId::Dec(s, j) => (&l.dec[s][j], t.dec_geom(s, j)),
            BlockId::Stem => (l.stem.as_ref().expect("a residual encoder's layout has a stem"), t.stem_geom()),
            BlockId::Res(s, j) => (&l.res[s][j].conv1, t.res_block(s, j).conv1),
        }
    }

    /// Uploads the batch (image, and the full-resolution labels when given).
    fn load(&self, image: &[f32], labels: Option<&[u8]>) -> Result<()> {
        let img = self.a.plan.image;
        ensure!(image.len() == img.len(), "image batch has {} values, the net expects {} ({})", image.len(), img.len(), img.dims);
        self.be.upload(self.act(&img), image)?;
        let Some(labels) = labels else { return Ok(()) };
        let full = Dims { c: 1, ..img.dims };
        ensure!(labels.len() == full.rows(), "label batch has {} voxels, expected {}", labels.len(), full.rows());
        // Resolution 0 is the full patch and always supervised; the others are downsampled.
        let top = self.a.plan.labels[0].expect("the full-resolution output always has a label slot");
        self.be.upload_labels(self.label(top), labels)
    }

    /// The label maps of the lower supervised resolutions, from the full-resolution one.
    fn downsample_labels(&self) -> Result<()> {
        let top = self.a.plan.labels[0].expect("the full-resolution output always has a label slot");
        for s in self.a.plan.labels[1..].iter().flatten() {
            self.be.downsample_labels(self.label(top), top.dims, self.label(*s), s.dims)?;
        }
        Ok(())
    }

    // ---------------- forward ----------------

    pub(super) fn block_fwd(&self, id: BlockId, input: B::Buf) -> Result<()> {
        let (p, g) = self.params(id);
        let a = *self.slots(id);
        let be = self.be;
        let out = a.x.dims;
        let stat = |o| self.stat(o, out.n * out.c);
        be.conv_fwd(input, a.input, self.par(p.conv.w, g.weight_len()), self.par(p.conv.b, g.cout), self.act(&a.x), &g)?;
        be.norm_stats(self.act(&a.x), out, stat(a.mean), stat(a.rstd))?;
        be.norm_act_fwd(self.act(&a.x), out, stat(a.mean), stat(a.rstd), self.par(p.gamma, g.cout), self.par(p.beta, g.cout), self.act(&a.y))?;
        self.a.y_resident.set(Some(id));
        Ok(())
    }

    /// The block's output, recomputed from its conv output when level 1 evicted it.
    pub(super) fn y(&self, id: BlockId) -> Result<B::Buf> {
        let a = *self.slots(id);
        if self.policy() == Checkpointing::Level1 && self.a.y_resident.get() != Some(id) {
            let (p, g) = self.params(id);
            let out = a.x.dims;
            let stat = |o| self.stat(o, out.n * out.c);
            self.be.norm_act_fwd(self.act(&a.x), out, stat(a.mean), stat(a.rstd), self.par(p.gamma, g.cout), self.par(p.beta, g.cout), self.act(&a.y))?;
            self.a.y_resident.set(Some(id));
        }
        Ok(self.act(&a.y))
    }

    /// Writes [upsampled | skip] of decoder stage s.
    fn build_cat(&self, s: usize) -> Result<B::Buf> {
        let cat = self.a.plan.cat[s];
        let skip = self.enc_out(s)?.0;
        let up = self.a.plan.up[s];
        self.be.concat(self.act(&up), up.dims.c, skip, up.dims.c, up.dims.rows(), self.act(&cat))?;
        self.a.cat_resident.set(Some(s));
        Ok(self.act(&cat))
    }

    /// [upsampled | skip] of decoder stage s, rebuilt when level 1 evicted it.
    fn cat(&self, s: usize) -> Result<B::Buf> {
        if self.policy() == Checkpointing::Level1 && self.a.cat_resident.get() != Some(s) {
            return self.build_cat(s);
        }
        Ok(self.act(&self.a.plan.cat[s]))
    }

    fn enc_input(&self, s: usize, j: usize) -> Result<B::Buf> {
        match (s, j) {
            (0, 0) => Ok(self.act(&self.a.plan.image)),
            (_, 0) => self.y(BlockId::Enc(s - 1, self.last())),
            _ => self.y(BlockId::Enc(s, j - 1)),
        }
    }

    fn dec_input(&self, s: usize, j: usize) -> Result<B::Buf> {
        if j == 0 {
            self.cat(s)
        } else {
            self.y(BlockId::Dec(s, j - 1))
        }
    }

    /// Input of the transposed conv into decoder stage s.
    fn up_input(&self, s: usize) -> Result<(B::Buf, Dims)> {
        if s + 2 == self.net.topo.stages() {
            return self.enc_out(s + 1);
        }
        let id = BlockId::Dec(s + 1, self.last());
        Ok((self.y(id)?, self.slots(id).y.dims))
    }

    /// Encoder stage s's output (the skip into the decoder).
    fn enc_out(&self, s: usize) -> Result<(B::Buf, Dims)> {
        if self.net.topo.is_residual() {
            let y = self.a.plan.res[s].last().expect("every stage has a block").y;
            return Ok((self.act(&y), y.dims));
        }
        let id = BlockId::Enc(s, self.last());
        Ok((self.y(id)?, self.slots(id).y.dims))
    }

    pub(super) fn enc_stage_fwd(&self, s: usize) -> Result<()> {
        if self.net.topo.is_residual() {
            return self.res_stage_fwd(s);
        }
        for j in 0..self.net.topo.convs_per_stage {
            let input = self.enc_input(s, j)?;
            self.block_fwd(BlockId::Enc(s, j), input)?;
        }
        Ok(())
    }

    fn dec_stage_fwd(&self, s: usize, heads: bool) -> Result<()> {
        let (t, l, be) = (&self.net.topo, &self.net.layout, self.be);
        let (prev, prev_dims) = self.up_input(s)?;
        let (ug, up) = (t.up_geom(s), self.a.plan.up[s]);
        be.convt_fwd(prev, prev_dims, self.par(l.up[s].w, ug.weight_len()), self.par(l.up[s].b, ug.cout), self.act(&up), &ug)?;
        self.build_cat(s)?;
        for j in 0..t.convs_per_stage {
            let input = self.dec_input(s, j)?;
            self.block_fwd(BlockId::Dec(s, j), input)?;
        }
        if let (true, Some(lg)) = (heads, self.a.plan.logits[s]) {
            let id = BlockId::Dec(s, self.last());
            let (hg, hp) = (t.head_geom(s), l.head[s]);
            be.conv_fwd(self.y(id)?, self.slots(id).y.dims, self.par(hp.w, hg.weight_len()), self.par(hp.b, hg.cout), self.act(&lg), &hg)?;
        }
        Ok(())
    }

    fn forward(&self, heads: bool) -> Result<()> {
        self.a.y_resident.set(None);
        self.a.cat_resident.set(None);
        for s in 0..self.net.topo.stages() {
            self.enc_stage_fwd(s)?;
        }
        for s in (0..self.net.topo.stages() - 1).rev() {
            self.dec_stage_fwd(s, heads)?;
        }
        Ok(())
    }

    // ---------------- backward ----------------

    /// Backward through conv -> norm -> LeakyReLU. `grad` holds d(output) and is turned
    /// into d(conv output) in place; `dx` receives d(input) (beta 1 adds).
    pub(super) fn block_bwd(&self, id: BlockId, input: B::Buf, grad: usize, dx: Option<(usize, f32)>) -> Result<()> {
        let (p, g) = self.params(id);
        let a = *self.slots(id);
        let be = self.be;
        let out = a.x.dims;
        let gb = self.act_at(grad, out.len());
        let stat = |o| self.stat(o, out.n * out.c);
        be.norm_act_bwd(gb, self.act(&a.x), out, stat(a.mean), stat(a.rstd), self.par(p.gamma, g.cout), self.par(p.beta, g.cout), gb, self.grad(p.gamma, g.cout), self.grad(p.beta, g.cout))?;
        be.conv_wgrad(input, a.input, gb, self.grad(p.conv.w, g.weight_len()), self.grad(p.conv.b, g.cout), &g)?;
        if let Some((dst, beta)) = dx {
            be.conv_dgrad(gb, self.par(p.conv.w, g.weight_len()), self.act_at(dst, a.input.len()), a.input, &g, beta)?;
        }
        Ok(())
    }

    fn head_bwd(&self, s: usize, dst: usize, beta: f32) -> Result<()> {
        let Some(lg) = self.a.plan.logits[s] else { return Ok(()) };
        let (hg, hp): (ConvGeom, ConvParams) = (self.net.topo.head_geom(s), self.net.layout.head[s]);
        let id = BlockId::Dec(s, self.last());
        let (input, dims) = (self.y(id)?, self.slots(id).y.dims);
        let be = self.be;
        be.conv_wgrad(input, dims, self.act(&lg), self.grad(hp.w, hg.weight_len()), self.grad(hp.b, hg.cout), &hg)?;
        be.conv_dgrad(self.act(&lg), self.par(hp.w, hg.weight_len()), self.act_at(dst, dims.len()), dims, &hg, beta)
    }

    fn other(&self, g: usize) -> usize {
        if g == self.a.plan.ga {
            self.a.plan.gb
        } else {
            self.a.plan.ga
        }
    }

    fn backward(&self) -> Result<()> {
        let (t, l, p, be) = (&self.net.topo, &self.net.layout, &self.a.plan, self.be);
        let (ns, nc) = (t.stages(), t.convs_per_stage);
        let recompute = self.policy() == Checkpointing::Level2;
        // Decoder, full resolution first. `g` holds d(stage output). Level 2 recomputes each
        // stage but the full-resolution one, which the forward pass left in the scratch.
        let mut g = p.ga;
        for s in 0..ns - 1 {
            if recompute && s > 0 {
                self.dec_stage_fwd(s, false)?;
            }
            self.head_bwd(s, g, if s == 0 { 0.0 } else { 1.0 })?;
            // The concat's gradient overwrites the concat: the first conv's weight gradient
            // has read it by then.
            let cat = p.cat[s];
            for j in (0..nc).rev() {
                let input = self.dec_input(s, j)?;
                let dst = if j == 0 { cat.offset } else { self.other(g) };
                self.block_bwd(BlockId::Dec(s, j), input, g, Some((dst, 0.0)))?;
                g = dst;
            }
            self.a.cat_resident.set(None);
            let up = p.up[s];
            let f = up.dims.c;
            be.concat_bwd(self.act(&cat), f, f, up.dims.rows(), self.act_at(p.ga, up.len()), self.act_at(p.skip_grad[s], up.len()), 0.0)?;
            let ug = t.up_geom(s);
            let (prev, prev_dims) = self.up_input(s)?;
            be.convt_wgrad(prev, prev_dims, self.act_at(p.ga, up.len()), self.grad(l.up[s].w, ug.weight_len()), self.grad(l.up[s].b, ug.cout), &ug)?;
            be.convt_dgrad(self.act_at(p.ga, up.len()), self.par(l.up[s].w, ug.weight_len()), self.act_at(p.gb, prev_dims.len()), prev_dims, &ug, 0.0)?;
            g = p.gb;
            self.sum_ready(false)?;
        }
        // Encoder, bottleneck first; skips already hold their decoder gradient.
        if t.is_residual() {
            return self.res_encoder_bwd();
        }
        for s in (0..ns).rev() {
            if recompute {
                self.enc_stage_fwd(s)?;
            }
            if s < ns - 1 {
                g = p.skip_grad[s];
            }
            for j in (0..nc).rev() {
                let input = self.enc_input(s, j)?;
                let dst = match (s, j) {
                    (0, 0) => None,
                    (_, 0) => Some((p.skip_grad[s - 1], 1.0)),
                    _ => Some((self.other(g), 0.0)),
                };
                self.block_bwd(BlockId::Enc(s, j), input, g, dst)?;
                if let Some((d, _)) = dst {
                    g = d;
                }
            }
            self.sum_ready(false)?;
        }
        Ok(())
    }
}
