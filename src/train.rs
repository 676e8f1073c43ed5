//! `segk train`: nnU-Net v2's training schedule on a preprocessed store, fed by the loader's
//! worker pool. Per epoch: training iterations with augmentation, validation iterations on
//! the held-out fold without it, global pseudo-Dice per foreground class and its EMA, and the
//! share of step time spent waiting for data.

use crate::backend::{poly_lr, Backend};
use crate::checkpoint::{self, TrainerState};
use crate::loader::cascade::CascadeAugment;
use crate::loader::{self, Augment, BatchSpec};
use crate::model::params::ParamLayout;
use crate::model::plan::ActPlan;
use crate::feed::Feed;
use crate::model::unet::{Acts, Input};
use crate::model::{Checkpointing, UNet};
use crate::plan::plans::Plan;
use crate::plot;
use crate::sysinfo::gib;
use crate::threads;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// The store folder (`.../3d_fullres`).
    pub store: PathBuf,
    pub plan: Plan,
    pub train_ids: Vec<String>,
    pub val_ids: Vec<String>,
    /// Where the log goes.
    pub out: PathBuf,
    pub epochs: usize,
    pub iters_per_epoch: usize,
    pub val_iters: usize,
    /// None: the fastest level that fits the device's free memory.
    pub checkpointing: Option<Checkpointing>,
    pub workers: Option<usize>,
    pub seed: u64,
    pub lr: f64,
    /// Epochs between checkpoint_latest saves.
    pub save_every: usize,
    pub resume: bool,
    /// Fine-tuning: start from these weights (all but the segmentation heads).
    pub pretrained: Option<PathBuf>,
    /// A cascade stage: the previous stage's maps on the stored grids
    /// (`crate::cascade::prepare`) and the labels they become one-hot channels of.
    pub prev_stage: Option<(PathBuf, Vec<i64>)>,
    /// The other ranks of a run on several GPUs (`crate::dist`); None: this process alone.
    pub group: Option<std::sync::Arc<crate::dist::group::Group>>,
}

/// nnU-Net's schedule.
pub const EPOCHS: usize = 1000;
pub const ITERS_PER_EPOCH: usize = 250;
pub const VAL_ITERS: usize = 50;
pub const INITIAL_LR: f64 = 1e-2;
pub const EMA: f64 = 0.9;
/// Non-finite steps in a row before training stops.
pub const MAX_BAD_STEPS: usize = 5;
/// nnU-Net saves checkpoint_latest every 50 epochs.
pub const SAVE_EVERY: usize = 50;

#[derive(Clone, Debug)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    /// Global pseudo-Dice per foreground class over the validation iterations.
    pub pseudo_dice: Vec<f64>,
    pub ema_dice: f64,
    pub lr: f64,
    pub seconds: f64,
    /// Share of the training iterations' wall time spent waiting for batches.
    pub data_wait: f64,
    /// Mean number of batches ready when the trainer asked for one.
    pub ready: f64,
    pub skipped_steps: usize,
    /// Device memory in use at the epoch's end (GPU only) and the host's peak RSS so far.
    pub device_memory: Option<u64>,
    pub host_peak: Option<u64>,
}

impl EpochLog {
    pub fn line(&self) -> String {
        let dice: Vec<String> = self.pseudo_dice.iter().map(|d| format!("{d:.4}")).collect();
        let mut line = format!(
            "epoch {:4}  train loss {:.4}  pseudo dice [{}]  ema {:.4}  lr {:.6}  {:.1} s  data wait {:.1} %  ready {:.1}",
            self.epoch,
            self.train_loss,
            dice.join(", "),
            self.ema_dice,
            self.lr,
            self.seconds,
            self.data_wait * 100.0,
            self.ready
        );
        if let Some(d) = self.device_memory {
            line += &format!("  gpu mem {:.2} GiB", gib(d));
        }
        if let Some(h) = self.host_peak {
            line += &format!("  host peak {:.2} GiB", gib(h));
        }
        line
    }
}

/// True positives, false positives and false negatives per region of a region net, from the
/// predicted region bits ([`Backend::region_bits`]) and the label map, as nnU-Net's
/// validation step (sigmoid above 0.5 against the region masks). Voxels labelled `limit` or
/// above (the ignore label) are not scored, as nnU-Net masks them.
pub fn count_regions(bits: &[u8], truth: &[u8], regions: &[Vec<i64>], limit: usize, tp: &mut [u64], fp: &mut [u64], fn_: &mut [u64]) {
    for (&b, &t) in bits.iter().zip(truth).filter(|(_, &t)| (t as usize) < limit) {
        for (k, r) in regions.iter().enumerate() {
            match (b >> k & 1 == 1, r.contains(&(t as i64))) {
                (true, true) => tp[k] += 1,
                (true, false) => fp[k] += 1,
                (false, true) => fn_[k] += 1,
                _ => {}
            }
        }
    }
}

/// True positives, false positives and false negatives per foreground class.
fn count(pred: &[u8], truth: &[u8], classes: usize, tp: &mut [u64], fp: &mut [u64], fn_: &mut [u64]) {
    for (&p, &t) in pred.iter().zip(truth) {
        // Voxels of the ignore label (above every class) are not scored, as nnU-Net masks them.
        if t as usize >= classes {
            continue;
        }
        if p == t {
            if p > 0 {
                tp[p as usize - 1] += 1;
            }
            continue;
        }
        if p > 0 && (p as usize) < classes {
            fp[p as usize - 1] += 1;
        }
        if t > 0 && (t as usize) < classes {
            fn_[t as usize - 1] += 1;
        }
    }
}

/// Set by SIGINT/SIGTERM: the trainer saves checkpoint_latest at the next step and stops.
pub static STOP: AtomicBool = AtomicBool::new(false);
/// Whether the training loop is running (and so answers STOP); outside it a signal stops the
/// process at once.
pub static STEPPING: AtomicBool = AtomicBool::new(false);

/// STEPPING for as long as it lives (every way out of the training loop included); so long,
/// too, the ranks' watchdog stops a run that makes no progress.
struct Stepping;
impl Stepping {
    fn start() -> Stepping {
        STEPPING.store(true, Ordering::Relaxed);
        crate::dist::group::training(true);
        Stepping
    }
}
impl Drop for Stepping {
    fn drop(&mut self) {
        STEPPING.store(false, Ordering::Relaxed);
        crate::dist::group::training(false);
    }
}

/// Bytes per element of a backend's two kinds of memory.
#[derive(Clone, Copy, Debug)]
pub struct ElemBytes {
    /// Parameters, gradients, optimizer state, statistics, staging.
    pub working: usize,
    /// Activations and their gradients.
    pub activation: usize,
}

impl ElemBytes {
    pub fn of<B: Backend>(be: &B) -> ElemBytes {
        ElemBytes { working: be.elem_bytes(), activation: be.act_bytes() }
    }
}

/// Bytes a training run needs on the device at a checkpoint level: parameters, gradients
/// and momentum, the training activations, the validation activations and label maps, the
/// feed's staging buffers (one batch of image and labels).
pub fn device_bytes(plan: &Plan, level: Checkpointing, sizes: ElemBytes) -> Result<usize> {
    let (t, elem_bytes, act) = (&plan.topology, sizes.working, sizes.activation);
    let params = 3 * ParamLayout::new(t).len * elem_bytes;
    let train = ActPlan::new(t, plan.patch_size, plan.batch_size, level, true)?.bytes(act, elem_bytes);
    let infer = ActPlan::new(t, plan.patch_size, plan.batch_size, Checkpointing::Level1, false)?.bytes(act, elem_bytes);
    let voxels = plan.batch_size * plan.patch_size.iter().product::<usize>();
    let staging = voxels * t.in_channels * elem_bytes + voxels;
    Ok(params + train + infer + voxels + staging)
}

/// The checkpoint level to train at: the one asked for if it fits, or (auto) the fastest
/// that fits; refuses with the numbers and the remedies when none does.
/// `workspace`: what the backend's ops allocate on their own, on top of the arenas.
pub fn preflight(plan: &Plan, asked: Option<Checkpointing>, sizes: ElemBytes, available: Option<u64>, workspace: u64) -> Result<Checkpointing> {
    let levels = match asked {
        Some(l) => vec![l],
        None => vec![Checkpointing::None, Checkpointing::Level1, Checkpointing::Level2],
    };
    let Some(avail) = available else { return Ok(asked.unwrap_or(Checkpointing::Level1)) };
    let mut needs = Vec::new();
    for &l in &levels {
        let need = device_bytes(plan, l, sizes)? as u64 + workspace;
        if need <= avail {
            return Ok(l);
        }
        needs.push(format!("level {}: {:.2} GiB", l.level(), gib(need)));
    }
    // Only an explicit level can leave another that fits (auto tried them all).
    let mut fits = None;
    for l in [Checkpointing::None, Checkpointing::Level1, Checkpointing::Level2] {
        if !levels.contains(&l) && device_bytes(plan, l, sizes)? as u64 + workspace <= avail {
            fits = Some(l);
            break;
        }
    }
    // The planner's memory model counts a GPU's bf16 activations and no validation arena:
    // scale the budget to ask of it by what this backend really needs for the plan.
    let scale = match plan.gpu_memory_needed_bytes {
        0 => 1.0,
        modelled => device_bytes(plan, Checkpointing::Level1, sizes)? as f64 / modelled as f64,
    };
    let budget = (avail.saturating_sub(workspace)) as f64 * 0.95 / scale;
    bail!("training needs {} but {:.2} GiB is free: {}", needs.join(", "), gib(avail), remedies(budget, fits.map(|l| l.level())))
}

/// What to do when training does not fit: plan for `budget` bytes (as `segk plan` counts
/// them), another checkpoint level when one would fit, or free memory.
fn remedies(budget: f64, level: Option<u8>) -> String {
    let gpu_memory = ((budget / (1u64 << 30) as f64 * 10.0).floor() / 10.0).max(0.1);
    let level = level.map(|l| format!("train at --checkpointing {l} (or auto), ")).unwrap_or_default();
    format!("plan a smaller patch (`segk plan --gpu-memory {gpu_memory}`), {level}or free memory")
}

/// A device out-of-memory error during the run gets the pre-flight's remedies, sized for what
/// segk could have: the free memory the device reported plus the `held` bytes segk already
/// holds. Other errors pass unchanged. (The OOM's own numbers follow as the error's source.)
pub fn explain_oom(e: anyhow::Error, held: u64) -> anyhow::Error {
    let Some(oom) = e.downcast_ref::<crate::backend::OutOfMemory>() else { return e };
    let advice = match oom.free {
        Some(free) => remedies((free + held) as f64 * 0.9, Some(2)),
        None => "plan a smaller patch (`segk plan --gpu-memory`), train at --checkpointing 2, or free memory".to_string(),
    };
    e.context(format!("the device ran out of memory beyond what the pre-flight counted (is another process using it?): {advice}"))
}

/// A failure mid-run (data or device): save checkpoint_latest where training stands (the batch
/// numbers included), so nothing is lost, and say how to go on (`next`).
fn save_and_fail<B: Backend>(be: &B, cfg: &TrainConfig, net: &mut UNet<B>, st: &mut TrainerState, pending: &mut Vec<Vec<String>>, e: anyhow::Error, next: &str) -> anyhow::Error {
    // The steps queued before the failure count as taken (when the device can still say so).
    let _ = settle(be, net, st, pending);
    if !leads(cfg) {
        return e.context(format!("rank stopped at epoch {} iteration {} (rank 0 writes the checkpoints)", st.epoch, st.iter));
    }
    match checkpoint::save(&cfg.out, "checkpoint_latest", be, net, st) {
        Ok(()) => e.context(format!("saved checkpoint_latest at epoch {} iteration {}; {next}, then --resume", st.epoch, st.iter)),
        Err(save) => {
            // A lost device fails the save the way it failed the step: say that once.
            let why = if format!("{save:#}") == format!("{e:#}") { "the same error".to_string() } else { format!("{save:#}") };
            e.context(format!("training stopped at epoch {} iteration {}; checkpoint_latest could not be saved ({why}), so --resume starts from the last checkpoint saved before", st.epoch, st.iter))
        }
    }
}

/// The steps read back (in the order they were queued, with each one's cases) into the
/// epoch's sums. Every step is counted before an error (a label the net has no output for,
/// too many non-finite steps in a row) is returned, so a checkpoint saved after it is whole.
fn account(steps: &[crate::model::unet::StepLoss], pending: &mut Vec<Vec<String>>, st: &mut TrainerState, topo: &crate::model::Topology) -> Result<()> {
    let mut first_error = None;
    for (s, cases) in steps.iter().zip(pending.drain(..)) {
        if let Err(e) = crate::model::ledger::check_labels(s, topo.label_limit(), topo.ignore_label, &format_args!("the batch of cases {cases:?}")) {
            first_error.get_or_insert(e);
        }
        if s.applied {
            st.epoch_loss_sum += s.total;
            st.epoch_steps += 1;
            st.bad_in_a_row = 0;
        } else {
            st.epoch_skipped += 1;
            st.bad_in_a_row += 1;
            println!("  skipped a step at epoch {}: non-finite loss or gradient (loss {}, cases {cases:?})", st.epoch, s.total);
            if st.bad_in_a_row >= MAX_BAD_STEPS {
                first_error.get_or_insert(anyhow::anyhow!("{} steps in a row gave a non-finite loss or gradient at epoch {} (last batch: cases {cases:?})", st.bad_in_a_row, st.epoch));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Reads back the steps queued so far (one wait for the device) and accounts them: an error of
/// the device, or of the data (with the remedy for each).
fn settle<B: Backend>(be: &B, net: &mut UNet<B>, st: &mut TrainerState, pending: &mut Vec<Vec<String>>) -> std::result::Result<(), (anyhow::Error, &'static str)> {
    let steps = net.take_steps(be).map_err(|e| (e, FIX_DEVICE))?;
    st.steps = net.steps;
    account(&steps, pending, st, &net.topo).map_err(|e| (e, FIX_DATA))
}

const FIX_DATA: &str = "fix or remove the case named below";
const FIX_DEVICE: &str = "mend what is said below";

/// Trains and returns one log entry per epoch run (resumed epochs are not repeated).
/// The thread policy's split for this run: compute threads as every command's, workers from
/// --workers or the variables or segk's choice for the device, capped by host memory.
fn thread_split<B: Backend>(be: &B, cfg: &TrainConfig, spec: &BatchSpec) -> Result<threads::Split> {
    let mut cpus = threads::Cpus::detect();
    // Ranks on one node share its CPUs, unless the launcher bound each to CPUs of its own.
    let local = cfg.group.as_ref().map_or(1, |g| g.world().local_size);
    if local > 1 && cpus.affinity == cpus.online {
        cpus.affinity = (cpus.usable() / local).max(1);
        cpus.quota = None;
    }
    let on = if be.computes_on_host_threads() { threads::StepOn::Cpu } else { threads::StepOn::Gpu };
    let mut workers = threads::workers(cfg.workers, &cpus, on, &threads::process_env)?;
    let (per_worker, base) = loader::Loader::worker_bytes(spec);
    let available = crate::sysinfo::host_memory_available();
    if let Some(line) = threads::cap_by_memory(&mut workers, per_worker, base, available, "augmentation workers", "--workers")? {
        println!("{line}");
    }
    let most = available.map_or(usize::MAX, |a| (a.saturating_sub(base) / per_worker.max(1)) as usize);
    Ok(threads::Split::new(threads::global(), workers, on, &cpus, most))
}

/// Whether this process writes the run's files: the only rank, or rank 0 of several.
pub fn leads(cfg: &TrainConfig) -> bool {
    cfg.group.as_ref().is_none_or(|g| g.world().rank == 0)
}

/// Several ranks: joins NCCL's group (rank 0's unique id handed out over the rendezvous) and
/// returns this rank's share of each global batch.
fn join_ranks<B: Backend>(be: &B, cfg: &TrainConfig) -> Result<loader::Shard> {
    let Some(g) = &cfg.group else { return Ok(loader::Shard::default()) };
    let w = g.world();
    let id = if w.rank == 0 { be.group_id()? } else { Vec::new() };
    let id = g.sync("nccl-id", &id)?;
    crate::dist::group::watch_phase(Some("NCCL's setup (ncclCommInitRank)"));
    let joined = be.join_group(w.rank, w.size, &id);
    crate::dist::group::watch_phase(None);
    joined?;
    let share = w.share(cfg.plan.batch_size)?;
    println!("rank {} of {} ({}): samples {}..{} of each batch of {}", w.rank, w.size, w.launcher, share.start, share.end, cfg.plan.batch_size);
    Ok(loader::Shard { first: share.start, global: cfg.plan.batch_size })
}

/// Every rank must hold the same parameters (they apply the same all-reduced gradients with
/// the same kernels): checked bit for bit once an epoch, so a divergence is caught where it
/// starts instead of silently training several different nets.
fn check_same_params<B: Backend>(be: &B, net: &UNet<B>, g: &crate::dist::group::Group, epoch: usize) -> Result<()> {
    let mut p = vec![0f32; net.n_params()];
    be.download(net.params(be), &mut p)?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in &p {
        h = (h ^ v.to_bits() as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let (_, odd) = g.disagreeing(&format!("params-{epoch}"), &format!("{h:016x}"))?;
    let odd: Vec<String> = odd.iter().map(|(r, _)| r.to_string()).collect();
    anyhow::ensure!(odd.is_empty(), "after epoch {epoch} the parameters of rank(s) {} differ from rank 0's: the ranks diverged (a GPU fault, or ranks built differently)", odd.join(", "));
    Ok(())
}

/// Every rank starts from the same place: a rank that loaded another checkpoint (or none, not
/// seeing rank 0's folder) would wait in another collective than the others.
fn same_start(g: &crate::dist::group::Group, st: &TrainerState) -> Result<()> {
    let mine = format!("epoch {} iteration {} step {} batches {}/{}", st.epoch, st.iter, st.steps, st.next_train_batch, st.next_val_batch);
    let (first, odd) = g.disagreeing("start", &mine)?;
    let odd: Vec<String> = odd.iter().map(|(r, s)| format!("rank {r} at {s}")).collect();
    anyhow::ensure!(odd.is_empty(), "the ranks start from different places: rank 0 at {first}, {} (every rank must read the same output folder: a shared filesystem)", odd.join(", "));
    Ok(())
}

pub fn run_on<B: Backend>(be: &B, cfg: &TrainConfig) -> Result<Vec<EpochLog>> {
    let shard = join_ranks(be, cfg)?;
    // Rank 0 writes the checkpoints, logs and plots; every rank trains.
    let lead = leads(cfg);
    // Each rank holds its share of the batch; the plan's batch stays the global one.
    let local = match &cfg.group {
        Some(g) => crate::plan::plans::Plan { batch_size: cfg.plan.batch_size / g.world().size, ..cfg.plan.clone() },
        None => cfg.plan.clone(),
    };
    let plan = &local;
    let topo = plan.topology.clone();
    let classes = topo.n_classes;
    let channels = topo.in_channels;
    let largest_weight = ParamLayout::new(&topo).tensors.iter().map(|t| t.len()).max().unwrap_or(0);
    let widest = topo.features.iter().copied().max().unwrap_or(0).max(classes);
    let workspace = be.workspace_bytes(largest_weight, widest, plan.batch_size) as u64;
    let sizes = ElemBytes::of(be);
    let level = preflight(plan, cfg.checkpointing, sizes, be.memory_available(), workspace)?;
    let held = device_bytes(plan, level, sizes)? as u64 + workspace;
    println!("memory: {:.2} GiB at checkpointing level {}", gib(held), level.level());
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let oom = |e| explain_oom(e, held);
    let mut net = UNet::new(be, topo.clone(), cfg.seed).map_err(oom)?;
    let mut st = TrainerState { epoch: 0, steps: 0, next_train_batch: 0, next_val_batch: 0, ema_dice: None, best_ema_dice: None, seed: cfg.seed, bad_in_a_row: 0, iter: 0, epoch_loss_sum: 0.0, epoch_steps: 0, epoch_skipped: 0, history: Vec::new(), epochs: Some(cfg.epochs) };
    if let Some(file) = &cfg.pretrained {
        let n = checkpoint::load_pretrained(file, be, &mut net)?;
        println!("pretrained weights: {n} tensors from {} (segmentation heads initialised fresh)", file.display());
    }
    if cfg.resume {
        // As nnU-Net: checkpoint_latest, else checkpoint_best (a run killed before its first
        // periodic save has only that one).
        if let Some(from) = ["checkpoint_latest", "checkpoint_best"].into_iter().find(|n| checkpoint::exists(&cfg.out, n)) {
            st = checkpoint::load(&cfg.out, from, be, &mut net)?;
            println!("resuming from {} at epoch {} iteration {} (step {})", cfg.out.join(format!("{from}.safetensors")).display(), st.epoch, st.iter, st.steps);
            if let Some(before) = st.epochs.filter(|&e| e != cfg.epochs) {
                println!("  the run was started for {before} epochs and goes on for {}: the learning rate follows the new schedule from here", cfg.epochs);
            }
            st.epochs = Some(cfg.epochs);
            if st.epoch >= cfg.epochs {
                println!("this run already finished its {} epochs: nothing left to train", cfg.epochs);
            }
            // checkpoint_best may be newer than checkpoint_latest: never let a worse model replace it.
            if let Ok(best) = checkpoint::read_state(&cfg.out, "checkpoint_best") {
                st.best_ema_dice = match (st.best_ema_dice, best.best_ema_dice) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
        } else {
            println!("--resume: no checkpoint_latest or checkpoint_best in {}, starting fresh", cfg.out.display());
        }
    }
    if let Some(g) = &cfg.group {
        same_start(g, &st)?;
    }
    let spec = |augment, cascade, seed| {
        let prev_stage = cfg.prev_stage.as_ref().map(|(dir, labels)| loader::PrevInputs { dir: dir.clone(), labels: labels.clone(), augment: cascade });
        BatchSpec { batch: plan.batch_size, patch: plan.patch_size, channels, use_mask: plan.use_mask_for_norm.clone(), seed, augment, prev_stage, shard }
    };
    let mem = be.host_memory();
    let train_spec = spec(Augment::nnunet(plan.patch_size, plan.topology.planar), CascadeAugment::default(), st.seed);
    let mut split = thread_split(be, cfg, &train_spec)?;
    let mut train = loader::Loader::start(&cfg.store, &cfg.train_ids, train_spec, split.workers.n, st.next_train_batch, &*mem)?;
    let mut val = loader::Loader::start(&cfg.store, &cfg.val_ids, spec(Augment::none(), CascadeAugment::none(), st.seed ^ 0x5eed), 1, st.next_val_batch, &*mem)?;
    // The CPU step runs on a pool of its own, so that moving a core to the workers resizes it.
    let mut compute = if be.computes_on_host_threads() { Some(threads::compute_pool(split.compute.n)?) } else { None };
    println!("threads: {} compute threads (from {}), {} (from {})", split.compute.n, split.compute.from, crate::sysinfo::count(split.workers.n, "augmentation worker"), split.workers.from);
    println!(
        "loader: {} slots of {:.1} MiB ({}); train {}, validation {}",
        train.pool.slots(),
        spec(Augment::none(), CascadeAugment::none(), 0).slot_bytes() as f64 / (1 << 20) as f64,
        mem.kind(),
        crate::sysinfo::count(cfg.train_ids.len(), "case"),
        crate::sysinfo::count(cfg.val_ids.len(), "case")
    );
    let acts = Acts::new(be, &topo, plan.patch_size, plan.batch_size, level, true).map_err(oom)?;
    let infer = Acts::new(be, &topo, plan.patch_size, plan.batch_size, Checkpointing::Level1, false).map_err(oom)?;
    let rows = plan.batch_size * plan.patch_size.iter().product::<usize>();
    let pred_buf = be.alloc_labels(rows).map_err(oom)?;
    let mut feed = Feed::new(be, acts.plan.image.len(), rows).map_err(oom)?;
    let (input_image, input_labels) = (acts.input_image(be), acts.input_labels(be)?);
    let mut pred = vec![0u8; rows];
    let log_path = cfg.out.join("training_log.txt");
    let mut log = if lead { Some(std::fs::OpenOptions::new().create(true).append(true).open(&log_path).with_context(|| format!("opening {}", log_path.display()))?) } else { None };
    let mut log_line = |line: &str| -> Result<()> {
        println!("{line}");
        match log.as_mut() {
            Some(f) => writeln!(f, "{line}").with_context(|| format!("writing {}", log_path.display())),
            None => Ok(()),
        }
    };
    let mut logs = Vec::new();
    let _answering = Stepping::start();
    while st.epoch < cfg.epochs {
        let epoch = st.epoch;
        let t0 = Instant::now();
        let lr = poly_lr(cfg.lr, epoch, cfg.epochs);
        train.pool.take_stats();
        // Steps of the epoch, on a terminal only (the log gets the epoch's line).
        let bar = indicatif::ProgressBar::new(cfg.iters_per_epoch as u64)
            .with_style(indicatif::ProgressStyle::with_template("epoch {msg} {bar:30} {pos}/{len} steps  {elapsed_precise}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
        bar.set_message(epoch.to_string());
        bar.set_position(st.iter as u64);
        // The cases of each step queued and not yet read back (the numbers come once an epoch).
        let mut pending: Vec<Vec<String>> = Vec::new();
        while st.iter < cfg.iters_per_epoch {
            // With several ranks rank 0 decides where the run stops (a rank's Ctrl-C reaches it
            // through the watchdog) and stops the others once checkpoint_latest is saved.
            if lead && STOP.load(Ordering::Relaxed) {
                // Saved whatever the queued steps say: an error among them comes after the save.
                let settled = settle(be, &mut net, &mut st, &mut pending);
                checkpoint::save(&cfg.out, "checkpoint_latest", be, &net, &st)?;
                if let Err((e, _)) = settled {
                    return Err(e.context(format!("interrupted at epoch {epoch} iteration {}: saved checkpoint_latest", st.iter)));
                }
                bail!("interrupted at epoch {epoch} iteration {}: saved checkpoint_latest; continue with --resume", st.iter);
            }
            let b = match feed.next(&mut train.pool, input_image, input_labels) {
                Ok(b) => b,
                Err(e) => return Err(save_and_fail(be, cfg, &mut net, &mut st, &mut pending, oom(e), FIX_DATA)),
            };
            if let Err(e) = threads::on_pool(compute.as_ref(), || net.step(be, &acts, Input::Resident, lr)) {
                return Err(save_and_fail(be, cfg, &mut net, &mut st, &mut pending, oom(e), FIX_DEVICE));
            }
            pending.push(b.cases.iter().map(|&c| train.ids[c].clone()).collect());
            crate::dist::group::tick();
            st.next_train_batch += 1;
            st.iter += 1;
            train.pool.give_back(b);
            bar.inc(1);
        }
        if let Err((e, fix)) = settle(be, &mut net, &mut st, &mut pending) {
            return Err(save_and_fail(be, cfg, &mut net, &mut st, &mut pending, oom(e), fix));
        }
        bar.finish_and_clear();
        let train_time = t0.elapsed();
        let stats = train.pool.take_stats();
        // One score per foreground class, or per region of a region net.
        let scored = if topo.regions.is_empty() { classes - 1 } else { classes };
        let (mut tp, mut fp, mut fn_) = (vec![0u64; scored], vec![0u64; scored], vec![0u64; scored]);
        for _ in 0..cfg.val_iters {
            let b = match val.pool.next_batch() {
                Ok(b) => b,
                Err(e) => return Err(save_and_fail(be, cfg, &mut net, &mut st, &mut Vec::new(), e, FIX_DATA)),
            };
            let predicted = threads::on_pool(compute.as_ref(), || net.forward_logits(be, &infer, &b.image)).and_then(|lg| {
                let (logits, out) = (be.view(&infer.arena, lg.offset, lg.len()), be.label_view(&pred_buf, 0, rows));
                if topo.regions.is_empty() {
                    be.argmax(logits, lg.dims, out)?;
                } else {
                    be.region_bits(logits, lg.dims, out)?;
                }
                be.download_labels(be.label_view(&pred_buf, 0, rows), &mut pred)
            });
            if let Err(e) = predicted {
                return Err(save_and_fail(be, cfg, &mut net, &mut st, &mut Vec::new(), oom(e), FIX_DEVICE));
            }
            if topo.regions.is_empty() {
                count(&pred, &b.labels, classes, &mut tp, &mut fp, &mut fn_);
            } else {
                count_regions(&pred, &b.labels, &topo.regions, topo.label_limit(), &mut tp, &mut fp, &mut fn_);
            }
            val.pool.give_back(b);
            crate::dist::group::tick();
            st.next_val_batch += 1;
        }
        // Several ranks: the counts over every rank's share of the validation batches.
        if let Some(g) = &cfg.group {
            let mine: Vec<u64> = tp.iter().chain(&fp).chain(&fn_).copied().collect();
            let all = g.sum_u64(&format!("val-{epoch}"), &mine)?;
            tp.copy_from_slice(&all[..scored]);
            fp.copy_from_slice(&all[scored..2 * scored]);
            fn_.copy_from_slice(&all[2 * scored..]);
            check_same_params(be, &net, g, epoch)?;
        }
        let pseudo_dice: Vec<f64> = (0..scored).map(|k| 2.0 * tp[k] as f64 / (2 * tp[k] + fp[k] + fn_[k]) as f64).collect();
        let valid: Vec<f64> = pseudo_dice.iter().copied().filter(|d| d.is_finite()).collect();
        // nnU-Net's nanmean over classes; no foreground anywhere in validation counts as 0.
        let mean = if valid.is_empty() { 0.0 } else { valid.iter().sum::<f64>() / valid.len() as f64 };
        let ema = st.ema_dice.map_or(mean, |e| EMA * e + (1.0 - EMA) * mean);
        st.ema_dice = Some(ema);
        let e = EpochLog {
            epoch,
            train_loss: st.epoch_loss_sum / st.epoch_steps.max(1) as f64,
            pseudo_dice,
            ema_dice: ema,
            lr,
            seconds: t0.elapsed().as_secs_f64(),
            data_wait: stats.wait.as_secs_f64() / train_time.max(Duration::from_nanos(1)).as_secs_f64(),
            ready: stats.mean_fill(),
            skipped_steps: st.epoch_skipped,
            device_memory: be.memory_used(),
            host_peak: crate::sysinfo::peak_rss(),
        };
        st.history.push([e.train_loss, mean, e.ema_dice, e.seconds]);
        st.epoch += 1;
        (st.iter, st.epoch_loss_sum, st.epoch_steps, st.epoch_skipped) = (0, 0.0, 0, 0);
        st.steps = net.steps;
        // Checkpoints before the log line: a logged epoch is a saved one.
        if st.best_ema_dice.is_none_or(|b| ema > b) {
            st.best_ema_dice = Some(ema);
            if lead {
                checkpoint::save(&cfg.out, "checkpoint_best", be, &net, &st)?;
            }
        }
        if lead && (st.epoch.is_multiple_of(cfg.save_every.max(1)) || st.epoch == cfg.epochs) {
            checkpoint::save(&cfg.out, "checkpoint_latest", be, &net, &st)?;
        }
        if lead && st.epoch == cfg.epochs {
            checkpoint::save(&cfg.out, "checkpoint_final", be, &net, &st)?;
        }
        let points: Vec<plot::Point> = st
            .history
            .iter()
            .enumerate()
            .map(|(k, h)| plot::Point { train_loss: h[0], pseudo_dice: h[1], ema_dice: h[2], seconds: h[3], lr: poly_lr(cfg.lr, k, cfg.epochs) })
            .collect();
        // A plot that cannot be drawn or written (disk full, odd filesystem) must not end a run.
        if let Err(err) = if lead { plot::write_progress(&cfg.out.join("progress.png"), &points) } else { Ok(()) } {
            println!("  progress.png not updated: {err:#}");
        }
        log_line(&e.line())?;
        let load = threads::EpochLoad { wall: train_time.as_secs_f64(), wait: stats.wait.as_secs_f64(), busy: stats.busy.as_secs_f64() };
        let note = match split.adapt(&load) {
            Some(change) => {
                train.pool.set_workers(split.workers.n, &*mem)?;
                if let Some(pool) = compute.as_mut().filter(|p| p.current_num_threads() != split.compute.n) {
                    *pool = threads::compute_pool(split.compute.n)?;
                }
                Some(change)
            }
            None => loader::data_wait_advice(e.data_wait, train.pool.workers()),
        };
        if let Some(note) = note {
            log_line(&format!("  {note}"))?;
        }
        crate::dist::group::tick();
        logs.push(e);
    }
    // A finished run resumed from checkpoint_best (its latest and final lost) ends as one.
    if lead && !checkpoint::exists(&cfg.out, "checkpoint_final") {
        checkpoint::save(&cfg.out, "checkpoint_final", be, &net, &st)?;
    }
    Ok(logs)
}

#[cfg(test)]
mod tests {
    /// Read-back steps are all counted before an error is returned: a bad label in the middle,
    /// then the rest; five non-finite steps in a row stop the run, still with every step counted.
    #[test]
    fn accounting_counts_every_step_before_its_error() {
        use crate::model::unet::StepLoss;
        let good = StepLoss { total: 1.0, applied: true, max_label: 2, ..Default::default() };
        let bad_label = StepLoss { total: f64::NAN, applied: false, max_label: 7, ..Default::default() };
        let nan = StepLoss { total: f64::NAN, applied: false, max_label: 1, ..Default::default() };
        let mut st = crate::checkpoint::TrainerState { epoch: 0, steps: 0, next_train_batch: 0, next_val_batch: 0, ema_dice: None, best_ema_dice: None, seed: 0, bad_in_a_row: 0, iter: 0, epoch_loss_sum: 0.0, epoch_steps: 0, epoch_skipped: 0, history: vec![], epochs: None };
        let cases = |n: usize| (0..n).map(|i| vec![format!("case_{i}")]).collect::<Vec<_>>();
        let steps = [good.clone(), bad_label, good.clone(), good.clone()];
        let mut pending = cases(4);
        let e = super::account(&steps, &mut pending, &mut st, &crate::model::Topology::isotropic(1, 3, vec![4, 8])).unwrap_err().to_string();
        assert!(e.contains("label 7") && e.contains("case_1") && e.contains("3 classes"), "{e}");
        assert_eq!((st.epoch_steps, st.epoch_skipped, st.epoch_loss_sum), (3, 1, 3.0));
        assert!(pending.is_empty());
        let steps: Vec<StepLoss> = std::iter::repeat_n(nan, 6).chain([good]).collect();
        let mut pending = cases(7);
        let e = super::account(&steps, &mut pending, &mut st, &crate::model::Topology::isotropic(1, 3, vec![4, 8])).unwrap_err().to_string();
        assert!(e.contains("5 steps in a row") && e.contains("case_4"), "{e}");
        assert_eq!((st.epoch_steps, st.epoch_skipped, st.bad_in_a_row), (4, 7, 0));
    }

    #[test]
    fn a_device_oom_mid_run_gets_the_preflight_advice() {
        let oom = crate::backend::OutOfMemory { what: "CUDA workspace allocation".into(), requested: Some(3 << 30), free: Some(5 << 29) };
        // 2.5 GiB free + 20 GiB held by segk: plan for 0.9 x 22.5.
        let msg = format!("{:#}", super::explain_oom(anyhow::Error::new(oom), 20 << 30));
        assert!(msg.contains("asked for 3.00 GiB, 2.50 GiB free") && msg.contains("--gpu-memory 20.2") && msg.contains("--checkpointing 2"), "{msg}");
        assert_eq!(msg.matches("out of device memory").count(), 1, "said once: {msg}");
        let other = format!("{:#}", super::explain_oom(anyhow::anyhow!("CUDA error in segk_conv: illegal address"), 0));
        assert_eq!(other, "CUDA error in segk_conv: illegal address", "other errors pass unchanged");
    }

    #[test]
    fn region_pseudo_dice_counts_each_region() {
        let (mut tp, mut fp, mut fn_) = (vec![0; 2], vec![0; 2], vec![0; 2]);
        // Regions [1, 2] and [2]; bits: 0b01 = first region only, 0b11 = both.
        // A fifth voxel carries the ignore label (3): not scored.
        super::count_regions(&[0b01, 0b11, 0b00, 0b10, 0b11], &[1, 1, 2, 0, 3], &[vec![1, 2], vec![2]], 3, &mut tp, &mut fp, &mut fn_);
        assert_eq!((tp, fp, fn_), (vec![2, 0], vec![0, 2], vec![1, 1]));
    }

    #[test]
    fn pseudo_dice_counts_skip_the_ignore_label() {
        // classes 0..3; label 3 is the ignore label.
        let (mut tp, mut fp, mut fn_) = (vec![0; 2], vec![0; 2], vec![0; 2]);
        super::count(&[1, 1, 2, 0, 2, 1], &[1, 0, 2, 2, 3, 3], 3, &mut tp, &mut fp, &mut fn_);
        assert_eq!((tp, fp, fn_), (vec![1, 1], vec![1, 0], vec![0, 1]), "ignore-label voxels neither hit nor miss");
    }
}
